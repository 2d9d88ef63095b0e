"""``cuflash bench``: TFLOP/s of cuflash next to torch SDPA (flash, cuDNN) and FlexAttention."""

from __future__ import annotations

import importlib.util
import math

import click

import cuflash.bench as measure
from cuflash.bench.estimate import (KERNEL_COMPILE_SECONDS, attention_bytes, attention_seconds,
                                    compile_seconds, kernel_variants)
from cuflash.bench.sweeps import dense_row, sparse_row
from cuflash.cli._common import (Interrupted, choose_device, echo_json, given_options,
                                 interrupted_with_results, progress, pyplot_or_fail,
                                 require_reasonable, save_figure, stop_on_ctrl_c,
                                 translate_errors)
from cuflash.cli._options import (BOUNDED_TOKENS, COUNT, POSITIVE, CommaList, device_option,
                                  dtype_option, force_option, json_option, plot_option,
                                  seed_option)

EXAMPLES = """\b
Examples:
  cuflash bench --smoke                     tiny sizes: does everything run? (seconds)
  cuflash bench                             the full dense grid (docs/design.md protocol)
  cuflash bench --seq-lens 4K,16K --head-dims 128 --causal yes --mode fwd
  cuflash bench --sparse                    block-sparse masks, cuflash against FlexAttention
  cuflash bench --no-torch --json > cuflash-only.json
  cuflash bench --plot bench.png
"""

# What --smoke puts in place of the options left at their defaults: one small shape, so that
# FlexAttention compiles few graphs.
SMOKE = {"seq_lens": (512,), "head_dims": (64,), "total_tokens": 1024, "hidden": 256,
         "warmup": 1, "repeats": 3}
SPARSE = {"seq_len": measure.SPARSE_SEQ_LEN, "heads": measure.SPARSE_HEADS,
          "densities": measure.SPARSE_DENSITIES}
SMOKE_SPARSE = {"seq_len": 1024, "heads": 2, "densities": (1.0, 0.25)}


@click.command(short_help="TFLOP/s next to torch SDPA and FlexAttention.", epilog=EXAMPLES)
@click.option("--seq-lens", type=CommaList(BOUNDED_TOKENS, "N,N,..."),
              default="1K,2K,4K,8K,16K", show_default=True,
              help="Sequence lengths of the dense sweep.")
@click.option("--head-dims", type=CommaList(POSITIVE, "D,D,..."), default="64,128",
              show_default=True, help="Head dimensions of the dense sweep.")
@click.option("--causal", "causal_modes", type=click.Choice(["both", "yes", "no"]),
              default="both", show_default=True, help="Causal, non-causal, or both.")
@click.option("--mode", type=click.Choice(["fwd", "fwdbwd", "both"]), default="both",
              show_default=True, help="Time the forward pass, forward+backward, or both.")
@click.option("--total-tokens", type=BOUNDED_TOKENS, default="16K", show_default=True,
              help="Tokens per call: batch = total / N (a multiple of every N).")
@click.option("--hidden", type=POSITIVE, default=2048, show_default=True, metavar="N",
              help="Model width: heads = hidden / D (a multiple of every D).")
@dtype_option
@click.option("--sparse", is_flag=True,
              help="Run the block-sparse sweep instead: 16K tokens, 32 heads × 64, random "
                   "128×128 block masks (density 1, 0.5, 0.25, 0.1, diagonal kept), butterfly "
                   "and 2-D local, against FlexAttention with the same blocks.")
@click.option("--smoke", is_flag=True,
              help="Tiny sizes and few runs, to check quickly that every implementation runs; "
                   "options given explicitly still apply.")
@click.option("--baselines", type=CommaList(click.Choice(measure.BASELINES), "NAME,..."),
              default=",".join(measure.BASELINES), show_default=True,
              help="The torch implementations to time next to cuflash (the sparse sweep "
                   "uses flex only).")
@click.option("--no-torch", is_flag=True,
              help="Time cuflash alone (torch is not imported); same as no --baselines.")
@click.option("--warmup", type=COUNT, default=3, show_default=True, metavar="N",
              help="Untimed runs first (the first one compiles).")
@click.option("--repeats", type=POSITIVE, default=20, show_default=True, metavar="N",
              help="Timed runs; the median is reported.")
