"""Summarize a valgrind memcheck log: which errors have a cnorm frame.

This CPython build and glibc's vectorized string functions produce memcheck
noise with no cnorm involvement (``python -c "import numpy"`` alone reports
~1900 errors from ~33 contexts); an error counts against cnorm when any frame
of its stack is in a cnorm extension module (``_kernels*``, ``_apply*``,
``_backward*``, ``src/cnorm``) or in Numba-generated code.
Exit status: 99 when an error has a cnorm frame, else 0.
"""
import re
import sys

CNORM = re.compile(r"cnorm|_kernels|_apply|_backward|_simd\.h|_elementwise")
KINDS = re.compile(r"^(Invalid (read|write|free)|Use of uninitialised|Conditional jump"
                   r"|Syscall param|Mismatched free|Source and destination|Jump to)")


def main(path):
    text = open(path, errors="replace").read()
    blocks = re.split(r"\n==\d+== \n", text)
    total = ours = invalid = invalid_ours = 0
    for b in blocks:
        lines = [re.sub(r"^==\d+==\s?", "", ln) for ln in b.splitlines()]
        if not lines or not KINDS.match(lines[0]):
            continue
        total += 1
        is_invalid = lines[0].startswith("Invalid")
        invalid += is_invalid
        if any(CNORM.search(ln) for ln in lines[1:]):
            ours += 1
            invalid_ours += is_invalid
            print("cnorm error:\n  " + "\n  ".join(lines[:12]))
    summary = re.findall(r"ERROR SUMMARY: .*", text)
    print(f"memcheck: valgrind {summary[-1] if summary else 'no summary'}")
    print(f"memcheck: error contexts {total} (invalid read/write {invalid}); "
          f"with a cnorm frame: {ours} (invalid read/write {invalid_ours})")
    return 99 if ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
