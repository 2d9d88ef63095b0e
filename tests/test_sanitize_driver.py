"""The sanitizer's tools without a GPU: tools/sanitize_driver.py's choice of parts (the parts
themselves need a GPU and run under tools/sanitize.sh) and its switch for initcheck, and the
probes that say which of its reports are the sanitizer's blind spots, compiled through NVRTC."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy
import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBES = ("racecheck_mbarrier_probe", "initcheck_bulk_store_probe")


def test_a_misspelt_part_is_refused_before_any_part_runs():
    env = dict(os.environ, SANITIZE_PARTS="dense,denes",
               PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))))
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "sanitize_driver.py")], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "SANITIZE_PARTS: unknown part(s) denes; the parts are dense, ordered" in result.stderr
    assert "ran " not in result.stdout  # each part prints "ran ..." when it ends


def _load_tool(name, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))  # where the probes import _probe from
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", PROBES)
def test_the_probes_compile_for_sm_90a(name, monkeypatch):
    """Each probe builds its kernels from the project's own headers, which change: every case
    must still compile (the probes run on a GPU only under the sanitizer, seldom)."""
    pytest.importorskip("cupy_backends.cuda.libs.nvrtc")
    from cuflash.kernels import _build

    probe = _load_tool(name, monkeypatch)
    for case in probe.CASES:
        code, expressions = probe.program(case)
        log = _build.compile_text_offline(code, f"{name}.cu", expressions, "sm_90a")
        assert len(_build.parse_ptxas_report(log)) == len(expressions)  # each kernel built


def _casts_of_unzeroed_accumulators(monkeypatch, write_zeros: bool) -> list:
    """The backward calls of the driver's parts that cast a Hopper fused dQ accumulator which
    flash_bwd_pre left unzeroed (its bytes then all come from the dK/dV kernel's bulk copies and
    reduce-adds), each as (dtype, D, options), on the fake device (compute capability 9.0). Only
    the parts with such calls run: the block and exact masks and packed sequences always keep
    the zeros (``sm90_backward.dq_zeros_needed``)."""
    from fake_device import FakeDevice

    from cuflash import kernels
    from cuflash.kernels import mma_backward, sm90_backward

    device = FakeDevice(monkeypatch, compute_capability="90")
    driver = _load_tool("sanitize_driver", monkeypatch)
    # The driver's arrays, slopes and block masks in made-up device memory; nothing synchronises.
    monkeypatch.setattr(driver, "cupy", SimpleNamespace(
        asarray=lambda x: device.empty(numpy.shape(x), numpy.asarray(x).dtype),
        cuda=SimpleNamespace(Device=lambda: SimpleNamespace(synchronize=lambda: None))))
    device.holds_block_masks(monkeypatch)
    zeroed, casts = [], []
    preprocess, convert = mma_backward.preprocess_launch, mma_backward.convert_launch

    def recording_preprocess(args, spec, **options):
        zeroed.append(options["zero_dq"])
        return preprocess(args, spec, **options)

    def recording_convert(args, spec, **options):
        if options.get("fragment_order") and not zeroed[-1]:  # the fused dQ's accumulator
            casts.append((spec.dtype.name, spec.shapes.d, spec.deterministic, spec.banded))
        return convert(args, spec, **options)

    monkeypatch.setattr(mma_backward, "preprocess_launch", recording_preprocess)
    monkeypatch.setattr(mma_backward, "convert_launch", recording_convert)
    monkeypatch.setenv("SANITIZE_PARTS", "dense,ordered,dropout")
    # The parts set the Hopper switch in os.environ: restored with the rest after the test.
    monkeypatch.setenv(kernels.DISABLE_HOPPER_ENV, "0")
    monkeypatch.setenv("SANITIZE_DQ_ZEROS", "1" if write_zeros else "0")
    monkeypatch.setattr(sm90_backward, "SKIP_DQ_ZEROS", True)  # the driver may set it; restored after
    driver.main()
    return casts


def test_initcheck_runs_the_driver_with_every_accumulator_zeroed(monkeypatch):
    """tools/sanitize.sh runs initcheck with SANITIZE_DQ_ZEROS=1, so that none of the driver's
    calls casts an accumulator written only by bulk operations, which initcheck does not see
    (benchmarks/NOTES.md). Without it, calls of both routes that store first parts (claimed
    tiles under a band; ordered adds, banded or not) do: if none did, the switch would be
    stale."""
    pytest.importorskip("cupy")
    without = _casts_of_unzeroed_accumulators(monkeypatch, write_zeros=False)
    assert {(deterministic, banded) for _, _, deterministic, banded in without} == {
        (False, True), (True, True), (True, False)}
    assert _casts_of_unzeroed_accumulators(monkeypatch, write_zeros=True) == []
    assert "SANITIZE_DQ_ZEROS=$zeros" in (ROOT / "tools" / "sanitize.sh").read_text()
