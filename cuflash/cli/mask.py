"""``cuflash mask``: build the sparse patterns by name and look at them."""

from __future__ import annotations

import math

import click
import numpy

from cuflash.bench.devices import CpuDevice
from cuflash.cli._common import (NotEnoughMemory, TooLong, duration, echo_json, size,
                                 stop_on_ctrl_c, tokens, write_file)
from cuflash.cli._options import (TOKENS, POSITIVE, OutputFile, json_option,
                                  pattern_parameter_options, seed_option)
from cuflash.cli._patterns import PATTERNS, build_cost, build_mask, pattern_parameters
from cuflash.cli._png import encode_png

PNG_SIDE = 512  # pictures are scaled up to about this many pixels on their longer side
# Patterns that keep more blocks than this (about 2 s and 200 MiB to build) are not built
# without --force: see ``show``.
FULL_BUILD_BLOCKS = 2_000_000


@click.group(short_help="Block-sparse patterns: list, show, draw.")
def mask():
    """Block-sparse patterns: list them, build one and draw it.

    \b
    Examples:
      cuflash mask list
      cuflash mask show butterfly --seq-len 16K
      cuflash mask show image-local --seq-len 64K --radius 16 --png local.png
    """


@mask.command("list")
def list_patterns():
    """The patterns, what they keep, and their parameters (with defaults)."""
    width = max(map(len, PATTERNS))
    for name, pattern in PATTERNS.items():
        click.echo(f"{name:<{width}}  {pattern.summary}")
        if pattern.defaults:
            shown = ", ".join(f"--{p} {'(by default as --stride)' if v is None else v}"
                              for p, v in pattern.defaults.items())
            click.echo(f"{'':<{width}}  {shown}")


@mask.command(short_help="Build a pattern, print its density and draw it.", epilog="""\b
Examples:
  cuflash mask show sliding-window --window 1K
  cuflash mask show bigbird --seq-len 32K --num-random 2 --seed 3
  cuflash mask show random --density 0.1 --png random.png
  cuflash mask show image-local --json
  cuflash mask show causal --seq-len 64M           drawn without building 2^38 blocks
""")
@click.argument("pattern", type=click.Choice(list(PATTERNS)), metavar="PATTERN")
@click.option("--seq-len", type=TOKENS, default="16K", show_default=True,
              help="Tokens of the problem (queries and keys).")
@pattern_parameter_options
@seed_option
@click.option("--max-rows", type=POSITIVE, default=32, show_default=True,
              help="Height of the text picture (larger masks are shrunk).")
@click.option("--max-cols", type=POSITIVE, default=64, show_default=True,
              help="Width of the text picture.")
@click.option("--png", type=OutputFile(".png"), default=None,
              help="Also write the block layout as a PNG (kept blocks black; masks of more "
                   f"than {PNG_SIDE} blocks a side are shrunk to {PNG_SIDE} pixels).")
@click.option("--force", is_flag=True,
              help="Build the whole pattern even when it is too large to build quickly.")
