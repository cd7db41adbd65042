"""The eight built-in scenarios, each with its variants.

Every number below was chosen so that the diverging variant really diverges in
float64 *and* float32 on every backend, and the fixed ones converge below their
stated bound. Data and initial weights come from numpy under fixed seeds.
"""

from __future__ import annotations

import numpy as np

from ..finite import check_finite
from ..errors import NonFiniteError
from ..models import MLP
from ..ops import global_norm, safe_cross_entropy, safe_mse
from ..optim import SGD
from . import data
from . import losses as L
from .base import Case, Scenario

__all__ = ["SCENARIOS"]


# -- helpers ---------------------------------------------------------------------
def _split_scale(X: np.ndarray, y: np.ndarray, *, leak: bool):
    """Split 80/20, then fit StandardScalers (on the training split, or on all rows if ``leak``)."""
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    train_index, test_index = train_test_split(np.arange(len(y)), test_size=0.2, random_state=0)
    X_tr, X_te, y_tr, y_te = X[train_index], X[test_index], y[train_index], y[test_index]
    fit_X, fit_y = (X, y) if leak else (X_tr, y_tr)
    sx, sy = StandardScaler().fit(fit_X), StandardScaler().fit(fit_y)
    return X_tr, X_te, y_tr, y_te, sx, sy, train_index


def _as_inputs(M: np.ndarray) -> dict:
    return {"input1": M[:, 0], "input2": M[:, 1]}


def _full_loss(trainer, loss, x, y) -> float:
    B = trainer.backend
    pred = trainer.model(trainer._convert(x))
    return float(B.to_numpy(loss(pred, trainer._convert(y))))


# -- unscaled-inputs ---------------------------------------------------------------
def _unscaled(variant: str) -> Case:
    inputs, y = data.two_inputs()
    model = MLP((2, 16, 16, 1), seed=0)
    if variant == "diverging":
        return Case(model, L.naive_mse, SGD(lr=1e-3), inputs, y, "diverge", epochs=5,
                    note="raw inputs (input1 ~ N(3000, 4000²), input2 ~ N(5, 3²)) into a ReLU MLP")
    X = np.column_stack([inputs["input1"], inputs["input2"]])
    X_tr, X_te, y_tr, y_te, sx, sy, train_index = _split_scale(X, y, leak=variant == "leaky")

    def probe(trainer, case):
        pred = trainer.predict(_as_inputs(sx.transform(X_te)))
        rmse = float(np.sqrt(np.mean((sy.inverse_transform(pred) - y_te) ** 2)))
        return {"test_rmse_original_units": rmse}

    facts = {
        "train_rows": len(X_tr),
        "scaler_fit_rows": int(sx.n_samples_seen_),
        "scaler": sx,
        "train_index": train_index,
        "raw_inputs": X,
        "raw_targets": y,
    }
    note = ("scaler fitted on ALL rows before splitting: test statistics leak into training"
            if variant == "leaky" else "split first, StandardScaler fitted on the training split only")
    return Case(model, safe_mse, SGD(lr=1e-2, momentum=0.9), _as_inputs(sx.transform(X_tr)),
                sy.transform(y_tr), "finite", epochs=20, bound=0.01, probe=probe, note=note, facts=facts)


# -- log-zero -------------------------------------------------------------------------
def _log_zero(variant: str) -> Case:
    X, labels = data.clusters()
    onehot = np.eye(3)[labels]
    model = MLP((2, 16, 3), init="normal", init_scale=6.0, seed=0)
    if variant == "diverging":
        return Case(model, L.naive_log_softmax_cross_entropy, SGD(lr=0.01), X, onehot, "diverge",
                    note="log(softmax(z)) with saturated logits: 0 * log(0) = NaN")
    if variant == "fixed":
        return Case(model, safe_cross_entropy, SGD(lr=0.01), X, labels, "finite", bound=0.01,
                    note="cross-entropy from logits (stabilize.safe_cross_entropy)")

    def probe(trainer, case):
        B = trainer.backend
        logits = B.to_numpy(trainer.model(trainer._convert(X))).astype(np.float64)
        z = logits - logits.max(1, keepdims=True)
        p_true = (np.exp(z) / np.exp(z).sum(1, keepdims=True))[np.arange(len(labels)), labels]
        clipped = np.flatnonzero(p_true < 1e-8)
        facts = {"clipped_samples": int(clipped.size)}
        if clipped.size:
            xs, ys = trainer._convert(X[clipped]), trainer._convert(onehot[clipped])
            loss, grads = B.value_and_grad(lambda: L.clipped_log_softmax_cross_entropy(trainer.model(xs), ys), trainer.params)
            grads = [B.zeros_like(p) if g is None else g for g, p in zip(grads, trainer.params)]
            facts["clipped_loss"] = float(B.to_numpy(loss))
            facts["clipped_grad_norm"] = float(B.to_numpy(global_norm(grads, backend=B)))
        facts["full_loss"] = _full_loss(trainer, L.clipped_log_softmax_cross_entropy, X, onehot)
        # The stall: samples the clip hides get exactly zero gradient, so they are never learned.
        facts["stalled"] = bool(clipped.size and facts["clipped_grad_norm"] == 0.0 and facts["clipped_loss"] > 1.0)
        return facts

    return Case(model, L.clipped_log_softmax_cross_entropy, SGD(lr=0.01), X, onehot, "stall", probe=probe,
                note="log(clip_by_value(p, 1e-8, 1)): finite, but zero gradient where clipped")


