"""Which kernel family runs a call: the registry's order, the reasons it gives, kernel_plan()."""

from __future__ import annotations

import dataclasses
import re
import types

import ml_dtypes
import numpy as np
import pytest

import cuflash
from cuflash import kernels


@dataclasses.dataclass(frozen=True)
class StubFamily(kernels.Family):
    """A family whose launcher's answer is fixed: `refusal` (None = it runs the call)."""

    refusal: str | None = None

    def launcher(self):
        return types.SimpleNamespace(supports=lambda spec, arrays: self.refusal)


PRE_FLAGS = ("aligned", "zero_dq", "varlen", "zero_semaphores", "zero_lanes", "zero_claims")


def pre_flags(expression: str) -> dict[str, bool]:
    """The flags of a ``flash_bwd_pre<T, ALIGNED, ZERO_DQ, VARLEN, ZERO_SEMS, ZERO_LANES,
    ZERO_CLAIMS>`` expression by name, those left out false."""
    assert expression.startswith("flash_bwd_pre<"), expression
    values = expression.removesuffix(">").split(", ")[1:]
    return {name: i < len(values) and values[i] == "true" for i, name in enumerate(PRE_FLAGS)}


def _stub(name, refusal=None, hopper=False):
    return StubFamily(name, "stub", "forward", f"{name} kernels", hopper=hopper, refusal=refusal)


def test_first_family_that_supports_the_call_runs_it(monkeypatch):
    monkeypatch.setitem(kernels.REGISTRY, "forward",
                        (_stub("fast", "takes D = 64 only"), _stub("portable"), _stub("slow")))
    plan = kernels.plan("forward", spec=None, arrays=())
    assert plan.family.name == "portable"
    assert plan.passed_over == (("fast", "takes D = 64 only"),)
    assert plan.describe().splitlines() == ["forward: portable (portable kernels)",
                                            "  passed over fast: takes D = 64 only"]


def test_no_family_gives_every_reason(monkeypatch):
    monkeypatch.setitem(kernels.REGISTRY, "forward", (_stub("a", "no a"), _stub("b", "no b")))
    plan = kernels.plan("forward", spec=None, arrays=())
    assert plan.family is None
    assert plan.passed_over == (("a", "no a"), ("b", "no b"))


def test_hopper_families_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(kernels.DISABLE_HOPPER_ENV, "1")
    monkeypatch.setitem(kernels.REGISTRY, "forward", (_stub("sm90", hopper=True), _stub("sm80")))
    plan = kernels.plan("forward", spec=None, arrays=())
    assert plan.family.name == "sm80"
    assert plan.passed_over == (("sm90", f"disabled by {kernels.DISABLE_HOPPER_ENV}"),)


def test_registries_list_the_fastest_family_first():
    names = {pass_name: [f.name for f in kernels.REGISTRY[pass_name]] for pass_name in ("forward", "backward")}
    assert names["forward"] == ["sm90-tma", "sm90-wgmma", "sm80-mma", "float32"]
    assert names["backward"] == ["sm90-wgmma", "sm80-mma", "float32"]


def test_kernel_plan_on_numpy_names_the_numpy_path():
    q = np.zeros((2, 4, 33, 64), np.float32)
    plan = cuflash.kernel_plan(q, q, q, causal=True, window=(16, 0), softcap=5.0)
    assert not plan.on_gpu
    assert str(plan).splitlines() == [
        "call: float32, D=64, Dv=64, causal, window=(16, 0), softcap=5", "forward: numpy (cuflash.cpu)",
        "backward: numpy (cuflash.cpu)"]


def test_kernel_plan_validates_like_attention():
    q = np.zeros((1, 2, 8, 64), np.float32)
    with pytest.raises(ValueError, match="window"):
        cuflash.kernel_plan(q, q, q, window=(-2, 0))


def test_kernel_plan_takes_attention_s_options_and_deterministic():
    q = np.zeros((1, 2, 8, 64), np.float32)
    plan = cuflash.kernel_plan(q, q, q, dropout_p=0.1, dropout_seed=3, deterministic=True)
    assert plan.spec.deterministic and plan.spec.dropout_seed == 3
    for name, value in (("return_lse", True), ("out", np.zeros_like(q))):
        with pytest.raises(TypeError, match=name):
            cuflash.kernel_plan(q, q, q, **{name: value})
    half = q.astype(np.float16)
    assert cuflash.kernel_plan(half, half, half, grad_dtype=np.float32).spec.float32_grads
    with pytest.raises(ValueError, match="grad_dtype"):
        cuflash.kernel_plan(half, half, half, grad_dtype=np.float64)


