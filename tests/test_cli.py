"""The ``cuflash`` command, through Click's CliRunner, on the CPU at small sizes.

GPU runs (marked ``gpu``) are at the end; they are skipped where no CUDA device is usable.
"""

import importlib
import json
import os
import struct
import subprocess
import sys
import types
import zlib

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

import cuflash
from cuflash.bench import baselines, devices, problems, sweeps, tables
from cuflash.check import verify
from cuflash.cli import main
from cuflash.cli._options import TOKENS
from cuflash.cli._patterns import PARAMETERS, PATTERNS
from cuflash.cli._png import SIGNATURE, encode_png

# Backward checks use random inputs: on the sharp attention of Pathfinder inputs, dq of a
# FlashAttention backward (D = rowsum(dO·O) from the rounded output) can exceed twice the error
# of reference.naive_attention_backward (docs/cli.md, "dq and the naive baseline").
SMALL_CHECK = ["check", "--device", "cpu", "--seq-len", "256", "--heads", "2", "--head-dim",
               "32", "--rows", "32", "--inputs", "random"]
PATHFINDER_CHECK = ["check", "--device", "cpu", "--seq-len", "256", "--heads", "2",
                    "--head-dim", "32", "--rows", "32", "--no-backward"]
TINY_BENCH = ["bench", "--device", "cpu", "--smoke", "--no-torch", "--repeats", "1",
              "--warmup", "0", "--mode", "fwd", "--total-tokens", "256", "--hidden", "64"]
TINY_SPARSE_BENCH = ["bench", "--device", "cpu", "--smoke", "--no-torch", "--repeats", "1",
                     "--warmup", "0", "--mode", "fwd", "--sparse"]


def _runner():
    try:
        return CliRunner(mix_stderr=False)  # Click < 8.2 mixes stderr into stdout by default
    except TypeError:
        return CliRunner()  # Click >= 8.2 keeps them apart and has no such argument


def invoke(*args, code=0):
    """Run ``cuflash ARGS``; check the exit status and return the result."""
    result = _runner().invoke(main, [str(a) for a in args])
    if result.exit_code != code:
        detail = result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback
            detail += "".join(traceback.format_exception(result.exception))
        pytest.fail(f"cuflash {' '.join(map(str, args))} exited {result.exit_code}, "
                    f"expected {code}:\n{detail}")
    return result


def invoke_json(*args, code=0):
    return json.loads(invoke(*args, "--json", code=code).stdout)


# ----------------------------------------------------------------------------- the group

def test_version():
    assert invoke("--version").stdout.strip() == f"cuflash {cuflash.__version__}"


@pytest.mark.parametrize("command", [[], ["info"], ["check"], ["memory"], ["bench"], ["mask"],
                                     ["mask", "show"]])
def test_help_teaches_with_examples(command):
    text = invoke(*command, "--help").stdout
    assert "Usage: " in text
    assert "Examples:" in text or "cuflash " in text.split("Options:")[0]
    if not command:
        for name in ("info", "check", "memory", "bench", "mask"):
            assert f"  {name} " in text


def _documented_command_lines():
    """Every ``cuflash ...`` command line of docs/cli.md, the README and the commands' own help
    (their examples): ``(where, argv)``. A line is a command where it follows a ``$`` prompt, or
    in a block without prompts starts with ``cuflash COMMAND`` (or goes on so after ``&&``);
    what follows two spaces (a description), a pipe or a redirection is left off."""
    import pathlib
    import re
    import shlex

    root = pathlib.Path(__file__).resolve().parent.parent
    texts = [(name, (root / name).read_text()) for name in ("docs/cli.md", "README.md")]

    def helps(command, name):
        yield name, "\n".join(filter(None, (command.help, command.epilog)))
        for sub, child in getattr(command, "commands", {}).items():
            yield from helps(child, f"{name} {sub}")

    blocks = [(name, block) for name, text in texts
              for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)]
    blocks += [(f"{name} --help", text) for name, text in helps(main, "cuflash")]
    commands = "|".join(main.commands)
    lines = []
    for where, block in blocks:
        prompted = "$ cuflash" in block
        for line in block.splitlines():
            line = line.strip().rpartition("&& ")[2]  # pip install ... && cuflash check
            if prompted:
                if not line.startswith("$ cuflash"):
                    continue
                line = line[2:]
            elif not re.match(rf"cuflash (-v )?({commands})\b", line) or " — " in line:
                continue  # not a command, or the first line of a command's output
            line = re.split(r"\s{2,}|\s[|>]\s", line)[0]
            if "..." in line or "…" in line:
                continue
            lines.append((where, shlex.split(line)[1:]))
    return lines


DOCUMENTED = _documented_command_lines()


@pytest.mark.parametrize("where, argv", DOCUMENTED,
                         ids=[f"{where}: {' '.join(argv)}" for where, argv in DOCUMENTED])
def test_documented_command_lines_parse(where, argv, monkeypatch, tmp_path):
    """Each command line of the docs and of the commands' help names options that exist, with
    values they take: parsed and converted as Click does, without running the command."""
    monkeypatch.chdir(tmp_path)  # --plot mem.png and --png local.png are written here
    leaves = [main.commands[name] for name in ("info", "check", "memory", "bench")]
    leaves += list(main.commands["mask"].commands.values())
    for command in leaves:
        monkeypatch.setattr(command, "callback", lambda *args, **kwargs: None)
    main.main(argv, prog_name="cuflash", standalone_mode=False)


def test_the_documented_command_lines_are_found():
    places = {where for where, _ in DOCUMENTED}
    assert {"docs/cli.md", "README.md", "cuflash check --help", "cuflash mask show --help",
            "cuflash --help"} <= places
    assert len(DOCUMENTED) > 40


@pytest.mark.parametrize("module", ["cuflash.cli", "cuflash"])
def test_runs_as_a_module(module):
    import subprocess
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                          text=True, check=True)
    assert done.stdout.strip() == f"cuflash {cuflash.__version__}"


def test_unknown_command_is_a_usage_error():
    assert "No such command" in invoke("frobnicate", code=2).output


def test_verbose_says_more_on_stderr():
    quiet = invoke(*SMALL_CHECK, "--no-backward")
    loud = invoke("-v", *SMALL_CHECK, "--no-backward")
    assert "needs about" in loud.stderr and "needs about" not in quiet.stderr
    assert quiet.stdout.splitlines()[-1] == loud.stdout.splitlines()[-1] == "PASS"


# ----------------------------------------------------------------------------- info

def test_info_names_versions_and_paths():
    text = invoke("info").stdout
    for label in ("cuflash", "NumPy", "CuPy", "kernel cache", "GPU kernels", "CPU path"):
        assert label in text
    assert "CPU path      usable" in text or "CPU path  usable" in text.replace("   ", "  ")


def test_info_json_says_why_a_path_is_not_usable():
    facts = invoke_json("info")
    assert facts["cuflash"] == cuflash.__version__
    assert facts["paths"]["cpu"]["usable"] is True
    gpu = facts["paths"]["gpu"]
    assert isinstance(gpu["usable"], bool) and gpu["reason"]
    assert facts["kernel_cache"]


def test_info_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    facts = invoke_json("info")
    assert facts["cupy"].startswith("not importable")
    assert facts["paths"]["gpu"] == {"usable": False, "reason": facts["paths"]["gpu"]["reason"]}
    assert "CuPy is not installed" in facts["paths"]["gpu"]["reason"]
    assert "not usable" in invoke("info").stdout


def test_info_kernel_cache_follows_cupy_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))
    assert invoke_json("info")["kernel_cache"] == str(tmp_path)


def _documented_h200_plans():
    """The kernel plan lines of docs/cli.md's H200 example of ``cuflash info``."""
    import pathlib
    text = (pathlib.Path(__file__).parent.parent / "docs" / "cli.md").read_text()
    example = text.split("On the GPU machine (an H200; `cuflash info`):", 1)[1]
    example = example.split("```", 2)[1]
    lines = example.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("kernel plan"))
    return lines[first:]


def test_info_h200_example_in_the_docs_is_what_info_prints(monkeypatch):
    pytest.importorskip("cupy")
    from fake_device import FakeDevice
    info = importlib.import_module("cuflash.cli.info")
    FakeDevice(monkeypatch, compute_capability="90")  # an H200: sm_90, 132 SMs, 227 KiB
    facts = {"cuflash": "", "python": "", "numpy": "", "ml_dtypes": "", "scipy": "", "cupy": "",
             "kernel_cache": "", "torch": "", "matplotlib": "",
             "paths": {path: {"usable": True, "reason": ""} for path in ("gpu", "cpu")},
             "kernel_plans": info.kernel_plans()}
    lines = info._lines(facts)
    width = len("kernel cache")  # the widest label of the documented example
    printed = [f"{label:<{width}}  {value}".rstrip() for label, value in lines]
    first = next(i for i, line in enumerate(printed) if line.startswith("kernel plan"))
    documented = _documented_h200_plans()
    assert documented == printed[first:]
    # The float32 forward allocates nothing besides its results: no workspace line.
    float32_plan = "\n".join(documented[documented.index("kernel plan   float32, D=64, Dv=64"):])
    assert "workspace" not in float32_plan.split("backward:")[0]


# ----------------------------------------------------------------------------- check

def test_check_passes_and_prints_a_report():
    result = invoke(*SMALL_CHECK)
    text = result.stdout
    assert text.startswith("cuflash check — 256 tokens: random normal q, k, v")
    for name in ("forward", "backward", "out", "dq", "dk", "dv"):
        assert f"\n{name} " in text
    assert text.splitlines()[-1] == "PASS"
    assert "device: cpu" in result.stderr


def test_check_pathfinder_inputs():
    text = invoke(*PATHFINDER_CHECK).stdout
    assert text.startswith("cuflash check — 256 tokens: 16×16 Pathfinder image (markers ")
    assert "\nbackward" not in text and text.splitlines()[-1] == "PASS"
    record = invoke_json(*PATHFINDER_CHECK)
    assert record["image"]["side"] == 16 and record["inputs"] == "pathfinder"
    assert record["backward"] is None and set(record["checks"]) == {"out"}


def test_check_json_is_one_record():
    record = invoke_json(*SMALL_CHECK)
    assert record["passed"] is True and record["device"] == "cpu"
    assert record["seq_len"] == 256 and record["rows"] == 32
    assert record["image"] is None and record["inputs"] == "random"
    assert set(record["checks"]) == {"out", "dq", "dk", "dv"}
    for check in record["checks"].values():
        assert check["passed"] and 0 <= check["error"] <= check["allowed"]
    assert record["checks"]["out"]["rows"] == "32 sampled"
    forward, backward = record["forward"], record["backward"]
    assert forward["flops"] == 4 * 2 * 256 * 256 * 32
    assert backward["flops"] == 2.5 * forward["flops"]
    assert forward["peak_bytes"] > 0 and forward["time_s"] > 0


def test_check_sparse_causal_float16_every_row():
    record = invoke_json("check", "--device", "cpu", "--seq-len", "1000", "--heads", "2",
                         "--head-dim", "16", "--dtype", "float16", "--causal", "--pattern",
                         "image-local", "--radius", "3", "--block-size", "64", "--rows", "all",
                         "--no-backward")
    assert record["passed"] and record["rows"] == "all" and record["causal"]
    assert record["image"]["side"] == 32  # 1000 pixels: a 32×32 image cut short
    pattern = record["pattern"]
    assert pattern["name"] == "image-local" and pattern["parameters"] == {"radius": 3}
    assert 0 < pattern["density"] < 1
    assert record["forward"]["flops"] < 4 * 2 * 1000 * 1000 * 16 * 0.5


def test_check_sparse_backward_every_row():
    record = invoke_json(*SMALL_CHECK, "--pattern", "sliding-window", "--window", "32",
                         "--block-size", "64", "--causal", "--rows", "all", "--dtype", "float32")
    assert record["passed"] and record["rows"] == "all" and record["backward"] is not None
    assert set(record["checks"]) == {"out", "dq", "dk", "dv"}


@pytest.mark.parametrize("pattern", sorted(set(PATTERNS) - {"image-local"}))
def test_check_every_pattern(pattern):
    record = invoke_json("check", "--device", "cpu", "--seq-len", "512", "--heads", "1",
                         "--head-dim", "16", "--rows", "16", "--no-backward", "--pattern",
                         pattern, "--block-size", "64",
                         *(["--window", "64"] if "window" in PATTERNS[pattern].defaults else []),
                         *(["--stride", "128"] if "stride" in PATTERNS[pattern].defaults else []),
                         *(["--global-tokens", "64"]
                           if "global-tokens" in PATTERNS[pattern].defaults else []),
                         *(["--prefix", "100"] if "prefix" in PATTERNS[pattern].defaults else []))
    assert record["passed"] and record["pattern"]["name"] == pattern


