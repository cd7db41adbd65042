"""``stabilize.audit``: check the data before training.

Findings, each with a ``kind``, where it is, the measured figures and the remedy:

* ``nonfinite``: NaN/Inf cells and their positions (seeds 002, 003);
* ``unscaled-inputs``: feature means or standard deviations far from 0 and 1,
  or feature scales differing by orders of magnitude (seed 000);
* ``huge-targets``: targets whose squared error, and its gradient, explode (seed 002);
* ``leakage``: a scaler fitted on more than the training split (seed 000: split
  first, then fit on the training split only).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .finite import check_finite

__all__ = ["Finding", "AuditReport", "audit"]


@dataclass(frozen=True)
class Finding:
    kind: str
    where: str
    figures: dict = field(default_factory=dict)
    remedy: str = ""

    def __str__(self) -> str:
        figs = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.figures.items())
        return f"[{self.kind}] {self.where}: {figs}\n    remedy: {self.remedy}"


@dataclass
class AuditReport:
    """All findings; ``ok`` when there are none."""

    findings: list[Finding]
    n_rows: int
    columns: list[str]

    @property
    def ok(self) -> bool:
        return not self.findings

    def kinds(self) -> set[str]:
        return {f.kind for f in self.findings}

    def __str__(self) -> str:
        head = f"audit of {self.n_rows} rows x {len(self.columns)} input columns: "
        if self.ok:
            return head + "no findings"
        return head + f"{len(self.findings)} finding(s)\n" + "\n".join(f"  {f}" for f in self.findings)


def _take(dataset, max_batches: int):
    """Concatenate the first batches of a DataLoader / tf.data.Dataset / iterable of (x, y)."""
    xs, ys = [], []
    for i, item in enumerate(dataset):
        if i >= max_batches:
            break
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError("audit: a dataset must yield (inputs, targets) pairs")
        xs.append(item[0])
        ys.append(item[1])
    if not xs:
        raise ValueError("audit: the dataset yielded no batches")
    as_np = lambda t: np.asarray(t.numpy() if hasattr(t, "numpy") else t)
    if isinstance(xs[0], dict):
        x = {k: np.concatenate([as_np(b[k]) for b in xs]) for k in xs[0]}
    else:
        x = np.concatenate([as_np(b) for b in xs])
    return x, np.concatenate([as_np(b) for b in ys])


def _matrix(X) -> tuple[np.ndarray, list[str]]:
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(X, pd.DataFrame):
        numeric = X.select_dtypes(include=[np.number, "bool"])
        if numeric.shape[1] != X.shape[1]:
            others = [c for c in X.columns if c not in numeric.columns]
            raise TypeError(f"audit: non-numeric input columns {others}; encode or drop them first")
        return numeric.to_numpy(dtype=np.float64), [str(c) for c in X.columns]
    if isinstance(X, dict):
        cols, names = [], []
        for key, value in X.items():
            arr = np.asarray(value, dtype=np.float64).reshape(len(value), -1)
            cols.append(arr)
            names += [str(key)] if arr.shape[1] == 1 else [f"{key}[{j}]" for j in range(arr.shape[1])]
        return np.concatenate(cols, axis=1), names
    if hasattr(X, "numpy") and not isinstance(X, np.ndarray):
        X = X.detach().cpu().numpy() if hasattr(X, "detach") else X.numpy()
    arr = np.asarray(X, dtype=np.float64)
    arr = arr.reshape(len(arr), -1) if arr.ndim != 2 else arr
    return arr, [f"col {j}" for j in range(arr.shape[1])]


def _nanstats(M: np.ndarray):
    masked = np.where(np.isfinite(M), M, np.nan)
    with np.errstate(all="ignore"), _quiet():
        return np.nanmean(masked, axis=0), np.nanstd(masked, axis=0)


class _quiet:
    def __enter__(self):
        import warnings

        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._w.__exit__(*exc)


def audit(X, y=None, *, train_index=None, scaler=None, scale_limit: float = 10.0,
          target_limit: float = 1e3, max_batches: int = 100) -> AuditReport:
    """Audit inputs (and targets) before training.

    Args:
        X: a numpy array, a pandas DataFrame, a dict of arrays (seed 000's
            ``{'input1', 'input2'}``), a tensor, or a DataLoader / ``tf.data.Dataset``
            of ``(x, y)`` batches (with ``y=None``; the first ``max_batches`` are sampled).
        y: the targets.
        train_index: the rows of the training split (needed to check ``scaler``).
        scaler: a fitted scikit-learn scaler (``mean_``, ``n_samples_seen_``) to check for leakage.
        scale_limit: a feature with ``|mean|`` or std above this is unscaled.
        target_limit: targets with RMS above this make MSE and its gradient explode.

    Example:
        >>> import numpy as np, stabilize
        >>> X = np.column_stack([np.linspace(0, 1e4, 50), np.linspace(0, 1, 50)])
        >>> sorted(stabilize.audit(X).kinds())
        ['unscaled-inputs']
    """
    if y is None and not isinstance(X, (np.ndarray, dict)) and hasattr(X, "__iter__") and not hasattr(X, "shape"):
        X, y = _take(X, max_batches)
    M, columns = _matrix(X)
    findings: list[Finding] = []
    Y = None if y is None else np.asarray(y.numpy() if hasattr(y, "numpy") and not isinstance(y, np.ndarray) else y)
    if Y is not None and len(Y) != len(M):
        raise ValueError(f"audit: inputs have {len(M)} rows but the targets have {len(Y)}")

    report = check_finite({"X": M} if Y is None or Y.dtype.kind not in "fc" else {"X": M, "y": Y}, name="data",
                          raise_error=False)
    for leaf in report.bad:
        names = columns if leaf.path.endswith("['X']") else None
        where = ", ".join(f"row {p[0]}" + (f" col {names[p[1]]!r}" if names and len(p) > 1 else "") for p in leaf.positions)
        rows = np.flatnonzero(~np.isfinite(M if names else Y.reshape(len(Y), -1)).all(axis=1))
        findings.append(Finding("nonfinite", f"{leaf.path} at {where}{' ...' if leaf.n_bad > len(leaf.positions) else ''}",
                                {"NaN": leaf.n_nan, "+inf": leaf.n_posinf, "-inf": leaf.n_neginf, "rows": rows.tolist()[:20]},
                                "find out why these cells are non-finite; drop or impute those rows deliberately "
                                "before training (np.nan_to_num hides the problem)"))

    if M.size:
        mean, std = _nanstats(M)
        far = [j for j in range(M.shape[1]) if abs(mean[j]) > scale_limit or std[j] > scale_limit]
        finite_std = std[np.isfinite(std) & (std > 0)]
        spread = float(finite_std.max() / finite_std.min()) if finite_std.size >= 2 else 1.0
        if far or spread > 100 * scale_limit:
            figures = {f"{columns[j]} mean": float(mean[j]) for j in far}
            figures.update({f"{columns[j]} std": float(std[j]) for j in far})
            figures["std ratio across columns"] = spread
            findings.append(Finding("unscaled-inputs", "columns " + ", ".join(repr(columns[j]) for j in far) if far else "all columns",
                                    figures, "split first, then fit sklearn.preprocessing.StandardScaler on the training "
                                             "split only and transform both splits with it"))

    if Y is not None and Y.dtype.kind in "fc" and Y.size:
        finite_y = Y[np.isfinite(Y)]
        rms = float(np.sqrt(np.mean(finite_y.astype(np.float64) ** 2))) if finite_y.size else 0.0
        if rms > target_limit:
            findings.append(Finding("huge-targets", "y", {"target RMS": rms, "initial MSE ~": rms**2,
                                                          "max |y|": float(np.abs(finite_y).max())},
                                    "scale the targets (StandardScaler on y, inverse-transform the predictions), "
                                    "or clip gradients: StabilityTrainer(clip_norm=1.0)"))

    if scaler is not None:
        if train_index is None:
            raise ValueError("audit: pass train_index (the training rows) to check the scaler for leakage")
        train_index = np.asarray(train_index)
        seen = int(getattr(scaler, "n_samples_seen_", -1)) if np.ndim(getattr(scaler, "n_samples_seen_", -1)) == 0 \
            else int(np.max(scaler.n_samples_seen_))
        figures: dict[str, Any] = {"scaler rows seen": seen, "training rows": len(train_index)}
        leak = seen > len(train_index)
        if hasattr(scaler, "mean_") and M.size:
            train_mean = np.nanmean(M[train_index], axis=0)
            all_mean = np.nanmean(M, axis=0)
            figures["|scaler mean - train mean| max"] = float(np.max(np.abs(scaler.mean_ - train_mean)))
            figures["|scaler mean - all-rows mean| max"] = float(np.max(np.abs(scaler.mean_ - all_mean)))
            leak = leak or not np.allclose(scaler.mean_, train_mean, rtol=1e-9, atol=1e-12)
        if leak:
            findings.append(Finding("leakage", "scaler", figures,
                                    "split first; fit the scaler on X[train_index] only, then transform both splits"))
    return AuditReport(findings, len(M), columns)
