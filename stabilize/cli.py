"""The ``stabilize`` command line (also ``python -m stabilize``).

    stabilize scenarios list
    stabilize scenarios run NAME VARIANT [--backend B] [--dtype D]
    stabilize scenarios parity [NAME ...] [--variant V] [--dtype D] [--backends torch,tensorflow]
    stabilize audit data.csv --target COLUMN
    stabilize doctor SCENARIO [--variant V] [--backend B] [--dtype D] [--plot out.png]

Exit codes: 0 all good; 1 a problem was found (audit findings, a diagnosis, a
failed parity bar, a variant that does not do what it claims); 2 a usage or
input error, reported as one line on stderr. Tables and reports go to stdout;
log lines (notes, the trainer's diagnosis line) to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_FINDINGS", "EXIT_USAGE"]

EXIT_OK, EXIT_FINDINGS, EXIT_USAGE = 0, 1, 2
BACKENDS = ("torch", "tensorflow")


class UsageError(Exception):
    """A user error: printed as ``stabilize: error: ...`` with exit code 2."""


def _names() -> list[str]:
    from . import scenarios

    return scenarios.names()


def _variants_help() -> str:
    from . import scenarios

    return "; ".join(f"{n}: {', '.join(scenarios.variants(n))}" for n in scenarios.names())


def _check_variant(name: str, variant: str | None) -> None:
    from . import scenarios

    if variant is not None and variant not in scenarios.variants(name):
        raise UsageError(f"scenario {name!r} has no variant {variant!r}; it has: {', '.join(scenarios.variants(name))}")


def _backend(name: str | None) -> str:
    """The backend a command will run on, checked and with TensorFlow's start-up chatter discarded."""
    from . import config, registry
    from .logs import quiet_framework_import

    resolved, source = config.resolve_backend_name(name)
    resolved = registry.canonical_name(resolved, "--backend" if name is not None else source)
    if resolved not in BACKENDS:
        raise UsageError(f"the scenarios run on {' or '.join(BACKENDS)}, not {resolved!r}")
    if resolved == "tensorflow":
        quiet_framework_import("tensorflow")
    registry.get_backend(resolved)  # BackendNotAvailableError (with the pip hint) now, not mid-run
    return resolved


def _writable(path: str | None) -> None:
    if path is None:
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"cannot write the plot to {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write the plot to {path}: directory {parent} is not writable")


def cmd_list(args) -> int:
    from . import scenarios

    print(f"{'scenario':16s} {'variants':28s} what goes wrong")
    for name in scenarios.names():
        print(f"{name:16s} {', '.join(scenarios.variants(name)):28s} {scenarios.describe(name).summary}")
    return EXIT_OK


def cmd_run(args) -> int:
    from . import scenarios

    _check_variant(args.name, args.variant)
    backend = _backend(args.backend)
    t = scenarios.run(args.name, args.variant, backend=backend, dtype=args.dtype)
    print(f"{t.scenario}/{t.variant} on {t.backend} ({t.dtype}, {t.device}): expect {t.expect}, "
          f"{len(t.losses)} steps, first non-finite step {t.first_nonfinite_step}, final loss {t.final_loss:.6g}"
          + (f" (bound {t.bound:.4g})" if t.bound is not None else "") + f" -> {'as claimed' if t.ok else 'NOT AS CLAIMED'}")
    for key, value in t.facts.items():
        if key not in ("scaler", "train_index", "raw_inputs", "raw_targets"):
            print(f"  {key}: {value}")
    return EXIT_OK if t.ok else EXIT_FINDINGS


