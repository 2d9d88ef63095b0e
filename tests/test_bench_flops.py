"""FLOP counts and table cells of the benchmark engine (cuflash.bench), on the CPU."""

import re

import numpy as np
import pytest

from cuflash.bench import problems, tables


def _kept_pairs(nq, nk):
    """Query-key pairs a bottom-right causal mask keeps: query i sees keys j <= i + nk - nq."""
    i = np.arange(nq)[:, None]
    j = np.arange(nk)[None, :]
    return int(np.count_nonzero(j <= i + nk - nq))


@pytest.mark.parametrize("nq, nk", [(1, 4096), (128, 4096), (512, 1024), (4096, 1024),
                                    (4096, 4096)])
def test_causal_flops_count_the_bottom_right_triangle(nq, nk):
    counted = problems.forward_flops(1, 1, nq, nk, 64, causal=True)
    exact = 4 * 64 * _kept_pairs(nq, nk)
    # The papers' N²/2 for square calls: the continuous area of the kept region, within one
    # diagonal of the exact count.
    assert abs(counted - exact) <= 4 * 64 * max(nq, nk)


def test_causal_flops_of_square_calls_stay_half():
    assert problems.forward_flops(2, 3, 1024, 1024, 64, causal=True) == \
        problems.forward_flops(2, 3, 1024, 1024, 64) / 2


def test_decode_causal_flops_are_the_full_row():
    # one query at the bottom right sees every key: nothing to halve
    assert problems.forward_flops(1, 8, 1, 8192, 128, causal=True) == pytest.approx(
        problems.forward_flops(1, 8, 1, 8192, 128), rel=1e-3)


def test_value_dim_counts_the_pv_product_with_dv():
    # q·kᵀ is 2·Nq·Nk·D, p·v is 2·Nq·Nk·Dv
    assert problems.forward_flops(2, 4, 256, 512, 192, value_dim=128) == \
        2.0 * 2 * 4 * 256 * 512 * (192 + 128)
    assert problems.forward_flops(2, 4, 256, 512, 64, value_dim=64) == \
        problems.forward_flops(2, 4, 256, 512, 64)


@pytest.mark.parametrize("name, value", [("nq", 0), ("nk", -1), ("head_dim", 0),
                                         ("value_dim", 0), ("batch", -2), ("heads", 0)])
def test_forward_flops_refuses_sizes_below_one(name, value):
    sizes = {"batch": 1, "heads": 2, "nq": 64, "nk": 64, "head_dim": 32}
    kwargs = {}
    if name == "value_dim":
        kwargs["value_dim"] = value
    else:
        sizes[name] = value
    with pytest.raises(ValueError, match=name):
        problems.forward_flops(*sizes.values(), **kwargs)


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_forward_flops_refuses_fractions_outside_0_1(fraction):
    with pytest.raises(ValueError, match="fraction"):
        problems.forward_flops(1, 1, 64, 64, 32, fraction=fraction)


def _record(ratio, flash=1.0):
    """A dense row where cuflash reaches ``ratio`` times SDPA-flash's TFLOP/s."""
    return {"mode": "fwd", "causal": False, "head_dim": 64, "seq_len": 512, "batch": 2,
            "heads": 4, "tflops": {"cuflash": ratio * flash, "sdpa-flash": flash},
            "notes": {"sdpa-cudnn": "n/a (not run)", "flex": "n/a (not run)"}, "ratio": ratio}


def test_small_ratios_keep_their_digits():
    # a ratio of 0.0077 printed as "0.01" would read as 30 % off
    table = tables.format_dense_table([_record(0.00773)])
    assert "0.00773" in table
    assert "1.25" in tables.format_dense_table([_record(1.25)])
    assert "0.50" in tables.format_dense_table([_record(0.5)])


def _cells(table):
    """The header and rows of a table as dicts of column name to cell (columns are set apart
    by two spaces or more; a cell such as "n/a [1]" holds one)."""
    lines = [line for line in table.splitlines()[1:] if not line.startswith("[")]
    header, *rows = (re.split(r"\s{2,}", line.strip()) for line in lines)
    return [dict(zip(header, row, strict=True)) for row in rows]


def _dense(tflops, notes=None):
    return {"mode": "fwd", "causal": True, "head_dim": 128, "seq_len": 4096, "batch": 4,
            "heads": 16, "tflops": tflops, "notes": notes or {},
            "ratio": tflops["cuflash"] / tflops["sdpa-flash"]}


def test_dense_table_gives_cuflash_against_every_baseline_it_measured():
    """The targets are stated against cuDNN: the table gave cuflash / SDPA-flash alone."""
    measured = _dense({"cuflash": 400.0, "sdpa-flash": 500.0, "sdpa-cudnn": 320.0,
                       "flex": 200.0})
    cudnn_refused = _dense({"cuflash": 300.0, "sdpa-flash": 250.0, "sdpa-cudnn": None,
                            "flex": None},
                           {"sdpa-cudnn": "n/a (no kernel)", "flex": "n/a (not run)"})
    table = tables.format_dense_table([measured, cudnn_refused])
    first, second = _cells(table)
    assert (first["cuflash/flash"], first["cuflash/cudnn"], first["cuflash/flex"]) == \
        ("0.80", "1.25", "2.00")
    assert (second["cuflash/flash"], second["cuflash/cudnn"], second["cuflash/flex"]) == \
        ("1.20", "-", "-")
    assert second["sdpa-cudnn"] == "n/a [1]"


