"""The cached call path against the validated one, call by call, on the fake device.

tests/test_call_cache.py checks that an entry serves other arrays of its layout with the bytes
the validated path sends. Here one sequence of calls mixes everything a signature keys and
everything it does not, on the same arrays and on new ones: options changed or given as new
objects, slopes, masks equal in content but built apart, dropout seeds (ints and arrays),
``out=``, given gradients, ``return_lse``, packed sequences with their offsets read back, and bad
arguments of a cached layout. After each public call (made twice, so that the second is served
by an entry whenever one exists) the validated path (``_api.validated_*``, which neither reads
nor writes the cache) runs the same arguments, and both must do the same: raise the same error,
or launch the same kernels with the same grids and arguments and return arrays of the same
layout (the given ones themselves). Pointers the call passed in must be sent as they are; the
others (outputs, lse, workspaces, the slopes' copy) must be fresh allocations in both, or null in
both.
"""

from __future__ import annotations

import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cuflash
from cuflash import _api, _calls, _checks
from cuflash.kernels import _launch

pytest.importorskip("cupy")

BF16 = ml_dtypes.bfloat16


@pytest.fixture(params=["90", "80"], ids=["sm90", "sm80"])
def device(request, monkeypatch):
    """The fake device, with masks' device copies in its memory (each pointer named by the mask's
    content, so that equal masks built apart compare equal) and the host values of device
    offsets (``device.host``, by pointer) for the offsets' check."""
    from fake_device import FakeDevice

    from cuflash.sparse import BlockMask, ExactMask
    from cuflash.sparse._csr import TileCSR
    from cuflash.sparse._exactmask import TileBits

    device = FakeDevice(monkeypatch, compute_capability=request.param)
    device.mask_pointers, device.host = {}, {}

    def on_device(kind, build):
        def device_copy(self, tile_m, tile_n):
            key = ("fake", tile_m, tile_n)
            if key not in self._cache:
                arrays = [device.empty(a.shape, a.dtype) for a in build(self, tile_m, tile_n)]
                for index, array in enumerate(arrays):
                    device.mask_pointers[array.data.ptr] = (type(self).__name__, hash(self),
                                                            tile_m, tile_n, index)
                self._cache[key] = kind(*arrays)
            return self._cache[key]
        return device_copy

    monkeypatch.setattr(BlockMask, "device_csr", on_device(TileCSR, BlockMask.tile_csr))
    monkeypatch.setattr(ExactMask, "device_tile_bits", on_device(TileBits, ExactMask.tile_bits))

    def host_offsets(cu):
        """``_checks.host_offsets`` with device values looked up instead of read back."""
        return np.asarray(cu if isinstance(cu, np.ndarray) else device.host[cu.data.ptr],
                          dtype=np.int64)

    monkeypatch.setattr(_checks, "host_offsets", host_offsets)
    # What the validated path computes on the device besides the kernels, made up: the copies of
    # inputs the kernels cannot read in place, and gradients summed over broadcast axes.
    import cupy

    monkeypatch.setattr(cupy, "ascontiguousarray", lambda x, dtype=None: x if x.flags.c_contiguous
                        else device.empty(x.shape, x.dtype))
    monkeypatch.setattr(_api, "_summed", lambda spec, xp, target, x, grad: grad if grad is not None
                        else device.empty(x.shape, spec.grad_dtype))
    return device


# ----------------------------------------------------------------------------- what a call does

def _pointer_fields(layout):
    return [name for name in layout.names if layout.fields[name][0] == np.dtype(np.uint64)]


_LAYOUTS = {_launch.FWD_ARGS.itemsize: _launch.FWD_ARGS, _launch.BWD_ARGS.itemsize: _launch.BWD_ARGS}


def _named_launches(launches, known):
    """Each launch with its argument struct field by field: a pointer the call passed in (or a
    mask's device copy) by its name, any other as "fresh" (or 0)."""
    named = []
    for expression, grid, block, shared, record in launches:
        layout = _LAYOUTS[len(record)]
        args = np.frombuffer(bytearray(record), layout)
        pointers = set(_pointer_fields(layout))
        fields = []
        for name in layout.names:
            value = args[name][0].item()
            if name in pointers:
                value = known.get(value, "fresh" if value else 0)
            fields.append((name, value))
        named.append((expression, grid, block, shared, tuple(fields)))
    return named


