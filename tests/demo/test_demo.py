import json

import pytest
from click.testing import CliRunner
from PIL import Image

from npos.cli import cli
from npos.demo import DIGIT_NAMES, ID_DIGITS, write_demo_dataset


def test_demo_dataset_layout_and_reuse(tmp_path):
    folders = write_demo_dataset(tmp_path / "data", noise_images=20)
    train_classes = sorted(p.name for p in folders["train"].iterdir())
    assert train_classes == sorted(DIGIT_NAMES[d] for d in ID_DIGITS)
    n_train = sum(1 for _ in folders["train"].rglob("*.png"))
    n_test = sum(1 for _ in folders["test"].rglob("*.png"))
    n_near = sum(1 for _ in folders["ood-digits"].glob("*.png"))
    assert n_train + n_test + n_near == 1797  # every scikit-learn digit used once
    assert abs(n_test / (n_train + n_test) - 0.3) < 0.01
    assert len(list(folders["ood-noise"].glob("*.png"))) == 20
    img = Image.open(next(folders["test"].rglob("*.png")))
    assert img.size == (32, 32)
    stamp = (tmp_path / "data" / "dataset.json").stat().st_mtime_ns
    write_demo_dataset(tmp_path / "data", noise_images=20)  # same parameters: reused
    assert (tmp_path / "data" / "dataset.json").stat().st_mtime_ns == stamp


def test_demo_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    result = CliRunner().invoke(cli, ["demo", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "is not an npos demo folder" in result.output
    assert (tmp_path / "mine.txt").read_text() == "keep me"


@pytest.mark.slow
def test_demo_end_to_end_and_cache(tmp_path):
    out = tmp_path / "demo"
    runner = CliRunner()
    result = runner.invoke(cli, ["demo", "--out", str(out), "--epochs", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "randomly initialized" in result.output
    assert "[extract] train" in result.output
    for variant in ("zero-shot", "npos", "no-synthesis"):
        metrics = json.loads((out / "reports" / variant / "metrics.json").read_text())
        assert 0.0 <= metrics["id_accuracy"] <= 1.0
        for score, per_set in metrics["scores"].items():
            assert set(per_set) == {"near-ood (digits 6-9)", "far-ood (noise)", "average"}
            for values in per_set.values():
                assert all(0.0 <= values[k] <= 1.0 for k in ("fpr95", "auroc", "aupr_in",
                                                              "aupr_out"))
        assert (out / "reports" / variant / "report.md").exists()
        assert list((out / "reports" / variant / "plots").glob("*.png"))
    assert "head" in json.loads((out / "reports" / "npos" / "metrics.json").read_text())["scores"]
    table = (out / "summary.md").read_text()
    table_lines = [line for line in table.splitlines() if line.startswith("|")]
    assert len(table_lines) == 2 + 2 + 3 + 3  # header, rule, zero-shot x2, heads x3 each
    zero_shot = (out / "reports" / "zero-shot" / "metrics.json").read_text()
    # The second run reuses every cached store and re-extracts nothing.
    again = runner.invoke(cli, ["demo", "--out", str(out), "--epochs", "2", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert again.output.count("[cache]") == 4 and "[extract]" not in again.output
    assert (out / "reports" / "zero-shot" / "metrics.json").read_text() == zero_shot
    # ... and writes its heads and reports to a new run folder, replacing nothing
    assert f"{out / 'run-2'}/summary.md" in again.output
    assert (out / "summary.md").read_text() == table
    for variant in ("zero-shot", "npos", "no-synthesis"):
        assert (out / "run-2" / "reports" / variant / "metrics.json").exists()
    assert (out / "run-2" / "heads" / "npos" / "model.safetensors").exists()
    # with --overwrite the first run's outputs are replaced in place
    head_stamp = (out / "heads" / "npos" / "config.json").stat().st_mtime_ns
    third = runner.invoke(cli, ["demo", "--out", str(out), "--epochs", "1", "--device", "cpu",
                                "--overwrite"])
    assert third.exit_code == 0, third.output
    assert not (out / "run-3").exists()
    assert (out / "heads" / "npos" / "config.json").stat().st_mtime_ns != head_stamp
    assert "heads trained 1 epochs" in (out / "summary.md").read_text()


def _doc(acc, aurocs):
    """A metrics.json document with one score and two OOD sets of the given AUROCs."""
    per = {name: {"fpr95": 0.5, "auroc": a, "aupr_in": 0.5, "aupr_out": 0.5}
           for name, a in aurocs.items()}
    return {"id_accuracy": acc, "scores": {"mcm": {**per, "average": per[next(iter(per))]}}}


def test_summary_stands_alone_title_units_arrows_accuracy_and_inversions():
    from npos.demo import summary_markdown

    results = {"zero-shot": _doc(0.9123, {"near": 0.61, "far": 0.234}),
               "npos": _doc(None, {"near": 0.75, "far": 0.5})}
    text = summary_markdown(results, model="npos-tiny", pretrained="none", seed=0, epochs=3)
    lines = text.splitlines()
    assert lines[0].startswith("# ") and "demo" in lines[0]
    assert "percentages (%)" in text and "↑" in text and "↓" in text
    header = next(line for line in lines if line.startswith("| model"))
    assert "ID acc. % ↑" in header and "near FPR95 % ↓" in header and "far AUROC % ↑" in header
    assert "| zero-shot | mcm | 91.23 | 50.00 | 61.00 | 50.00 | 23.40 |" in lines
    assert "zero-shot 91.23 %; npos n/a." in text
    inverted = [line for line in lines if "inverted" in line]
    assert inverted == [("The mcm score of zero-shot is inverted on far (AUROC 23.40 % < 50 %): "
                         "it rates these OOD images as more in-distribution than the ID test "
                         "images, worse than chance.")]  # 50.00 % exactly is chance, not inverted
    assert "randomly initialized" in text
    clean = summary_markdown({"npos": _doc(0.8, {"near": 0.7, "far": 0.9})}, model="ViT-B-32",
                             pretrained="laion2b_s34b_b79k", seed=0, epochs=3)
    assert "inverted" not in clean and "randomly initialized" not in clean


def test_rerun_goes_to_a_new_run_folder_unless_overwrite(tmp_path):
    from npos.demo import demo_run_folder

    out = tmp_path / "demo"
    (out / "data").mkdir(parents=True)
    (out / "features").mkdir()
    assert demo_run_folder(out) == out  # cached data only: the first run writes into out
    (out / "reports").mkdir()
    assert demo_run_folder(out) == out / "run-2"
    (out / "run-2").mkdir()
    assert demo_run_folder(out) == out / "run-3"
    assert demo_run_folder(out, overwrite=True) == out
