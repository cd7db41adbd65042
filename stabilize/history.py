"""What a run recorded: per-step curves, events, the first non-finite step."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Event", "History"]


@dataclass(frozen=True)
class Event:
    """One bad step and what was done about it.

    Attributes:
        step: the 0-based step index (every attempted step counts).
        batch_index: the batch's position in its epoch.
        epoch: the epoch; None where the loop's epochs are not known (a ``TorchGuard`` step not
            told them): the event then names the step alone.
        kind: ``"nonfinite"``, ``"large-update"`` (update/weight ratio above the bound), ``"spike"``,
            ``"left-out"`` (a batch a rewind or a rollback leaves out), ``"repair"`` (a call site swapped)
            (a finite loss or gradient norm above the spike detector's limit),
            ``"scaler"`` (a loss scaler skipped an overflowing step; not a failure) or ``"lr-growth"``.
        nonfinite: which of ``"loss"``, ``"gradients"``, ``"weights"``, ``"buffers"`` were non-finite.
        action: ``"skipped"``, ``"clipped"`` (a spike, applied clipped), ``"backed-off"``, ``"rolled-back"``, ``"raised"``,
            ``"applied"`` (policy ``ignore``), ``"scaler-skip"`` or ``"grew-lr"``.
        lr: the learning rate the step ran with.
        loss: the step's loss.
        grad_norm: the step's gradient norm.
        steps_lost: for a restore to an older snapshot, the applied steps it undid.
        replay: for a rewind or a rollback, what replaying the failing step from the same
            pre-step state, batch and RNG showed (:mod:`stabilize.guard.replay`):
            ``"transient"`` (the replay was clean: hardware or nondeterminism),
            ``"reproducible"`` (the data or the model), or None (not replayed).
    """

    step: int
    batch_index: int
    epoch: int | None
    kind: str
    nonfinite: tuple[str, ...]
    action: str
    lr: float
    loss: float
    grad_norm: float
    steps_lost: int | None = None
    replay: str | None = None

    def __str__(self) -> str:
        what = ", ".join(self.nonfinite) or {"spike": "above the spike limit",
                                             "left-out": "the failing batch, whole (its rows depend on each other)"
                                             if self.action == "whole-batch" else "a batch after a spike rewind",
                                             "repair": "the diagnosed call site now calls its safe twin"}.get(
                                                 self.kind, "update ratio over the bound")
        return (
            f"step {self.step}{'' if self.epoch is None else f' (epoch {self.epoch}, batch {self.batch_index})'}: "
            f"{self.kind} [{what}]; "
            f"loss={self.loss:.6g} grad_norm={self.grad_norm:.6g} lr={self.lr:.3g} -> {self.action}"
            + (f" ({self.steps_lost} applied steps lost)" if self.steps_lost else "")
            + (f"; replay: {self.replay}" if self.replay else "")
        )


@dataclass
class History:
    """Returned by ``StabilityTrainer.fit``.

    Attributes:
        steps: the global index of each attempted step (steps count across ``fit`` calls).
        losses, grad_norms, lrs, update_ratios: one float64 entry per attempted step.
        committed: whether each step's update was applied.
        events: the bad steps (and rate changes), in order.
        first_nonfinite_step: the first step whose loss, gradients or candidate
            weights were non-finite, or None.
        diagnosis: filled by the diagnosis module when a step fails (else None).
    """

    losses: np.ndarray = field(default_factory=lambda: np.zeros(0))
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    grad_norms: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lrs: np.ndarray = field(default_factory=lambda: np.zeros(0))
    update_ratios: np.ndarray = field(default_factory=lambda: np.zeros(0))
    committed: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    events: list[Event] = field(default_factory=list)
    first_nonfinite_step: int | None = None
    diagnosis: object | None = None

    @classmethod
    def from_rows(cls, rows: list[dict], events: list[Event], first_nonfinite_step: int | None,
                  diagnosis=None) -> "History":
        """Build the record from per-step statistics dicts (``loss``, ``grad_norm``, ``lr``, ...)."""
        col = lambda k: np.array([r.get(k, 0.0) for r in rows], dtype=np.float64)
        steps = np.array([r.get("step", i) for i, r in enumerate(rows)], dtype=np.int64)
        return cls(col("loss"), steps, col("grad_norm"), col("lr"), col("update_ratio"),
                   col("committed").astype(bool), list(events), first_nonfinite_step, diagnosis)

    @property
    def final_loss(self) -> float:
        """The loss of the last committed step (NaN if none was committed)."""
        idx = np.flatnonzero(self.committed)
        return float(self.losses[idx[-1]]) if idx.size else float("nan")

    def _final(self) -> str:
        """The report's loss phrase: the last applied step's loss, or that no step was applied (a NaN
        there would read as a diverged loss when the losses may have been finite and the gradients not)."""
        if n := len(self.losses):
            if not self.committed.any():
                return f"no step applied (the weights are as they were at the start; last loss {self.losses[n - 1]:.6g})"
        return f"final loss {self.final_loss:.6g}"

    @property
    def skipped_steps(self) -> int:
        """Steps whose update was not applied (for any reason: non-finite, spike, scaler overflow)."""
        return int((~self.committed).sum())

    @property
    def spikes(self) -> int:
        """Finite loss or gradient-norm spikes caught (skipped or clipped)."""
        return sum(1 for e in self.events if e.kind == "spike")

    def report(self) -> str:
        """A text summary: steps, final loss, every event."""
        n = len(self.losses)
        lines = [
            f"{n} steps, {int(self.committed.sum())} applied, {self.skipped_steps} not applied, {self.spikes} "
            f"spikes, {self._final()}, first non-finite step: {self.first_nonfinite_step}"
        ]
        events = self.events
        if len(events) > 12:  # the first ones say what happened; the rest repeat it
            lines += [f"  {e}" for e in events[:8]]
            lines.append(f"  ... {len(events) - 10} more events ...")
            lines += [f"  {e}" for e in events[-2:]]
        else:
            lines += [f"  {e}" for e in events]
        if self.diagnosis is not None:
            lines.append(str(self.diagnosis))
        return "\n".join(lines)

    def plot(self, path: str, title: str | None = None) -> str:
        """Write a PNG of the loss and gradient-norm curves, events marked (needs matplotlib)."""
        try:
            import matplotlib  # noqa: F401 - the import tells whether the extra is installed
        except ImportError as exc:
            from .errors import install_hint

            raise ImportError(f"History.plot needs matplotlib: {install_hint('scenarios')}") from exc
        # A Figure with its own Agg canvas: pyplot's global backend and figure list stay untouched.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 5.5))
        FigureCanvasAgg(fig)
        top, bottom = fig.subplots(2, 1, sharex=True)
        steps = self.steps if len(self.steps) == len(self.losses) else np.arange(len(self.losses))
        for ax, values, label in ((top, self.losses, "loss"), (bottom, self.grad_norms, "gradient norm")):
            shown = np.where(np.isfinite(values), np.minimum(np.abs(values), 1e200), np.nan)
            ax.plot(steps, shown, lw=1.5)
            bad = ~np.isfinite(values)
            if bad.any():
                ax.plot(steps[bad], np.full(bad.sum(), np.nanmax(shown) if np.isfinite(shown).any() else 1.0), "rx",
                        label="non-finite")
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.set_ylabel(label)
            for e in self.events:
                ax.axvline(e.step, color="tab:red" if e.kind == "nonfinite" else "tab:orange", ls=":", lw=1)
        if len(steps):  # a real x-range even for a run of one step
            bottom.set_xlim(steps[0] - 0.5, max(steps[-1], steps[0] + 1) + 0.5)
            bottom.xaxis.get_major_locator().set_params(integer=True, nbins=10)
        bottom.set_xlabel("step (dotted: events)")
        heading = title or (self.diagnosis.line() if self.diagnosis is not None else "training history")
        top.set_title(heading if len(heading) < 90 else heading[:87] + "...", fontsize=9)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        return path

    def __str__(self) -> str:
        return self.report()
