"""Overhead of the stabilize guard against bare training loops, measured side by side.

This is a benchmark, not a test: it prints ratios measured in one run. In each
round every contender trains the same number of steps, in turn; odd rounds run
the contenders in reverse order, so that machine noise and drift hit them all
alike. Each contender first runs warm-up steps (and the TF ones are traced)
before any timing. A row gives the per-step median, min and max over the
rounds, the ratio to the framework's bare loop, and the ratio to the
contender's own baseline where it has one (keras_guard against model.fit). A
ratio is the median over the rounds of the two contenders' times in the same
round, so that the machine's drift between rounds cancels.
Each guard is also compared with every reference loop of its framework:

    torch: bare loop; + clip_grad_norm_; bare under torch.autograd.detect_anomaly.
    tf:    bare tf.function loop; model.fit; bare under tf.debugging.enable_check_numerics.

Guarded contenders
    torch: StabilityTrainer (torch.optim SGD, default settings: check + skip);
           TorchGuard in the hand-written loop (default settings); TorchGuard(clip_norm=1.0)
           against the loop with clip_grad_norm_; TorchGuard(verify_updates=True).
    tf:    StabilityTrainer with keras.optimizers.SGD, traced before timing;
           StabilityTrainer with stabilize's neutral SGD; keras_guard in model.fit;
           and a fresh pair: a new StabilityTrainer on a new model, tracing
           included, over 60 steps, against a new bare tf.function loop over the
           same 60 steps, tracing included (each round builds both anew).
           The neutral SGD refuses Keras' LSTM (its seed-generator variable counts
           as state it cannot protect): that row is listed as not run, with why.
    model.fit reads a cached tf.data.Dataset built once, one epoch per round, so
    that its per-call input pipeline is not part of the per-step time.

Models: an MLP 256-512-512-512-1 (batch 256), a conv net (16x16x3 input, two
3x3 convolutions of 32 channels, batch 64), an LSTM regressor (32 steps of 32
features, 128 units, batch 64), the same architectures in torch and Keras; and
a torch-only sweep of MLPs 256-w-w-w-1 from ~0.1M to ~50M parameters (batch
512; bare loop, TorchGuard, trainer), where the overhead falls as compute grows.
The largest sizes run fewer rounds of fewer steps (never under 5 rounds
unless --repeats asks for fewer).

Memory: next to each guard, the bytes it holds across steps (its
``held_bytes()``, "n/a" where the installed stabilize has none) and the
model's parameters + optimizer state.

Keras ``fit`` compiles with XLA on a GPU (``jit_compile="auto"``) and not on a
CPU, so its ratios differ between the two. CUDA work is waited for at the end
of every timed run. The full run takes about 10-20 minutes on 2 CPU cores,
depending on what else runs there; each section prints its own time. On a
machine shared with other jobs, ``--threads 1`` keeps the frameworks' thread
pools from waiting on each other (which can slow a small step a hundredfold).

Run:  python benchmarks/overhead.py [--model mlp|conv|lstm|sweep|all] [--framework torch|tensorflow|both]
                                    [--repeats N] [--steps N] [--threads N] [--json out.json] [--png sweep.png]
                                    [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# This file runs as a script: its helpers sit next to it.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from overhead_contenders import batches, tf_contenders, torch_contenders  # noqa: E402

SIZES = {"mlp": dict(sizes=(256, 512, 512, 512, 1), batch=256), "conv": dict(batch=64, channels=32),
         "lstm": dict(seq=32, features=32, hidden=128, batch=64)}
TINY = {"mlp": dict(sizes=(8, 16, 1), batch=8), "conv": dict(batch=4, channels=4),
        "lstm": dict(seq=4, features=4, hidden=8, batch=4)}

# The sweep: MLPs of `depth` hidden layers of one width, sized to these parameter counts. Batch 512:
# the guard's cost is a pass over the gradients (O(parameters)), the step's is O(batch x parameters);
# at a batch of 64 a CPU step of a large MLP is itself little more than a few passes over memory.
# Each size: (target parameters, steps per round, most rounds); larger models run fewer of both.
SWEEP = dict(inputs=256, depth=3, batch=512, sizes=((1e5, 32, None), (1e6, 16, None), (5e6, 8, None),
                                                     (15e6, 4, 5), (5e7, 2, 5)))
TINY_SWEEP = dict(inputs=8, depth=3, batch=8, sizes=((200, 2, None), (1000, 2, None), (4000, 2, None)))
FRESH_STEPS, TINY_FRESH_STEPS = 60, 4
SWEEP_LR = 1e-5


# -- measurement ------------------------------------------------------------------------------------
def measure(contenders: dict, steps: int, repeats: int, warmup: int) -> dict:
    """Per-step seconds for each contender: ``repeats`` rounds, alternated (reversed on odd rounds).

    Each contender first trains ``warmup`` steps; one with its own step count (the
    fresh pair, whose point is to include its one-time costs) is not warmed up.
    """
    for c in contenders.values():
        if c.steps is None and warmup:
            c.run(warmup)
    times = {name: [] for name in contenders}
    for r in range(repeats):
        for name in (list(contenders) if r % 2 == 0 else list(reversed(contenders))):
            c = contenders[name]
            start = time.perf_counter()
            c.run(steps)
            times[name].append((time.perf_counter() - start) / (c.steps or steps))
    return times


def summarize(times: dict, contenders: dict, meta: dict, steps: int) -> dict:
    """Median/min/max ms per step; the ratio to the bare loop, to its own baseline, and (a guard) to each reference."""
    med = {name: statistics.median(t) for name, t in times.items()}

    def ratio(name, ref):
        # The median of the rounds' own ratios: both were timed in the same round, so a drift of
        # the machine's speed between rounds (frequent on a shared VM) cancels out.
        return statistics.median(a / b for a, b in zip(times[name], times[ref]))

    out = {}
    for name, t in times.items():
        c = contenders[name]
        row = {"median_ms": med[name] * 1e3, "min_ms": min(t) * 1e3, "max_ms": max(t) * 1e3,
               "rounds": len(t), "steps": c.steps or steps, "ratio": ratio(name, meta["bare"]),
               "baseline": c.baseline, "ratio_to_baseline": ratio(name, c.baseline) if c.baseline else None}
        if c.guarded:
            row["vs"] = {ref: ratio(name, ref) for ref in meta["references"] if ref in med}
        out[name] = row
    return out


def memory(contenders: dict) -> dict:
    """For each guard: the bytes it holds across steps (None without ``held_bytes``) and the model's size."""
    out = {}
    for name, c in contenders.items():
        if not c.guarded or c.footprint is None:
            continue
        held = None
        for holder in c.holders:
            method = getattr(holder, "held_bytes", None)
            if method is not None:
                held = int(method() if callable(method) else method)
                break
        params, state = c.footprint()
        out[name] = {"held_bytes": held, "param_bytes": params, "optimizer_state_bytes": state,
                     "held_fraction": held / (params + state) if held is not None and params + state else None}
    return out


