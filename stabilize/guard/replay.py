"""Transient or reproducible: replay a failing step once before its rewind or rollback.

A step that failed (a non-finite loss or gradient, or a finite spike) has two
kinds of cause. A *transient* one (a bit flip, a flaky device, a kernel's
nondeterminism) does not come back when the very same computation runs again;
a *reproducible* one (the batch holds NaN, the model or the rate diverges on
it) does. Megatron-LM's rerun state machine
(``megatron/core/rerun_state_machine.py``, ``RerunStateMachine``) makes this
distinction by re-running the iteration in place and comparing; here the
failing step is replayed once:

* from the same pre-step state: the step was not committed, so the live
  parameters, optimizer state and (put back by the step) buffers and RNG are
  the ones it started from;
* on the same batch, with the same rate (:meth:`Supervisor.replay_rate
  <stabilize.guard.supervisor.Supervisor.replay_rate>`) and the same spike limits;
* without keeping anything: the updater's own ``capture()`` is taken first and
  ``restore()`` puts back parameters, buffers, optimizer, scheduler, loss
  scaler, RNG and the applied-step count, bit for bit, whatever the replay did.

A rollback forced by weights that an earlier native update already broke is
not replayed (its pre-step state is gone): its event keeps ``replay=None``.

A clean replay (finite, below the spike limits, weights finite) means
``"transient"``; anything else ``"reproducible"``. The verdict goes into the
event (``Event.replay``), its text in the report, and the JSON-lines log.

The updaters are the framework hooks: each has ``capture()``, ``restore()``,
``run(x, y, rate)`` and ``weights_finite()`` (torch: :class:`TorchState`
copies, RNG included; Keras: every variable; ``stabilize.optim`` specs: the
parameters and optimizer variables; spec models draw no random numbers). An
updater may define ``replay(x, y, rate) -> stats`` to do it its own way.

Cost: one forward/backward and one copy of the training state, only on a
rewind or a rollback (rare, and bounded by ``max_rollbacks``); ``replay="off"``
turns it off. Under torch.distributed every rank replays (the decision to
restore is the same on every rank), so the step's collectives stay matched.

Example:
    >>> verdict({"loss_finite": 1.0, "grads_finite": 1.0, "spike": 0.0})
    'transient'
    >>> verdict({"loss_finite": 0.0, "grads_finite": 0.0})
    'reproducible'
"""

from __future__ import annotations

import logging

from ..distributed import is_main

__all__ = ["VERDICTS", "verdict", "replay_step", "replay_failed_step"]

logger = logging.getLogger("stabilize")

VERDICTS = ("transient", "reproducible")

# Every statistic that must read "clean" (1.0) for the replay to count as transient.
_FINITE = ("loss_finite", "grads_finite", "weights_finite", "buffers_finite")


def verdict(stats: dict, weights_ok: bool = True) -> str:
    """``"transient"`` when the replayed step is clean (finite everywhere, no spike, no update
    over the bound, finite weights after it), else ``"reproducible"``."""
    clean = all(stats.get(k, 1.0) == 1.0 for k in _FINITE) and stats.get("spike", 0.0) != 1.0 \
        and stats.get("large_update", 0.0) != 1.0 and weights_ok
    return "transient" if clean else "reproducible"


def replay_step(updater, xb, yb, rate) -> tuple[dict, bool]:
    """Run the step again from the live (pre-step) state and put every bit of it back.

    Returns the replay's statistics and whether the weights it left were finite
    (read only when it committed: an uncommitted step left them as they were).
    """
    own = getattr(updater, "replay", None)
    if own is not None:
        stats = own(xb, yb, rate)
        return stats, stats.get("weights_finite", 1.0) == 1.0
    saved = updater.capture()
    try:
        stats = updater.run(xb, yb, rate)
        weights_ok = updater.weights_finite() if stats.get("committed") == 1.0 else True
    finally:
        updater.restore(saved)
    return stats, weights_ok


def replay_failed_step(updater, supervisor, xb, yb) -> str | None:
    """Replay the step the supervisor just decided to restore over (``Decision.replay``), record
    the verdict in its event and the event log, and return it. A replay that raises is logged,
    never raised (it must not take the run down), and gives no verdict."""
    result = None
    try:
        stats, weights_ok = replay_step(updater, xb, yb, supervisor.replay_rate())
        result = verdict(stats, weights_ok)
    except Exception as exc:  # noqa: BLE001 - reported; the rewind or rollback still happens
        if is_main():
            logger.warning("stabilize: replaying step %d failed (%s: %s); no verdict", supervisor.step - 1,
                           type(exc).__name__, exc)
    finally:
        supervisor.replayed(result)
    if result is not None and is_main():
        cause = "a transient fault (hardware or nondeterminism)" if result == "transient" else \
            "reproducible (the data or the model)"
        logger.warning("stabilize: step %d replayed from the same state, batch and RNG: %s", supervisor.step - 1,
                       cause)
    return result
