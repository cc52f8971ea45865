"""Whether a set beats `random`: the statistics every results table shows, written once (pure: numpy, pandas, and
scipy for the Student-t tail; no Ray).

Per (set, IPC) under one protocol, teacher and student: top-1 mean ± std over seeds (population std, as the tables
always had), the difference to `random` at the same IPC under the same protocol, teacher and student (top-1
points), Welch's t-test of the two sets of seeds, and DD-Ranking's label-robust score (LRS, Li et al. 2025,
arXiv 2505.13300) from the mean top-1 fractions of the set, of `random` and of `full`:

    alpha = 1/2 (syn - random) - 1/2 (full - syn),   LRS = (e^alpha - e^-1) / (e - e^-1)   in [0, 1]

(alpha lies in [-1, 1] for fractions; a set equal to both random and full scores (1 - e^-1)/(e - e^-1) ~ 0.269).
Missing inputs are NaN, never an error: one seed (no std, no t-test), no `random` or no `full` row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

CONTEXT = ("protocol", "teacher", "student")  # rows are compared to `random` only under the same ones
DASH = "–"


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float]:
    """Welch's two-sided t-test of mean(a) = mean(b) with unequal variances: (t, df, p).

    t = (mean a - mean b) / sqrt(s_a²/n_a + s_b²/n_b) with sample variances (ddof 1), df by Welch-Satterthwaite:
    (s_a²/n_a + s_b²/n_b)² / ((s_a²/n_a)²/(n_a-1) + (s_b²/n_b)²/(n_b-1)); p = 2 · P(T_df > |t|).
    All NaN when a side has fewer than 2 values. Both sides without variance (every seed the same top-1): all NaN
    when the means are equal too (nothing to test), else t = ±inf, df = NaN and p = 0.0 (the difference is exact,
    not noise; the limit of p as the variances shrink).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return math.nan, math.nan, math.nan
    diff = float(a.mean() - b.mean())
    va, vb = float(a.var(ddof=1)) / na, float(b.var(ddof=1)) / nb
    se2 = va + vb
    scale = max(1.0, abs(float(a.mean())), abs(float(b.mean())))
    if se2 <= (1e-12 * scale) ** 2:  # no variance on either side (up to float rounding of identical values)
        if abs(diff) <= 1e-12 * scale:
            return math.nan, math.nan, math.nan
        return math.copysign(math.inf, diff), math.nan, 0.0
    t = diff / math.sqrt(se2)
    df = se2 ** 2 / (va ** 2 / (na - 1) + vb ** 2 / (nb - 1))
    from scipy.stats import t as student_t  # a pinned dependency (of scikit-learn and POT)

    p = min(1.0, 2.0 * float(student_t.sf(abs(t), df)))
    return t, df, p


def label_robust_score(syn: float | None, random: float | None, full: float | None) -> float:
    """DD-Ranking's LRS from mean top-1 fractions (0..1) of the set, of `random` (same IPC, protocol, student) and
    of `full` (same protocol, student); NaN when any is missing."""
    values = (syn, random, full)
    if any(v is None or not math.isfinite(v) for v in values):
        return math.nan
    alpha = 0.5 * (syn - random) - 0.5 * (full - syn)
    return (math.exp(alpha) - math.exp(-1.0)) / (math.e - math.exp(-1.0))


def rows_at_learning_rate(results: pd.DataFrame, choice: str, context: Sequence[str] = CONTEXT) -> pd.DataFrame:
    """Sets trained at a grid of learning rates (evaluate.learning_rates) have rows at each: `choice` "protocol"
    keeps the rows at their protocol's own rate (the fixed protocol; none for a set whose grid lacks it),
    "selected" those at the rate with the highest mean validation top-1 (`val_top1`) per (context, method,
    weights, ipc): chosen on validation, never on test. Rows without rates come back as they are."""
    from engine.evaluate.protocols import get_protocol

    if "learning_rate" not in results.columns or results.empty:
        return results
    if choice == "protocol":
        own = results.protocol.map(lambda name: get_protocol(name).learning_rate)
        return results[np.isclose(results.learning_rate, own)]
    if choice != "selected":
        raise ValueError(f"learning-rate choice {choice!r} is not protocol or selected")
    keys = [c for c in context if c in results.columns] + ["method", "weights", "ipc"]
    means = results.groupby(keys + ["learning_rate"], dropna=False).val_top1.mean().reset_index()
    best = means.loc[means.groupby(keys, dropna=False).val_top1.idxmax(), keys + ["learning_rate"]]
    return results.merge(best, on=keys + ["learning_rate"])