def _named_side_argument(argument, known):
    """A kernel argument beside the struct: TMA descriptors (the fake device's hold the address
    first, then the box and the layout) with their addresses named as ``_named_launches`` names
    pointers; anything else as its bytes."""
    argument = np.asarray(argument)
    if argument.dtype.names != ("bits",):
        return argument.tobytes()
    words = argument["bits"].reshape(-1, 16)
    return tuple((known.get(int(w[0]), "fresh"), w[1:].tobytes()) for w in words)


def _layout_of(x):
    return None if x is None else (type(x).__name__, x.shape, x.strides, x.dtype.str)


def _run(device, call, arrays: dict, given: dict, lse_stored=True):
    """``("error", type, message)`` or ``("ok", launches, side arguments, results)`` of
    ``call()``; ``arrays``: every array the call passes (name → array), ``given``: the arrays it
    must return as themselves (their names)."""
    device.take_launches()
    device.side_arguments.clear()
    try:
        results = call()
    except (TypeError, ValueError) as error:
        device.take_launches()
        return ("error", type(error), str(error))
    results = results if isinstance(results, tuple) else (results,)
    described = []
    for x in results:
        name = next((n for n, a in given.items() if a is x), None)
        described.append(name if name is not None else _layout_of(x))
    known = dict(device.mask_pointers)  # (made by the call itself, the first time)
    known.update({x.data.ptr: name for name, x in arrays.items()
                  if x is not None and hasattr(x, "data") and not isinstance(x, np.ndarray)})
    launches = _named_launches(device.take_launches(), known)
    if not lse_stored:  # an lse not returned: the cached forward stores none, the validated one
        launches = [(*launch[:4], tuple((n, "fresh or null" if n == "lse" else v)  # a new one
                                        for n, v in launch[4])) for launch in launches]
    sides = [tuple(_named_side_argument(a, known) for a in side) for side in device.side_arguments]
    return ("ok", launches, sides, tuple(described))


# ----------------------------------------------------------------------------- problems

LAYOUTS = ("contiguous", "sequence-major", "unaligned", "padded", "stride-0-batch",
           "stride-0-rows", "stride-0-heads", "negative-rows")


def _array(device, layout, shape, dtype):
    """A made-up array of ``shape`` (leading axes, H, N, D, or (N, D)) in ``layout``."""
    import cupy

    shape = tuple(shape)
    as_strided = cupy.lib.stride_tricks.as_strided
    if layout in ("contiguous", "sequence-major", "unaligned", "padded") and len(shape) == 4:
        return device.laid_out(shape, dtype, layout)
    if layout == "stride-0-batch" and len(shape) > 3:
        one = device.empty((1,) * (len(shape) - 3) + shape[-3:], dtype)
        return as_strided(one, shape, (0,) * (len(shape) - 3) + one.strides[-3:])
    if layout == "stride-0-rows":
        one = device.empty(shape[:-2] + (1, shape[-1]), dtype)
        return as_strided(one, shape, one.strides[:-2] + (0, one.strides[-1]))
    if layout == "stride-0-heads" and len(shape) >= 3:
        one = device.empty(shape[:-3] + (1,) + shape[-2:], dtype)
        return as_strided(one, shape, one.strides[:-3] + (0,) + one.strides[-2:])
    if layout == "negative-rows" and shape[-2] > 1:
        return device.empty(shape, dtype)[..., ::-1, :]
    return device.empty(shape, dtype)


