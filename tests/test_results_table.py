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
    assert "| ddoq | mass | 85.0 ± 5.0 (2) |" in text
    assert "| random | – | 50.0 ± 0.0 (1) |" in text
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
    assert "| convnet3 | 80.0 ± 0.0 (1) | 60.0 ± 0.0 (1) |" in text
    assert "| resnet18 | 70.0 ± 0.0 (1) | – |" in text
