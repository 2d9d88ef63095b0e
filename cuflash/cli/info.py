"""``cuflash info``: versions, the CUDA stack, the devices, and which paths can run here."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import click
import numpy

import cuflash
from cuflash.cli._common import echo_json, size
from cuflash.cli._options import json_option


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cuda_version(number: int) -> str:
    """CUDA's encoded version (12040) as text (12.4); 0 means no driver."""
    if number == 0:
        return "none found"
    return f"{number // 1000}.{number % 1000 // 10}"


def _attempt(fn):
    """``fn()``, or the reason it failed as text prefixed with "unavailable"."""
    try:
        return fn()
    except Exception as error:  # each probe fails in its own way without a GPU or a driver
        return f"unavailable ({str(error).strip() or type(error).__name__})"


def _cuda_facts() -> dict:
    """What CuPy can say about the CUDA stack; each item a value or the reason it is missing."""
    try:
        import cupy
    except Exception as error:
        return {"cupy": f"not importable ({error})"}
    facts = {
        "cupy": cupy.__version__,
        "cuda_driver": _attempt(lambda: _cuda_version(cupy.cuda.runtime.driverGetVersion())),
        "cuda_runtime": _attempt(lambda: _cuda_version(cupy.cuda.runtime.runtimeGetVersion())),
        "nvrtc": _attempt(lambda: ".".join(map(str, cupy.cuda.nvrtc.getVersion()))),
    }
    count = _attempt(cupy.cuda.runtime.getDeviceCount)
    if isinstance(count, str):
        facts["devices"] = count
    else:
        from cuflash.bench.devices import device_properties
        facts["devices"] = [_attempt(lambda i=i: device_properties(i)) for i in range(count)]
    return facts


def kernel_cache_dir() -> str:
    """Where CuPy keeps compiled kernels (cuflash writes no cache of its own)."""
    return os.environ.get("CUPY_CACHE_DIR") or os.path.expanduser("~/.cupy/kernel_cache")


# Calls whose kernel plan `cuflash info` shows: (dtype, head dim, options).
PLAN_EXAMPLES = (("bfloat16", 128, {"causal": True}), ("bfloat16", 64, {"window": (255, 0)}),
                 ("float16", 96, {}), ("bfloat16", 128, {"softcap": 30.0}), ("float32", 64, {}))


def kernel_plans(examples=PLAN_EXAMPLES, seq_len: int = 1024, heads: int = 16) -> list[str]:
    """The kernel plan (cuflash.kernel_plan) of each example call on GPU 0, as text."""
    import cupy

    from cuflash.bench.problems import DTYPES

    plans = []
    for dtype, d, options in examples:
        q = cupy.empty((1, heads, seq_len, d), DTYPES[dtype])
        plans.append(str(cuflash.kernel_plan(q, q, q, **options)))
    return plans


def gather() -> dict:
    from cuflash import kernels
    gpu_ok, gpu_reason = kernels.availability()
    return {
        "cuflash": cuflash.__version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "ml_dtypes": _package_version("ml_dtypes"),
        "scipy": _package_version("scipy"),
        **_cuda_facts(),
        "kernel_cache": kernel_cache_dir(),
        "torch": _package_version("torch"),
        "matplotlib": _package_version("matplotlib"),
        "paths": {
            "gpu": {"usable": gpu_ok, "reason": gpu_reason},
            "cpu": {"usable": True, "reason": f"NumPy {numpy.__version__}"},
        },
        "kernel_plans": _attempt(kernel_plans) if gpu_ok else [],
    }


def _device_line(p) -> str:
    if isinstance(p, str):
        return p
    optin = p["shared_memory_per_block_optin"] or p["shared_memory_per_block"]
    return (f"{p['name']}, sm_{p['major']}{p['minor']}, {p['multiprocessors']} SMs, "
            f"{optin // 1024} KiB shared memory per block (opt-in), {size(p['total_memory'])}")


def _lines(facts: dict) -> list[tuple[str, str]]:
    missing = "not installed"
    lines = [("cuflash", facts["cuflash"]), ("Python", facts["python"]),
             ("NumPy", facts["numpy"]), ("ml_dtypes", facts["ml_dtypes"] or missing),
             ("SciPy", facts["scipy"] or f"{missing} (needed by cuflash.sparse)"),
             ("CuPy", facts["cupy"])]
    for key, label in (("cuda_driver", "CUDA driver"), ("cuda_runtime", "CUDA runtime"),
                       ("nvrtc", "NVRTC")):
        if key in facts:
            lines.append((label, facts[key]))
    devices = facts.get("devices")
    if isinstance(devices, list):
        lines += [(f"GPU {i}", _device_line(p)) for i, p in enumerate(devices)] or \
            [("GPUs", "none visible")]
    elif devices is not None:
        lines.append(("GPUs", devices))
    lines += [("kernel cache", f"{facts['kernel_cache']} (CuPy's; CUPY_CACHE_DIR moves it)"),
              ("torch", facts["torch"] or f"{missing} (bench compares against it when present)"),
              ("matplotlib", facts["matplotlib"] or f"{missing} (needed by --plot)")]
    for key, label in (("gpu", "GPU kernels"), ("cpu", "CPU path")):
        path = facts["paths"][key]
        lines.append((label, ("usable: " if path["usable"] else "not usable: ") + path["reason"]))
    plans = facts.get("kernel_plans")
    if isinstance(plans, str):
        lines.append(("kernel plans", plans))
    for plan in plans or ():
        first, *rest = plan.splitlines()
        lines.append(("kernel plan", first.removeprefix("call: ")))
        lines += [("", line) for line in rest]
    return lines


@click.command(short_help="Versions, the GPU, and which paths can run here.", epilog="""\b
Examples:
  cuflash info
  cuflash info --json | python -m json.tool
""")
@json_option
def info(as_json):
    """Versions, the CUDA driver/runtime and NVRTC, the GPUs, CuPy's kernel cache directory,
    whether the GPU kernels and the CPU path can run here (with the reason when not), and, with
    a GPU, which kernel family a few example calls (1 x 16 heads x 1024 tokens) would run and
    why the faster ones were passed over (cuflash.kernel_plan).

    Works without CuPy and without a GPU: what is missing is said, not raised.
    """
    facts = gather()
    if as_json:
        echo_json(facts)
        return
    lines = _lines(facts)
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        click.echo(f"{label:<{width}}  {value}")