def compare_to_random(results: pd.DataFrame, context: Sequence[str] = CONTEXT) -> pd.DataFrame:
    """One row per (context..., method, weights, ipc) of result rows {method, weights, ipc, top1 (0..1), ...}, in
    the order they first appear: `seeds`, `mean` and `std` (top-1 points, population std; NaN with one seed),
    `delta` (mean minus random's, points), `p` (Welch, set vs random), `lrs`. Context columns the rows lack are
    ignored; rows are only compared with `random` and `full` of the same context. `random` itself gets no delta or
    p (it is the reference) but its LRS; `full` (no IPC) gets neither. Sets with rows at several learning rates
    are compared at their validation-selected rate (`rows_at_learning_rate`)."""
    if "learning_rate" in results.columns and results.groupby(
            [c for c in context if c in results.columns] + ["method", "weights", "ipc"],
            dropna=False).learning_rate.nunique().max() > 1:
        results = rows_at_learning_rate(results, "selected", context)
    keys = [c for c in context if c in results.columns]
    columns = keys + ["method", "weights", "ipc", "seeds", "mean", "std", "delta", "p", "lrs"]
    if results.empty:
        return pd.DataFrame(columns=columns)
    results = results.assign(weights=results.weights.fillna("none")) if "weights" in results else \
        results.assign(weights="none")
    top1 = {}  # (context..., method, weights, ipc) -> the seeds' top-1 fractions
    for key, part in results.groupby(keys + ["method", "weights", "ipc"], sort=False, dropna=False):
        top1[key] = part.top1.to_numpy(dtype=float)
    runs = {}  # context -> {"random": {ipc: values}, "full": values}
    for key, values in top1.items():
        where, (method, _, ipc) = key[:len(keys)], key[len(keys):]
        if method == "random":
            runs.setdefault(where, {}).setdefault("random", {})[ipc] = values
        elif method == "full":
            runs.setdefault(where, {})["full"] = values
    rows = []
    for key, values in top1.items():
        where, (method, weights, ipc) = key[:len(keys)], key[len(keys):]
        reference = runs.get(where, {})
        random = reference.get("random", {}).get(ipc) if method != "full" else None
        full = reference.get("full")
        delta = p = lrs = math.nan
        if random is not None:
            if method != "random":
                delta = 100 * (values.mean() - random.mean())
                p = welch_t_test(values, random)[2]
            if full is not None:
                lrs = label_robust_score(values.mean(), random.mean(), full.mean())
        rows.append(dict(zip(keys, where), method=method, weights=weights, ipc=ipc, seeds=len(values),
                         mean=100 * values.mean(), std=100 * values.std() if len(values) > 1 else math.nan,
                         delta=delta, p=p, lrs=lrs))
    return pd.DataFrame(rows, columns=columns)


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def format_std(value: float) -> str:
    return DASH if _missing(value) else f"{value:.1f}"


def format_mean_std(mean: float, std: float, seeds: int) -> str:
    """'85.0 ± 5.0 (2)'; one seed: '50.0 ± – (1)'."""
    return f"{mean:.1f} ± {format_std(std)} ({seeds})"


def format_delta(value: float) -> str:
    return DASH if _missing(value) else f"{value:+.1f}"


def format_p(value: float) -> str:
    if _missing(value):
        return DASH
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def format_lrs(value: float) -> str:
    return DASH if _missing(value) else f"{value:.3f}"
