"""tf.distribute for the guarded Keras step: one cross-replica reduction, one decision on every replica.

Under ``tf.distribute.MirroredStrategy`` Keras runs the train step once per
replica, each on its own shard of the batch, and the inner optimizer sums the
replicas' gradients before it updates. A guard that judged each replica's own
shard would let a replica with a NaN in its shard skip while the others
apply: the mirrored weights would silently differ from then on.

Here :class:`GuardedOptimizer.apply <.keras_optimizer.GuardedOptimizer>` does,
inside the compiled step:

1. ONE ``all_reduce(SUM)`` over the replicas of the gradients (the sum Keras
   would have formed anyway) together with a small vector (the gradients' float dtype)
   ``[loss_bad, buffers_bad, data_bad, loss]`` (:data:`SLOTS`): a count of
   replicas with a bad flag, and the loss summed (Keras divides each
   replica's loss by the number of replicas, so the sum is the batch's loss);
2. the finite check, the global norm and the clip coefficient from the
   *reduced* gradients, which are the same tensor on every replica, so every
   replica takes the same decision with the same coefficient;
3. the inner optimizer's update inside ``merge_call`` (a ``cond`` in the
   cross-replica context, as Keras's own ``LossScaleOptimizer`` does: a
   ``cond`` in a replica context whose branch synchronizes is not allowed),
   with the inner optimizer's own gradient all-reduce switched off while it
   is traced (:func:`no_second_reduce`): the gradients are already summed.

Without a strategy nothing here is used and the step is exactly the
single-device one.
"""

from __future__ import annotations

import contextlib

from keras import ops

__all__ = ["SLOTS", "cond_apply", "no_second_reduce", "reduce_step", "replica_context"]

SLOTS = ("loss_bad", "buffers_bad", "data_bad", "loss")


def replica_context():
    """The ``tf.distribute`` replica context when the step runs under a strategy (one replica included:
    its ``merge_call`` cannot sit in a replica-context ``cond`` either), else None."""
    import sys

    tf = sys.modules.get("tensorflow")
    if tf is None:
        return None
    rc = tf.distribute.get_replica_context()
    if rc is None or not tf.distribute.has_strategy():
        return None
    return rc


def reduce_step(rc, state, settings, grads, loss_ok, buffers_ok, loss):
    """One all-reduce (SUM) of the gradients and the step's flag vector (:data:`SLOTS`).

    Returns ``(grads, loss_ok, buffers_ok, loss)`` as every replica sees them
    after the sum: the summed gradients (``None`` kept in place), the flags
    true only when no replica's was false, and the batch's loss. The
    reduced "bad data" flag goes to ``state.data_ok`` (policy ``auto``).
    """
    import tensorflow as tf

    if settings.max_update_ratio is not None:
        raise NotImplementedError("max_update_ratio is not supported under a tf.distribute strategy yet")
    data_ok = ops.convert_to_tensor(True) if state.data_ok_local is None else ops.equal(state.data_ok_local, 1)
    present = [g for g in grads if g is not None]
    # the all-reduce packs its tensors together, so the vector takes the gradients' dtype (float32 or wider)
    dt = "float64" if present and str(present[0].dtype) == "float64" else "float32"
    bad = lambda ok: 1.0 - ops.cast(ok, dt)
    shown = ops.zeros((), dt) if loss is None else ops.cast(loss, dt)
    vec = ops.stack([bad(loss_ok), bad(buffers_ok), bad(data_ok), shown])
    reduced = rc.all_reduce(tf.distribute.ReduceOp.SUM, present + [vec])
    it = iter(reduced[:-1])
    grads = [None if g is None else next(it) for g in grads]
    flags = dict(zip(SLOTS, (reduced[-1][i] for i in range(len(SLOTS)))))
    state.data_ok.assign(ops.cast(ops.equal(flags["data_bad"], 0.0), "int32"))
    loss = None if loss is None else ops.cast(flags["loss"], "float32")
    return grads, ops.equal(flags["loss_bad"], 0.0), ops.equal(flags["buffers_bad"], 0.0), loss


def cond_apply(rc, go, fn, grads, tvs, optimizer, around=contextlib.nullcontext):
    """Run ``fn(grads, tvs)`` on every replica when ``go``, else nothing: the ``cond`` is taken in the
    cross-replica context, where the inner optimizer's own ``merge_call`` may sit inside its branch.
    ``optimizer``'s own gradient all-reduce is off meanwhile: ``grads`` are already summed. ``around()``
    (e.g. the backed-off rate) is entered here once, not in each replica's thread: the replicas share the
    optimizer object, so a swap made and undone per thread would race."""
    present = [(g, v) for g, v in zip(grads, tvs) if g is not None]
    grads, tvs = [g for g, _ in present], [v for _, v in present]

    def merged(distribution, go, grads):
        flag = distribution.experimental_local_results(go)[0]  # the same on every replica: reduced

        def run():  # one thread here (cross-replica), so the patch is set and undone once
            with no_second_reduce(optimizer), around():
                distribution.extended.call_for_each_replica(fn, args=(grads, tvs))

        ops.cond(flag, run, lambda: None)

    rc.merge_call(merged, args=(go, grads))


def _chain(optimizer):
    while optimizer is not None:
        yield optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)


@contextlib.contextmanager
def no_second_reduce(optimizer):
    """While the update is traced, the optimizers under ``optimizer`` take the gradients as already
    summed over the replicas (Keras's ``_all_reduce_sum_gradients`` becomes the identity)."""
    patched = []
    for opt in _chain(optimizer):
        if hasattr(opt, "_all_reduce_sum_gradients"):
            object.__setattr__(opt, "_all_reduce_sum_gradients", lambda grads_and_vars: list(grads_and_vars))
            patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt.__dict__["_all_reduce_sum_gradients"]
