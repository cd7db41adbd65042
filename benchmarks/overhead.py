"""Overhead of the stabilize guards against bare training loops: CPU-time ratios with an A/A control.

This is a benchmark, not a test: it prints ratios measured in one run.

How it measures (wall time on a shared 2-core machine moves by 5-10%, CPU time far less):

* Each contender is timed against its bare twin in **process CPU time**
  (``time.process_time``: every thread of this process, not the time it waited
  for a CPU); ``--clock wall`` measures wall time instead.
* One thread per framework (``--threads`` to change it).
* In every round each pair runs twin and contender back to back, in one
  process, the order flipped on odd rounds; the pair's ratio is the **median
  of the per-round ratios** (at least 15 rounds for a verdict), so a drift of
  the machine between rounds cancels.
* Every section has an **A/A pair**, the bare loop against an identical second
  bare loop: the noise floor. When its median lies outside 1.00 +/- 0.01 the
  section prints no verdict.

Each contender first runs warm-up steps (the TF ones are traced) before any
timing, except the fresh pair, whose point is to include tracing.

Pairs (the bar each must not exceed):

    torch:  TorchGuard in the loop / bare loop;
            StabilityTrainer (torch.optim SGD, numpy data) / the bare loop over the same numpy data;
    tf:     StabilityTrainer (keras SGD, traced, numpy data) / bare tf.function over the same numpy data;
            keras_guard in model.fit / model.fit (a cached tf.data.Dataset, one epoch per round);
            mlp only: a fresh StabilityTrainer on a new model, tracing included, over 60 steps /
            a fresh bare tf.function loop, tracing included.
    bars:   mlp 1.03 (fresh 1.10); conv, lstm 1.05; big (an MLP above 10M parameters) 1.01.

``--references`` adds the reference loops (no bars): TorchGuard(clip_norm=1.0) against the loop with
``clip_grad_norm_``, TorchGuard(verify_updates=True), ``detect_anomaly``, ``model.fit`` and
``enable_check_numerics`` against the bare loop. ``--model sweep`` runs the torch MLP size sweep from
~0.1M to ~50M parameters (``--png`` plots it). Next to each guard: the bytes it holds across steps.

Run:  python benchmarks/overhead.py [--model mlp|conv|lstm|big|sweep|all] [--framework torch|tensorflow|both]
                                    [--repeats N] [--steps N] [--threads N] [--clock cpu|wall]
                                    [--references] [--json out.json] [--png sweep.png] [--tiny]
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

from overhead_contenders import tf_contenders, torch_contenders  # noqa: E402

AA_TOLERANCE = 0.01  # the A/A median must lie within 1 +/- this for a verdict
MIN_ROUNDS = 15  # fewer rounds print ratios, never a verdict

BIG_PARAMS = 1.05e7
SIZES = {"mlp": dict(sizes=(256, 512, 512, 512, 1), batch=256), "conv": dict(batch=64, channels=32),
         "lstm": dict(seq=32, features=32, hidden=128, batch=64), "big": dict(params=BIG_PARAMS, batch=256)}
TINY = {"mlp": dict(sizes=(8, 16, 1), batch=8), "conv": dict(batch=4, channels=4),
        "lstm": dict(seq=4, features=4, hidden=8, batch=4), "big": dict(params=3e3, batch=8)}
# The bars of issue 20: each section's guards (keys as in overhead_contenders' ``bars``).
BARS = {"mlp": dict(guard=1.03, trainer=1.03, fresh=1.10), "conv": dict(guard=1.05, trainer=1.05),
        "lstm": dict(guard=1.05, trainer=1.05), "big": dict(guard=1.01, trainer=1.01)}
STEPS = {"big": 2}  # steps per round where the section's step is long (~0.5 s on one CPU thread)
FRESH_STEPS, TINY_FRESH_STEPS = 60, 3

# The sweep: MLPs 256-w-w-w-1 sized to these parameter counts, batch 512 (the guard's cost is a
# pass over the gradients, O(parameters); the step's is O(batch x parameters)).
# Each size: (target parameters, steps per round, most rounds); larger models run fewer of both.
SWEEP = dict(inputs=256, depth=3, batch=512, sizes=((1e5, 32, None), (1e6, 16, None), (5e6, 8, None),
                                                     (15e6, 4, 7), (5e7, 2, 5)))
TINY_SWEEP = dict(inputs=8, depth=3, batch=8, sizes=((200, 2, None), (1000, 2, None), (4000, 2, None)))
SWEEP_LR = 1e-5  # wide MLPs diverge at 1e-3, and a guard skipping NaN steps would not be timing training


def width_for(params: float, inputs: int, depth: int) -> int:
    """The hidden width w whose MLP inputs-w-...-w-1 (``depth`` hidden layers) has about ``params`` parameters."""
    # params = (depth - 1) w^2 + (inputs + depth + 1) w + 1
    a, b, c = depth - 1, inputs + depth + 1, 1 - params
    return max(1, round((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)))


def mlp_params(sizes) -> int:
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


# -- measurement ------------------------------------------------------------------------------------
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def measure(contenders: dict, pairs: list, steps: int, repeats: int, warmup: int, clock) -> dict:
    """Per pair, per round: (contender seconds per step, twin seconds per step), timed back to back.

    Pairs run in order on even rounds and in reverse on odd ones, and within a pair the twin
    goes first on even rounds, second on odd ones.
    """
    for c in contenders.values():
        if c.steps is None and warmup:
            c.run(warmup)
    times = {p.contender: [] for p in pairs}

    def timed(name):
        c = contenders[name]
        start = clock()
        c.run(steps)
        return (clock() - start) / (c.steps or steps)

    for r in range(repeats):
        for p in (pairs if r % 2 == 0 else pairs[::-1]):
            if r % 2 == 0:
                twin = timed(p.twin)
                mine = timed(p.contender)
            else:
                mine = timed(p.contender)
                twin = timed(p.twin)
            times[p.contender].append((mine, twin))
    return times


def verdict(row: dict, aa_ok: bool | None) -> str:
    """``holds`` / ``misses`` against the row's bar; nothing without a bar, with too few rounds,
    or when the section's A/A pair is off (``aa_ok`` False)."""
    if row["aa"]:
        return "in range" if aa_ok else "OFF"
    if row["bar"] is None:
        return ""
    if row["rounds"] < MIN_ROUNDS:
        return f"no verdict ({row['rounds']} rounds < {MIN_ROUNDS})"
    if not aa_ok:
        return "no verdict (A/A off)"
    return "holds" if row["ratio"] <= row["bar"] else "MISSES"