def _off_by(amount):
    attention = cuflash.attention

    def wrong(*args, **kwargs):
        result = attention(*args, **kwargs)
        out = result[0] if isinstance(result, tuple) else result
        out[..., 0] += np.asarray(amount, dtype=out.dtype)
        return result

    return wrong


def test_check_fails_with_exit_status_1_on_a_wrong_output(monkeypatch):
    monkeypatch.setattr(cuflash, "attention", _off_by(0.5))
    result = invoke(*SMALL_CHECK, "--no-backward", code=1)
    assert result.stdout.splitlines()[-1] == "FAIL"
    assert "FAIL" in next(line for line in result.stdout.splitlines() if line.startswith("out"))
    record = invoke_json(*SMALL_CHECK, "--no-backward", code=1)
    assert record["passed"] is False and record["checks"]["out"]["passed"] is False


def test_check_fails_on_an_unwritten_row_outside_the_sample(monkeypatch):
    attention = cuflash.attention
    sampled = set(verify.sample_rows(256, 32, 0).tolist())
    unsampled = min(set(range(256)) - sampled)

    def leaves_a_row(*args, **kwargs):
        out, lse = attention(*args, **kwargs)
        out[..., unsampled, :] = np.nan
        return out, lse

    monkeypatch.setattr(cuflash, "attention", leaves_a_row)
    record = invoke_json(*SMALL_CHECK, "--no-backward", code=1)
    assert record["checks"]["out"]["error"] is None  # NaN: not a number to report


def test_check_fails_on_a_wrong_gradient(monkeypatch):
    backward = cuflash.attention_backward

    def wrong_dk(*args, **kwargs):
        dq, dk, dv = backward(*args, **kwargs)
        return dq, dk * np.asarray(1.5, dtype=dk.dtype), dv

    monkeypatch.setattr(cuflash, "attention_backward", wrong_dk)
    record = invoke_json(*SMALL_CHECK, code=1)
    assert {name: c["passed"] for name, c in record["checks"].items()} == \
        {"out": True, "dq": True, "dk": False, "dv": True}


def test_check_fails_on_gradient_rows_left_unwritten(monkeypatch):
    """dout is zero outside the sampled rows, so dq is exactly zero there: a backward that never
    wrote those rows of dq left them as a new array's memory held them, zero where that memory
    was fresh, and passed. The gradients are poisoned before the call, as out is."""
    backward = cuflash.attention_backward
    sampled = verify.sample_rows(256, 32, 0)

    def writes_the_sampled_rows_of_dq(*args, dq=None, **kwargs):
        grads = backward(*args, **kwargs)
        dq = np.zeros_like(grads[0]) if dq is None else dq  # fresh memory, or the array given
        dq[..., sampled, :] = grads[0][..., sampled, :]
        return (dq,) + tuple(grads[1:])

    monkeypatch.setattr(cuflash, "attention_backward", writes_the_sampled_rows_of_dq)
    record = invoke_json(*SMALL_CHECK, code=1)
    assert {name: c["passed"] for name, c in record["checks"].items()} == \
        {"out": True, "dq": False, "dk": True, "dv": True}
    assert record["checks"]["dq"]["error"] is None  # NaN: not a number to report


@pytest.mark.parametrize("causal", [False, True])
def test_check_of_a_mask_per_head_compares_each_head_with_its_own_pattern(causal):
    """The reference runs head by head: a mask with a pattern per head was given whole to each
    head's step, which refused it ("the query has Hq=1 heads") once cuflash had run."""
    from cuflash.sparse import BlockMask

    n, heads = 256, 3
    rng = np.random.default_rng(1)
    layout = rng.random((heads, 4, 4)) < 0.5
    layout[:, range(4), range(4)] = True  # every row attends somewhere
    layout[0, 3, 0] = True
    layout[1, 3, 0] = layout[2, 3, 0] = False  # the heads' patterns differ
    block_mask = BlockMask.from_dense(layout, block_size=64)
    q, k, v = (rng.standard_normal((1, heads, n, 32), dtype=np.float32) for _ in range(3))
    rows = verify.sample_rows(n, 32, seed=0)
    result = verify.run_check(devices.CpuDevice(), q, k, v, rows=rows, causal=causal,
                              block_mask=block_mask)
    assert [c.name for c in result.comparisons] == ["out", "dq", "dk", "dv"]
    assert result.passed


@pytest.mark.parametrize("args, option", [
    (["--heads", "0"], "--heads"),
    (["--head-dim", "-1"], "--head-dim"),
    (["--dtype", "float64"], "--dtype"),
    (["--rows", "0"], "--rows"),
    (["--rows", "some"], "--rows"),
    (["--seq-len", "0"], "--seq-len"),
    (["--seq-len", "12x"], "--seq-len"),
    (["--path-256", "--seq-len", "1000"], "--seq-len"),
    (["--pattern", "nope"], "--pattern"),
    (["--radius", "3"], "--radius"),  # dense takes no pattern parameters
    (["--pattern", "sliding-window", "--radius", "3"], "--radius"),
    (["--pattern", "random", "--density", "0"], "--density"),
    (["--pattern", "random", "--density", "nan"], "--density"),
    (["--device", "tpu"], "--device"),
    (["--inputs", "noise"], "--inputs"),
])
def test_check_bad_options_are_usage_errors_naming_the_option(args, option):
    result = invoke("check", "--device", "cpu", *args, code=2)
    assert option in result.output and "Traceback" not in result.output


def test_check_pattern_rejecting_its_parameters_is_a_usage_error():
    result = invoke(*SMALL_CHECK, "--pattern", "longformer", "--global-tokens", "100000",
                    code=2)
    assert "cannot build pattern 'longformer'" in result.output
    assert "global_tokens" in result.output


@pytest.mark.parametrize("pattern", ["longformer", "bigbird"])
def test_global_tokens_take_token_counts_as_the_other_lengths_do(pattern):
    """--global-tokens counts tokens, as --window and --prefix do, but refused '1K' ('not a
    valid integer range') where --window took it."""
    record = invoke_json("mask", "show", pattern, "--seq-len", "4K", "--global-tokens", "1K",
                         "--window", "1K")
    assert record["parameters"]["global-tokens"] == 1024
    assert record["parameters"]["window"] == 1024


@pytest.mark.parametrize("command", [["mask", "show"], [*SMALL_CHECK, "--pattern"]],
                         ids=["mask show", "check"])
@pytest.mark.parametrize("pattern, options, option", [
    ("fixed", ["--stride", "64", "--summary", "100"], "--summary"),
    ("prefix-lm", ["--prefix", "4K"], "--prefix"),
    ("document", ["--documents", "2000"], "--documents"),
])
def test_pattern_refusing_its_parameters_names_the_options(command, pattern, options, option):
    """A pattern that refuses its parameters is a usage error naming the options, not only the
    library's argument ('summary must be at most stride=64', 'prefix=4096 exceeds the key
    length nk=256', 'cannot cut 256 tokens into 2000 documents')."""
    seq_len = [] if command[0] == "check" else ["--seq-len", "256"]
    result = invoke(*command, pattern, *seq_len, *options, code=2)
    assert f"cannot build pattern {pattern!r}" in result.stderr
    assert option in result.stderr and "--seq-len 256" in result.stderr


def test_check_gpu_where_there_is_none_says_why(monkeypatch):
    from cuflash import kernels
    monkeypatch.setattr(kernels, "availability", lambda: (False, "no CUDA device is visible"))
    result = invoke("check", "--device", "gpu", code=2)
    assert "--device" in result.output and "no CUDA device is visible" in result.output


def test_check_that_cannot_fit_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(devices.CpuDevice, "free_bytes", lambda self: 10 * 2**20)
    result = invoke(*SMALL_CHECK[:-4], "--seq-len", "64K", code=3)
    assert "needs about" in result.output and "10.0 MiB is free" in result.output
    assert "Traceback" not in result.output


def test_check_out_of_memory_while_running_exits_3(monkeypatch):
    def no_memory(*args, **kwargs):
        raise MemoryError("cannot allocate")

    monkeypatch.setattr(cuflash, "attention", no_memory)
    assert "out of cpu memory" in invoke(*SMALL_CHECK, code=3).output


def _no_gpu(monkeypatch, reason="no NVIDIA driver found (libcuda.so.1 is not installed)"):
    from cuflash import kernels
    monkeypatch.setattr(kernels, "availability", lambda: (False, reason))


def test_check_without_a_gpu_says_so_and_runs_a_small_size(monkeypatch):
    _no_gpu(monkeypatch)
    result = invoke("check", "--heads", "1", "--head-dim", "16", "--rows", "16",
                    "--no-backward", "--json")
    assert json.loads(result.stdout)["seq_len"] == 4096
    note = result.stderr
    assert "running on the CPU" in note and "no NVIDIA driver found" in note
    assert "--seq-len 16K" in note and "estimate:" in note


def test_check_on_the_cpu_keeps_an_explicit_length(monkeypatch):
    _no_gpu(monkeypatch)
    result = invoke("check", "--seq-len", "300", *SMALL_CHECK[5:], "--no-backward", "--json")
    assert json.loads(result.stdout)["seq_len"] == 300
    assert "running on the CPU" not in result.stderr


def test_check_huge_length_exits_3_with_the_estimate_before_allocating():
    result = invoke("check", "--device", "cpu", "--seq-len", "1e10", code=3)
    assert "needs about" in result.output and "TiB" in result.output
    assert "--seq-len" in result.output and "Traceback" not in result.output


def test_check_whose_block_mask_cannot_fit_names_block_size():
    """A block mask of 1-token blocks over 1M tokens needs terabytes whatever the heads and
    rows: the refusal said 'use fewer tokens (--seq-len), heads or rows' and did not name
    --block-size, which sets the mask's size."""
    result = invoke("check", "--device", "cpu", "--inputs", "random", "--seq-len", "1M",
                    "--heads", "1", "--pattern", "causal", "--block-size", "1", code=3)
    assert "needs about" in result.stderr and "--block-size" in result.stderr


def test_check_too_long_is_refused_naming_force(monkeypatch):
    monkeypatch.setattr(verify, "estimate_seconds", lambda *args, **kwargs: 5 * 3600.0)
    result = invoke(*SMALL_CHECK, "--no-backward", code=3)
    assert "about 5.0 h" in result.output and "--force" in result.output
    forced = invoke(*SMALL_CHECK, "--no-backward", "--force")
    assert forced.stdout.splitlines()[-1] == "PASS"
    assert "Ctrl-C stops it" in forced.stderr


@pytest.mark.parametrize("gpus", ["1", "2"])
def test_check_on_the_cpu_estimates_path_x_with_all_its_rows_under_rows_all(monkeypatch, gpus):
    # the note's time for Path-X's 16K tokens: --rows all there means 16,384 rows, not 256
    asked = []
    monkeypatch.setattr(verify, "estimate_seconds",
                        lambda device, n, heads, head_dim, dtype, rows, **kwargs:
                        asked.append((n, rows)) or 5 * 3600.0)
    invoke("check", "--device", "cpu", "--gpus", gpus, "--rows", "all", code=3)
    assert (16384, 16384) in asked and (16384, 256) not in asked


@pytest.mark.parametrize("gpus, length", [("2", "16K"), ("3", "16380")])
def test_check_sharded_on_the_cpu_names_a_full_length_the_layout_takes(monkeypatch, gpus,
                                                                        length):
    monkeypatch.setattr(verify, "estimate_seconds", lambda *args, **kwargs: 5 * 3600.0)
    note = invoke("check", "--device", "cpu", "--gpus", gpus, code=3).stderr
    assert f"--seq-len {length} asks for the full size" in note
    # what the note names is a length the check takes (refused here only for its time)
    assert "would take" in invoke("check", "--device", "cpu", "--gpus", gpus, "--seq-len",
                                  length, code=3).output


@pytest.mark.parametrize("inputs, image", [("pathfinder", True), ("random", False)])
def test_check_on_the_cpu_speaks_of_an_image_only_for_pathfinder_inputs(monkeypatch, inputs,
                                                                        image):
    monkeypatch.setattr(verify, "estimate_seconds", lambda *args, **kwargs: 5 * 3600.0)
    note = invoke("check", "--device", "cpu", "--inputs", inputs, code=3).stderr
    assert "this check uses 4K tokens" in note
    assert ("(a 64×64 image)" in note) == image


def _seconds_of_kept_work(hours_when_dense):
    """A stand-in for verify.estimate_seconds proportional to the kept fraction."""
    return lambda *args, fraction=1.0, **kwargs: fraction * hours_when_dense * 3600.0


