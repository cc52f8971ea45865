import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "jobs"))


def test_results_table_groups_by_protocol_and_student_and_averages_seeds(tmp_path):
    import results

    folder = tmp_path / "run" / "results" / "k1"
    folder.mkdir(parents=True)
    base = {"protocol": "rded", "teacher": "convnet3", "student": "convnet3", "teacher_top1": 0.9, "epochs": 10}
    rows = [dict(base, method="ddoq", weights="mass", ipc=10, seed=s, top1=t) for s, t in [(0, 0.80), (1, 0.90)]]
    rows += [dict(base, method="random", weights="none", ipc=10, seed=0, top1=0.5),
             dict(base, protocol="hard", teacher="none", teacher_top1=None, method="random", weights="none", ipc=1,
                  seed=0, top1=0.3)]
    for i, row in enumerate(rows):
        (folder / f"{i}.json").write_text(json.dumps(row))
    text = results.tables(results.load_rows([tmp_path / "run"]))
    assert "| ddoq | mass | 10 | 85.0 ± 5.0 (2) | +35.0 | – | – |" in text  # one random seed: no p; no full: no LRS
    assert "| random | – | 10 | 50.0 ± – (1) | – | – | – |" in text
    assert "protocol `hard`, teacher `none`" in text and "no teacher" in text
    assert text.index("| random |") < text.index("| ddoq |")  # methods in a fixed order


def test_cross_architecture_table_has_a_cell_per_teacher_and_student(tmp_path):
    import results

    folder = tmp_path / "run" / "results" / "k1"
    folder.mkdir(parents=True)
    base = {"protocol": "rded", "teacher_top1": 0.9, "epochs": 10, "method": "ddoq", "weights": "mass", "ipc": 10}
    pairs = {("convnet3", "convnet3"): 0.8, ("convnet3", "resnet18"): 0.6, ("resnet18", "convnet3"): 0.7}
    for i, ((teacher, student), top1) in enumerate(pairs.items()):
        row = dict(base, teacher=teacher, student=student, seed=0, top1=top1)
        (folder / f"{i}.json").write_text(json.dumps(row))
    (folder / "single.json").write_text(json.dumps(dict(base, ipc=1, teacher="convnet3", student="convnet3", seed=0,
                                                        top1=0.5)))
    text = results.cross_architecture(results.load_rows([tmp_path / "run"]))
    assert "ddoq (mass), IPC 10" in text and "IPC 1:" not in text  # one pairing only: no table
    assert "| teacher | convnet3 | resnet18 |" in text
    assert "| convnet3 | 80.0 ± – (1) | 60.0 ± – (1) |" in text  # no random under these pairings: no Δ
    assert "| resnet18 | 70.0 ± – (1) | – |" in text


def write_rows(folder, rows):
    folder.mkdir(parents=True)
    for i, row in enumerate(rows):
        (folder / f"{i}.json").write_text(json.dumps(row))


BASE = {"protocol": "rded", "teacher": "convnet3", "student": "convnet3", "teacher_top1": 0.9, "epochs": 10}


def test_results_table_shows_the_difference_to_random_its_p_value_and_lrs(tmp_path):
    import results
    from scipy.stats import ttest_ind

    from engine.report.stats import label_robust_score

    ddoq, random, full = [0.71, 0.73, 0.72], [0.65, 0.66, 0.70], [0.95, 0.97]
    rows = [dict(BASE, method="ddoq", weights="mass", ipc=10, seed=s, top1=t) for s, t in enumerate(ddoq)]
    rows += [dict(BASE, method="random", weights="none", ipc=10, seed=s, top1=t) for s, t in enumerate(random)]
    rows += [dict(BASE, method="full", weights="none", ipc=0, seed=s, top1=t) for s, t in enumerate(full)]
    rows += [dict(BASE, method="d4m", weights="uniform", ipc=1, seed=0, top1=0.4)]  # no random at IPC 1
    # random under another student is never the reference of the convnet3 rows
    rows += [dict(BASE, student="resnet18", method="random", weights="none", ipc=1, seed=0, top1=0.1)]
    write_rows(tmp_path / "run" / "results" / "k1", rows)
    text = results.tables(results.load_rows([tmp_path / "run"]))
    assert "| method | weights | IPC | top-1 % | Δ random | p | LRS |" in text
    p = ttest_ind(ddoq, random, equal_var=False).pvalue  # 0.067
    lrs = label_robust_score(0.72, 0.67, 0.96)
    assert f"| ddoq | mass | 10 | 72.0 ± 0.8 (3) | +5.0 | {p:.3f} | {lrs:.3f} |" in text
    assert f"| random | – | 10 | 67.0 ± 2.2 (3) | – | – | {label_robust_score(0.67, 0.67, 0.96):.3f} |" in text
    assert "| d4m | uniform | 1 | 40.0 ± – (1) | – | – | – |" in text  # random missing: dashes, no error
    assert "| full train split | – | all | 96.0 ± 1.0 (2) | – | – | – |" in text
    assert text.index("| d4m | uniform | 1 |") < text.index("| random | – | 10 |") < text.index("| ddoq | mass | 10 |")
    assert "Welch" in text  # the legend


