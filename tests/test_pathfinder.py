"""The synthetic Pathfinder images and their projection to q, k, v."""

import math

import ml_dtypes
import numpy as np
import pytest

from cuflash.check import pathfinder
from cuflash.check.pathfinder import (image_side_for, pathfinder_image, pathfinder_qkv, project_to_qkv,
                                random_qkv)


@pytest.mark.parametrize("side", [16, 128, 256])
def test_image_is_a_square_of_values_in_unit_interval(side):
    image = pathfinder_image(side, seed=1)
    assert image.pixels.shape == (side, side)
    assert image.pixels.dtype == np.float32
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    lit = float((image.pixels > 0).mean())
    assert 0.005 < lit < 0.2, f"curves should cover a small part of the image, got {lit:.3f}"


def test_same_seed_same_image_other_seed_other_image():
    a, b, c = (pathfinder_image(64, seed=s) for s in (3, 3, 4))
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.connected == b.connected and a.markers == b.markers
    assert not np.array_equal(a.pixels, c.pixels)


@pytest.mark.parametrize("connected", [True, False])
def test_markers_are_lit_discs_inside_the_image(connected):
    image = pathfinder_image(128, seed=5, connected=connected)
    assert image.connected is connected
    for row, col in image.markers:
        assert 0 <= row < 128 and 0 <= col < 128
        assert image.pixels[row, col] == 1.0
        assert image.pixels[row - 1:row + 2, col - 1:col + 2].min() == 1.0


def test_both_labels_occur_when_the_seed_draws_them():
    labels = {pathfinder_image(32, seed=s).connected for s in range(20)}
    assert labels == {True, False}


@pytest.mark.parametrize("n, side", [(1, 1), (2, 2), (1000, 32), (1024, 32), (1025, 33),
                                     (16384, 128), (65536, 256)])
def test_image_side_is_the_smallest_square_holding_n_pixels(n, side):
    assert image_side_for(n) == side


def test_bad_sizes_are_rejected_with_the_value():
    with pytest.raises(ValueError, match="got 0"):
        image_side_for(0)
    with pytest.raises(ValueError, match="at least 8"):
        pathfinder_image(4)
    with pytest.raises(ValueError, match="between 1 and 256"):
        pathfinder_image(16).tokens(257)
    with pytest.raises(ValueError, match="positive"):
        project_to_qkv(np.zeros(16), 4, heads=0, head_dim=8)

@pytest.mark.parametrize("side", [0, -4])
def test_projection_refuses_an_image_side_below_one(side):
    """side=0 divided the token indices by zero (a RuntimeWarning) and side=-4 put the tokens
    at negative rows: both returned q, k, v of positions no image has."""
    with pytest.raises(ValueError, match=f"side must be positive, got {side}"):
        project_to_qkv(np.zeros(16), side, heads=1, head_dim=8)


@pytest.mark.parametrize("call, name, given", [
    (lambda: image_side_for(64.5), "seq_len", "64.5"),
    (lambda: pathfinder_image(16.0), "side", "16.0"),
    (lambda: pathfinder_image(16).tokens(10.5), "seq_len", "10.5"),
    (lambda: pathfinder_qkv(64.5, heads=1, head_dim=8), "seq_len", "64.5"),
    (lambda: project_to_qkv(np.zeros(64), 8.5, heads=1, head_dim=8), "side", "8.5"),
    (lambda: project_to_qkv(np.zeros(64), 8, heads=2.0, head_dim=8), "heads", "2.0"),
    (lambda: project_to_qkv(np.zeros(64), 8, heads=1, head_dim=4.5), "head_dim", "4.5"),
    (lambda: random_qkv(8.5, heads=1, head_dim=8), "seq_len", "8.5"),
    (lambda: random_qkv(8, heads=True, head_dim=8), "heads", "True"),
    (lambda: random_qkv(8, heads=1, head_dim=np.float32(8)), "head_dim",
     r"np\.float32\(8\.0\)")])
def test_sizes_that_are_no_integers_are_refused_naming_them(call, name, given):
    """A float size failed deep inside NumPy ('float' object cannot be interpreted as an
    integer) or, as an image side, read the tokens at fractional positions; a bool passed as 1."""
    with pytest.raises(TypeError, match=rf"^{name} must be an int, got {given}"):
        call()


