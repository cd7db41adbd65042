"""Never burn compute, on the catalogue: under every policy each case is rescued, or stops
within ``max_bad_steps`` failing batches with the right diagnosis, or (non-finite data) has its
batches skipped and listed; nothing crashes (issue 19). Slow: every case, framework and policy."""

import pytest

from .registry import CATALOGUE
from .rescue import POLICIES, run

RUNS = [pytest.param(c, fw, id=f"{c.name}-{fw}") for c in CATALOGUE for fw in ("torch", "keras") if fw in c.frameworks]


@pytest.mark.slow
@pytest.mark.parametrize("case,framework", RUNS)
def test_every_policy_rescues_or_stops_early_with_the_diagnosis(case, framework):
    for policy in POLICIES:
        outcome = run(framework, case.name, policy)
        assert outcome.ok(case.cause), (policy, outcome)


@pytest.mark.parametrize("framework", ["torch", "keras"])
def test_a_singular_op_on_every_batch_stops_at_max_bad_steps_without_lowering_the_rate(framework):
    """The fast check of the same promise: auto stops after max_bad_steps skips, never backed off."""
    for policy in POLICIES:
        outcome = run(framework, "sqrt-distance", policy)
        assert outcome.kind == "stopped" and outcome.cause == "singular-op" and outcome.longest_streak == 3, outcome
