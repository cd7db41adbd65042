"""Never burn compute (issue 19), on the policy alone: a failure that max_bad_steps batches with
finite data repeat stops the run when no smaller rate can cure it; bad data never counts."""

import pytest

from stabilize.guard.policies import RATE_PATIENCE, Policy
from stabilize.guard.settings import GuardSettings


def _policy(mode, n=3):
    return Policy(GuardSettings(on_nonfinite=mode, max_bad_steps=n))


def _actions(p, k, **kw):
    return [p.on_bad(**kw) for _ in range(k)]


@pytest.mark.parametrize("mode", ["skip", "backoff", "auto", "repair"])
def test_a_failure_at_the_weights_stops_at_max_bad_steps(mode):
    p = _policy(mode)
    actions = _actions(p, 3, at_weights=True)
    assert actions[-1] == "raise" and "raise" not in actions[:-1]


def test_auto_skips_without_backing_off_when_the_cause_is_not_a_rate():
    p = _policy("auto")
    assert _actions(p, 3, cause="singular-op", at_weights=True) == ["skipped", "skipped", "raise"]
    assert p.backoffs == 0 and p.factor == 1.0


def test_auto_backs_off_for_a_rate_cause():
    p = _policy("auto")
    assert _actions(p, 3, cause="high-lr") == ["backed-off", "backed-off", "raise"]
    assert p.backoffs == 2


def test_backoff_may_go_on_for_an_update_that_overflows_but_not_for_ever():
    p = _policy("backoff")
    actions = _actions(p, RATE_PATIENCE * 3, cause="high-lr", at_weights=False)
    assert actions[:-1] == ["backed-off"] * (RATE_PATIENCE * 3 - 1) and actions[-1] == "raise"


def test_rollback_stops_for_a_cause_that_is_not_a_rate_and_rolls_back_for_a_rate():
    p = _policy("rollback")
    assert _actions(p, 3, cause="masked-softmax", at_weights=True) == ["skipped", "skipped", "raise"]
    assert p.rollbacks == 0
    p = _policy("rollback")
    assert _actions(p, 3, cause="high-lr", at_weights=True) == ["skipped", "skipped", "rolled-back"]


@pytest.mark.parametrize("mode", ["skip", "backoff", "rollback", "auto"])
def test_bad_data_never_counts_towards_the_stop(mode):
    p = _policy(mode)
    actions = _actions(p, 10, bad_data=True, at_weights=True)
    assert "raise" not in actions[:3] and p.stuck == 0 and p.stuck_at_weights == 0


def test_a_good_step_resets_the_count_and_the_state_round_trips():
    p = _policy("skip")
    _actions(p, 2, at_weights=True)
    p.on_good()
    assert _actions(p, 2, at_weights=True) == ["skipped", "skipped"]
    q = _policy("skip")
    q.load_state_dict(p.state_dict())
    assert q.on_bad(at_weights=True) == "raise"
