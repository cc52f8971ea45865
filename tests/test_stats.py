"""engine/report/stats.py: Welch's t-test and DD-Ranking's LRS on fixed numbers, and the comparison with `random` that
every results table shows (the end-of-run table, jobs/results.py, report.html)."""

import math
import sys
from pathlib import Path

import pandas as pd
import pytest

from engine.report.stats import compare_to_random, format_p, label_robust_score, welch_t_test

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))

A, B = [0.71, 0.73, 0.72], [0.65, 0.66, 0.70]


def test_welch_t_test_by_hand_and_against_scipy():
    # By hand: mean a = 0.72, s_a² = (0.01² + 0.01² + 0)/2 = 1e-4; mean b = 0.67, s_b² = (0.02² + 0.01² + 0.03²)/2
    # = 7e-4. se² = 1e-4/3 + 7e-4/3 = 8e-4/3, t = 0.05 / sqrt(8e-4/3) = 0.05 · sqrt(3750) = 3.0619;
    # df = (8e-4/3)² / ((1e-4/3)²/2 + (7e-4/3)²/2) = 6.4e-7 / ((1e-8 + 4.9e-7)/2) = 2.56.
    t, df, p = welch_t_test(A, B)
    assert t == pytest.approx(0.05 * math.sqrt(3750), rel=1e-9)
    assert df == pytest.approx(2.56, rel=1e-9)
    from scipy.stats import ttest_ind

    reference = ttest_ind(A, B, equal_var=False)
    assert (t, df, p) == pytest.approx((reference.statistic, reference.df, reference.pvalue), rel=1e-9)
    assert p == pytest.approx(0.0675, abs=1e-4)
    t2, _, p2 = welch_t_test(B, A)  # two-sided: symmetric
    assert t2 == pytest.approx(-t) and p2 == pytest.approx(p)


def test_welch_p_value_with_two_degrees_of_freedom_in_closed_form():
    # a = [1, 3], b = [0, 2]: s² = 2 each, se² = 1 + 1, t = 1/sqrt(2), df = 2² / (1²/1 + 1²/1) = 2; the Student-t
    # tail with 2 degrees of freedom is closed-form: two-sided p = 1 - t / sqrt(2 + t²) = 1 - sqrt(0.2).
    t, df, p = welch_t_test([1.0, 3.0], [0.0, 2.0])
    assert t == pytest.approx(1 / math.sqrt(2)) and df == pytest.approx(2.0)
    assert p == pytest.approx(1 - math.sqrt(0.2), rel=1e-9)


def test_welch_t_test_edge_cases():
    assert all(math.isnan(v) for v in welch_t_test([0.7], B))  # one seed: no test
    assert all(math.isnan(v) for v in welch_t_test(A, []))
    assert all(math.isnan(v) for v in welch_t_test([0.5, 0.5], [0.5, 0.5, 0.5]))  # nothing varies, nothing differs
    t, df, p = welch_t_test([0.6, 0.6], [0.5, 0.5])  # no variance but different means: an exact difference
    assert t == math.inf and math.isnan(df) and p == 0.0
    assert math.isnan(welch_t_test([0.1 + 0.2] * 3, [0.3] * 3)[2])  # float rounding of equal values: no difference
    t, df, p = welch_t_test([0.6, 0.6, 0.6], B)  # one side constant: df = n_b - 1
    assert df == pytest.approx(2.0) and 0 < p < 1


def test_label_robust_score():
    e = math.e
    assert label_robust_score(0.5, 0.5, 0.5) == pytest.approx((1 - 1 / e) / (e - 1 / e))  # alpha = 0
    assert label_robust_score(0.5, 0.5, 0.5) == pytest.approx(0.26894, abs=1e-5)
    # syn = 1, random = 0, full = 1: alpha = 1/2 · 1 - 1/2 · 0 = 0.5
    assert label_robust_score(1.0, 0.0, 1.0) == pytest.approx((math.exp(0.5) - 1 / e) / (e - 1 / e))
    assert label_robust_score(1.0, 0.0, 1.0) == pytest.approx(0.544946, abs=1e-6)
    assert label_robust_score(1.0, 0.0, 0.0) == pytest.approx(1.0)  # alpha = 1: the top
    assert label_robust_score(0.0, 1.0, 1.0) == pytest.approx(0.0)  # alpha = -1: the bottom
    assert math.isnan(label_robust_score(0.7, None, 0.9)) and math.isnan(label_robust_score(0.7, 0.6, math.nan))


def rows(method, weights, ipc, values, **context):
    base = {"protocol": "rded", "teacher": "convnet3", "student": "convnet3"}
    return [dict(base, method=method, weights=weights, ipc=ipc, seed=s, top1=v, **context) for s, v in enumerate(values)]


