"""What the sanitizer probes (tools/*_probe.py) share: their kernels compiled for sm_90a from
the project's headers, and the run of their cases, one per process under the sanitizer."""

from __future__ import annotations

from cuflash.kernels import _build


def module(code: str, expressions):
    """A CuPy RawModule of probe text `code` (its headers inlined: ``_build.with_headers``) for
    sm_90a, with the kernels `expressions` name."""
    import cupy

    return cupy.RawModule(code=code, options=(*_build.COMPILE_OPTIONS, "-arch=sm_90a"),
                          name_expressions=tuple(expressions))


def main(argv, cases, fault: str, check) -> int:
    """Runs the cases named in ``argv[1:]``, or every one but ``fault`` (the real fault that
    shows the sanitizer reports one; its result is wrong by design). ``check(case)`` runs one
    and returns ``(ok, line)``. Exit status 1 where another case read wrong, 2 for an unknown
    case."""
    for case in argv[1:] or [c for c in cases if c != fault]:
        if case not in cases:
            print(f"unknown case {case!r}; one of {', '.join(cases)}")
            return 2
        ok, line = check(case)
        print(line)
        if not ok and case != fault:
            return 1
    return 0