def test_kernel_plan_plans_the_backward_attention_backward_runs(monkeypatch):
    """The backward plan is made for the gradients attention_backward then stores: float32 with
    grad_dtype=float32, and where an input is broadcast along the batch (its gradient a sum over
    it, rounded once); the inputs' dtype otherwise. Float32 gradients take other Hopper kernels."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash import kernels

    device = FakeDevice(monkeypatch, compute_capability="90")
    q = device.empty((2, 4, 384, 64), ml_dtypes.bfloat16)
    shared = device.empty((1, 4, 384, 64), ml_dtypes.bfloat16)  # one k and v for the batch
    planned = {}
    plan = kernels.plan
    monkeypatch.setattr(kernels, "plan", lambda name, spec, arrays: planned.__setitem__(name, spec)
                        or plan(name, spec, arrays))
    for keys, options, float32 in ((q, {}, False), (q, dict(grad_dtype=np.float32), True),
                                   (shared, {}, True)):
        cuflash.kernel_plan(q, keys, keys, causal=True, **options)
        assert planned["backward"].float32_grads == float32, (options, planned["backward"])
    dout, out = (device.empty(q.shape, ml_dtypes.bfloat16) for _ in range(2))
    lse = device.empty((2, 4, 384), np.float32)
    device.take_launches()
    cuflash.attention_backward(dout, q, q, q, out, lse, causal=True)
    default = [launch[0] for launch in device.take_launches()]
    cuflash.attention_backward(dout, q, q, q, out, lse, causal=True, grad_dtype=np.float32)
    assert [launch[0] for launch in device.take_launches()] != default


@pytest.mark.gpu
def test_kernel_plan_on_the_gpu_gives_the_reasons(xp_gpu):
    from cuflash.kernels import _launch

    hopper = _launch.on_hopper(xp_gpu.empty(1))
    # D = 160 runs the Hopper backward's 256-column tile, whose split dK/dV kernel is
    # warp-specialised only: a broadcast key axis, beyond TMA, falls to the mma.sync kernels.
    q160 = xp_gpu.zeros((1, 2, 128, 160), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(q160, q160, q160, causal=True)
    assert plan.forward.family.name == ("sm90-tma" if hopper else "sm80-mma")
    assert plan.backward.family.name == ("sm90-wgmma" if hopper else "sm80-mma")
    kv160 = xp_gpu.zeros((1, 1, 128, 160), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(xp_gpu.zeros((2, 2, 128, 160), ml_dtypes.bfloat16), kv160, kv160)
    assert plan.backward.family.name == "sm80-mma"
    reason = dict(plan.backward.passed_over)["sm90-wgmma"]
    assert reason.startswith("takes D or Dv above 128 only in the warp-specialised dK/dV kernel"
                             if hopper else "needs compute capability 9.0 (Hopper)"), reason
    # Narrower head dims run the Hopper backward's 64- or 128-column tiles with zero columns.
    q96 = xp_gpu.zeros((1, 2, 128, 96), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(q96, q96, q96, causal=True)
    assert plan.backward.family.name == ("sm90-wgmma" if hopper else "sm80-mma")

    q32 = xp_gpu.zeros((1, 2, 128, 64), np.float32)
    plan = cuflash.kernel_plan(q32, q32, q32)
    assert plan.forward.family.name == "float32"
    assert [name for name, _ in plan.forward.passed_over] == ["sm90-tma", "sm90-wgmma", "sm80-mma"]

    q64 = xp_gpu.zeros((1, 2, 128, 64), ml_dtypes.bfloat16)
    expected = "sm90-tma" if hopper else "sm80-mma"
    assert cuflash.kernel_plan(q64, q64, q64, window=(32, 0)).forward.family.name == expected
    # A broadcast (stride-0) key axis is beyond TMA: the previous Hopper kernel takes it.
    k_broadcast = xp_gpu.zeros((1, 1, 128, 64), ml_dtypes.bfloat16)
    q_two = xp_gpu.zeros((2, 2, 128, 64), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(q_two, k_broadcast, k_broadcast)
    if hopper:
        assert plan.forward.family.name == "sm90-wgmma"
        assert "no broadcast axes" in dict(plan.forward.passed_over)["sm90-tma"]


def test_dropout_on_hopper_runs_the_hopper_kernels_that_draw_the_mask(monkeypatch):
    """On a fake compute-capability 9.0 device: the TMA forward and the wgmma backward draw the
    dropout mask; kernel_plan shows them chosen, and a head dim the TMA forward does not take
    falls to sm80, past the wgmma forward, which names dropout (the wgmma backward takes it, with
    zero columns up to 64)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    q = device.empty((1, 2, 128, 64), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(q, q, q, causal=True, dropout_p=0.1, dropout_seed=3)
    assert plan.forward.family.name == "sm90-tma"
    assert plan.backward.family.name == "sm90-wgmma"
    odd = device.empty((1, 2, 128, 24), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(odd, odd, odd, dropout_p=0.1, dropout_seed=3)
    reason = ("dropout (dropout_p=0.1) runs in the sm80-mma, sm90-tma forward and sm90-wgmma "
              "backward kernels only")
    assert plan.forward.family.name == "sm80-mma"
    assert plan.backward.family.name == "sm90-wgmma"
    assert ("sm90-wgmma", reason) in plan.forward.passed_over
    assert cuflash.kernel_plan(q, q, q, causal=True).forward.family.name == "sm90-tma"


def test_gpu_dropout_runs_the_sm80_family(monkeypatch):
    """On a compute-capability 8.0 device a dropout call runs the sm80 kernels, both passes."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="80")
    q = device.empty((1, 2, 128, 64), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(q, q, q, dropout_p=0.1, dropout_seed=3)
    assert plan.forward.family.name == plan.backward.family.name == "sm80-mma"


@pytest.mark.parametrize("d, causal", [(64, False), (64, True), (128, False), (128, True)])
def test_hopper_backward_forms_dq_in_the_dkdv_kernel_unless_deterministic(monkeypatch, d, causal):
    """On a fake compute-capability 9.0 device the default backward forms dQ inside the dK/dV
    kernel (float32 parts stored or added into the accumulator, with the lane counters and tile
    claims flash_bwd_pre zeroes, then the cast of its fragment order, lane by lane): no dq
    kernel. deterministic=True with
    CUFLASH_SM90_ORDERED_DQ=0 runs the dq kernel and has no accumulator."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import ORDERED_DQ_ENV, _launch

    monkeypatch.setenv(ORDERED_DQ_ENV, "0")

    device = FakeDevice(monkeypatch, compute_capability="90")
    q, k, v, out, dout = (device.empty((1, 2, 256, d), ml_dtypes.bfloat16) for _ in range(5))
    lse = device.empty((1, 2, 256), np.float32)
    expected = {
        False: ["flash_bwd_pre", "flash_bwd_sm90_dkdv_ws", "flash_bwd_dq_convert"],
        True: ["flash_bwd_pre", "flash_bwd_sm90_dkdv_ws", "flash_bwd_sm90_dq"],
    }
    for deterministic in (False, True):
        cuflash.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                   deterministic=deterministic)
        launches = device.take_launches()
        two_kernels = deterministic
        assert [x[0].split("<")[0] for x in launches] == expected[two_kernels]
        pre, dkdv = launches[0][0], launches[1][0]
        # causal claims its dQ tiles and needs no zeros; the dK/dV kernel's last flag is ATOMIC_DQ.
        flags = pre_flags(pre)
        assert pre.startswith("flash_bwd_pre<bf16_t, ") and flags["aligned"]
        assert [flags[name] for name in ("zero_dq", "zero_lanes", "zero_claims")] == (
            [False] * 3 if two_kernels else [not causal, True, causal])
        assert dkdv.endswith(", ScoreMod<false, false>>" if two_kernels
                             else ", ScoreMod<false, false>, false, false, true>")
        accum = np.frombuffer(launches[1][4], _launch.BWD_ARGS)[0]["dq_accum"]
        assert (accum == 0) == two_kernels
        if not two_kernels:
            # The cast reads the accumulator in its fragment order, lane by lane (last two flags),
            # each of the 2 lanes once its 2 key tiles have added (n_tiles), its 2·256 rows of 64
            # or 128 columns in steps of 1,024 chunks of 8 columns.
            cast, blocks = launches[2][0], launches[2][1][0]
            assert cast.endswith(", false, false, true, true>")
            assert np.frombuffer(launches[2][4], _launch.BWD_ARGS)[0]["n_tiles"] == 2
            assert blocks == 2 * 256 * (d // 8) // 1024


def test_the_dq_cast_goes_lane_by_lane_where_the_dkdv_kernel_counts_its_lanes(monkeypatch):
    """Where the warp-specialised dK/dV kernel adds dQ in any order into a dense call's
    accumulator (sm90_backward.lanes_counted), flash_bwd_pre zeroes one counter per (batch,
    key/value head) lane past the accumulator and the cast goes lane by lane: each lane waits
    for its key tiles (n_tiles: under GQA every query head of the group adds into the lane's
    rows, so its count is the lane's key tiles, not those times the group), on at most 8 blocks
    per SM. CAST_DQ_BY_LANE = False keeps the cast after the whole grid, the dK/dV kernel and its
    counters unchanged; the cp.async dK/dV kernel, ordered adds and packed sequences count
    nothing."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash import _calls
    from cuflash.kernels import WARP_SPECIALISED_BACKWARD_ENV, _launch, mma_backward, sm90_backward
    from cuflash.kernels._variants import spec_of

    device = FakeDevice(monkeypatch, compute_capability="90")  # 132 SMs
    workspaces = []
    monkeypatch.setattr(mma_backward.Scratch, "allocate",
                        lambda self, _allocate=mma_backward.Scratch.allocate:
                        workspaces.append(self) or _allocate(self))

    def launches(b, hq, hkv, n, d, **options):
        q, dout, out = (device.empty((b, hq, n, d), ml_dtypes.bfloat16) for _ in range(3))
        k, v = (device.empty((b, hkv, n, d), ml_dtypes.bfloat16) for _ in range(2))
        cuflash.attention_backward(dout, q, k, v, out, device.empty((b, hq, n), np.float32), **options)
        return device.take_launches()

    def n_tiles(launch):
        return int(np.frombuffer(launch[4], _launch.BWD_ARGS)[0]["n_tiles"])

    pre, dkdv, cast = launches(2, 8, 2, 700, 128, causal=True)
    assert pre_flags(pre[0])["zero_lanes"] and cast[0].endswith(", true, true>")  # AFTER_LANES
    assert n_tiles(cast) == n_tiles(dkdv) == 6  # 128-key tiles of 700 keys, a lane's count
    assert cast[1] == (-(-2 * 8 * 700 * 16 // 1024),) and cast[2] == (256,)  # 8-column chunks, 4 a thread
    claims = workspaces[-1].rows // 32  # one per 32 scratch rows
    assert workspaces[-1].lane_counters == 2 * 2 + 1 and workspaces[-1].tile_claims == claims  # and the ticket
    assert workspaces[-1].nbytes == 4 * (2 * workspaces[-1].rows + workspaces[-1].accum + 5 + claims)
    assert launches(1, 16, 16, 16384, 128)[2][1] == (8 * 132,)  # at most 8 blocks per SM

    monkeypatch.setattr(sm90_backward, "CAST_DQ_BY_LANE", False)
    _calls.clear()
    after_grid = launches(2, 8, 2, 700, 128, causal=True)
    assert [x[0] for x in after_grid[:2]] == [pre[0], dkdv[0]]  # the same counting dK/dV kernel
    assert after_grid[2][0] == cast[0].removesuffix(", true>") + ">"
    assert after_grid[2][1] == (-(-2 * 8 * 700 * 16 // 256),) and workspaces[-1].lane_counters == 5
    monkeypatch.setattr(sm90_backward, "CAST_DQ_BY_LANE", True)

    for options, environment in ((dict(deterministic=True), {}), ({}, {WARP_SPECIALISED_BACKWARD_ENV: "0"})):
        with monkeypatch.context() as patch:
            for name, value in environment.items():
                patch.setenv(name, value)
            _calls.clear()
            pre, _, cast = launches(2, 8, 2, 700, 128, causal=True, **options)
            assert not pre_flags(pre[0])["zero_lanes"]
            assert cast[0].endswith(", false, false, true>") and workspaces[-1].lane_counters == 0
    packed = dataclasses.replace(spec_of("bfloat16", 128, causal=True), varlen=object())
    assert not sm90_backward.lanes_counted(packed, False, True, True)
    assert sm90_backward.lanes_counted(spec_of("bfloat16", 128, causal=True), False, True, True)


def test_the_fused_dq_goes_without_zeros_where_every_dq_tile_gets_a_part(monkeypatch):
    """The warp-specialised dK/dV kernel stores each dQ tile's first part (ordered adds: rank 0's;
    lanes counted under a band: the first claim's), so flash_bwd_pre leaves out the accumulator's
    zeros (its ZERO_DQ flag) where every dQ tile gets a part: no block or exact mask and every
    query row seeing a key. Rows without keys (causal with more queries than keys), a block mask
    or SKIP_DQ_ZEROS = False keep the zeros; so does a fused dQ that only adds (adds in any order
    without a band; the cp.async kernel's)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash import _calls
    from cuflash.kernels import sm90_backward
    from cuflash.kernels._variants import spec_of
    from cuflash.sparse import BlockMask

    device = FakeDevice(monkeypatch, compute_capability="90")

    def zeroes_dq(nq=384, nk=384, **options):
        q, dout, out = (device.empty((2, 4, nq, 128), ml_dtypes.bfloat16) for _ in range(3))
        k, v = (device.empty((2, 4, nk, 128), ml_dtypes.bfloat16) for _ in range(2))
        cuflash.attention_backward(dout, q, k, v, out, device.empty((2, 4, nq), np.float32), **options)
        return pre_flags(device.take_launches()[0][0])["zero_dq"]

    assert zeroes_dq()  # lanes counted without a band: adds only
    assert not zeroes_dq(deterministic=True)  # ordered adds
    for deterministic in (False, True):  # lanes counted; ordered adds
        assert not zeroes_dq(causal=True, deterministic=deterministic)
        assert not zeroes_dq(nq=200, nk=700, causal=True, deterministic=deterministic)
        assert not zeroes_dq(window=(30, 5), deterministic=deterministic)
        assert zeroes_dq(nq=700, nk=200, causal=True, deterministic=deterministic)  # 500 rows without keys
    assert not zeroes_dq(nq=700, nk=200, window=(-1, 500))  # every row's band reaches key 0
    block_mask = BlockMask.from_dense(np.tril(np.ones((3, 3), bool)), block_size=(128, 128))
    for ordered, counted in ((False, True), (True, False)):
        assert sm90_backward.dq_zeros_needed(spec_of("bfloat16", 128, nq=384, causal=True, block_mask=block_mask),
                                             ordered, True, counted)
        assert not sm90_backward.dq_zeros_needed(spec_of("bfloat16", 128, nq=384, causal=True), ordered, True,
                                                 counted)
    assert sm90_backward.dq_zeros_needed(spec_of("bfloat16", 128, nq=384, causal=True), False, True, False)
    monkeypatch.setattr(sm90_backward, "SKIP_DQ_ZEROS", False)
    _calls.clear()
    assert zeroes_dq(causal=True) and zeroes_dq(deterministic=True)


@pytest.mark.parametrize("d, window", [(64, (-1, -1)), (128, (-1, 0)), (128, (40, 7))])
def test_deterministic_calls_fuse_dq_with_ordered_adds(monkeypatch, d, window):
    """Deterministic calls form dQ in the warp-specialised dK/dV kernel with ordered adds (its
    last flag), their semaphores zeroed by flash_bwd_pre (its ZERO_SEMS) in a workspace 4 bytes
    per 32 rows larger than the accumulator's, where default calls keep their lane counters (4
    bytes per lane, zeroed by its ZERO_LANES), and the cast after the whole dK/dV grid, not lane
    by lane; default calls are unchanged; block masks, the cp.async kernel and
    CUFLASH_SM90_ORDERED_DQ=0 take the dQ kernel instead."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import ORDERED_DQ_ENV, WARP_SPECIALISED_BACKWARD_ENV, mma_backward
    from cuflash.sparse import BlockMask

    device = FakeDevice(monkeypatch, compute_capability="90")
    q, k, v, out, dout = (device.empty((2, 4, 320, d), ml_dtypes.bfloat16) for _ in range(5))
    lse = device.empty((2, 4, 320), np.float32)
    workspaces = []
    monkeypatch.setattr(mma_backward.Scratch, "allocate",
                        lambda self, _allocate=mma_backward.Scratch.allocate:
                        workspaces.append(self) or _allocate(self))

    def sequence(**options):
        cuflash.attention_backward(dout, q, k, v, out, lse, window=window, **options)
        return [x[0] for x in device.take_launches()]

    monkeypatch.setenv(ORDERED_DQ_ENV, "0")
    default, two_kernels = sequence(), sequence(deterministic=True)
    monkeypatch.delenv(ORDERED_DQ_ENV)
    assert sequence() == default  # calls that need no order are unchanged
    ordered = sequence(deterministic=True)
    assert [x.split("<")[0] for x in ordered] == [
        "flash_bwd_pre", "flash_bwd_sm90_dkdv_ws", "flash_bwd_dq_convert"]
    # No zeros for ordered adds, nor for adds in any order under a band, which claim their dQ
    # tiles: every dQ tile's first part is stored.
    banded = window != (-1, -1)
    assert pre_flags(default[0]) == dict(pre_flags(ordered[0]), zero_dq=not banded, zero_semaphores=False,
                                         zero_lanes=True, zero_claims=banded)
    assert pre_flags(ordered[0]) == dict(aligned=True, zero_dq=False, varlen=False, zero_semaphores=True,
                                         zero_lanes=False, zero_claims=False)
    # ORDERED_DQ after ATOMIC_DQ; without a band also ROTATED_DQ (3 key tiles against 3 query tiles)
    assert ordered[1] == default[1][:-1] + (", true, true>" if window == (-1, -1) else ", true>")
    assert ordered[2] == default[2].removesuffix(", true>") + ">"  # no AFTER_LANES
    fused, with_semaphores = workspaces[-2], workspaces[-1]
    assert with_semaphores.accum == fused.accum and fused.semaphores == with_semaphores.lane_counters == 0
    assert fused.lane_counters == 2 * 4 + 1  # one per (batch, key/value head), and the cast's ticket
    # the default's claims of its dQ tiles, one per 32 scratch rows, under a band
    assert fused.tile_claims == (0 if window == (-1, -1) else fused.rows // 32) and with_semaphores.tile_claims == 0
    assert with_semaphores.semaphores == with_semaphores.rows // 32 == 2 * 4 * 384 // 32
    assert "in key-tile order" in cuflash.kernel_plan(q, k, v, window=window,
                                                      deterministic=True).backward.detail
    assert two_kernels[-1].startswith("flash_bwd_sm90_dq<")

    mask = BlockMask.from_dense(np.ones((3, 3), bool), block_size=128, shape=(320, 320))
    assert cuflash.kernel_plan(q, k, v, block_mask=mask, deterministic=True).backward.detail == (
        "a warp-specialised dK/dV kernel, then a dQ kernel (bit-identical run to run)")
    monkeypatch.setenv(WARP_SPECIALISED_BACKWARD_ENV, "0")
    assert sequence(deterministic=True)[-1].startswith("flash_bwd_sm90_dq<")


def test_kernel_plan_says_how_the_chosen_family_runs_the_call(monkeypatch):
    """kernel_plan's plans name the tiles of the Hopper TMA forward and the launch sequence of
    the backward, including whether its gradients are bit-identical run to run."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import WARP_SPECIALISED_BACKWARD_ENV

    device = FakeDevice(monkeypatch, compute_capability="90")
    q = device.empty((1, 2, 128, 64), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(q, q, q)
    assert plan.forward.detail == ("192-row query tiles against 128-key tiles, "
                                   "3 consumer warpgroups taking turns, a persistent grid where the "
                                   "tiles outnumber the blocks the SMs hold")
    assert "  runs 192-row query tiles" in str(plan)
    fused = ("the warp-specialised dK/dV kernel forming dQ too (float32 adds in any order: "
             "not bit-identical run to run)")
    ordered = ("the warp-specialised dK/dV kernel forming dQ too, its float32 adds in key-tile order "
               "(bit-identical run to run)")
    two_kernels = "a dK/dV kernel, then a dQ kernel (bit-identical run to run)"
    assert plan.backward.detail == fused
    assert cuflash.kernel_plan(q, q, q, deterministic=True).backward.detail == ordered
    wide = device.empty((1, 2, 128, 128), ml_dtypes.bfloat16)
    assert cuflash.kernel_plan(wide, wide, wide, causal=True).backward.detail == fused
    widest = device.empty((1, 2, 128, 256), ml_dtypes.bfloat16)  # no fused dQ past 128 columns
    assert (cuflash.kernel_plan(widest, widest, widest, deterministic=True).backward.detail
            == "a warp-specialised dK/dV kernel, then a warp-specialised dQ kernel (bit-identical run to run)")
    # Dropout's 64-row tiles at D = 64: the fused dQ by turns, in the warp-specialised kernel only.
    drop = dict(dropout_p=0.1, dropout_seed=1)
    assert cuflash.kernel_plan(q, q, q, **drop).backward.detail == fused
    assert cuflash.kernel_plan(q, q, q, deterministic=True, **drop).backward.detail == ordered
    monkeypatch.setenv(WARP_SPECIALISED_BACKWARD_ENV, "0")
    assert cuflash.kernel_plan(q, q, q, **drop).backward.detail == two_kernels
    monkeypatch.delenv(WARP_SPECIALISED_BACKWARD_ENV)

    device = FakeDevice(monkeypatch, compute_capability="80")
    q = device.empty((1, 2, 128, 64), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(q, q, q)
    assert plan.forward.detail == ""
    assert plan.backward.detail == ("the dK/dV kernel adding dQ by float32 atomics (in any order: "
                                    "not bit-identical run to run)")
    assert cuflash.kernel_plan(q, q, q, deterministic=True).backward.detail == two_kernels


def test_head_dim_32_takes_the_tma_forward_only_for_long_rows(monkeypatch):
    """Padded to 64 inside the TMA kernel, D = 32 measured slower than the mma.sync kernel on
    rows of up to 2K keys and faster beyond (benchmarks/NOTES.md)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    short = device.empty((1, 2, 2048, 32), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(short, short, short, causal=True)
    assert plan.forward.family.name == "sm80-mma"
    assert "rows of more than 2048 keys" in dict(plan.forward.passed_over)["sm90-tma"]
    long = device.empty((1, 2, 2049, 32), ml_dtypes.bfloat16)
    assert cuflash.kernel_plan(long, long, long, causal=True).forward.family.name == "sm90-tma"
    wide_values = device.empty((1, 2, 128, 64), ml_dtypes.bfloat16)
    assert cuflash.kernel_plan(short[:, :, :128], short[:, :, :128], wide_values).forward.family.name == "sm90-tma"


def test_tma_forward_takes_every_head_dim_of_whole_16_byte_rows(monkeypatch):
    """Head dims from 32 to 256 in steps of 8 (rows of whole 16-byte units) take the TMA forward,
    padded to its 64-column boxes, whichever of them lie between the compile grid's; others (not
    whole 16-byte rows, or below 32) say why and take the mma.sync kernel."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")

    def forward_family(d, dv=None):
        q, k = (device.empty((1, 2, 300, d), ml_dtypes.bfloat16) for _ in range(2))
        v = device.empty((1, 2, 300, dv or d), ml_dtypes.bfloat16)
        plan = cuflash.kernel_plan(q, k, v, causal=True).forward
        return plan.family.name, dict(plan.passed_over).get("sm90-tma")

    for d in (40, 48, 72, 80, 112, 136, 200, 248):
        assert forward_family(d) == ("sm90-tma", None), d
    assert forward_family(80, 64) == ("sm90-tma", None)
    family, why = forward_family(36)
    assert family == "sm80-mma" and "16-byte aligned rows" in why
    family, why = forward_family(24)
    assert family == "sm80-mma" and "takes D and Dv from 32 to 256; got D=24" in why


def _backward_operands(device, d, dv, n=200):
    """``(q, k, v, out, dout, lse)`` of a bfloat16 backward call on the fake device: one batch, two
    heads, ``n`` rows, head dims ``d`` (q, k) and ``dv`` (v, out, dout)."""
    q, k = (device.empty((1, 2, n, d), ml_dtypes.bfloat16) for _ in range(2))
    v, out, dout = (device.empty((1, 2, n, dv), ml_dtypes.bfloat16) for _ in range(3))
    return q, k, v, out, dout, device.empty((1, 2, n), np.float32)


@pytest.mark.parametrize("d, dv", [(256, 256), (192, 128), (160, 160), (64, 256)])
def test_head_dims_past_128_split_dkdv_gradients(monkeypatch, d, dv):
    """D or Dv above 128 runs the 256-column tile: the warp-specialised dK/dV kernel (a producer
    and two consumers keeping one 64-key tile's dV and dK), then the warp-specialised dQ kernel
    (a producer and two consumers over 128-row query tiles), in both modes (there is no fused
    dQ); with a block mask of 64-row blocks, the dQ kernel with one warpgroup (64-row tiles);
    CUFLASH_SM90_BWD_WS=0, dropout, exact masks and packed sequences leave it to the mma.sync
    kernels, saying why."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import WARP_SPECIALISED_BACKWARD_ENV, sm90_backward

    device = FakeDevice(monkeypatch, compute_capability="90")
    q, k, v, out, dout, lse = _backward_operands(device, d, dv)
    tiles = sm90_backward.default_tiles(256)
    assert (tiles.dkdv_block_n, tiles.dkdv_block_m, tiles.dq_block_m, tiles.dq_block_n) == (64, 64, 64, 64)
    for deterministic in (False, True):
        plan = cuflash.kernel_plan(q, k, v, deterministic=deterministic)
        assert plan.backward.family.name == "sm90-wgmma", str(plan)
        assert "warp-specialised dK/dV kernel, then a warp-specialised dQ kernel" in plan.backward.detail
        cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic)
        pre, dkdv, dq = device.take_launches()
        assert pre[0].startswith("flash_bwd_pre<")
        assert dkdv[0].startswith("flash_bwd_sm90_dkdv_ws<bf16_t, 256, 2, 64,")
        assert dkdv[1:4] == ((2 * 4,), (384,), tiles.dkdv_shared_bytes(256))  # 4 key tiles per head
        assert dq[0].startswith("flash_bwd_sm90_dq_ws<bf16_t, 256, 64,")
        # 2 query tiles of 128 rows per head; K, Q, V and dO boxes only up to D and Dv
        spec = cuflash.kernel_plan(q, k, v).spec
        assert dq[1:4] == ((2 * 2,), (384,), sm90_backward.dq_ring_shared_bytes(spec))
    from cuflash.sparse import BlockMask
    from cuflash.sparse._csr import TileCSR

    tiles_asked = []

    def device_csr(self, tile_m, tile_n):  # the tile index in made-up device memory (the real one uploads)
        tiles_asked.append((tile_m, tile_n))
        return TileCSR(*(device.empty(a.shape, a.dtype) for a in self.tile_csr(tile_m, tile_n)))

    monkeypatch.setattr(BlockMask, "device_csr", device_csr)
    mask = BlockMask.from_dense(np.ones((4, 4), bool), block_size=64, shape=(200, 200))
    plan = cuflash.kernel_plan(q, k, v, block_mask=mask)
    assert "warp-specialised dK/dV kernel, then a dQ kernel" in plan.backward.detail
    cuflash.attention_backward(dout, q, k, v, out, lse, block_mask=mask)
    _, _, dq = device.take_launches()
    assert dq[0].startswith("flash_bwd_sm90_dq<bf16_t, 256, 1, 64,")
    assert dq[1:4] == ((2 * 4,), (128,), tiles.dq_shared_bytes(256))
    # blocks of whole 128-row tiles: the warp-specialised dQ kernel, its tile index at 128 x 64
    mask = BlockMask.from_dense(np.ones((2, 2), bool), block_size=128, shape=(200, 200))
    assert "then a warp-specialised dQ kernel" in cuflash.kernel_plan(q, k, v, block_mask=mask).backward.detail
    cuflash.attention_backward(dout, q, k, v, out, lse, block_mask=mask)
    _, _, dq = device.take_launches()
    assert dq[0].startswith("flash_bwd_sm90_dq_ws<bf16_t, 256, 64, Mask<false, false, true")
    assert dq[1] == (2 * 2,)
    assert (128, 64) in tiles_asked
    assert tiles.dkdv_shared_bytes(256) <= 227 * 1024 and tiles.dq_shared_bytes(256) <= 227 * 1024
    monkeypatch.setenv(WARP_SPECIALISED_BACKWARD_ENV, "0")
    plan = cuflash.kernel_plan(q, k, v)
    assert plan.backward.family.name == "sm80-mma"
    assert "only in the warp-specialised dK/dV kernel" in dict(plan.backward.passed_over)["sm90-wgmma"]
    monkeypatch.delenv(WARP_SPECIALISED_BACKWARD_ENV)
    plan = cuflash.kernel_plan(q, k, v, dropout_p=0.1, dropout_seed=3)
    assert dict(plan.backward.passed_over)["sm90-wgmma"] == "does not take dropout with D or Dv above 128"


@pytest.mark.parametrize("d, dv, dims", [(96, 96, ", 96, 96>"), (192, 128, ", 192, 128>"), (40, 56, ", 48, 64>"),
                                          (128, 128, None), (256, 256, None), (64, 64, None)])
def test_backward_leaves_out_the_padded_k_steps(monkeypatch, d, dv, dims):
    """Head dims short of their tile (64, 128 or 256 columns) name D and Dv rounded up to 16 as the
    Hopper backward kernels' last template arguments, so that S = Q·Kᵀ and dP = dO·Vᵀ stop at
    the last k16 step holding a real column; dims that fill their tile keep the expressions (and
    compiled modules) they always had."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    q, k, v, out, dout, lse = _backward_operands(device, d, dv)
    for deterministic in (False, True):
        cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic)
        names = [launch[0] for launch in device.take_launches() if launch[0].startswith("flash_bwd_sm90_")]
        assert names, "no Hopper backward kernel ran"
        for name in names:
            if dims is None:
                assert not name.endswith(f", {d}, {dv}>"), name
                assert name.endswith(">>") or name.endswith("true>"), name
            else:
                assert name.endswith(dims), name


@pytest.mark.parametrize("d", [64, 128])
def test_warp_specialised_dkdv_kernel_by_default(monkeypatch, d):
    """The dK/dV kernel is the warp-specialised one (one more warpgroup, the producer), which
    takes TMA descriptors of q, k, v and dout with boxes of a query tile's and a key tile's rows;
    CUFLASH_SM90_BWD_WS=0 swaps in the cp.async kernel, and the rest of the sequence is the same."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import WARP_SPECIALISED_BACKWARD_ENV, sm90_backward

    device = FakeDevice(monkeypatch, compute_capability="90")
    q, k, v, out, dout = (device.empty((1, 2, 256, d), ml_dtypes.bfloat16) for _ in range(5))
    lse = device.empty((1, 2, 256), np.float32)
    tiles = sm90_backward.default_tiles(d)
    for ws in (None, "1", "0"):
        if ws is None:
            monkeypatch.delenv(WARP_SPECIALISED_BACKWARD_ENV, raising=False)
        else:
            monkeypatch.setenv(WARP_SPECIALISED_BACKWARD_ENV, ws)
        producer = ws != "0"
        for deterministic in (False, True):
            cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic)
            launches = device.take_launches()
            sides = device.side_arguments[-len(launches):]
            dkdv = launches[1]
            assert dkdv[0].startswith("flash_bwd_sm90_dkdv_ws<" if producer else "flash_bwd_sm90_dkdv<")
            assert dkdv[2] == (128 * (tiles.dkdv_warpgroups + producer),)
            if producer:
                (maps,) = sides[1]
                assert maps.nbytes == 4 * 128
            else:
                assert sides[1] == ()


def test_ordered_dq_rotates_its_walks_only_where_measured_faster():
    """Deterministic calls without a band, with at least as many query tiles as key tiles and at
    most 16 key tiles per head, start each key tile's walk at its own query tile
    (sm90_backward.rotated_dq); the variant's expression says so, and other calls keep theirs."""
    from cuflash.kernels import sm90_backward
    from cuflash.kernels._variants import spec_of

    def rotates(d, nq, nk, **options):
        spec = spec_of("bfloat16", d, deterministic=True, nq=nq, nk=nk, **options)
        return sm90_backward.rotated_dq(spec, sm90_backward.default_tiles(d))

    assert rotates(64, 2048, 2048) and rotates(128, 2048, 2048) and rotates(128, 1500, 700)
    assert not rotates(64, 2048, 2048, causal=True)  # a band: walks start at its edge
    assert not rotates(64, 2048, 2048, window=(300, -1))
    assert not rotates(128, 2048, 2048, dropout_p=0.1, dropout_seed=1)  # not measured with these
    assert not rotates(128, 2048, 2048, float32_grads=True)
    assert not rotates(64, 300, 2100)  # fewer query tiles than key tiles: starts would repeat
    assert not rotates(64, 4096, 4096) and not rotates(128, 8192, 8192)  # 32, 64 key tiles
    spec = spec_of("bfloat16", 64, deterministic=True)
    tiles = sm90_backward.default_tiles(64)
    plain = sm90_backward.variant_dkdv_ws(spec, tiles, ordered_dq=True)
    rotated = sm90_backward.variant_dkdv_ws(spec, tiles, ordered_dq=True, rotated_dq=True)
    assert rotated == plain[:-1] + ", true>" and plain.endswith("true, true>")
    listed = {expression for _, expression in sm90_backward.main_variants()}
    assert plain in listed and rotated in listed


def test_causal_grids_start_their_last_lanes_tile_by_tile(monkeypatch):
    """Under a band bounded on the right alone (causal, a window (-1, w)) the Hopper forward and
    the warp-specialised dK/dV kernel name how many of their grid's last lanes ((batch, head)
    pairs) start tile by tile (_launch.tail_lanes): those of two waves of resident blocks (132
    SMs here, one block each), or every lane where the grid has fewer; so does the warp-specialised
    dQ kernel of the 256-column tile (query tiles, one block per SM). Without such a band, with a
    block mask, with dropout and with the dK/dV kernel's ordered adds the grids keep lane order
    (0)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels._launch import BWD_ARGS, FWD_ARGS, tail_lanes
    from cuflash.kernels._variants import _block_mask, spec_of

    device = FakeDevice(monkeypatch, compute_capability="90")

    def tails(b, hq, hkv, n, d, **options):
        """The forward's and the dK/dV kernel's tail_lanes."""
        q, out, dout = (device.empty((b, hq, n, d), ml_dtypes.bfloat16) for _ in range(3))
        k, v = (device.empty((b, hkv, n, d), ml_dtypes.bfloat16) for _ in range(2))
        lse = device.empty((b, hq, n), np.float32)
        deterministic = options.pop("deterministic", False)
        cuflash.attention(q, k, v, **options)
        (forward,) = [x[4] for x in device.take_launches()]
        cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **options)
        (dkdv,) = [x[4] for x in device.take_launches() if x[0].startswith("flash_bwd_sm90_dkdv_ws<")]
        return (int(np.frombuffer(forward, FWD_ARGS)["tail_lanes"][0]),
                int(np.frombuffer(dkdv, BWD_ARGS)["tail_lanes"][0]))

    # 64 lanes of 8 query tiles (128 rows; two consumers, 132 resident blocks) and 8 key tiles
    assert tails(4, 16, 16, 1000, 64, causal=True) == (33, 33)
    # the dK/dV kernel's lanes are key/value heads: 32 of 9 key tiles, against 128 of 9 query tiles
    assert tails(4, 32, 8, 1100, 128, causal=True) == (30, 30)
    assert tails(2, 3, 3, 1000, 64, window=(-1, 64)) == (6, 6)  # fewer blocks than two waves
    assert tails(4, 16, 16, 1000, 64) == (0, 0)  # every tile of a lane weighs alike
    assert tails(4, 16, 16, 1000, 64, window=(100, 0)) == (0, 0)  # a left-hand side too
    assert tails(4, 16, 16, 1000, 64, causal=True, deterministic=True) == (33, 0)  # ordered adds
    blocks = spec_of("bfloat16", 64, causal=True, block_mask=_block_mask())
    assert tail_lanes(blocks, 64, 8, 132) == 0  # a block mask's tiles weigh as it has them

    def dq_tail(b, h, n, d, dv, **options):
        """The warp-specialised dQ kernel's tail_lanes (the 256-column tile)."""
        q, k = (device.empty((b, h, n, d), ml_dtypes.bfloat16) for _ in range(2))
        v, out, dout = (device.empty((b, h, n, dv), ml_dtypes.bfloat16) for _ in range(3))
        lse = device.empty((b, h, n), np.float32)
        cuflash.attention_backward(dout, q, k, v, out, lse, **options)
        (dq,) = [x[4] for x in device.take_launches() if x[0].startswith("flash_bwd_sm90_dq_ws<")]
        return int(np.frombuffer(dq, BWD_ARGS)["tail_lanes"][0])

    # 64 lanes of 8 query tiles of 128 rows, one block per SM: the lanes of 264 blocks
    assert dq_tail(8, 8, 1000, 192, 128, causal=True) == 33
    assert dq_tail(8, 8, 1000, 256, 256, causal=True) == 33
    assert dq_tail(2, 4, 1000, 256, 256, causal=True) == 8  # fewer blocks than two waves
    assert dq_tail(8, 8, 1000, 192, 128) == 0
    dropout = spec_of("bfloat16", 64, causal=True, dropout_p=0.1, dropout_seed=1)
    assert tail_lanes(dropout, 64, 8, 132) == 0  # not measured with it


def test_exact_masks_at_narrow_head_dims_take_the_warp_specialised_kernel_where_it_compiles():
    """On the 64-column tile (D, Dv ≤ 64) an exact mask runs the warp-specialised dK/dV kernel
    with the fused dQ where that variant compiles without spills: alone, under causal, with
    softcap or dropout (whose 64-row tiles form dQ by turns). A left-hand band, ALiBi and
    deterministic calls keep the cp.async kernel; at D = 128 every exact mask takes the
    warp-specialised one. main_variants lists what can be launched."""
    from cuflash.kernels import sm90_backward
    from cuflash.kernels._variants import _Slopes, exact_mask_stand_in, spec_of

    def spec(d, **options):
        return spec_of("bfloat16", d, exact_mask=exact_mask_stand_in(), **options)

    fits = sm90_backward.producer_fits
    assert fits(spec(64)) and fits(spec(32, causal=True)) and fits(spec(64, causal=True, softcap=30.0))
    assert fits(spec(64, window=(-1, 20)))  # a right-hand band only
    assert not fits(spec(64, window=(90, 20))) and not fits(spec(64, causal=True, alibi=_Slopes()))
    assert not fits(spec(64, deterministic=True))
    drop = dict(dropout_p=0.1, dropout_seed=1)  # dropout's 64-row tiles: the fused dQ by turns
    assert fits(spec(64, **drop)) and fits(spec(64, causal=True, **drop))
    assert not fits(spec(64, deterministic=True, **drop)) and not fits(spec(64, window=(90, 0), **drop))
    assert fits(spec(128, window=(90, 20), alibi=_Slopes())) and fits(spec(128, deterministic=True))
    listed = {expression for _, expression in sm90_backward.main_variants()}
    tiles = sm90_backward.default_tiles(64)
    for options in (dict(), dict(causal=True), dict(softcap=30.0), dict(causal=True, softcap=30.0)):
        assert sm90_backward.variant_dkdv_ws(spec(64, **options), tiles, atomic_dq=True) in listed
    turns = sm90_backward.default_tiles(64, dropout=True)
    for options in (drop, dict(causal=True, **drop)):
        assert sm90_backward.variant_dkdv_ws(spec(64, **options), turns, atomic_dq=True) in listed
    assert sm90_backward.variant_dkdv_ws(spec(64), tiles) not in listed  # deterministic: cp.async


@pytest.mark.parametrize("capability", ["90", "80"])
@pytest.mark.parametrize("d,dv,options", [(64, 64, dict(causal=True)), (64, 64, dict(deterministic=True)),
                                          (128, 128, dict(window=(300, 20))), (256, 256, dict(causal=True)),
                                          (192, 128, dict(deterministic=True)), (96, 96, dict())])
def test_kernel_plan_reports_the_backward_workspace_the_call_allocates(monkeypatch, capability, d, dv, options):
    """kernel_plan's backward names its workspace, by part (base-2 lse and Delta; where dQ is
    formed in the dK/dV kernel, its float32 accumulator; with ordered adds their semaphores, with
    adds in any order in the warp-specialised kernel the lane counters of its cast, and under a
    band the claims of its dQ tiles): exactly the bytes the backward call then allocates besides
    the gradients."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import _launch

    device = FakeDevice(monkeypatch, compute_capability=capability)
    allocated = []
    fake_memory = _launch.device_memory
    monkeypatch.setattr(_launch, "device_memory", lambda nbytes: allocated.append(nbytes) or fake_memory(nbytes))
    q, k, out, dout = (device.empty((2, 3, 700, width), ml_dtypes.bfloat16) for width in (d, d, dv, dv))
    v, lse = device.empty((2, 3, 700, dv), ml_dtypes.bfloat16), device.empty((2, 3, 700), np.float32)
    plan = cuflash.kernel_plan(q, k, v, **options).backward
    workspace = plan.workspace
    rows = 2 * 3 * 768  # query rows per (batch, head) rounded up to 128
    assert workspace["base-2 lse and Delta"] == 8 * rows
    fused = "forming dQ too" in plan.detail or "adding dQ by float32 atomics" in plan.detail
    assert ("float32 dQ accumulator" in workspace) == fused
    assert ("semaphores of the ordered dQ adds" in workspace) == ("key-tile order" in plan.detail)
    counted = "warp-specialised dK/dV kernel forming dQ too (float32 adds in any order" in plan.detail
    assert workspace.get("lane counters of the dQ cast") == (4 * (2 * 3 + 1) if counted else None)
    banded = "causal" in options or "window" in options
    assert workspace.get("claims of the dQ tiles") == (4 * rows // 32 if counted and banded else None)
    if counted:  # parts below 0.01 MiB in bytes, not as 0.00 MiB
        assert ("lane counters of the dQ cast 28 B, claims of the dQ tiles 576 B)" if banded
                else "lane counters of the dQ cast 28 B)") in plan.describe()
    assert "workspace: " in plan.describe()
    cuflash.attention_backward(dout, q, k, v, out, lse, **options)
    assert allocated == [sum(workspace.values())], plan.describe()


@pytest.mark.parametrize("d,dv,columns", [(64, 64, 64), (64, 128, 128), (128, 64, 128), (96, 96, 128),
                                          (64, 192, 0), (192, 64, 0)])
def test_the_hopper_dq_accumulator_is_as_wide_as_the_wider_head_dim(monkeypatch, d, dv, columns):
    """docs/api.md's workspace rule: the Hopper kernels' float32 dQ accumulator holds, per query
    row and head, 64 or 128 floats as the larger of D and Dv fits (none above 128)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    q, k = (device.empty((1, 2, 700, d), ml_dtypes.bfloat16) for _ in range(2))
    v = device.empty((1, 2, 700, dv), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(q, k, v).backward
    assert plan.family.name == "sm90-wgmma"
    assert plan.workspace.get("float32 dQ accumulator", 0) == 4 * columns * 2 * 768


def test_kernel_plan_copies_no_input(monkeypatch):
    """kernel_plan runs nothing: inputs the call would copy first (a last axis that is not
    contiguous, batch axes broadcast so that they do not merge) are stood in for by arrays of the
    copies' layout, and the plan is the one for such arrays (on the fake device a copy would fail
    for want of a driver)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    k = device.empty((2, 3, 2, 700, 64), ml_dtypes.bfloat16)
    strided = device.empty((2, 3, 2, 700, 128), ml_dtypes.bfloat16)[..., ::2]
    broadcast = device.empty((1, 3, 2, 700, 64), ml_dtypes.bfloat16)  # (1, 3) against (2, 3)
    contiguous = str(cuflash.kernel_plan(k, k, k, causal=True))
    for q in (strided, broadcast):
        assert str(cuflash.kernel_plan(q, k, k, causal=True)).partition("\n")[2] == \
            contiguous.partition("\n")[2]
    assert device.take_launches() == []


def test_kernel_plan_reports_the_float32_backward_workspace(monkeypatch):
    """The float32 backward's workspace: Delta, one float per query row and head."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")  # an H200's shared memory per block
    q = device.empty((2, 3, 700, 64), np.float32)
    plans = cuflash.kernel_plan(q, q, q, causal=True)
    plan = plans.backward
    assert plan.family.name == "float32" and plan.workspace == {"Delta": 4 * 2 * 3 * 700}
    assert "workspace: 0.02 MiB (Delta 0.02 MiB)" in plan.describe()
    # The forward, the same launcher module, allocates nothing besides its results.
    assert plans.forward.family.name == "float32" and plans.forward.workspace is None
    assert "workspace" not in plans.forward.describe()


@pytest.mark.parametrize("options", [dict(causal=True), dict(), dict(deterministic=True)])
@pytest.mark.parametrize("d", [64, 128])
def test_kernel_plan_describes_the_backward_its_views_run(monkeypatch, options, d):
    """Inputs TMA cannot describe (here k and v broadcast along the batch with stride 0) keep
    the Hopper backward's cp.async dK/dV kernel: kernel_plan's "runs ..." line and workspace are
    those of the kernels the call then launches and the bytes it allocates, not those of the
    warp-specialised kernel."""
    pytest.importorskip("cupy")
    import cupy
    from fake_device import FakeDevice

    from cuflash.kernels import _launch

    device = FakeDevice(monkeypatch, compute_capability="90")
    allocated = []
    fake_memory = _launch.device_memory
    monkeypatch.setattr(_launch, "device_memory", lambda nbytes: allocated.append(nbytes) or fake_memory(nbytes))
    q, out, dout = (device.empty((2, 3, 700, d), ml_dtypes.bfloat16) for _ in range(3))
    one = device.empty((1, 3, 700, d), ml_dtypes.bfloat16)
    k = cupy.lib.stride_tricks.as_strided(one, (2, 3, 700, d), (0,) + one.strides[1:])
    lse = device.empty((2, 3, 700), np.float32)
    plan = cuflash.kernel_plan(q, k, k, **options).backward
    assert plan.family.name == "sm90-wgmma"
    device.take_launches()
    cuflash.attention_backward(dout, q, k, k, out, lse, **options)
    launched = [expression.partition("<")[0] for expression, *_ in device.take_launches()]
    assert "flash_bwd_sm90_dkdv" in launched  # the cp.async kernel
    assert "warp-specialised" not in plan.detail
    assert ("then a dQ kernel" in plan.detail) == ("flash_bwd_sm90_dq" in launched)
    assert allocated == [sum(plan.workspace.values())], plan.describe()


# The family of the kernel that does a pass's work, by the launched kernel's name (the backward's
# by its dK/dV kernel: the Hopper family launches the sm80 module's small per-row kernels too).
_FORWARD_KERNELS = (("flash_fwd_sm90_tma", "sm90-tma"), ("flash_fwd_sm90", "sm90-wgmma"),
                    ("flash_f32_fwd", "float32"), ("flash_fwd", "sm80-mma"))
_BACKWARD_KERNELS = (("flash_bwd_sm90_dkdv", "sm90-wgmma"), ("flash_f32_bwd_dkdv", "float32"),
                     ("flash_bwd_dkdv", "sm80-mma"))


def _families(launches, kernels_of) -> set:
    """The families of the launched kernels: of each, that of the first prefix its name takes."""
    families = set()
    for expression, *_ in launches:
        name = expression.partition("<")[0]
        for prefix, family in kernels_of:
            if name.startswith(prefix):
                families.add(family)
                break
    return families


def assert_within_limits(launches, shared_limit: int) -> None:
    """Every launch fits the device: its dynamic shared memory within the block's limit, at
    least one and fewer than 2**31 thread blocks of at most 1024 threads."""
    for expression, (blocks,), (threads,), shared, _ in launches:
        assert shared <= shared_limit, (expression, shared, shared_limit)
        assert 1 <= blocks < 2**31 and 1 <= threads <= 1024, (expression, blocks, threads)


def _plan_problems():
    from hypothesis import strategies as st

    return st.tuples(
        st.sampled_from([np.float16, ml_dtypes.bfloat16, np.float32]),
        st.sampled_from([(32, 32), (64, 64), (128, 128), (256, 256), (96, 96), (192, 128), (64, 128),
                         (40, 56), (24, 24), (36, 36)]),
        st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2)]),  # (Hq, Hkv)
        st.integers(1, 300), st.integers(1, 3000),           # Nq, Nk
        st.sampled_from(["contiguous", "sequence-major", "unaligned", "padded", "broadcast"]),
        st.fixed_dictionaries({}, optional=dict(causal=st.just(True), softcap=st.just(20.0),
                                                window=st.tuples(st.integers(-1, 90), st.integers(-1, 90)),
                                                dropout_p=st.just(0.1), deterministic=st.just(True),
                                                block_size=st.sampled_from([64, 128, 256]))),
        st.sampled_from(["90", "80", "86"]))