# -- high-lr (seeds 001-003) ----------------------------------------------------------
def _high_lr(variant: str) -> Case:
    X, y = data.regression(nonlinear=True)
    model = MLP((4, 32, 32, 1), seed=0)
    if variant == "diverging":
        return Case(model, L.naive_mse, SGD(lr=0.5), X, y, "diverge", note="SGD at lr=0.5: updates overshoot")
    if variant == "fixed":
        return Case(model, safe_mse, SGD(lr=0.05), X, y, "finite", bound=0.8, note="a 10x smaller rate")

    def probe(trainer, case):
        return {"final_lr": trainer.current_lr(), "backoffs": trainer.policy.backoffs}

    return Case(model, safe_mse, SGD(lr=0.5), X, y, "finite", bound=0.8, probe=probe,
                trainer_kwargs={"on_nonfinite": "backoff", "backoff_factor": 0.5, "max_update_ratio": 0.5},
                note="the original rate; the trainer skips each update larger than half the weights "
                     "(the precursor of the blow-up) and halves the rate")


# -- huge-targets ---------------------------------------------------------------------
def _huge_targets(variant: str) -> Case:
    X, y = data.regression()
    model = MLP((4, 32, 32, 1), seed=0)
    big = y * 1e10
    if variant == "diverging":
        return Case(model, L.naive_mse, SGD(lr=0.01), X, big, "diverge", note="targets multiplied by 1e10")
    if variant == "fixed":
        return Case(model, safe_mse, SGD(lr=0.01), X, big / 1e10, "finite", bound=0.3,
                    note="targets divided back by 1e10 (predictions are multiplied by it)")
    return Case(model, safe_mse, SGD(lr=0.01), X, big, "finite", bound=float(np.mean(big**2)),
                trainer_kwargs={"clip_norm": 1.0},
                note="clip_norm=1.0: finite, and never worse than predicting 0 (the bound); the steps "
                     "are too small to fit 1e10 targets, which the fixed (scaled) variant does")


# -- dirty-data (seeds 002, 003) ------------------------------------------------------
_BAD_CELLS = {(101, 0): np.nan, (102, 3): np.nan, (117, 1): np.nan, (200, 2): np.inf}


def _dirty_data(variant: str) -> Case:
    X, y = data.regression()
    X = X.copy()
    for (r, c), v in _BAD_CELLS.items():
        X[r, c] = v
    model = MLP((4, 32, 32, 1), seed=0)
    if variant == "diverging":
        return Case(model, L.naive_mse, SGD(lr=0.01), X, y, "diverge", shuffle=False,
                    note="3 NaN and 1 inf cells in X; training is fine until the first batch holding one (step 3)")

    def preflight(case):
        try:
            check_finite({"X": case.x, "y": case.y}, name="data")
        except NonFiniteError as exc:
            bad = ~np.isfinite(case.x).all(axis=1)
            dropped = np.flatnonzero(bad)
            case.x, case.y = case.x[~bad], case.y[~bad]
            return case, {"check_finite": str(exc), "dropped_rows": dropped.tolist()}
        return case, {"dropped_rows": []}

    return Case(model, safe_mse, SGD(lr=0.01, momentum=0.9), X, y, "finite", bound=0.1, preflight=preflight, shuffle=False,
                note="check_finite names the cells; the rows holding them are dropped, and listed")


# -- masked-loss ----------------------------------------------------------------------
def _masked_loss(variant: str) -> Case:
    X, y0 = data.regression()
    y = np.clip(3.0 + 0.4 * y0 / np.std(y0), 0.5, None)
    y[[5, 77, 150]] = 0.0  # missing values recorded as 0
    model = MLP((4, 32, 32, 1), seed=0)

    def probe(trainer, case):
        weights = trainer.get_weights()
        return {
            "losses_all_finite": None,  # filled by run() from the trajectory
            "weights_finite_at_end": bool(all(np.isfinite(w).all() for w in weights)),
        }

    if variant == "diverging":
        return Case(model, L.masked_relative_error, SGD(lr=0.01), X, y, "diverge", stop_on_nonfinite=False,
                    probe=probe, note="where(is_finite(l), l, 0): the loss prints fine over NaN weights")
    if variant == "guarded":
        return Case(model, L.masked_relative_error, SGD(lr=0.01), X, y, "guarded", bound=0.4, probe=probe,
                    trainer_kwargs={"on_nonfinite": "skip"},
                    note="the same loss; the trainer's guard skips every step with NaN gradients")
    return Case(model, L.double_where_relative_error, SGD(lr=0.01), X, y, "finite", bound=0.4, probe=probe,
                note="the loss made safe first: the double-where trick, no branch ever holds inf")