# -- printing ----------------------------------------------------------------------------------------
def _mb(n) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _short(name: str) -> str:
    return name.replace("torch ", "").replace("tf ", "").replace("bare under ", "")


def print_section(title: str, section: dict, meta: dict) -> None:
    table, refs = section["contenders"], meta["references"]
    label = {name: name + (f" [{row['steps']} steps/round]" if row["steps"] != section["steps"] else "")
             for name, row in table.items()}
    w = max(len(s) for s in [*label.values(), *section["skipped"], "contender"])
    print(f"\n{title}  (batch {section['batch']}, {section['repeats']} rounds x {section['steps']} steps, "
          f"alternated; {section['seconds']:.1f} s)")
    print(f"  {'contender':{w}s} {'median ms':>10s} {'min':>9s} {'max':>9s} {'x bare':>7s}  own baseline")
    for name, row in table.items():
        own = f"  {row['ratio_to_baseline']:.3f} x {row['baseline']}" if row["baseline"] else ""
        print(f"  {label[name]:{w}s} {row['median_ms']:10.3f} {row['min_ms']:9.3f} {row['max_ms']:9.3f} "
              f"{row['ratio']:7.3f}{own}")
    for name, why in section["skipped"].items():
        print(f"  {name:{w}s} {'n/a':>10s}  not run: {why}")
    guards = [n for n, r in table.items() if "vs" in r]
    if guards:
        w = max(len(n) for n in guards) + 2
        print(f"  {'guard / reference (median ratios)':{w}s} {''.join(f'{_short(r):>24s}' for r in refs)}")
        for name in guards:
            ratios = "".join(f"{table[name]['vs'][r]:24.3f}" for r in refs)
            print(f"    {name:{w - 2}s} {ratios}")
    if section["memory"]:
        w = max(len(n) for n in section["memory"]) + 2
        print(f"  {'memory held across steps':{w}s} {'held':>12s} {'params':>12s} {'opt state':>12s} "
              f"{'held/model':>10s}")
        for name, m in section["memory"].items():
            frac = "n/a" if m["held_fraction"] is None else f"{m['held_fraction']:.2f}"
            print(f"    {name:{w - 2}s} {_mb(m['held_bytes']):>12s} {_mb(m['param_bytes']):>12s} "
                  f"{_mb(m['optimizer_state_bytes']):>12s} {frac:>10s}")


