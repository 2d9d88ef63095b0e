"""``cuflash mask``: build the sparse patterns by name and look at them."""

from __future__ import annotations

import click
import numpy

from cuflash.cli._common import echo_json, tokens
from cuflash.cli._options import (TOKENS, POSITIVE, json_option, pattern_parameter_options,
                                  seed_option)
from cuflash.cli._patterns import PATTERNS, build_mask, pattern_parameters
from cuflash.cli._png import write_png

PNG_SIDE = 512  # pictures are scaled up to about this many pixels on their longer side


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
@click.option("--png", type=click.Path(dir_okay=False, writable=True), default=None,
              metavar="FILE.png", help="Also write the block layout as a PNG (kept blocks black).")
@json_option
def show(pattern, seq_len, block_size, seed, max_rows, max_cols, png, as_json,
         **pattern_options):
    """Build PATTERN for one --seq-len problem, print its density and block counts, and draw it.

    In the picture a character stands for one block, or for several when the mask is larger
    than --max-rows × --max-cols: '█' when any of them is kept, '·' when none is.
    """
    given = {name.replace("_", "-"): value for name, value in pattern_options.items()}
    parameters = pattern_parameters(pattern, given)
    block_mask = build_mask(pattern, seq_len, block_size=block_size, parameters=parameters,
                            seed=seed)
    nqb, nkb = block_mask.nblocks
    summary = {"pattern": pattern, "parameters": parameters, "seq_len": seq_len,
               "block_size": block_size, "blocks": [nqb, nkb],
               "kept_blocks": block_mask.nnz_blocks, "density": block_mask.density,
               "work_fraction": block_mask.element_density}
    if png:
        layout = block_mask.to_dense()[0]
        scale = max(1, PNG_SIDE // max(nqb, nkb))
        pixels = numpy.where(layout, 0, 255).astype(numpy.uint8)
        write_png(png, pixels.repeat(scale, axis=0).repeat(scale, axis=1))
        summary["png"] = png
    if as_json:
        echo_json(summary)
        return
    options = PATTERNS[pattern].describe(parameters)
    click.echo(f"{pattern}{' ' + options if options else ''} — {tokens(seq_len)} tokens, "
               f"{block_size}×{block_size} blocks")
    click.echo(f"{nqb} × {nkb} blocks, {block_mask.nnz_blocks:,} kept: density "
               f"{block_mask.density:.4f}, {100 * block_mask.element_density:.2f}% of the "
               "dense attention work")
    click.echo(block_mask.render(max_rows=max_rows, max_cols=max_cols))
    if png:
        click.echo(f"PNG written to {png}", err=True)