@st.composite
def _dense_problems(draw):
    dtype = draw(st.sampled_from([np.float16, BF16]))
    d, dv = draw(st.sampled_from([(32, 32), (64, 64), (96, 96), (128, 128), (256, 256), (192, 128),
                                  (64, 128), (40, 40)]))
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2, 3]))
    b = draw(st.integers(1, 2))
    lead_q = draw(st.sampled_from([(b,), (2, b)]))
    lead_kv = draw(st.sampled_from([(b,), (1,), ()]))
    two_d = draw(st.integers(0, 9)) == 0  # q, k and v all (N, D)
    if two_d:
        lead_q = lead_kv = ()
        hq = hkv = 1
    nq, nk = draw(st.integers(1, 300)), draw(st.integers(1, 300))
    # (outputs the kernels cannot write in place are copied into on the device: not here)
    layouts = {name: draw(st.sampled_from(LAYOUTS if name in ("q", "k", "v", "dout")
                                          else LAYOUTS[:-1]))
               for name in ("q", "k", "v", "dout", "out", "dq", "dk", "dv")}
    options = dict(causal=draw(st.booleans()),
                   window=draw(st.sampled_from([(-1, -1), (-1, -1), (32, 0), (64, 17), (-1, 5)])),
                   softcap=draw(st.sampled_from([0.0, 0.0, 20.0])),
                   scale=draw(st.sampled_from([None, None, 0.3])))
    features = draw(st.sets(st.sampled_from(["alibi", "dropout", "block", "exact"]), max_size=2))
    if {"block", "exact"} <= features:
        features.discard("exact")
    return dict(dtype=dtype, d=d, dv=dv, hq=hq, hkv=hkv, lead_q=lead_q, lead_kv=lead_kv,
                two_d=two_d, nq=nq, nk=nk, layouts=layouts, options=options, features=features)


# What a step changes, beside the pass and whether its arrays are new. Good ones first, then
# bad ones (the validated path refuses them).
STEPS = ("same", "same", "new-objects", "causal", "scale", "window", "softcap", "slopes",
         "slopes-2d", "dropout", "seed", "seed-array", "equal-mask", "deterministic",
         "grad-f32", "return-lse", "out", "grads", "grads-one",
         "bad-out-overlaps", "bad-grad-overlaps", "bad-grads-alias", "bad-seed",
         "bad-seed-array")


