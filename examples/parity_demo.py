"""Every scenario of the catalogue on PyTorch and TensorFlow, side by side.

Prints, for each scenario and variant: the first non-finite step on each
backend and the largest relative difference of their losses up to it; then
writes one PNG per scenario with the diverging and fixed curves of both
backends overlaid.

Run: python examples/parity_demo.py [--dtype float64|float32|both] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from stabilize import parity, scenarios
from stabilize.logs import held_lines, print_held, quiet_framework_import


def plot(name: str, reports: list, out_dir: str) -> str:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    finite = [np.abs(t.losses[np.isfinite(t.losses)]) for r in reports for t in r.trajectories.values()]
    top = max([float(np.max(np.minimum(f, 1e200))) for f in finite if f.size] or [1.0])
    cross = max(top, 1.0) * 10  # where non-finite losses are drawn: just above the largest finite one
    styles = {"torch": dict(lw=2.5, alpha=0.6), "tensorflow": dict(lw=1.0, ls="--")}
    for report in reports:
        for backend, traj in report.trajectories.items():
            # Clipped for display only: matplotlib's log transform overflows near 1e308.
            losses = np.where(np.isfinite(traj.losses), np.minimum(traj.losses, 1e200), np.nan)
            label = f"{report.variant} / {backend}"
            steps = np.arange(len(losses))
            line, = ax.plot(steps, losses, label=label, **styles.get(backend, {}))
            bad = ~np.isfinite(traj.losses)
            if bad.any():  # non-finite losses are drawn as crosses on the top edge, so a run NaN from step 0 shows
                ax.plot(steps[bad], np.full(bad.sum(), cross), "x", color=line.get_color(), ms=6)
            if traj.first_nonfinite_step is not None:
                ax.axvline(traj.first_nonfinite_step, color=line.get_color(), ls=":", lw=1)
    # symlog: huge diverging losses and a masked loss sitting at exactly 0 both show.
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_ylim(0, cross * 10)  # losses are >= 0: no negative half, and room for the crosses
    span = max(np.log10(cross * 10) + 2, 1)  # decades shown, from 1e-2
    step = max(int(np.ceil(span / 8)), 1)  # at most ~8 labelled decades, so labels never overlap
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator(
        [0.0] + [10.0**k for k in range(-2 + step, int(np.log10(cross * 10)) + 1, step)]))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (symlog); x: non-finite")
    ax.xaxis.get_major_locator().set_params(integer=True, nbins=10)
    left, right = ax.get_xlim()
    ax.set_xlim(min(left, -0.5), max(right, 1.5))
    ax.set_title(f"{name}: {scenarios.describe(name).summary}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{name}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="both", choices=["float64", "float32", "both"])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    dtypes = ["float64", "float32"] if args.dtype == "both" else [args.dtype]
    os.makedirs(args.out, exist_ok=True)
    quiet_framework_import("tensorflow")  # TensorFlow's start-up banners would land in the table
    start = time.time()
    print(f"{'scenario':16s} {'variant':13s} {'dtype':8s} {'first non-finite step':30s} {'max rel diff':>10s} "
          f"parity  does what it claims")
    all_ok = True
    with held_lines() as held:  # the trainer logs one line per diagnosis: kept for after the table
        for name in scenarios.names():
            for_plot = []
            for dtype in dtypes:
                for variant in scenarios.variants(name):
                    report = parity.compare(name, variant, dtype=dtype)
                    claims = all(t.ok for t in report.trajectories.values())
                    all_ok &= report.ok and claims
                    print(report.row(), " ", "as claimed" if claims else "NOT AS CLAIMED", flush=True)
                    if dtype == dtypes[0]:
                        for_plot.append(report)
            if not args.no_plots:
                print(f"  -> {plot(name, for_plot, args.out)}")
    print(f"\n{'all parity bars met' if all_ok else 'SOME PARITY BARS FAILED'} ({time.time() - start:.0f} s)")
    print_held(held)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
