"""Synthetic Pathfinder-style images and their projection to attention inputs.

Path-X and Path-256 (Long Range Arena, Tay et al. 2020) read a 128×128 or 256×256 image pixel by
pixel, 16,384 or 65,536 tokens, and ask whether two round markers are joined by one dashed curve
among distractor curves. FlashAttention was the first Transformer to do better than chance there
because it makes exact attention at those lengths fit in memory. ``cuflash check`` uses such images
as long, structured inputs: attention over them has sharp, position-dependent weights, unlike the
nearly uniform weights that i.i.d. noise produces.

>>> image = pathfinder_image(128, seed=0)
>>> image.pixels.shape, image.connected
((128, 128), True)
>>> q, k, v = project_to_qkv(image.pixels.ravel(), 128, heads=4, head_dim=64, seed=0)
>>> q.shape
(1, 4, 16384, 64)

Everything here is NumPy and deterministic for a given seed; move the arrays to the GPU yourself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy

from cuflash import _checks

__all__ = [
    "PathfinderImage",
    "image_side_for",
    "pathfinder_image",
    "pathfinder_qkv",
    "project_to_qkv",
    "random_qkv",
]

# Median of scale·q_i·k_i (a token's score against its own key) after calibration. The scores of
# a row then range from about this value down to about zero: softmax weights are sharp but not
# one-hot, which is where low-precision error and masking mistakes show.
SELF_SCORE_TARGET = 10.0
MIN_SIDE = 8  # pixels: smaller images have no room for two markers and a curve between them
MIN_TOKENS = (MIN_SIDE - 1) ** 2 + 1  # the shortest sequence read from a MIN_SIDE image
FOURIER_FEATURES = 32
PIXEL_WEIGHT = 0.5


@dataclass(frozen=True)
class PathfinderImage:
    """A square image with two markers and some dashed curves, values in [0, 1].

    ``connected`` is True when one curve joins the two markers (the label of the Pathfinder task).
    """

    pixels: numpy.ndarray
    connected: bool
    markers: tuple[tuple[int, int], tuple[int, int]]

    @property
    def side(self) -> int:
        return self.pixels.shape[0]

    def tokens(self, seq_len: int | None = None) -> numpy.ndarray:
        """Pixels read row by row, truncated to ``seq_len`` (all of them by default)."""
        flat = self.pixels.ravel()
        if seq_len is None:
            return flat
        _require_int(seq_len=seq_len)
        if not 1 <= seq_len <= flat.size:
            raise ValueError(
                f"seq_len must be between 1 and {flat.size} for a {self.side}×{self.side} image, "
                f"got {seq_len}")
        return flat[:seq_len]


def image_side_for(seq_len: int) -> int:
    """The side of the smallest square image that has at least ``seq_len`` pixels."""
    _require_int(seq_len=seq_len)
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    side = math.isqrt(seq_len)
    return side if side * side == seq_len else side + 1


def pathfinder_image(side: int = 128, *, seed: int = 0, connected: bool | None = None,
                     distractors: int | None = None, separate: bool = False) -> PathfinderImage:
    """Draw one Pathfinder-style image.

    Two markers sit at the ends of one dashed curve (``connected=True``) or at the ends of two
    different curves (``connected=False``); ``distractors`` more curves cross the image (by default
    one per 32 pixels of side). ``connected=None`` draws the label from the seed.

    ``separate=True`` draws the variant made for training a classifier (see
    ``_separate_curves``): the curves never touch, so the label can be read off the pixels; both
    labels have the same number and lengths of curves; and the two markers are about as far apart
    in either case. The default draws curves that may cross, which is what ``cuflash check`` uses.
    Raises ValueError when the curves do not fit apart (small sides, many distractors).
    """
    _require_int(side=side)
    if side < MIN_SIDE:
        raise ValueError(f"side must be at least {MIN_SIDE} pixels, got {side}")
    rng = numpy.random.default_rng(seed)
    if connected is None:
        connected = bool(rng.integers(2))
    if distractors is None:
        distractors = max(1, side // 32)
    distractors = _checks.check_int(distractors, "distractors", 0)

    pixels = numpy.zeros((side, side), dtype=numpy.float32)
    length = 0.9 * side
    radius = max(2, side // 40)
    if separate:
        curves, ends = _separate_curves(rng, side, connected, distractors, radius)
    elif connected:
        path = _random_curve(rng, side, length)
        ends = (path[0], path[-1])
        curves = [path]
    else:
        first, second = _random_curve(rng, side, length / 2), _random_curve(rng, side, length / 2)
        ends = (first[0], second[-1])
        curves = [first, second]
    if not separate:
        curves += [_random_curve(rng, side, length * rng.uniform(0.3, 0.8))
                   for _ in range(distractors)]

    dash_on, dash_off = max(2.0, side / 32), max(1.5, side / 64)
    for curve in curves:
        _draw_dashed(pixels, curve, dash_on, dash_off, phase=rng.uniform(0, dash_on + dash_off))
    markers = tuple((int(round(r)), int(round(c))) for r, c in ends)
    for center in markers:
        _draw_disc(pixels, center, radius)
    return PathfinderImage(pixels=pixels, connected=connected, markers=markers)


SEPARATE_LENGTH = 0.7      # of the side: both marked curves, with ``separate=True``
SEPARATE_GAP = 3           # pixels left dark between two curves (or a curve and a marker)
# Whole images drawn before ``separate=True`` gives up. From a 16-pixel side up, about 22 are
# needed on average (under 2 from 32), so this loses practically no seed; sides 13 to 15 need
# hundreds, and smaller sides, or 30 distractors on 32 pixels, never fit: at a few milliseconds
# a try, giving up takes seconds.
SEPARATE_IMAGE_TRIES = 1000


def _separate_curves(rng: numpy.random.Generator, side: int, connected: bool, distractors: int,
                     radius: int) -> tuple[list[numpy.ndarray], tuple]:
    """Curves that keep ``SEPARATE_GAP`` dark pixels between each other, and the marker centres.

    Both labels draw two curves of ``SEPARATE_LENGTH * side`` pixels, A and B, then the
    distractors (as long as in the default images). Connected: the markers sit on both ends of A.
    Not connected: on one end of A and on the end of B whose distance to it is nearer A's own
    end-to-end distance, so the distance between the markers says little about the label; B (and
    A, when connected) keeps a marker-sized disc clear at both ends either way, so the unmarked
    end of a curve looks the same in both classes. A curve that comes too close to an earlier one
    is drawn again; after 50 tries the whole image starts over, and after
    ``SEPARATE_IMAGE_TRIES`` whole images it raises ValueError.
    """
    length = SEPARATE_LENGTH * side
    gap = SEPARATE_GAP
    for _ in range(SEPARATE_IMAGE_TRIES):
        near = numpy.zeros((side + 2 * gap, side + 2 * gap), dtype=bool)  # within gap of a curve
        curves = []
        for index in range(2 + distractors):
            for _ in range(50):
                size = length if index < 2 else 0.9 * side * rng.uniform(0.3, 0.8)
                curve = _random_curve(rng, side, size)
                rows, cols = _footprint(curve, side, radius if index < 2 else 0) + gap
                if not near[rows, cols].any():
                    for dr in range(-gap, gap + 1):
                        for dc in range(-gap, gap + 1):
                            near[rows + dr, cols + dc] = True
                    curves.append(curve)
                    break
            else:
                break
        if len(curves) == 2 + distractors:
            break
    else:
        raise ValueError(
            f"pathfinder_image(side={side}, separate=True, distractors={distractors}) could not "
            f"keep {2 + distractors} curves {gap} pixels apart in {SEPARATE_IMAGE_TRIES} tries; "
            f"use a larger side, fewer distractors, or separate=False")
    a, b = curves[0], curves[1]
    if connected:
        return curves, (a[0], a[-1])
    span = numpy.hypot(*(a[0] - a[-1]))
    end = min((b[0], b[-1]), key=lambda point: abs(numpy.hypot(*(point - a[0])) - span))
    return curves, (a[0], end)


def _footprint(curve: numpy.ndarray, side: int, radius: int) -> numpy.ndarray:
    """(2, n): the rows and columns of the pixels a curve can light, dashes and gaps alike, with
    marker discs at both ends (``radius > 0``); pixels may repeat."""
    cells = numpy.rint(curve).astype(numpy.intp)
    if radius:
        offsets = numpy.array([(r, c) for r in range(-radius, radius + 1)
                               for c in range(-radius, radius + 1) if r * r + c * c <= radius ** 2])
        ends = numpy.rint(curve[[0, -1]]).astype(numpy.intp)
        discs = (ends[:, None, :] + offsets[None]).reshape(-1, 2)
        cells = numpy.concatenate([cells, numpy.clip(discs, 0, side - 1)])
    return cells.T


def _random_curve(rng: numpy.random.Generator, side: int, length: float) -> numpy.ndarray:
    """A smooth random curve of about ``length`` pixels, as (row, col) points half a pixel apart.

    The heading turns by a curvature that itself wanders, so the curve bends gently and sometimes
    winds; near the border it turns back towards the centre to stay inside.
    """
    step = 0.5
    margin = max(3.0, side / 16)
    row, col = rng.uniform(margin, side - margin, size=2)
    heading = rng.uniform(0, 2 * math.pi)
    curvature = 0.0
    max_curvature = 4.0 / side
    count = int(length / step)
    # One draw for all the curvature steps: the same numbers as one draw per step.
    wander = rng.normal(0, max_curvature / 4, size=count).tolist()
    points = numpy.empty((count, 2))
    centre, low, high, reach = side / 2, margin, side - margin, 4 * margin
    for i in range(count):
        points[i] = row, col
        curvature = min(max(curvature + wander[i], -max_curvature), max_curvature)
        heading += curvature * step
        ahead_row, ahead_col = row + reach * math.sin(heading), col + reach * math.cos(heading)
        if min(ahead_row, ahead_col) < low or max(ahead_row, ahead_col) > high:
            to_centre = math.atan2(centre - row, centre - col)
            turn = math.remainder(to_centre - heading, 2 * math.pi)
            heading += min(max(turn, -0.1), 0.1)
        row = min(max(row + step * math.sin(heading), 1), side - 2)
        col = min(max(col + step * math.cos(heading), 1), side - 2)
    return points


def _draw_dashed(pixels: numpy.ndarray, curve: numpy.ndarray, on: float, off: float, phase: float):
    arc = 0.5 * numpy.arange(curve.shape[0]) + phase
    drawn = curve[(arc % (on + off)) < on]
    rows, cols = numpy.rint(drawn).astype(numpy.intp).T
    pixels[rows, cols] = 1.0


def _draw_disc(pixels: numpy.ndarray, center: tuple[int, int], radius: int):
    side = pixels.shape[0]
    rows, cols = numpy.ogrid[:side, :side]
    inside = (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius * radius
    pixels[inside] = 1.0


def project_to_qkv(tokens: numpy.ndarray, side: int, *, heads: int, head_dim: int, seed: int = 0,
                   dtype=numpy.float32) -> tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]:
    """Turn pixel tokens (row-major, ``tokens[i]`` at row ``i // side``) into q, k, v.

    Each token is described by random Fourier features of its (row, col) position plus its pixel
    value, and projected by a random matrix per head: q and k use nearly the same matrix, so
    ``q_i·k_j`` approximates a Gaussian kernel of the distance between the two pixels (plus a term
    for both being on a curve). Head ``h`` has its own length scale, from 2 pixels to a quarter of
    the side, so some heads look locally and others across the image. q and k are scaled so that
    a token's score against itself (with the usual 1/√head_dim) is about ``SELF_SCORE_TARGET``.

    Returns arrays of shape ``(1, heads, len(tokens), head_dim)`` in ``dtype``.
    """
    _require_positive(side=side, heads=heads, head_dim=head_dim)
    tokens = numpy.asarray(tokens, dtype=numpy.float64)
    n = tokens.shape[0]
    rng = numpy.random.default_rng([seed, 1])
    index = numpy.arange(n)
    position = numpy.stack([index // side, index % side], axis=1).astype(numpy.float64)
    length_scales = numpy.geomspace(2.0, max(2.0, side / 4), heads)

    q = numpy.empty((1, heads, n, head_dim), dtype=dtype)
    k, v = numpy.empty_like(q), numpy.empty_like(q)
    for h in range(heads):
        frequencies = rng.normal(0, 1 / length_scales[h], size=(2, FOURIER_FEATURES))
        angles = position @ frequencies
        features = numpy.concatenate(
            [numpy.cos(angles), numpy.sin(angles), PIXEL_WEIGHT * tokens[:, None]], axis=1)
        features[:, : 2 * FOURIER_FEATURES] /= math.sqrt(FOURIER_FEATURES)
        # Orthonormal columns (or rows, when head_dim is the larger) keep q·k close to the
        # features' own inner product, which is the kernel of the pixel distance.
        basis = _orthonormal(rng, features.shape[1], head_dim)
        q_h = features @ basis
        k_h = features @ (basis + rng.normal(0, 0.1 / math.sqrt(head_dim), size=basis.shape))
        gain = _score_gain(q_h, k_h, rng)
        q[0, h], k[0, h] = q_h * gain, k_h * gain
        v[0, h] = features @ rng.normal(0, 1, size=basis.shape)
    return q, k, v


def _require_int(**sizes):
    """TypeError naming the first of ``sizes`` (argument name → value) that is no integer (a
    bool is none): a float size failed deep inside NumPy, or as an image side read the tokens
    at fractional positions."""
    for name, value in sizes.items():
        if not _checks.is_integer(value):
            raise TypeError(f"{name} must be an int, got {_checks._show(value)} of type "
                            f"{_checks._type_name(value)}")


def _require_positive(**sizes):
    """As ``_require_int``, then ValueError naming the first of ``sizes`` that is below 1."""
    _require_int(**sizes)
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")


def _orthonormal(rng: numpy.random.Generator, rows: int, cols: int) -> numpy.ndarray:
    gaussian = rng.normal(size=(max(rows, cols), min(rows, cols)))
    basis, _ = numpy.linalg.qr(gaussian)
    return basis if rows >= cols else basis.T


def _score_gain(q: numpy.ndarray, k: numpy.ndarray, rng: numpy.random.Generator) -> float:
    """The factor for q and k that brings the median self-score to SELF_SCORE_TARGET."""
    sample = rng.choice(q.shape[0], size=min(q.shape[0], 1024), replace=False)
    self_scores = numpy.einsum("nd,nd->n", q[sample], k[sample]) / math.sqrt(q.shape[1])
    median = float(numpy.median(numpy.abs(self_scores)))
    return math.sqrt(SELF_SCORE_TARGET / median) if median > 0 else 1.0


def pathfinder_qkv(seq_len: int, *, heads: int, head_dim: int, seed: int = 0, dtype=numpy.float32):
    """q, k, v for ``seq_len`` tokens of one Pathfinder image, and the image.

    The image side is the smallest square with at least ``seq_len`` pixels (128 for 16,384 tokens,
    256 for 65,536); when ``seq_len`` is not a square, the last row is cut short. It must be at
    least MIN_TOKENS (an 8×8 image).
    """
    _require_int(seq_len=seq_len)
    if seq_len < MIN_TOKENS:
        raise ValueError(f"seq_len must be at least {MIN_TOKENS} (an image of "
                         f"{MIN_SIDE}×{MIN_SIDE} pixels), got {seq_len}")
    side = image_side_for(seq_len)
    image = pathfinder_image(side, seed=seed)
    q, k, v = project_to_qkv(image.tokens(seq_len), side, heads=heads, head_dim=head_dim,
                             seed=seed, dtype=dtype)
    return q, k, v, image


def random_qkv(seq_len: int, *, heads: int, head_dim: int, seed: int = 0, dtype=numpy.float32):
    """Standard normal q, k, v of shape ``(1, heads, seq_len, head_dim)`` (the plain-noise input)."""
    _require_positive(seq_len=seq_len, heads=heads, head_dim=head_dim)
    rng = numpy.random.default_rng([seed, 2])
    shape = (1, heads, seq_len, head_dim)
    return tuple(rng.standard_normal(shape, dtype=numpy.float32).astype(dtype) for _ in range(3))