class _Scenario:
    """A problem's arrays and options, and the calls of one step on it."""

    def __init__(self, device, problem):
        self.device, self.p = device, problem
        self.masks = {}
        self.new_arrays()

    def shape(self, which):
        p = self.p
        if p["two_d"]:
            return {"q": (p["nq"], p["d"]), "k": (p["nk"], p["d"]), "v": (p["nk"], p["dv"]),
                    "o": (p["nq"], p["dv"])}[which]
        lead = p["lead_q"] if which in ("q", "o") else p["lead_kv"]
        if which == "o":
            lead = tuple(np.broadcast_shapes(p["lead_q"], p["lead_kv"]))
        heads = p["hq"] if which in ("q", "o") else p["hkv"]
        rows = p["nq"] if which in ("q", "o") else p["nk"]
        width = p["d"] if which in ("q", "k") else p["dv"]
        return (*lead, heads, rows, width)

    def make(self, name, which, layout=None):
        shape = self.shape(which)
        layout = layout or self.p["layouts"][name]
        if len(shape) < 4:
            layout = "contiguous" if layout not in ("stride-0-rows", "negative-rows") else layout
        return _array(self.device, layout, shape, self.p["dtype"])

    def new_arrays(self):
        self.q, self.k, self.v = (self.make(n, w) for n, w in (("q", "q"), ("k", "k"), ("v", "v")))
        self.dout = self.make("dout", "o")
        self.slopes = self.device.empty((self.p["hq"],), np.float32)

    def mask(self, kind, copy=0):
        """A block or exact mask of the problem; ``copy``: another object of the same content."""
        from cuflash.sparse import BlockMask, ExactMask

        key = (kind, copy)
        if key not in self.masks:
            nq, nk = self.p["nq"], self.p["nk"]
            rng = np.random.default_rng(7)
            if kind == "block":
                blocks = rng.random((-(-nq // 128), -(-nk // 128))) < 0.7
                self.masks[key] = BlockMask.from_dense(blocks, block_size=128, shape=(nq, nk))
            else:
                self.masks[key] = ExactMask.from_dense(rng.random((nq, nk)) < 0.6)
        return self.masks[key]

    def options(self, step):
        p, o = self.p, dict(self.p["options"])
        features = set(p["features"])
        if step == "new-objects":  # the same values, other objects (the full signature)
            o = {name: (float(repr(v)) if isinstance(v, float) else tuple(v) if isinstance(v, tuple)
                        else v) for name, v in o.items()}
        if step == "causal":
            o["causal"] = not o["causal"]
        if step == "scale":
            o["scale"] = 0.07
        if step == "window":
            o["window"] = (16, 3)
        if step == "softcap":
            o["softcap"] = 0.0 if o["softcap"] else 7.5
        if step == "dropout":
            features ^= {"dropout"}
        if "alibi" in features or step in ("slopes", "slopes-2d"):
            if step == "slopes":
                o["alibi_slopes"] = self.device.empty((p["hq"],), np.float32)
            elif step == "slopes-2d":
                o["alibi_slopes"] = self.device.empty((1, p["hq"]), np.float32)
            else:
                o["alibi_slopes"] = self.slopes
        if "dropout" in features or step in ("seed", "seed-array", "bad-seed", "bad-seed-array"):
            o.update(dropout_p=0.125, dropout_seed=5, dropout_offset=1)
            if step == "seed":
                o.update(dropout_seed=2**63 + 11, dropout_offset=2**32 - 1)
            if step == "seed-array":
                o.update(dropout_seed=self.device.empty((2,), np.uint64), dropout_offset=0)
            if step == "bad-seed":
                o.update(dropout_seed=2**64)
            if step == "bad-seed-array":
                o.update(dropout_seed=self.device.empty((4,), np.uint64)[::2], dropout_offset=0)
        for kind, option in (("block", "block_mask"), ("exact", "mask")):
            if kind in features:
                o[option] = self.mask(kind, copy=int(step == "equal-mask"))
        return o

    # -- calls: (public, validated, arrays, given)

    def forward(self, step):
        o = self.options(step)
        return_lse = step != "return-lse"
        out = None
        if step in ("out", "bad-out-overlaps"):
            out = self.make("out", "o")
            if step == "bad-out-overlaps":
                import cupy

                out = cupy.ndarray(out.shape, out.dtype, memptr=self.v.data, strides=out.strides)
        arrays = dict(q=self.q, k=self.k, v=self.v, out=out, slopes=o.get("alibi_slopes"),
                      seed=o.get("dropout_seed"))

        def public():
            return cuflash.attention(self.q, self.k, self.v, return_lse=return_lse, out=out, **o)

        def validated():
            _, _, result, lse = _api.validated_forward(self.q, self.k, self.v, out, o, return_lse)
            return (result, lse) if return_lse else result

        return public, validated, arrays, {} if out is None else {"out": out}, return_lse

    def backward(self, step):
        o = self.options(step)
        try:
            out, lse = cuflash.attention(self.q, self.k, self.v, return_lse=True, **o)
        except (TypeError, ValueError):
            out = lse = None
        if out is None:  # the forward refuses the options: the backward gets stand-ins
            out = self.make("out", "o", "contiguous")
            lse = self.device.empty(self.shape("o")[:-1], np.float32)
        if step == "deterministic":
            o["deterministic"] = True
        if step == "grad-f32":
            o["grad_dtype"] = np.float32
        dtype = np.float32 if step == "grad-f32" else self.p["dtype"]
        grads = {}
        if step in ("grads", "grads-one", "bad-grad-overlaps", "bad-grads-alias"):
            wanted = ("dq", "dk", "dv") if step != "grads-one" else ("dk",)
            for name, which in (("dq", "q"), ("dk", "k"), ("dv", "v")):
                if name in wanted:
                    shape = self.shape(which)
                    layout = self.p["layouts"][name]
                    if len(shape) < 4:
                        layout = "contiguous"
                    grads[name] = _array(self.device, layout, shape, dtype)
            if step == "bad-grad-overlaps":
                import cupy

                g = grads["dk"]
                grads["dk"] = cupy.ndarray(g.shape, g.dtype, memptr=self.dout.data, strides=g.strides)
            if step == "bad-grads-alias":
                grads["dv"] = grads["dq"] if grads["dq"].shape == grads["dv"].shape else grads["dk"]
        arrays = dict(q=self.q, k=self.k, v=self.v, out=out, lse=lse, dout=self.dout,
                      slopes=o.get("alibi_slopes"), seed=o.get("dropout_seed"), **grads)

        def public():
            return cuflash.attention_backward(self.dout, self.q, self.k, self.v, out, lse, **o, **grads)

        def validated():
            g = tuple(grads.get(name) for name in ("dq", "dk", "dv"))
            return _api.validated_backward(self.dout, self.q, self.k, self.v, out, lse, o, grads=g)[2]

        return public, validated, arrays, grads, True


def _assert_step_agrees(device, call):
    public, validated, arrays, given, lse_stored = call
    results = [_run(device, public, arrays, given, lse_stored) for _ in range(2)]
    expected = _run(device, validated, arrays, given, lse_stored)
    for result in results:
        assert result == expected


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(problem=_dense_problems(),
       steps=st.lists(st.tuples(st.sampled_from(["forward", "backward"]), st.booleans(),
                                st.sampled_from(STEPS)), min_size=1, max_size=8))
def test_every_call_of_a_sequence_does_what_the_validated_path_does(device, problem, steps):
    """A random problem, then a random sequence of forward and backward calls on it, each with
    one thing changed (or the same arguments again), on the same arrays or new ones of their
    layout: every call, served by an entry or not, raises what the validated path raises or
    launches what it launches."""
    _calls.clear()
    scenario = _Scenario(device, problem)
    for pass_name, new_arrays, step in steps:
        if new_arrays:
            scenario.new_arrays()
        _assert_step_agrees(device, getattr(scenario, pass_name)(step))


# ----------------------------------------------------------------------------- packed sequences

VARLEN_LAYOUTS = ("contiguous", "unaligned", "padded", "stride-0-heads", "negative-rows")


@st.composite
def _packed_problems(draw):
    dtype = draw(st.sampled_from([np.float16, BF16]))
    d, dv = draw(st.sampled_from([(32, 32), (64, 64), (128, 128), (256, 256), (64, 128), (40, 40)]))
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 3]))
    lengths_q = draw(st.lists(st.integers(0, 200), min_size=1, max_size=4))
    lengths_k = draw(st.lists(st.integers(0, 200), min_size=len(lengths_q), max_size=len(lengths_q)))
    # (no rows at all: the validated path zeroes the gradients on the device, not here)
    lengths_q[0], lengths_k[0] = max(lengths_q[0], 1), max(lengths_k[0], 1)
    layouts = {name: draw(st.sampled_from(VARLEN_LAYOUTS if name in ("q", "k", "v", "dout")
                                          else VARLEN_LAYOUTS[:3]))
               for name in ("q", "k", "v", "dout", "out", "dq", "dk", "dv")}
    options = dict(causal=draw(st.booleans()),
                   window=draw(st.sampled_from([(-1, -1), (-1, -1), (32, 0), (-1, 5)])),
                   softcap=draw(st.sampled_from([0.0, 0.0, 20.0])),
                   scale=draw(st.sampled_from([None, None, 0.3])),
                   check_offsets=draw(st.booleans()))
    features = draw(st.sets(st.sampled_from(["alibi", "alibi-per-sequence", "dropout"]), max_size=2))
    slack = draw(st.sampled_from([(0, 0), (0, 3), (5, 0)]))
    return dict(dtype=dtype, d=d, dv=dv, hq=hq, hkv=hkv, lengths_q=lengths_q, lengths_k=lengths_k,
                slack=slack, layouts=layouts, options=options, features=features)