@json_option
def show(pattern, seq_len, block_size, seed, max_rows, max_cols, png, force, as_json,
         **pattern_options):
    """Build PATTERN for one --seq-len problem, print its density and block counts, and draw it.

    In the picture a character stands for one block, or for several when the mask is larger
    than --max-rows × --max-cols: '█' when any of them is kept, '·' when none is.

    A pattern of more than a few million blocks is not built (it would take long and much
    memory): patterns defined on tokens are then drawn from the same pattern built with larger
    blocks, which keeps exactly the groups of blocks that hold a kept one, and the counts are
    bounds; random patterns are refused (exit status 3). --force builds it anyway.
    """
    given = {name.replace("_", "-"): value for name, value in pattern_options.items()}
    parameters = pattern_parameters(pattern, given)
    nqb = nkb = math.ceil(seq_len / block_size)
    cost_bytes, cost_seconds = build_cost(pattern, seq_len, block_size, parameters)
    blocks_bound = PATTERNS[pattern].blocks(seq_len, block_size, parameters)
    summary = {"pattern": pattern, "parameters": parameters, "seq_len": seq_len,
               "block_size": block_size, "blocks": [nqb, nkb]}
    if blocks_bound > FULL_BUILD_BLOCKS and not force:
        if not PATTERNS[pattern].on_tokens:
            raise TooLong(
                f"pattern {pattern!r} at {tokens(seq_len)} tokens keeps about "
                f"{blocks_bound:,.0f} blocks of {block_size}: building it takes "
                f"{duration(cost_seconds)} and {size(cost_bytes)}, and its random blocks "
                "cannot be drawn without it; use a larger --block-size or a smaller "
                "--seq-len, or add --force to build it anyway")
        group = _group(nqb, max(max_rows, max_cols, PNG_SIDE if png else 0))
        drawn = build_mask(pattern, seq_len, block_size=block_size * group,
                           parameters=parameters, seed=seed)
        click.echo(f"note: the pattern would keep up to {blocks_bound:,.0f} blocks "
                   f"({duration(cost_seconds)} and {size(cost_bytes)} to build), so it is drawn "
                   f"from blocks of {block_size * group} tokens without building it; --force "
                   "builds it", err=True)
        summary.update({"kept_blocks": None, "kept_blocks_at_most": int(blocks_bound),
                        "density": None, "work_fraction": None,
                        "picture_block_size": block_size * group})
    else:
        if cost_bytes > CpuDevice().free_bytes():
            raise NotEnoughMemory(
                f"building pattern {pattern!r} needs about {size(cost_bytes)}, more than the "
                "free memory; use a larger --block-size or a smaller --seq-len")
        with stop_on_ctrl_c("the pattern was not built"):
            drawn = build_mask(pattern, seq_len, block_size=block_size, parameters=parameters,
                               seed=seed)
        summary.update({"kept_blocks": drawn.nnz_blocks, "density": drawn.density,
                        "work_fraction": drawn.element_density})
    if png:
        write_file(png, encode_png(_png_pixels(drawn)), "--png")
        summary["png"] = png
    if as_json:
        echo_json(summary)
        return
    options = PATTERNS[pattern].describe(parameters)
    click.echo(f"{pattern}{' ' + options if options else ''} — {tokens(seq_len)} tokens, "
               f"{block_size}×{block_size} blocks")
    if summary["kept_blocks"] is None:
        click.echo(f"{nqb:,} × {nkb:,} blocks, at most {blocks_bound:,.0f} kept (not counted: "
                   f"drawn from {summary['picture_block_size']}-token blocks)")
    else:
        click.echo(f"{nqb:,} × {nkb:,} blocks, {drawn.nnz_blocks:,} kept: density "
                   f"{drawn.density:.4f}, {100 * drawn.element_density:.2f}% of the dense "
                   "attention work")
    click.echo(drawn.render(max_rows=max_rows, max_cols=max_cols))
    if png:
        click.echo(f"PNG written to {png}", err=True)


def _group(blocks: int, cells: int) -> int:
    """The power of two by which to enlarge blocks so that ``blocks`` of them become at most
    about ``cells`` (and at least that many, so the picture loses nothing)."""
    group = 1
    while blocks / (2 * group) >= cells:
        group *= 2
    return group


def _png_pixels(block_mask):
    """The first head's block layout as gray pixels (kept blocks black), each block scaled up
    to fill about PNG_SIDE pixels, or groups of blocks shrunk to PNG_SIDE pixels (black when
    any block of the group is kept), read from the mask's CSR without forming the layout."""
    nqb, nkb = block_mask.nblocks
    row_ptr = block_mask.row_ptr[0]
    block_rows = numpy.repeat(numpy.arange(nqb), numpy.diff(row_ptr))
    block_cols = block_mask.col_idx[row_ptr[0]:row_ptr[-1]].astype(numpy.int64)
    rows, cols = min(nqb, PNG_SIDE), min(nkb, PNG_SIDE)
    kept = numpy.zeros((rows, cols), dtype=bool)
    kept[block_rows * rows // nqb, block_cols * cols // nkb] = True
    scale = max(1, PNG_SIDE // max(rows, cols))
    pixels = numpy.where(kept, 0, 255).astype(numpy.uint8)
    return pixels.repeat(scale, axis=0).repeat(scale, axis=1)