def test_compare_to_random_matches_protocol_student_and_ipc():
    frame = pd.DataFrame(rows("ddoq", "mass", 10, A) + rows("random", "none", 10, B) + rows("full", "none", 0, [0.9])
                         + rows("ddoq", "mass", 10, [0.5, 0.6], student="resnet18")  # no random for resnet18
                         + rows("random", "none", 1, [0.3, 0.4]))  # random at another IPC is never the reference
    summary = compare_to_random(frame).set_index(["student", "method", "ipc"])
    ddoq = summary.loc[("convnet3", "ddoq", 10)]
    assert ddoq.seeds == 3 and ddoq["mean"] == pytest.approx(72.0) and ddoq["delta"] == pytest.approx(5.0)
    assert ddoq.p == pytest.approx(welch_t_test(A, B)[2])
    assert ddoq.lrs == pytest.approx(label_robust_score(0.72, 0.67, 0.9))
    other = summary.loc[("resnet18", "ddoq", 10)]
    assert math.isnan(other["delta"]) and math.isnan(other.p) and math.isnan(other.lrs)
    random = summary.loc[("convnet3", "random", 10)]
    assert math.isnan(random["delta"]) and random.lrs == pytest.approx(label_robust_score(0.67, 0.67, 0.9))
    full = summary.loc[("convnet3", "full", 0)]
    assert math.isnan(full["std"]) and math.isnan(full.lrs)  # one seed: no std
    assert compare_to_random(pd.DataFrame(columns=["method", "weights", "ipc", "top1"])).empty


def test_format_p():
    assert format_p(math.nan) == "–" and format_p(0.0) == "<0.001" and format_p(0.0675) == "0.068"


def test_end_of_run_table_shows_difference_p_and_lrs():
    import distill

    results = (rows("ddoq", "mass", 10, A) + rows("random", "none", 10, B) + rows("full", "none", 0, [0.9])
               + rows("d4m", "uniform", 1, [0.4, 0.5]))
    text = distill.format_table({"results": results, "quantization": {}, "timings_s": {}})
    header, *lines = text.splitlines()
    assert "top1 last (mean ± std)" in header and "Δ random" in header and "LRS" in header
    ddoq = next(line for line in lines if line.split()[:2] == ["rded", "convnet3"] and "ddoq" in line)
    p, lrs = welch_t_test(A, B)[2], label_robust_score(0.72, 0.67, 0.9)
    assert ddoq.split()[-4:] == ["3", "+5.0", f"{p:.3f}", f"{lrs:.3f}"]
    d4m = next(line for line in lines if "d4m" in line)
    assert d4m.split()[-3:] == ["–", "–", "–"]  # no random at IPC 1
    full = next(line for line in lines if " full " in line)
    assert "90.0 ±    –     1" in full
    assert distill.format_table({"results": [], "quantization": {}, "timings_s": {}}).startswith("protocol")


def test_report_table_shows_difference_p_and_lrs():
    from engine.report.run_report import results_table

    frame = pd.DataFrame(rows("ddoq", "mass", 10, A) + rows("random", "none", 10, B) + rows("full", "none", 0, [0.9]))
    table = results_table(frame).set_index(["method", "ipc"])
    assert "student" not in table and "protocol" not in table  # one protocol and student: no columns for them
    assert table.loc[("ddoq", "10"), "Δ random (points)"] == "+5.0"
    assert table.loc[("ddoq", "10"), "p (Welch)"] == f"{welch_t_test(A, B)[2]:.3f}"
    assert table.loc[("ddoq", "10"), "LRS"] == f"{label_robust_score(0.72, 0.67, 0.9):.3f}"
    assert table.loc[("full", "all"), "Δ random (points)"] == "–"
    two = results_table(pd.concat([frame, frame.assign(student="resnet18")]))
    assert "student" in two and len(two) == 6
    no_random = results_table(frame[frame.method != "random"]).set_index("method")
    assert (no_random.loc["ddoq", ["Δ random (points)", "p (Welch)", "LRS"]] == "–").all()


def test_a_grid_of_learning_rates_is_chosen_on_validation_never_on_test():
    """Per set, the rate with the best mean val_top1 wins even where another rate scores higher on test; the fixed
    view keeps the protocol's own rate (hard: 0.01); summaries compare at the selected rate."""
    import pandas as pd

    from engine.report.stats import compare_to_random, rows_at_learning_rate

    rows = []
    for method, rates in (("random", {0.01: (0.70, 0.60), 0.1: (0.60, 0.65)}),
                          ("ddoq", {0.01: (0.72, 0.75), 0.1: (0.80, 0.70)})):
        for rate, (val, test) in rates.items():
            for seed in (0, 1):
                rows.append({"protocol": "hard", "teacher": "none", "student": "convnet3", "method": method,
                             "weights": "mass" if method == "ddoq" else "none", "ipc": 10, "seed": seed,
                             "learning_rate": rate, "val_top1": val + 0.001 * seed, "top1": test + 0.001 * seed})
    frame = pd.DataFrame(rows)
    chosen = rows_at_learning_rate(frame, "selected")
    assert dict(chosen.groupby("method").learning_rate.first()) == {"ddoq": 0.1, "random": 0.01}
    fixed = rows_at_learning_rate(frame, "protocol")
    assert set(fixed.learning_rate) == {0.01} and len(fixed) == 4
    summary = compare_to_random(frame).set_index("method")
    assert summary.loc["ddoq", "mean"] == pytest.approx(70.05) and summary.loc["random", "mean"] == pytest.approx(60.05)
    assert rows_at_learning_rate(frame.drop(columns="learning_rate"), "selected").equals(frame.drop(columns="learning_rate"))