PACKED_STEPS = ("same", "same", "new-objects", "new-offsets", "other-lengths", "causal", "window",
                "softcap", "slopes", "dropout", "seed", "seed-array", "deterministic", "return-lse",
                "out", "grads", "grads-one", "check-offsets",
                "bad-offset", "bad-offset", "bad-offset-and-seed", "bad-out-overlaps",
                "bad-grad-overlaps", "bad-seed")


class _PackedScenario:
    """A packed problem's arrays, offsets and options, and the calls of one step on it."""

    def __init__(self, device, problem):
        self.device, self.p = device, problem
        self.lengths = (list(problem["lengths_q"]), list(problem["lengths_k"]))
        self.new_arrays()

    def offsets(self, lengths, bad=None):
        values = np.concatenate(([0], np.cumsum(lengths))).astype(np.int32)
        if bad == "start":
            values[0] = 1
        elif bad == "decreasing" and len(values) > 2:
            values[1] = values[2] + 1
        elif bad == "end":
            values[-1] += 1
        cu = self.device.empty(values.shape, np.int32)
        self.device.host[cu.data.ptr] = values
        return cu

    def make(self, name, rows, heads, width, layout=None):
        layout = layout or self.p["layouts"][name]
        shape = (rows, heads, width)
        if layout == "negative-rows" and rows < 2:
            layout = "contiguous"
        if layout == "unaligned":
            return self.device.empty((rows * heads * width + 1,), self.p["dtype"])[1:].reshape(shape)
        if layout == "padded":
            return self.device.empty((rows, heads, width + 8), self.p["dtype"])[..., :width]
        if layout == "stride-0-heads":
            import cupy

            one = self.device.empty((rows, 1, width), self.p["dtype"])
            return cupy.lib.stride_tricks.as_strided(one, shape, (one.strides[0], 0, one.strides[2]))
        if layout == "negative-rows":
            return self.device.empty(shape, self.p["dtype"])[::-1]
        return self.device.empty(shape, self.p["dtype"])

    def new_arrays(self):
        p, (lq, lk) = self.p, self.lengths
        self.q = self.make("q", sum(lq), p["hq"], p["d"])
        self.k = self.make("k", sum(lk), p["hkv"], p["d"])
        self.v = self.make("v", sum(lk), p["hkv"], p["dv"])
        self.dout = self.make("dout", sum(lq), p["hq"], p["dv"])
        self.cu = (self.offsets(lq), self.offsets(lk))
        self.slopes = self.device.empty((p["hq"],), np.float32)

    def arguments(self, step):
        """``(cu_q, cu_k, max_q, max_k)`` and the options of one step."""
        p, o = self.p, dict(self.p["options"])
        (lq, lk), features = self.lengths, set(p["features"])
        cu_q, cu_k = self.cu
        if step == "new-offsets":  # other arrays, the same values
            cu_q, cu_k = self.offsets(lq), self.offsets(lk)
        if step == "other-lengths":  # the same totals, other sequences
            lq, lk = list(reversed(lq)), list(reversed(lk))
            cu_q, cu_k = self.offsets(lq), self.offsets(lk)
        if step.startswith("bad-offset"):
            cu_q = self.offsets(lq, bad=["start", "decreasing", "end"][len(lq) % 3])
        max_q, max_k = max(lq) + p["slack"][0], max(lk) + p["slack"][1]
        if step == "bad-offset" and len(lq) % 2:  # a sequence longer than max_seqlen_k
            cu_q, max_k = self.cu[0], max(max(lk) - 1, 0)
        if step == "new-objects":
            o = {name: (float(repr(v)) if isinstance(v, float) else tuple(v) if isinstance(v, tuple)
                        else v) for name, v in o.items()}
        if step == "causal":
            o["causal"] = not o["causal"]
        if step == "window":
            o["window"] = (16, 3)
        if step == "softcap":
            o["softcap"] = 0.0 if o["softcap"] else 7.5
        if step == "check-offsets":
            o["check_offsets"] = not o["check_offsets"]
        if step == "dropout":
            features ^= {"dropout"}
        if "alibi" in features:
            o["alibi_slopes"] = self.slopes if step != "slopes" else self.device.empty((p["hq"],), np.float32)
        elif "alibi-per-sequence" in features or step == "slopes":
            o["alibi_slopes"] = self.device.empty((len(lq), p["hq"]), np.float32)
        if "dropout" in features or step in ("seed", "seed-array", "bad-seed", "bad-offset-and-seed"):
            o.update(dropout_p=0.125, dropout_seed=5, dropout_offset=1)
            if step == "seed":
                o.update(dropout_seed=2**63 + 11, dropout_offset=2**32 - 1)
            if step == "seed-array":
                o.update(dropout_seed=self.device.empty((2,), np.uint64), dropout_offset=0)
            if step in ("bad-seed", "bad-offset-and-seed"):
                o.update(dropout_seed=-1)
        return (cu_q, cu_k, max_q, max_k), o

    def forward(self, step):
        layout, o = self.arguments(step)
        return_lse = step != "return-lse"
        out = None
        if step in ("out", "bad-out-overlaps"):
            out = self.make("out", self.q.shape[0], self.p["hq"], self.p["dv"])
            if step == "bad-out-overlaps":
                import cupy

                out = cupy.ndarray(out.shape, out.dtype, memptr=self.q.data, strides=out.strides)
        arrays = dict(q=self.q, k=self.k, v=self.v, out=out, cu_q=layout[0], cu_k=layout[1],
                      slopes=o.get("alibi_slopes"), seed=o.get("dropout_seed"))

        def public():
            return cuflash.attention_varlen(self.q, self.k, self.v, *layout, return_lse=return_lse,
                                            out=out, **o)

        def validated():
            _, _, result, lse = _api.validated_varlen_forward(self.q, self.k, self.v, *layout, out,
                                                              o, return_lse)
            return (result, lse) if return_lse else result

        return public, validated, arrays, {} if out is None else {"out": out}, True

    def backward(self, step):
        layout, o = self.arguments(step)
        p, total_q = self.p, self.q.shape[0]
        out = self.make("out", total_q, p["hq"], p["dv"], "contiguous")
        lse = self.device.empty((p["hq"], total_q), np.float32)
        if step == "deterministic":
            o["deterministic"] = True
        grads = {}
        if step in ("grads", "grads-one", "bad-grad-overlaps"):
            wanted = ("dq", "dk", "dv") if step != "grads-one" else ("dv",)
            for name, x in (("dq", self.q), ("dk", self.k), ("dv", self.v)):
                if name in wanted:
                    grads[name] = self.make(name, *x.shape)
            if step == "bad-grad-overlaps":
                import cupy

                g = grads["dq"]
                grads["dq"] = cupy.ndarray(g.shape, g.dtype, memptr=lse.data, strides=g.strides)
        arrays = dict(q=self.q, k=self.k, v=self.v, out=out, lse=lse, dout=self.dout,
                      cu_q=layout[0], cu_k=layout[1], slopes=o.get("alibi_slopes"),
                      seed=o.get("dropout_seed"), **grads)

        def public():
            return cuflash.attention_varlen_backward(self.dout, self.q, self.k, self.v, out, lse,
                                                     *layout, **o, **grads)

        def validated():
            g = tuple(grads.get(name) for name in ("dq", "dk", "dv"))
            return _api.validated_varlen_backward(self.dout, self.q, self.k, self.v, out, lse,
                                                  *layout, o, grads=g)[2]

        return public, validated, arrays, grads, True


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(problem=_packed_problems(),
       steps=st.lists(st.tuples(st.sampled_from(["forward", "backward"]), st.booleans(),
                                st.sampled_from(PACKED_STEPS)), min_size=1, max_size=8))