@device_option
@seed_option
@force_option
@json_option
@plot_option
@click.pass_context
def bench(ctx, seq_lens, head_dims, causal_modes, mode, total_tokens, hidden, dtype, sparse,
          smoke, baselines, no_torch, warmup, repeats, device, seed, force, as_json, plot):
    """TFLOP/s of cuflash, side by side with torch's scaled_dot_product_attention (flash and
    cuDNN back ends) and compiled FlexAttention, in the same process on the same arrays (handed
    to torch through DLPack).

    The dense sweep follows the protocol of docs/design.md: 16K tokens per call (batch =
    16384 / N), hidden size 2048 (heads = 2048 / D), N from 1K to 16K, D = 64 and 128, causal
    and not. FLOPs: 4·B·H·N²·D for the forward (half when causal), 2.5 times that for the
    backward. Times are CUDA events around each run after warm-up; the table shows the median
    and cuflash's TFLOP/s over each baseline's (cuflash/flash, cuflash/cudnn, cuflash/flex: the
    baseline's time over cuflash's, above 1 where cuflash is faster). torch is needed only for
    its columns: without it they read "n/a (torch not importable)".

    Before it starts, bench estimates its time and memory: it stops (exit status 3) when the
    memory is not free, or when it would take over 30 minutes unless --force is given. Ctrl-C
    ends it early, with the table of the rows measured so far (exit status 130). A row whose
    call cuflash refuses says why in the table, the other rows run, and the exit status is 1.
    """
    explicit = given_options(ctx)
    _check_combinations(explicit, sparse, no_torch, baselines)
    set_by_smoke = set()
    if smoke:
        values = {"seq_lens": seq_lens, "head_dims": head_dims, "total_tokens": total_tokens,
                  "hidden": hidden, "warmup": warmup, "repeats": repeats}
        for name, small in SMOKE.items():
            if name not in explicit:
                values[name] = small
                set_by_smoke.add(name)
        seq_lens, head_dims, total_tokens, hidden, warmup, repeats = values.values()
    if not sparse:
        _check_grid(seq_lens, head_dims, total_tokens, hidden, set_by_smoke)
    with stop_on_ctrl_c("no table was printed"):
        plt = pyplot_or_fail(plot) if plot else None
        target, _ = choose_device(device)
    modes = ("fwd", "fwdbwd") if mode == "both" else (mode,)
    causal = {"both": (False, True), "yes": (True,), "no": (False,)}[causal_modes]
    chosen = () if no_torch else (("flex",) if sparse else baselines)
    options = {"baselines": chosen, "warmup": warmup, "repeats": repeats, "seed": seed}
    smaller = ("use --smoke, fewer --seq-lens or --head-dims, fewer --repeats or --baselines"
               if not sparse else "use --smoke or fewer --repeats")
    # Each call of the dense grid holds total tokens × hidden elements per array, whatever N
    # and D; the sparse sweep's sizes are fixed.
    smaller_memory = "use a smaller --total-tokens or --hidden" if not sparse else "use --smoke"

    with translate_errors(target), stop_on_ctrl_c("no table was printed"):
        if sparse:
            sizes = SMOKE_SPARSE if smoke else SPARSE
            masks = measure.sparse_masks(sizes["seq_len"], densities=sizes["densities"],
                                         seed=seed)
            problems = [(measure.Problem(1, sizes["heads"], mask.shape[0],
                                         measure.SPARSE_HEAD_DIM, False, dtype.name),
                         mask.element_density) for _, mask in masks]
            _require_reasonable(target, problems, modes, chosen, warmup, repeats, force,
                                smaller, smaller_memory)
            steps = len(masks) * len(modes) * len(measure.SPARSE_IMPLEMENTATIONS)
            with progress(steps, "timing", enabled=not as_json) as bar:
                # One row (mask and mode) at a time, so that Ctrl-C, or cuflash refusing one
                # row, keeps the rows measured.
                runs = [(sparse_row(*labelled, heads=sizes["heads"],
                                    head_dim=measure.SPARSE_HEAD_DIM, batch=1, dtype=dtype.name,
                                    mode=m),
                         lambda labelled=labelled, m=m: measure.run_sparse(
                             target, [labelled], heads=sizes["heads"], modes=(m,),
                             dtype=dtype.name, on_step=lambda: bar.update(1), **options))
                        for labelled in masks for m in modes]
                records, stopped = _run_rows(runs, measure.SPARSE_IMPLEMENTATIONS)
            format_table = measure.format_sparse_table
        else:
            grid = measure.dense_problems(seq_lens, head_dims, causal, total_tokens=total_tokens,
                                          hidden=hidden, dtype=dtype.name)
            _require_reasonable(target, [(p, 1.0) for p in grid], modes, chosen, warmup,
                                repeats, force, smaller, smaller_memory)
            steps = len(grid) * len(modes) * len(measure.IMPLEMENTATIONS)
            with progress(steps, "timing", enabled=not as_json) as bar:
                runs = [(dense_row(problem, m),
                         lambda problem=problem, m=m: measure.run_dense(
                             target, [problem], (m,), on_step=lambda: bar.update(1), **options))
                        for problem in grid for m in modes]
                records, stopped = _run_rows(runs, measure.IMPLEMENTATIONS)
            format_table = measure.format_dense_table
        if stopped and not records:
            raise Interrupted("interrupted by Ctrl-C; no table was printed")

    if as_json:
        echo_json({"command": "bench", "sweep": "sparse" if sparse else "dense",
                   "device": target.name, "device_description": target.description,
                   "results": records, "stopped": stopped})
    else:
        click.echo(f"cuflash bench — {target.description}")
        click.echo(format_table(records))
        if stopped:
            click.echo(stopped)
    if plot:
        (_plot_sparse if sparse else _plot_dense)(plt, plot, records, target)
    if stopped:
        raise interrupted_with_results("rows", as_json)
    refused = sum(1 for record in records if record["refused"])
    if refused:
        where = 'their "refused" says why' if as_json else "the table above says why"
        raise click.ClickException(f"cuflash refused {refused} of {len(records)} rows; {where}")


