"""Kept for callers of ``stabilize.diagnose``: the diagnosis lives in :mod:`stabilize.diagnosis`.

Nothing here runs until a step has failed; then the failing step is replayed
with every operation checked and the first rule that fits names the cause
(see :mod:`stabilize.diagnosis.rules` for the causes, their definitions and
their evidence).
"""

from .diagnosis import ADVICE, CAUSES, RULES, SCALE_LIMIT, TARGET_LIMIT, Diagnosis, OpEvent, Rule, diagnose

__all__ = ["CAUSES", "ADVICE", "RULES", "Rule", "Diagnosis", "OpEvent", "diagnose", "SCALE_LIMIT", "TARGET_LIMIT"]
