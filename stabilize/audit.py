"""``stabilize.audit``: check the data before training.

Findings, each with a ``kind``, where it is (dataset rows and column names),
the measured figures and the remedy:

* ``nonfinite``: NaN/Inf cells in the inputs or the targets, by row and column;
* ``constant-columns``: one value in every row (min-max scaling divides 0 by 0);
* ``unscaled-inputs``: feature means or standard deviations beyond ``scale_limit``,
  or scales differing by orders of magnitude, naming the columns that drive it;
  ``outlier-rows`` instead when a few rows alone cause it (a corrupted sample);
* ``huge-targets``: targets whose squared error, and its gradient, explode;
* ``bad-labels`` and ``label-dtype`` (with ``num_classes=``): class labels out
  of ``0..num_classes-1``, not whole numbers, or stored as floats;
* ``leakage``: a scaler fitted on more than the training split (split first,
  then fit on the training split only); ``scaler-mismatch``: a scaler not
  fitted on the training rows given.

Integer, boolean and categorical columns (ids, token ids, codes) are not scale-checked
(a note lists them). How data are read into rows and columns: :mod:`stabilize.measures`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from .diagnose import SCALE_LIMIT, TARGET_LIMIT
from .measures import Table, as_table, column_stats, is_batches, nonfinite_cells, outlier_rows, row_positions
from .measures import output_table, take_batches

__all__ = ["Finding", "AuditReport", "audit"]

SHOWN, ROWS_SHOWN = 5, 20  # columns named in a finding's text (then "and N more"); rows listed in its figures


@dataclass(frozen=True)
class Finding:
    """One problem: its ``kind``, ``where`` it is, the ``figures`` that show it and the ``remedy``."""

    kind: str
    where: str
    figures: dict = field(default_factory=dict)
    remedy: str = ""

    def __str__(self) -> str:
        figs = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.figures.items())
        return f"[{self.kind}] {self.where}: {figs}\n    remedy: {self.remedy}"


@dataclass
class AuditReport:
    """All findings (``ok`` when there are none), and notes that are not findings."""

    findings: list[Finding]
    n_rows: int
    columns: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def kinds(self) -> set[str]:
        return {f.kind for f in self.findings}

    def __str__(self) -> str:
        head = f"audit of {self.n_rows} rows x {len(self.columns)} input columns: "
        head += "no findings" if self.ok else f"{len(self.findings)} finding(s)"
        return "\n".join([head] + [f"  {f}" for f in self.findings] + [f"  note: {n}" for n in self.notes])


def _names(T: Table, cols) -> str:
    cols = list(cols)
    shown = ", ".join(repr(T.columns[j]) if T.named else T.columns[j].removeprefix("col ") for j in cols[:SHOWN])
    return shown + (f" and {len(cols) - SHOWN} more" if len(cols) > SHOWN else "")


def _rows(T: Table, positions) -> str:
    positions = list(positions)
    shown = ", ".join(str(T.row(i)) for i in positions[:SHOWN])
    return shown + (f" and {len(positions) - SHOWN} more" if len(positions) > SHOWN else "")


# -- the checks --------------------------------------------------------------------
def _nonfinite(T: Table, what: str) -> Finding | None:
    nf = nonfinite_cells(T.values)
    if nf is None:
        return None
    cells = ", ".join(T.row_text(i) + ("" if T.n_columns == 1 and what != "inputs" else " " + T.col_text(j))
                      for i, j in nf.cells)
    figures = {"NaN": nf.n_nan, "+inf": nf.n_posinf, "-inf": nf.n_neginf,
               "rows": [T.row(i) for i in nf.rows[:ROWS_SHOWN]], "rows affected": f"{len(nf.rows)} of {T.n_rows}"}
    # A column broken in most rows is a broken column: dropping its rows would drop most of the data.
    broken = [j for j in np.flatnonzero(nf.per_column) if 2 * nf.per_column[j] >= T.n_rows and T.n_rows > 1]
    advice = []
    if broken:
        for j in broken[:SHOWN]:
            figures[f"{T.columns[j]} non-finite rows"] = int(nf.per_column[j])
        advice.append(f"{'column' if len(broken) == 1 else 'columns'} {_names(T, broken)} "
                      f"{'is' if len(broken) == 1 else 'are'} non-finite in most rows: repair or drop "
                      f"{'that column' if len(broken) == 1 else 'those columns'} (a failed parse or join?), do not drop rows for it")
    others = np.ones(T.n_columns, bool)
    others[broken] = False
    rest = np.flatnonzero((~np.isfinite(T.values[:, others])).any(axis=1))
    if rest.size:
        advice.append(f"find out why {'row' if rest.size == 1 else 'rows'} {_rows(T, rest)} ({rest.size} of {T.n_rows}) "
                      f"{'holds' if rest.size == 1 else 'hold'} non-finite values, then "
                      + ("impute those cells or drop only those rows" if what == "inputs" else
                         "fix those targets or drop only those rows, from X and y together")
                      + ", deliberately (np.nan_to_num hides the problem)")
    return Finding("nonfinite", f"{what} at {cells}{' ...' if nf.n_cells > len(nf.cells) else ''}", figures, "; ".join(advice))


def _constant(T: Table) -> Finding | None:
    if T.n_rows < 2 or T.structured:
        return None
    st = column_stats(T.values)
    # Token-id and id arrays may hold a fixed id in a column (a [CLS] token); a DataFrame's
    # columns and float columns are features, and a constant feature breaks min-max scaling.
    eligible = np.array([T.frame or f for f in T.float_dtype], bool)
    const = np.flatnonzero(eligible & (st.n_finite >= 2) & (st.min == st.max))
    if not const.size:
        return None
    figures = {f"{T.columns[j]} value": float(st.min[j]) for j in const[:SHOWN]}
    figures["constant columns"] = int(const.size)
    return Finding("constant-columns", f"{'column' if const.size == 1 else 'columns'} {_names(T, const)}", figures,
                   "these columns hold one value in every row: they carry no information, and min-max scaling "
                   "divides 0 by 0 there (NaN in every row); drop these columns, or use a scaler that handles zero "
                   "variance (sklearn's StandardScaler and MinMaxScaler keep them finite); do not drop rows for this")


def _unscaled(T: Table, limit: float, scaled: bool) -> Finding | None:
    st = column_stats(T.values)
    checked = T.scale_checked() & (st.n_finite > 0) & ~(st.min == st.max)  # a constant column is reported as such
    far = np.flatnonzero(checked & ((np.abs(st.mean) > limit) | (st.std > limit)))
    far = far[np.argsort(-np.maximum(np.abs(st.mean[far]), st.std[far]), kind="stable")]
    odd = outlier_rows(T.values[:, checked], limit) if far.size else ()
    if len(odd):  # a few rows, not the columns, are out of scale: name them
        one = len(odd) == 1
        return Finding("outlier-rows", f"{'row' if one else 'rows'} {_rows(T, odd)} ({len(odd)} of {T.n_rows}) "
                       f"{'makes' if one else 'make'} {far.size} column(s) look unscaled",
                       {f"row {T.row(i)} largest |value|": float(np.nanmax(np.abs(T.values[i]))) for i in odd[:SHOWN]},
                       f"inspect {'that row' if one else 'those rows'} (a corrupted sample, a sentinel such as 3e38?) "
                       "and fix or drop it deliberately; rescaling every column would not fix it")
    spreadable = np.flatnonzero(checked & (st.std > 0) & np.isfinite(st.std))
    spread = 1.0
    if spreadable.size >= 2:
        hi = spreadable[np.argmax(st.std[spreadable])]
        lo = spreadable[np.argmin(st.std[spreadable])]
        spread = float(st.std[hi] / st.std[lo])
    if not far.size and spread <= 100 * limit:
        return None
    figures = {}
    for j in far[:SHOWN]:
        figures[f"{T.columns[j]} mean"] = float(st.mean[j])
        figures[f"{T.columns[j]} std"] = float(st.std[j])
    if far.size > SHOWN:
        figures["more unscaled columns"] = int(far.size - SHOWN)
    if spreadable.size >= 2:
        figures[f"largest std ({T.columns[hi]})"] = float(st.std[hi])
        figures[f"smallest std ({T.columns[lo]})"] = float(st.std[lo])
        figures["std ratio across columns"] = spread
    where = (f"columns {_names(T, far)}" if far.size
             else f"columns {_names(T, [hi])} and {_names(T, [lo])} differ in scale by {spread:.3g}x")
    if scaled:
        return Finding("unscaled-inputs", "after scaler.transform(X), " + where, figures,
                       "the scaler leaves these columns unscaled: fit it on all the quantity columns of X[train_index] "
                       "(e.g. sklearn.preprocessing.StandardScaler) and transform both splits with it")
    return Finding("unscaled-inputs", where, figures, "split first, then fit sklearn.preprocessing.StandardScaler on "
                   "the training split only and transform both splits with it (to check that pipeline: "
                   "stabilize.audit(X_raw, y, train_index=..., scaler=fitted_scaler))")


def _huge_targets(Y: Table, limit: float, what: str) -> Finding | None:
    cols = [j for j, f in enumerate(Y.float_dtype) if f]
    vals = Y.values[:, cols]
    finite = vals[np.isfinite(vals)]
    rms = float(np.sqrt(np.mean(finite**2))) if finite.size else 0.0
    if rms <= limit:
        return None
    return Finding("huge-targets", what, {"target RMS": rms, "initial MSE ~": rms**2, "max |y|": float(np.abs(finite).max())},
                   "scale the targets (StandardScaler on y, inverse-transform the predictions), "
                   "or clip gradients: StabilityTrainer(clip_norm=1.0)")


def _labels(Y: Table, y, K: int, ignore_index, what: str) -> list[Finding]:
    v = Y.values
    if Y.n_columns not in (1, K):
        return [Finding("bad-labels", what, {"target columns": Y.n_columns, "num_classes": K},
                        f"pass class indices (one column, 0..{K - 1}) or one-hot rows ({K} columns), or correct num_classes")]
    if Y.n_columns == K and K > 1:  # one-hot rows or class probabilities
        bad = np.flatnonzero((np.isfinite(v) & ((v < 0) | (v > 1))).any(axis=1))
        if not bad.size:
            return []
        return [Finding("bad-labels", f"{what} at rows {_rows(Y, bad)}",
                        {"rows": [Y.row(i) for i in bad[:ROWS_SHOWN]], "bad rows": f"{bad.size} of {Y.n_rows}",
                         "min": float(np.nanmin(np.where(np.isfinite(v), v, np.nan))),
                         "max": float(np.nanmax(np.where(np.isfinite(v), v, np.nan)))},
                        "one-hot or probability targets must lie in [0, 1]; fix these rows, or drop only these rows")]
    c = v[:, 0]
    used = np.isfinite(c) & ((c != ignore_index) if ignore_index is not None else True)
    whole = c == np.round(c)
    bad = np.flatnonzero(used & (~whole | (c < 0) | (c >= K)))
    out = []
    if bad.size:
        lo, hi = float(c[used].min()), float(c[used].max())
        figures = {"rows": [Y.row(i) for i in bad[:ROWS_SHOWN]], "bad labels": f"{bad.size} of {Y.n_rows}",
                   "values": sorted({int(x) if x == round(x) else float(x) for x in c[bad][:100]})[:SHOWN], "label min": lo, "label max": hi, "num_classes": K}
        if np.all(whole[used]) and lo >= 1 and hi == K:
            advice = f"the labels run 1..{K}: they look 1-based; use y - 1 (class indices run 0..{K - 1})"
        elif np.all(whole[used]) and lo >= 0:
            advice = (f"labels reach {hi:g} but num_classes={K}: if those classes are real, give the model {int(hi) + 1} "
                      f"outputs (num_classes={int(hi) + 1}); otherwise fix or drop only these {bad.size} rows")
        else:
            advice = (f"class labels must be whole numbers in 0..{K - 1}; re-encode them (sklearn's LabelEncoder), or fix "
                      f"or drop only these {bad.size} rows"
                      + ("; labels that mark rows to skip: pass ignore_index= (torch's cross_entropy skips -100)"
                         if (c[used] < 0).any() else ""))
        out.append(Finding("bad-labels", f"{what} at rows {_rows(Y, bad)}", figures, advice))
    elif Y.float_dtype[0]:
        out.append(Finding("label-dtype", what, {"dtype": str(getattr(y, "dtype", "float"))},
                           "class indices should be integers: y.astype('int64'). torch's cross_entropy and nll_loss "
                           "reject float class indices ('expected scalar type Long'), and Keras casts them silently"))
    return out


# -- the scaler ---------------------------------------------------------------------
def _check_scaler(scaler, X, T: Table, train_index):
    """Return ``(finding or None, scaler.transform(X) as float64)``."""
    if train_index is None:
        raise ValueError("audit: pass train_index (the training rows) to check the scaler for leakage")
    if not hasattr(scaler, "transform"):
        raise TypeError(f"audit: scaler must be a fitted transformer with .transform (e.g. sklearn's StandardScaler), "
                        f"got {type(scaler).__name__}")
    train = row_positions(train_index, T)
    n_in = getattr(scaler, "n_features_in_", None)
    if n_in is not None and n_in != T.n_columns:
        raise ValueError(f"audit: the scaler was fitted on {n_in} columns but X has {T.n_columns}; pass the raw X the "
                         "scaler was fitted on (the audit applies scaler.transform itself)")
    pd = sys.modules.get("pandas")
    raw = np.where(np.isinf(T.values), np.nan, T.values)  # sklearn rejects inf; those cells are reported already
    frame = pd is not None and hasattr(scaler, "feature_names_in_")  # give it the names it was fitted with
    if frame:
        is_df = isinstance(X, pd.DataFrame)
        inp = pd.DataFrame(raw, columns=X.columns if is_df else scaler.feature_names_in_, index=X.index if is_df else None)
    else:
        inp = raw
    rows_of = (lambda a, r: a.iloc[r]) if frame else (lambda a, r: a[r])
    as_array = lambda a: np.asarray(a.toarray() if hasattr(a, "toarray") else a, dtype=np.float64)
    try:
        scaled = as_array(scaler.transform(inp))
    except Exception as exc:  # re-raised with what to pass
        raise ValueError(f"audit: scaler.transform(X) failed ({exc}); pass the raw X the scaler was fitted on") from exc
    seen = getattr(scaler, "n_samples_seen_", None)
    seen = None if seen is None else int(np.max(seen))
    figures = {"scaler rows seen": seen, "training rows": len(train)} if seen is not None else {"training rows": len(train)}
    close = lambda a, b: a.shape == b.shape and np.allclose(a, b, rtol=1e-6, atol=1e-6, equal_nan=True)
    try:
        from sklearn.base import clone

        train_fit = as_array(clone(scaler).fit(rows_of(inp, train)).transform(inp))
        all_fit = as_array(clone(scaler).fit(inp).transform(inp))
    except Exception:  # not an sklearn estimator: compare its mean with the training rows' mean
        train_fit = all_fit = None
    n_train = len(train)
    with np.errstate(all="ignore"):
        train_mean, all_mean = np.nanmean(raw[train], axis=0), np.nanmean(raw, axis=0)
    if train_fit is not None:
        if not close(scaled, raw) and (close(train_fit, raw) or close(all_fit, raw)):
            raise ValueError("audit: X looks already scaled (a scaler refitted on it leaves it unchanged, while `scaler` "
                             "changes it); pass the raw X: the audit applies scaler.transform(X) itself")
        if close(scaled, train_fit):
            return None, scaled
        figures["max |scaler(X) - train-only scaler(X)|"] = float(np.nanmax(np.abs(scaled - train_fit)))
        on_all = close(scaled, all_fit)
    elif hasattr(scaler, "mean_"):
        mean = np.asarray(scaler.mean_, dtype=np.float64)
        if not (seen is not None and seen > n_train) and np.allclose(mean, train_mean, rtol=1e-9, atol=1e-12):
            return None, scaled
        on_all = np.allclose(mean, all_mean, rtol=1e-9, atol=1e-12)
    elif seen is not None:
        if seen <= n_train:
            return None, scaled
        on_all = seen == T.n_rows
    else:
        raise TypeError(f"audit: cannot check this {type(scaler).__name__} for leakage: it is not a scikit-learn "
                        "estimator and has neither mean_ nor n_samples_seen_")
    if hasattr(scaler, "mean_"):
        with np.errstate(all="ignore"):
            figures["|scaler mean - train mean| max"] = float(np.nanmax(np.abs(scaler.mean_ - train_mean)))
            figures["|scaler mean - all-rows mean| max"] = float(np.nanmax(np.abs(scaler.mean_ - all_mean)))
    if (seen is not None and seen > n_train) or on_all:
        fitted = f"{seen} rows" if seen is not None else f"all {T.n_rows} rows"
        return Finding("leakage", f"scaler (fitted on {fitted}, not only the {n_train} training rows)", figures,
                       "split first; fit the scaler on X[train_index] only, then transform both splits with it"), scaled
    return Finding("scaler-mismatch", f"scaler (not fitted on the {n_train} training rows given)", figures,
                   "fit the scaler on X[train_index] (the raw rows), and pass that same X and train_index here"), scaled


def audit(X, y=None, *, train_index=None, scaler=None, num_classes: int | None = None, ignore_index: int | None = None,
          scale_limit: float = SCALE_LIMIT, target_limit: float = TARGET_LIMIT, max_batches: int = 100) -> AuditReport:
    """Audit inputs (and targets) before training.

    Which ``X``: without ``scaler``, ``X`` is what the model sees, and its scale
    is checked as it is. With ``scaler``, ``X`` is the **raw** data, the very
    array the scaler was fitted on (rows ``X[train_index]``) and will transform:
    the audit checks that the scaler was fitted on the training rows only, and
    checks the scale of ``scaler.transform(X)``, which is what the model sees.
    So a correct pipeline (split, fit on the training rows, transform) gets a
    clean report. An ``X`` that is already scaled raises a ``ValueError``.

    Rows are named as the dataset names them: a DataFrame's index labels, a
    ``torch`` ``Subset``'s indices, dataset item numbers for a ``DataLoader``
    (re-read in dataset order, without shuffling), positions in the order a
    ``tf.data.Dataset`` yields them.

    Args:
        X: a numpy array, a pandas DataFrame, a dict of arrays (the unscaled-inputs scenario's
            ``{'input1', 'input2'}``), a tensor, or a DataLoader / ``tf.data.Dataset``
            of ``(x, y)`` batches (with ``y=None``; the first ``max_batches`` are read).
        y: the targets (an array, a tensor, a pandas Series or DataFrame).
        train_index: the training rows (positions, a boolean mask, or a DataFrame's
            index labels as a pandas Index); needed with ``scaler``.
        scaler: a fitted scaler (any scikit-learn transformer; others need
            ``mean_`` or ``n_samples_seen_``), checked for leakage.
        num_classes: ``y`` holds class labels for this many classes (indices, or
            one-hot rows): checks their range and dtype instead of their scale.
        ignore_index: a label value that marks rows the loss skips (torch's -100).
        scale_limit: a float feature with ``|mean|`` or std above this is unscaled.
        target_limit: float targets with RMS above this make MSE and its gradient explode.

    Returns:
        An :class:`AuditReport`; ``report.ok`` when there is no finding.

    Raises:
        ValueError: no rows or no columns, inputs and targets of different lengths,
            a bad ``train_index``, an already scaled ``X``, a bad ``num_classes``.
        TypeError: a non-numeric column (named in the message).

    Example:
        >>> import numpy as np, stabilize
        >>> X = np.column_stack([np.linspace(0, 1e4, 50), np.linspace(0, 1, 50)])
        >>> sorted(stabilize.audit(X).kinds())
        ['unscaled-inputs']
    """
    rows = None
    if is_batches(X, y):
        X, y, rows = take_batches(X, max_batches)
    T = as_table(X, "input")
    if rows is not None:
        T.rows = rows
    if T.n_rows == 0:
        raise ValueError("audit: X has 0 rows: there is nothing to audit (an empty file, or a split or filter that kept no rows)")
    if T.n_columns == 0:
        raise ValueError("audit: X has 0 columns: there is nothing to audit (were all its columns non-numeric, "
                         "or the target the only column?)")
    Y = None if y is None else as_table(y, "target")
    if Y is not None and Y.n_rows != T.n_rows:
        raise ValueError(f"audit: inputs have {T.n_rows} rows but the targets have {Y.n_rows}")
    if Y is not None and Y.rows is None:
        Y.rows = T.rows
    what_y = (f"target {Y.columns[0]!r}" if Y.named and Y.n_columns == 1 else "targets") if Y is not None else ""
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"audit: num_classes must be a positive integer, got {num_classes!r}")
        if Y is None:
            raise ValueError("audit: num_classes checks the labels: pass them as y")

    checks = (_nonfinite(T, "inputs"), None if Y is None else _nonfinite(Y, what_y), _constant(T))
    findings = [f for f in checks if f]
    leak, scaled = _check_scaler(scaler, X, T, train_index) if scaler is not None else (None, None)
    shown = T if scaled is None else output_table(scaler, scaled, T)
    findings += [f for f in [_unscaled(shown, scale_limit, scaled is not None)] if f]
    if Y is not None and num_classes is None:
        findings += [f for f in [_huge_targets(Y, target_limit, what_y or "y")] if f]
    if num_classes is not None:
        findings += _labels(Y, y, int(num_classes), ignore_index, what_y)
    if leak:
        findings.append(leak)

    notes = []
    skipped = [j for j, k in enumerate(T.kinds) if k != "float"]
    if skipped and len(skipped) == T.n_columns > 1:
        notes.append(f"no column is scale-checked: all {T.n_columns} are integer, boolean or categorical (ids, token "
                     "ids, codes, flags); cast quantities stored as integers to float to have them checked")
    elif skipped:
        notes.append(f"not scale-checked (integer, boolean or categorical: ids, token ids, codes, flags): "
                     f"{_names(T, skipped)}; embed or one-hot ids and codes; cast a quantity stored as integers to "
                     "float to have it checked")
    return AuditReport(findings, T.n_rows, T.columns, notes)
