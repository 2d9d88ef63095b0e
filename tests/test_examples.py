"""Smoke tests of examples/train_pathfinder.py on CPU (skipped without torch): it runs end to end
with either attention, reports its test accuracy, and starts from the same loss with cuflash and
with torch's scaled_dot_product_attention."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_pathfinder.py"
TINY = ["--device", "cpu", "--size", "16", "--steps", "2", "--batch", "2", "--layers", "1",
        "--width", "32", "--train-size", "8", "--test-size", "8", "--workers", "1"]


@pytest.fixture(scope="module")
def train_pathfinder():
    spec = importlib.util.spec_from_file_location("train_pathfinder", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_pathfinder_cuflash_and_sdpa(train_pathfinder, tmp_path, capsys):
    logs = {}
    for attention in ("cuflash", "sdpa"):
        log = tmp_path / f"{attention}.json"
        assert train_pathfinder.main(TINY + ["--attention", attention, "--log", str(log)]) == 0
        out = capsys.readouterr().out
        assert "test accuracy" in out and "chance 50%" in out, out
        assert "mean step time" in out, out
        logs[attention] = json.loads(log.read_text())
        assert len(logs[attention]["loss"]) == len(logs[attention]["step_time"]) == 2
        assert 0.0 <= logs[attention]["test_accuracy"] <= 1.0
        assert logs[attention]["config"]["tokens"] == 16 * 16
    # Same seed: same weights and same first batch, so the first losses agree (float32).
    assert logs["cuflash"]["loss"][0] == pytest.approx(logs["sdpa"]["loss"][0], abs=1e-4)


def test_train_pathfinder_compare_plot(train_pathfinder, tmp_path):
    pytest.importorskip("matplotlib")
    paths = []
    for attention, slope in (("cuflash", 1e-3), ("sdpa", 2e-3)):
        log = dict(config=dict(attention=attention, size=32, tokens=1024), test_accuracy=0.5,
                   loss=[0.7 - slope * step for step in range(100)], step_time=[0.01] * 100)
        paths.append(tmp_path / f"{attention}.json")
        paths[-1].write_text(json.dumps(log))
    plot = tmp_path / "compare.png"
    assert train_pathfinder.main(["--compare", *map(str, paths), "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("size", ["12", "4"])
def test_train_pathfinder_refuses_sizes(train_pathfinder, size):
    with pytest.raises(SystemExit):
        train_pathfinder.main(["--size", size, "--device", "cpu"])
