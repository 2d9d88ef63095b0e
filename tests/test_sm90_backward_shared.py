"""The shared memory of the warp-specialised Hopper dQ kernel (``flash_bwd_sm90_dq_ws``), as the
host sizes its launch (``sm90_backward.dq_ring_shared_bytes``), against the kernel's layout
(DqRingSmem and the kernel's static ``barrier_words`` in csrc/flash_bwd_sm90.cu), counted here
member by member. No GPU needed."""

from __future__ import annotations

import pytest

from cuflash.kernels import sm90_backward
from cuflash.kernels._variants import spec_of

LIMIT = 227 * 1024  # a Hopper thread block's shared memory: dynamic and static together
BLOCK_M, BLOCK_N = 128, 64  # DqRingSmem::BLOCK_M, the kernel's key tile
BOX_ROW = 128  # bytes of one row of a 64-column box of 16-bit elements
K_STAGES = 2
BASE_ALIGN = 16  # extern __shared__ __align__(16) smem_raw: the dynamic bytes' base at least


def _boxes(dim: int) -> int:
    """64-column boxes of a step dim: ``dim`` rounded up to 16 (HeadSteps), then to 64
    (box_columns)."""
    return -(-(-(-dim // 16) * 16) // 64)


def _dynamic_need(qk_boxes: int, dp_boxes: int, v_stages: int) -> int:
    """The dynamic bytes the kernel reaches at worst: ``sq`` rounded up to 1024 bytes from a base
    only 16-byte aligned, then Q, dO, the K and V buffers and the lse2 and Delta rows."""
    padding = 1024 - BASE_ALIGN
    q, do = qk_boxes * BLOCK_M * BOX_ROW, dp_boxes * BLOCK_M * BOX_ROW
    k_buffers = K_STAGES * qk_boxes * BLOCK_N * BOX_ROW
    v_buffers = v_stages * dp_boxes * BLOCK_N * BOX_ROW
    rows = 2 * BLOCK_M * 4
    return padding + q + do + k_buffers + v_buffers + rows


def _static_barriers(v_stages: int) -> int:
    """barrier_words: Q, dO and the rows in; each K and each V buffer in and free."""
    return 8 * (1 + 2 * K_STAGES + 2 * v_stages)


def _kernel_v_stages(qk_boxes: int, dp_boxes: int) -> int:
    """DqRingSmem::V_STAGES as the kernel states it (its FIXED counts a 1 KB alignment margin)."""
    fixed = (qk_boxes + dp_boxes) * BLOCK_M * BOX_ROW + K_STAGES * qk_boxes * BLOCK_N * BOX_ROW \
        + 2 * BLOCK_M * 4 + 1024
    return 2 if fixed + 2 * dp_boxes * BLOCK_N * BOX_ROW <= LIMIT else 1


# Every (D, Dv) the kernel runs: the 256-column tile, D or Dv above 128, both multiples of 8.
PAIRS = [(d, dv) for d in range(8, 257, 8) for dv in range(8, 257, 8) if max(d, dv) > 128]


def test_the_dq_ring_launch_holds_its_layout_within_the_block_limit():
    """For every head-dim pair the launch's dynamic bytes hold everything the kernel lays out
    there with the V buffers it takes, and those bytes with its static mbarriers stay within
    227 KB; two V buffers wherever they fit, one only where both D and Dv pass 192."""
    single = []
    for d, dv in PAIRS:
        spec = spec_of("bfloat16", d, dv)
        assert sm90_backward.tile_head_dim(spec) == sm90_backward.SPLIT_HEAD_DIM
        qk_boxes, dp_boxes = _boxes(d), _boxes(dv)
        v_stages = _kernel_v_stages(qk_boxes, dp_boxes)
        launched = sm90_backward.dq_ring_shared_bytes(spec)
        assert launched >= _dynamic_need(qk_boxes, dp_boxes, v_stages), (d, dv)
        assert launched + _static_barriers(v_stages) <= LIMIT, (d, dv, launched)
        if v_stages == 1:
            single.append((d, dv))
            assert _dynamic_need(qk_boxes, dp_boxes, 2) + _static_barriers(2) > LIMIT, (d, dv)
    assert single == [(d, dv) for d, dv in PAIRS if d > 192 and dv > 192]


@pytest.mark.parametrize("d, dv", [(256, 192), (192, 256), (256, 256), (136, 8)])
def test_the_launch_holds_the_v_buffers_the_kernel_lays_out(d, dv):
    """The host's figure is the kernel's: with the V buffers the kernel takes (its own rule),
    nothing more and nothing less than what DqRingSmem counts, 1 KB of alignment included."""
    spec = spec_of("bfloat16", d, dv)
    qk_boxes, dp_boxes = _boxes(d), _boxes(dv)
    v_stages = _kernel_v_stages(qk_boxes, dp_boxes)
    assert sm90_backward.dq_ring_shared_bytes(spec) == _dynamic_need(qk_boxes, dp_boxes, v_stages) + BASE_ALIGN