def test_check_too_long_sparse_is_refused_before_building_the_mask(monkeypatch):
    command = importlib.import_module("cuflash.cli.check")
    built = []
    monkeypatch.setattr(command, "build_mask", lambda *args, **kwargs: built.append(args))
    monkeypatch.setattr(verify, "estimate_seconds", _seconds_of_kept_work(40))
    result = invoke(*SMALL_CHECK, "--seq-len", "4K", "--no-backward", "--pattern", "random",
                    code=3)
    # random --density 0.25 keeps a quarter of the 32 × 32 blocks, known without drawing them
    assert "about 10.0 h" in result.output and "--force" in result.output
    assert built == []


def test_check_sparse_refused_early_only_when_it_would_be_refused_anyway(monkeypatch):
    # 256 tokens, two blocks a side: random keeps the diagonal, half the work. 40 min dense
    # is 20 min then, under the limit, so the mask is built and it runs.
    monkeypatch.setattr(verify, "estimate_seconds", _seconds_of_kept_work(2 / 3))
    record = invoke_json(*SMALL_CHECK, "--no-backward", "--pattern", "random")
    assert record["passed"] and record["pattern"]["name"] == "random"
    # --force runs what the estimate would refuse, building the mask.
    monkeypatch.setattr(verify, "estimate_seconds", _seconds_of_kept_work(40))
    assert invoke_json(*SMALL_CHECK, "--no-backward", "--pattern", "random", "--force")["passed"]


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("seq_len, block_size", [(1000, 64), (4096, 128), (16461, 256)])
def test_least_element_density_is_a_lower_bound(pattern, seq_len, block_size):
    from cuflash.cli._patterns import build_mask, least_element_density, pattern_parameters
    parameters = pattern_parameters(pattern, {})
    if "window" in parameters:
        parameters["window"] = 100
    if "stride" in parameters:
        parameters["stride"] = 300
    if "prefix" in parameters:
        parameters["prefix"] = 200
    mask = build_mask(pattern, seq_len, block_size=block_size, parameters=parameters, seed=1)
    least = least_element_density(pattern, seq_len, block_size, parameters, seed=1)
    assert 0 < least <= mask.element_density
    if pattern in ("random", "causal") and seq_len % block_size == 0:
        assert least == pytest.approx(mask.element_density)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("seq_len, block_size", [(1000, 96), (1024, 128)])
