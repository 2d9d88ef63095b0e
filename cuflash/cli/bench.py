"""``cuflash bench``: TFLOP/s of cuflash next to torch SDPA (flash, cuDNN) and FlexAttention."""

from __future__ import annotations

import click
from click.core import ParameterSource

from cuflash import _bench
from cuflash.cli._common import (choose_device, echo_json, progress, pyplot_or_fail,
                                 translate_errors)
from cuflash.cli._options import (TOKENS, POSITIVE, CommaList, device_option, dtype_option,
                                  json_option, plot_option, seed_option)

EXAMPLES = """\b
Examples:
  cuflash bench --smoke                     tiny sizes: does everything run? (seconds)
  cuflash bench                             the full dense grid (DESIGN.md protocol)
  cuflash bench --seq-lens 4K,16K --head-dims 128 --causal yes --mode fwd
  cuflash bench --sparse                    block-sparse masks, cuflash against FlexAttention
  cuflash bench --no-torch --json > cuflash-only.json
  cuflash bench --plot bench.png
"""

# What --smoke puts in place of the options left at their defaults: one small shape, so that
# FlexAttention compiles few graphs.
SMOKE = {"seq_lens": (512,), "head_dims": (64,), "total_tokens": 1024, "hidden": 256,
         "warmup": 1, "repeats": 3}
SPARSE = {"seq_len": _bench.SPARSE_SEQ_LEN, "heads": _bench.SPARSE_HEADS,
          "densities": _bench.SPARSE_DENSITIES}
SMOKE_SPARSE = {"seq_len": 1024, "heads": 2, "densities": (1.0, 0.25)}


@click.command(short_help="TFLOP/s next to torch SDPA and FlexAttention.", epilog=EXAMPLES)
@click.option("--seq-lens", type=CommaList(TOKENS, "N,N,..."), default="1K,2K,4K,8K,16K",
              show_default=True, help="Sequence lengths of the dense sweep.")
@click.option("--head-dims", type=CommaList(POSITIVE, "D,D,..."), default="64,128",
              show_default=True, help="Head dimensions of the dense sweep.")
@click.option("--causal", "causal_modes", type=click.Choice(["both", "yes", "no"]),
              default="both", show_default=True, help="Causal, non-causal, or both.")
@click.option("--mode", type=click.Choice(["fwd", "fwdbwd", "both"]), default="both",
              show_default=True, help="Time the forward pass, forward+backward, or both.")
@click.option("--total-tokens", type=TOKENS, default="16K", show_default=True,
              help="Tokens per call: batch = total / N.")
@click.option("--hidden", type=POSITIVE, default=2048, show_default=True,
              help="Model width: heads = hidden / D.")
@dtype_option
@click.option("--sparse", is_flag=True,
              help="Run the block-sparse sweep instead: 16K tokens, 32 heads × 64, random "
                   "128×128 block masks (density 1, 0.5, 0.25, 0.1, diagonal kept), butterfly "
                   "and 2-D local, against FlexAttention with the same blocks.")
@click.option("--smoke", is_flag=True,
              help="Tiny sizes and few runs, to check quickly that every implementation runs; "
                   "options given explicitly still apply.")
@click.option("--baselines", type=CommaList(click.Choice(_bench.BASELINES), "NAME,..."),
              default=",".join(_bench.BASELINES), show_default=True,
              help="The torch implementations to time next to cuflash (the sparse sweep "
                   "uses flex only).")
@click.option("--no-torch", is_flag=True,
              help="Time cuflash alone (torch is not imported); same as no --baselines.")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True,
              help="Untimed runs first (the first one compiles).")
@click.option("--repeats", type=POSITIVE, default=20, show_default=True,
              help="Timed runs; the median is reported.")
