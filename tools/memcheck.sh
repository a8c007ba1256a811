#!/usr/bin/env bash
# Run a small selection of cnorm's kernel tests under valgrind memcheck.
#
#   tools/memcheck.sh                      # default selection (a few minutes)
#   tools/memcheck.sh -k "cython and test_zero_dim"   # your own pytest args
#   MEMCHECK_LOG=/tmp/mc.log tools/memcheck.sh
#
# PYTHONMALLOC=malloc makes every Python allocation a real malloc so memcheck
# sees it.  Exits 99 on any memcheck error (invalid read/write, use of
# uninitialised values, bad free) whose stack has a cnorm frame
# (tools/_memcheck_report.py; the interpreter and glibc alone are not clean
# under memcheck); leaks are not counted (CPython keeps objects alive at exit).
# Valgrind does not emulate AVX-512 and hides it from CPUID, so the
# baseline/AVX2 kernels run.  .ci/run runs the default selection (~1 min).
set -u
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
LOG=${MEMCHECK_LOG:-$(mktemp /tmp/cnorm-memcheck.XXXXXX.log)}
SUPP=()
for f in /usr/lib/valgrind/python3.supp /usr/lib/x86_64-linux-gnu/valgrind/python3.supp \
         tools/memcheck.supp; do
    [ -f "$f" ] && SUPP+=("--suppressions=$f")
done

if [ $# -eq 0 ]; then
    set -- tests/test_moments_precision.py tests/test_small_calls.py tests/test_row_groups.py -x -q -p no:cacheprovider \
        -k "(cython and not slow and (test_zero_dim or test_n_equals_1 or test_n_equals_2 or test_nan_and_inf_confined or test_random_strides_and_axes)) or test_special_values_stay_in_their_row or test_small_moments_nan_and_ddof or ((test_small_backward_is_bitwise or test_small_channel_backward_is_bitwise) and avx2 and float32 and both) or ((test_small_batch_norm_is_bitwise or test_small_moments_are_bitwise) and avx2 and float32) or test_special_values_stay_in_their_channel or (test_grouped_rows_are_bitwise and special and avx2)"
fi

RCFILE=$(mktemp /tmp/cnorm-memcheck-rc.XXXXXX)
echo "valgrind log: $LOG"
MEMCHECK_PYTEST_RC=$RCFILE PYTHONMALLOC=malloc OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} \
valgrind --tool=memcheck --error-exitcode=99 --leak-check=no \
    --track-origins=no --num-callers=30 "${SUPP[@]}" --log-file="$LOG" \
    "$PY" tools/_memcheck_run.py "$@"
rc=$?
prc=$(cat "$RCFILE" 2>/dev/null); rm -f "$RCFILE"
if [ -z "$prc" ]; then
    echo "memcheck: pytest did not finish (valgrind status $rc), see $LOG"
    "$PY" tools/_memcheck_report.py "$LOG"
    exit "${rc/#0/1}"
fi
if [ "$prc" -ne 0 ]; then
    echo "memcheck: pytest failed with status $prc under valgrind, see $LOG"
    "$PY" tools/_memcheck_report.py "$LOG"
    exit "$prc"
fi
if [ "$rc" -ne 0 ] && [ "$rc" -ne 99 ]; then
    echo "memcheck: pytest/valgrind failed with status $rc, see $LOG"
    "$PY" tools/_memcheck_report.py "$LOG"
    exit "$rc"
fi
# valgrind exits 99 for any error, including the interpreter's own noise;
# count only errors with a cnorm frame.
"$PY" tools/_memcheck_report.py "$LOG"
