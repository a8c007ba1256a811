"""pytest runner for tools/memcheck.sh.

Valgrind does not emulate AVX-512 (it hides it from CPUID), but cnorm's
``_config._load_kernels`` imports every compiled ISA module before checking the
CPU, and ``_kernels_avx512``'s module-init code already contains EVEX
instructions: ``import cnorm`` dies with SIGILL.  Make those imports fail with
ImportError (which the loader tolerates) so the baseline/AVX2 kernels run.
"""
import os
import sys

import pytest


class _BlockAVX512:
    def find_spec(self, name, path, target=None):
        if name.startswith("cnorm.") and name.endswith("_avx512"):
            raise ImportError(f"{name} blocked under valgrind (no AVX-512 emulation)")
        return None


sys.meta_path.insert(0, _BlockAVX512())
rc = int(pytest.main(sys.argv[1:]))
rc_file = os.environ.get("MEMCHECK_PYTEST_RC")
if rc_file:  # valgrind's --error-exitcode would hide pytest's own status
    with open(rc_file, "w") as f:
        f.write(str(rc))
sys.exit(rc)
