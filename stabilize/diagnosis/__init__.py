"""Name the cause, the operation and the fix when a training step goes non-finite.

``core.diagnose`` replays the failing step with every operation checked
(``trace_torch``, ``trace_tf``), gathers the evidence (``evidence``) and
applies the ordered rules (``rules``); ``report.Diagnosis`` is the result.
"""

from .core import diagnose
from .ops import OpEvent
from .report import Diagnosis
from .rules import ADVICE, CAUSES, RULES, SCALE_LIMIT, TARGET_LIMIT, Rule

__all__ = ["diagnose", "Diagnosis", "OpEvent", "CAUSES", "ADVICE", "RULES", "Rule", "SCALE_LIMIT", "TARGET_LIMIT"]
