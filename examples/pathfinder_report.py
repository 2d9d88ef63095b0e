"""Tables and a loss plot from the JSON logs of examples/train_pathfinder.py.

    python examples/pathfinder_report.py runs/train runs/timing --plot runs/loss.png \\
        --markdown runs/report.md

Every ``*.json`` log under the given files or folders is read. Logs from the same image size and
seed, one per ``--attention``, are compared step by step; logs under a folder named ``timing`` go
to the step-time table only. Prints three Markdown tables (loss agreement of cuflash and SDPA,
test accuracy, step time) and, when ``--plot`` is given and matplotlib is installed, overlays the
loss curves of each size in one PNG (the format follows the name's ending: .png, .svg, .pdf...).

``--markdown`` and ``--plot`` are written whole or not at all (``cuflash._files``): a run cut
short leaves the file that was there. They are refused before any log is read where they could
not be written, or where they name one of the logs read. Exit status: 0 when everything asked
for was written; 1 when no log was found (nothing is written) or the plot could not be drawn
(the tables are still printed and written); 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
from pathlib import Path

from cuflash._files import why_not_writable, write_atomically

AGREEMENT_STEPS = (100, 300, 1000)     # the loss agreement is given over the first N steps
SMOOTH = 20                            # steps in the moving mean of the smoothed comparison
# what the tables read of a log and of its config
LOG_KEYS = {"config", "loss", "step_time", "test_accuracy", "mean_step_time"}
CONFIG_KEYS = {"attention", "size", "tokens", "batch"}


def log_files(paths: list[str]) -> list[Path]:
    """The files given, and the ``*.json`` files under the folders given."""
    files = []
    for name in paths:
        path = Path(name)
        files += sorted(path.rglob("*.json")) if path.is_dir() else [path]
    return files


def read_logs(paths: list[str]) -> list[tuple[Path, dict]]:
    files = log_files(paths)
    logs = []
    for path in files:
        try:
            log = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            print(f"skipping {path}: {error}", file=sys.stderr)
            continue
        if not (isinstance(log, dict) and "config" in log and "loss" in log):
            continue  # another tool's JSON, in a folder searched
        missing = sorted(LOG_KEYS - log.keys()) or (
            ["config"] if not isinstance(log["config"], dict)
            else [f"config.{key}" for key in sorted(CONFIG_KEYS - log["config"].keys())])
        if missing:  # an older or cut-down log: the tables would end in a KeyError
            print(f"skipping {path}: not a whole log of examples/train_pathfinder.py (no "
                  f"{', '.join(missing)})", file=sys.stderr)
            continue
        logs.append((path, log))
    return logs


def label(config: dict) -> str:
    """cuflash, sdpa (torch's own choice of back end), or sdpa-BACKEND."""
    backend = config.get("sdpa_backend", "default")
    return config["attention"] + ("" if backend == "default" else f"-{backend}")


def _mean(values):
    return sum(values) / len(values) if values else math.nan


def _smooth(values, width):
    return [_mean(values[i:i + width]) for i in range(0, len(values) - width + 1)]


def agreement_rows(logs: list[dict]) -> list[str]:
    """Per image size and seed, each run against the SDPA run (torch's choice of back end):
    |Δloss| over the first N steps. An sdpa-BACKEND run against it shows how far rounding alone
    (another correct attention kernel) moves the loss: the noise to judge cuflash's curve by."""
    groups = {}
    for log in logs:
        config = log["config"]
        groups.setdefault((config["size"], config.get("seed", 0)), {})[label(config)] = log
    rows = []
    for (size, seed), by_label in sorted(groups.items()):
        if "sdpa" not in by_label:
            continue
        reference = by_label["sdpa"]["loss"]
        for name in sorted(set(by_label) - {"sdpa"}, key=lambda name: name != "cuflash"):
            other = by_label[name]["loss"]
            common = min(len(other), len(reference))
            for limit in sorted({min(n, common) for n in AGREEMENT_STEPS if common}):
                a, b = other[:limit], reference[:limit]
                delta = [abs(x - y) for x, y in zip(a, b)]
                smooth = [abs(x - y) for x, y in zip(_smooth(a, SMOOTH), _smooth(b, SMOOTH))]
                rows.append(f"| {size}×{size} | {seed} | {name} | 1–{limit} | "
                            f"{max(delta):.4f} | {_mean(delta):.4f} | {max(smooth) if smooth else math.nan:.4f} | "
                            f"{_mean(a):.4f} | {_mean(b):.4f} |")
    return rows


def accuracy_rows(logs: list[dict]) -> list[str]:
    rows = []
    for log in sorted(logs, key=lambda log: (log["config"]["size"], label(log["config"]))):
        config, steps = log["config"], len(log["loss"])
        n = config.get("test_size", 0)
        accuracy = log["test_accuracy"]
        error = math.sqrt(accuracy * (1 - accuracy) / n) if n else math.nan
        seconds = sum(log["step_time"])
        last = log["loss"][-min(100, steps):]
        rows.append(
            f"| {config['size']}×{config['size']} | {config['tokens']:,} | {label(config)} | "
            f"{config.get('budget_minutes') or '–'} | {steps:,} | {seconds:.0f} | "
            f"{steps * config['batch']:,} | {_mean(last):.4f} | "
            f"{100 * accuracy:.1f} ± {100 * error:.1f} ({n:,}) | "
            f"{1e3 * log['mean_step_time']:.2f} |")
    return rows


def timing_rows(logs: list[dict]) -> list[str]:
    by_size = {}
    for log in logs:
        config = log["config"]
        by_size.setdefault((config["size"], config["batch"]), {})[label(config)] = log
    rows = []
    for (size, batch), by_attention in sorted(by_size.items()):
        times = {name: 1e3 * log["mean_step_time"] for name, log in by_attention.items()}
        steps = {name: log.get("timed_steps", len(log["step_time"]))
                 for name, log in by_attention.items()}
        ratio = (f"{times['cuflash'] / times['sdpa']:.2f}×" if {"cuflash", "sdpa"} <= times.keys()
                 else "–")

        def cell(name):
            return f"{times[name]:.2f} ({steps[name]})" if name in times else "–"
        rows.append(f"| {size}×{size} | {size * size:,} | {batch} | {cell('cuflash')} | "
                    f"{cell('sdpa')} | {ratio} |")
    return rows


def eval_rows(logs: list[dict]) -> list[str]:
    rows = []
    for log in sorted(logs, key=lambda log: (log["config"]["size"], label(log["config"]))):
        evals = log.get("evals", [])
        if len(evals) > 1:
            cells = ", ".join(f"{step:,}: {100 * accuracy:.1f}" for step, _, accuracy in evals)
            rows.append(f"| {log['config']['size']}×{log['config']['size']} | "
                        f"{label(log['config'])} | {cells} |")
    return rows


def report(train_logs: list[dict], timing_logs: list[dict]) -> str:
    device = next((log["config"].get("device_name") for log in train_logs + timing_logs), "?")
    parts = [f"Pathfinder runs on {device}", ""]
    rows = agreement_rows(train_logs)
    parts += ["### Loss agreement with SDPA (torch's choice of back end): same seed, same weights, "
              "same batches; an sdpa-BACKEND row is the rounding noise of another correct kernel",
              "",
              "| image | seed | run | steps | max \\|Δloss\\| | mean \\|Δloss\\| | "
              f"max \\|Δ\\| of {SMOOTH}-step means | mean loss, run | mean loss, SDPA |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
              *(rows or ["| (no pair of logs with SDPA) | | | | | | | | |"]), ""]
    rows = accuracy_rows(train_logs)
    parts += ["### Test accuracy (chance 50%; ± one binomial standard error, test images)", "",
              "| image | tokens | attention | budget (min) | steps | training s | images seen | "
              "loss, last 100 steps | test accuracy % | step ms |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
              *(rows or ["| (no training logs) | | | | | | | | | |"]), ""]
    rows = eval_rows(train_logs)
    if rows:
        parts += ["### Test accuracy during training (step: % of the first 512 test images; "
                  "the last entry is the final test on all)", "",
                  "| image | run | accuracy by step |", "| --- | --- | --- |", *rows, ""]
    rows = timing_rows(timing_logs)
    parts += ["### Step time, forward + backward + AdamW (ms, mean over the timed steps)", "",
              "| image | tokens | batch | cuflash | SDPA (default back end) | cuflash / SDPA |",
              "| --- | --- | --- | --- | --- | --- |",
              *(rows or ["| (no timing logs) | | | | | |"]), ""]
    return "\n".join(parts)


def write_whole(path: str, data: bytes) -> None:
    """``data`` into ``path`` as cuflash writes its files (``write_atomically``): a write cut
    short leaves what was there, never part of a new file, and an existing file keeps its
    permissions. A symbolic link is written through, as open() would."""
    write_atomically(os.path.realpath(path), data)


def plot_format(path: str) -> str:
    """The format of a --plot file, read from its name as matplotlib reads it (PNG without)."""
    return os.path.splitext(path)[1][1:].lower() or "png"


def plot(logs: list[dict], path: str) -> bool:
    """Loss curves (raw, faint, and smoothed) per image size, overlaid, written to ``path``
    whole or not at all; False, saying why on stderr, without matplotlib or training logs."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}; draw it later with "
              f"python examples/pathfinder_report.py LOGS... --plot {path}", file=sys.stderr)
        return False
    sizes = sorted({log["config"]["size"] for log in logs})
    if not sizes:
        print(f"no plot written to {path}: no training logs (logs under a folder named timing "
              "go to the step-time table only)", file=sys.stderr)
        return False
    figure, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.5), squeeze=False,
                                layout="constrained")
    for axis, size in zip(axes[0], sizes):
        for log in logs:
            config, loss = log["config"], log["loss"]
            if config["size"] != size:
                continue
            name = (f"{label(config)}: test {100 * log['test_accuracy']:.1f}%, "
                    f"{len(loss):,} steps")
            line, = axis.plot(range(1, len(loss) + 1), loss, alpha=0.25, linewidth=0.5)
            width = max(1, min(SMOOTH * 5, len(loss) // 20))
            axis.plot(range(width, len(loss) + 1), _smooth(loss, width), color=line.get_color(),
                      label=name)
        axis.axhline(math.log(2), color="grey", linestyle=":", linewidth=1)
        axis.set(title=f"Pathfinder {size}×{size} ({size * size:,} tokens)", xlabel="step",
                 ylabel="training loss")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    picture = io.BytesIO()
    # rendered in memory, so matplotlib no longer reads the format from the name: say it
    try:
        figure.savefig(picture, format=plot_format(path), dpi=120)
    finally:
        plt.close(figure)
    write_whole(path, picture.getvalue())
    print(f"plot written to {path}", file=sys.stderr)
    return True


def refuse_unwritable_output(parser, option: str, path: str) -> None:
    """Refuse, before any log is read, an output that could not be written: a folder, a file
    in a missing or read-only folder, a read-only file (the atomic write replaces none)."""
    reason = why_not_writable(path)
    if reason:
        parser.error(f"{option} {path}{reason}")


def refuse_unknown_plot_format(parser, path: str) -> None:
    """Refuse a --plot name whose ending matplotlib cannot write (where it is installed: without
    it the tables are printed and the plot is not drawn)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        return
    supported = FigureCanvasBase.get_supported_filetypes()
    if plot_format(path) not in supported:
        parser.error(f"--plot {path}: matplotlib cannot write {plot_format(path)!r} files; give "
                     f"a name ending in one of {', '.join('.' + k for k in sorted(supported))}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="JSON logs, or folders searched for them")
    parser.add_argument("--plot", default=None,
                        help="overlaid loss curves (PNG, or the format the name ends in: .svg, "
                             ".pdf...; needs matplotlib)")
    parser.add_argument("--markdown", default=None,
                        help="also write the tables to this file (stdout gets them either way)")
    args = parser.parse_args(argv)
    for name in args.paths:
        if not os.path.exists(name):
            parser.error(f"{name}: no such file or folder")
    outputs = {option: path for option, path in (("--markdown", args.markdown),
                                                  ("--plot", args.plot)) if path is not None}
    # refused before the report is printed, rather than by a traceback after it
    for option, path in outputs.items():
        refuse_unwritable_output(parser, option, path)
    if len(outputs) == 2 and os.path.realpath(args.markdown) == os.path.realpath(args.plot):
        parser.error(f"--markdown and --plot name one file, {args.markdown}; give two names")
    inputs = {os.path.realpath(path) for path in log_files(args.paths)}
    for option, path in outputs.items():
        if os.path.realpath(path) in inputs:
            parser.error(f"{option} {path} is one of the logs read; give another name, so that "
                         "the report does not replace it")
    if args.plot is not None:
        refuse_unknown_plot_format(parser, args.plot)
    logs = read_logs(args.paths)
    if not logs:
        # nothing is written: an empty report would replace a good one
        print(f"no log of examples/train_pathfinder.py found in {' '.join(args.paths)}; nothing "
              "written", file=sys.stderr)
        return 1
    train_logs = [log for path, log in logs if "timing" not in path.parts]
    timing_logs = [log for path, log in logs if "timing" in path.parts]
    text = report(train_logs, timing_logs)
    print(text)
    if args.markdown:
        write_whole(args.markdown, (text + "\n").encode())
        print(f"tables written to {args.markdown}", file=sys.stderr)
    if args.plot and not plot(train_logs, args.plot):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
