"""``cuflash mask``: build the sparse patterns by name and look at them."""

from __future__ import annotations

import math

import click
import numpy

from cuflash.bench.devices import CpuDevice
from cuflash.cli._common import (NotEnoughMemory, TooLong, duration, echo_json, given_options,
                                 size, stop_on_ctrl_c, tokens, write_file)
from cuflash.cli._options import (INT64_MAX, TOKENS, POSITIVE, OutputFile, json_option,
                                  pattern_parameter_options, seed_option)
from cuflash.cli._patterns import (PATTERNS, build_cost, build_exact_mask, build_mask,
                                   pattern_parameters, refuse_unread_options)
from cuflash.cli._png import encode_png

PNG_SIDE = 512  # pictures are scaled up to about this many pixels on their longer side
# Patterns that keep more blocks than this (about 2 s and 200 MiB to build) are not built
# without --force: see ``show``.
FULL_BUILD_BLOCKS = 2_000_000
# An exact mask lists every allowed pair (about 20 bytes each while it is built): patterns that
# may allow more than this many are not built without --force.
EXACT_BUILD_PAIRS = 64_000_000


@click.group(short_help="Sparse patterns, block-sparse or exact: list, show, draw.")
def mask():
    """Sparse patterns: list them, build one (a block-sparse BlockMask, or with --exact an
    element-exact ExactMask) and draw it.

    \b
    Examples:
      cuflash mask list
      cuflash mask show butterfly --seq-len 16K
      cuflash mask show sliding-window --seq-len 4K --window 200 --exact
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
  cuflash mask show sliding-window --seq-len 4K --window 200 --exact
""")
@click.argument("pattern", type=click.Choice(list(PATTERNS)), metavar="PATTERN")
@click.option("--seq-len", type=TOKENS, default="16K", show_default=True,
              help="Tokens of the problem (queries and keys).")
@pattern_parameter_options
@seed_option
@click.option("--max-rows", type=POSITIVE, default=32, show_default=True, metavar="N",
              help="Height of the text picture (larger masks are shrunk).")
@click.option("--max-cols", type=POSITIVE, default=64, show_default=True, metavar="N",
              help="Width of the text picture.")
@click.option("--png", type=OutputFile(".png"), default=None,
              help="Also write the block layout as a PNG (kept blocks black; masks of more "
                   f"than {PNG_SIDE} blocks a side are shrunk to {PNG_SIDE} pixels).")
@click.option("--force", is_flag=True,
              help="Build the whole pattern even when it is too large to build quickly.")
@click.option("--exact", is_flag=True,
              help="Build the pattern pair by pair as an ExactMask (attention's mask=) and "
                   "count the full, partial and empty tiles at the tile shape each kernel picks "
                   "for it, and the bytes of the partial tiles' bitmasks.")
