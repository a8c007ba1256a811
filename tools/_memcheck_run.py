"""pytest runner for tools/memcheck.sh: records pytest's own exit status.

Valgrind does not emulate AVX-512 and hides it from CPUID, so cnorm selects
(and imports) only the baseline/AVX2 kernels here.
"""
import os
import sys

import pytest

rc = int(pytest.main(sys.argv[1:]))
rc_file = os.environ.get("MEMCHECK_PYTEST_RC")
if rc_file:  # valgrind's --error-exitcode would hide pytest's own status
    with open(rc_file, "w") as f:
        f.write(str(rc))
sys.exit(rc)
