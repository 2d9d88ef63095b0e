"""CUDA kernels for CuPy arrays, compiled at run time through CuPy's RawModule (NVRTC).

Each pass (forward, backward) has an ordered registry of kernel families, fastest first. A family
is a launcher module with ``supports(spec, arrays) -> None | reason`` and the pass's entry point;
the first family that supports a call runs it. ``plan()`` says which family a call gets and why
each faster one was passed over (``cuflash.kernel_plan`` and ``cuflash info`` show it).

A family may also offer ``prepare_<entry>(spec, arrays)``: everything its entry point does that
depends only on the spec and the arrays' layout (tiles, compiled kernels, packed arguments), as a
callable that takes the entry point's arguments and only fills in their data pointers and
launches. ``prepare()`` returns it (``None`` for a family without one, whose calls then always
take the entry point); the cached call path of ``cuflash._calls`` keeps it per call signature.

Entry points take the 4-D (B, H, N, D) views described in docs/internals.md and the call's
``AttentionSpec``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import threading
from dataclasses import dataclass, field

import numpy

from .. import _checks
from . import _build

# Set to 1 to pass over the Hopper (sm_90a) families (comparison, debugging).
DISABLE_HOPPER_ENV = "CUFLASH_DISABLE_SM90"
WARP_SPECIALISED_BACKWARD_ENV = "CUFLASH_SM90_BWD_WS"  # 0: the cp.async dK/dV kernel, not the warp-specialised one (sm90_backward)
# 0: deterministic Hopper backward calls take the dQ kernel, not the fused dQ with ordered adds
# (sm90_backward.ordered_dq, the default where it fits), for comparison.
ORDERED_DQ_ENV = "CUFLASH_SM90_ORDERED_DQ"


@dataclass(frozen=True)
class Family:
    """A kernel family: `module` (under cuflash.kernels) holds `supports` and the entry point."""

    name: str
    module: str
    entry: str
    summary: str
    hopper: bool = False

    def launcher(self):
        return importlib.import_module(f"{__name__}.{self.module}")

    def why_not(self, spec, arrays) -> str | None:
        """None when this family can run the call, else the reason it cannot."""
        if self.hopper and os.environ.get(DISABLE_HOPPER_ENV, "") not in ("", "0"):
            return f"disabled by {DISABLE_HOPPER_ENV}"
        return self.launcher().supports(spec, arrays)

    def run(self, *args):
        getattr(self.launcher(), self.entry)(*args)


FORWARD = (
    Family("sm90-tma", "sm90_tma_forward", "forward",
           "Hopper, warp-specialised: TMA producer, wgmma consumers; 16-bit, 32 <= D, Dv <= 256",
           hopper=True),
    Family("sm90-wgmma", "sm90_forward", "forward",
           "Hopper wgmma, 16-bit, D = Dv in {64, 128}", hopper=True),
    Family("sm80-mma", "mma_forward", "forward", "mma.sync tensor cores, 16-bit, any D <= 256"),
    Family("float32", "float32", "forward", "CUDA cores, float32 end to end"),
)
BACKWARD = (
    Family("sm90-wgmma", "sm90_backward", "backward",
           "Hopper wgmma, 16-bit, D, Dv <= 256 (tiles of 64, 128 or 256 columns)", hopper=True),
    Family("sm80-mma", "mma_backward", "backward", "mma.sync tensor cores, 16-bit, any D <= 256"),
    Family("float32", "float32", "backward", "CUDA cores, float32 end to end"),
)
REGISTRY = {"forward": FORWARD, "backward": BACKWARD}


@dataclass(frozen=True)
class Plan:
    """Which family runs one pass of a call, and why each one before it in the registry did not."""

    pass_name: str
    family: Family | None
    passed_over: tuple[tuple[str, str], ...]
    spec: object = field(default=None, compare=False, repr=False)
    arrays: tuple | None = field(default=None, compare=False, repr=False)  # the views planned for

    @property
    def detail(self) -> str:
        """How the chosen family runs this call (its launcher's ``describe_call``: tiles, launch
        sequence, for the views planned for), or "" when it says nothing more. Worked out when
        asked, not per call."""
        describe_call = getattr(self.family.launcher(), "describe_call", None) if self.family else None
        return describe_call(self.spec, self.arrays) if describe_call else ""

    @property
    def workspace(self) -> dict[str, int] | None:
        """The device memory the chosen family allocates for this call besides its results, in
        bytes by part (its launcher's ``workspace_of``; a backward's, released when the call
        returns), or None when it allocates none. Only backward passes have one: a family with
        one launcher module for both passes (float32) reports its backward's there."""
        if self.pass_name != "backward" or self.family is None:
            return None
        workspace_of = getattr(self.family.launcher(), "workspace_of", None)
        return workspace_of(self.spec, self.arrays) if workspace_of else None

    def describe(self) -> str:
        chosen = self.family.name if self.family else "none"
        lines = [f"{self.pass_name}: {chosen}" + (f" ({self.family.summary})" if self.family else "")]
        detail = self.detail
        if detail:
            lines.append(f"  runs {detail}")
        workspace = self.workspace
        if workspace:
            parts = ", ".join(f"{name} {_size(size)}" for name, size in workspace.items())
            lines.append(f"  workspace: {_size(sum(workspace.values()))} ({parts})")
        lines += [f"  passed over {name}: {reason}" for name, reason in self.passed_over]
        return "\n".join(lines)


