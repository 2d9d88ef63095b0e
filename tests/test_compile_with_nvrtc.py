"""tools/compile_with_nvrtc.py, CI's pass with CUDA 12.9's NVRTC: what it selects, its ctypes
binding (checked against CuPy's on the NVRTC the test extra installs) and its verdicts. The pass
itself is CI's (minutes); a test with CUDA 12's library runs where CUFLASH_NVRTC12 names it or the
loader finds libnvrtc.so.12."""

import os
import sys
from pathlib import Path

import pytest

from cuflash.kernels import _build
from test_kernel_compile import DECODE_MODULES, HOPPER_MODULES, PORTABLE_MODULES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))  # spawned workers inherit it
import compile_with_nvrtc as tool  # noqa: E402


def _compiled_pairs():
    """``{(source, expression, arch)}`` of everything the tool compiles."""
    return {(source, expression, arch) for source, expressions, arch in tool.programs() for expression in expressions}


def test_every_kernel_source_is_compiled():
    sources = {path.name for path in _build.KERNEL_DIR.glob("*.cu")}
    assert {source for source, _, _ in tool.programs()} == sources


def test_every_variant_of_the_hopper_families_is_compiled_for_sm_90a():
    compiled = _compiled_pairs()
    for name in tool.HOPPER_FAMILIES:
        variants = _build.main_variants(name)
        missing = [expression for source, expression in variants if (source, expression, "sm_90a") not in compiled]
        assert not missing, f"{name}: {len(missing)} variants left out, {missing[:2]}"


def test_every_kernel_template_of_the_compile_group_is_compiled_for_each_arch():
    """Every kernel template the compile group builds (its families, not a list of the tool's
    own), for sm_80 and sm_90a where portable and sm_90a where Hopper-only."""
    compiled = {(source, tool._template(expression), arch) for source, expression, arch in _compiled_pairs()}
    for names, archs in ((PORTABLE_MODULES + DECODE_MODULES, ("sm_80", "sm_90a")), (HOPPER_MODULES, ("sm_90a",))):
        for name in names:
            for source, expression in _build.main_variants(name):
                for arch in archs:
                    assert (source, tool._template(expression), arch) in compiled, (name, expression, arch)
    assert not any(arch == "sm_80" and source in {"flash_fwd_sm90.cu", "flash_fwd_sm90_tma.cu", "flash_bwd_sm90.cu"}
                   for source, _, arch in compiled), "a Hopper-only kernel for sm_80"


def test_a_representative_has_the_most_options_switched_on():
    variants = [("a.cu", "k<f16_t, false, Mask<false, false>>"), ("a.cu", "k<f16_t, true, Mask<true, false>>"),
                ("a.cu", "k<bf16_t, true, Mask<false, true>>"), ("a.cu", "plain"), ("b.cu", "k<f16_t, false>")]
    assert tool.representatives(variants) == {"a.cu": ["k<f16_t, true, Mask<true, false>>", "plain"],
                                              "b.cu": ["k<f16_t, false>"]}


def test_programs_hold_at_most_a_chunk_and_no_variant_twice():
    programs = tool.programs()
    assert all(len(expressions) <= _build.PROGRAM_VARIANTS for _, expressions, _ in programs)
    listed = [(source, expression, arch) for source, expressions, arch in programs for expression in expressions]
    assert len(listed) == len(set(listed))


_REPORT = """ptxas info    : Compiling entry function '{name}' for 'sm_90a'
ptxas info    : Function properties for {name}
    {stack} bytes stack frame, {spill} bytes spill stores, {spill} bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers
"""