def cmd_parity(args) -> int:
    from . import parity, scenarios
    from .logs import held_lines, print_held

    unknown = [n for n in args.names if n not in scenarios.names()]
    if unknown:
        raise UsageError(f"unknown scenario {unknown[0]!r}; known: {', '.join(scenarios.names())}")
    backends = tuple(dict.fromkeys(b.strip() for b in args.backends.split(",") if b.strip()))
    if len(backends) < 2:
        raise UsageError(f"parity compares at least two backends, got {args.backends!r}; "
                         f"e.g. --backends {','.join(BACKENDS)}")
    backends = tuple(_backend(b) for b in backends)
    names = args.names or scenarios.names()
    if args.variant is not None:
        for name in names:
            _check_variant(name, args.variant)
    ok = True
    print(f"{'scenario':16s} {'variant':13s} {'dtype':8s} {'first non-finite step':30s} {'max rel diff':>10s} parity",
          flush=True)
    with held_lines() as held:  # diagnosis lines go after the table, not between its rows
        for name in names:
            for variant in [args.variant] if args.variant else scenarios.variants(name):
                report = parity.compare(name, variant, backends=backends, dtype=args.dtype)
                ok &= report.ok
                print(report.row(), flush=True)
    if logging.getLogger("stabilize").isEnabledFor(logging.WARNING):  # -q: errors only
        print_held(held)
    return EXIT_OK if ok else EXIT_FINDINGS


def cmd_audit(args) -> int:
    from .audit import audit
    from .errors import install_hint

    try:
        import pandas as pd
    except ImportError:
        raise UsageError(f"stabilize audit needs pandas: {install_hint('scenarios')}") from None
    if not os.path.isfile(args.path):
        raise UsageError(f"no such file: {args.path}")
    try:
        df = pd.read_csv(args.path)
    except pd.errors.EmptyDataError:
        raise UsageError(f"{args.path} is empty: there is nothing to audit") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot read {args.path} as CSV ({reason}); is it a comma-separated text file?") from None
    if args.target not in df.columns:
        raise UsageError(f"column {args.target!r} not in {args.path}; columns: {', '.join(map(str, df.columns))}")
    if len(df) == 0:
        raise UsageError(f"{args.path} has a header but no data rows: there is nothing to audit")
    target = df[args.target]
    if not pd.api.types.is_numeric_dtype(target):
        bad = pd.to_numeric(target, errors="coerce").isna() & target.notna()
        row = bad.idxmax() if bad.any() else None
        example = f" (e.g. {target[row]!r} in row {row})" if row is not None else ""
        raise UsageError(f"target column {args.target!r} is not numeric{example}; encode it as numbers first")
    y = target.to_numpy(dtype="float64")
    X = df.drop(columns=[args.target])
    text = [c for c in X.columns if not pd.api.types.is_numeric_dtype(X[c])]
    if len(text) == X.shape[1]:
        raise UsageError(f"{args.path} has no numeric input columns besides the target {args.target!r}"
                         + (f" (non-numeric: {', '.join(map(str, text))}; encode them as numbers)" if text else ""))
    if text:
        logging.getLogger("stabilize").warning(
            "stabilize: note: non-numeric columns not audited (encode them to include them): %s", ", ".join(map(str, text)))
        X = X.drop(columns=text)
    report = audit(X, y)
    print(report)
    return EXIT_OK if report.ok else EXIT_FINDINGS


def cmd_doctor(args) -> int:
    from . import scenarios

    _check_variant(args.scenario, args.variant)
    _writable(args.plot)
    backend = _backend(args.backend)
    t = scenarios.run(args.scenario, args.variant, backend=backend, dtype=args.dtype)
    print(f"stabilize doctor: {t.scenario}/{t.variant} on {t.backend} ({t.dtype}, {t.device})")
    print(f"  {scenarios.describe(t.scenario).summary}; {scenarios.build(t.scenario, t.variant).note}")
    print(t.history.report())
    if t.history.diagnosis is None:
        print("no non-finite step: nothing to diagnose")
    if args.plot:
        print(f"plot: {t.history.plot(args.plot, title=f'{t.scenario}/{t.variant} on {t.backend}')}")
    return EXIT_FINDINGS if t.history.diagnosis is not None else EXIT_OK