def _size(size: int) -> str:
    """MiB, or bytes below 0.01 MiB (a few counters would read 0.00 MiB)."""
    return f"{size / 2**20:,.2f} MiB" if size >= 0.01 * 2**20 else f"{size:,} B"


def plan(pass_name: str, spec, arrays) -> Plan:
    """The family that runs `pass_name` ("forward" or "backward") for this call."""
    passed_over = []
    for family in REGISTRY[pass_name]:
        reason = family.why_not(spec, arrays)
        if reason is None:
            return Plan(pass_name, family, tuple(passed_over), spec, arrays)
        passed_over.append((family.name, reason))
    return Plan(pass_name, None, tuple(passed_over), spec, arrays)


def why_not_packed(dtype) -> str | None:
    """Why no family runs packed sequences (``attention_varlen``) in ``dtype``, None where one
    may: float32 runs in the float32 family alone (the others take float16/bfloat16), which has
    none (``float32.supports``). Asked by a paged call before it gathers its keys."""
    if numpy.dtype(dtype) != numpy.float32:
        return None
    from . import _launch

    return _launch.packed_unsupported("float32")


def _chosen(pass_name: str, spec, arrays) -> Family:
    chosen = plan(pass_name, spec, arrays)
    if chosen.family is None:
        raise ValueError(f"no GPU kernel runs this {pass_name} pass ({spec.describe()}):\n"
                         + chosen.describe())
    return chosen.family


def _prepared(family: Family, spec, arrays):
    preparer = getattr(family.launcher(), f"prepare_{family.entry}", None)
    return None if preparer is None else preparer(spec, arrays)


def prepare(pass_name: str, spec, arrays):
    """The prepared launch of `pass_name` for this spec and the layout of `arrays` (as in
    ``plan``): a callable taking the pass's entry-point arguments, the spec last, that reads only
    their data pointers; ``None`` when the chosen family offers none. Inside ``reusing_launches``,
    the launch this thread prepared there for the same pass, spec and layout."""
    return _family_and_launch(pass_name, spec, arrays)[1]


def _family_and_launch(pass_name: str, spec, arrays):
    """``(family, prepared launch or None)`` of this call: ``prepare``'s, and the entry points'
    (which run the family's entry point where it offers no prepared launch)."""
    kept = _reused.launches
    key = None if kept is None else _reuse_key(pass_name, spec, arrays)
    if key is not None and key in kept:
        return kept[key][1:]
    family = _chosen(pass_name, spec, arrays)
    launch = _prepared(family, spec, arrays)
    if key is not None:
        kept[key] = (spec, family, launch)  # the spec held: its identity is not reused meanwhile
    return family, launch


class _ReusedLaunches(threading.local):
    def __init__(self):
        self.launches = None  # a dict inside ``reusing_launches``


_reused = _ReusedLaunches()