def test_attended_fraction_counts_the_pairs_attended(pattern, seq_len, block_size):
    from cuflash import reference
    from cuflash.cli._patterns import build_mask, pattern_parameters
    parameters = pattern_parameters(pattern, {})
    for name, value in (("window", 100), ("stride", 300), ("prefix", 200)):
        if name in parameters:
            parameters[name] = value
    mask = build_mask(pattern, seq_len, block_size=block_size, parameters=parameters, seed=1)
    for causal, pairs in ((False, seq_len**2), (True, seq_len * (seq_len + 1) // 2)):
        keep = reference.keep_mask(seq_len, seq_len, causal=causal, block_mask=mask, xp=np)
        assert verify.attended_fraction(mask, causal) * pairs == pytest.approx(keep.sum())
    assert verify.attended_fraction(None, True) == 1.0


def test_check_flops_of_a_causal_pattern_under_causal_are_causal_attention_flops():
    # the block mask `causal` keeps every pair --causal does: the work of dense causal attention
    record = invoke_json(*SMALL_CHECK, "--no-backward", "--pattern", "causal", "--causal",
                         "--block-size", "64")
    assert record["forward"]["flops"] == problems.forward_flops(1, 2, 256, 256, 32, causal=True)


@pytest.mark.parametrize("command", [["check"], ["mask", "show"]])
def test_block_size_help_states_the_rule_the_code_has(command):
    text = " ".join(invoke(*command, "--help").stdout.split())
    assert "(a multiple of 64)" not in text
    assert "The CPU path takes any size; the GPU kernels need a multiple of their tiles" in text


def test_check_block_size_that_is_no_multiple_of_64_runs_on_the_cpu():
    record = invoke_json(*SMALL_CHECK, "--no-backward", "--pattern", "causal", "--block-size",
                         "100")
    assert record["passed"] and record["pattern"]["block_size"] == 100


def test_check_draws_no_progress_bar_off_a_terminal():
    for args in (SMALL_CHECK, [*SMALL_CHECK, "--json"]):
        assert "float64 reference" not in invoke(*args, "--no-backward").stderr


def test_check_ctrl_c_stops_cleanly(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cuflash, "attention", interrupted)
    result = invoke(*SMALL_CHECK, code=130)
    assert "interrupted by Ctrl-C" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("module, name, args, words", [
    ("check", "build_mask", [*PATHFINDER_CHECK, "--pattern", "causal"], "the check did not finish"),
    ("check", "_cpu_length", ["check", "--device", "cpu"], "the check did not finish"),
    ("check", "_sharded_estimate", [*SMALL_CHECK, "--gpus", "2"], "the check did not finish"),
    ("memory", "attention_seconds", ["memory", "--device", "cpu"], "no length was measured"),
    ("bench", "choose_device", [*TINY_BENCH, "--seq-lens", "64"], "no table was printed"),
])
def test_ctrl_c_before_the_run_stops_cleanly(monkeypatch, module, name, args, words):
    """Ctrl-C while a command estimates, builds a block mask or looks for the device stops it
    with exit status 130 and a message, as it does during the run (not click's 'Aborted!')."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module(f"cuflash.cli.{module}"), name, interrupted)
    result = invoke(*args, code=130)
    assert f"interrupted by Ctrl-C; {words}" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("name, args", [
    ("_grouped", ["--seq-len", "1K"]),
    ("build_mask", ["--seq-len", "64M"]),  # drawn from larger blocks, without building it
    ("kernel_tile_shapes", ["--seq-len", "1K", "--exact"]),
])
def test_mask_show_ctrl_c_stops_cleanly_wherever_it_is(monkeypatch, name, args):
    """Ctrl-C stopped mask show cleanly only while it built the full pattern: while it drew
    the mask from larger blocks, grouped its blocks for the picture or counted the tiles of an
    exact mask, it ended in click's 'Aborted!' and exit status 1, not 130."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("cuflash.cli.mask"), name, interrupted)
    result = invoke("mask", "show", "causal", *args, code=130)
    assert "interrupted by Ctrl-C" in result.output and "Traceback" not in result.output


def test_check_repeats_on_the_cpu_says_they_do_not_apply():
    assert "--repeats applies to the GPU" in invoke(*SMALL_CHECK, "--no-backward", "--repeats",
                                                    "3").stderr


@pytest.mark.parametrize("args, option, words", [
    (["--seq-len", "40"], "--seq-len", "--inputs random"),
    (["--block-size", "64"], "--block-size", "--pattern"),
    (["--seq-len", "1.5"], "--seq-len", "whole number"),
])
def test_check_option_errors_name_the_option(args, option, words):
    result = invoke("check", "--device", "cpu", *args, code=2)
    assert option in result.output and words in result.output
    assert "Traceback" not in result.output


def test_check_short_random_inputs_need_no_image():
    record = invoke_json("check", "--device", "cpu", "--seq-len", "30", "--inputs", "random",
                         "--heads", "1", "--head-dim", "16", "--no-backward")
    assert record["passed"] and record["seq_len"] == 30


# ----------------------------------------------------------------------------- check --gpus N

SHARDED_CHECK = ["check", "--device", "cpu", "--gpus", "2", "--seq-len", "1K", "--heads", "2",
                 "--head-dim", "32", "--rows", "32"]


def test_check_gpus_simulated_on_the_cpu_passes_and_says_so():
    result = invoke(*SHARDED_CHECK, "--causal")
    text = result.stdout
    assert text.startswith("cuflash ring attention — 2 ranks (simulated, cpu), layout zigzag; "
                           "1,024 tokens")
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert f"\n{name} " in text
    assert text.splitlines()[-1] == "PASS"
    assert "simulating 2 ranks in one process" in result.stderr
    assert "on the CPU" in result.stderr and "--device cpu was given" in result.stderr


def test_check_gpus_json_maps_the_options():
    record = invoke_json(*SHARDED_CHECK, "--dtype", "float16", "--causal", "--seed", "3")
    assert record["passed"] is True and record["command"] == "check"
    assert record["gpus"] == 2 and record["mode"] == "simulated" and record["device"] == "cpu"
    assert (record["seq_len"], record["heads"], record["head_dim"], record["rows"]) == \
        (1024, 2, 32, 32)
    assert record["dtype"] == "float16" and record["causal"] is True and record["seed"] == 3
    assert record["layout"] == "zigzag" and record["inputs"] == "random"
    assert record["scaling"] is None and "ring_forward_and_backward_simulated" in \
        record["times_s"]
    assert set(record["checks"]) == {"out", "lse", "dq", "dk", "dv"}
    for check in record["checks"].values():
        assert check["passed"] and 0 <= check["error"] <= check["allowed"]
        assert check["max_diff_vs_single"] is not None


def test_check_gpus_forward_only_every_row():
    record = invoke_json(*SHARDED_CHECK[:-2], "--rows", "all", "--no-backward", "--gpus", "4")
    assert record["passed"] and record["gpus"] == 4 and record["rows"] == "all"
    assert record["backward"] is False and set(record["checks"]) == {"out", "lse"}
    assert set(record["times_s"]) == {"ring_forward_simulated"}


def test_check_gpus_forward_only_reports_no_backward():
    report = invoke(*SHARDED_CHECK, "--no-backward").stdout
    assert "reference: float64 on 32 of 1,024 query rows\n" in report
    assert "dout" not in report
    record = invoke_json(*SHARDED_CHECK, "--no-backward")
    assert set(record["times_s"]) == {"ring_forward_simulated"}


def test_check_gpus_without_a_gpu_runs_a_small_size(monkeypatch):
    _no_gpu(monkeypatch)
    result = invoke("check", "--gpus", "3", "--heads", "1", "--head-dim", "16", "--rows", "16",
                    "--no-backward", "--json")
    assert json.loads(result.stdout)["seq_len"] == 4092  # 4K cut to a multiple of 2·3
    note = result.stderr
    assert "simulating 3 ranks in one process" in note and "on the CPU" in note
    assert "the GPU kernels cannot run here" in note
    assert "--seq-len 16380 asks for the full size" in note and "estimate:" in note


def test_check_gpus_fails_with_exit_status_1_on_a_wrong_ring(monkeypatch):
    from cuflash.parallel import check as sharded
    ring = sharded.ring_attention

    def wrong(*args, **kwargs):
        out, lse = ring(*args, **kwargs)
        out[..., 0] += np.asarray(0.5, dtype=out.dtype)
        return out, lse

    monkeypatch.setattr(sharded, "ring_attention", wrong)
    result = invoke(*SHARDED_CHECK, "--no-backward", code=1)
    assert result.stdout.splitlines()[-1] == "FAIL"
    assert "FAIL" in next(line for line in result.stdout.splitlines() if line.startswith("out"))


@pytest.mark.parametrize("args, option, words", [
    (["--gpus", "0"], "--gpus", "x>=1"),
    (["--gpus", "-2"], "--gpus", "x>=1"),
    (["--gpus", "2", "--seq-len", "1002"], "--seq-len", "multiple of 4"),
    (["--gpus", "3", "--seq-len", "1K"], "--seq-len", "nearest: 1,020 or 1,026"),
    (["--gpus", "3", "--path-256"], "--path-256", "multiple of 6"),
    (["--gpus", "2", "--pattern", "image-local"], "--pattern", "dense attention only"),
    (["--gpus", "2", "--pattern", "sliding-window", "--window", "64"], "--pattern",
     "dense attention only"),
    (["--gpus", "2", "--inputs", "pathfinder"], "--inputs", "random normal"),
    (["--gpus", "2", "--radius", "3"], "--radius", "--pattern"),
])
def test_check_gpus_refuses_what_it_cannot_honour(args, option, words):
    result = invoke("check", "--device", "cpu", *args, code=2)
    assert option in result.output and words in result.output
    assert "Traceback" not in result.output


def test_check_gpus_huge_length_exits_3_before_allocating():
    result = invoke("check", "--device", "cpu", "--gpus", "2", "--seq-len", "1e10", code=3)
    assert "needs about" in result.output and "TiB" in result.output
    assert "Traceback" not in result.output


def test_check_gpus_too_long_is_refused_naming_force(monkeypatch):
    command = importlib.import_module("cuflash.cli.check")
    monkeypatch.setattr(command, "_sharded_estimate", lambda *args: (5 * 3600.0, 2**20, 0))
    result = invoke(*SHARDED_CHECK, "--no-backward", code=3)
    assert "about 5.0 h" in result.output and "--force" in result.output
    forced = invoke(*SHARDED_CHECK, "--no-backward", "--force")
    assert forced.stdout.splitlines()[-1] == "PASS" and "Ctrl-C stops it" in forced.stderr


def test_check_gpus_many_simulated_ranks_are_refused_as_too_long(monkeypatch):
    """A simulated ring takes N² steps of host work, whatever the FLOPs: 5,000 ranks on the CPU
    (10,000 tokens, two per chunk) were estimated at seconds and ran for hours; they are
    refused now, naming --force, before anything runs."""
    sharded = importlib.import_module("cuflash.parallel.check")
    monkeypatch.setattr(sharded, "check_sharded",
                        lambda **kwargs: pytest.fail("the check ran instead of being refused"))
    result = invoke("check", "--device", "cpu", "--gpus", "5000", "--heads", "1",
                    "--head-dim", "4", code=3)
    assert "would take about" in result.output and "--force" in result.output


def test_check_gpus_repeats_on_a_simulated_ring_says_they_do_not_apply():
    stderr = invoke(*SHARDED_CHECK, "--no-backward", "--repeats", "3").stderr
    assert "a simulated ring is timed once" in stderr


def test_check_gpus_1_is_the_plain_check():
    plain, one = invoke_json(*SMALL_CHECK), invoke_json(*SMALL_CHECK, "--gpus", "1")
    assert set(one) == set(plain) and "gpus" not in one
    for key in ("seq_len", "inputs", "rows", "pattern", "checks"):
        assert one[key] == plain[key]
    assert invoke(*SMALL_CHECK, "--gpus", "1").stdout.startswith("cuflash check — 256 tokens")


class _FakeGpu:
    name = "gpu"
    description = "a GPU that is not there"
    out_of_memory = (MemoryError,)
    properties = {"major": 9, "minor": 0, "multiprocessors": 132, "clock_khz": 0}

    def free_bytes(self):
        return 2**40


def _check_on_a_fake_gpu(monkeypatch, host_free):
    """``cuflash check`` on a GPU with plenty of memory, on a host with ``host_free`` bytes free;
    making the inputs (the first thing the check allocates) stops it with Ctrl-C."""
    command = importlib.import_module("cuflash.cli.check")
    monkeypatch.setattr(command, "choose_device", lambda requested: (_FakeGpu(), ""))
    monkeypatch.setattr(devices.CpuDevice, "free_bytes", lambda self: host_free)

    def made(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "pathfinder_qkv", made)
    monkeypatch.setattr(command, "random_qkv", made)


@pytest.mark.parametrize("args", [[], ["--inputs", "random", "--no-backward"],
                                  ["--pattern", "causal"]])
def test_check_on_a_gpu_refuses_what_the_host_memory_cannot_hold(monkeypatch, args):
    """On a GPU the check makes q, k, v and the output gradient on the host, and the float64
    reference cuts its element masks there: only the GPU's memory was checked, so a check
    whose host arrays could not fit ran into MemoryError (or the kernel's OOM killer) after
    its estimate. It is refused before anything is made, exit status 3, naming the host's
    memory; with enough of it, the check goes on."""
    _check_on_a_fake_gpu(monkeypatch, host_free=40 * 2**20)
    result = invoke("check", "--seq-len", "64K", *args, code=3)
    assert "of cpu memory, but only 40.0 MiB is free" in result.stderr, result.stderr
    assert "Traceback" not in result.output

    _check_on_a_fake_gpu(monkeypatch, host_free=2**40)
    invoke("check", "--seq-len", "64K", *args, code=130)


def _fake_gpus(monkeypatch, visible, *, fail=None):
    """``cuflash check`` on a GPU machine with ``visible`` GPUs, check_sharded replaced by a
    stand-in that records its arguments and returns a passing result with these times."""
    command = importlib.import_module("cuflash.cli.check")
    from cuflash.parallel import check as sharded
    calls = []

    def fake_check_sharded(**kwargs):
        calls.append(kwargs)
        if fail:
            raise fail
        config = dict(kwargs, kv_heads=kwargs["heads"], layout="zigzag", window=[-1, -1],
                      softcap=0.0, rows_checked=min(kwargs["rows"], kwargs["seq_len"]))
        times = ({"ring_forward": 0.010, "single_forward": 0.018, "ring_backward": 0.025,
                  "single_backward": 0.046, "ring_forward_per_rank": [0.009, 0.010],
                  "ring_forward_transfers_per_rank": [0.002, 0.0025]}
                 if kwargs["mode"] == "processes"
                 else {"ring_forward_and_backward_simulated": 0.5})
        result = sharded.ShardedCheck(config, times=times)
        for name in ("out", "lse", "dq", "dk", "dv"):
            result.comparisons.append(sharded.Comparison(name, 1e-3, 2e-3, "all", 1e-4))
        return result

    monkeypatch.setattr(command, "choose_device", lambda requested: (_FakeGpu(), ""))
    monkeypatch.setattr(command, "_sharded_estimate", lambda *args: (1.0, 2**30, 2**20))
    monkeypatch.setattr(sharded, "gpu_count", lambda: visible)
    monkeypatch.setattr(sharded, "check_sharded", fake_check_sharded)
    return calls


def test_check_gpus_with_enough_gpus_runs_one_process_each(monkeypatch):
    calls = _fake_gpus(monkeypatch, visible=4)
    result = invoke("check", "--gpus", "2", "--seq-len", "1M", "--causal", "--dtype", "float16",
                    "--repeats", "3", "--rows", "all", "--seed", "7", "--no-backward")
    assert calls == [dict(ranks=2, device="gpu", mode="processes", seq_len=2**20, heads=8,
                          head_dim=64, dtype="float16", causal=True, backward=False,
                          rows=2**20, seed=7, repeats=3, timeout=300.0)]
    assert "ring attention across 2 GPUs (4 visible), one process each" in result.stderr
    lines = result.stdout.splitlines()
    assert "ring: the slowest of 2 ranks" in result.stdout
    assert "0: 9.000 ms (2.000 ms), 1: 10.000 ms (2.500 ms)" in result.stdout
    forward = next(line for line in lines if line.startswith("forward") and "×" in line)
    assert forward.split() == ["forward", "1.80×", "0.900"]
    assert lines[-1] == "PASS"
    record = invoke_json("check", "--gpus", "2")
    assert record["mode"] == "processes" and record["seq_len"] == 16384
    assert record["scaling"]["backward"] == {"speedup": pytest.approx(1.84),
                                             "efficiency": pytest.approx(0.92)}


def test_check_gpus_with_too_few_gpus_simulates_on_one(monkeypatch):
    calls = _fake_gpus(monkeypatch, visible=1)
    result = invoke("check", "--gpus", "3", "--json")
    assert calls[0]["mode"] == "simulated" and calls[0]["device"] == "gpu"
    assert calls[0]["seq_len"] == 16380  # Path-X cut to a multiple of 2·3
    assert "16,380 tokens, the largest multiple of 2·N = 6" in result.stderr
    assert "simulating 3 ranks in one process (a thread each) on GPU 0" in result.stderr
    assert "but 1 is visible" in result.stderr
    assert json.loads(result.stdout)["scaling"] is None


def test_check_gpus_failing_processes_are_an_error_without_a_traceback(monkeypatch):
    _fake_gpus(monkeypatch, visible=2, fail=RuntimeError(
        "the ring attention processes failed (exit code 1); their output is above"))
    result = invoke("check", "--gpus", "2", code=1)
    assert "processes failed" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- memory

MEMORY = ["memory", "--device", "cpu", "--min-seq-len", "256", "--max-seq-len", "512",
          "--heads", "1", "--head-dim", "16"]


def test_memory_table_and_json():
    text = invoke(*MEMORY).stdout
    assert "forward+backward" in text and "N×N scores" in text
    assert any(line.split()[0] == "512" for line in text.splitlines()[3:])
    record = invoke_json(*MEMORY, "--dtype", "float16")
    assert [r["seq_len"] for r in record["results"]] == [256, 512]
    for r in record["results"]:
        inputs = 3 * r["seq_len"] * 16 * 2
        assert inputs < r["forward_bytes"] < r["forward_backward_bytes"]
        assert r["scores_bytes"] == r["seq_len"] ** 2 * 2
    assert record["stopped"] is None


def test_memory_stops_when_the_device_is_full(monkeypatch):
    attention = cuflash.attention

    def full_at_512(q, *args, **kwargs):
        if q.shape[-2] >= 512:
            raise MemoryError("device full")
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(cuflash, "attention", full_at_512)
    record = invoke_json(*MEMORY)
    assert [r["seq_len"] for r in record["results"]] == [256]
    assert record["stopped"].startswith("stopped at 512 tokens: out of cpu memory")
    assert "stopped at 512 tokens" in invoke(*MEMORY).stdout


def test_memory_that_measures_no_length_fails(monkeypatch):
    """A sweep whose first length ran out of memory (the estimate said it fitted) printed an
    empty table, or a record without results, and exited 0. It exits 3, as when the request is
    refused for its memory, the record still on stdout with "stopped" saying where."""
    def out_of_memory(q, *args, **kwargs):
        raise MemoryError("device full")

    monkeypatch.setattr(cuflash, "attention", out_of_memory)
    result = invoke(*MEMORY, "--json", code=3)
    record = json.loads(result.stdout)
    assert record["results"] == []
    assert record["stopped"].startswith("stopped at 256 tokens: out of cpu memory")
    assert "Error: no length was measured: the first, 256 tokens, did not fit" in result.stderr


def test_memory_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "memory.png"
    invoke(*MEMORY, "--plot", path)
    assert path.read_bytes().startswith(SIGNATURE)


def test_plot_without_matplotlib_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = invoke(*MEMORY, "--plot", tmp_path / "m.png", code=1)
    assert "pip install 'cuflash[plot]'" in result.output


def test_memory_bad_range_is_a_usage_error():
    result = invoke("memory", "--device", "cpu", "--min-seq-len", "2K", "--max-seq-len", "1K",
                    code=2)
    assert "--max-seq-len" in result.output


def test_memory_ctrl_c_prints_what_was_measured(monkeypatch):
    attention = cuflash.attention

    def interrupted_at_512(q, *args, **kwargs):
        if q.shape[-2] >= 512:
            raise KeyboardInterrupt
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(cuflash, "attention", interrupted_at_512)
    result = invoke(*MEMORY, code=130)
    assert "interrupted by Ctrl-C at 512 tokens" in result.stdout
    assert any(line.split()[:1] == ["256"] for line in result.stdout.splitlines())
    assert "Traceback" not in result.output


def _interrupted_from_length(monkeypatch, length):
    attention = cuflash.attention

    def interrupted(q, *args, **kwargs):
        if q.shape[-2] >= length:
            raise KeyboardInterrupt
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(cuflash, "attention", interrupted)


@pytest.mark.parametrize("args", [MEMORY, [*TINY_BENCH, "--seq-lens", "64,128", "--causal", "no"]],
                         ids=["memory", "bench"])
def test_ctrl_c_with_json_speaks_of_the_record_not_of_a_table(monkeypatch, args):
    """With --json no table is printed: Ctrl-C said on stderr that 'the table above' held what
    was measured, next to a JSON record on stdout."""
    _interrupted_from_length(monkeypatch, 128 if args is not MEMORY else 512)
    result = invoke(*args, "--json", code=130)
    record = json.loads(result.stdout)
    assert record["stopped"].startswith("interrupted by Ctrl-C")
    assert len(record["results"]) == 1
    assert "table" not in result.stderr
    assert "interrupted by Ctrl-C" in result.stderr and "record" in result.stderr


def test_memory_first_length_is_not_charged_for_loading_the_cpu_path():
    """In a fresh process the first call loads cuflash's NumPy path; tracemalloc sees the
    import's Python objects, which are no memory of the call (they made the first forward
    peak larger than forward+backward, and larger than the next length's)."""
    import subprocess
    done = subprocess.run([sys.executable, "-m", "cuflash.cli", *MEMORY, "--json"],
                          capture_output=True, text=True, timeout=120, check=True)
    first, second = json.loads(done.stdout)["results"]
    assert first["forward_bytes"] < first["forward_backward_bytes"]
    assert first["forward_bytes"] < second["forward_bytes"]


def test_memory_does_not_try_a_length_that_cannot_fit(monkeypatch):
    monkeypatch.setattr(devices.CpuDevice, "free_bytes", lambda self: 120_000)
    record = invoke_json(*MEMORY)
    assert [r["seq_len"] for r in record["results"]] == [256]
    assert record["stopped"].startswith("stopped at 512 tokens: its arrays alone would need")


def _estimate_lines(stderr):
    """The estimate on stderr: its first line and the lines indented under it."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("estimate:"))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("  ")),
               len(lines))
    return lines[start], lines[start + 1:end]


def test_memory_estimate_gives_the_memory_of_each_length(monkeypatch):
    """The estimate gave the memory of the first length alone, however many the sweep tries:
    it gives each length's, and marks one that needs more than is free (where the sweep
    stops). One length keeps the one-line estimate of the other commands."""
    from cuflash.cli.memory import _arrays_bytes
    shape = dict(batch=1, heads=1, head_dim=16, dtype=np.dtype(ml_dtypes.bfloat16))
    first, lengths = _estimate_lines(invoke(*MEMORY).stderr)
    assert first.startswith("estimate: ") and "memory of each length below" in first, first
    assert [line.split() for line in lengths] == [
        [str(n), "tokens:", *devices.format_bytes(_arrays_bytes(n, **shape)).split()]
        for n in (256, 512)]

    monkeypatch.setattr(devices.CpuDevice, "free_bytes", lambda self: 120_000)
    first, lengths = _estimate_lines(invoke(*MEMORY).stderr)
    assert "(117.2 KiB free)" in first, first
    assert not lengths[0].endswith("more than is free") and \
        lengths[1].endswith("more than is free"), lengths

    one = invoke(*MEMORY, "--max-seq-len", "256").stderr
    first, lengths = _estimate_lines(one)
    size = devices.format_bytes(_arrays_bytes(256, **shape))
    assert first.endswith(f", {size} of memory (117.2 KiB free)") and lengths == [], one


def test_memory_whose_first_length_cannot_fit_names_the_option_that_sets_it(monkeypatch):
    """A sweep is refused for memory only when its first length cannot fit: the advice was 'use
    a smaller --max-seq-len', which cannot help (and below --min-seq-len is refused)."""
    monkeypatch.setattr(devices.CpuDevice, "free_bytes", lambda self: 1_000)
    result = invoke(*MEMORY, code=3)
    assert "--min-seq-len" in result.stderr and "--max-seq-len" not in result.stderr
    assert result.stdout == ""


def test_memory_min_above_the_default_max_runs_that_length():
    record = invoke_json("memory", "--device", "cpu", "--min-seq-len", "8K", "--heads", "1",
                         "--head-dim", "8")
    assert [r["seq_len"] for r in record["results"]] == [8192]


def test_memory_plot_into_a_missing_directory_is_refused_first(tmp_path):
    result = invoke(*MEMORY, "--plot", tmp_path / "missing" / "m.png", code=2)
    assert "--plot" in result.output and "does not exist" in result.output


@pytest.mark.parametrize("name, words", [("", "has no file name"),
                                         ("missing/", "has no file name"),
                                         ("m.png/", "has no file name")])
def test_plot_path_that_names_no_file_is_refused_first(tmp_path, monkeypatch, name, words):
    """A path ending in a separator (or an empty one) can never be written: it is refused
    before the run, as a missing directory is, not after it."""
    monkeypatch.chdir(tmp_path)
    for args in (MEMORY, TINY_BENCH):
        result = invoke(*args, "--plot", name, code=2)
        assert "--plot" in result.output and words in result.output


# ----------------------------------------------------------------------------- bench

def test_bench_dense_table_and_json():
    text = invoke(*TINY_BENCH, "--seq-lens", "64", "--causal", "no").stdout
    assert "cuflash/flash" in text and "[1] not run" in text
    record = invoke_json(*TINY_BENCH, "--seq-lens", "64,128", "--causal", "both")
    assert record["sweep"] == "dense"
    rows = record["results"]
    assert [(r["seq_len"], r["causal"]) for r in rows] == \
        [(64, False), (128, False), (64, True), (128, True)]
    for r in rows:
        assert r["mode"] == "fwd" and r["batch"] == 256 // r["seq_len"] and r["heads"] == 1
        assert r["tflops"]["cuflash"] > 0 and r["ratio"] is None
        assert r["notes"]["sdpa-flash"] == "n/a (not run)"


def _bench_estimate_on_a_fake_gpu(monkeypatch, *args):
    """The seconds ``cuflash bench ARGS`` estimates on a GPU, and its stderr; the sweep itself
    is stopped by Ctrl-C before its first row."""
    command = importlib.import_module("cuflash.cli.bench")
    monkeypatch.setattr(command, "choose_device", lambda requested: (_FakeGpu(), ""))
    estimated = []
    require_reasonable = command.require_reasonable

    def recorded(device, *, seconds, **kwargs):
        estimated.append(seconds)
        return require_reasonable(device, seconds=seconds, **kwargs)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "require_reasonable", recorded)
    monkeypatch.setattr(command.measure, "run_dense", stopped)
    monkeypatch.setattr(command.measure, "run_sparse", stopped)
    result = invoke("bench", "--smoke", "--no-torch", *args, code=130)
    (seconds,) = estimated
    return seconds, result.stderr


