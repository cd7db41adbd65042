"""Overhead of the stabilize guard against bare training loops, measured side by side.

This is a benchmark, not a test: it prints ratios measured in one run, with
the contenders alternated round by round so that machine noise hits them all.

Contenders
    torch: bare loop; + clip_grad_norm_; StabilityTrainer (torch.optim, default
           guard: clip + non-finite check + skip); StabilityTrainer (neutral SGD);
           TorchGuard in the bare loop; the bare loop under detect_anomaly.
    tf:    bare tf.function loop; model.fit; StabilityTrainer (neutral SGD);
           keras_guard in model.fit; the bare loop under enable_check_numerics.

Run:  python benchmarks/overhead.py [--model mlp|conv|both] [--json out.json] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

SIZES = {"mlp": dict(sizes=(256, 512, 512, 512, 1), batch=256), "conv": dict(batch=64)}
TINY = {"mlp": dict(sizes=(8, 16, 1), batch=8), "conv": dict(batch=4)}


def _batches(model_kind, cfg, n, seed=0):
    rng = np.random.default_rng(seed)
    if model_kind == "mlp":
        shape = (cfg["batch"], cfg["sizes"][0])
    else:
        shape = (cfg["batch"], 16, 16, 3)
    return [(rng.normal(size=shape).astype(np.float32), rng.normal(size=(cfg["batch"], 1)).astype(np.float32))
            for _ in range(n)]


# -- torch -------------------------------------------------------------------------------
def torch_contenders(model_kind, cfg, batches, lr=1e-3):
    import torch

    import stabilize
    from stabilize import StabilityTrainer, TorchGuard
    from stabilize.models import MLP
    from stabilize.optim import SGD

    torch.manual_seed(0)
    B = stabilize.get_backend("torch")
    dev = B.device()
    tb = [(torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)) for x, y in batches]
    if model_kind == "conv":
        tb = [(x.permute(0, 3, 1, 2).contiguous(), y) for x, y in tb]
    mse = torch.nn.functional.mse_loss

    def make():
        if model_kind == "mlp":
            return B.build_mlp(MLP(cfg["sizes"], seed=0), "float32", str(dev))
        return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1),
                                   torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(512, 1)).to(dev)

    def loop(extra=None, anomaly=False):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=lr)

        def run(k):
            ctx = torch.autograd.detect_anomaly(check_nan=True) if anomaly else _null()
            with ctx:
                for i in range(k):
                    x, y = tb[i % len(tb)]
                    opt.zero_grad(set_to_none=True)
                    loss = mse(model(x), y)
                    loss.backward()
                    if extra:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                    opt.step()
            _sync(dev)
        return run

    def trainer(native):
        model = make()
        if native:
            t = StabilityTrainer(model, mse, torch.optim.SGD(model.parameters(), lr=lr), clip_norm=1.0, progress=False,
                                 diagnose=True)
        else:
            if model_kind != "mlp":
                return None
            t = StabilityTrainer(MLP(cfg["sizes"], seed=0), mse, SGD(lr=lr), backend="torch", clip_norm=1.0,
                                 progress=False)

        def run(k):
            t.fit([tb[i % len(tb)] for i in range(k)])
            _sync(dev)
        return run, t

    def guard_loop(**options):
        model = make()
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        guard = TorchGuard(model, opt, clip_norm=1.0, **options)

        def run(k):
            for i in range(k):
                x, y = tb[i % len(tb)]
                guard.step(mse(model(x), y))
            _sync(dev)
        return run

    out = {"torch bare loop": loop(), "torch + clip_grad_norm_": loop(extra=True)}
    native_run, native_trainer = trainer(True)
    out["torch StabilityTrainer (torch.optim)"] = native_run
    neutral = trainer(False)
    if neutral is not None:
        out["torch StabilityTrainer (neutral SGD)"] = neutral[0]
    out["torch TorchGuard in the loop"] = guard_loop()
    # The price of an exact undo of a native update: a copy of the parameters and optimizer state per step.
    out["torch TorchGuard(verify_updates=True)"] = guard_loop(verify_updates=True)
    out["torch bare under detect_anomaly"] = loop(anomaly=True)
    baselines = {"torch + clip_grad_norm_": "torch bare loop"}
    return out, {"bare": "torch bare loop", "memory": _torch_memory(native_trainer, neutral), "baselines": baselines}


def _torch_memory(native_trainer, neutral):
    """Bytes the guard holds, as a fraction of parameters + optimizer state."""
    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    out = {}
    if neutral is not None:
        t = neutral[1]
        base = nbytes(t.params) + nbytes(t.state_vars)
        # The step builds one candidate per parameter and state tensor before committing it.
        out["neutral step, transient candidates"] = (base, base)
        out["rollback snapshot (neutral)"] = (base, base)
    return {k: round(v / b, 3) for k, (v, b) in out.items()}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


# -- tensorflow -----------------------------------------------------------------------------
def tf_contenders(model_kind, cfg, batches, lr=1e-3):
    import keras
    import tensorflow as tf

    import stabilize
    from stabilize import StabilityTrainer, keras_guard
    from stabilize.models import MLP
    from stabilize.optim import SGD

    B = stabilize.get_backend("tensorflow")
    tb = [(tf.constant(x), tf.constant(y)) for x, y in batches]
    mse = lambda p, t: tf.reduce_mean(tf.square(p - t))

    def make():
        if model_kind == "mlp":
            return B.build_mlp(MLP(cfg["sizes"], seed=0), "float32")
        return keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
                                 keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
                                 keras.layers.AveragePooling2D(4), keras.layers.Flatten(), keras.layers.Dense(1)])

    def bare(check_numerics=False):
        model = make()
        opt = keras.optimizers.SGD(lr)
        opt.build(model.trainable_variables)

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                loss = mse(model(x), y)
            opt.apply(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
            return loss

        if check_numerics:  # the instrumentation is baked into the graph when it is traced
            tf.debugging.enable_check_numerics()
            step(*tb[0])
            tf.debugging.disable_check_numerics()
        else:
            step(*tb[0])

        def run(k):
            for i in range(k):
                loss = step(*tb[i % len(tb)])
            float(loss)
        return run

    def fit(guarded=False):
        model = make()
        opt = keras.optimizers.SGD(lr)
        callbacks = []
        if guarded:
            opt, cb = keras_guard(opt, clip_norm=1.0)
            callbacks = [cb]
        model.compile(optimizer=opt, loss="mse")
        xs = np.concatenate([b[0] for b in batches])
        ys = np.concatenate([b[1] for b in batches])
        model.fit(xs, ys, batch_size=cfg["batch"], epochs=1, verbose=0, shuffle=False, callbacks=callbacks)

        def run(k):
            reps = max(1, k // len(batches))
            model.fit(xs, ys, batch_size=cfg["batch"], epochs=reps, verbose=0, shuffle=False, callbacks=callbacks)
        return run, len(batches)

    def trainer():
        model = make()
        t = StabilityTrainer(model, mse, SGD(lr=lr), clip_norm=1.0, progress=False)
        t.fit(tb[:1])

        def run(k):
            t.fit([tb[i % len(tb)] for i in range(k)])
        return run

    out = {"tf bare tf.function loop": bare()}
    fit_run, per = fit()
    out["tf model.fit"] = fit_run
    out["tf StabilityTrainer (neutral SGD)"] = trainer()
    guarded_run, _ = fit(guarded=True)
    out["tf keras_guard in model.fit"] = guarded_run
    out["tf bare under enable_check_numerics"] = bare(check_numerics=True)
    return out, {"bare": "tf bare tf.function loop", "baselines": {"tf keras_guard in model.fit": "tf model.fit"}}


# -- measurement ----------------------------------------------------------------------------
def measure(contenders: dict, steps: int, repeats: int, warmup: int) -> dict:
    """Per-step seconds for each contender: ``repeats`` rounds, contenders alternated in each."""
    for run in contenders.values():
        run(warmup)
    times = {name: [] for name in contenders}
    for r in range(repeats):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for name in order:
            start = time.perf_counter()
            contenders[name](steps)
            times[name].append((time.perf_counter() - start) / steps)
    return times


def summarize(times: dict, bare: str, baselines: dict) -> dict:
    """Median/min/max per step, the ratio to the framework's bare loop, and to a closer
    baseline where one exists (keras_guard against model.fit itself)."""
    med = {name: statistics.median(t) for name, t in times.items()}
    return {name: {"median_ms": med[name] * 1e3, "min_ms": min(t) * 1e3, "max_ms": max(t) * 1e3,
                   "ratio": med[name] / med[bare],
                   "vs": baselines.get(name, bare), "ratio_vs": med[name] / med[baselines.get(name, bare)]}
            for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="both", choices=["mlp", "conv", "both"])
    parser.add_argument("--framework", default="both", choices=["torch", "tensorflow", "both"])
    parser.add_argument("--steps", type=int, default=16, help="steps per contender per round (a multiple of 8)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few rounds (for the test suite)")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else SIZES
    steps, repeats, warmup = (8, 2, 2) if args.tiny else (args.steps, args.repeats, 8)
    results = {}
    kinds = ["mlp", "conv"] if args.model == "both" else [args.model]
    for kind in kinds:
        cfg = sizes[kind]
        batches = _batches(kind, cfg, 8)
        for fw in (["torch", "tensorflow"] if args.framework == "both" else [args.framework]):
            contenders, meta = (torch_contenders if fw == "torch" else tf_contenders)(kind, cfg, batches)
            table = summarize(measure(contenders, steps, repeats, warmup), meta["bare"], meta.get("baselines", {}))
            results[f"{fw}/{kind}"] = {"contenders": table, "memory": meta.get("memory", {}),
                                       "steps": steps, "repeats": repeats, "batch": cfg["batch"]}
            print(f"\n{fw} / {kind} (batch {cfg['batch']}, {repeats} rounds x {steps} steps, alternated)")
            print(f"  {'contender':42s} {'median ms':>10s} {'ratio':>7s} {'min':>8s} {'max':>8s}  ratio to its own baseline")
            for name, row in table.items():
                own = f"  {row['ratio_vs']:.3f} vs {row['vs']}" if row["vs"] != meta["bare"] else ""
                print(f"  {name:42s} {row['median_ms']:10.3f} {row['ratio']:7.3f} {row['min_ms']:8.3f} {row['max_ms']:8.3f}{own}")
            for name, frac in meta.get("memory", {}).items():
                print(f"  memory: {name}: {frac:.2f} x (parameters + optimizer state)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