@contextlib.contextmanager
def reusing_launches():
    """Within the block, ``prepare`` (and the entry points, which prepare through it) prepares
    each (pass, spec, layout) once on this thread: a call's first run and the call cache's entry
    built after it share one launch, where each took a few hundred microseconds of host time to
    prepare it (tiles, kernel lookup, packed arguments). The launches are let go at the block's
    end."""
    if _reused.launches is not None:  # nested: the outer block keeps them
        yield
        return
    _reused.launches = {}
    try:
        yield
    finally:
        _reused.launches = None


def _reuse_key(pass_name: str, spec, arrays):
    """What a prepared launch depends on beside the spec: what the call cache keys of the arrays
    and the registry state (``_calls.layout_signature``: a launch reads only the arrays' data
    pointers per call); ``None`` where that is not cacheable (not a CuPy array)."""
    from .._calls import layout_signature  # (that module builds on this one)

    layout = layout_signature(arrays)
    return None if layout is None else (pass_name, id(spec), layout)


def dispatch_state() -> tuple:
    """What, beside the call itself, decides which family runs it and how: the Hopper switch,
    the Hopper backward's two switches (``switch_values``) and the registries, by identity
    (cheap to hash; whoever keys on this keeps ``REGISTRY``'s values alive so that an identity
    is never reused)."""
    return (*switch_values(), id(REGISTRY["forward"]), id(REGISTRY["backward"]))


_SWITCHES = (DISABLE_HOPPER_ENV, WARP_SPECIALISED_BACKWARD_ENV, ORDERED_DQ_ENV)
_ENCODED_SWITCHES = tuple(map(getattr(os.environ, "encodekey", str), _SWITCHES))


def switch_values() -> tuple:
    """The environment switches as they are now, each as the environment holds it (None when
    unset): read afresh on every call, so that a change takes effect on the next one. Cached
    calls read them each time, and ``os.environ.get`` raises and catches a KeyError for each
    unset one (0.7 µs). CPython's ``os.environ`` keeps the variables in its dict ``_data``
    (encoded keys and values), which every change made through ``os.environ`` updates: looking
    them up there sees what ``os.environ.get`` would, at a twentieth of the cost."""
    data = getattr(os.environ, "_data", None)
    if data.__class__ is dict:
        disable, warp_specialised, ordered = _ENCODED_SWITCHES
        return data.get(disable), data.get(warp_specialised), data.get(ordered)
    return tuple(os.environ.get(name) for name in _SWITCHES)


def _run(pass_name: str, spec, arrays, args):
    family, launch = _family_and_launch(pass_name, spec, arrays)
    (launch or family.run)(*args, spec)


def forward(q, k, v, out, lse, spec):
    """out, lse ← attention(q, k, v); see docs/internals.md for shapes and strides."""
    with _checks.device_context(q):
        _run("forward", spec, (q, k, v, out), (q, k, v, out, lse))


def backward(dout, q, k, v, out, lse, dq, dk, dv, spec):
    """dq, dk, dv ← gradients of attention; dk/dv summed over each GQA group."""
    with _checks.device_context(q):
        _run("backward", spec, (q, k, v, dout, out, dq, dk, dv),
             (dout, q, k, v, out, lse, dq, dk, dv))


def availability() -> tuple[bool, str]:
    """Whether the GPU kernels can run in this process, and why not when they cannot."""
    try:
        import cupy
    except ImportError as error:
        return False, f"CuPy is not installed ({error}); install cuflash[cuda13] or cuflash[cuda12]"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as error:
        return False, _driver_problem(error)
    if count == 0:
        return False, "no CUDA device is visible"
    device = cupy.cuda.Device()
    capability = device.compute_capability
    if int(capability) < 80:
        return False, (f"the kernels need compute capability 8.0 or newer; device {device.id} has "
                       f"{_build.capability_text(capability)}")
    return True, f"{count} CUDA device(s)"


def _driver_problem(error: Exception) -> str:
    """The driver's error in words: with no NVIDIA driver installed at all, CUDA reports an
    'insufficient driver version', which misleads."""
    text = str(error)
    if "insufficient" in text.lower() or "cudaErrorInsufficientDriver" in text:
        try:
            import ctypes

            ctypes.CDLL("libcuda.so.1")
        except OSError:
            return "no NVIDIA driver found (libcuda.so.1 is not installed)"
    return f"no usable CUDA driver: {text}"