@pytest.mark.parametrize("separate", [False, True])
def test_a_negative_count_of_distractors_is_refused_naming_it(separate):
    """distractors=-1 drew no distractor without a word, and with separate=True fewer than the
    two marked curves, then failed with an IndexError."""
    with pytest.raises(ValueError, match="distractors must be at least 0, got -1"):
        pathfinder_image(64, distractors=-1, separate=separate)
    with pytest.raises(TypeError, match="distractors must be an int, got 2.5"):
        pathfinder_image(64, distractors=2.5, separate=separate)
    assert pathfinder_image(64, seed=1, distractors=0, separate=separate).side == 64


@pytest.mark.parametrize("seq_len", [10, 49])
def test_pathfinder_inputs_too_short_name_seq_len(seq_len):
    """pathfinder_qkv(10, ...) said 'side must be at least 8 pixels, got 4': an argument the
    caller never passed. The error names seq_len and the least length an image holds."""
    with pytest.raises(ValueError, match=rf"seq_len must be at least 50 .*got {seq_len}"):
        pathfinder_qkv(seq_len, heads=1, head_dim=8)
    assert pathfinder.MIN_TOKENS == 50
    assert pathfinder_qkv(pathfinder.MIN_TOKENS, heads=1, head_dim=8)[3].side == 8



def test_tokens_are_read_row_by_row_and_cut():
    image = pathfinder_image(16, seed=2)
    np.testing.assert_array_equal(image.tokens(), image.pixels.ravel())
    np.testing.assert_array_equal(image.tokens(20), np.concatenate([image.pixels[0],
                                                                    image.pixels[1, :4]]))


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32])
def test_qkv_shapes_dtypes_and_determinism(dtype):
    q, k, v, image = pathfinder_qkv(1000, heads=3, head_dim=16, seed=7, dtype=dtype)
    assert image.side == 32
    for x in (q, k, v):
        assert x.shape == (1, 3, 1000, 16) and x.dtype == np.dtype(dtype)
        assert np.isfinite(x.astype(np.float32)).all()
    again = pathfinder_qkv(1000, heads=3, head_dim=16, seed=7, dtype=dtype)
    for x, y in zip((q, k, v), again[:3]):
        np.testing.assert_array_equal(x, y)


def _scores(q, k, head, rows):
    d = q.shape[-1]
    return q[0, head, rows].astype(np.float64) @ k[0, head].astype(np.float64).T / math.sqrt(d)