@device_option
@seed_option
@json_option
@plot_option
@click.pass_context
def bench(ctx, seq_lens, head_dims, causal_modes, mode, total_tokens, hidden, dtype, sparse,
          smoke, baselines, no_torch, warmup, repeats, device, seed, as_json, plot):
    """TFLOP/s of cuflash, side by side with torch's scaled_dot_product_attention (flash and
    cuDNN back ends) and compiled FlexAttention, in the same process on the same arrays (handed
    to torch through DLPack).

    The dense sweep follows DESIGN.md: 16K tokens per call (batch = 16384 / N), hidden size 2048
    (heads = 2048 / D), N from 1K to 16K, D = 64 and 128, causal and not. FLOPs: 4·B·H·N²·D
    for the forward (half when causal), 2.5 times that for the backward. Times are CUDA events
    around each run after warm-up; the table shows the median and the ratio cuflash / SDPA-flash.
    torch is needed only for its columns: without it they read "n/a (torch not importable)".
    """
    if smoke:
        values = {"seq_lens": seq_lens, "head_dims": head_dims, "total_tokens": total_tokens,
                  "hidden": hidden, "warmup": warmup, "repeats": repeats}
        for name, small in SMOKE.items():
            if ctx.get_parameter_source(name) == ParameterSource.DEFAULT:
                values[name] = small
        seq_lens, head_dims, total_tokens, hidden, warmup, repeats = values.values()
    plt = pyplot_or_fail() if plot else None
    target = choose_device(device)
    if target.name == "cpu" and not smoke:
        click.echo("note: on the CPU the NumPy path is timed; the full grid takes hours "
                   "(try --smoke)", err=True)
    modes = ("fwd", "fwdbwd") if mode == "both" else (mode,)
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[causal_modes]
    options = {"baselines": () if no_torch else baselines, "warmup": warmup, "repeats": repeats,
               "seed": seed}

    with translate_errors(target):
        if sparse:
            sizes = SMOKE_SPARSE if smoke else SPARSE
            masks = _bench.sparse_masks(sizes["seq_len"], densities=sizes["densities"],
                                        seed=seed)
            steps = len(masks) * len(modes) * len(_bench.SPARSE_IMPLEMENTATIONS)
            with progress(steps, "timing") as bar:
                records = _bench.run_sparse(target, masks, heads=sizes["heads"], modes=modes,
                                            dtype=dtype.name, on_step=lambda: bar.update(1),
                                            **options)
            table = _bench.format_sparse_table(records)
        else:
            problems = _bench.dense_problems(seq_lens, head_dims, causal,
                                             total_tokens=total_tokens, hidden=hidden,
                                             dtype=dtype.name)
            steps = len(problems) * len(modes) * len(_bench.IMPLEMENTATIONS)
            with progress(steps, "timing") as bar:
                records = _bench.run_dense(target, problems, modes,
                                           on_step=lambda: bar.update(1), **options)
            table = _bench.format_dense_table(records)

    if as_json:
        echo_json({"command": "bench", "sweep": "sparse" if sparse else "dense",
                   "device": target.name, "device_description": target.description,
                   "results": records})
    else:
        click.echo(f"cuflash bench — {target.description}")
        click.echo(table)
    if plot:
        (_plot_sparse if sparse else _plot_dense)(plt, plot, records, target)


def _plot_dense(plt, path, records, device):
    panels = sorted({(r["mode"], r["causal"]) for r in records})
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (mode, causal) in zip(axes[0], panels):
        chosen = [r for r in records if r["mode"] == mode and r["causal"] == causal]
        for d in sorted({r["head_dim"] for r in chosen}):
            rows = [r for r in chosen if r["head_dim"] == d]
            for name in _bench.IMPLEMENTATIONS:
                points = [(r["seq_len"], r["tflops"][name]) for r in rows
                          if r["tflops"].get(name) is not None]
                if points:
                    ax.plot(*zip(*points), marker="o", label=f"{name} D={d}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length N")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{mode}, {'causal' if causal else 'non-causal'}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    figure.suptitle(device.description)
    _save(plt, figure, path)


def _plot_sparse(plt, path, records, device):
    modes = sorted({r["mode"] for r in records})
    figure, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in records if r["mode"] == mode]
        positions = range(len(rows))
        for offset, name in ((-0.2, "cuflash"), (0.2, "flex")):
            ax.bar([p + offset for p in positions],
                   [r["tflops"].get(name) or 0 for r in rows], width=0.4, label=name)
        ax.set_xticks(list(positions), [r["mask"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("effective TFLOP/s")
        ax.set_title(mode)
        ax.legend()
    figure.suptitle(device.description)
    _save(plt, figure, path)


def _save(plt, figure, path):
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    click.echo(f"plot written to {path}", err=True)