def _run_rows(runs, columns):
    """Run each ``run()`` of ``runs``, ``(row, run)`` pairs (one row of the table each, ``row``
    what names it), and gather their records; Ctrl-C stops there. A row whose call cuflash
    refuses (ValueError) gets a record saying why, and the next row runs. Returns ``(records,
    stopped)``: ``stopped`` says where it was interrupted, or is None."""
    records = []
    try:
        for row, run in runs:
            try:
                records.extend(dict(record, refused=None) for record in run())
            except ValueError as error:
                records.append(_refused_record(row, columns, str(error)))
    except KeyboardInterrupt:
        return records, f"interrupted by Ctrl-C after {len(records)} of {len(runs)} rows"
    return records, None


def _refused_record(row, columns, reason):
    """The record of a row cuflash refused: no times, its reason as cuflash's note (a footnote
    of the table), the baselines not run."""
    return {**row, "time_ms": dict.fromkeys(columns), "tflops": dict.fromkeys(columns),
            "notes": {name: f"n/a (refused: {reason})" if name == "cuflash" else "n/a (not run)"
                      for name in columns},
            "ratio": None, "refused": reason}


# Options that shape the dense grid, which the block-sparse sweep (fixed sizes) does not read.
DENSE_ONLY = {"seq_lens": "--seq-lens", "head_dims": "--head-dims", "causal_modes": "--causal",
              "total_tokens": "--total-tokens", "hidden": "--hidden"}


def _check_combinations(explicit, sparse, no_torch, baselines):
    """Refuse options that would be silently ignored in this combination."""
    if sparse:
        for name, option in DENSE_ONLY.items():
            if name in explicit:
                raise click.BadParameter(
                    "shapes the dense sweep only; --sparse runs its fixed sizes (16K tokens, "
                    "32 heads × 64, or --smoke for 1K tokens and 2 heads)", param_hint=option)
        if "baselines" in explicit and set(baselines) != {"flex"}:
            raise click.BadParameter("the sparse sweep compares with flex only (SDPA has no "
                                     "block-sparse masks); give --baselines flex or leave it out",
                                     param_hint="--baselines")
    if no_torch and "baselines" in explicit:
        raise click.BadParameter("--no-torch runs no baselines; give one of the two",
                                 param_hint="--baselines")