def test_scores_are_calibrated_and_not_degenerate():
    heads, n = 4, 4096
    q, k, _, _ = pathfinder_qkv(n, heads=heads, head_dim=64, seed=0)
    rows = np.random.default_rng(0).choice(n, 64, replace=False)
    effective_keys = []
    for h in range(heads):
        s = _scores(q, k, h, rows)
        self_scores = s[np.arange(len(rows)), rows]
        assert np.median(self_scores) == pytest.approx(pathfinder.SELF_SCORE_TARGET, rel=0.25)
        assert 2 < s.max() < 30, "scores should be O(1)–O(10)"
        p = np.exp(s - s.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        entropy = -(p * np.log(np.where(p > 0, p, 1))).sum(axis=1)
        effective_keys.append(float(np.exp(entropy).mean()))
    # Neither one-hot nor uniform, and heads differ: local heads look at fewer keys.
    assert all(2 < keys < n / 2 for keys in effective_keys), effective_keys
    assert effective_keys[0] < effective_keys[-1]


def test_nearby_pixels_score_higher_than_distant_ones():
    side = 64
    q, k, _, _ = pathfinder_qkv(side * side, heads=1, head_dim=64, seed=1)
    centre = (side // 2) * side + side // 2
    s = _scores(q, k, 0, [centre])[0]
    rows, cols = np.divmod(np.arange(side * side), side)
    distance = np.hypot(rows - side // 2, cols - side // 2)
    assert s[(distance > 0) & (distance <= 2)].mean() > s[distance > side / 4].mean() + 2


def test_random_inputs_are_standard_normal():
    q, k, v = random_qkv(2048, heads=2, head_dim=32, seed=3)
    assert q.shape == (1, 2, 2048, 32) and q.dtype == np.float32
    for x in (q, k, v):
        assert abs(float(x.mean())) < 0.02 and float(x.std()) == pytest.approx(1, abs=0.02)
    assert not np.array_equal(q, k)


@pytest.mark.parametrize("sizes, name", [((0, 2, 8), "seq_len"), ((16, 0, 8), "heads"),
                                         ((16, -1, 8), "heads"), ((16, 2, 0), "head_dim")])
def test_random_inputs_refuse_sizes_that_are_not_positive(sizes, name):
    """random_qkv returned empty arrays for a length, head count or head dimension of 0 (and
    NumPy's 'negative dimensions are not allowed' for -1), where pathfinder_qkv refuses them."""
    seq_len, heads, head_dim = sizes
    with pytest.raises(ValueError, match=rf"{name}.*must be positive"):
        random_qkv(seq_len, heads=heads, head_dim=head_dim)


def _joined(pixels, a, b, reach=1):
    """Whether lit pixels lead from a to b in steps of at most ``reach`` pixels (Chebyshev)."""
    lit = pixels > 0
    seen, todo = {a}, [a]
    while todo:
        r, c = todo.pop()
        for dr in range(-reach, reach + 1):
            for dc in range(-reach, reach + 1):
                p = (r + dr, c + dc)
                if (0 <= p[0] < lit.shape[0] and 0 <= p[1] < lit.shape[1] and lit[p]
                        and p not in seen):
                    seen.add(p)
                    todo.append(p)
    return b in seen


@pytest.mark.parametrize("side", [32, 64])
def test_separate_curves_make_the_label_readable_from_the_pixels(side):
    """With separate=True the dashes of one curve are at most 2 pixels apart, and different
    curves at least 4: stepping over one dark pixel joins the markers exactly when connected."""
    for seed in range(12):
        image = pathfinder_image(side, seed=seed, connected=seed % 2 == 0, separate=True)
        assert _joined(image.pixels, *image.markers, reach=2) is image.connected, seed


def test_separate_curves_balance_the_classes():
    # The same number of curves for both labels, so the amount of ink says little; the marker
    # distance is matched (it tells the classes apart much less than without separate=True).
    ink = {True: [], False: []}
    distance = {True: [], False: []}
    for seed in range(60):
        image = pathfinder_image(32, seed=seed, connected=seed % 2 == 0, separate=True)
        ink[image.connected].append(image.pixels.sum())
        (r1, c1), (r2, c2) = image.markers
        distance[image.connected].append(math.hypot(r1 - r2, c1 - c2))
    assert np.mean(ink[True]) == pytest.approx(np.mean(ink[False]), rel=0.15)
    assert np.mean(distance[True]) == pytest.approx(np.mean(distance[False]), rel=0.2)


def test_default_images_are_unchanged_by_the_separate_option():
    a = pathfinder_image(32, seed=4)
    b = pathfinder_image(32, seed=4, separate=False)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert a.connected == pathfinder_image(32, seed=4, separate=True).connected


@pytest.mark.parametrize("side", [8, 12])
def test_separate_curves_that_cannot_fit_raise(side):
    # Two marked curves 3 pixels apart, with marker discs, never fit on such sides.
    with pytest.raises(ValueError, match=rf"side={side}, separate=True, distractors=1\b.*larger"):
        pathfinder_image(side, seed=0, separate=True)


def test_separate_curves_with_too_many_distractors_raise(monkeypatch):
    monkeypatch.setattr(pathfinder, "SEPARATE_IMAGE_TRIES", 5)   # 30 distractors never fit anyway
    with pytest.raises(ValueError, match=r"side=32, separate=True, distractors=30\b.*fewer"):
        pathfinder_image(32, seed=0, separate=True, distractors=30)


def test_separate_curves_give_up_after_whole_images_not_before(monkeypatch):
    # Seed 1 on a 16-pixel side fits at the 6th whole image: a bound of 6 still draws the same
    # image as the default bound (the failed tries use the random numbers as before), 5 gives up.
    expected = pathfinder_image(16, seed=1, connected=False, separate=True)
    monkeypatch.setattr(pathfinder, "SEPARATE_IMAGE_TRIES", 6)
    image = pathfinder_image(16, seed=1, connected=False, separate=True)
    np.testing.assert_array_equal(image.pixels, expected.pixels)
    assert image.markers == expected.markers
    monkeypatch.setattr(pathfinder, "SEPARATE_IMAGE_TRIES", 5)
    with pytest.raises(ValueError, match="in 5 tries"):
        pathfinder_image(16, seed=1, connected=False, separate=True)
