"""Run the catalogue once per process and keep the results (the test and the table share them)."""

from __future__ import annotations

import functools
import re
from pathlib import Path

HERE = Path(__file__).parent


@functools.lru_cache(maxsize=None)
def result(framework: str, name: str, fixed: bool):
    """(diagnosis or None, steps run) of one case on one framework."""
    from .harness import run_keras, run_torch

    run = run_torch if framework == "torch" else run_keras
    return run(builders(framework)[name](fixed))


def builders(framework: str) -> dict:
    """The case builders of one framework, by name."""
    from conftest import load_backend

    load_backend("torch" if framework == "torch" else "tensorflow")
    if framework == "torch":
        from .cases_torch import CASES
    else:
        from .cases_keras import CASES
    return CASES


@functools.lru_cache(maxsize=None)
def origin_line(framework: str, name: str) -> tuple[str, int]:
    """(module file name, line) of ``# origin: ... <name>`` in the module that builds the case."""
    path = Path(builders(framework)[name].__code__.co_filename)
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        m = re.search(r"# origin: (.*)$", text)
        if m and name in m.group(1).split():
            return path.name, number
    raise LookupError(f"no '# origin: {name}' line in {path.name}")


def precision_recall(rows):
    """Per cause: (true positives, false positives, false negatives, precision, recall)."""
    causes = sorted({expected for expected, _ in rows} | {got for _, got in rows if got})
    table = {}
    for cause in causes:
        tp = sum(1 for e, g in rows if e == cause and g == cause)
        fp = sum(1 for e, g in rows if e != cause and g == cause)
        fn = sum(1 for e, g in rows if e == cause and g != cause)
        table[cause] = (tp, fp, fn, tp / (tp + fp) if tp + fp else float("nan"), tp / (tp + fn) if tp + fn else float("nan"))
    return table