def summarize(times: dict, pairs: list, contenders: dict, steps: int) -> tuple[list, bool | None]:
    """A row per pair (median ms per step of both, the median of the per-round ratios, the verdict),
    and whether the section's A/A median lies within 1 +/- AA_TOLERANCE."""
    rows = []
    for p in pairs:
        t = times[p.contender]
        ratios = [mine / twin for mine, twin in t]
        rows.append({"contender": p.contender, "twin": p.twin, "bar": p.bar, "aa": p.aa, "rounds": len(t),
                     "steps": contenders[p.contender].steps or steps,
                     "ms": statistics.median(m for m, _ in t) * 1e3, "twin_ms": statistics.median(w for _, w in t) * 1e3,
                     "ratio": statistics.median(ratios), "min_ratio": min(ratios), "max_ratio": max(ratios)})
    aa = [r for r in rows if r["aa"]]
    aa_ok = all(abs(r["ratio"] - 1.0) <= AA_TOLERANCE for r in aa) if aa else None
    for r in rows:
        r["verdict"] = verdict(r, aa_ok)
    return rows, aa_ok


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


def print_section(title: str, section: dict) -> None:
    rows = section["rows"]
    label = {r["contender"]: ("A/A: " if r["aa"] else "") + f"{r['contender']} / {r['twin']}"
             + (f" [{r['steps']} steps]" if r["steps"] != section["steps"] else "") for r in rows}
    w = max(len(s) for s in [*label.values(), "pair"])
    print(f"\n{title}  (batch {section['batch']}, {section['repeats']} rounds x {section['steps']} steps, "
          f"{section['clock']} time, twin and contender back to back; {section['seconds']:.1f} s)")
    print(f"  {'pair':{w}s} {'ms/step':>9s} {'twin ms':>9s} {'ratio':>7s} {'min':>7s} {'max':>7s} {'bar':>11s}  verdict")
    for r in rows:
        bar = f"1+/-{AA_TOLERANCE:.2f}" if r["aa"] else (f"<= {r['bar']:.2f}" if r["bar"] else "")
        print(f"  {label[r['contender']]:{w}s} {r['ms']:9.3f} {r['twin_ms']:9.3f} {r['ratio']:7.3f} "
              f"{r['min_ratio']:7.3f} {r['max_ratio']:7.3f} {bar:>11s}  {r['verdict']}")
    if section["aa_ok"] is False:
        print(f"  the A/A median is outside 1.00 +/- {AA_TOLERANCE:.2f}: this run gives no verdict for this section")
    if section["memory"]:
        w = max(len(n) for n in section["memory"]) + 2
        print(f"  {'memory held across steps':{w}s} {'held':>12s} {'params':>12s} {'opt state':>12s} {'held/model':>10s}")
        for name, m in section["memory"].items():
            frac = "n/a" if m["held_fraction"] is None else f"{m['held_fraction']:.2f}"
            print(f"    {name:{w - 2}s} {_mb(m['held_bytes']):>12s} {_mb(m['param_bytes']):>12s} "
                  f"{_mb(m['optimizer_state_bytes']):>12s} {frac:>10s}")