def print_sweep(sweep: dict) -> None:
    rows = sweep["rows"]
    guards = [n for n in rows[0]["contenders"] if "vs" in rows[0]["contenders"][n]] if rows else []
    print(f"\ntorch / MLP size sweep  ({sweep['inputs']}-w-w-w-1, batch {sweep['batch']}, alternated; "
          f"{sweep['seconds']:.1f} s)")
    print(f"  {'params':>11s} {'width':>6s} {'rounds x steps':>14s} {'bare ms':>9s}"
          f"{''.join(f'{_short(g):>32s}' for g in guards)}   held (per guard)")
    for row in rows:
        c = row["contenders"]
        bare = c["torch bare loop"]
        held = ", ".join(_mb(row["memory"][g]["held_bytes"]) for g in guards if g in row["memory"])
        ratios = "".join(f"{c[g]['ratio']:32.3f}" for g in guards)
        print(f"  {row['params']:11,d} {row['width']:6d} {row['rounds']:>6d} x {row['steps']:<6d}"
              f"{bare['median_ms']:9.2f}{ratios}   {held} (model {_mb(row['model_bytes'])})")


# -- sections -----------------------------------------------------------------------------------------
def run_section(fw: str, kind: str, cfg: dict, steps: int, repeats: int, warmup: int, fresh_steps: int):
    start = time.perf_counter()
    data = batches(kind, cfg, 8)
    if fw == "torch":
        contenders, meta = torch_contenders(kind, cfg, data)
    else:
        contenders, meta = tf_contenders(kind, cfg, data, fresh_steps=fresh_steps)
    table = summarize(measure(contenders, steps, repeats, warmup), contenders, meta, steps)
    section = {"contenders": table, "memory": memory(contenders), "bare": meta["bare"],
               "references": meta["references"], "skipped": meta.get("skipped", {}),
               "steps": steps, "repeats": repeats, "warmup": warmup,
               "batch": cfg["batch"], "model": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
               "seconds": time.perf_counter() - start}
    print_section(f"{fw} / {kind}", section, meta)
    return section


def width_for(params: float, inputs: int, depth: int) -> int:
    """The hidden width w whose MLP inputs-w-...-w-1 (``depth`` hidden layers) has about ``params`` parameters."""
    # params = (depth - 1) w^2 + (inputs + depth + 1) w + 1
    a, b, c = depth - 1, inputs + depth + 1, 1 - params
    return max(1, round((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)))


def run_sweep(plan: dict, repeats: int, warmup: int) -> dict:
    start = time.perf_counter()
    rows = []
    for target, steps, most_rounds in plan["sizes"]:
        w = width_for(target, plan["inputs"], plan["depth"])
        cfg = dict(sizes=(plan["inputs"],) + (w,) * plan["depth"] + (1,), batch=plan["batch"])
        rounds = min(repeats, most_rounds) if most_rounds else repeats
        t0 = time.perf_counter()
        # A small rate: wide MLPs diverge at 1e-3, and a guard skipping NaN steps would not be timing training.
        contenders, meta = torch_contenders("mlp", cfg, batches("mlp", cfg, 4), full=False, lr=SWEEP_LR)
        table = summarize(measure(contenders, steps, rounds, min(warmup, steps)), contenders, meta, steps)
        mem = memory(contenders)
        params, state = contenders[meta["bare"]].footprint()
        n = sum(a * b + b for a, b in zip(cfg["sizes"][:-1], cfg["sizes"][1:]))
        rows.append({"params": n, "width": w, "steps": steps, "rounds": rounds, "contenders": table, "memory": mem,
                     "model_bytes": params + state, "seconds": time.perf_counter() - t0})
        del contenders  # the largest sizes hold a few hundred MB each
    sweep = {"inputs": plan["inputs"], "depth": plan["depth"], "batch": plan["batch"], "rows": rows,
             "seconds": time.perf_counter() - start}
    print_sweep(sweep)
    return sweep