@pytest.mark.parametrize("args, variants", [
    (["--mode", "fwd", "--causal", "no"], 1),
    (["--mode", "both", "--causal", "both"], 2 * (1 + 3)),  # the backward launches three
    (["--sparse", "--mode", "fwd"], 4),  # a variant per mask: random 1 and 0.25, butterfly, 2-D
])
def test_bench_estimate_charges_the_first_compile_of_each_kernel_variant(monkeypatch, args,
                                                                          variants):
    """Each kernel variant the sweep launches compiles with NVRTC on its first call (seconds
    on a cold cache): the estimate left that out. It charges each of them, and says the count
    is an upper bound."""
    from cuflash.bench import estimate

    seconds, stderr = _bench_estimate_on_a_fake_gpu(monkeypatch, *args)
    assert seconds >= variants * estimate.KERNEL_COMPILE_SECONDS
    assert f"of which up to {variants} first compiles of cuflash's kernels" in stderr, stderr
    assert "upper bound" in stderr


def test_bench_estimate_charges_no_compile_on_the_cpu():
    stderr = invoke(*TINY_BENCH, "--seq-lens", "64", "--causal", "no").stderr
    assert "estimate:" in stderr and "compiles" not in stderr


def _refused_at_length(monkeypatch, length):
    """cuflash refuses calls of ``length`` tokens (as it refuses a shape it has no kernel for)."""
    attention = cuflash.attention

    def refused(q, *args, **kwargs):
        if q.shape[-2] == length:
            raise ValueError(f"q has {length} tokens, which this build refuses")
        return attention(q, *args, **kwargs)

    monkeypatch.setattr(cuflash, "attention", refused)


def test_bench_keeps_the_rows_measured_when_one_row_is_refused(monkeypatch):
    """A ValueError from cuflash for one point of the grid ended the sweep as a usage error,
    with no table: the rows measured were lost. The other rows are measured and printed, the
    refused row says why, and the exit status is 1."""
    _refused_at_length(monkeypatch, 64)
    args = [*TINY_BENCH, "--seq-lens", "64,128", "--causal", "no"]
    result = invoke(*args, code=1)
    lines = result.stdout.splitlines()
    measured = next(line for line in lines if line.split()[:4] == ["fwd", "no", "64", "128"])
    refused = next(line for line in lines if line.split()[:4] == ["fwd", "no", "64", "64"])
    assert "n/a" not in measured.split()[6], measured
    assert refused.split()[6] == "n/a", refused
    assert "refused: q has 64 tokens, which this build refuses" in result.stdout
    assert "1 of 2 rows" in result.stderr and "Traceback" not in result.output

    record = invoke_json(*args, code=1)
    first, second = record["results"]
    assert first["seq_len"] == 64 and first["tflops"]["cuflash"] is None
    assert first["refused"] == "q has 64 tokens, which this build refuses"
    assert second["seq_len"] == 128 and second["tflops"]["cuflash"] > 0
    assert second["refused"] is None and record["stopped"] is None


def test_bench_sparse_keeps_the_rows_measured_when_one_row_is_refused(monkeypatch):
    attention = cuflash.attention

    def refused_for_butterfly(q, k, v, *, block_mask=None, **kwargs):
        if block_mask is not None and block_mask.density < 0.5:
            raise ValueError("this mask is refused")
        return attention(q, k, v, block_mask=block_mask, **kwargs)

    monkeypatch.setattr(cuflash, "attention", refused_for_butterfly)
    record = invoke_json(*TINY_SPARSE_BENCH, code=1)
    refused = [r["mask"] for r in record["results"] if r["refused"]]
    measured = [r["mask"] for r in record["results"] if r["tflops"]["cuflash"]]
    assert refused and measured and len(refused) + len(measured) == len(record["results"])
    assert measured[0] == "random 1"


def test_bench_without_torch_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    record = invoke_json("bench", "--device", "cpu", "--smoke", "--repeats", "1", "--warmup",
                         "0", "--seq-lens", "64", "--total-tokens", "64", "--hidden", "64",
                         "--causal", "no", "--mode", "fwdbwd")
    (row,) = record["results"]
    assert row["mode"] == "fwd+bwd"
    for name in ("sdpa-flash", "sdpa-cudnn", "flex"):
        assert row["notes"][name] == "n/a (torch not importable)"
        assert row["tflops"][name] is None


def test_bench_sparse_sweep():
    record = invoke_json(*TINY_SPARSE_BENCH)
    assert record["sweep"] == "sparse"
    masks = [r["mask"] for r in record["results"]]
    assert masks[:2] == ["random 1", "random 0.25"] and "butterfly" in masks
    assert any(m.startswith("image-local") for m in masks)
    for r in record["results"]:
        assert r["tflops"]["cuflash"] > 0 and set(r["tflops"]) == {"cuflash", "flex"}
    table = tables.format_sparse_table(record["results"])
    assert "cuflash/flex" in table and "[1] not run" in table


def test_bench_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    invoke(*TINY_BENCH, "--seq-lens", "64", "--plot", path)
    assert path.read_bytes().startswith(SIGNATURE)


