"""The guarded-step core, free of any framework.

* :mod:`~stabilize.guard.settings`: ``GuardSettings``, validated once for every entry point.
* :mod:`~stabilize.guard.policies`: what to do about a bad step (skip, back off, roll back, raise).
* :mod:`~stabilize.guard.supervisor`: the host side of every guarded step: statistics in,
  decision out, events and history recorded.
* :mod:`~stabilize.guard.spikes`: the spike detector.
* :mod:`~stabilize.guard.replay`: a failing step replayed once: transient or reproducible.

Framework adapters live in :mod:`stabilize.integrations`.
"""