# -- sections -----------------------------------------------------------------------------------------
def section_config(kind: str, cfg: dict) -> dict:
    """``big`` is an MLP 256-w-w-w-1 of about ``params`` parameters (tiny: 8 inputs)."""
    if kind != "big":
        return dict(cfg)
    inputs = 8 if cfg["params"] < 1e5 else 256
    w = width_for(cfg["params"], inputs, 3)
    return dict(sizes=(inputs, w, w, w, 1), batch=cfg["batch"])


def run_section(fw: str, kind: str, cfg: dict, steps: int, repeats: int, warmup: int, fresh_steps: int,
                references: bool, clock: str) -> dict:
    start = time.perf_counter()
    model_kind = "mlp" if kind == "big" else kind
    bars = BARS[kind]
    if fw == "torch":
        contenders, pairs = torch_contenders(model_kind, cfg, steps, bars, references)
    else:
        contenders, pairs = tf_contenders(model_kind, cfg, steps, bars, references,
                                          fresh_steps=fresh_steps if kind == "mlp" else 0)
    rows, aa_ok = summarize(measure(contenders, pairs, steps, repeats, min(warmup, steps), CLOCKS[clock]),
                            pairs, contenders, steps)
    section = {"rows": rows, "aa_ok": aa_ok, "memory": memory(contenders), "steps": steps, "repeats": repeats,
               "warmup": warmup, "clock": clock, "batch": cfg["batch"],
               "model": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
               "seconds": time.perf_counter() - start}
    if "sizes" in cfg:
        section["params"] = mlp_params(cfg["sizes"])
    title = f"{fw} / {kind}" + (f" ({section['params']:,d} parameters)" if kind == "big" else "")
    print_section(title, section)
    return section


def run_sweep(plan: dict, repeats: int, warmup: int, clock: str) -> dict:
    """The torch MLP size sweep: TorchGuard and the trainer against their twins, per size."""
    start = time.perf_counter()
    rows = []
    for target, steps, most_rounds in plan["sizes"]:
        w = width_for(target, plan["inputs"], plan["depth"])
        cfg = dict(sizes=(plan["inputs"],) + (w,) * plan["depth"] + (1,), batch=plan["batch"])
        rounds = min(repeats, most_rounds) if most_rounds else repeats
        contenders, pairs = torch_contenders("mlp", cfg, steps, {}, lr=SWEEP_LR)
        pairs = [p for p in pairs if not p.aa]
        table, _ = summarize(measure(contenders, pairs, steps, rounds, min(warmup, steps), CLOCKS[clock]),
                             pairs, contenders, steps)
        rows.append({"params": mlp_params(cfg["sizes"]), "width": w, "steps": steps, "rounds": rounds,
                     "pairs": table, "memory": memory(contenders)})
        del contenders  # the largest sizes hold a few hundred MB each
    sweep = {"inputs": plan["inputs"], "depth": plan["depth"], "batch": plan["batch"], "rows": rows,
             "clock": clock, "seconds": time.perf_counter() - start}
    print(f"\ntorch / MLP size sweep  ({sweep['inputs']}-w-w-w-1, batch {sweep['batch']}, {clock} time; "
          f"{sweep['seconds']:.1f} s)")
    names = [r["contender"] for r in rows[0]["pairs"]] if rows else []
    print(f"  {'params':>11s} {'width':>6s} {'rounds x steps':>14s}" + "".join(f"{n:>34s}" for n in names))
    for row in rows:
        ratios = "".join(f"{r['ratio']:34.3f}" for r in row["pairs"])
        print(f"  {row['params']:11,d} {row['width']:6d} {row['rounds']:>6d} x {row['steps']:<6d}{ratios}")
    return sweep


