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
    assert table.count("\n") == 2 + 2 + 3 + 3  # header, rule, zero-shot x2, heads x3 each
    zero_shot = (out / "reports" / "zero-shot" / "metrics.json").read_text()
    # The second run reuses every cached store and re-extracts nothing.
    again = runner.invoke(cli, ["demo", "--out", str(out), "--epochs", "2", "--device", "cpu"])
    assert again.exit_code == 0, again.output
    assert again.output.count("[cache]") == 4 and "[extract]" not in again.output
    assert (out / "reports" / "zero-shot" / "metrics.json").read_text() == zero_shot
