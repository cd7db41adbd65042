"""The ``stabilize`` command line.

    stabilize scenarios list
    stabilize scenarios run NAME VARIANT [--backend B] [--dtype D]
    stabilize scenarios parity [--dtype D] [--backends torch,tensorflow]
    stabilize audit data.csv --target COLUMN
    stabilize doctor SCENARIO [--variant V] [--backend B] [--dtype D] [--plot out.png]

Exit codes: 0 all good; 1 a finding, a failed parity bar or a failed variant;
2 a usage error (unknown scenario, missing file or column).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2


class _UsageError(Exception):
    pass


def _scenario_args(p):
    p.add_argument("--backend", default=None, help="torch or tensorflow (default: the configured backend)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])


def _check_scenario(name, variant=None):
    from . import scenarios

    if name not in scenarios.names():
        raise _UsageError(f"unknown scenario {name!r}; known: {', '.join(scenarios.names())}")
    if variant is not None and variant not in scenarios.variants(name):
        raise _UsageError(f"scenario {name!r} has no variant {variant!r}; it has: {', '.join(scenarios.variants(name))}")


def cmd_scenarios(args) -> int:
    from . import parity, scenarios

    if args.action == "list":
        for name in scenarios.names():
            s = scenarios.describe(name)
            print(f"{name:16s} {', '.join(scenarios.variants(name)):32s} {s.summary}  [{', '.join(s.seeds)}]")
        return EXIT_OK
    if args.action == "run":
        if not args.name or not args.variant:
            raise _UsageError("stabilize scenarios run NAME VARIANT")
        _check_scenario(args.name, args.variant)
        t = scenarios.run(args.name, args.variant, backend=args.backend, dtype=args.dtype)
        print(f"{t.scenario}/{t.variant} on {t.backend} ({t.dtype}, {t.device}): expect {t.expect}, "
              f"{len(t.losses)} steps, first non-finite step {t.first_nonfinite_step}, final loss {t.final_loss:.6g}"
              + (f" (bound {t.bound:.4g})" if t.bound is not None else "") + f" -> {'as claimed' if t.ok else 'NOT AS CLAIMED'}")
        for key, value in t.facts.items():
            if key not in ("scaler", "train_index", "raw_inputs", "raw_targets"):
                print(f"  {key}: {value}")
        return EXIT_OK if t.ok else EXIT_FINDINGS
    # parity
    backends = tuple(b.strip() for b in args.backends.split(","))
    ok = True
    print(f"{'scenario':16s} {'variant':13s} {'dtype':8s} {'first non-finite step':30s} {'max rel diff':>10s}")
    for name in scenarios.names():
        for variant in scenarios.variants(name):
            report = parity.compare(name, variant, backends=backends, dtype=args.dtype)
            ok &= report.ok
            print(report.row(), flush=True)
    return EXIT_OK if ok else EXIT_FINDINGS


def cmd_audit(args) -> int:
    from .audit import audit

    try:
        import pandas as pd
    except ImportError as exc:
        raise _UsageError("stabilize audit needs pandas: pip install 'stabilize[scenarios]'") from exc
    if not os.path.isfile(args.path):
        raise _UsageError(f"no such file: {args.path}")
    df = pd.read_csv(args.path)
    if args.target not in df.columns:
        raise _UsageError(f"column {args.target!r} not in {args.path}; columns: {', '.join(map(str, df.columns))}")
    y = df[args.target].to_numpy(dtype="float64")
    X = df.drop(columns=[args.target])
    text = [c for c in X.columns if not pd.api.types.is_numeric_dtype(X[c])]
    if text:
        print(f"note: non-numeric columns not audited (encode them to include them): {', '.join(map(str, text))}")
        X = X.drop(columns=text)
    report = audit(X, y)
    print(report)
    return EXIT_OK if report.ok else EXIT_FINDINGS


def cmd_doctor(args) -> int:
    from . import scenarios

    _check_scenario(args.scenario, args.variant)
    t = scenarios.run(args.scenario, args.variant, backend=args.backend, dtype=args.dtype)
    print(f"stabilize doctor: {t.scenario}/{t.variant} on {t.backend} ({t.dtype}, {t.device})")
    print(f"  {scenarios.describe(t.scenario).summary}; {scenarios.build(t.scenario, t.variant).note}")
    print(t.history.report())
    if t.history.diagnosis is None:
        print("no non-finite step: nothing to diagnose")
    if args.plot:
        print(f"plot: {t.history.plot(args.plot, title=f'{t.scenario}/{t.variant} on {t.backend}')}")
    return EXIT_FINDINGS if t.history.diagnosis is not None else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stabilize", description="Keep neural-network training numerically stable.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("scenarios", help="list, run, or compare across backends the documents' scenarios")
    p.add_argument("action", choices=["list", "run", "parity"])
    p.add_argument("name", nargs="?")
    p.add_argument("variant", nargs="?")
    p.add_argument("--backends", default="torch,tensorflow", help="for parity (comma-separated)")
    _scenario_args(p)
    p.set_defaults(func=cmd_scenarios)
    p = sub.add_parser("audit", help="audit a CSV before training (NaN/Inf, scale, huge targets)")
    p.add_argument("path")
    p.add_argument("--target", required=True, help="the target column")
    p.set_defaults(func=cmd_audit)
    p = sub.add_parser("doctor", help="run a scenario, diagnose its failure and print the report")
    p.add_argument("scenario")
    p.add_argument("--variant", default="diverging")
    p.add_argument("--plot", default=None, help="write the loss/gradient-norm PNG here")
    _scenario_args(p)
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv=None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _UsageError as exc:
        print(f"stabilize: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
