"""pytest-benchmark suite: the "layer" cases of the shared table (see cases.py)."""
import pytest
from cases import case_id, cases_for

# the case was called once already (warm-up, JIT); large cases take long: few rounds
pytestmark = pytest.mark.benchmark(min_rounds=3, max_time=0.5)


@pytest.mark.parametrize("case", cases_for("layer"), ids=case_id)
def test_layers(case, run_case):
    run_case(case)