def test_results_table_without_random_shows_dashes(tmp_path):
    import results

    rows = [dict(BASE, method="ddoq", weights="mass", ipc=10, seed=s, top1=t) for s, t in [(0, 0.80), (1, 0.90)]]
    rows += [dict(BASE, method="full", weights="none", ipc=0, seed=0, top1=0.99)]
    write_rows(tmp_path / "run" / "results" / "k1", rows)
    text = results.tables(results.load_rows([tmp_path / "run"]))
    assert "| ddoq | mass | 10 | 85.0 ± 5.0 (2) | – | – | – |" in text


def test_cross_architecture_cells_compare_with_random_under_the_same_pairing(tmp_path):
    import results

    rows = []
    for teacher, student, syn, rnd in [("convnet3", "convnet3", 0.8, 0.7), ("convnet3", "resnet18", 0.6, 0.65)]:
        rows += [dict(BASE, teacher=teacher, student=student, method="d4m", weights="uniform", ipc=10, seed=s,
                      top1=syn + d) for s, d in enumerate([-0.01, 0.01])]
        rows += [dict(BASE, teacher=teacher, student=student, method="random", weights="none", ipc=10, seed=s,
                      top1=rnd + d) for s, d in enumerate([-0.01, 0.01])]
    write_rows(tmp_path / "run" / "results" / "k1", rows)
    text = results.cross_architecture(results.load_rows([tmp_path / "run"]))
    line = next(t for t in text.splitlines() if t.startswith("| convnet3 |") and "Δ" in t)
    assert "80.0 ± 1.0 (2); Δ random +10.0 (p " in line and "60.0 ± 1.0 (2); Δ random -5.0 (p " in line


def test_validation_curves_average_the_seeds_report_by_report_and_name_the_peak(tmp_path):
    import results

    curve = lambda *values: [[10 * (i + 1), v] for i, v in enumerate(values)]  # noqa: E731
    rows = [dict(BASE, method="ddoq", weights="mass", ipc=10, seed=0, top1=0.7, val_curve=curve(0.5, 0.8, 0.6)),
            dict(BASE, method="ddoq", weights="mass", ipc=10, seed=1, top1=0.7, val_curve=curve(0.7, 0.6, 0.6)),
            dict(BASE, method="random", weights="none", ipc=10, seed=0, top1=0.7, val_curve=curve(0.1, 0.2, 0.3)),
            dict(BASE, method="random", weights="none", ipc=1, seed=0, top1=0.7)]  # a row from before the curves
    write_rows(tmp_path / "run" / "results" / "k1", rows)
    text = results.validation_curves(results.load_rows([tmp_path / "run"]))
    assert "| ddoq | mass | 10 | 2 | 60.0 (10) → 70.0 (20) → 60.0 (30) | report 2 of 3 |" in text
    assert "| random | – | 10 | 1 | 10.0 (10) → 20.0 (20) → 30.0 (30) | report 3 of 3 |" in text
    assert "| random | – | 1 |" not in text  # no curve, no row
    assert text.index("| random |") < text.index("| ddoq |")


def test_a_learning_rate_grid_prints_the_fixed_and_the_selected_tables(tmp_path, capsys):
    import results

    folder = tmp_path / "run" / "results" / "k1"
    folder.mkdir(parents=True)
    base = {"protocol": "hard", "teacher": "none", "student": "convnet3", "teacher_top1": None, "epochs": 300,
            "ipc": 10}
    rows = [dict(base, method=m, weights=w, seed=s, learning_rate=r, val_top1=v, top1=t)
            for m, w in (("random", "none"), ("ddoq", "mass")) for s in (0, 1)
            for r, v, t in ((0.01, 0.6, 0.61), (0.03, 0.7 if m == "ddoq" else 0.5, 0.75))]
    for i, row in enumerate(rows):
        (folder / f"{i}.json").write_text(json.dumps(row))
    results.main([str(tmp_path / "run")])
    out = capsys.readouterr().out
    fixed, selected = out.split("## Selected")
    assert "## Fixed" in fixed and "| ddoq | mass | 10 | 61.0 ± 0.0 (2) | +0.0 |" in fixed
    assert "| ddoq | mass | 10 | 75.0 ± 0.0 (2) | +14.0 |" in selected  # ddoq at 0.03, random at 0.01
    assert "ddoq/mass/IPC 10: 0.03" in selected and "random/none/IPC 10: 0.01" in selected