def _scenario_options(p, parity: bool = False) -> None:
    if not parity:
        p.add_argument("--backend", default=None, metavar="B",
                       help="torch or tensorflow (default: the configured backend, see the README)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="default: %(default)s")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .errors import DISTRIBUTION

    names = _names()
    scenario_help = f"one of: {', '.join(names)}"
    parser = argparse.ArgumentParser(
        prog="stabilize", description="Keep neural-network training numerically stable.",
        epilog="exit codes: 0 ok, 1 a problem was found, 2 a usage or input error")
    parser.add_argument("--version", action="version", version=f"stabilize {__version__} ({DISTRIBUTION})")
    parser.add_argument("-q", "--quiet", action="store_true", help="log errors only (no notes or diagnosis lines)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("scenarios", help="list, run or compare across backends the built-in failure scenarios",
                       description="The seven built-in failure scenarios, each with variants (diverging, fixed, ...).")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = ssub.add_parser("list", help="list the scenarios and their variants", description="List the scenarios.")
    q.set_defaults(func=cmd_list)
    q = ssub.add_parser("run", help="run one variant; exit 1 if it does not do what it claims",
                        description="Run one scenario variant and say whether it does what it claims.",
                        epilog=f"variants: {_variants_help()}")
    q.add_argument("name", choices=names, metavar="NAME", help=scenario_help)
    q.add_argument("variant", metavar="VARIANT", help="a variant of NAME (see below)")
    _scenario_options(q)
    q.set_defaults(func=cmd_run)
    q = ssub.add_parser("parity", help="run scenarios on two backends and compare; exit 1 if a bar fails",
                        description="Run scenarios on each backend and compare the loss trajectories step by step.",
                        epilog=f"variants: {_variants_help()}")
    q.add_argument("names", nargs="*", metavar="NAME",
                   help=f"scenarios to compare (default: all); {scenario_help}")
    q.add_argument("--variant", default=None, help="compare only this variant (default: every variant)")
    q.add_argument("--backends", default="torch,tensorflow", help="comma-separated, at least two (default: %(default)s)")
    _scenario_options(q, parity=True)
    q.set_defaults(func=cmd_parity)

    p = sub.add_parser("audit", help="audit a CSV before training; exit 1 on findings",
                       description="Audit a CSV before training: NaN/Inf cells, unscaled inputs, huge targets.")
    p.add_argument("path", help="a comma-separated file with a header row")
    p.add_argument("--target", required=True, help="the name of the target column (numeric)")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("doctor", help="run a scenario, diagnose its failure; exit 1 when a diagnosis is made",
                       description="Run a scenario variant, diagnose the first non-finite step and print the report.",
                       epilog=f"variants: {_variants_help()}")
    p.add_argument("scenario", choices=names, metavar="SCENARIO", help=scenario_help)
    p.add_argument("--variant", default="diverging", help="default: %(default)s")
    p.add_argument("--plot", default=None, metavar="PNG", help="write the loss/gradient-norm plot to this file")
    _scenario_options(p)
    p.set_defaults(func=cmd_doctor)
    return parser


def main(argv=None) -> int:
    """Run the command line; return the exit code (see the module docstring)."""
    from .errors import StabilizeError

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    if args.quiet:
        logging.getLogger("stabilize").setLevel(logging.ERROR)  # this process is ours: the CLI's own setting
    try:
        return args.func(args)
    except (UsageError, StabilizeError) as exc:  # bad names, config, a framework not installed
        message = str(exc)
    except ModuleNotFoundError as exc:
        from .errors import install_hint

        message = f"{exc.name or exc} is not installed; {install_hint('scenarios')}"
    except OSError as exc:
        message = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
    except KeyboardInterrupt:
        print("stabilize: interrupted", file=sys.stderr)
        return 130
    print(f"stabilize: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
