"""The sparse patterns the commands can build, by name, with their parameters and defaults.

Each pattern is built at block level (cheap at any length) and turned into a BlockMask of one
``seq_len × seq_len`` problem, shared by all heads.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import click

from cuflash.bench.sweeps import random_block_layout, random_document_lengths
from cuflash.check.pathfinder import image_side_for

# Option name → (kind, help). Kinds: "tokens" (accepts 16K; ≥ 1), "length" (the same, ≥ 0),
# "count" (int ≥ 0), "positive" (int ≥ 1), "fraction".
PARAMETERS = {
    "window": ("length", "Keys within this many tokens on each side of the query "
                         "(sliding-window, strided, longformer, bigbird)."),
    "stride": ("tokens", "Distance between the strided keys, or the segment length "
                         "(strided, fixed)."),
    "summary": ("positive", "Keys at the end of each segment that every query sees (fixed)."),
    "global-tokens": ("length", "The first tokens, which attend and are attended by all "
                                "(longformer, bigbird)."),
    "num-random": ("count", "Random key blocks added to each query block (bigbird)."),
    "radius": ("count", "Pixels on each side of a pixel, in both directions, over the image "
                        "the sequence is read from (image-local)."),
    "density": ("fraction", "Fraction of blocks kept, the diagonal always among them (random)."),
    "documents": ("positive", "Documents packed into the sequence, of random lengths seeded by "
                           "--seed (document, causal-document)."),
    "prefix": ("length", "Keys every query sees, before the causal part (prefix-lm)."),
}


# Building a pattern costs about this much per kept block (scipy arrays, then the BlockMask's
# CSR in both directions), measured on the causal pattern.
BYTES_PER_BLOCK = 100
SECONDS_PER_BLOCK = 1e-6


@dataclass(frozen=True)
class Pattern:
    summary: str
    defaults: dict
    build: Callable  # (seq_len, block_size, parameters, seed) -> scipy block-level pattern or layout
    # (seq_len, block_size, parameters, seed) -> about how many blocks the pattern keeps (at
    # least as many as it does), computed without building it
    blocks: Callable
    # Whether the pattern is defined on tokens, so that building it with larger blocks gives
    # exactly the "any block kept" picture of groups of its blocks (False: random blocks).
    on_tokens: bool = True
    seconds_per_block: float = SECONDS_PER_BLOCK
    # (seq_len, block_size, parameters, seed) -> how many blocks the pattern keeps at least,
    # computed without building it; None: its diagonal blocks, which every pattern keeps.
    least_blocks: Callable | None = None
    # Whether --seed draws part of the pattern (its random blocks or document lengths).
    seeded: bool = False

    def describe(self, parameters: dict) -> str:
        return " ".join(f"{name}={value}" for name, value in parameters.items()
                        if value is not None)


def _sparse():
    from cuflash import sparse
    return sparse


def _image_local(n, b, p, seed):
    # The sequence is an image read row by row: the smallest square with n pixels, cut at n.
    import numpy
    import scipy.sparse

    side = image_side_for(n)
    blocks = math.ceil(n / b)
    square = _sparse().image_local(side, side, radius=p["radius"], block_size=b)[:blocks, :blocks]
    if n % b == 0:
        return square
    # The square's last block also holds pixels past n, which may be near blocks that no pixel
    # of the sequence is near: that block's row and column (the pattern is symmetric) are
    # counted again from its pixels below n.
    last = blocks - 1
    near = _blocks_near_last(n, b, side, p["radius"])
    entries = square.tocoo()
    inside = (entries.row != last) & (entries.col != last)
    rows = numpy.concatenate((entries.row[inside], numpy.full(near.size, last), near))
    cols = numpy.concatenate((entries.col[inside], near, numpy.full(near.size, last)))
    pattern = scipy.sparse.csr_array((numpy.ones(rows.size, dtype=bool), (rows, cols)),
                                     shape=square.shape)
    pattern.sum_duplicates()  # the corner block is listed twice
    return pattern


def _blocks_near_last(n, b, side, radius):
    """The blocks of ``b`` pixels holding a pixel below ``n`` within ``radius`` (Chebyshev) of a
    pixel of the last block below ``n``, in the ``side × side`` image read row by row."""
    import numpy

    radius = min(radius, side)
    first = (math.ceil(n / b) - 1) * b
    rows = numpy.arange(first // side, (n - 1) // side + 1)
    col_lo = numpy.maximum(first - rows * side, 0)
    col_hi = numpy.minimum(n - 1 - rows * side, side - 1)
    shifts = numpy.arange(-radius, radius + 1)
    key_rows = (rows[:, None] + shifts[None, :]).ravel()
    lo = numpy.repeat(numpy.maximum(col_lo - radius, 0), shifts.size)
    hi = numpy.repeat(numpy.minimum(col_hi + radius, side - 1), shifts.size)
    inside = (key_rows >= 0) & (key_rows < side)
    lo = key_rows[inside] * side + lo[inside]
    hi = numpy.minimum(key_rows[inside] * side + hi[inside], n - 1)
    lo, hi = lo[lo <= hi] // b, hi[lo <= hi] // b
    return numpy.unique(numpy.concatenate([numpy.arange(a, z + 1) for a, z in zip(lo, hi)]))


def _per_row(n, b, keys_per_row):
    """Kept blocks of a pattern whose every block row keeps about ``keys_per_row`` blocks."""
    nb = math.ceil(n / b)
    return nb * min(nb, math.ceil(keys_per_row))


def _band_blocks(b, window):
    return 2 * math.ceil(window / b) + 1


def _longformer_blocks(n, b, p, seed=0):
    global_blocks = math.ceil(p["global-tokens"] / b)
    return (_per_row(n, b, _band_blocks(b, p["window"]) + global_blocks)
            + global_blocks * math.ceil(n / b))


def _image_local_blocks(n, b, p, seed=0):
    side = image_side_for(n)
    radius = min(p["radius"], side)
    # A block of b pixels lies on at most b / side + 2 image rows. The keys it reaches lie in
    # those rows and the radius beside them: one run of key positions, ...
    whole_rows = ((b / side + 2 * radius + 2) * side) / b + 1
    # ... or, where the block is short beside a row, runs of at most its piece of a row widened
    # by the radius on each side, one per image row reached by one of its pieces.
    runs = (math.ceil(b / side) + 1) * (2 * radius + 1)
    return _per_row(n, b, min(whole_rows, runs * (math.ceil((min(b, side) + 2 * radius) / b) + 1)))


def _butterfly_blocks(n, b):
    """At least the blocks the butterfly pattern keeps: query i's partners are i XOR 2^k."""
    bits = max(1, n - 1).bit_length()
    if b & (b - 1) == 0:
        # Flips below b stay in the block, and each other maps it onto one block.
        return _per_row(n, b, 2 + bits)
    # Flips below b reach the blocks beside a block's own. A flip 2^k >= b moves a run of b
    # queries to one run (2 blocks), or to two where the run holds a multiple of 2^k (4 blocks),
    # which at most ceil(n / 2^k) block rows do.
    nb = math.ceil(n / b)
    large = [1 << k for k in range(bits) if 1 << k >= b]
    return min(nb * nb, 3 * nb + sum(2 * nb + 2 * math.ceil(n / flip) for flip in large))