def test_pooled_runs_add_their_seeds_and_refuse_a_student_trained_twice(tmp_path, capsys):
    """--pool: seeds 3 and 4 trained in a second run of the same config join the first run's 0-2 in one row per
    set; two runs holding the same seed (e.g. the latent and the noise space) are refused, not averaged."""
    import pytest
    import results
    from scipy.stats import ttest_ind

    ddoq, random = [0.71, 0.73, 0.72, 0.74, 0.70], [0.65, 0.66, 0.70, 0.64, 0.68]
    for run, seeds in (("first", range(3)), ("more", range(3, 5))):
        rows = [dict(BASE, method=m, weights=w, ipc=10, seed=s, top1=top1[s])
                for m, w, top1 in (("ddoq", "mass", ddoq), ("random", "none", random)) for s in seeds]
        write_rows(tmp_path / run / "results" / "k1", rows)
    results.main([str(tmp_path / "first"), str(tmp_path / "more"), "--pool"])
    text = capsys.readouterr().out
    p = ttest_ind(ddoq, random, equal_var=False).pvalue
    assert "### first+more: protocol `rded`" in text
    assert f"| ddoq | mass | 10 | 72.0 ± 1.4 (5) | +5.4 | {p:.3f} |" in text
    results.main([str(tmp_path / "first"), str(tmp_path / "more")])  # without --pool: each run on its own
    assert "(3) |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="seed 0 is in first and twin"):
        write_rows(tmp_path / "twin" / "results" / "k1", [dict(BASE, method="ddoq", weights="mass", ipc=10, seed=0,
                                                               top1=0.9)])
        results.main([str(tmp_path / "first"), str(tmp_path / "twin"), "--pool"])
    with pytest.raises(SystemExit, match="different epochs"):
        write_rows(tmp_path / "longer" / "results" / "k1", [dict(BASE, method="ddoq", weights="mass", ipc=10,
                                                                 seed=9, top1=0.9, epochs=20)])
        results.main([str(tmp_path / "first"), str(tmp_path / "longer"), "--pool"])


def test_pooled_runs_of_both_spaces_name_the_noise_sets_and_count_a_shared_random_student_once(tmp_path, capsys):
    """A latent and a noise-space run of one config: their ddoq sets are two rows, their `random` students (the same
    subsets and seeds, trained alike) one; a `random` student whose copies scored differently is refused."""
    import pandas as pd
    import pytest
    import results

    random = [0.60, 0.64, 0.62]
    for run, space, ddoq in (("latent", "latent", [0.70, 0.71, 0.72]), ("noise", "noise", [0.66, 0.67, 0.68])):
        rows = [dict(BASE, method=m, weights=w, ipc=10, seed=s, top1=top1[s])
                for m, w, top1 in (("ddoq", "mass", ddoq), ("random", "none", random)) for s in range(3)]
        write_rows(tmp_path / run / "results" / "k1", rows)
        (tmp_path / run / "config.yaml").write_text(f"quantize:\n  space: {space}\n")
    results.main([str(tmp_path / "latent"), str(tmp_path / "noise"), "--pool", "--csv", str(tmp_path / "rows.csv")])
    text = capsys.readouterr().out
    rows = pd.read_csv(tmp_path / "rows.csv")  # every run's own rows, before pooling
    assert len(rows) == 12 and set(rows.run) == {"latent", "noise"}
    assert set(rows[rows.method == "ddoq (noise)"].space) == {"noise"} and rows[rows.method == "random"].space.isna().all()
    assert "| random | – | 10 | 62.0 ± 1.6 (3) |" in text
    assert "| ddoq | mass | 10 | 71.0 ± 0.8 (3) | +9.0 |" in text
    assert "| ddoq (noise) | mass | 10 | 67.0 ± 0.8 (3) | +5.0 |" in text
    assert text.index("| ddoq | mass") < text.index("| ddoq (noise)")
    write_rows(tmp_path / "other" / "results" / "k1", [dict(BASE, method="random", weights="none", ipc=10, seed=0,
                                                            top1=0.5)])
    with pytest.raises(SystemExit, match="seed 0 is in latent and other"):
        results.main([str(tmp_path / "latent"), str(tmp_path / "other"), "--pool"])