def test_every_packed_call_of_a_sequence_does_what_the_validated_path_does(device, problem,
                                                                          steps):
    """As for dense calls, with packed sequences: offsets new, of other values, or bad (read
    back and checked with ``check_offsets``, the default, on either path), max lengths with
    room to spare, slopes per sequence."""
    _calls.clear()
    scenario = _PackedScenario(device, problem)
    for pass_name, new_arrays, step in steps:
        if new_arrays:
            scenario.new_arrays()
        _assert_step_agrees(device, getattr(scenario, pass_name)(step))


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_a_cached_packed_call_checks_its_dropout_seed_before_its_offsets(device, backward):
    """The validated path checks the dropout arguments before it reads back the offsets: a
    cached call wrong in both raises the same error, the seed's."""
    scenario = _PackedScenario(device, dict(
        dtype=BF16, d=64, dv=64, hq=2, hkv=1, lengths_q=[30, 70], lengths_k=[50, 50], slack=(0, 0),
        layouts=dict.fromkeys(("q", "k", "v", "dout", "out", "dq", "dk", "dv"), "contiguous"),
        options=dict(causal=True, window=(-1, -1), softcap=0.0, scale=None, check_offsets=True),
        features={"dropout"}))
    call = getattr(scenario, "backward" if backward else "forward")
    call("same")[0]()  # the entry
    public, validated, *_ = call("bad-offset-and-seed")
    for run in (validated, public):
        with pytest.raises(ValueError, match=r"dropout_seed must be an int in \[0, 2\*\*64\)"):
            run()