def _document_lengths(n, p, seed):
    """The lengths of the --documents packed documents: they depend on the sequence's length and
    the seed alone, so larger blocks draw the same documents."""
    import numpy

    return random_document_lengths(numpy.random.default_rng(seed), n, p["documents"])


def _documents(causal):
    def build(n, b, p, seed):
        return _sparse().document(_document_lengths(n, p, seed), causal=causal, block_size=b)
    return build


def _causal_blocks(n, b, p, seed):
    nb = math.ceil(n / b)
    return nb * (nb + 1) // 2


def _random_blocks(n, b, p, seed):
    """Exactly the blocks random_block_layout keeps: the diagonal and the drawn others."""
    nb = math.ceil(n / b)
    drawn = max(0, round(p["density"] * nb * nb) - nb)
    return nb + min(drawn, nb * nb - nb)


def _document_blocks(n, b, p, seed):
    try:
        lengths = _document_lengths(n, p, seed)
    except ValueError:
        return 0  # the build says why
    return int(sum((-(-int(length) // b) + 1) ** 2 for length in lengths))


PATTERNS = {
    "causal": Pattern(
        "query i sees keys 0..i (as --causal, expressed as blocks)", {},
        lambda n, b, p, seed: _sparse().causal(n, block_size=b),
        _causal_blocks, least_blocks=_causal_blocks),
    "sliding-window": Pattern(
        "keys within --window tokens of the query", {"window": 512},
        lambda n, b, p, seed: _sparse().sliding_window(n, window=p["window"], block_size=b),
        lambda n, b, p, seed: _per_row(n, b, _band_blocks(b, p["window"]))),
    "strided": Pattern(
        "Sparse Transformer strided: a local window plus every --stride-th key",
        {"stride": 2048, "window": None},
        lambda n, b, p, seed: _sparse().strided(n, stride=p["stride"], window=p["window"],
                                                block_size=b),
        lambda n, b, p, seed: _per_row(n, b, _band_blocks(b, p["window"] or p["stride"])
                                       + 2 * (n / p["stride"] + 1))),
    "fixed": Pattern(
        "Sparse Transformer fixed: the query's segment plus the last keys of every segment",
        {"stride": 1024, "summary": 1},
        lambda n, b, p, seed: _sparse().fixed(n, stride=p["stride"], summary=p["summary"],
                                              block_size=b),
        lambda n, b, p, seed: _per_row(n, b, math.ceil(p["stride"] / b) + 1
                                       + (n / p["stride"] + 1) * (math.ceil(p["summary"] / b) + 1))),
    "butterfly": Pattern(
        "flat butterfly: block (I, J) kept when I XOR J is 0 or a power of two", {},
        lambda n, b, p, seed: _sparse().butterfly(n, block_size=b),
        lambda n, b, p, seed: _butterfly_blocks(n, b)),
    "longformer": Pattern(
        "Longformer: a sliding window plus global tokens", {"window": 512, "global-tokens": 128},
        lambda n, b, p, seed: _sparse().longformer(n, window=p["window"],
                                                   global_tokens=p["global-tokens"],
                                                   block_size=b),
        _longformer_blocks),
    "bigbird": Pattern(
        "BigBird: window, global tokens and random blocks (seeded by --seed)",
        {"window": 512, "global-tokens": 128, "num-random": 3},
        lambda n, b, p, seed: _sparse().bigbird(n, window=p["window"],
                                                global_tokens=p["global-tokens"],
                                                num_random=p["num-random"], seed=seed,
                                                block_size=b),
        lambda n, b, p, seed: _longformer_blocks(n, b, p) + p["num-random"] * math.ceil(n / b),
        on_tokens=False, seeded=True),
    "image-local": Pattern(
        "2-D neighbourhood over the image the sequence is read from (square of --radius)",
        {"radius": 8}, _image_local, _image_local_blocks),
    "random": Pattern(
        "random blocks at --density, diagonal kept (seeded by --seed)", {"density": 0.25},
        lambda n, b, p, seed: random_block_layout(math.ceil(n / b), p["density"], seed=seed),
        # the layout is built dense: one byte per block of the whole square, and more to draw
        lambda n, b, p, seed: max(p["density"], 0.1) * math.ceil(n / b) ** 2,
        on_tokens=False, least_blocks=_random_blocks, seeded=True),
    "document": Pattern(
        "packed documents of random lengths (seeded by --seed), each attending to itself",
        {"documents": 16},
        _documents(causal=False), _document_blocks, seeded=True),
    "causal-document": Pattern(
        "packed documents as document, causal within each", {"documents": 16},
        _documents(causal=True), _document_blocks, seeded=True),
    "prefix-lm": Pattern(
        "prefix LM: every query sees the first --prefix keys, and the keys up to itself",
        {"prefix": 1024},
        lambda n, b, p, seed: _sparse().prefix_lm(n, prefix=p["prefix"], block_size=b),
        lambda n, b, p, seed: (_causal_blocks(n, b, p, seed)
                               + math.ceil(n / b) * math.ceil(p["prefix"] / b)),
        least_blocks=_causal_blocks),
}


def build_cost(name: str, seq_len: int, block_size: int, parameters: dict,
               seed: int = 0) -> tuple[int, float]:
    """``(bytes, seconds)`` that building pattern ``name`` takes, roughly, without building it."""
    pattern = PATTERNS[name]
    blocks = pattern.blocks(seq_len, block_size, parameters, seed)
    return int(blocks * BYTES_PER_BLOCK), blocks * pattern.seconds_per_block


def least_element_density(name: str, seq_len: int, block_size: int, parameters: dict,
                          seed: int = 0) -> float:
    """A lower bound of the ``element_density`` of pattern ``name``'s BlockMask, without
    building it: what an estimate may use before the mask exists without overstating it."""
    pattern = PATTERNS[name]
    nb = math.ceil(seq_len / block_size)
    kept = pattern.least_blocks(seq_len, block_size, parameters, seed) \
        if pattern.least_blocks else nb
    # Knowing only how many blocks are kept, count the smallest first: the corner block of the
    # last row and column, then the other blocks of the last row or column, then whole blocks.
    last = seq_len - (nb - 1) * block_size
    sizes = ((1, last * last), (2 * (nb - 1), last * block_size), (kept, block_size**2))
    pairs = 0
    for count, pairs_per_block in sizes:
        taken = min(kept, count)
        pairs += taken * pairs_per_block
        kept -= taken
    return pairs / (seq_len * seq_len)


def default_text(option: str) -> str:
    """The defaults of ``option`` in the patterns that read it, for the help text."""
    defaults = {name: pattern.defaults[option] for name, pattern in PATTERNS.items()
                if option in pattern.defaults}
    by_value = {}
    for name, value in defaults.items():
        by_value.setdefault(value, []).append(name)
    if len(by_value) == 1:
        return str(next(iter(by_value)))
    return ", ".join(f"{'as --stride' if value is None else value} ({', '.join(names)})"
                     for value, names in by_value.items())


def pattern_parameters(name: str, given: dict) -> dict:
    """The parameters pattern ``name`` reads, from ``given`` (option name → value or None) or
    its defaults; ``click.BadParameter`` for a given option the pattern does not read."""
    pattern = PATTERNS[name]
    for option, value in given.items():
        if value is not None and option not in pattern.defaults:
            uses = ", ".join(f"--{p}" for p in pattern.defaults) or "no parameters"
            raise click.BadParameter(f"pattern {name!r} does not use it (it takes {uses})",
                                     param_hint=f"--{option}")
    return {option: given.get(option) if given.get(option) is not None else default
            for option, default in pattern.defaults.items()}


def refuse_unread_options(name: str, *, seed_given: bool, block_size_given: bool,
                          exact: bool) -> None:
    """``click.BadParameter`` for --seed or --block-size given to pattern ``name`` where it would
    not read them: --seed where it draws nothing, --block-size with ``exact`` where it is built
    pair by pair (only the patterns drawn per block, random and bigbird, draw with it)."""
    pattern = PATTERNS[name]
    if seed_given and not pattern.seeded:
        drawn = ", ".join(n for n, p in PATTERNS.items() if p.seeded)
        raise click.BadParameter(f"pattern {name!r} draws nothing at random: --seed applies "
                                 f"to {drawn}", param_hint="--seed")
    if block_size_given and exact and pattern.on_tokens:
        raise click.BadParameter(f"--exact builds pattern {name!r} pair by pair, without "
                                 "blocks: leave out --block-size, or --exact for a block mask",
                                 param_hint="--block-size")


def _given_as_options(seq_len: int, parameters: dict) -> str:
    """The length and parameters of a pattern as the options that set them: the library's
    messages name its own arguments (``summary``, ``nk``), the user typed options."""
    return " ".join([f"--seq-len {seq_len}",
                     *(f"--{name} {value}" for name, value in parameters.items()
                       if value is not None)])


@contextlib.contextmanager
def _building(name: str, seq_len: int, parameters: dict, instead: str):
    """Errors of building pattern ``name`` as the commands report them: a pattern that rejects
    its parameters (a prefix longer than the sequence, ...) raises ``click.UsageError`` with its
    message and the options it was built from; one whose arrays do not fit in memory or in
    int64 (huge ``seq_len``) raises ``NotEnoughMemory`` (exit status 3) saying what to do
    ``instead``."""
    from cuflash.cli._common import NotEnoughMemory

    try:
        yield
    except ValueError as error:
        raise click.UsageError(f"cannot build pattern {name!r} with "
                               f"{_given_as_options(seq_len, parameters)}: {error}") from error
    except (MemoryError, OverflowError) as error:
        raise NotEnoughMemory(
            f"cannot build pattern {name!r} at {seq_len:,} tokens: {error}; {instead}") from error


def build_exact_mask(name: str, seq_len: int, *, block_size: int, parameters: dict,
                     seed: int = 0):
    """An ExactMask of pattern ``name`` at element level for one ``seq_len × seq_len`` problem:
    patterns on tokens are built pair by pair; patterns drawn per block (random, bigbird) are
    drawn with ``block_size`` and every pair of a drawn block is allowed. Errors as for
    :func:`build_mask`."""
    sparse = _sparse()
    pattern = PATTERNS[name]
    with _building(name, seq_len, parameters, "use a smaller --seq-len"):
        if pattern.on_tokens:
            elements = pattern.build(seq_len, 1, parameters, seed)
        else:
            blocks = pattern.build(seq_len, block_size, parameters, seed)
            if not hasattr(blocks, "tocoo"):
                import scipy.sparse
                blocks = scipy.sparse.csr_array(blocks)
            elements = sparse.expand_blocks(blocks, block_size=block_size,
                                            shape=(seq_len, seq_len))
        return sparse.ExactMask.from_scipy(elements)


def build_mask(name: str, seq_len: int, *, block_size: int, parameters: dict, seed: int = 0):
    """A BlockMask of pattern ``name`` for one ``seq_len × seq_len`` problem.

    ``parameters`` come from :func:`pattern_parameters`. Errors as ``_building`` reports them:
    ``click.UsageError`` for parameters the pattern rejects, ``NotEnoughMemory`` (exit status
    3) for arrays that do not fit in memory or in int64.
    """
    sparse = _sparse()
    with _building(name, seq_len, parameters,
                   "use a larger --block-size or a smaller --seq-len"):
        blocks = PATTERNS[name].build(seq_len, block_size, parameters, seed)
        if hasattr(blocks, "tocoo"):
            return sparse.BlockMask.from_scipy(blocks, level="block", block_size=block_size,
                                               shape=(seq_len, seq_len))
        return sparse.BlockMask.from_dense(blocks, block_size=block_size,
                                           shape=(seq_len, seq_len))
