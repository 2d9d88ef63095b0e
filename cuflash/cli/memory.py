"""``cuflash memory``: peak memory against sequence length, next to the N×N score matrix."""

from __future__ import annotations

import click

import cuflash
from cuflash._bench import Inputs
from cuflash.cli._common import (choose_device, echo_json, progress, pyplot_or_fail, size,
                                 tokens, translate_errors)
from cuflash.cli._options import (TOKENS, batch_option, causal_option, device_option,
                                  dtype_option, head_dim_option, heads_option, json_option,
                                  plot_option)

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
@click.option("--min-seq-len", type=TOKENS, default="1K", show_default=True,
              help="First sequence length; it doubles from there.")
@click.option("--max-seq-len", type=TOKENS, default=None,
              help="Last sequence length to try [default: 1M on the GPU, 4K on the CPU]. "
                   "The sweep stops earlier when the device is full.")
@json_option
@plot_option
def memory(heads, head_dim, batch, dtype, causal, device, min_seq_len, max_seq_len, as_json,
           plot):
    """Peak memory of the forward pass and of forward+backward, doubling the sequence length
    until --max-seq-len or until the device runs out of memory.

    Peak memory is the most memory the arrays of a call held at once, its inputs included (on
    the GPU: bytes handed out by CuPy's memory pool, followed by a memory hook; on the CPU:
    tracemalloc). Next to it stands what standard attention needs for one N×N score matrix per
    head and batch element, the matrix FlashAttention never forms (compare Table 21 of the
    FlashAttention paper).
    """
    plt = pyplot_or_fail() if plot else None
    target = choose_device(device)
    high = max_seq_len or DEFAULT_MAX[target.name]
    if high < min_seq_len:
        raise click.BadParameter(f"is smaller than --min-seq-len {min_seq_len}",
                                 param_hint="--max-seq-len")
    lengths = list(_lengths(min_seq_len, high))
    records, failure = [], None
    with translate_errors(target), progress(len(lengths), "measuring") as bar:
        for n in lengths:
            try:
                forward, both = _measure(target, n, batch=batch, heads=heads, head_dim=head_dim,
                                         dtype=dtype, causal=causal, seed=0)
            except target.out_of_memory as error:
                failure = (n, str(error).strip())
                break
            records.append({"seq_len": n, "forward_bytes": forward,
                            "forward_backward_bytes": both,
                            "scores_bytes": batch * heads * n * n * dtype.itemsize})
            bar.update(1)
    stopped = None
    if failure:  # free memory read here, once the failed attempt's arrays are released
        n, message = failure
        needed = 8 * batch * heads * n * head_dim * dtype.itemsize  # q, k, v, out and grads
        stopped = (f"stopped at {tokens(n)} tokens: out of {target.name} memory (its arrays "
                   f"alone need {size(needed)}, {size(target.free_bytes())} is free): {message}")

    setup = {"heads": heads, "head_dim": head_dim, "batch": batch, "dtype": dtype.name,
             "causal": causal}
    if as_json:
        echo_json({"command": "memory", "device": target.name,
                   "device_description": target.description, **setup, "results": records,
                   "stopped": stopped})
    else:
        _print_table(setup, records, stopped, target)
    if plot:
        _plot(plt, plot, setup, records, target)


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
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    click.echo(f"plot written to {path}", err=True)