@json_option
@click.pass_context
@stop_on_ctrl_c("the mask was not shown")  # also while it draws, groups or counts tiles
def show(ctx, pattern, seq_len, block_size, seed, max_rows, max_cols, png, force, exact, as_json,
         **pattern_options):
    """Build PATTERN for one --seq-len problem, print its density and block counts, and draw it.

    In the picture a character stands for one block, or for several when the mask is larger
    than --max-rows × --max-cols: '█' when any of them is kept, '·' when none is.

    A pattern of more than a few million blocks is not built (it would take long and much
    memory): patterns defined on tokens are then drawn from the same pattern built with larger
    blocks, which keeps exactly the groups of blocks that hold a kept one, and the counts are
    bounds; random patterns are refused (exit status 3). --force builds it anyway.

    With --exact the pattern is the exact mask of its pairs (block-drawn patterns allow every
    pair of a drawn block; the others take no --block-size), counted at the tiles each kernel
    picks for it: the picture shows 128 × 128 tiles (the Hopper forward's at D = 128), '█' full
    (run unmasked), '▒' partial (one bit per pair), '·' empty (skipped).
    """
    given = {name.replace("_", "-"): value for name, value in pattern_options.items()}
    parameters = pattern_parameters(pattern, given)
    explicit = given_options(ctx)
    refuse_unread_options(pattern, seed_given="seed" in explicit,
                          block_size_given="block_size" in explicit, exact=exact)
    if seq_len > INT64_MAX:  # past float range the estimates below would overflow before the build
        # the length itself is not written out: it may have more digits than Python writes
        raise NotEnoughMemory(f"cannot build pattern {pattern!r} at that many tokens: its "
                              f"positions do not fit int64 (at most {INT64_MAX:,} tokens); use "
                              "a smaller --seq-len")
    if exact:
        if png:
            raise click.UsageError("--png draws block masks; it does not combine with --exact")
        _show_exact(pattern, seq_len, block_size, seed, parameters, max_rows, max_cols, force,
                    as_json)
        return
    nqb = nkb = math.ceil(seq_len / block_size)
    cost_bytes, cost_seconds = build_cost(pattern, seq_len, block_size, parameters, seed)
    blocks_bound = PATTERNS[pattern].blocks(seq_len, block_size, parameters, seed)
    summary = {"pattern": pattern, "parameters": parameters, "seq_len": seq_len,
               "seed": _seed_read(pattern, seed), "block_size": block_size,
               "blocks": [nqb, nkb]}
    group = _group(nqb, max(max_rows, max_cols, PNG_SIDE if png else 0))
    if blocks_bound > FULL_BUILD_BLOCKS and not force:
        if not PATTERNS[pattern].on_tokens:
            raise TooLong(
                f"pattern {pattern!r} at {tokens(seq_len)} tokens keeps about "
                f"{blocks_bound:,.0f} blocks of {block_size}: building it takes "
                f"{duration(cost_seconds)} and {size(cost_bytes)}, and its random blocks "
                "cannot be drawn without it; use a larger --block-size or a smaller "
                "--seq-len, or add --force to build it anyway")
        group = _buildable_group(pattern, seq_len, block_size, parameters, seed, group)
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
            built = build_mask(pattern, seq_len, block_size=block_size, parameters=parameters,
                               seed=seed)
        summary.update({"kept_blocks": built.nnz_blocks, "density": built.density,
                        "work_fraction": built.element_density})
        drawn = _grouped(built, group)
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
        click.echo(f"{nqb:,} × {nkb:,} blocks, {summary['kept_blocks']:,} kept: density "
                   f"{summary['density']:.4f}, {100 * summary['work_fraction']:.2f}% of the "
                   "dense attention work")
    click.echo(drawn.render(max_rows=max_rows, max_cols=max_cols))
    if png:
        click.echo(f"PNG written to {png}", err=True)