def test_bench_baselines_choose_what_runs(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    record = invoke_json("bench", "--device", "cpu", "--smoke", "--repeats", "1", "--warmup",
                         "0", "--mode", "fwd", "--total-tokens", "64", "--hidden", "64",
                         "--seq-lens", "64", "--causal", "no", "--baselines", "flex")
    (row,) = record["results"]
    assert row["notes"] == {"sdpa-flash": "n/a (not run)", "sdpa-cudnn": "n/a (not run)",
                            "flex": "n/a (torch not importable)"}


@pytest.mark.parametrize("args, option", [
    (["--baselines", "sdpa-math"], "--baselines"),
    (["--seq-lens", "1K,abc"], "--seq-lens"),
    (["--seq-lens", ","], "--seq-lens"),
    (["--head-dims", "0"], "--head-dims"),
    (["--mode", "bwd"], "--mode"),
    (["--causal", "maybe"], "--causal"),
    (["--repeats", "0"], "--repeats"),
])
def test_bench_bad_options(args, option):
    assert option in invoke(*TINY_BENCH, *args, code=2).output


@pytest.mark.parametrize("args, option, words", [
    ([*TINY_BENCH, "--seq-lens", "96"], "--total-tokens", "not a multiple of 96"),
    ([*TINY_BENCH, "--seq-lens", "64", "--head-dims", "48"], "--hidden", "not a multiple of 48"),
    ([*TINY_SPARSE_BENCH, "--seq-lens", "1K"], "--seq-lens", "dense sweep only"),
    ([*TINY_SPARSE_BENCH, "--hidden", "128"], "--hidden", "dense sweep only"),
    ([*TINY_SPARSE_BENCH, "--causal", "yes"], "--causal", "dense sweep only"),
    ([*TINY_BENCH, "--baselines", "flex"], "--baselines", "--no-torch"),
])
def test_bench_refuses_what_it_would_not_run_as_asked(args, option, words):
    result = invoke(*args, code=2)
    assert option in result.output and words in result.output


@pytest.mark.parametrize("args, option", [
    (["--seq-lens", "64,64"], "--seq-lens"),
    (["--seq-lens", "1K,1024", "--total-tokens", "1K"], "--seq-lens"),
    (["--seq-lens", "64", "--head-dims", "16,16"], "--head-dims"),
])
def test_bench_refuses_a_value_given_twice(args, option):
    """The same length or head dimension twice would time the same rows twice."""
    result = invoke(*TINY_BENCH, *args, code=2)
    assert option in result.output and "given twice" in result.output


def test_bench_refuses_a_baseline_given_twice():
    result = invoke("bench", "--device", "cpu", "--smoke", "--baselines", "flex,flex", code=2)
    assert "--baselines" in result.output and "'flex' is given twice" in result.output


def test_bench_sparse_compares_with_flex_only():
    result = invoke("bench", "--device", "cpu", "--sparse", "--smoke", "--baselines",
                    "sdpa-flash", code=2)
    assert "--baselines" in result.output and "flex" in result.output


def test_bench_smoke_says_which_value_it_set():
    result = invoke("bench", "--device", "cpu", "--smoke", "--no-torch", "--seq-lens", "2K",
                    code=2)
    assert "1024 (set by --smoke)" in result.output and "--total-tokens" in result.output


@pytest.mark.parametrize("args, words", [
    (["--total-tokens", "1000"], "1000 is not a multiple of 512 (--seq-lens, set by --smoke)"),
    (["--hidden", "100"], "100 is not a multiple of 64 (--head-dims, set by --smoke)"),
])
def test_bench_smoke_says_it_set_the_size_that_breaks_the_grid(args, words):
    result = invoke("bench", "--device", "cpu", "--smoke", "--no-torch", *args, code=2)
    assert words in " ".join(result.output.split())


def test_bench_full_grid_on_the_cpu_is_refused_naming_force():
    result = invoke("bench", "--device", "cpu", "--no-torch", "--mode", "fwd", code=3)
    assert "would take" in result.output and "--force" in result.output
    assert "--smoke" in result.output


def test_bench_that_cannot_fit_names_the_options_that_set_its_memory(monkeypatch):
    """A call of the dense grid holds total tokens × hidden elements per array, whatever N and
    D: the refusal said 'use --smoke, fewer --seq-lens or --head-dims, fewer --repeats', none
    of which makes a call smaller once --total-tokens and --hidden are given."""
    monkeypatch.setattr(devices.CpuDevice, "free_bytes", lambda self: 1_000)
    result = invoke(*TINY_BENCH, "--seq-lens", "64", code=3)
    assert "needs about" in result.stderr
    assert "--total-tokens" in result.stderr and "--hidden" in result.stderr
    assert "--seq-lens" not in result.stderr and "--repeats" not in result.stderr


# ----------------------------------------------------------------------------- mask

def test_mask_list_names_every_pattern():
    text = invoke("mask", "list").stdout
    for name in PATTERNS:
        assert name in text


def test_every_pattern_parameter_has_an_option():
    assert {p for pattern in PATTERNS.values() for p in pattern.defaults} <= set(PARAMETERS)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_mask_show_every_pattern(pattern):
    args = ["mask", "show", pattern, "--seq-len", "4K", "--block-size", "64"]
    text = invoke(*args, "--max-rows", "16", "--max-cols", "32").stdout
    lines = text.splitlines()
    assert lines[0].startswith(pattern) and "64 × 64 blocks" in lines[1]
    picture = lines[2:]
    assert len(picture) == 16 and all(len(line) == 32 for line in picture)
    assert set("".join(picture)) <= {"█", "·"} and "█" in "".join(picture)
    record = invoke_json(*args)
    assert record["blocks"] == [64, 64] and 0 < record["density"] <= 1
    assert record["kept_blocks"] == round(record["density"] * 64 * 64)


@pytest.mark.parametrize("seq_len, block_size", [(1000, 16), (1000, 3), (50, 4)])
def test_mask_show_image_local_keeps_the_blocks_of_the_sequence_pixels(seq_len, block_size):
    """The image is cut after --seq-len pixels: a last block shorter than --block-size is near
    only the blocks its own pixels are near, not those of the cut pixels beside it."""
    from cuflash.cli._patterns import build_mask
    from cuflash.sparse import BlockMask, image_local

    side = 32 if seq_len == 1000 else 8  # the smallest square with seq_len pixels
    pixels = image_local(side, side, radius=1)[:seq_len, :seq_len]
    expected = BlockMask.from_scipy(pixels, level="element", block_size=block_size)
    assert build_mask("image-local", seq_len, block_size=block_size,
                      parameters={"radius": 1}) == expected
    record = invoke_json("mask", "show", "image-local", "--seq-len", str(seq_len),
                         "--block-size", str(block_size), "--radius", "1")
    assert record["kept_blocks"] == expected.nnz_blocks


def test_mask_show_png(tmp_path):
    path = tmp_path / "mask.png"
    record = invoke_json("mask", "show", "butterfly", "--seq-len", "1K", "--block-size", "128",
                         "--png", path)
    assert record["png"] == str(path)
    width, height, pixels = _decode_png(path.read_bytes())
    assert width == height == 512  # 8 blocks, each drawn 64 pixels wide
    kept = (pixels[::64, ::64] == 0)
    np.testing.assert_array_equal(
        kept, cuflash.sparse.BlockMask.from_scipy(cuflash.sparse.butterfly(1024, block_size=128),
                                                  level="block", block_size=128,
                                                  shape=(1024, 1024)).to_dense()[0])


def test_mask_show_takes_a_window_or_prefix_of_zero():
    """A window of 0 is each query's own key, a prefix of 0 plain causal: the builders take both,
    and so does the command (a stride of 0 stays a usage error)."""
    record = invoke_json("mask", "show", "sliding-window", "--seq-len", "1K", "--window", "0", "--exact")
    assert record["parameters"] == {"window": 0} and record["allowed_pairs"] == 1024
    record = invoke_json("mask", "show", "prefix-lm", "--seq-len", "1K", "--prefix", "0", "--exact")
    assert record["allowed_pairs"] == 1024 * 1025 // 2  # causal
    assert "--stride" in invoke("mask", "show", "strided", "--stride", "0", code=2).output


@pytest.mark.parametrize("args, option", [
    (["nope"], "PATTERN"),
    (["butterfly", "--radius", "2"], "--radius"),
    (["random", "--density", "1.5"], "--density"),
    (["random", "--density", "nan"], "--density"),
    (["sliding-window", "--window", "-3"], "--window"),
    (["image-local", "--block-size", "0"], "--block-size"),
    (["document", "--documents", "0"], "--documents"),
    (["causal-document", "--documents", "-1"], "--documents"),
    (["fixed", "--summary", "0"], "--summary"),
])
def test_mask_show_bad_options(args, option):
    assert option in invoke("mask", "show", *args, code=2).output


@pytest.mark.parametrize("args, option", [
    (["butterfly", "--seed", "3"], "--seed"),
    (["sliding-window", "--seed", "0", "--exact"], "--seed"),
    (["prefix-lm", "--seed", "1"], "--seed"),
    (["sliding-window", "--exact", "--block-size", "64"], "--block-size"),
    (["causal-document", "--exact", "--block-size", "256"], "--block-size"),
])
def test_mask_show_refuses_an_option_the_pattern_would_ignore(args, option):
    """--seed for a pattern that draws nothing, and --block-size with --exact for a pattern
    built pair by pair, were ignored without a word: the same picture for every value. They
    are refused, naming the option, as check and bench refuse options they would not read."""
    result = invoke("mask", "show", *args, "--seq-len", "1K", code=2)
    assert option in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args", [
    ["random", "--seed", "3"], ["bigbird", "--seed", "3"], ["document", "--seed", "3"],
    ["causal-document", "--seed", "3", "--exact"],
    ["random", "--exact", "--block-size", "64"], ["bigbird", "--exact", "--block-size", "64"],
])
def test_mask_show_takes_the_options_the_pattern_reads(args):
    invoke("mask", "show", *args, "--seq-len", "1K")


def test_seeded_patterns_are_those_whose_mask_depends_on_the_seed():
    from cuflash.cli._patterns import build_mask
    for name, pattern in PATTERNS.items():
        parameters = dict(pattern.defaults)
        masks = [build_mask(name, 4096, block_size=64, parameters=parameters, seed=seed)
                 for seed in (0, 1)]
        assert pattern.seeded == (masks[0] != masks[1]), name


@pytest.mark.parametrize("exact", [False, True])
def test_mask_show_json_says_what_drew_the_pattern(exact):
    """The record of a random pattern left out its --seed, and with --exact the --block-size
    of its random blocks: two records of different masks read the same. They say both, null
    where the pattern does not read them."""
    flag = ["--exact"] if exact else []
    drawn = [invoke_json("mask", "show", "random", "--seq-len", "1K", "--seed", str(seed),
                         "--block-size", "64", *flag) for seed in (3, 4)]
    assert [r["seed"] for r in drawn] == [3, 4] and drawn[0]["block_size"] == 64
    plain = invoke_json("mask", "show", "butterfly", "--seq-len", "1K", *flag)
    assert plain["seed"] is None
    assert plain["block_size"] == (None if exact else 128)


def test_check_help_spells_rows_all_as_accepted():
    """The help showed --rows K|ALL, and 'ALL' is refused: only 'all' is taken."""
    assert "--rows K|all " in invoke("check", "--help").output
    invoke("check", "--rows", "ALL", code=2)


@pytest.mark.parametrize("command", [["mask", "show"], ["check"]])
def test_counts_the_patterns_need_positive_say_so_in_help(command):
    """--documents and --summary were listed as [x>=0], but a pattern of 0 documents or 0
    summary keys is refused (by the builder, without naming the option)."""
    lines = invoke(*command, "--help").output.splitlines()
    for option in ("--documents", "--summary"):
        start = next(i for i, line in enumerate(lines) if line.startswith(f"  {option} "))
        end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("  -"))
        assert "[x>=1]" in " ".join(lines[start:end]), lines[start:end]


def test_mask_show_png_that_cannot_be_written_leaves_the_old_file(tmp_path):
    """--png replaces the file whole or not at all: a write that fails part way (here past a
    file-size limit, as on a full disk) used to leave the file truncated, its old bytes gone."""
    path = tmp_path / "mask.png"
    path.write_bytes(b"an earlier picture " * 8)
    script = f"""
import resource, signal, sys
from cuflash.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
sys.argv = ["cuflash", "mask", "show", "butterfly", "--seq-len", "1K", "--png", {str(path)!r}]
main()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 1, result.stderr
    assert "--png" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert path.read_bytes() == b"an earlier picture " * 8
    assert [p.name for p in tmp_path.iterdir()] == ["mask.png"]


def test_mask_show_png_through_a_symbolic_link_writes_the_file_it_names(tmp_path):
    """A --png path that is a symbolic link (latest.png -> runs/3.png) was replaced by a new
    file: the link was gone and the file it named kept its old picture. The picture is now
    written where the link leads, and the link stays."""
    runs = tmp_path / "runs"
    runs.mkdir()
    target = runs / "3.png"
    target.write_bytes(b"an earlier picture")
    link = tmp_path / "latest.png"
    link.symlink_to(target)
    invoke("mask", "show", "butterfly", "--seq-len", "1K", "--png", link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes()[:8] == SIGNATURE
    assert sorted(p.name for p in runs.iterdir()) == ["3.png"]


# A stand-in for matplotlib, whatever is installed: figures whose savefig writes 1 KiB to the
# path or file it is given, as the real one writes a PNG.
FAKE_MATPLOTLIB = """
import sys, types
from unittest import mock

class Figure:
    def tight_layout(self): pass
    def suptitle(self, *args, **kwargs): pass
    def savefig(self, target, **options):
        data = b"a new picture " * 80
        if hasattr(target, "write"):
            target.write(data)
        else:
            with open(target, "wb") as file:
                file.write(data)

pyplot = types.ModuleType("matplotlib.pyplot")
pyplot.subplots = lambda *args, **kwargs: (Figure(), mock.MagicMock())
pyplot.close = lambda figure: None
backend_bases = types.ModuleType("matplotlib.backend_bases")
backend_bases.FigureCanvasBase = types.SimpleNamespace(
    get_supported_filetypes=lambda: {"png": "Portable Network Graphics", "svg": "SVG"})
matplotlib = types.ModuleType("matplotlib")
matplotlib.use = lambda backend: None
matplotlib.pyplot = pyplot
matplotlib.backend_bases = backend_bases
sys.modules.update({"matplotlib": matplotlib, "matplotlib.pyplot": pyplot,
                    "matplotlib.backend_bases": backend_bases})
"""


def _run_past_a_file_size_limit(args, limit):
    """``cuflash ARGS`` in a new process whose files cannot grow past ``limit`` bytes (as on
    a full disk), with FAKE_MATPLOTLIB; the finished process."""
    script = FAKE_MATPLOTLIB + f"""