def plot_sweep(sweep: dict, path: str) -> None:
    """Overhead ratio against parameter count (log x), one line per guarded contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = sweep["rows"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, pair in enumerate(rows[0]["pairs"]):
        ax.plot([r["params"] for r in rows], [r["pairs"][i]["ratio"] for r in rows], marker="o",
                label=f"{pair['contender']} / {pair['twin']}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled decades only
    ax.set_xlabel("parameters")
    ax.set_ylabel(f"{sweep['clock']} time / twin (median of the rounds)")
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
    parser.add_argument("--model", default="all", choices=["mlp", "conv", "lstm", "big", "sweep", "all"],
                        help="all: mlp, conv, lstm and big (the sweep runs only when asked for)")
    parser.add_argument("--framework", default="both", choices=["torch", "tensorflow", "both"])
    parser.add_argument("--steps", type=int, default=16, help="steps per contender per round")
    parser.add_argument("--repeats", type=int, default=15, help=f"rounds (a verdict needs at least {MIN_ROUNDS})")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per framework")
    parser.add_argument("--clock", default="cpu", choices=sorted(CLOCKS),
                        help="cpu: process CPU time (default); wall: wall-clock time")
    parser.add_argument("--references", action="store_true",
                        help="also time clip_grad_norm_, detect_anomaly, model.fit and enable_check_numerics")
    parser.add_argument("--json", default=None, help="also write every result here")
    parser.add_argument("--png", default=None, help="plot the sweep's overhead ratios here (needs matplotlib)")
    parser.add_argument("--tiny", action="store_true", help="tiny models and 3 rounds (for the test suite)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--steps, --repeats and --threads must be at least 1")
    if args.tiny:
        sizes, plan, fresh, repeats, warmup = TINY, TINY_SWEEP, TINY_FRESH_STEPS, 3, 1
        steps = {k: 2 for k in sizes}
    else:
        sizes, plan, fresh, repeats, warmup = SIZES, SWEEP, FRESH_STEPS, args.repeats, 4
        steps = {k: STEPS.get(k, args.steps) for k in sizes}
    frameworks = ["torch", "tensorflow"] if args.framework == "both" else [args.framework]
    kinds = ["mlp", "conv", "lstm", "big"] if args.model == "all" else [args.model]
    set_threads(args.threads, frameworks)
    start = time.perf_counter()
    results = {"settings": {"steps": steps, "repeats": repeats, "warmup": warmup, "tiny": args.tiny, "clock": args.clock,
                            "fresh_steps": fresh, "frameworks": frameworks, "models": kinds, "threads": args.threads,
                            "aa_tolerance": AA_TOLERANCE, "min_rounds": MIN_ROUNDS},
               "sections": {}, "sweep": None}
    for kind in kinds:
        if kind == "sweep":
            if "torch" in frameworks:
                results["sweep"] = run_sweep(plan, repeats, warmup, args.clock)
            else:
                print("\nthe size sweep runs on torch only: skipped (--framework tensorflow)")
            continue
        cfg = section_config(kind, sizes[kind])
        for fw in frameworks:
            results["sections"][f"{fw}/{kind}"] = run_section(fw, kind, cfg, steps[kind], repeats, warmup, fresh,
                                                              args.references, args.clock)
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
