"""Smoke tests of examples/train_pathfinder.py on CPU (skipped without torch): it runs end to end
with either attention, reports its test accuracy, and starts from the same loss with cuflash and
with torch's scaled_dot_product_attention."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from cut_writes import cut_short_fdopen, deny_writes

from cuflash import _files

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_pathfinder.py"
TINY = ["--device", "cpu", "--size", "32", "--steps", "3", "--batch", "2", "--layers", "1",
        "--width", "16", "--heads", "2", "--train-size", "8", "--test-size", "8", "--workers", "1",
        "--eval-every", "2"]
REPORT = Path(__file__).resolve().parents[1] / "examples" / "pathfinder_report.py"


def load_example(path):
    """The example script at ``path`` as a module (the examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def assert_refused_while_parsing(main, argv, capsys, message):
    """``main(argv)`` stops in argparse (exit status 2) with ``message`` in its error."""
    with pytest.raises(SystemExit) as exit:
        main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


@pytest.fixture(scope="module")
def train_pathfinder():
    return load_example(SCRIPT)


def test_train_pathfinder_cuflash_and_sdpa(train_pathfinder, tmp_path, capsys):
    logs = {}
    for attention in ("cuflash", "sdpa"):
        log = tmp_path / f"{attention}.json"
        assert train_pathfinder.main(TINY + ["--attention", attention, "--log", str(log)]) == 0
        out = capsys.readouterr().out
        assert "test accuracy" in out and "chance 50%" in out, out
        assert "mean step time" in out, out
        logs[attention] = json.loads(log.read_text())
        assert len(logs[attention]["loss"]) == len(logs[attention]["step_time"]) == 3
        assert 0.0 <= logs[attention]["test_accuracy"] <= 1.0
        assert logs[attention]["config"]["tokens"] == 32 * 32
        assert [step for step, _, _ in logs[attention]["evals"]] == [2, 3]
    # Same seed: same weights and same first batch, so the first losses agree (float32).
    assert logs["cuflash"]["loss"][0] == pytest.approx(logs["sdpa"]["loss"][0], abs=1e-4)


def test_train_pathfinder_optimizers_agree(train_pathfinder, tmp_path, capsys):
    """--optimizer picks AdamW's implementation, not its update rule: fused and foreach runs
    from one seed give the same losses to float32 rounding, and the log names the one used."""
    logs = {}
    for kind in ("fused", "foreach"):
        log = tmp_path / f"{kind}.json"
        assert train_pathfinder.main(TINY + ["--attention", "sdpa", "--optimizer", kind,
                                             "--lr", "0.01", "--warmup", "1",
                                             "--log", str(log)]) == 0
        assert f"{kind} AdamW" in capsys.readouterr().out
        logs[kind] = json.loads(log.read_text())
        assert logs[kind]["config"]["optimizer"] == kind
    assert logs["fused"]["loss"] == pytest.approx(logs["foreach"]["loss"], rel=1e-5, abs=1e-6)


def test_train_pathfinder_out_dir_and_report(train_pathfinder, tmp_path, capsys):
    """--out names the logs by size and attention; the report helper pairs them into tables."""
    for run in (["cuflash"], ["sdpa"], ["sdpa", "--sdpa-backend", "math"]):
        assert train_pathfinder.main(TINY + ["--attention", *run, "--out",
                                             str(tmp_path / "train")]) == 0
    assert sorted(path.name for path in (tmp_path / "train").iterdir()) == [
        "pathfinder-32-cuflash.json", "pathfinder-32-sdpa-math.json", "pathfinder-32-sdpa.json"]
    timing = tmp_path / "timing"
    timing.mkdir()
    for path in (tmp_path / "train").iterdir():
        (timing / path.name).write_text(path.read_text())
    report = load_example(REPORT)
    capsys.readouterr()
    markdown = tmp_path / "report.md"
    assert report.main([str(tmp_path / "train"), str(timing), "--markdown", str(markdown)]) == 0
    out = capsys.readouterr().out
    assert out.strip() == markdown.read_text().strip()
    for run in ("cuflash", "sdpa-math"):
        start = f"| 32×32 | 0 | {run} | 1–3 |"
        rows = [line for line in out.splitlines() if line.startswith(start)]
        assert len(rows) == 1, out
        assert float(rows[0].split("|")[6]) < 1e-3      # mean |Δloss|, float32 on CPU
    assert sum(line.startswith("| 32×32 | 1,024 | ") for line in out.splitlines()) == 4, out
    timing_row = [line for line in out.splitlines() if line.startswith("| 32×32 | 1,024 | 2 |")]
    assert len(timing_row) == 1 and timing_row[0].rstrip(" |").endswith("×"), out


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


@pytest.mark.parametrize("size", ["12", "4", "16"])
def test_train_pathfinder_refuses_sizes(train_pathfinder, size):
    with pytest.raises(SystemExit):
        train_pathfinder.main(["--size", size, "--device", "cpu"])


@pytest.mark.parametrize("options", [["--stem", "2"], ["--pool", "mean"], ["--pool", "cls"]])
def test_train_pathfinder_model_options(train_pathfinder, tmp_path, options):
    log = tmp_path / "options.json"
    assert train_pathfinder.main(TINY + ["--attention", "cuflash", *options, "--steps", "1",
                                         "--log", str(log)]) == 0
    result = json.loads(log.read_text())
    assert result["config"][options[0][2:]] == type(result["config"][options[0][2:]])(options[1])
    assert len(result["loss"]) == 1


@pytest.mark.parametrize("option, value", [
    ("--steps", "0"), ("--test-size", "0"), ("--train-size", "0"), ("--batch", "0"),
    ("--print-every", "0"), ("--workers", "0"), ("--layers", "0"), ("--width", "0"),
    ("--heads", "0"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"), ("--budget-minutes", "0"),
    ("--warmup", "-1"), ("--weight-decay", "-0.1"), ("--weight-decay", "inf"), ("--stem", "-1"),
    ("--eval-every", "-1"), ("--seed", "-1"), ("--seed", str(2**64))])
def test_train_pathfinder_refuses_out_of_range_numbers(train_pathfinder, capsys, option, value):
    # Refused while parsing the arguments, before any image is drawn or step taken.
    assert_refused_while_parsing(train_pathfinder.main, TINY + [option, value], capsys,
                                 f"argument {option}: must be")


@pytest.mark.parametrize("option, where, message", [
    ("--plot", "missing/loss.png", "--plot"),
    ("--log", ".", "--log"),
])
def test_train_pathfinder_refuses_an_output_it_cannot_write_before_training(
        train_pathfinder, tmp_path, capsys, option, where, message):
    """A --plot into a missing folder, or a --log that is a folder, failed only once training
    was over: a traceback at the end of the run, and for --log the results lost with it."""
    path = tmp_path / where
    with pytest.raises(SystemExit) as exit:
        train_pathfinder.main(TINY + [option, str(path)])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "set:" not in captured.out  # no image drawn, no step taken


class _FullDiskOs:
    """``os`` as cuflash._files sees it when the disk is full: its new files take 10 bytes."""

    def __getattr__(self, name):
        return getattr(os, name)

    fdopen = staticmethod(cut_short_fdopen(10))


def test_train_pathfinder_refuses_a_read_only_log_before_training(train_pathfinder, tmp_path,
                                                                  capsys, monkeypatch):
    """A --log file that may not be written would fail only once training was over (the atomic
    write replaces no read-only file): refused first. (os.access stands in for a user other
    than root, whom no permission bit stops.)"""
    log = tmp_path / "run.json"
    log.write_text("{}")
    log.chmod(0o444)
    access = os.access
    monkeypatch.setattr(train_pathfinder.os, "access",
                        lambda path, mode: not (Path(path) == log and mode & os.W_OK)
                        and access(path, mode))
    with pytest.raises(SystemExit) as exit:
        train_pathfinder.main(TINY + ["--log", str(log)])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert f"--log {log} is read-only" in captured.err
    assert "set:" not in captured.out


def test_train_pathfinder_refuses_a_log_folder_it_cannot_write_before_training(
        train_pathfinder, tmp_path, capsys, monkeypatch):
    """A --log (or --out) in a folder that may not be written failed only once training was
    over, the results lost with the traceback: refused first. (os.access stands in for a user
    other than root.)"""
    folder = tmp_path / "locked"
    folder.mkdir()
    log = folder / "runs" / "run.json"
    access = os.access
    monkeypatch.setattr(train_pathfinder.os, "access",
                        lambda path, mode: not (Path(path) == folder and mode & os.W_OK)
                        and access(path, mode))
    with pytest.raises(SystemExit) as exit:
        train_pathfinder.main(TINY + ["--log", str(log)])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert f"--log {log}: folder {folder} is not writable" in captured.err
    assert "set:" not in captured.out


@pytest.mark.parametrize("extra", [["--prepare-only"], []], ids=["prepare-only", "train"])
def test_train_pathfinder_refuses_a_cache_dir_that_is_a_file_before_drawing(
        train_pathfinder, tmp_path, capsys, extra):
    """A --cache-dir naming a file failed only once the image set was drawn (minutes at the
    larger sizes), in a FileExistsError traceback: refused first."""
    file = tmp_path / "cache"
    file.write_text("")
    with pytest.raises(SystemExit) as exit:
        train_pathfinder.main(TINY + ["--cache-dir", str(file / "sets"), *extra])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert f"--cache-dir {file / 'sets'}: {file} is a file, not a folder" in captured.err
    assert "set:" not in captured.out


def test_train_pathfinder_cache_cut_short_leaves_no_file_to_load(train_pathfinder, tmp_path,
                                                                  monkeypatch):
    """The image-set cache is read whenever its file exists: a save cut short (a full disk,
    Ctrl-C) left a truncated .npz that every later run tried to load and failed on. It is
    now renamed into place only once written whole."""
    with monkeypatch.context() as full_disk:
        full_disk.setattr(_files, "os", _FullDiskOs())
        with pytest.raises(OSError):
            train_pathfinder.pathfinder_set(32, 2, 0, name="train", workers=1,
                                            cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
    pixels, labels = train_pathfinder.pathfinder_set(32, 2, 0, name="train", workers=1,
                                                     cache_dir=tmp_path)
    again = train_pathfinder.pathfinder_set(32, 2, 0, name="train", workers=1, cache_dir=tmp_path)
    assert (again[0] == pixels).all() and (again[1] == labels).all()
    assert [p.name for p in tmp_path.iterdir()] == ["pathfinder-32-0-2.npz"]


def test_train_pathfinder_log_cut_short_leaves_the_earlier_log(train_pathfinder, tmp_path,
                                                               monkeypatch):
    """--log was written in place at the end of the run: a write cut short (a full disk) left
    half of the new log over the earlier one. The earlier log now stays until the new one is
    written whole."""
    log = tmp_path / "run.json"
    log.write_text('{"earlier": "run"}')
    monkeypatch.setattr(_files, "os", _FullDiskOs())
    with pytest.raises(OSError):
        train_pathfinder.main(TINY + ["--steps", "1", "--log", str(log)])
    assert log.read_text() == '{"earlier": "run"}'
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_train_pathfinder_log_keeps_the_file_s_permissions_and_links(train_pathfinder,
                                                                     tmp_path):
    """--log is written as every file cuflash writes (cuflash._files.write_atomically): a log
    kept private stays private, rather than being replaced by a file everyone may read, and a
    log that is a symbolic link is written through, the link kept."""
    private = tmp_path / "private.json"
    private.write_text("{}")
    private.chmod(0o600)
    target = tmp_path / "runs" / "target.json"
    target.parent.mkdir()
    target.write_text("{}")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    for log in (private, link):
        assert train_pathfinder.main(TINY + ["--steps", "1", "--log", str(log)]) == 0
    assert private.stat().st_mode & 0o777 == 0o600
    assert "loss" in json.loads(private.read_text())
    assert link.is_symlink()
    assert "loss" in json.loads(target.read_text())


def test_train_pathfinder_zero_warmup_and_eval_every_mean_none(train_pathfinder, tmp_path):
    log = tmp_path / "zero.json"
    assert train_pathfinder.main(TINY + ["--steps", "1", "--warmup", "0", "--eval-every", "0",
                                         "--log", str(log)]) == 0
    assert [step for step, _, _ in json.loads(log.read_text())["evals"]] == [1]


TINY_LM = Path(__file__).resolve().parents[1] / "examples" / "train_tiny_lm.py"
TINY_LM_ARGS = ["--device", "cpu", "--dtype", "float32", "--steps", "2", "--batch", "2",
                "--seq-len", "8", "--dim", "8", "--heads", "2", "--layers", "1"]


@pytest.fixture(scope="module")
def train_tiny_lm():
    return load_example(TINY_LM)


@pytest.mark.parametrize("option, value", [
    ("--steps", "0"), ("--steps", "1"), ("--batch", "0"), ("--seq-len", "0"), ("--dim", "0"),
    ("--heads", "0"), ("--layers", "0"), ("--lr", "0"), ("--lr", "nan"), ("--lr", "inf"),
    ("--tolerance", "-1"), ("--tolerance", "nan"), ("--seed", "-1"), ("--seed", str(2**64))])
def test_train_tiny_lm_refuses_out_of_range_numbers(train_tiny_lm, capsys, option, value):
    assert_refused_while_parsing(train_tiny_lm.main, TINY_LM_ARGS + [option, value], capsys,
                                 f"argument {option}: must be")


@pytest.mark.parametrize("device, message", [
    ("cpux", "--device cpux: "), ("cuda", "no CUDA device visible to torch; use --device cpu")])
def test_train_tiny_lm_refuses_a_device_it_cannot_use(train_tiny_lm, capsys, monkeypatch,
                                                      device, message):
    """A --device torch does not know, or cuda (the default) where torch sees no GPU, ended in
    a traceback from torch once the models were built."""
    monkeypatch.setattr(train_tiny_lm.torch.cuda, "is_available", lambda: False)
    assert_refused_while_parsing(train_tiny_lm.main, TINY_LM_ARGS + ["--device", device],
                                 capsys, message)


def test_train_tiny_lm_refuses_dim_not_split_by_heads(train_tiny_lm, capsys):
    assert_refused_while_parsing(train_tiny_lm.main, TINY_LM_ARGS + ["--heads", "3"], capsys,
                                 "--dim (8) must be a multiple of --heads (3)")


def test_train_pathfinder_compare_refuses_a_log_it_cannot_read(train_pathfinder, tmp_path,
                                                               capsys):
    """A --compare log that is missing or not JSON ended in a traceback; argparse names it."""
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    for log in (tmp_path / "missing.json", bad):
        assert_refused_while_parsing(
            train_pathfinder.main, ["--compare", str(log), "--plot", str(tmp_path / "c.png")],
            capsys, f"--compare: cannot read {log}")


@pytest.mark.parametrize("text", ["[1, 2]", '{"config": {}}', '{"loss": [0.7]}'])
def test_train_pathfinder_compare_refuses_json_that_is_no_log(train_pathfinder, tmp_path, capsys,
                                                              text):
    """A --compare file that is JSON but not a --log of this script (another tool's output, a
    log cut down by hand) ended in a TypeError or KeyError traceback while plotting."""
    other = tmp_path / "other.json"
    other.write_text(text)
    assert_refused_while_parsing(
        train_pathfinder.main, ["--compare", str(other), "--plot", str(tmp_path / "c.png")],
        capsys, f"--compare: {other} is not a --log of this script")


@pytest.mark.parametrize("option", ["--markdown", "--plot"])
def test_report_refuses_an_output_that_is_a_folder_before_reading(tmp_path, capsys, option):
    """--markdown (or --plot) naming a folder failed in a traceback once the tables were
    printed; it is refused before any log is read."""
    report = load_example(REPORT)
    folder = tmp_path / "out"
    folder.mkdir()
    assert_refused_while_parsing(report.main, [str(tmp_path), option, str(folder)], capsys,
                                 f"{option} {folder} is a folder")


@pytest.mark.parametrize("option", ["--markdown", "--plot"])
def test_report_refuses_an_output_in_a_missing_folder_before_reading(tmp_path, capsys, option):
    """--markdown (or --plot) into a missing folder failed in a traceback once the tables were
    printed; it is refused before any log is read."""
    report = load_example(REPORT)
    assert_refused_while_parsing(report.main, [str(tmp_path), option,
                                               str(tmp_path / "missing" / "out")],
                                 capsys, f"{option} {tmp_path / 'missing' / 'out'}: folder")


# --------------------------------------------------------------------------- the files written

def _fake_log(attention="cuflash", size=32, steps=4):
    """A log as train_pathfinder.py writes it, small enough to write by hand."""
    return dict(config=dict(attention=attention, size=size, tokens=size * size, batch=2,
                            seed=0, test_size=8),
                loss=[0.7 - 0.01 * step for step in range(steps)], step_time=[0.01] * steps,
                test_accuracy=0.5, mean_step_time=0.01, evals=[])


@pytest.fixture
def report():
    return load_example(REPORT)


@pytest.fixture
def logs(tmp_path):
    """A folder of two logs (cuflash and SDPA, one size and seed)."""
    folder = tmp_path / "train"
    folder.mkdir()
    for attention in ("cuflash", "sdpa"):
        (folder / f"{attention}.json").write_text(json.dumps(_fake_log(attention)))
    return folder


@pytest.fixture
def fake_matplotlib(monkeypatch):
    """A stand-in for matplotlib, whatever is installed: figures whose savefig writes 1 KiB to
    the file it is given (a path or a file object), as the real one writes a picture, in the
    formats png and svg."""
    import importlib.machinery
    import types
    from unittest import mock

    class Figure:
        def suptitle(self, *args, **kwargs):
            pass

        def savefig(self, target, **options):
            data = f"a new {options.get('format', 'png')} picture ".encode() * 40
            if hasattr(target, "write"):
                target.write(data)
            else:
                Path(target).write_bytes(data)

    pyplot = types.ModuleType("matplotlib.pyplot")
    pyplot.subplots = lambda *args, **kwargs: (Figure(), (mock.MagicMock(), mock.MagicMock()))
    pyplot.close = lambda figure: None
    backend_bases = types.ModuleType("matplotlib.backend_bases")
    backend_bases.FigureCanvasBase = types.SimpleNamespace(
        get_supported_filetypes=lambda: {"png": "Portable Network Graphics", "svg": "SVG"})
    matplotlib = types.ModuleType("matplotlib")
    matplotlib.__spec__ = importlib.machinery.ModuleSpec("matplotlib", None)
    matplotlib.use = lambda backend: None
    matplotlib.pyplot, matplotlib.backend_bases = pyplot, backend_bases
    for name, module in (("matplotlib", matplotlib), ("matplotlib.pyplot", pyplot),
                         ("matplotlib.backend_bases", backend_bases)):
        monkeypatch.setitem(sys.modules, name, module)


def test_report_markdown_cut_short_leaves_the_earlier_report(report, logs, tmp_path, capsys,
                                                             monkeypatch):
    """--markdown was written in place (Path.write_text): a write cut short (a full disk,
    Ctrl-C) left a truncated report where a good one was. It is now written beside it and
    renamed into place once whole (cuflash._files.write_atomically)."""
    markdown = tmp_path / "report.md"
    markdown.write_text("an earlier report\n")
    with monkeypatch.context() as full_disk:
        full_disk.setattr(_files, "os", _FullDiskOs())
        with pytest.raises(OSError):
            report.main([str(logs), "--markdown", str(markdown)])
    assert markdown.read_text() == "an earlier report\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md", "train"]
    capsys.readouterr()
    assert report.main([str(logs), "--markdown", str(markdown)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == markdown.read_text().strip()
    assert f"tables written to {markdown}" in captured.err


def test_report_markdown_keeps_the_file_s_permissions_and_links(report, logs, tmp_path):
    """--markdown is written as every file cuflash writes: a private report stays private, and
    a report that is a symbolic link is written through, the link kept."""
    private = tmp_path / "private.md"
    private.write_text("old")
    private.chmod(0o600)
    target = tmp_path / "target.md"
    target.write_text("old")
    link = tmp_path / "link.md"
    link.symlink_to(target)
    for markdown in (private, link):
        assert report.main([str(logs), "--markdown", str(markdown)]) == 0
    assert private.stat().st_mode & 0o777 == 0o600
    assert private.read_text().startswith("Pathfinder runs on")
    assert link.is_symlink() and target.read_text().startswith("Pathfinder runs on")


def test_report_plot_cut_short_leaves_the_earlier_plot(report, logs, tmp_path, capsys,
                                                       monkeypatch, fake_matplotlib):
    """--plot was written in place by matplotlib (savefig to the path): a write cut short left
    a truncated picture. It is now rendered in memory, in the format its name asks for, and
    written whole or not at all."""
    picture = tmp_path / "loss.svg"
    picture.write_bytes(b"an earlier picture")
    with monkeypatch.context() as full_disk:
        full_disk.setattr(_files, "os", _FullDiskOs())
        with pytest.raises(OSError):
            report.main([str(logs), "--plot", str(picture)])
    assert picture.read_bytes() == b"an earlier picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loss.svg", "train"]
    capsys.readouterr()
    assert report.main([str(logs), "--plot", str(picture)]) == 0
    assert picture.read_bytes() == b"a new svg picture " * 40
    captured = capsys.readouterr()
    assert f"plot written to {picture}" in captured.err
    assert "plot written" not in captured.out   # stdout holds the tables alone


@pytest.mark.parametrize("option", ["--markdown", "--plot"])
@pytest.mark.parametrize("given", ["file", "folder"])
def test_report_refuses_to_write_over_a_log_it_reads(report, logs, capsys, option, given):
    """--markdown (or --plot) naming one of the logs read, given by name or found in a folder,
    replaced that log with the report."""
    log = logs / "cuflash.json"
    before = log.read_text()
    paths = [str(log), str(logs / "sdpa.json")] if given == "file" else [str(logs)]
    assert_refused_while_parsing(report.main, [*paths, option, str(log)], capsys,
                                 f"{option} {log} is one of the logs read")
    assert log.read_text() == before


def test_report_refuses_one_file_for_markdown_and_plot(report, logs, tmp_path, capsys):
    out = tmp_path / "report"
    assert_refused_while_parsing(report.main, [str(logs), "--markdown", str(out), "--plot",
                                               str(out)], capsys,
                                 "--markdown and --plot name one file")
    assert not out.exists()


def test_report_refuses_a_path_that_is_not_there(report, logs, tmp_path, capsys):
    """A log or folder that is not there (a typo) was skipped: the report printed empty tables
    and exited 0."""
    missing = tmp_path / "trian"
    assert_refused_while_parsing(report.main, [str(logs), str(missing)], capsys,
                                 f"{missing}: no such file or folder")


def test_report_with_no_log_writes_nothing_and_fails(report, tmp_path, capsys):
    """Folders without a log gave empty tables, written over an earlier --markdown, and exit
    status 0. Now nothing is written and the exit status is 1."""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "other.json").write_text('{"not": "a log"}')
    markdown = tmp_path / "report.md"
    markdown.write_text("an earlier report\n")
    assert report.main([str(empty), "--markdown", str(markdown)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"no log of examples/train_pathfinder.py found in {empty}" in captured.err
    assert markdown.read_text() == "an earlier report\n"


@pytest.mark.parametrize("option", ["--markdown", "--plot"])
def test_report_refuses_an_output_it_cannot_write_before_reading(report, logs, tmp_path,
                                                                 capsys, monkeypatch, option):
    """A read-only --markdown or --plot, or one in a folder that may not be written, failed in
    a traceback once the tables were printed. (os.access stands in for a user other than root,
    whom no permission bit stops.)"""
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only = tmp_path / "read-only.png"
    read_only.write_text("old")
    deny_writes(monkeypatch, locked, read_only)
    assert_refused_while_parsing(report.main, [str(logs), option, str(locked / "out.png")],
                                 capsys, f"folder {locked} is not writable")
    assert_refused_while_parsing(report.main, [str(logs), option, str(read_only)], capsys,
                                 f"{option} {read_only} is read-only")


def test_report_refuses_a_plot_format_matplotlib_cannot_write(report, logs, tmp_path, capsys,
                                                              fake_matplotlib):
    assert_refused_while_parsing(report.main, [str(logs), "--plot", str(tmp_path / "loss.txt")],
                                 capsys, "matplotlib cannot write 'txt' files")


def test_report_plot_without_matplotlib_prints_the_tables_and_fails(report, logs, tmp_path,
                                                                     capsys, monkeypatch):
    """Without matplotlib the tables are printed and written, as the docs say, but the exit
    status (0 before) says that the plot asked for is not there."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    markdown, picture = tmp_path / "report.md", tmp_path / "loss.png"
    assert report.main([str(logs), "--markdown", str(markdown), "--plot", str(picture)]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip() == markdown.read_text().strip()
    assert f"matplotlib is not installed: no plot written to {picture}" in captured.err
    assert not picture.exists()


def test_report_plot_of_timing_logs_alone_says_none_was_written(report, logs, tmp_path, capsys,
                                                                fake_matplotlib):
    timing = tmp_path / "timing"
    logs.rename(timing)
    picture = tmp_path / "loss.png"
    assert report.main([str(timing), "--plot", str(picture)]) == 1
    assert f"no plot written to {picture}: no training logs" in capsys.readouterr().err
    assert not picture.exists()


def _write_compare_logs(tmp_path):
    paths = []
    for attention in ("cuflash", "sdpa"):
        paths.append(tmp_path / f"{attention}.json")
        paths[-1].write_text(json.dumps(_fake_log(attention)))
    return paths


def test_train_pathfinder_plot_cut_short_leaves_the_earlier_plot(train_pathfinder, tmp_path,
                                                                 monkeypatch, fake_matplotlib):
    """--plot was written in place by matplotlib: a write cut short left a truncated picture.
    It is now rendered in memory, in the format its name asks for, and written whole."""
    paths = _write_compare_logs(tmp_path)
    picture = tmp_path / "compare.svg"
    picture.write_bytes(b"an earlier picture")
    argv = ["--compare", *map(str, paths), "--plot", str(picture)]
    with monkeypatch.context() as full_disk:
        full_disk.setattr(_files, "os", _FullDiskOs())
        with pytest.raises(OSError):
            train_pathfinder.main(argv)
    assert picture.read_bytes() == b"an earlier picture"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compare.svg", "cuflash.json",
                                                           "sdpa.json"]
    assert train_pathfinder.main(argv) == 0
    assert picture.read_bytes() == b"a new svg picture " * 40


def test_train_pathfinder_compare_refuses_to_plot_over_a_log(train_pathfinder, tmp_path, capsys,
                                                             fake_matplotlib):
    """--compare a.json b.json --plot a.json replaced the log a.json with the picture."""
    paths = _write_compare_logs(tmp_path)
    before = paths[0].read_text()
    assert_refused_while_parsing(
        train_pathfinder.main, ["--compare", *map(str, paths), "--plot", str(paths[0])], capsys,
        f"--plot {paths[0]} is one of the --compare logs")
    assert paths[0].read_text() == before


@pytest.mark.parametrize("where, message", [
    ("missing/c.png", "folder"), ("c.txt", "matplotlib cannot write 'txt' files")])
def test_train_pathfinder_compare_refuses_a_plot_it_cannot_write(train_pathfinder, tmp_path,
                                                                 capsys, fake_matplotlib, where,
                                                                 message):
    """--compare checked nothing of --plot: one in a missing folder, or in a format matplotlib
    does not write, ended in a traceback."""
    paths = _write_compare_logs(tmp_path)
    assert_refused_while_parsing(
        train_pathfinder.main, ["--compare", *map(str, paths), "--plot", str(tmp_path / where)],
        capsys, message)


def test_train_pathfinder_refuses_one_file_for_log_and_plot(train_pathfinder, tmp_path, capsys,
                                                            fake_matplotlib):
    out = tmp_path / "run.png"
    with pytest.raises(SystemExit) as exit:
        train_pathfinder.main(TINY + ["--log", str(out), "--plot", str(out)])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert "--log and --plot name one file" in captured.err
    assert "set:" not in captured.out


@pytest.mark.parametrize("case", ["read-only file", "locked folder", "format"])
def test_train_pathfinder_refuses_a_plot_it_cannot_write_before_training(
        train_pathfinder, tmp_path, capsys, monkeypatch, fake_matplotlib, case):
    """A read-only --plot, one in a folder that may not be written, or in a format matplotlib
    does not write, failed only once training was over. (os.access stands in for a user other
    than root.)"""
    locked = tmp_path / "locked"
    locked.mkdir()
    read_only = tmp_path / "read-only.png"
    read_only.write_text("old")
    deny_writes(monkeypatch, locked, read_only)
    path, message = {"read-only file": (read_only, f"--plot {read_only} is read-only"),
                     "locked folder": (locked / "p.png", f"folder {locked} is not writable"),
                     "format": (tmp_path / "p.txt", "matplotlib cannot write 'txt'")}[case]
    with pytest.raises(SystemExit) as exit:
        train_pathfinder.main(TINY + ["--plot", str(path)])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert "set:" not in captured.out


def test_train_pathfinder_refuses_a_read_only_cache_dir_without_the_sets(
        train_pathfinder, tmp_path, capsys, monkeypatch):
    """A --cache-dir that may not be written, and does not hold the image sets yet, failed once
    they were drawn (minutes at the larger sizes); where it holds them it is only read."""
    cache = tmp_path / "cache"
    cache.mkdir()
    access = os.access
    monkeypatch.setattr(train_pathfinder.os, "access",
                        lambda path, mode: not (Path(path) == cache and mode & os.W_OK)
                        and access(path, mode))
    with pytest.raises(SystemExit) as exit:
        train_pathfinder.main(TINY + ["--cache-dir", str(cache), "--prepare-only"])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert f"--cache-dir {cache}: folder {cache} is not writable" in captured.err
    assert "set:" not in captured.out
    monkeypatch.undo()
    assert train_pathfinder.main(TINY + ["--cache-dir", str(cache), "--prepare-only"]) == 0
    monkeypatch.setattr(train_pathfinder.os, "access",
                        lambda path, mode: not (Path(path) == cache and mode & os.W_OK)
                        and access(path, mode))
    capsys.readouterr()
    assert train_pathfinder.main(TINY + ["--cache-dir", str(cache), "--prepare-only"]) == 0
    assert "from" in capsys.readouterr().out   # read from the cache


@pytest.mark.parametrize("backend", ["efficient", "cudnn"])
def test_train_pathfinder_refuses_an_sdpa_backend_torch_cannot_run_before_drawing(
        train_pathfinder, capsys, backend):
    """--sdpa-backend efficient or cudnn on the CPU (torch runs neither there) failed at the
    first step, in a traceback, once the image sets were drawn."""
    with pytest.raises(SystemExit) as exit:
        train_pathfinder.main(TINY + ["--attention", "sdpa", "--sdpa-backend", backend])
    assert exit.value.code == 2
    captured = capsys.readouterr()
    assert f"--sdpa-backend {backend}: torch cannot run it here (--device cpu" in captured.err
    assert "set:" not in captured.out


def test_report_skips_a_log_it_cannot_tabulate(report, logs, capsys):
    """A log with "config" and "loss" but not the rest (an older or cut-down one) ended the
    report in a KeyError traceback; it is skipped, saying what it lacks."""
    partial = logs / "partial.json"
    partial.write_text(json.dumps({"config": {"attention": "cuflash", "size": 32}, "loss": [0.7]}))
    assert report.main([str(logs)]) == 0
    captured = capsys.readouterr()
    assert f"skipping {partial}: not a whole log of examples/train_pathfinder.py (no " \
           "mean_step_time, step_time, test_accuracy)" in captured.err
    assert "| 32×32 | 0 | cuflash | 1–4 |" in captured.out


@pytest.mark.parametrize("argv, message", [
    (["--prepare-only", "--cache-dir", "CACHE", "--log", "run.json"],
     "--prepare-only trains nothing, so it writes no --log"),
    (["--prepare-only", "--cache-dir", "CACHE", "--out", "runs"],
     "--prepare-only trains nothing, so it writes no --out"),
    (["--prepare-only", "--cache-dir", "CACHE", "--plot", "loss.png"],
     "--prepare-only trains nothing, so it writes no --plot"),
    (["--compare", "a.json", "--plot", "c.png", "--log", "run.json"],
     "--compare trains nothing, so it writes no --log"),
    (["--compare", "a.json", "--plot", "c.png", "--prepare-only", "--cache-dir", "CACHE"],
     "--compare and --prepare-only are two different runs"),
])
def test_train_pathfinder_refuses_outputs_a_run_without_training_would_not_write(
        train_pathfinder, tmp_path, capsys, argv, message):
    """--prepare-only or --compare with --log (or --out, or --plot for --prepare-only) ended
    without writing it, and without a word."""
    argv = [str(tmp_path / a) if a.endswith((".json", ".png")) or a in ("CACHE", "runs") else a
            for a in argv]
    assert_refused_while_parsing(train_pathfinder.main, TINY + argv, capsys, message)
    assert list(tmp_path.iterdir()) == []