def kernel_tile_shapes(mask, head_dim: int) -> dict:
    """``(tile_m, tile_n)`` → the GPU kernels that walk the exact mask ``mask`` at those tiles,
    for 16-bit and float32 inputs with D = Dv = ``head_dim``: the tiles each kernel picks for a
    call with that mask alone."""
    from cuflash.kernels import float32, mma_backward, mma_forward, sm90_backward, sm90_tma_forward
    from cuflash.kernels._variants import spec_of

    shapes = {}

    def add(tile, kernel):
        shapes.setdefault((int(tile[0]), int(tile[1])), []).append(kernel)

    # Some tile choices depend on the mask itself (the Hopper forward's at D = 64 on how many
    # keys a row keeps), so each kernel is asked about a call that carries it.
    nq, nk = mask.shape
    spec = spec_of("bfloat16", head_dim, nq=nq, nk=nk, exact_mask=mask)
    fwd = mma_forward.tiles_for(spec)
    add((fwd.block_m, fwd.block_n), "sm80 forward")
    bwd = mma_backward.tiles_for(spec)
    add((bwd.block_m, bwd.block_n), "sm80 dK/dV")
    add((bwd.dq_block_m, bwd.dq_block_n), "sm80 dQ")
    hopper = sm90_tma_forward.tiles_for(spec) if head_dim in sm90_tma_forward.HEAD_DIMS else None
    if hopper is not None:
        add((hopper.block_m, hopper.block_n), "sm90 forward")
    if head_dim in sm90_backward.HEAD_DIMS:
        hopper_bwd = sm90_backward.default_tiles(sm90_backward.tile_head_dim(spec),
                                                  dropout=spec.has_dropout)
        add((hopper_bwd.dkdv_block_m, hopper_bwd.dkdv_block_n), "sm90 dK/dV")
        add((hopper_bwd.dq_block_m, hopper_bwd.dq_block_n), "sm90 dQ")
    padded = -(-head_dim // 32) * 32
    for kernel, (_, table, _) in float32._KERNELS.items():
        tiles = float32._preferred(table, padded, padded)
        add((tiles.block_m, tiles.block_n), f"float32 {kernel}")
    return shapes


def _show_exact(pattern, seq_len, block_size, seed, parameters, max_rows, max_cols, force,
                as_json):
    """``cuflash mask show --exact``: the pattern's ExactMask, its tiles and bitmasks."""
    from cuflash.sparse._exactmask import REPORT_TILE

    blocks_bound = PATTERNS[pattern].blocks(seq_len, block_size, parameters, seed)
    pairs_bound = min(blocks_bound * block_size ** 2, seq_len ** 2)
    if pairs_bound > EXACT_BUILD_PAIRS and not force:
        raise TooLong(
            f"pattern {pattern!r} at {tokens(seq_len)} tokens may allow about "
            f"{pairs_bound:,.0f} pairs, each listed in an exact mask; use a smaller --seq-len, "
            "or add --force to build it anyway")
    with stop_on_ctrl_c("the pattern was not built"):
        exact = build_exact_mask(pattern, seq_len, block_size=block_size, parameters=parameters,
                                 seed=seed)
    tiles = []
    for head_dim in (64, 128):
        for (tile_m, tile_n), kernels in kernel_tile_shapes(exact, head_dim).items():
            counts = exact.tile_counts(tile_m, tile_n)
            tiles.append({"head_dim": head_dim, "tile": [tile_m, tile_n], "kernels": kernels,
                          "full": counts.full, "partial": counts.partial,
                          "empty": counts.empty, "bitmask_bytes": counts.bitmask_bytes})
    if as_json:
        # the blocks of a pattern drawn per block are part of what drew its pairs
        drawn_blocks = None if PATTERNS[pattern].on_tokens else block_size
        echo_json({"pattern": pattern, "parameters": parameters, "seq_len": seq_len,
                   "seed": _seed_read(pattern, seed), "block_size": drawn_blocks,
                   "exact": True, "allowed_pairs": exact.nnz, "density": exact.density,
                   "tiles": tiles})
        return
    options = PATTERNS[pattern].describe(parameters)
    click.echo(f"{pattern}{' ' + options if options else ''} — {tokens(seq_len)} tokens, exact "
               f"(pair by pair)")
    click.echo(f"{exact.nnz:,} allowed pairs: density {exact.density:.4f}")
    click.echo("tiles per kernel (full run unmasked, partial test a bit per pair, empty are "
               "skipped):")
    for row in tiles:
        m, n = row["tile"]
        click.echo(f"  D={row['head_dim']:<3} {m:>3}x{n:<3} {', '.join(row['kernels'])}: "
                   f"{row['full']:,} full, {row['partial']:,} partial, {row['empty']:,} empty; "
                   f"bitmasks {size(row['bitmask_bytes'])}")
    click.echo(f"{REPORT_TILE[0]}x{REPORT_TILE[1]} tiles: █ full, ▒ partial, · empty")
    click.echo(exact.render(max_rows=max_rows, max_cols=max_cols))


def _seed_read(pattern: str, seed: int) -> int | None:
    """``seed`` where pattern ``pattern`` draws with it, else None (for the JSON record)."""
    return seed if PATTERNS[pattern].seeded else None


def _group(blocks: int, cells: int) -> int:
    """The power of two by which to enlarge blocks so that ``blocks`` of them become at most
    about ``cells`` (and at least that many, so the picture loses nothing)."""
    group = 1
    while blocks / (2 * group) >= cells:
        group *= 2
    return group


def _buildable_group(pattern, seq_len, block_size, parameters, seed, group: int) -> int:
    """``group``, doubled until the pattern built with blocks ``group`` times larger keeps at most
    FULL_BUILD_BLOCKS: a picture of many characters (--max-cols, --png) would otherwise be drawn
    from a mask as costly as the one it is drawn instead of."""
    while PATTERNS[pattern].blocks(seq_len, block_size * group, parameters,
                                   seed) > FULL_BUILD_BLOCKS:
        group *= 2
    return group


def _grouped(block_mask, group: int):
    """The mask of groups of ``group × group`` blocks, a group kept when any of its blocks is:
    what the pattern built with blocks ``group`` times larger keeps. Pictures are drawn from it,
    so that a mask drawn without being built looks the same as when it is built."""
    if group == 1:
        return block_mask
    from cuflash.sparse import BlockMask

    return BlockMask.from_scipy(block_mask.to_scipy(), level="element", block_size=group)


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
