"""Framework-free facts about one traced operation: its canonical name, where in
the user's code it ran, and what was special about its inputs.

The per-framework tracers (``trace_torch``, ``trace_tf``) fill an :class:`OpEvent`
for the first operation whose output (forward) or input gradient (backward)
went non-finite from finite values; the rules read it.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field

import numpy as np

__all__ = ["OpEvent", "canonical", "user_frame", "error_frame", "leaves", "source_line", "ctc_infeasible", "SINGULAR", "SOFTMAX",
           "LOGS", "EXPS", "MEAN_LOSSES"]

# Canonical short names (lower case, no "Tensor."/"__"), framework aliases folded.
_ALIASES = {
    "truediv": "div", "rtruediv": "div", "realdiv": "div", "true_divide": "div", "divide": "div",
    "reciprocal": "div", "divnonan": "div", "floordiv": "div", "div_": "div", "xdivy": "div",
    "arccos": "acos", "arcsin": "asin", "arctanh": "atanh",
    "power": "pow", "rpow": "pow", "float_power": "pow", "pow_": "pow",
    "vector_norm": "norm", "euclideannorm": "norm", "frobenius_norm": "norm", "cdist": "norm",
    "pdist": "norm", "logsoftmax": "log_softmax", "scaled_dot_product_attention": "attention",
    "multi_head_attention_forward": "attention", "std_mean": "std", "var_mean": "var",
    "reduce_std": "std", "reduce_variance": "var", "logarithm": "log", "log2": "log", "log10": "log",
    "sqrt_": "sqrt", "log_": "log", "xlogy": "log", "ctcloss": "ctc_loss", "ctclossv2": "ctc_loss",
    "exp_": "exp", "exp2": "exp", "expm1": "exp", "nll_loss_nd": "nll_loss",
}
SINGULAR = {"sqrt", "rsqrt", "pow", "acos", "asin", "atanh", "div", "std", "var", "norm", "log", "log1p"}
SOFTMAX = {"softmax", "log_softmax", "attention"}
LOGS = {"log", "log1p"}
EXPS = {"exp"}
MEAN_LOSSES = {"cross_entropy", "nll_loss"}  # a mean over targets: NaN when every target is ignored
REDUCTIONS = {"sum", "mean", "matmul", "mm", "bmm", "linear", "einsum", "cumsum", "prod", "addmm", "batchmatmulv2"}

_SKIP_DIRS: tuple[str, ...] | None = None


def canonical(name: str) -> str:
    """``torch.Tensor.__truediv__`` -> ``div``; ``RealDiv`` -> ``div``; ``torch.sqrt`` -> ``sqrt``."""
    base = name.rsplit(".", 1)[-1].strip("_").lower()
    return _ALIASES.get(base, base)


def _skip_dirs() -> tuple[str, ...]:
    global _SKIP_DIRS
    if _SKIP_DIRS is None:
        dirs = []
        for mod in ("torch", "tensorflow", "keras", "tf_keras", "numpy"):
            m = sys.modules.get(mod)
            if m is not None and getattr(m, "__file__", None):
                dirs.append(os.path.dirname(m.__file__) + os.sep)
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
        dirs.append(here)
        _SKIP_DIRS = tuple(dirs)
    return _SKIP_DIRS


def _is_user(filename: str) -> bool:
    if filename.startswith("<"):
        return False
    if os.sep + "scenarios" + os.sep in filename and "stabilize" in filename:
        return True  # the scenarios' hand-written losses stand for user code
    return not filename.startswith(_skip_dirs()) and "site-packages" not in filename and "importlib" not in filename \
        and not filename.endswith(("contextlib.py", "functools.py"))


def user_frame(depth: int = 2, stop=None):
    """(file, line, function) of the innermost frame outside torch, keras, tensorflow and stabilize.

    ``stop``: the frame that started the replay (``trace``); frames from there outwards called
    the user's model or loss, they are not its code (a test harness, a training loop), so an op
    with no user frame below it (a library loss passed as ``loss_fn``) gets no line at all.
    """
    f = sys._getframe(depth)
    while f is not None and f is not stop:
        if _is_user(f.f_code.co_filename):
            return f.f_code.co_filename, f.f_lineno, f.f_code.co_name
        f = f.f_back
    return None, None, None


def error_frame(exc) -> tuple | None:
    """(file, line, function) of the innermost user frame an exception passed through (the
    traceback starts at the replay that caught it, so every frame below is the user's call)."""
    tb, found = exc.__traceback__, None
    while tb is not None:
        code = tb.tb_frame.f_code
        if _is_user(code.co_filename):
            found = (code.co_filename, tb.tb_lineno, code.co_name)
        tb = tb.tb_next
    return found


def source_line(file, line) -> str:
    """The stripped source text of ``file:line`` ("" when unavailable)."""
    import linecache

    return linecache.getline(file, line).strip() if file and line else ""


def ctc_infeasible(targets, input_lengths, target_lengths, blank: int = 0) -> list:
    """Rows whose CTC alignment is impossible: ``(row, frames, frames needed)``.

    A target of length ``L`` with ``r`` adjacent repeats needs ``L + r`` frames
    (a blank must separate each repeat); fewer frames give probability 0, loss inf.
    """
    t = np.asarray(targets)
    ins = np.asarray(input_lengths).reshape(-1)
    lens = np.asarray(target_lengths).reshape(-1)
    out, start = [], 0
    for row, (n_in, n_t) in enumerate(zip(ins, lens)):
        if t.ndim == 2:
            seq = t[row, : int(n_t)]
        else:  # concatenated targets
            seq, start = t[start : start + int(n_t)], start + int(n_t)
        seq = seq[seq != blank]
        need = int(len(seq) + np.sum(seq[1:] == seq[:-1]))
        if int(n_in) < need:
            out.append((row, int(n_in), need))
    return out


def leaves(tree, path: str = ""):
    """(path, leaf) of a model output: tensor, tuple, list, dict, dataclass or ModelOutput."""
    if tree is None:
        return
    if isinstance(tree, dict) or (hasattr(tree, "keys") and hasattr(tree, "__getitem__") and not hasattr(tree, "shape")):
        for k in list(tree.keys()):
            yield from leaves(tree[k], f"{path}[{k!r}]")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from leaves(v, f"{path}[{i}]")
    elif dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        for f in dataclasses.fields(tree):
            yield from leaves(getattr(tree, f.name), f"{path}.{f.name}")
    else:
        yield path or "output", tree


def _count(mask) -> int:
    return int(np.count_nonzero(mask))


@dataclass
class OpEvent:
    """The first operation that turned finite values into non-finite ones.

    Attributes:
        name: the framework's name (``torch.sqrt``, ``torch.Tensor.__truediv__``, ``tf.RealDiv``).
        op: the canonical short name (``sqrt``, ``div``).
        phase: ``forward`` (its output) or ``backward`` (its input gradient).
        file, line, function: the user's source line that called it (None outside the user's code).
        source: the text of that line (it names the term of a loss built from several).
        module: the module / layer path it ran in ("" outside any).
        stage: ``model`` or ``loss``.
        inputs: its floating inputs as float64 numpy, with their dtype names.
        scalars: its Python-number arguments (an exponent, a fill value).
        masks: its boolean inputs (attention masks).
        where: the elements (of the first input) whose output or gradient went bad, when shapes allow.
        output_nonfinite: the output was non-finite in the forward pass (a masked value).
        grad_in_finite_zero: in the backward, the incoming gradient was 0 there (0 · inf = NaN).
    """

    name: str
    op: str
    phase: str
    file: str | None = None
    line: int | None = None
    function: str | None = None
    module: str = ""
    stage: str = "model"
    inputs: list = field(default_factory=list)
    dtypes: list = field(default_factory=list)
    scalars: list = field(default_factory=list)
    masks: list = field(default_factory=list)
    where: object = None
    output_nonfinite: bool = False
    output_dtype: str = "float32"
    bad_rows: int = 0
    extra: dict = field(default_factory=dict)
    source: str = ""

    def offending(self) -> np.ndarray:
        """The values of the first floating input at the bad elements (all of it otherwise)."""
        if not self.inputs:
            return np.zeros(0)
        x = self.inputs[0]
        if self.where is not None and np.shape(self.where) == x.shape:
            return x[self.where]
        return x.ravel()

    def counts(self) -> dict:
        """How many offending inputs are 0, negative, at ±1, beyond ±1, at the dtype's max."""
        from ..backends.base import FLOAT_INFO

        x = self.offending()
        big = FLOAT_INFO.get(self.dtypes[0] if self.dtypes else "float32", FLOAT_INFO["float32"]).max
        with np.errstate(invalid="ignore"):
            return {
                "zeros": _count(x == 0), "negatives": _count(x < 0), "at ±1": _count(np.abs(x) == 1),
                "beyond ±1": _count(np.abs(x) > 1), "at the dtype max": _count(np.abs(x) >= big),
                "non-finite": _count(~np.isfinite(x)), "total": int(x.size),
            }

    def detail(self) -> str:
        """``3 inputs exactly 0, d sqrt/dx = inf there``."""
        if "error" in self.extra:
            return f"raised {self.extra['error'][:160]}"
        c = self.counts()
        parts = []
        if "infeasible" in self.extra:
            rows = self.extra["infeasible"]
            return (f"{len(rows)} target(s) cannot be aligned to their input, (row, frames, frames needed): "
                    f"{rows[:5]}{' ...' if len(rows) > 5 else ''}")
        if self.extra.get("overflowed constant"):
            parts.append(f"a constant that overflows {self.output_dtype} (±inf) among the inputs")
        if self.op in ("acos", "asin", "atanh"):
            if c["at ±1"]:
                parts.append(f"{c['at ±1']} inputs exactly ±1")
            if c["beyond ±1"]:
                parts.append(f"{c['beyond ±1']} inputs beyond ±1")
        elif self.op == "div" and len(self.inputs) >= 2:
            zeros = _count(self.inputs[1] == 0) if self.where is None or np.shape(self.where) != self.inputs[1].shape \
                else _count(self.inputs[1][self.where] == 0)
            parts.append(f"{zeros} denominators exactly 0")
        elif self.op in SOFTMAX:
            parts.append(f"{self.bad_rows} rows with every entry masked")
        elif self.op in ("std", "var"):
            pass  # the reduction size below is what matters
        elif self.op not in SINGULAR:  # an overflow: the size of the inputs is what matters
            if "largest |input|" not in self.extra and self.inputs:
                finite = [a[np.isfinite(a)] for a in self.inputs]
                parts.append(f"|input| up to {max((float(np.abs(a).max()) for a in finite if a.size), default=0.0):.3g}")
        else:
            if c["zeros"]:
                parts.append(f"{c['zeros']} inputs exactly 0")
            if c["negatives"]:
                parts.append(f"{c['negatives']} negative inputs")
            if c["at the dtype max"]:
                parts.append(f"{c['at the dtype max']} inputs at the {self.dtypes[0]} max")
        if self.scalars and self.op in ("pow", "div", "log"):
            parts.append("exponent " + f"{self.scalars[-1]:g}" if self.op == "pow" else
                         "arguments " + ", ".join(f"{s:g}" for s in self.scalars))
        if "largest |input|" in self.extra:
            parts.append(f"|input| up to {self.extra['largest |input|']:.3g}, {self.output_dtype} max "
                         f"{self.extra['dtype max']:.5g}")
        if "n" in self.extra:
            parts.append(f"{self.extra['n']} element(s) per reduction")
        if self.phase == "backward":
            parts.append(f"d {self.op}/dx = inf there")
        return ", ".join(parts) or "finite inputs"

    def line_text(self) -> str:
        where = f"{os.path.basename(self.file)}:{self.line} in {self.function}" if self.file else "(library code: no line of yours)"
        module = f" [{self.module}]" if self.module else ""
        return f"{self.name} at {where}{module} ({self.phase}: {self.detail()})"