def _check_grid(seq_lens, head_dims, total_tokens, hidden, set_by_smoke):
    """Refuse a grid that cannot be run as asked: batch = total / N and heads = hidden / D must
    be whole numbers."""
    for name, option, total, sizes_name, sizes_option, sizes, what in (
            ("total_tokens", "--total-tokens", total_tokens, "seq_lens", "--seq-lens", seq_lens,
             "batch = total / N"),
            ("hidden", "--hidden", hidden, "head_dims", "--head-dims", head_dims,
             "heads = hidden / D")):
        for size in sizes:
            if total % size:
                # Either side may be a --smoke value the user never typed: say which.
                by = " (set by --smoke)" if name in set_by_smoke else ""
                size_by = f" ({sizes_option}, set by --smoke)" if sizes_name in set_by_smoke \
                    else ""
                step = math.lcm(*sizes)
                raise click.BadParameter(
                    f"{total}{by} is not a multiple of {size}{size_by}, so {what} would not be "
                    f"a whole number; give a multiple of every value asked for, such as "
                    f"{step * -(-total // step)}", param_hint=option)


# FlexAttention compiles one graph per shape and mode: about this long each, on the first call.
FLEX_COMPILE_SECONDS = 10


def _require_reasonable(device, problems, modes, baselines, warmup, repeats, force, smaller,
                        smaller_memory):
    """Estimate the sweep (cuflash's runs and the first compile of its kernel variants, each
    baseline taken as long as cuflash, FlexAttention's compiles) and the memory of its largest
    problem, and refuse or warn as the other commands do: ``smaller`` says how to ask for less
    time, ``smaller_memory`` for less memory."""
    torch_present = importlib.util.find_spec("torch") is not None
    # every problem is a call of its own (the sparse sweep's differ in their masks alone)
    variants = kernel_variants(len(problems), modes)
    compiling = compile_seconds(device, variants)
    seconds, needed = compiling, 0
    for problem, fraction in problems:
        b, h, n, d = problem.shape
        for mode in modes:
            one = attention_seconds(device, batch=b, heads=h, seq_len=n, head_dim=d,
                                    dtype=problem.dtype, causal=problem.causal,
                                    fraction=fraction, backward=mode == "fwdbwd",
                                    calls=warmup + repeats)
            seconds += one * (1 + (len(baselines) if torch_present else 0))
            if torch_present and "flex" in baselines:
                seconds += FLEX_COMPILE_SECONDS
        sizes = dict(batch=b, heads=h, seq_len=n, head_dim=d,
                     itemsize=measure.DTYPES[problem.dtype].itemsize, backward="fwdbwd" in modes)
        # the torch side holds its own outputs and gradients, without NumPy's float32 copies
        torch_side = attention_bytes(**sizes, numpy_path=False) \
            if baselines and torch_present else 0
        needed = max(needed, attention_bytes(**sizes, numpy_path=device.name == "cpu")
                     + torch_side)
    if needed > device.free_bytes():
        # the torch side holds its own outputs and gradients: without it a call needs less
        smaller = smaller_memory + (", or --no-torch" if baselines and torch_present else "")
    require_reasonable(device, seconds=seconds, needed=needed, what="this sweep", force=force,
                       smaller=smaller)
    if compiling:
        click.echo(f"  of which up to {variants} first compiles of cuflash's kernels, "
                   f"{KERNEL_COMPILE_SECONDS:g} s each (an upper bound: calls share variants; "
                   "CuPy's cache may hold them)", err=True)


def _plot_dense(plt, path, records, device):
    panels = sorted({(r["mode"], r["causal"]) for r in records})
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (mode, causal) in zip(axes[0], panels):
        chosen = [r for r in records if r["mode"] == mode and r["causal"] == causal]
        for d in sorted({r["head_dim"] for r in chosen}):
            rows = [r for r in chosen if r["head_dim"] == d]
            for name in measure.IMPLEMENTATIONS:
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
    save_figure(plt, figure, path)


def _plot_sparse(plt, path, records, device):
    modes = sorted({r["mode"] for r in records})
    figure, axes = plt.subplots(1, len(modes), figsize=(7 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        rows = [r for r in records if r["mode"] == mode]
        positions = range(len(rows))
        for offset, name in ((-0.2, "cuflash"), (0.2, "flex")):
            # NaN draws no bar where it did not run (0 would read as 0 TFLOP/s)
            heights = [math.nan if r["tflops"].get(name) is None else r["tflops"][name]
                       for r in rows]
            ax.bar([p + offset for p in positions], heights, width=0.4, label=name)
        ax.set_xticks(list(positions), [r["mask"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("effective TFLOP/s")
        ax.set_title(mode)
        ax.legend()
    figure.suptitle(device.description)
    save_figure(plt, figure, path)
