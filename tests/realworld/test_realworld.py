"""The real-world catalogue bar, on torch and Keras: the right cause on every case,
the right operation and source line where the cause is an operation, the same
cause on both frameworks, no diagnosis on the fixed variant, no exception."""

import os

import pytest

from .registry import CATALOGUE
from .results import origin_line, precision_recall, result

FRAMEWORKS = ["torch", "keras"]
PAIRS = [pytest.param(c, fw, id=f"{c.name}-{fw}") for c in CATALOGUE for fw in FRAMEWORKS if fw in c.frameworks]
BOTH = [c for c in CATALOGUE if set(FRAMEWORKS) <= set(c.frameworks)]


@pytest.mark.parametrize("case,framework", PAIRS)
def test_cause_and_origin(case, framework):
    d, steps = result(framework, case.name, False)
    assert d is not None, f"{case.name} did not fail on {framework} within {steps} steps"
    assert d.cause == case.cause, str(d)
    assert d.advice and d.origin
    if case.ops:
        assert d.op is not None, str(d)
        assert d.op.op in case.ops[framework], d.op.line_text()
        module, line = origin_line(framework, case.name)
        assert os.path.basename(d.op.file) == module and d.op.line == line, d.op.line_text()
        assert f"{module}:{d.op.line}" in d.origin_line()
    assert "harness.py" not in d.advice and "harness.py" not in d.origin_line(), "advice cites a line outside the user's code"


@pytest.mark.parametrize("case", BOTH, ids=lambda c: c.name)
def test_same_cause_on_torch_and_keras(case):
    assert result("torch", case.name, False)[0].cause == result("keras", case.name, False)[0].cause


@pytest.mark.slow  # every fixed variant trains to the end on both frameworks
@pytest.mark.parametrize("case,framework", PAIRS)
def test_no_diagnosis_on_the_fixed_variant(case, framework):
    d, steps = result(framework, case.name, True)
    assert d is None, str(d)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_constant_column_advice_fixes_the_column_and_drops_no_rows(framework):
    d, _ = result(framework, "minmax-constant-column", False)
    assert d.evidence["input columns non-finite in every row"] == [2]
    assert "column(s) [2]" in d.advice and "do not drop rows" in d.advice
    assert "drop or impute those rows" not in d.advice


def test_every_new_cause_is_covered_twice():
    new = ["singular-op", "masked-softmax", "low-precision", "weight-decay", "rnn-exploding", "bad-labels",
           "ctc-infeasible", "empty-mean", "exp-overflow"]
    for cause in new:
        assert sum(c.cause == cause for c in CATALOGUE) >= 2, cause
    assert len(CATALOGUE) >= 41


def test_precision_and_recall_of_the_cause_over_the_catalogue():
    rows = []
    for case, framework in ((p.values[0], p.values[1]) for p in PAIRS):
        d, _ = result(framework, case.name, False)
        rows.append((case.cause, d.cause if d else None))
    table = precision_recall(rows)
    for cause, (tp, fp, fn, precision, recall) in table.items():
        assert (fp, fn) == (0, 0), (cause, tp, fp, fn)
        assert precision == recall == 1.0
    assert sum(t[0] for t in table.values()) == len(PAIRS)