def test_kernel_plan_names_the_families_the_calls_launch():
    """For shapes, dtypes, layouts (odd strides, unaligned pointers, inputs broadcast along the
    batch), head dims (Dv ≠ D), GQA, masks and dropout: the family kernel_plan names for each
    pass is the one whose kernels the call launches (or none, and the call raises), and the
    backward's workspace is what the call allocates."""
    pytest.importorskip("cupy")
    from hypothesis import HealthCheck, given, settings
    from fake_device import FakeDevice

    from cuflash.kernels import _launch
    from cuflash.sparse import BlockMask
    from cuflash.sparse._csr import TileCSR

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(problem=_plan_problems())
    def check(problem):
        dtype, (d, dv), (hq, hkv), nq, nk, layout, options, capability = problem
        with pytest.MonkeyPatch.context() as monkeypatch:
            device = FakeDevice(monkeypatch, compute_capability=capability)
            allocated = []
            fake_memory = _launch.device_memory
            monkeypatch.setattr(_launch, "device_memory", lambda n: allocated.append(n) or fake_memory(n))

            def device_csr(self, tile_m, tile_n):
                return self._cache.setdefault(("fake", tile_m, tile_n), TileCSR(
                    *(device.empty(a.shape, a.dtype) for a in self.tile_csr(tile_m, tile_n))))

            monkeypatch.setattr(BlockMask, "device_csr", device_csr)

            def array(b, h, n, width):
                return device.laid_out((b, h, n, width), dtype, layout, pad=4)

            options = dict(options)
            if "block_size" in options:
                size = options.pop("block_size")
                layout_of = np.random.default_rng(nq * nk).random((-(-nq // size), -(-nk // size))) < 0.6
                options["block_mask"] = BlockMask.from_dense(layout_of, block_size=size, shape=(nq, nk))
            if "dropout_p" in options:
                options["dropout_seed"] = 5
            deterministic = options.pop("deterministic", False)
            q, dout = array(2, hq, nq, d), array(2, hq, nq, dv)
            kv_batch = 1 if layout == "broadcast" else 2
            k, v = array(kv_batch, hkv, nk, d), array(kv_batch, hkv, nk, dv)
            plan = cuflash.kernel_plan(q, k, v, deterministic=deterministic, **options)
            device.take_launches()
            if plan.forward.family is None:
                with pytest.raises(ValueError, match="no GPU kernel runs this forward pass"):
                    cuflash.attention(q, k, v, **options)
                return
            out, lse = cuflash.attention(q, k, v, return_lse=True, **options)
            launches = device.take_launches()
            assert _families(launches, _FORWARD_KERNELS) == {plan.forward.family.name}
            assert_within_limits(launches, _launch.shared_limit(0))
            if plan.backward.family is None:
                with pytest.raises(ValueError, match="no GPU kernel runs this backward pass"):
                    cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic,
                                               **options)
                return
            try:
                cuflash.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic,
                                           **options)
            except Exception as error:  # the sum over the broadcast batch needs the device
                if layout != "broadcast" or "driver" not in str(error).lower():
                    raise
            launches = device.take_launches()
            assert _families(launches, _BACKWARD_KERNELS) == {plan.backward.family.name}
            assert_within_limits(launches, _launch.shared_limit(0))
            workspace = plan.backward.workspace
            assert allocated == ([sum(workspace.values())] if plan.backward.family.name != "float32"
                                 else []), plan.backward.describe()

    check()


# ----------------------------------------------------------------------------- 99 KiB of shared memory

@pytest.mark.parametrize("d", [64, 96, 128])
def test_a_device_with_99_kib_per_block_gets_backward_tiles_that_fit(monkeypatch, d):
    """Compute capability 8.6 and 8.9 let a thread block take 99 KiB of shared memory: the sm80
    backward runs there with tiles whose kernels fit (at D = 128 the default ones need 155 KiB),
    and takes its usual tiles on an A100."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="86")
    q, k, v, dout = (device.empty((1, 2, 300, d), ml_dtypes.bfloat16) for _ in range(4))
    out, lse = cuflash.attention(q, k, v, causal=True, return_lse=True)
    for deterministic in (False, True):
        device.take_launches()
        cuflash.attention_backward(dout, q, k, v, out, lse, causal=True, deterministic=deterministic)
        launches = device.take_launches()
        assert _families(launches, _BACKWARD_KERNELS) == {"sm80-mma"}
        assert max(shared for _, _, _, shared, _ in launches) <= 99 * 1024
    from cuflash.kernels import mma_backward

    a100 = mma_backward.default_tiles(128, 128, shared_limit=163 * 1024)
    assert a100 == mma_backward.default_tiles(128, 128)  # unchanged where it fits
    assert mma_backward.shared_bytes(a100, 128, 128) > 99 * 1024


@pytest.mark.parametrize("d, options, words", [
    (256, {}, "head dims (256, 256) needs 154,112 bytes of shared memory per thread block; "
              "this GPU allows 101,376"),
    (128, dict(dropout_p=0.1, dropout_seed=3), "head dims (128, 128) with dropout needs"),
])
def test_a_backward_that_fits_no_tile_of_the_device_names_its_shared_memory(monkeypatch, d, options, words):
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="86")
    q, k, v, dout = (device.empty((1, 2, 200, d), ml_dtypes.bfloat16) for _ in range(4))
    out, lse = cuflash.attention(q, k, v, return_lse=True, **options)  # the forward fits
    device.take_launches()
    with pytest.raises(ValueError, match=r"no GPU kernel runs this backward pass(.|\n)*" + re.escape(words)):
        cuflash.attention_backward(dout, q, k, v, out, lse, **options)
    assert device.take_launches() == []


@pytest.mark.parametrize("name", ["forward", "backward"])
def test_the_numpy_path_has_the_kernels_entry_points(name):
    """docs/internals.md, "Back-end entry points": ``cpu.forward`` and ``cpu.backward`` take the
    arguments of ``kernels.forward`` and ``kernels.backward``, and a keyword ``first_batch``."""
    import inspect

    from cuflash import cpu

    def parameters(function):
        return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]

    assert parameters(getattr(cpu, name)) == [
        *parameters(getattr(kernels, name)), ("first_batch", inspect.Parameter.KEYWORD_ONLY)]


def test_kernel_plan_prints_the_workspace_docs_api_md_shows(monkeypatch):
    """docs/api.md, "The backward's two modes": at B = 1, Hq = 16, Nq = 64K, D = 64 on Hopper,
    ``print(plan)`` gives the workspace line the page quotes, and the parts it names (counters
    of the ordered adds and claims of the dQ tiles, 128 KiB each; the second kernel's 8 MiB)."""
    pytest.importorskip("cupy")
    from pathlib import Path

    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    text = " ".join((Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text().split())
    (quoted,) = re.findall(r"`(workspace: [^`]*)`", text)

    def workspace(d, **options):
        q = device.empty((1, 16, 65536, d), ml_dtypes.bfloat16)
        (line,) = [line.strip() for line in str(cuflash.kernel_plan(q, q, q, **options)).splitlines()
                   if line.strip().startswith("workspace:")]
        return line

    assert workspace(64) == quoted
    assert "semaphores of the ordered dQ adds 0.12 MiB" in workspace(64, deterministic=True)
    assert "claims of the dQ tiles 0.12 MiB" in workspace(64, causal=True)
    assert workspace(256) == "workspace: 8.00 MiB (base-2 lse and Delta 8.00 MiB)"


def test_which_head_dims_the_backward_takes_with_99_kib_per_block(monkeypatch):
    """README and docs/internals.md: on compute capability 8.6 and 8.9 the sm80 backward takes
    D and Dv whose widths (each rounded up to a multiple of 32) add up to at most 288, D = Dv
    up to 128, and with dropout D = Dv up to 96; a mixed pair above 128 columns such as
    D = 136, Dv = 64 runs there too."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import mma_backward

    def fits(dqk, dv, dropout=False):
        try:
            mma_backward.default_tiles(dqk, dv, dropout=dropout, shared_limit=99 * 1024)
        except ValueError as error:
            assert "bytes of shared memory per thread block" in str(error)
            return False
        return True

    widths = range(32, 257, 32)
    assert {(a, b) for a in widths for b in widths if fits(a, b)} == {
        (a, b) for a in widths for b in widths if a + b <= 288}
    assert [d for d in widths if fits(d, d, dropout=True)] == [32, 64, 96]

    device = FakeDevice(monkeypatch, compute_capability="86")
    q = device.empty((1, 2, 200, 136), ml_dtypes.bfloat16)
    v = device.empty((1, 2, 200, 64), ml_dtypes.bfloat16)
    assert cuflash.kernel_plan(q, q, v).backward.family.name == "sm80-mma"


def test_kernel_plan_prints_what_docs_internals_md_shows(monkeypatch):
    """docs/internals.md, "Which kernel runs": the plan printed for bfloat16 q = k = v of shape
    (1, 2, 128, 64) on Hopper is the page's, line for line."""
    pytest.importorskip("cupy")
    from pathlib import Path

    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    text = (Path(__file__).resolve().parents[1] / "docs" / "internals.md").read_text()
    example = "q = k = v of shape (1, 2, 128, 64) on an H200:\n\n```\n"
    quoted = text.partition(example)[2].partition("```")[0]
    assert quoted.startswith("call: bfloat16")
    q = device.empty((1, 2, 128, 64), ml_dtypes.bfloat16)
    assert str(cuflash.kernel_plan(q, q, q)) + "\n" == quoted


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("nq, nk, runs", [(2**31 - 129, 128, True), (2**31 - 128, 128, False),
                                          (2**31, 128, False), (128, 2**31, False)])
def test_dense_calls_whose_lengths_pass_int32_are_refused(monkeypatch, dtype, nq, nk, runs):
    """The kernels hold Nq and Nk in int32 and their band arithmetic reaches Nq + Nk: up to
    2**31 - 1 a call runs (its packed nq and nk as given), past it every family passes it over
    with that reason and the call is refused with a ValueError that says so, not packed (a
    made-up device: the arrays take no memory)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import _launch, float32

    device = FakeDevice(monkeypatch, compute_capability="90")
    q = device.empty((1, 1, nq, 64), dtype)
    k = device.empty((1, 1, nk, 64), dtype)
    plan = cuflash.kernel_plan(q, k, k, window=(8, 2**40))
    if runs:
        assert plan.forward.family is not None and plan.backward.family is not None
        cuflash.attention(q, k, k, window=(8, 2**40))
        args = _launch.FWD_ARGS if dtype == np.float16 else float32.FWD_ARGS
        record = np.frombuffer(device.take_launches()[-1][4], args)[0]
        assert (int(record["nq"]), int(record["nk"])) == (nq, nk)
        return
    for family_plan in (plan.forward, plan.backward):
        assert family_plan.family is None
        reasons = [reason for _, reason in family_plan.passed_over if "takes float" not in reason]
        assert reasons and all("Nq + Nk must be below 2**31" in reason for reason in reasons)
    with pytest.raises(ValueError, match=r"Nq \+ Nk must be below 2\*\*31"):
        cuflash.attention(q, k, k, window=(8, 2**40))


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("nk, runs", [(2**31 - 256, True), (2**31 - 255, False)])
def test_dense_keys_whose_tiles_pass_int32_are_refused(monkeypatch, dtype, nk, runs):
    """The kernels count a dense call's key tiles in int32 as (Nk + tile − 1) / tile, which a call
    of one query row passes the Nq + Nk rule with: Nk plus 255 (the widest key tile's padding)
    must stay below 2**31. Up to that a call runs with its nk as given; past it every family
    passes it over with that reason and the call is refused with a ValueError (a made-up device:
    the arrays take no memory)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import _launch, float32

    device = FakeDevice(monkeypatch, compute_capability="90")
    q = device.empty((1, 1, 1, 64), dtype)
    k = device.empty((1, 1, nk, 64), dtype)
    plan = cuflash.kernel_plan(q, k, k)
    if runs:
        assert plan.forward.family is not None and plan.backward.family is not None
        cuflash.attention(q, k, k)
        args = float32.FWD_ARGS if dtype == np.float32 else _launch.FWD_ARGS
        record = np.frombuffer(device.take_launches()[-1][4], args)[0]
        assert int(record["nk"]) == nk
        return
    for family_plan in (plan.forward, plan.backward):
        assert family_plan.family is None
        reasons = [reason for _, reason in family_plan.passed_over if "takes float" not in reason]
        assert reasons and all("Nk plus a key tile's padding (255) must be below 2**31" in reason
                               for reason in reasons)
    with pytest.raises(ValueError, match=r"Nk plus a key tile's padding \(255\) must be below 2\*\*31, "
                                         r"got 2,147,483,393"):
        cuflash.attention(q, k, k)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
def test_a_device_older_than_compute_capability_8_is_refused_not_compiled_for(monkeypatch, dtype):
    """Every kernel family needs compute capability 8.0 (cp.async, mma.sync on bfloat16): arrays
    on an older device (a Turing card beside an A100, say) are passed over by every family with
    that reason, and the call is refused with a ValueError before anything is compiled."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="75")
    q = device.empty((1, 2, 128, 64), dtype)
    plan = cuflash.kernel_plan(q, q, q)
    for family_plan in (plan.forward, plan.backward):
        assert family_plan.family is None
        assert all("compute capability" in reason for _, reason in family_plan.passed_over)
    with pytest.raises(ValueError, match="needs compute capability 8.0 or newer"):
        cuflash.attention(q, q, q)
    assert device.compiled == [] and device.take_launches() == []


def test_availability_names_the_current_device_that_is_too_old(monkeypatch):
    """``kernels.availability`` asks the current device (here device 1, a Turing card), and says
    which one it asked and its compute capability as CUDA writes it."""
    cupy = pytest.importorskip("cupy")

    class Device:
        def __init__(self, device_id=1):
            self.id, self.compute_capability = device_id, "75"

    monkeypatch.setattr(cupy.cuda.runtime, "getDeviceCount", lambda: 2)
    monkeypatch.setattr(cupy.cuda, "Device", Device)
    usable, reason = kernels.availability()
    assert not usable
    assert reason == "the kernels need compute capability 8.0 or newer; device 1 has 7.5"


@pytest.mark.parametrize("pass_name", ["forward", "backward"])
def test_float32_tiles_fit_the_arrays_device_not_the_current_one(monkeypatch, pass_name):
    """The float32 kernels size their tiles by the shared memory of the device the arrays live
    on, as ``supports`` checks them: with another device current (one that allows a block too
    little for any tile, say), a call for arrays on an H200 runs the H200's tiles."""
    pytest.importorskip("cupy")
    import cupy
    from fake_device import FakeDevice

    from cuflash import _api
    from cuflash.kernels import _launch, float32

    device = FakeDevice(monkeypatch, compute_capability="90")
    limits = {0: 227 * 1024, 1: 16 * 1024}  # the arrays' device, the current one
    monkeypatch.setattr(_launch, "shared_limit", lambda device_id: limits[device_id])
    monkeypatch.setattr(cupy.cuda.runtime, "getDevice", lambda: 1)
    q, out, dout, dq, dk, dv = (device.empty((1, 2, 128, 64), np.float32) for _ in range(6))
    lse = device.empty((1, 2, 128), np.float32)
    _, spec = _api._spec(q, q, q)
    if pass_name == "forward":
        float32.forward(q, q, q, out, lse, spec)
        wanted = [float32.tiles_for("forward", spec, limits[0])]
    else:
        float32.backward(dout, q, q, q, out, lse, dq, dk, dv, spec)
        wanted = [float32.tiles_for(kernel, spec, limits[0]) for kernel in ("dkdv", "dq")]
    expressions = [expression for expression, *_ in device.take_launches()
                   if expression != float32.PREP_KERNEL]
    assert expressions == [float32.variant(kernel, spec, tiles, aligned=True)
                           for kernel, tiles in zip(["forward"] if pass_name == "forward"
                                                    else ["dkdv", "dq"], wanted)]


@pytest.mark.parametrize("case", ["dense", "varlen"])
def test_a_backward_whose_workspace_rows_pass_int32_is_refused(monkeypatch, case):
    """The 16-bit backward kernels count the workspace rows of a head (rows_pad: Nq rounded up
    to 128, or for packed sequences each sequence's rows rounded up to 128) in int32. A call
    whose rows reach 2**31 (Nq = 2**31 - 2 beside one key; 2**24 - 1 packed sequences of 4
    rows in all) is passed over by both families with that reason and refused with a
    ValueError saying so, not packed into an int32 field (an OverflowError) or launched (a
    made-up device: the arrays take no memory). The most rows below 2**31 run."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    f16 = np.float16
    if case == "dense":
        def backward(nq):
            q, k = device.empty((1, 1, nq, 64), f16), device.empty((1, 1, 1, 64), f16)
            out, lse = cuflash.attention(q, k, k, return_lse=True)
            return cuflash.attention_backward(out, q, k, k, out, lse)
        too_many, fits = 2**31 - 2, 2**31 - 129
    else:
        def backward(sequences):
            q = device.empty((4, 1, 64), f16)
            cu = device.empty((sequences + 1,), np.int32)
            out, lse = cuflash.attention_varlen(q, q, q, cu, cu, 1, 1, return_lse=True,
                                                check_offsets=False)
            return cuflash.attention_varlen_backward(out, q, q, q, out, lse, cu, cu, 1, 1,
                                                     check_offsets=False)
        too_many, fits = 2**24 - 1, 2**24 - 2
    with pytest.raises(ValueError, match=r"workspace rows .* must be below 2\*\*31") as error:
        backward(too_many)
    for family in ("sm90-wgmma", "sm80-mma"):
        assert f"passed over {family}: counts a head's workspace rows in int32" in str(error.value)
    assert not [launch for launch in device.take_launches() if "bwd" in launch[0]]
    backward(fits)
    assert any(expression.startswith("flash_bwd_pre") for expression, *_ in device.take_launches())


@pytest.mark.parametrize("d, block_size, tried", [
    # rows of at most 8K keys take 128-key tiles at D = 128, never 176 (candidate_tiles' `short`)
    (128, (128, 176), ("128x128", "128x64")),
    # a mask that keeps few keys per row tries one consumer's 64-row tiles first at D = 64
    (64, (64, 96), ("64x128", "128x128", "128x64")),
])
def test_the_tma_forward_names_the_tile_shapes_it_tried_for_a_block_mask(monkeypatch, d, block_size, tried):
    """A block mask whose blocks no tile shape of the TMA forward divides is passed on with the
    shapes that call tried, no more and no fewer: a shape listed but never tried would read as
    one the mask's blocks already are multiples of."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.sparse import BlockMask

    device = FakeDevice(monkeypatch, compute_capability="90")
    n = 1024
    bq, bk = block_size
    layout = np.eye(-(-n // bq), -(-n // bk), dtype=bool)
    mask = BlockMask.from_dense(layout, block_size=block_size, shape=(n, n))
    q = device.empty((1, 2, n, d), ml_dtypes.bfloat16)
    plan = cuflash.kernel_plan(q, q, q, block_mask=mask)
    reasons = dict(plan.forward.passed_over)
    assert "sm90-tma" in reasons, plan.forward.describe()
    assert f"({', '.join(tried)})" in reasons["sm90-tma"], reasons["sm90-tma"]


def test_a_split_count_past_one_launch_names_num_splits_and_its_bound(monkeypatch):
    """The decode kernel's grid is num_splits times the blocks of one split (B · Hkv · row
    chunks: 2 · 2 · 1 here): a count past one launch is refused with a ValueError naming
    num_splits and the most this call takes, which a launch holds (a fake device)."""
    cupy = pytest.importorskip("cupy")
    from fake_device import FakeDevice

    from cuflash.kernels import decode

    device = FakeDevice(monkeypatch)
    q = cupy.empty((2, 1, 4, 64), np.float16)
    k_cache, v_cache = (cupy.empty((2, 256, 2, 64), np.float16) for _ in range(2))
    most = (2**31 - 1) // 4
    decode._prepared.cache_clear()
    try:
        with pytest.raises(ValueError, match=rf"num_splits={most + 1:,} key splits of 4 thread blocks "
                                             rf"each.*num_splits takes at most {most:,} here"):
            cuflash.attention_with_kvcache(q, k_cache, v_cache, cache_seqlens=cupy.empty((2,), np.int32),
                                           num_splits=most + 1)
        assert not device.take_launches()
        launch = decode.prepare(q, k_cache, v_cache, cupy.empty(q.shape, q.dtype), scale=0.125,
                                causal=False, window=(-1, -1), softcap=0.0, alibi=None, num_splits=most)
        assert (launch.splits, launch.decode.blocks) == (most, 4 * most)
    finally:
        decode._prepared.cache_clear()


@pytest.mark.parametrize("nk, runs", [(128, True), (64, False)])
def test_query_tiles_of_192_rows_that_end_past_int32_are_passed_over(monkeypatch, nk, runs):
    """The TMA forward's three consumers take 192-row query tiles (D = 64, unmasked), whose
    rows the kernel counts in int32 up to the last tile's end, padding included: with
    Nq = 2**31 - 1 - Nk (as many rows as why_not_lengths lets through) the tiles end at 2**31 + 64
    for Nk = 64, and the family passes the call on to the Hopper wgmma forward, whose 128-row
    tiles (a power of two rows) end at 2**31 at most; at Nk = 128 they end at 2**31 - 128 and it
    runs (a fake device: the arrays take no memory)."""
    pytest.importorskip("cupy")
    from fake_device import FakeDevice

    device = FakeDevice(monkeypatch, compute_capability="90")
    q = device.empty((1, 1, 2**31 - 1 - nk, 64), np.float16)
    k = device.empty((1, 1, nk, 64), np.float16)
    plan = cuflash.kernel_plan(q, k, k).forward
    if runs:
        assert plan.family.name == "sm90-tma" and plan.detail.startswith("192-row query tiles")
        return
    assert plan.family.name == "sm90-wgmma"
    assert dict(plan.passed_over)["sm90-tma"] == (
        "counts query rows in int32 up to the end of its 192-row query tiles: Nq rounded up to "
        "them must not pass 2**31, got 2,147,483,712")
    cuflash.attention(q, k, k)
    assert _families(device.take_launches(), _FORWARD_KERNELS) == {"sm90-wgmma"}
