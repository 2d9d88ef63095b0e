"""Every main kernel variant compiles with NVRTC for each supported architecture, without register
spills. Needs no GPU: NVRTC runs on any machine with the CUDA NVRTC library (the `test` extra)."""

import os
import warnings
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pytest

from cuflash.kernels import _build

ARCHS = ("sm_80", "sm_90", "sm_90a")
# Modules whose kernels compile for every architecture, and the Hopper-only ones (sm_90a).
PORTABLE_MODULES = ("mma_forward", "mma_backward", "float32")
DECODE_MODULES = ("decode",)  # KV-cache decode: no block or exact masks, so not in the policy check
HOPPER_MODULES = ("sm90_tma_forward", "sm90_forward", "sm90_backward")


def _cases():
    """``(source, expressions, arch)`` of every program the group compiles, and their test ids."""
    programs = [(source, expressions, arch)
                for source, expressions in sorted(_build.variants_by_source(PORTABLE_MODULES + DECODE_MODULES).items())
                for arch in ARCHS]
    programs += [(source, expressions, "sm_90a")
                 for source, expressions in sorted(_build.variants_by_source(HOPPER_MODULES).items())]
    cases, ids = [], []
    for source, expressions, arch in programs:
        for part, chunk in enumerate(_build.program_chunks(expressions)):
            cases.append((source, chunk, arch))
            ids.append(f"{source}-{arch}-{part}")
    return cases, ids


CASES, CASE_IDS = _cases()


# CI runs this group twice: with the newest NVRTC, where no variant may spill, and with the
# oldest of CUDA 13 (.ci/run sets CUFLASH_OLDEST_NVRTC=13.0), which must compile every variant:
# a newer NVRTC accepts code an older one rejects (offsetof in an asm operand, once). The older
# one's ptxas spills a few variants the newer does not; those are reported, not failed
# (benchmarks/NOTES.md lists them).
OLDEST_NVRTC = os.environ.get("CUFLASH_OLDEST_NVRTC")


def _nvrtc_version() -> str:
    from cupy.cuda import nvrtc

    return ".".join(map(str, nvrtc.getVersion()))


@pytest.fixture(scope="module")
def compiled(request):
    """``{(source, expressions, arch): future of its ptxas report}`` for the cases this run
    selected, compiled by a pool of processes, one per core, largest first: a test waits for its
    own. The processes inherit the environment, and with it the NVRTC library preloaded."""
    selected = [tuple(item.callspec.params[name] for name in ("source", "expressions", "arch"))
                for item in request.session.items
                if item.originalname == "test_compiles_without_spills"]
    workers = max(1, min(len(selected), len(os.sched_getaffinity(0))))
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        if OLDEST_NVRTC:
            assert pool.submit(_nvrtc_version).result() == OLDEST_NVRTC, "not the NVRTC asked for"
        futures = {case: pool.submit(_build.compile_offline, *case)
                   for case in sorted(selected, key=lambda case: -len(case[1]))}
        yield futures
        for future in futures.values():
            future.cancel()  # what a stopped run (-x) has not started


@pytest.mark.parametrize("source,expressions,arch", CASES, ids=CASE_IDS)
def test_compiles_without_spills(compiled, source, expressions, arch):
    if OLDEST_NVRTC:
        assert _nvrtc_version() == OLDEST_NVRTC, "not the NVRTC asked for"
    log = compiled[source, expressions, arch].result()
    report = _build.parse_ptxas_report(log)
    assert len(report) == len(expressions), f"ptxas reported {len(report)} of {len(expressions)} kernels"
    serialised = _build.serialised_wgmma(log)
    assert not serialised, f"{source} for {arch}: {serialised[:2]}"
    spilled = _build.spilling(report)
    if OLDEST_NVRTC:
        for r in spilled:
            warnings.warn(f"NVRTC {OLDEST_NVRTC}: {r['name']} spills {r['spill_stores']} bytes")
        return
    assert not spilled, f"register spills in {source} for {arch}: {spilled}"


def test_compile_error_is_reported_with_log():
    with pytest.raises(RuntimeError, match="flash_fwd.cu failed to compile"):
        _build.compile_offline("flash_fwd.cu", ["flash_fwd<no_such_type, 64>"], "sm_80")


def test_local_headers_are_inlined_once():
    text = _build.source("flash_fwd_sm90.cu")
    assert "#include" not in text
    assert text.count("struct f16_t") == 1
    assert text.count("struct Mask {") == 1


def test_sources_avoid_what_older_nvrtc_rejects():
    """The kernels compile at run time with the user's NVRTC, which may be older than the one
    that compiles them here. NVRTC 13.0 rejects offsetof (``__builtin_offsetof``) in an asm
    operand, which 13.5 accepts: every warp-specialised Hopper backward once failed to compile on
    an H200 (NVRTC 13.0) while the compile group passed with 13.5. The sources spell such offsets
    as sizes; this check is instant, CI's NVRTC 13.0 pass of the compile group catches the rest."""
    for source in sorted({source for source, _, _ in CASES}):
        assert "offsetof(" not in _build.source(source), source


def test_every_policy_combination_is_compiled():
    """The variant list covers each mask policy and score modifier, for every family."""
    for name in PORTABLE_MODULES + HOPPER_MODULES:
        expressions = " ".join(e for _, e in _build.main_variants(name))
        for policy in ("Mask<false, false, false>", "Mask<false, false, true>", "Mask<false, true, false>",
                       "Mask<false, true, true>", "Mask<true, false, false>", "Mask<true, false, true>",
                       "Mask<true, true, false>", "Mask<true, true, true>",
                       "Mask<false, false, true, true>", "Mask<false, true, true, true>",
                       "Mask<true, false, true, true>", "Mask<true, true, true, true>",
                       "ScoreMod<false, false>", "ScoreMod<true, false>", "ScoreMod<false, true>",
                       "ScoreMod<true, true>"):
            assert policy in expressions, f"{name} compiles no variant with {policy}"


def test_argument_records_match_the_kernels_structs():
    """Each kernel source static_asserts its argument structs' C sizes; the NumPy records the
    launchers pack must have the same sizes (a field added on one side only fails here)."""
    import re

    from cuflash.kernels import _launch, decode, float32

    for source, name, record in (("flash_f32.cu", "F32FwdArgs", float32.FWD_ARGS),
                                 ("flash_f32.cu", "F32BwdArgs", float32.BWD_ARGS),
                                 ("flash_fwd.cu", "FwdArgs", _launch.FWD_ARGS),
                                 ("flash_bwd.cu", "BwdArgs", _launch.BWD_ARGS),
                                 ("flash_decode.cu", "DecodeArgs", decode.DECODE_ARGS),
                                 ("flash_decode.cu", "AppendArgs", decode.APPEND_ARGS)):
        (size,) = re.findall(rf"sizeof\({name}\) == (\d+)", _build.source(source))
        assert record.itemsize == int(size), name


def test_every_band_of_the_decode_kernel_is_compiled():
    """The decode kernel takes no block or exact mask, but every band a call can ask for:
    unbounded, bounded on the right alone (causal), on the left alone (a window (w, -1) without
    causal) and on both sides."""
    from cuflash.kernels import decode

    expressions = " ".join(e for _, e in decode.main_variants())
    for policy in ("Mask<false, false, false>", "Mask<false, true, false>",
                   "Mask<true, false, false>", "Mask<true, true, false>"):
        assert policy in expressions, f"decode compiles no variant with {policy}"
