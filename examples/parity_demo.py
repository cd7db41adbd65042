"""Every scenario of the catalogue on PyTorch and TensorFlow, side by side.

Prints, for each scenario and variant: the first non-finite step on each
backend and the largest relative difference of their losses up to it; then
writes one PNG per scenario with the diverging and fixed curves of both
backends overlaid.

Run: python examples/parity_demo.py [--dtype float64|float32|both] [--out DIR]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np

from stabilize import parity, scenarios
from stabilize.logs import quiet_framework_import


def plot(name: str, reports: list, out_dir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"torch": dict(lw=2.5, alpha=0.6), "tensorflow": dict(lw=1.0, ls="--")}
    for report in reports:
        for backend, traj in report.trajectories.items():
            # Clipped for display only: matplotlib's log transform overflows near 1e308.
            losses = np.where(np.isfinite(traj.losses), np.minimum(traj.losses, 1e200), np.nan)
            label = f"{report.variant} / {backend}"
            line, = ax.plot(np.arange(len(losses)), losses, label=label, **styles.get(backend, {}))
            if traj.first_nonfinite_step is not None:
                ax.axvline(traj.first_nonfinite_step, color=line.get_color(), ls=":", lw=1)
    # symlog: huge diverging losses and a masked loss sitting at exactly 0 both show.
    ax.set_yscale("symlog", linthresh=1e-2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (symlog); dotted: first non-finite")
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
    # The trainer logs one line per diagnosis; keep them for after the table.
    held = []
    handler = logging.Handler()
    handler.emit = lambda record: held.append(record.getMessage())
    logger = logging.getLogger("stabilize")
    logger.addHandler(handler)
    logger.propagate = False
    start = time.time()
    print(f"{'scenario':16s} {'variant':13s} {'dtype':8s} {'first non-finite step':30s} {'max rel diff':>10s} "
          f"parity  does what it claims")
    all_ok = True
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
    logger.removeHandler(handler)
    logger.propagate = True
    print(f"\n{'all parity bars met' if all_ok else 'SOME PARITY BARS FAILED'} ({time.time() - start:.0f} s)")
    if held:
        print(f"\n{len(held)} diagnosis line(s) logged during the runs (distinct ones):", file=sys.stderr)
        for line in dict.fromkeys(held):
            print(f"  {line}", file=sys.stderr)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
