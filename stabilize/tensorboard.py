"""Per-step scalars and events of any guard, written to TensorBoard (or read by the framework callbacks).

One record of what a step showed, :func:`step_metrics` (keys ``stabilize/...``), is what the Lightning and
Hugging Face callbacks log, and what :func:`attach` writes to a TensorBoard writer after every step of a
``TorchGuard``, a ``keras_guard`` or a ``StabilityTrainer``: ``loss``, ``grad_norm``, ``lr``, ``applied``,
``skipped``, ``spikes``, ``backoffs``, ``events``, and each event's one-line description as text
(``stabilize/event``). The JSON-lines ``events_path`` stays the durable record.

A writer is used through its own API, never created behind the user's back, unless a directory is given:

* ``torch.utils.tensorboard.SummaryWriter``: ``add_scalar`` / ``add_text``;
* a ``tf.summary`` writer (``tf.summary.create_file_writer``): ``tf.summary.scalar`` / ``text`` under
  ``writer.as_default(step=...)``;
* a directory (``str`` / ``Path``): a torch ``SummaryWriter(log_dir)`` for a torch guard; for Keras,
  ``tf.summary.create_file_writer(log_dir + "/train")``, the folder ``keras.callbacks.TensorBoard(log_dir)``
  writes its training scalars to, so the guard's curves sit beside Keras's own.

This module imports no framework; a writer's module is imported by the writer's owner.

Example::

    import stabilize, stabilize.tensorboard
    guard = stabilize.TorchGuard(model, opt, on_nonfinite="skip")
    stabilize.tensorboard.attach(guard, torch.utils.tensorboard.SummaryWriter("runs/exp1"))
"""

from __future__ import annotations

import os

__all__ = ["step_metrics", "attach", "TensorBoardSink"]


def step_metrics(supervisor) -> dict[str, float]:
    """The last step's numbers and the run's counters, keyed ``stabilize/...``.

    ``loss``, ``grad_norm`` and ``lr`` are the step's (the loss summed over micro-batches, the norm
    before clipping, the rate the update used); ``applied`` is 1.0 or 0.0; ``skipped`` counts the
    steps not applied so far, ``spikes`` the spikes seen, ``backoffs`` the current back-off level,
    ``events`` every event recorded.

    Example:
        >>> from stabilize.guard.settings import GuardSettings
        >>> from stabilize.guard.supervisor import Supervisor
        >>> step_metrics(Supervisor(GuardSettings()))["stabilize/skipped"]
        0.0
    """
    row = supervisor.rows[-1] if supervisor.rows else {}
    nan = float("nan")
    return {"stabilize/loss": float(row.get("loss", nan)),
            "stabilize/grad_norm": float(row.get("grad_norm", nan)),
            "stabilize/lr": float(row.get("lr", nan)),
            "stabilize/applied": float(row.get("committed", 0.0) == 1.0),
            "stabilize/skipped": float(supervisor.not_applied),
            "stabilize/spikes": float(supervisor.spikes.spikes if supervisor.spikes is not None else 0),
            "stabilize/backoffs": float(supervisor.policy.backoffs),
            "stabilize/events": float(len(supervisor.events))}


class TensorBoardSink:
    """A listener of a :class:`~stabilize.guard.supervisor.Supervisor`: after each step, its metrics and
    new events go to ``writer`` (a torch ``SummaryWriter`` or a ``tf.summary`` writer)."""

    def __init__(self, writer):
        self.writer = writer
        self.torch = hasattr(writer, "add_scalar")
        if not self.torch and not hasattr(writer, "as_default"):
            raise TypeError(f"writer must be a torch.utils.tensorboard.SummaryWriter, a tf.summary writer "
                            f"(tf.summary.create_file_writer(dir)) or a directory, got {type(writer).__name__}")
        self._seen = 0  # events already written

    def __call__(self, supervisor, decision=None) -> None:
        step = supervisor.step - 1  # the row just recorded
        metrics = step_metrics(supervisor)
        events = supervisor.events[self._seen:]
        self._seen = len(supervisor.events)
        text = [str(e) for e in events]
        if self.torch:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, step)
            for line in text:
                self.writer.add_text("stabilize/event", line, step)
            return
        import tensorflow as tf  # the writer is TensorFlow's: it is loaded

        with self.writer.as_default(step=step):
            for tag, value in metrics.items():
                tf.summary.scalar(tag, value)
            for line in text:
                tf.summary.text("stabilize/event", line)


def _supervisor_and_kind(obj):
    """The Supervisor behind a TorchGuard, a keras_guard result (or its callback), or a StabilityTrainer,
    and its framework (``"torch"`` / ``"tensorflow"``)."""
    if isinstance(obj, tuple):  # keras_guard(...) returns (optimizer, callback)
        obj = obj[-1]
    sup = getattr(obj, "supervisor", None)
    if sup is None:
        raise TypeError(f"attach() takes a TorchGuard, the result of keras_guard(...) or a StabilityTrainer, "
                        f"got {type(obj).__name__}")
    backend = getattr(getattr(obj, "backend", None), "name", None)
    kind = backend or ("tensorflow" if "keras" in type(obj).__module__ else "torch")
    return sup, kind


def attach(guard, writer) -> TensorBoardSink:
    """Write ``guard``'s per-step scalars and events to ``writer`` (a writer, or a directory; see the
    module docstring). Returns the sink; ``guard.supervisor.listeners.remove(sink)`` detaches it."""
    sup, kind = _supervisor_and_kind(guard)
    if isinstance(writer, (str, os.PathLike)):
        if kind == "torch":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.fspath(writer))
        else:
            import tensorflow as tf

            writer = tf.summary.create_file_writer(os.path.join(os.fspath(writer), "train"))
    sink = TensorBoardSink(writer)
    sup.listeners.append(sink)
    return sink