@pytest.mark.parametrize("format_table", [tables.format_dense_table, tables.format_sparse_table])
def test_tables_say_which_way_their_ratios_go(format_table):
    record = {**_dense({"cuflash": 2.0, "sdpa-flash": 1.0, "sdpa-cudnn": 1.0, "flex": 1.0}),
              "mask": "random 0.5", "density": 0.5,
              "time_ms": {"cuflash": 1.0, "flex": 2.0}}
    title = format_table([record]).splitlines()[0]
    assert "cuflash/X = X's time / cuflash's" in title and "above 1: cuflash is faster" in title


def test_sparse_table_names_whose_tflops_each_column_is():
    record = {"mode": "fwd", "mask": "random 0.5", "density": 0.5,
              "time_ms": {"cuflash": 2.0, "flex": 3.0}, "tflops": {"cuflash": 50.0, "flex": 30.0},
              "notes": {}, "ratio": 50 / 30}
    header = tables.format_sparse_table([record]).splitlines()[1]
    assert "cuflash TFLOP/s" in header and "flex TFLOP/s" in header


@pytest.mark.parametrize("mode, dtype", [("fwd", "bfloat16"), ("fwdbwd", "bfloat16"),
                                         ("fwdbwd", "float32")])
def test_bench_refuses_a_sweep_whose_run_would_not_fit(monkeypatch, mode, dtype):
    """The estimate counted 8 arrays of the input dtype: a fwd+bwd call on the CPU holds about
    twice that (float32 working copies, the backward's scratch), so a sweep said to fit could
    run out of memory part way. Free memory just under what the run holds is refused."""
    from click.testing import CliRunner

    from cuflash.bench import devices, sweeps
    from cuflash.cli import main

    device = devices.CpuDevice()
    inputs = problems.Inputs.random(device, (2, 4, 512, 64), dtype)  # --smoke's one problem
    run = sweeps.cuflash_runner(inputs, mode, causal=False)
    run()
    _, peak = device.peak_bytes(run)
    held = sum(x.nbytes for x in (inputs.q, inputs.k, inputs.v, inputs.dout)) + peak
    monkeypatch.setattr(devices.CpuDevice, "free_bytes", lambda self: held - 1)
    result = CliRunner().invoke(main, ["bench", "--smoke", "--device", "cpu", "--no-torch",
                                       "--causal", "no", "--mode", mode, "--dtype", dtype])
    assert result.exit_code == 3, result.output
    assert "needs about" in result.output


def _kept_by_cuflash(nq, nk, **options):
    """Pairs cuflash's float64 reference attends to: with equal scores, each row's output over
    v = the identity is 1 / count on the keys it keeps and 0 elsewhere."""
    from cuflash import reference
    q, k = np.zeros((nq, 8)), np.zeros((nk, 8))
    out, _ = reference.attention(q, k, np.eye(nk), **options)
    return int(np.count_nonzero(out))


@pytest.mark.parametrize("nq, nk, window, causal", [
    (6, 6, (2, 1), False), (6, 6, (-1, 1), False), (6, 6, (1, -1), False), (6, 6, (0, 0), False),
    (3, 6, (1, 0), False), (5, 2, (0, 0), False), (6, 6, (2, 1), True), (7, 40, (3, 5), False),
    (40, 7, (3, 5), True), (33, 33, (-1, 0), False), (9, 20, (50, 50), False)])
def test_window_flops_count_the_pairs_the_band_keeps(nq, nk, window, causal):
    kept = _kept_by_cuflash(nq, nk, window=window, causal=causal)
    assert problems.forward_flops(1, 1, nq, nk, 16, window=window, causal=causal) == \
        4 * 16 * kept


def test_window_flops_refuse_a_malformed_window():
    with pytest.raises(ValueError, match="window"):
        problems.forward_flops(1, 1, 8, 8, 16, window=(-2, 0))


def test_an_unknown_mode_is_refused_by_name():
    """flops("bwd") counted the forward alone, silently; the sweeps failed with a KeyError."""
    from cuflash.bench import devices, sweeps
    problem = problems.Problem(batch=1, heads=1, seq_len=64, head_dim=16, causal=False)
    with pytest.raises(ValueError, match="mode must be 'fwd' or 'fwdbwd'"):
        problem.flops("bwd")
    with pytest.raises(ValueError, match="modes must be 'fwd' or 'fwdbwd'"):
        sweeps.run_dense(devices.CpuDevice(), [problem], ("fwd", "bwd"), baselines=())
    with pytest.raises(ValueError, match="modes must be 'fwd' or 'fwdbwd'"):
        sweeps.run_sparse(devices.CpuDevice(), sweeps.sparse_masks(256, densities=(1.0,)),
                          modes=("backward",), baselines=())


def test_sparse_plot_draws_no_bar_where_an_implementation_did_not_run(monkeypatch):
    """A bar of height 0 read as 0 TFLOP/s where FlexAttention had not run at all."""
    import importlib
    import math
    from unittest import mock

    bench_cli = importlib.import_module("cuflash.cli.bench")  # the module, not the command

    plt = mock.MagicMock()
    ax = mock.MagicMock()
    plt.subplots.return_value = (mock.MagicMock(), [[ax]])
    monkeypatch.setattr(bench_cli, "save_figure", lambda *args: None)
    record = {"mode": "fwd", "mask": "random 1", "tflops": {"cuflash": 5.0, "flex": None}}
    bench_cli._plot_sparse(plt, "out.png", [record], mock.MagicMock(description="cpu"))
    heights = {call.kwargs["label"]: call.args[1] for call in ax.bar.call_args_list}
    assert heights["cuflash"] == [5.0]
    assert math.isnan(heights["flex"][0])
