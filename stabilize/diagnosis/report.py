"""The diagnosis a failed step gets: cause, where, the evidence and the fix."""

from __future__ import annotations

from dataclasses import dataclass, field

from .ops import OpEvent

__all__ = ["Diagnosis"]


@dataclass
class Diagnosis:
    """Why a step went non-finite.

    Attributes:
        cause: one of ``stabilize.diagnose.CAUSES`` (``unknown`` when no rule fits).
        step, batch_index: where it happened.
        origin: the module / layer path of the first non-finite value, ``"loss"``,
            ``"input batch"`` or the parameter whose update overflowed.
        phase: ``"forward"`` or ``"backward"``.
        evidence: the figures that decided it.
        advice: the remedy, naming the stabilize call or setting.
        op: the operation in the user's code that first turned finite values
            non-finite, with its source line (None when no single op did,
            e.g. an update that overflowed).
    """

    cause: str
    step: int
    batch_index: int
    origin: str
    phase: str
    evidence: dict = field(default_factory=dict)
    advice: str = ""
    op: OpEvent | None = None

    def origin_line(self) -> str:
        """``torch.sqrt at losses.py:42 in gps_loss (backward: 3 inputs exactly 0, d sqrt/dx = inf there)``."""
        return self.op.line_text() if self.op is not None else f"{self.origin} ({self.phase})"

    def line(self) -> str:
        return (f"stabilize: step {self.step} went non-finite: cause {self.cause} "
                f"(origin {self.origin_line()}); fix: {self.advice.split(';')[0]}")

    def __str__(self) -> str:
        lines = [
            f"diagnosis: {self.cause}",
            f"  step {self.step}, batch {self.batch_index}; in {self.origin} ({self.phase} pass)",
            f"  origin: {self.origin_line()}",
        ]
        if self.op is not None and self.op.source:  # the user's line: it names the term of a loss of several
            lines.append(f"  code: {self.op.source}")
        lines.append("  evidence:")
        for key, value in self.evidence.items():
            shown = f"{value:.4g}" if isinstance(value, float) else value
            lines.append(f"    {key}: {shown}")
        lines.append(f"  advice: {self.advice}")
        return "\n".join(lines)