import resource, signal
from cuflash.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
sys.argv = ["cuflash", *{[str(a) for a in args]!r}]
main()
"""
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.mark.parametrize("args", [MEMORY, [*TINY_BENCH, "--seq-lens", "64"]],
                         ids=["memory", "bench"])
def test_plot_that_cannot_be_written_leaves_the_old_file(tmp_path, args):
    """--plot replaces the file whole or not at all, as --png does: a write that fails part
    way used to leave the file truncated, its old bytes gone."""
    path = tmp_path / "plot.png"
    path.write_bytes(b"an earlier picture " * 8)
    result = _run_past_a_file_size_limit([*args, "--plot", path], limit=256)
    assert result.returncode == 1, result.stderr
    assert "--plot" in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert path.read_bytes() == b"an earlier picture " * 8
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    written = _run_past_a_file_size_limit([*args, "--plot", path], limit=2**20)
    assert written.returncode == 0, written.stderr
    assert path.read_bytes() == b"a new picture " * 80
    assert f"plot written to {path}" in written.stderr


@pytest.mark.parametrize("args", [MEMORY, [*TINY_BENCH, "--seq-lens", "64"]],
                         ids=["memory", "bench"])
def test_plot_in_a_format_matplotlib_cannot_write_is_refused_first(monkeypatch, tmp_path, args):
    """A --plot name whose format matplotlib does not know (.txt) ended the run, after the
    sweep, in matplotlib's ValueError and a traceback; it is refused before anything runs."""
    for name in ("matplotlib", "matplotlib.pyplot", "matplotlib.backend_bases"):
        monkeypatch.setitem(sys.modules, name, None)  # restored (or removed) afterwards
    exec(FAKE_MATPLOTLIB, {"__name__": "fake_matplotlib"})  # puts the stand-in there
    result = invoke(*args, "--plot", tmp_path / "plot.txt", code=2)
    assert "--plot" in result.output and "'txt'" in result.output and ".svg" in result.output
    assert result.stdout == "" and list(tmp_path.iterdir()) == []
    assert invoke(*args, "--plot", tmp_path / "plot.svg").stdout


def test_memory_plot_says_when_no_length_was_measured(monkeypatch, tmp_path):
    """A sweep whose first length ran out of memory measured nothing: --plot then wrote no
    file, said nothing of it, and the command exited 0 as if the plot were there. It says so,
    and exits 3 (the request did not fit in memory), the table (empty) printed first."""
    for name in ("matplotlib", "matplotlib.pyplot", "matplotlib.backend_bases"):
        monkeypatch.setitem(sys.modules, name, None)  # restored (or removed) afterwards
    exec(FAKE_MATPLOTLIB, {"__name__": "fake_matplotlib"})  # puts the stand-in there
    memory_command = importlib.import_module("cuflash.cli.memory")

    def out_of_memory(*args, **kwargs):
        raise MemoryError("Unable to allocate")

    monkeypatch.setattr(memory_command, "_measure", out_of_memory)
    path = tmp_path / "m.png"
    result = invoke(*MEMORY, "--plot", path, code=3)
    assert "stopped at 256 tokens: out of cpu memory" in result.stdout
    assert f"no plot written to {path}: no length was measured" in result.stderr
    assert "no length was measured: the first, 256 tokens, did not fit" in result.stderr
    assert not path.exists()


def test_plot_format_follows_the_file_name(tmp_path):
    """--plot renders in memory before the atomic write, so it names the format matplotlib
    would have read from the file name: a .svg or .pdf plot is one, not a PNG so named."""
    from cuflash.cli import _common

    formats = []

    class Figure:
        def tight_layout(self):
            pass

        def savefig(self, target, **options):
            formats.append(options.get("format"))
            target.write(b"a picture")

    plt = types.SimpleNamespace(close=lambda figure: None)
    for name in ("a.png", "b.svg", "c.PDF", "d"):
        _common.save_figure(plt, Figure(), str(tmp_path / name))
    assert formats == ["png", "svg", "pdf", "png"]


@pytest.mark.parametrize("where, words", [("missing-dir/x.png", "does not exist"),
                                          (".", "is a directory")])
def test_mask_show_png_path_errors_name_the_option(tmp_path, where, words):
    result = invoke("mask", "show", "butterfly", "--seq-len", "1K", "--png", tmp_path / where,
                    code=2)
    assert "--png" in result.output and words in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, option", [
    (["mask", "show", "butterfly", "--seq-len", "1K"], "--png"), (MEMORY, "--plot"),
    ([*TINY_BENCH, "--seq-lens", "64"], "--plot")], ids=["mask show", "memory", "bench"])
def test_a_file_that_cannot_be_written_is_refused_first(tmp_path, monkeypatch, args, option):
    """A --png or --plot file that is there but read-only passed the checks made at the start
    (which looked only at its directory): the command ran, sweeps included, and only then
    failed to write it. It is refused before anything runs (os.access decides, as open()
    would, so the test holds for any user)."""
    path = tmp_path / "read-only.png"
    path.write_bytes(b"old")
    access = os.access
    monkeypatch.setattr(os, "access", lambda where, how, **kwargs: not (
        os.path.realpath(where) == os.path.realpath(path) and how == os.W_OK)
        and access(where, how, **kwargs))
    result = invoke(*args, option, path, code=2)
    assert option in result.output and "not writable" in result.output, result.output
    assert result.stdout == "" and path.read_bytes() == b"old"


def test_mask_show_huge_length_draws_without_building():
    args = ["mask", "show", "causal", "--seq-len", "64M", "--max-rows", "8", "--max-cols", "8"]
    result = invoke(*args)
    picture = result.stdout.splitlines()[2:]
    assert picture[0] == "█·······" and picture[-1] == "████████"
    assert "drawn from blocks of" in result.stderr and "--force" in result.stderr
    record = invoke_json(*args)
    assert record["kept_blocks"] is None and record["density"] is None
    assert record["kept_blocks_at_most"] == 524288 * 524289 // 2


def test_mask_show_drawn_without_building_stays_small_for_a_large_picture(monkeypatch):
    """A mask drawn without being built is drawn from blocks large enough to build quickly, however
    many characters the picture may have: with --max-cols 5000, causal at 512K tokens was
    'drawn without building it' from its own 128-token blocks, building all 8.4M of them (800 MiB)
    that the note said it would not build."""
    from cuflash.cli import _patterns

    mask_command = importlib.import_module("cuflash.cli.mask")  # the package names the group
    monkeypatch.setattr(mask_command, "FULL_BUILD_BLOCKS", 10_000)
    built_blocks = []
    build_mask = _patterns.build_mask

    def counting_build_mask(name, seq_len, *, block_size, parameters, seed=0):
        built_blocks.append(PATTERNS[name].blocks(seq_len, block_size, parameters, seed))
        return build_mask(name, seq_len, block_size=block_size, parameters=parameters, seed=seed)

    monkeypatch.setattr(mask_command, "build_mask", counting_build_mask)
    result = invoke("mask", "show", "causal", "--seq-len", "64K", "--max-rows", "4",
                    "--max-cols", "600")
    assert "drawn from blocks of" in result.stderr
    assert built_blocks and max(built_blocks) <= 10_000
    picture_block_size = int(result.stderr.split("drawn from blocks of ")[1].split()[0])
    assert picture_block_size > 128
    assert f"drawn from {picture_block_size}-token blocks" in result.stdout


@pytest.mark.parametrize("pattern, options", [("prefix-lm", ["--prefix", "3000"]),
                                             ("image-local", ["--radius", "20"])])
def test_mask_show_draws_a_mask_too_large_to_build_as_when_built(monkeypatch, pattern, options):
    """A mask drawn from larger blocks without being built has the picture of the built mask:
    with block counts that are no multiple of the picture's size, the built mask's characters
    stood for other blocks than the drawn one's, and the two pictures differed."""
    mask_command = importlib.import_module("cuflash.cli.mask")  # the package names the group
    args = ["mask", "show", pattern, "--seq-len", "9377", "--block-size", "16", *options]
    built = invoke(*args).stdout.splitlines()[2:]
    # below the blocks of the whole pattern, above those of the one drawn from 128-token blocks
    monkeypatch.setattr(mask_command, "FULL_BUILD_BLOCKS", 10_000)
    drawn = invoke(*args)
    assert "drawn from blocks of" in drawn.stderr
    assert drawn.stdout.splitlines()[2:] == built


def test_image_local_block_bound_counts_runs_not_whole_image_rows():
    """The bound on image-local's kept blocks counted every block of each image row a block
    reaches, though a block much shorter than a row reaches a short run of each: at 4M tokens
    it said 9.5M blocks for 1.6M kept (at 1G tokens 38.7G, about 10.7 h to build)."""
    from cuflash.cli._patterns import build_mask

    n, block_size, parameters = 1 << 22, 128, {"radius": 8}
    kept = build_mask("image-local", n, block_size=block_size, parameters=parameters).nnz_blocks
    bound = PATTERNS["image-local"].blocks(n, block_size, parameters, 0)
    assert kept <= bound <= 3 * kept


@pytest.mark.parametrize("block_size", [48, 96, 100])
def test_mask_show_butterfly_drawn_bound_holds_for_other_block_sizes(monkeypatch, block_size):
    """The drawn mask's 'at most' count bounds the blocks kept: blocks whose size is no power
    of two reach more key blocks than one per flipped bit (8M tokens in 96-token blocks: at most
    2,184,550 was said, and 2,927,280 are kept)."""
    mask_command = importlib.import_module("cuflash.cli.mask")  # the package names the group
    args = ["mask", "show", "butterfly", "--seq-len", "64K", "--block-size", str(block_size)]
    kept = invoke_json(*args)["kept_blocks"]
    monkeypatch.setattr(mask_command, "FULL_BUILD_BLOCKS", 1000)
    assert invoke_json(*args)["kept_blocks_at_most"] >= kept


@pytest.mark.parametrize("length", ["1e19", "1e400", "1e5000"])
@pytest.mark.parametrize("pattern", ["causal", "sliding-window", "image-local"])
@pytest.mark.parametrize("exact", [False, True])
def test_mask_show_length_beyond_int64_exits_3(pattern, length, exact):
    """Positions past int64 cannot be built even in coarse blocks: exit status 3 and the reason,
    not an OverflowError traceback (past float range the estimates overflowed first), nor,
    past 4,300 digits, Python's ValueError at writing the length out in the message."""
    result = invoke("mask", "show", pattern, "--seq-len", length, *(["--exact"] if exact else []),
                    code=3)
    assert f"cannot build pattern {pattern!r}" in result.output
    assert "--seq-len" in result.output and "Traceback" not in result.output


def test_mask_show_huge_random_pattern_is_refused():
    result = invoke("mask", "show", "random", "--seq-len", "4M", code=3)
    assert "--block-size" in result.output and "--force" in result.output


def test_mask_show_png_of_many_blocks_is_shrunk(tmp_path):
    path = tmp_path / "big.png"
    invoke("mask", "show", "sliding-window", "--seq-len", "128K", "--block-size", "64",
           "--window", "64", "--png", path)
    width, height, pixels = _decode_png(path.read_bytes())
    assert width == height == 512  # 2048 blocks a side, four to a pixel
    assert (np.diag(pixels) == 0).all() and pixels[0, -1] == 255


# ----------------------------------------------------------------------------- helpers

def _decode_png(data):
    """Width, height and gray pixels of a PNG written by encode_png (filter 0 rows)."""
    assert data.startswith(SIGNATURE)
    position, chunks = len(SIGNATURE), {}
    while position < len(data):
        (length,) = struct.unpack(">I", data[position:position + 4])
        kind = data[position + 4:position + 8]
        body = data[position + 8:position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length:position + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks[kind] = chunks.get(kind, b"") + body
        position += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 0) and b"IEND" in chunks
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(height, width + 1)
    assert (rows[:, 0] == 0).all()
    return width, height, rows[:, 1:]


def test_png_round_trip():
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    width, height, decoded = _decode_png(encode_png(pixels))
    assert (width, height) == (4, 3)
    np.testing.assert_array_equal(decoded, pixels)
    with pytest.raises(ValueError, match="2-D"):
        encode_png(np.zeros(3, np.uint8))


@pytest.mark.parametrize("text, count", [("16384", 16384), ("16K", 16384), ("16k", 16384),
                                         ("1M", 2**20), (" 4K ", 4096), (7, 7), ("1e4", 10**4),
                                         ("1.5K", 1536)])
def test_token_counts(text, count):
    assert TOKENS.convert(text, None, None) == count


@pytest.mark.parametrize("text", ["1.5", "nan", "inf", "1e-3", "", "K", "16G", "1e99999999",
                                  "1e99999999M"])
def test_token_counts_reject_what_is_not_a_whole_number(text):
    import click
    with pytest.raises(click.BadParameter):
        TOKENS.convert(text, None, None)


BEYOND_INT64 = str(2**63)


