"""The sanitizer's tools without a GPU: tools/sanitize_driver.py's choice of parts (the parts
themselves need a GPU and run under tools/sanitize.sh), and the probes that say which of its
reports are the sanitizer's blind spots, compiled through NVRTC."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

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


def _load_probe(name, monkeypatch):
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

    probe = _load_probe(name, monkeypatch)
    for case in probe.CASES:
        code, expressions = probe.program(case)
        log = _build.compile_text_offline(code, f"{name}.cu", expressions, "sm_90a")
        assert len(_build.parse_ptxas_report(log)) == len(expressions)  # each kernel built
