"""Kernel sources → compiled functions.

Sources are the `.cu` files of `csrc/`. `#include "x.cuh"` lines naming a header of that folder
(``arch/ptx.cuh`` for one in a subfolder) are inlined before compilation, so the text CuPy hashes for its disk cache (`CUPY_CACHE_DIR`) is the
whole program: editing a header invalidates the cache as it should. Each kernel variant is one
template instantiation named by a C++ expression (``flash_fwd<bf16_t, 128, ...>``) and compiled
into its own module, once per (source, expression, device) in a process.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent / "csrc"
COMPILE_OPTIONS = ("-std=c++17",)
_INCLUDE = re.compile(r'^\s*#include\s+"([\w./]+)"\s*$', re.MULTILINE)


def _expanded(filename: str, seen: set) -> str:
    """File `filename` of csrc/ with its local headers inlined, none of `seen` again."""
    if filename in seen:
        return ""
    seen.add(filename)
    text = (KERNEL_DIR / filename).read_text().replace("#pragma once\n", "")
    return _INCLUDE.sub(lambda m: _expanded(m.group(1), seen), text)


@functools.lru_cache(maxsize=None)
def source(name: str) -> str:
    """The text of kernel source `name` with its local headers inlined (each at most once)."""
    return _expanded(name, set())


def with_headers(text: str) -> str:
    """CUDA `text` written outside csrc/ (a probe's kernels) with the csrc/ headers it includes
    inlined, as `source` inlines a kernel source's."""
    seen: set[str] = set()
    return _INCLUDE.sub(lambda m: _expanded(m.group(1), seen), text)


def template_expression(name: str, *args) -> str:
    """``name<a, b, ...>`` with Python bools spelled as C++ bools."""
    spelled = [("true" if a else "false") if isinstance(a, bool) else str(a) for a in args]
    return f"{name}<{', '.join(spelled)}>"


def trailing_flags(*flags: bool) -> tuple[bool, ...]:
    """A template's trailing flags that default to false, spelled up to the last true one: a
    variant without them keeps the expression it always had (and its compiled module)."""
    flags = tuple(bool(f) for f in flags)
    while flags and not flags[-1]:
        flags = flags[:-1]
    return flags


@functools.lru_cache(maxsize=None)
def _module(source_name: str, expression: str, device_id: int, options: tuple = ()):
    import cupy

    with cupy.cuda.Device(device_id):
        return cupy.RawModule(
            code=source(source_name), options=(*COMPILE_OPTIONS, *options),
            name_expressions=(expression,),
        )


def capability_text(capability: str) -> str:
    """A compute capability as CuPy gives it (``"90"``) the way NVIDIA writes it (``"9.0"``)."""
    return f"{capability[:-1]}.{capability[-1]}"


def get_function(source_name: str, expression: str, *, shared_bytes: int = 0, options=()):
    """The compiled kernel for `expression` on the current device, ready for `shared_bytes`.
    `options` are extra NVRTC options (``("-arch=sm_90a",)`` for Hopper-only code); they are part
    of the module's identity, in this process's memo and in CuPy's disk cache alike. A compile
    failure raises RuntimeError naming the source, the expression and the device, with NVRTC's
    log (whose lines name a temporary file only)."""
    import cupy
    from cupy.cuda.compiler import CompileException

    device = cupy.cuda.Device()
    try:
        kernel = _module(source_name, expression, device.id, tuple(options)).get_function(expression)
    except CompileException as error:
        capability = device.compute_capability
        raise RuntimeError(
            f"{source_name}: {expression} failed to compile for device {device.id} (compute "
            f"capability {capability_text(capability)}):\n{error}") from error
    if shared_bytes > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < shared_bytes:
        kernel.max_dynamic_shared_size_bytes = shared_bytes
    return kernel


def compile_offline(source_name: str, expressions, arch: str, options=(), *, nvrtc=None) -> str:
    """Compile with NVRTC for `arch` (``sm_80``, ``sm_90a``...) without a GPU, with extra NVRTC
    `options`; returns the ptxas report (registers, spills). Raises RuntimeError with the
    compiler log on failure. `nvrtc` is the binding to compile with: CuPy's by default, or one
    with the same functions over another NVRTC library (CI loads CUDA 12's, which CuPy's CUDA 13
    build cannot: tools/compile_with_nvrtc.py)."""
    return compile_text_offline(source(source_name), source_name, expressions, arch, options,
                                nvrtc=nvrtc)


def compile_text_offline(code: str, name: str, expressions, arch: str, options=(), *,
                         nvrtc=None) -> str:
    """``compile_offline`` of program text `code` (its headers inlined: ``with_headers``), named
    `name` in the compiler's messages."""
    if nvrtc is None:
        from cupy_backends.cuda.libs import nvrtc

    program = nvrtc.createProgram(code, name, [], [])
    try:
        for expression in expressions:
            nvrtc.addNameExpression(program, expression)
        try:
            nvrtc.compileProgram(program, [*COMPILE_OPTIONS, *options, f"-arch={arch}", "-Xptxas=-v"])
        except nvrtc.NVRTCError as error:
            raise RuntimeError(
                f"{name} failed to compile for {arch}:\n{nvrtc.getProgramLog(program)}"
            ) from error
        return nvrtc.getProgramLog(program)
    finally:
        nvrtc.destroyProgram(program)


def serialised_wgmma(log: str) -> list[str]:
    """The lines of a ptxas log saying that it serialised a kernel's wgmma instructions, where it
    cannot prove their accumulators untouched while they run (a wait on one path only, say):
    correct, but slow."""
    return [line for line in log.splitlines() if "wgmma.mma_async instructions are serialized" in line]


_FUNCTION_REPORT = re.compile(
    r"Compiling entry function '(?P<name>[^']+)'.*?"
    r"(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill stores, "
    r"(?P<loads>\d+) bytes spill loads.*?Used (?P<regs>\d+) registers",
    re.DOTALL,
)


def parse_ptxas_report(log: str) -> list[dict]:
    """Per kernel: mangled name, registers, stack frame and spill bytes from a ptxas -v log."""
    return [
        {
            "name": m["name"],
            "registers": int(m["regs"]),
            "stack": int(m["stack"]),
            "spill_stores": int(m["stores"]),
            "spill_loads": int(m["loads"]),
        }
        for m in _FUNCTION_REPORT.finditer(log)
    ]


def spilling(report: list[dict]) -> list[dict]:
    """The kernels of a ptxas report (``parse_ptxas_report``) that spill or keep a stack frame."""
    return [r for r in report if r["spill_stores"] or r["spill_loads"] or r["stack"]]


# ---- compiling every variant offline (CI's compile checks)

# Variants per NVRTC program. Whole sources (up to 277 variants) would leave one core idle behind
# the largest; each program pays the front end once (about a second).
PROGRAM_VARIANTS = 48


def main_variants(module_name: str) -> list[tuple[str, str]]:
    """``(source, expression)`` of each main variant of kernel module ``cuflash.kernels.<name>``."""
    import importlib

    return importlib.import_module(f"cuflash.kernels.{module_name}").main_variants()


def variants_by_source(module_names) -> dict[str, list[str]]:
    """``{source: expressions}`` of the main variants of the kernel modules named, in the order
    given."""
    grouped: dict[str, list[str]] = {}
    for name in module_names:
        for source, expression in main_variants(name):
            grouped.setdefault(source, []).append(expression)
    return grouped


def program_chunks(expressions) -> list[tuple[str, ...]]:
    """``expressions`` dealt into programs of at most about PROGRAM_VARIANTS (neighbours in the
    list differ in cost alike). A kernel that is no template is compiled by every program of its
    source, so each program names it, and ptxas reports one kernel per expression."""
    plain = [e for e in expressions if "<" not in e]
    templated = [e for e in expressions if "<" in e]
    count = max(1, -(-len(templated) // PROGRAM_VARIANTS))
    return [tuple(templated[i::count]) + tuple(plain) for i in range(count)]