@pytest.mark.parametrize("args, option", [
    (["check", "--device", "cpu", "--seq-len", "1e400"], "--seq-len"),
    (["check", "--device", "cpu", "--seq-len", "1e400", "--gpus", "2"], "--seq-len"),
    (["check", "--device", "cpu", "--seq-len", "1e99999999"], "--seq-len"),
    (["check", "--device", "cpu", "--seq-len", "1e99999999K"], "--seq-len"),
    (["check", "--device", "cpu", "--seq-len", "1K", "--heads", BEYOND_INT64 + "0" * 300],
     "--heads"),
    (["check", "--device", "cpu", "--gpus", "1" + "0" * 400], "--gpus"),
    (["check", "--device", "cpu", "--pattern", "sliding-window", "--window", "1e400"],
     "--window"),
    (["memory", "--device", "cpu", "--min-seq-len", "1e400"], "--min-seq-len"),
    (["memory", "--device", "cpu", "--heads", "1" + "0" * 400], "--heads"),
    ([*TINY_BENCH, "--seq-lens", "1e400"], "--seq-lens"),
    ([*TINY_BENCH, "--seq-lens", "1e99999999"], "--seq-lens"),
    ([*TINY_BENCH, "--repeats", "1" + "0" * 400], "--repeats"),
    ([*TINY_BENCH, "--warmup", BEYOND_INT64], "--warmup"),
])
def test_counts_past_int64_are_usage_errors(args, option):
    """No array size reaches 2^63: a larger length or count is refused naming the option, not
    an OverflowError from the estimates."""
    result = invoke(*args, code=2)
    assert option in result.output and "at most 9,223,372,036,854,775,807" in result.output
    assert "Traceback" not in result.output


def test_counts_up_to_int64_are_estimated_and_refused_for_memory():
    result = invoke("check", "--device", "cpu", "--seq-len", str(2**63 - 1), code=3)
    assert "needs about" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args", [
    ["check", "--device", "cpu", "--head-dim", "100000000"],
    ["check", "--device", "cpu", "--head-dim", "100000000", "--gpus", "2", "--seq-len", "1K"],
    ["memory", "--device", "cpu", "--head-dim", "100000000"],
    [*TINY_BENCH, "--seq-lens", "256", "--head-dims", "10000000000", "--hidden", "10000000000"],
])
def test_huge_head_dim_is_refused_for_memory_before_anything_is_allocated(args):
    """The CPU time estimate calibrates on a small problem; it must not allocate one of the
    requested head dimension (terabytes here) before the memory check refuses the request."""
    result = invoke(*args, code=3)
    assert "needs about" in result.output and "TiB" in result.output
    assert "Unable to allocate" not in result.output and "Traceback" not in result.output


def test_cpu_estimates_calibrate_on_a_bounded_head_dim(monkeypatch):
    """Calibrating at a large head dimension would take as long as the request itself: the
    estimate times a bounded one and scales the reference's per-score time with D."""
    from cuflash.bench import estimate
    seen = []
    monkeypatch.setattr(estimate, "_cpu_rate",
                        lambda heads, head_dim, *rest: seen.append(head_dim) or 1e10)
    monkeypatch.setattr(verify, "_cpu_reference_seconds",
                        lambda head_dim, *rest: seen.append(head_dim) or 1e-9)
    cpu = devices.CpuDevice()
    small = verify.estimate_seconds(cpu, 4096, 8, 256, np.float32, 256, backward=True)
    large = verify.estimate_seconds(cpu, 4096, 8, 4096, np.float32, 256, backward=True)
    assert max(seen) <= 256 and large > 10 * small


def test_sampled_rows_hold_the_ends():
    rows = verify.sample_rows(1000, 10, seed=3)
    assert len(rows) == 10 and rows[0] == 0 and rows[-1] == 999
    assert (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(verify.sample_rows(8, None, 0), np.arange(8))
    np.testing.assert_array_equal(verify.sample_rows(8, 100, 0), np.arange(8))


@pytest.mark.parametrize("count", [0, -3])
def test_sampled_rows_refuse_a_count_below_one(count):
    """sample_rows(1000, 0) gave no rows ([:-3] of the ends for -3: some), and a check on no
    rows compares nothing and passes."""
    with pytest.raises(ValueError, match=rf"count must be a positive number of rows or None, "
                                         rf"got {count}"):
        verify.sample_rows(1000, count, seed=0)


def test_memory_estimate_grows_with_the_problem():
    small = verify.estimate_bytes(16384, 8, 64, 2, 256, backward=False)
    assert small < verify.estimate_bytes(16384, 8, 64, 2, 256, backward=True)
    assert small < verify.estimate_bytes(65536, 8, 64, 2, 256, backward=False)
    assert small > 4 * 8 * 16384 * 64 * 2  # at least q, k, v and out


class _UntracedCalls(devices.CpuDevice):
    """The CPU device without its own peak measurement, which resets tracemalloc's peak."""

    def peak_bytes(self, fn):
        return fn(), 0


@pytest.mark.parametrize("backward", [True, False])
def test_memory_estimate_covers_the_peak_of_the_check(backward):
    """Many heads and few rows: the check's whole arrays, not the reference's steps, set the
    peak. The estimate counted two float32 gradients of the baseline where three are held at
    once, and neither their casts nor the comparisons' float64 differences (nor, forward only,
    the NaN scan of out), and was a tenth low. Now it covers the peak NumPy holds, with at most
    a quarter to spare."""
    import tracemalloc

    n, heads, head_dim, dtype = 1024, 16, 128, np.float32
    rows = verify.sample_rows(n, 4, seed=0)
    device = _UntracedCalls()
    cuflash.attention(*(np.ones((1, 1, 8, 8), dtype),) * 3)  # the NumPy path loaded first
    tracemalloc.start()
    try:
        rng = np.random.default_rng(0)
        q, k, v = (rng.standard_normal((1, heads, n, head_dim), dtype=dtype) for _ in range(3))
        verify.run_check(device, q, k, v, rows=rows, causal=False, backward=backward)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    estimate = verify.estimate_bytes(n, heads, head_dim, np.dtype(dtype).itemsize, len(rows),
                                     backward)
    assert peak <= estimate <= 1.25 * peak


def test_flops_follow_the_papers():
    p = problems.Problem(batch=2, heads=3, seq_len=1024, head_dim=64, causal=False)
    assert p.flops("fwd") == 4 * 2 * 3 * 1024 * 1024 * 64
    assert p.flops("fwdbwd") == 3.5 * p.flops("fwd")
    causal = problems.Problem(batch=2, heads=3, seq_len=1024, head_dim=64, causal=True)
    assert causal.flops("fwd") == p.flops("fwd") / 2
    assert p.flops("fwd", density=0.25) == p.flops("fwd") / 4


def test_dense_grid_matches_the_protocol():
    grid = problems.dense_problems()
    assert len(grid) == 5 * 2 * 2
    for p in grid:
        assert p.batch * p.seq_len == 16384 and p.heads * p.head_dim == 2048
        assert p.dtype == "bfloat16"


@pytest.mark.parametrize("sizes, name", [
    ({"seq_lens": (1024, 0)}, "seq_lens"), ({"head_dims": (0,)}, "head_dims"),
    ({"total_tokens": 0}, "total_tokens"), ({"hidden": 0}, "hidden"),
    ({"seq_lens": (-1024,)}, "seq_lens")])
def test_dense_grid_refuses_sizes_below_one_naming_them(sizes, name):
    """dense_problems(seq_lens=(0,)) raised ZeroDivisionError, and a total_tokens or hidden of 0
    gave problems of batch or heads 0: a ValueError names the argument now."""
    with pytest.raises(ValueError, match=rf"^{name} must be positive"):
        problems.dense_problems(**sizes)


@pytest.mark.parametrize("run", ["run_dense", "run_sparse"])
@pytest.mark.parametrize("counts, name", [({"repeats": 0}, "repeats"),
                                          ({"warmup": -1}, "warmup")])
def test_sweeps_refuse_counts_of_runs_out_of_range(run, counts, name):
    """run_dense(..., repeats=0) timed nothing and ended in statistics' 'no median for empty
    data' (on the GPU an IndexError), after making the inputs; a ValueError names the
    argument before anything runs."""
    device = devices.CpuDevice()
    if run == "run_dense":
        call = lambda: sweeps.run_dense(  # noqa: E731
            device, [problems.Problem(1, 1, 64, 16, False)], ("fwd",), baselines=(), **counts)
    else:
        masks = sweeps.sparse_masks(256, block_size=64, densities=(1.0,))
        call = lambda: sweeps.run_sparse(  # noqa: E731
            device, masks, heads=1, baselines=(), **counts)
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        call()


def test_random_block_layout_keeps_the_diagonal():
    layout = sweeps.random_block_layout(64, 0.1, seed=1)
    assert layout.diagonal().all()
    assert layout.mean() == pytest.approx(0.1, abs=1 / 64**2)
    assert sweeps.random_block_layout(8, 1.0).all()
    with pytest.raises(ValueError, match="density"):
        sweeps.random_block_layout(8, 0)


def test_cpu_peak_memory_sees_temporary_arrays():
    device = devices.CpuDevice()
    result, peak = device.peak_bytes(lambda: float(np.ones(2**20).sum()))
    assert result == 2**20 and 8 * 2**20 <= peak < 9 * 2**20


def test_gpu_peak_memory_hook_accounting():
    pytest.importorskip("cupy")
    hook = devices._peak_hook_class()()
    hook.malloc_postprocess(device_id=0, size=1000, mem_size=1024, mem_ptr=1, pmem_id=1)
    hook.malloc_postprocess(device_id=0, size=500, mem_size=512, mem_ptr=2, pmem_id=2)
    hook.free_postprocess(device_id=0, mem_size=1024, mem_ptr=1, pmem_id=1)
    hook.malloc_postprocess(device_id=0, size=100, mem_size=512, mem_ptr=3, pmem_id=3)
    hook.malloc_postprocess(device_id=0, size=10**12, mem_size=10**12, mem_ptr=0, pmem_id=0)
    assert (hook.in_use, hook.peak) == (1024, 1536)


def test_torch_runners_say_torch_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    inputs = problems.Inputs.random(devices.CpuDevice(), (1, 1, 8, 8), "float32")
    with pytest.raises(devices.Unavailable, match="torch not importable"):
        baselines.sdpa_runner("FLASH_ATTENTION", inputs, "fwd", causal=False)
    with pytest.raises(devices.Unavailable, match="torch not importable"):
        baselines.flex_runner(inputs, "fwd", causal=False)


def test_tables_footnote_what_could_not_run():
    record = {"mode": "fwd", "causal": True, "head_dim": 64, "seq_len": 1024, "batch": 16,
              "heads": 32, "ratio": 0.5,
              "time_ms": {"cuflash": 1.0, "sdpa-flash": 0.5, "sdpa-cudnn": None, "flex": None},
              "tflops": {"cuflash": 100.0, "sdpa-flash": 200.0, "sdpa-cudnn": None,
                         "flex": None},
              "notes": {"sdpa-cudnn": "n/a (no kernel)", "flex": "n/a (no kernel)"}}
    table = tables.format_dense_table([record])
    assert "n/a [1]" in table and "[1] no kernel" in table and "[2]" not in table
    assert "0.50" in table and "100.0" in table and "200.0" in table


# ----------------------------------------------------------------------------- on a GPU

GPU_CHECK = ["check", "--device", "gpu", "--json"]


@pytest.mark.gpu
@pytest.mark.parametrize("size", [[], ["--path-256"]], ids=["16K", "64K"])
@pytest.mark.parametrize("pattern", [[], ["--pattern", "image-local"]],
                         ids=["dense", "image-local"])
def test_gpu_check_passes(size, pattern):
    record = json.loads(invoke(*GPU_CHECK, *size, *pattern).stdout)
    assert record["device"] == "gpu" and record["passed"], record["checks"]
    assert record["seq_len"] == (65536 if size else 16384)
    assert set(record["checks"]) == {"out", "dq", "dk", "dv"}


@pytest.mark.gpu
def test_gpu_check_causal_float16():
    record = json.loads(invoke(*GPU_CHECK, "--causal", "--dtype", "float16").stdout)
    assert record["passed"], record["checks"]


@pytest.mark.gpu
def test_gpu_memory_and_bench_smoke():
    memory = json.loads(invoke("memory", "--device", "gpu", "--max-seq-len", "4K", "--json")
                        .stdout)
    assert [r["seq_len"] for r in memory["results"]] == [1024, 2048, 4096]
    for r in memory["results"]:
        assert 0 < r["forward_bytes"] < r["forward_backward_bytes"]
    bench = json.loads(invoke("bench", "--device", "gpu", "--smoke", "--no-torch", "--json")
                       .stdout)
    assert all(r["tflops"]["cuflash"] > 0 for r in bench["results"])