def test_spills_and_serialised_wgmma_warn_and_a_missing_kernel_fails():
    program = ("x.cu", ("k<1>", "k<2>"), "sm_90a")
    first, second = (_REPORT.format(name=name, stack=0, spill=0) for name in ("_Z1kILi1EEvv", "_Z1kILi2EEvv"))
    assert tool.problems(program, first + second, "12.9") == ([], [])
    spilled = _REPORT.format(name="_Z1kILi1EEvv", stack=8, spill=4) + second
    spilled += "ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized\n"
    errors, warnings = tool.problems(program, spilled, "12.9")
    assert not errors and len(warnings) == 2
    assert "_Z1kILi1EEvv spills 4 bytes" in warnings[0] and "serialized" in warnings[1]
    errors, _ = tool.problems(program, first, "12.9")
    assert errors == ["x.cu for sm_90a: ptxas reported 1 of 2 kernels"]


def _loaded_nvrtc_path():
    """The NVRTC library CuPy loaded in this process, from the process's memory map."""
    pytest.importorskip("cupy")
    from cupy_backends.cuda.libs import nvrtc

    major, _ = nvrtc.getVersion()
    maps = Path("/proc/self/maps")
    paths = {line.split()[-1] for line in maps.read_text().splitlines()} if maps.exists() else set()
    found = [path for path in paths if path.endswith(f"/libnvrtc.so.{major}")]
    if not found:
        pytest.skip("CuPy's NVRTC library not found in /proc/self/maps")
    return found[0]


def test_the_binding_reports_as_cupys():
    binding = tool.LibraryNvrtc(_loaded_nvrtc_path())
    from cupy_backends.cuda.libs import nvrtc as cupys

    assert binding.getVersion() == cupys.getVersion()
    expressions = ("kv_append<false>", "decode_combine<bf16_t>")
    ours = _build.parse_ptxas_report(_build.compile_offline("flash_decode.cu", expressions, "sm_80", nvrtc=binding))
    theirs = _build.parse_ptxas_report(_build.compile_offline("flash_decode.cu", expressions, "sm_80"))
    assert len(ours) == 2 and ours == theirs


def test_the_binding_raises_with_the_compiler_log():
    binding = tool.LibraryNvrtc(_loaded_nvrtc_path())
    with pytest.raises(RuntimeError, match="flash_fwd.cu failed to compile for sm_80:\n.*no_such_type"):
        _build.compile_offline("flash_fwd.cu", ["flash_fwd<no_such_type, 64>"], "sm_80", nvrtc=binding)


def test_a_failed_compile_fails_the_run_and_names_the_program(monkeypatch, capsys):
    library = _loaded_nvrtc_path()
    version = ".".join(map(str, tool.LibraryNvrtc(library).getVersion()))
    monkeypatch.setattr(tool, "programs", lambda: [("flash_fwd.cu", ("flash_fwd<no_such_type, 64>",), "sm_80"),
                                                   ("flash_decode.cu", ("kv_append<false>",), "sm_80")])
    assert tool.main([library, "--version", version, "--jobs", "2"]) == 1
    err = capsys.readouterr().err
    assert "FAILED  flash_fwd.cu for sm_80" in err and "ok  flash_decode.cu for sm_80" in err
    assert "1 of 2 programs compiled" in err


def test_a_library_of_another_version_is_refused(capsys):
    library = _loaded_nvrtc_path()
    assert tool.main([library, "--version", "11.8"]) == 1
    assert "not 11.8" in capsys.readouterr().err


def _nvrtc12():
    """CUDA 12's NVRTC library, or a skip."""
    path = os.environ.get("CUFLASH_NVRTC12", "libnvrtc.so.12")
    try:
        return tool.LibraryNvrtc(path)
    except OSError:
        pytest.skip("no libnvrtc.so.12 (CUFLASH_NVRTC12 names it)")


def test_cuda12_nvrtc_compiles_a_hopper_variant():
    binding = _nvrtc12()
    assert binding.getVersion()[0] == 12
    from cuflash.kernels import sm90_tma_forward

    source, expression = sm90_tma_forward.main_variants()[0]
    report = _build.parse_ptxas_report(_build.compile_offline(source, [expression], "sm_90a", nvrtc=binding))
    assert len(report) == 1