# ----------------------------------------------------------------------------- threads

def test_threads_sharing_entries_launch_with_their_own_arrays(device, monkeypatch):
    """Threads calling the same signatures at once, each with arrays of its own (and, for packed
    sequences without the offsets' check, two offset arrays in turn), share the entries; every
    launch each makes carries its own pointers and otherwise what the validated path sends."""
    import sys

    record_lock, mine = threading.Lock(), threading.local()
    real_launch = device.launch_kernel

    def launch_kernel(*args):
        with record_lock:
            real_launch(*args)
            mine.launches.append(device.launches[-1])

    device.launch_kernel = launch_kernel  # (dependent launches come through it too)
    monkeypatch.setattr(device.cupy.cuda.driver, "launchKernel", launch_kernel)
    monkeypatch.setattr(sys, "getswitchinterval", sys.getswitchinterval)
    sys.setswitchinterval(1e-6)
    _calls.clear()
    dense = dict(dtype=BF16, d=64, dv=64, hq=4, hkv=2, lead_q=(2,), lead_kv=(2,), two_d=False,
                 nq=200, nk=200, layouts=dict.fromkeys(("q", "k", "v", "dout", "out", "dq", "dk", "dv"),
                                                      "sequence-major"),
                 options=dict(causal=True, window=(-1, -1), softcap=0.0, scale=None),
                 features={"alibi", "dropout"})
    packed = dict(dtype=BF16, d=64, dv=64, hq=4, hkv=2, lengths_q=[90, 60, 50],
                  lengths_k=[90, 60, 50], slack=(0, 0),
                  layouts=dict.fromkeys(("q", "k", "v", "dout", "out", "dq", "dk", "dv"), "contiguous"),
                  options=dict(causal=True, window=(-1, -1), softcap=0.0, scale=None,
                               check_offsets=False), features=set())

    def calls_of_a_thread():
        """Each call of one thread's problems, with what the validated path sends for it."""
        calls = []
        for scenario, steps in ((_Scenario(device, dense), ("same", "seed", "out", "grads")),
                                (_PackedScenario(device, packed), ("same", "new-offsets"))):
            for step in steps:
                for pass_name in ("forward", "backward"):
                    public, validated, arrays, given, lse_stored = getattr(scenario, pass_name)(step)
                    mine.launches = []
                    validated()
                    known = dict(device.mask_pointers)
                    known.update({x.data.ptr: name for name, x in arrays.items()
                                  if x is not None and hasattr(x, "data")})
                    calls.append((public, known, _named_launches(mine.launches, known)))
                    public()  # the entries (or hits)
        return calls

    problems = [calls_of_a_thread() for _ in range(3)]
    failures = []

    def hammer(calls):
        try:
            for _ in range(40):
                for public, known, expected in calls:
                    mine.launches = []
                    public()
                    assert _named_launches(mine.launches, known) == expected
        except BaseException as error:  # reported by the main thread
            failures.append(error)

    threads = [threading.Thread(target=hammer, args=(calls,)) for calls in problems]
    hits = _calls.stats()["hits"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures[0]
    assert _calls.stats()["hits"] - hits >= 3 * 40 * 12 * 0.9  # (the counter itself is not atomic)