# -- numpy-net ------------------------------------------------------------------------
def _numpy_net(variant: str) -> Case:
    X, y = data.hand_net_data()
    n = len(y)
    if variant == "diverging":
        model = MLP((3, 10, 1), activation="sigmoid", init="normal", init_scale=1.0, seed=0)
        return Case(model, L.naive_mse, SGD(lr=0.5), X, y, "diverge", epochs=300, batch_size=n, shuffle=False,
                    note="hand-written net: N(0,1) init, raw data, lr=0.5, full batch, no clipping")
    from sklearn.preprocessing import StandardScaler

    sx, sy = StandardScaler().fit(X), StandardScaler().fit(y)
    model = MLP((3, 10, 1), activation="relu", init="he", seed=0)

    def loss(pred, target):
        return safe_mse(L.clip_output_gradient(pred, 1.0), target)

    return Case(model, loss, SGD(lr=0.01), sx.transform(X), sy.transform(y), "finite", epochs=300, batch_size=n,
                shuffle=False, bound=0.1,
                note="He init, inputs and outputs standardised, output gradient clipped to [-1, 1], lr=0.01")


# -- loss-spike (issue 11, section 3) -------------------------------------------------
SPIKE_ROWS = slice(768, 832)  # batches 24 and 25 of each epoch (1024 rows, batch 32, no shuffling)
SPIKE_FACTOR = 30.0


def _loss_spike(variant: str) -> Case:
    X, y = data.regression(n=1024)
    y = y.copy()
    y[SPIKE_ROWS] *= SPIKE_FACTOR  # a burst of corrupt (mis-scaled) targets: the loss spikes, still finite
    model = MLP((4, 32, 32, 1), seed=0)
    opt = SGD(lr=0.01, momentum=0.9)
    if variant == "diverging":
        return Case(model, L.naive_mse, opt, X, y, "diverge", epochs=4, shuffle=False,
                    note=f"targets x{SPIKE_FACTOR:g} in batches 24-25: the loss jumps 1e4-fold (finite), "
                         "momentum carries the kick, and the run overflows a few steps later")
    return Case(model, L.naive_mse, opt, X, y, "finite", epochs=4, shuffle=False, bound=0.1,
                trainer_kwargs={"spike": "skip", "spike_warmup": 10},
                note="the same data and rate; the spike detector (z-score on loss and gradient norm, "
                     "decided on the device) skips each spiking batch, with a 'spike' event")


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario("unscaled-inputs", ("000_00d598057efd8982.txt",),
                 "unscaled inputs of very different ranges feeding ReLU layers",
                 {v: (lambda v=v: _unscaled(v)) for v in ("diverging", "fixed", "leaky")}),
        Scenario("log-zero", ("001_c5368abc5e3e7511.txt",), "log(softmax(z)) hits log(0)",
                 {v: (lambda v=v: _log_zero(v)) for v in ("diverging", "clipped", "fixed")}),
        Scenario("high-lr", ("001_c5368abc5e3e7511.txt", "002_cf8ffe79dfe02bfd.txt", "003_cdfa176bf9e36a9f.txt"),
                 "a learning rate that is too high", {v: (lambda v=v: _high_lr(v)) for v in ("diverging", "fixed", "backoff")}),
        Scenario("huge-targets", ("002_cf8ffe79dfe02bfd.txt",), "targets scaled by 1e10 under MSE",
                 {v: (lambda v=v: _huge_targets(v)) for v in ("diverging", "fixed", "clip")}),
        Scenario("dirty-data", ("002_cf8ffe79dfe02bfd.txt", "003_cdfa176bf9e36a9f.txt"), "NaN/Inf in the inputs",
                 {v: (lambda v=v: _dirty_data(v)) for v in ("diverging", "fixed")}),
        Scenario("masked-loss", ("003_cdfa176bf9e36a9f.txt",), "a loss masked with where(is_finite(...))",
                 {v: (lambda v=v: _masked_loss(v)) for v in ("diverging", "fixed", "guarded")}),
        Scenario("numpy-net", ("004_da81e5293ef0dddf.txt",), "a hand-written network: bad init, no scaling, no clipping",
                 {v: (lambda v=v: _numpy_net(v)) for v in ("diverging", "fixed")}),
        Scenario("loss-spike", (), "a burst of mis-scaled targets: a finite loss spike, then divergence",
                 {v: (lambda v=v: _loss_spike(v)) for v in ("diverging", "fixed")}),
    ]
}
