"""``cuflash memory``: peak memory against sequence length, next to the N×N score matrix."""

from __future__ import annotations

import itertools

import click

import cuflash
from cuflash.bench.estimate import attention_seconds
from cuflash.bench.problems import Inputs
from cuflash.cli._common import (NotEnoughMemory, choose_device, echo_json,
                                 interrupted_with_results, progress, pyplot_or_fail,
                                 require_reasonable, save_figure, size, stop_on_ctrl_c, tokens,
                                 translate_errors)
from cuflash.cli._options import (BOUNDED_TOKENS, batch_option, causal_option, device_option,
                                  dtype_option, force_option, head_dim_option, heads_option,
                                  json_option, plot_option)

DEFAULT_MAX = {"gpu": 2**20, "cpu": 4096}

EXAMPLES = """\b
Examples:
  cuflash memory                                1K … 1M tokens, or until the GPU is full
  cuflash memory --max-seq-len 4M --plot memory.png
  cuflash memory --heads 32 --head-dim 128 --dtype float16 --causal
  cuflash memory --device cpu --max-seq-len 2K --json
"""


def _measure(device, n, *, batch, heads, head_dim, dtype, causal, seed):
    """Peak bytes of the forward and of forward+backward at length ``n``, inputs included."""
    shape = (batch, heads, n, head_dim)
    inputs = Inputs.random(device, shape, dtype, seed)
    q, k, v, dout = inputs.q, inputs.k, inputs.v, inputs.dout
    held = sum(x.nbytes for x in (q, k, v))
    _, forward = device.peak_bytes(lambda: cuflash.attention(q, k, v, causal=causal))

    def forward_backward():
        out, lse = cuflash.attention(q, k, v, causal=causal, return_lse=True)
        return cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal)

    _, both = device.peak_bytes(forward_backward)
    return held + forward, held + dout.nbytes + both


def _lengths(low, high):
    n = low
    while n <= high:
        yield n
        n *= 2


@click.command(short_help="Peak memory against sequence length, next to N×N.",
               epilog=EXAMPLES)
@heads_option(16)
@head_dim_option(64)
@batch_option(1)
@dtype_option
@causal_option
@device_option
@click.option("--min-seq-len", type=BOUNDED_TOKENS, default="1K", show_default=True,
              help="First sequence length; it doubles from there.")
@click.option("--max-seq-len", type=BOUNDED_TOKENS, default=None,
              help="Last sequence length to try [default: 1M on the GPU, 4K on the CPU, or "
                   "--min-seq-len if larger]. The sweep stops earlier when the device is full.")
