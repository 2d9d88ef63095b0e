"""Compile the kernels most likely to break under an older NVRTC with that NVRTC's library, loaded
through ctypes: CI runs it with CUDA 12.9's (the oldest the ``cuda12`` extra allows), which CuPy's
CUDA 13 build cannot load.

    python tools/compile_with_nvrtc.py path/to/libnvrtc.so.12 --version 12.9

Compiles every variant of the Hopper families that use the newest PTX (the TMA forward and the
wgmma backward) for sm_90a, and one variant of each kernel template of every other source, with
the most options switched on (so the most ``if constexpr`` branches), for sm_80 and sm_90a
(sm_90a alone for the Hopper-only ones): the whole compile group takes too long to run a third
time. A variant that fails to compile fails the run (exit status 1); register spills and
serialised wgmma instructions are reported as warnings, as CI's NVRTC 13.0 pass reports its
spills. The options and the ptxas report's parsing are ``cuflash.kernels._build``'s.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from cuflash.kernels import _build

PORTABLE_ARCHS = ("sm_80", "sm_90a")
HOPPER_ARCH = "sm_90a"
# Every variant of these, for sm_90a.
HOPPER_FAMILIES = ("sm90_tma_forward", "sm90_backward")
# One variant of each kernel template of these: for PORTABLE_ARCHS, or sm_90a where Hopper-only.
PORTABLE_MODULES = ("mma_forward", "mma_backward", "float32", "decode")
HOPPER_ONLY_MODULES = ("sm90_forward",)


class LibraryNvrtc:
    """An NVRTC shared library through ctypes, with the functions of CuPy's binding
    (``cupy_backends.cuda.libs.nvrtc``) that ``_build.compile_offline`` calls."""

    class NVRTCError(RuntimeError):
        pass

    def __init__(self, path):
        self._lib = ctypes.CDLL(str(path))
        self._lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        self._lib.nvrtcGetErrorString.argtypes = (ctypes.c_int,)

    def _check(self, status: int) -> None:
        if status:
            raise self.NVRTCError(f"{self._lib.nvrtcGetErrorString(status).decode()} ({status})")

    def getVersion(self) -> tuple[int, int]:
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self._lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)))
        return major.value, minor.value

    def createProgram(self, source: str, name: str, headers, include_names) -> ctypes.c_void_p:
        # _build.source inlines the local headers: NVRTC is given none.
        assert not headers and not include_names, "headers are inlined by _build.source"
        program = ctypes.c_void_p()
        self._check(self._lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(),
                                                 0, None, None))
        return program

    def addNameExpression(self, program: ctypes.c_void_p, expression: str) -> None:
        self._check(self._lib.nvrtcAddNameExpression(program, expression.encode()))

    def compileProgram(self, program: ctypes.c_void_p, options) -> None:
        encoded = [option.encode() for option in options]
        self._check(self._lib.nvrtcCompileProgram(program, len(encoded), (ctypes.c_char_p * len(encoded))(*encoded)))

    def getProgramLog(self, program: ctypes.c_void_p) -> str:
        size = ctypes.c_size_t()
        self._check(self._lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)))
        log = ctypes.create_string_buffer(size.value)
        self._check(self._lib.nvrtcGetProgramLog(program, log))
        return log.value.decode(errors="replace")

    def destroyProgram(self, program: ctypes.c_void_p) -> None:
        self._check(self._lib.nvrtcDestroyProgram(ctypes.byref(program)))


def _template(expression: str) -> str:
    return expression.split("<")[0]


def representatives(variants) -> dict[str, list[str]]:
    """``{source: expressions}``: per kernel template of each source, the first of its variants
    with the most options switched on (``true`` arguments)."""
    chosen: dict[tuple[str, str], str] = {}
    for source, expression in variants:
        key = source, _template(expression)
        if key not in chosen or expression.count("true") > chosen[key].count("true"):
            chosen[key] = expression
    grouped: dict[str, list[str]] = {}
    for (source, _), expression in chosen.items():
        grouped.setdefault(source, []).append(expression)
    return grouped


def programs() -> list[tuple[str, tuple[str, ...], str]]:
    """``(source, expressions, arch)`` of every program this run compiles."""
    out = [(source, chunk, HOPPER_ARCH)
           for source, expressions in _build.variants_by_source(HOPPER_FAMILIES).items()
           for chunk in _build.program_chunks(expressions)]
    for names, archs in ((PORTABLE_MODULES, PORTABLE_ARCHS), (HOPPER_ONLY_MODULES, (HOPPER_ARCH,))):
        chosen = representatives(variant for name in names for variant in _build.main_variants(name))
        out += [(source, tuple(expressions), arch) for source, expressions in chosen.items() for arch in archs]
    return out


_nvrtc: LibraryNvrtc | None = None


def _load(path: str) -> None:
    global _nvrtc
    _nvrtc = LibraryNvrtc(path)


def _compile(program) -> str:
    return _build.compile_offline(*program, nvrtc=_nvrtc)


def problems(program, log: str, version: str) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` of a compiled program's ptxas log: a kernel ptxas does not report is
    an error; spills and serialised wgmma instructions are warnings."""
    source, expressions, arch = program
    report = _build.parse_ptxas_report(log)
    errors = []
    if len(report) != len(expressions):
        errors.append(f"{source} for {arch}: ptxas reported {len(report)} of {len(expressions)} kernels")
    warnings = [f"NVRTC {version}: {r['name']} spills {r['spill_stores']} bytes (stack frame {r['stack']})"
                for r in _build.spilling(report)]
    warnings += [f"NVRTC {version}: {source} for {arch}: {line}" for line in _build.serialised_wgmma(log)]
    return errors, warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", help="the NVRTC shared library (libnvrtc.so.12)")
    parser.add_argument("--version", required=True, help="the NVRTC version it must be (12.9)")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    library = str(Path(args.library).resolve())
    found = ".".join(map(str, LibraryNvrtc(library).getVersion()))
    if found != args.version:
        print(f"error: {library} is NVRTC {found}, not {args.version}", file=sys.stderr)
        return 1
    # Submitted in the order listed: the TMA forward's programs, the costliest (about twice the
    # backward's per variant), first, and the single variants last, filling the end.
    selected = programs()
    print(f"NVRTC {found}: {sum(len(p[1]) for p in selected)} variants in {len(selected)} programs, "
          f"{args.jobs} processes", file=sys.stderr)
    start, failed, warned = time.monotonic(), 0, 0
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn"), initializer=_load,
                             initargs=(library,)) as pool:
        futures = {pool.submit(_compile, program): program for program in selected}
        for future in as_completed(futures):
            source, expressions, arch = program = futures[future]
            try:
                errors, warnings = problems(program, future.result(), found)
            except RuntimeError as error:  # the compiler's log
                errors, warnings = [str(error)], []
            for line in warnings:
                print(f"warning: {line}", file=sys.stderr)
            for line in errors:
                print(f"error: {line}", file=sys.stderr)
            failed += bool(errors)
            warned += len(warnings)
            print(f"{'FAILED' if errors else 'ok'}  {source} for {arch}: {len(expressions)} variants "
                  f"({time.monotonic() - start:.0f} s)", file=sys.stderr)
    print(f"NVRTC {found}: {len(selected) - failed} of {len(selected)} programs compiled, {warned} warnings, "
          f"{time.monotonic() - start:.0f} s", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