def plot_sweep(sweep: dict, path: str) -> None:
    """Overhead ratio against parameter count (log x), one line per guarded contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = sweep["rows"]
    guards = [n for n in rows[0]["contenders"] if "vs" in rows[0]["contenders"][n]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for g in guards:
        ax.plot([r["params"] for r in rows], [r["contenders"][g]["ratio"] for r in rows], marker="o", label=_short(g))
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled decades only
    ax.set_xlabel("parameters")
    ax.set_ylabel("step time / bare loop (median of the rounds)")
    ax.set_title(f"stabilize overhead, torch MLP {sweep['inputs']}-w-w-w-1, batch {sweep['batch']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def set_threads(n: int, frameworks: list) -> None:
    """Pin each framework's CPU thread pools to ``n``, before TF runs its first op.

    On an oversubscribed machine, torch's OpenMP threads wait on each other: a
    tiny LSTM step took 200 ms with 2 threads and 1 ms with 1.
    """
    if "torch" in frameworks:
        import torch

        torch.set_num_threads(n)
    if "tensorflow" in frameworks:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(n)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all", choices=["mlp", "conv", "lstm", "sweep", "all"])
    parser.add_argument("--framework", default="both", choices=["torch", "tensorflow", "both"])
    parser.add_argument("--steps", type=int, default=16, help="steps per contender per round")
    parser.add_argument("--repeats", type=int, default=7, help="rounds (at least 5 for meaningful medians)")
    parser.add_argument("--json", default=None, help="also write every result here")
    parser.add_argument("--png", default=None, help="plot the sweep's overhead ratios here (needs matplotlib)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per framework (default: theirs); 1 on a machine shared with other jobs")
    parser.add_argument("--tiny", action="store_true", help="tiny models and 2 rounds (for the test suite)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--steps, --repeats and --threads must be at least 1")
    if args.tiny:
        sizes, plan, fresh = TINY, TINY_SWEEP, TINY_FRESH_STEPS
        steps, repeats, warmup = 2, 2, 1
    else:
        sizes, plan, fresh = SIZES, SWEEP, FRESH_STEPS
        steps, repeats, warmup = args.steps, args.repeats, 4
    frameworks = ["torch", "tensorflow"] if args.framework == "both" else [args.framework]
    kinds = ["mlp", "conv", "lstm", "sweep"] if args.model == "all" else [args.model]
    if args.threads:
        set_threads(args.threads, frameworks)
    start = time.perf_counter()
    results = {"settings": {"steps": steps, "repeats": repeats, "warmup": warmup, "tiny": args.tiny,
                            "fresh_steps": fresh, "frameworks": frameworks, "models": kinds, "threads": args.threads},
               "sections": {}, "sweep": None}
    for kind in kinds:
        if kind == "sweep":
            if "torch" in frameworks:
                results["sweep"] = run_sweep(plan, repeats, warmup)
            else:
                print("\nthe size sweep runs on torch only: skipped (--framework tensorflow)")
            continue
        for fw in frameworks:
            results["sections"][f"{fw}/{kind}"] = run_section(fw, kind, sizes[kind], steps, repeats, warmup, fresh)
    results["seconds"] = time.perf_counter() - start
    print(f"\ntotal {results['seconds']:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print(f"wrote {args.json}")
    if args.png:
        if results["sweep"] is None:
            print("--png plots the size sweep, which did not run: no plot written")
        else:
            plot_sweep(results["sweep"], args.png)
            print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
