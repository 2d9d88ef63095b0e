"""Tables and a loss plot from the JSON logs of examples/train_pathfinder.py.

    python examples/pathfinder_report.py runs/train runs/timing --plot runs/loss.png \\
        --markdown runs/report.md

Every ``*.json`` log under the given files or folders is read. Logs from the same image size and
seed, one per ``--attention``, are compared step by step; logs under a folder named ``timing`` go
to the step-time table only. Prints three Markdown tables (loss agreement of cuflash and SDPA,
test accuracy, step time) and, when ``--plot`` is given and matplotlib is installed, overlays the
loss curves of each size in one PNG.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

AGREEMENT_STEPS = (100, 300, 1000)     # the loss agreement is given over the first N steps
SMOOTH = 20                            # steps in the moving mean of the smoothed comparison


def read_logs(paths: list[str]) -> list[tuple[Path, dict]]:
    files = []
    for name in paths:
        path = Path(name)
        files += sorted(path.rglob("*.json")) if path.is_dir() else [path]
    logs = []
    for path in files:
        try:
            log = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            print(f"skipping {path}: {error}", file=sys.stderr)
            continue
        if isinstance(log, dict) and "config" in log and "loss" in log:
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


def plot(logs: list[dict], path: str) -> bool:
    """Loss curves (raw, faint, and smoothed) per image size, overlaid; False without
    matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}; draw it later with "
              f"python examples/pathfinder_report.py LOGS... --plot {path}")
        return False
    sizes = sorted({log["config"]["size"] for log in logs})
    if not sizes:
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
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="JSON logs, or folders searched for them")
    parser.add_argument("--plot", default=None, help="overlaid loss curves (PNG)")
    parser.add_argument("--markdown", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    for option, path in (("--markdown", args.markdown), ("--plot", args.plot)):
        # refused before the report is printed, rather than by a traceback after it
        if path is not None and Path(path).is_dir():
            parser.error(f"{option} {path} is a folder; give a file name")
        if path is not None and not Path(path).parent.is_dir():
            parser.error(f"{option} {path}: folder {Path(path).parent} does not exist")
    logs = read_logs(args.paths)
    train_logs = [log for path, log in logs if "timing" not in path.parts]
    timing_logs = [log for path, log in logs if "timing" in path.parts]
    text = report(train_logs, timing_logs)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.plot:
        plot(train_logs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