@force_option
@json_option
@plot_option
def memory(heads, head_dim, batch, dtype, causal, device, min_seq_len, max_seq_len, force,
           as_json, plot):
    """Peak memory of the forward pass and of forward+backward, doubling the sequence length
    until --max-seq-len or until the device is full.

    Peak memory is the most memory the arrays of a call held at once, its inputs included (on
    the GPU: bytes handed out by CuPy's memory pool, followed by a memory hook; on the CPU:
    tracemalloc). Next to it stands what standard attention needs for one N×N score matrix per
    head and batch element, the matrix FlashAttention never forms (compare Table 21 of the
    FlashAttention paper).

    Before it starts, the sweep estimates its time: it stops (exit status 3) when it would take
    over 30 minutes unless --force is given, or when the arrays of its first length
    (--min-seq-len) would not fit in the free memory. A later length whose arrays would not
    fit is not tried: the sweep ends there and says so. Ctrl-C ends it early too, with the
    table of the lengths measured so far (exit status 130).
    """
    with stop_on_ctrl_c("no length was measured"):
        plt = pyplot_or_fail(plot) if plot else None
        target, _ = choose_device(device)
        if max_seq_len is not None and max_seq_len < min_seq_len:
            raise click.BadParameter(f"is smaller than --min-seq-len {min_seq_len}",
                                     param_hint="--max-seq-len")
        high = max_seq_len or max(min_seq_len, DEFAULT_MAX[target.name])
        shape = {"batch": batch, "heads": heads, "head_dim": head_dim, "dtype": dtype}
        lengths = list(_lengths(min_seq_len, high))
        # The lengths the sweep runs: up to the first whose arrays cannot fit, where it stops.
        free = target.free_bytes()
        fitting = list(itertools.takewhile(lambda n: _arrays_bytes(n, **shape) <= free,
                                           lengths)) or lengths[:1]
        estimate = sum(attention_seconds(target, seq_len=n, causal=causal, backward=True,
                                         calls=2, **shape) for n in fitting)
        each = {f"{tokens(n)} tokens": _arrays_bytes(n, **shape)
                for n in lengths[:len(fitting) + 1]}
        first = _arrays_bytes(min_seq_len, **shape)
        # Memory refuses the sweep only when its first length cannot fit (a later one ends it
        # there); time refuses the whole sweep.
        shorter = "--min-seq-len" if first > free else "--max-seq-len"
        require_reasonable(target, seconds=estimate, needed=first, what="this sweep",
                           force=force, each=each,
                           smaller=f"use a smaller {shorter}, fewer heads or a smaller batch")

    records, stopped = [], None
    with translate_errors(target), progress(len(lengths), "measuring",
                                            enabled=not as_json) as bar:
        for n in lengths:
            needed, free = _arrays_bytes(n, **shape), target.free_bytes()
            if needed > free:
                stopped = (f"stopped at {tokens(n)} tokens: its arrays alone would need "
                           f"{size(needed)} of {target.name} memory, {size(free)} is free")
                break
            try:
                forward, both = _measure(target, n, causal=causal, seed=0, **shape)
            except target.out_of_memory as error:
                # free memory read here, once the failed attempt's arrays are released
                stopped = (f"stopped at {tokens(n)} tokens: out of {target.name} memory (its "
                           f"arrays alone need {size(needed)}, {size(target.free_bytes())} is "
                           f"free): {str(error).strip()}")
                break
            except KeyboardInterrupt:
                stopped = f"interrupted by Ctrl-C at {tokens(n)} tokens"
                break
            records.append({"seq_len": n, "forward_bytes": forward,
                            "forward_backward_bytes": both,
                            "scores_bytes": batch * heads * n * n * dtype.itemsize})
            bar.update(1)

    setup = {"heads": heads, "head_dim": head_dim, "batch": batch, "dtype": dtype.name,
             "causal": causal}
    if as_json:
        echo_json({"command": "memory", "device": target.name,
                   "device_description": target.description, **setup, "results": records,
                   "stopped": stopped})
    else:
        _print_table(setup, records, stopped, target)
    if plot and records:
        _plot(plt, plot, setup, records, target)
    elif plot:  # asked for, and not to be taken for written
        click.echo(f"no plot written to {plot}: no length was measured", err=True)
    if stopped and stopped.startswith("interrupted"):
        raise interrupted_with_results("lengths", as_json)
    if not records:
        # nothing measured, not even --min-seq-len: the request did not fit, as when refused
        raise NotEnoughMemory(f"no length was measured: the first, {tokens(min_seq_len)} tokens, "
                              f"did not fit in the free {target.name} memory; use a smaller "
                              "--min-seq-len, fewer heads or a smaller batch")


def _arrays_bytes(n, *, batch, heads, head_dim, dtype):
    """Memory the arrays of a forward+backward call at length ``n`` need at least: q, k, v,
    dout, out and the three gradients in the input dtype, lse, and float32 scratch for dq."""
    elements = batch * heads * n * head_dim
    return elements * (8 * dtype.itemsize + 4) + batch * heads * n * 8


def _print_table(setup, records, stopped, device):
    click.echo(f"cuflash memory — {setup['heads']} heads × {setup['head_dim']}, batch "
               f"{setup['batch']}, {setup['dtype']}, "
               f"{'causal' if setup['causal'] else 'non-causal'}, {device.description}")
    click.echo("peak memory, inputs included; N×N scores: one score matrix per head, as "
               "standard attention forms it")
    click.echo("")
    header = ("N", "forward", "forward+backward", "N×N scores")
    rows = [(tokens(r["seq_len"]), size(r["forward_bytes"]), size(r["forward_backward_bytes"]),
             size(r["scores_bytes"])) for r in records]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        click.echo("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    if stopped:
        click.echo(stopped)


def _plot(plt, path, setup, records, device):
    lengths = [r["seq_len"] for r in records]
    mib = 2.0**20
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for key, label in (("forward_bytes", "cuflash forward"),
                       ("forward_backward_bytes", "cuflash forward+backward"),
                       ("scores_bytes", "N×N score matrix (standard attention)")):
        axes.plot(lengths, [r[key] / mib for r in records], marker="o", label=label)
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("sequence length N")
    axes.set_ylabel("peak memory (MiB)")
    axes.set_title(f"{setup['heads']} heads × {setup['head_dim']}, batch {setup['batch']}, "
                   f"{setup['dtype']} — {device.name}")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    save_figure(plt, figure, path)
