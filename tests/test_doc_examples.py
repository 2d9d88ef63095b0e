"""The Python examples of README.md and docs/*.md run on the NumPy path and do what the text says.

Every ```python block of those files is collected. A block runs when ``EXAMPLES`` names it (by
its file and its first line): its ``setup`` first defines the arrays the text only describes
(fresh random inputs of the shapes the text gives), then the block runs as written, then
``check`` tests what the text says it does. Blocks written as ``>>>`` sessions run as doctests,
so their printed outputs must be today's. Blocks on torch tensors run on CPU tensors where torch
is installed. A block that needs a GPU (CuPy, CUDA tensors), torch where it is missing or
several processes, or that lists signatures rather than code, is skipped with that reason
(``skip_reason``); a block that is neither is a failure, so that a new example is either run
here or skipped for a stated reason. The README's ``python -c`` one-liner runs too, and so do
the ``>>>`` examples of the library's docstrings.
"""

from __future__ import annotations

import contextlib
import doctest
import importlib.util
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\s*$")


@dataclass(frozen=True)
class Block:
    path: str   # relative to the repository root
    line: int   # of the block's first line
    code: str

    @property
    def first_line(self) -> str:
        return self.code.splitlines()[0].strip()


def python_blocks() -> list[Block]:
    """Every ```python block of README.md and docs/*.md."""
    blocks = []
    for path in FILES:
        lines = path.read_text().splitlines()
        start, lang = None, None
        for number, line in enumerate(lines, 1):
            match = FENCE.match(line.strip()) if line.lstrip().startswith("```") else None
            if match is None:
                continue
            if start is None:
                start, lang = number, match.group(1)
            else:
                if lang == "python":
                    blocks.append(Block(str(path.relative_to(ROOT)), start + 1,
                                        "\n".join(lines[start:number - 1])))
                start = None
    return blocks


@dataclass(frozen=True)
class Example:
    setup: str = ""
    check: str = ""
    commented_shapes: bool = False  # check each line's "# (shape)" comment instead


_QKV = "q, k, v = (rng.standard_normal({shape}, dtype=np.float32) for _ in range(3))\n"
# The same as CPU tensors, q's shape first, then k's and v's.
_TORCH_QKV = ("import torch\n"
              "q, k, v = (torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))\n"
              "           for shape in ({q}, {kv}, {kv}))\n")
# Checks that an SDPA drop-in gave torch's own result for the same call.
_AS_TORCH_SDPA = ("expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, "
                  "is_causal=True)\n"
                  "assert out.shape == q.shape\n"
                  "torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)\n")

# (file, first line of the block) -> how to run it.
EXAMPLES = {
    ("README.md", "from cuflash.sparse import BlockMask, ExactMask, butterfly, document"): Example(
        setup=_QKV.format(shape="(1, 1, 4096, 8)") + "dout = rng.standard_normal(q.shape, "
                                                     "dtype=np.float32)\n",
        check="assert out.shape == dq.shape == q.shape == (1, 1, 4096, 8)\n"
              "assert isinstance(vjp.dropout_seed, int)\n"
              "again = cuflash.attention(q, k, v, causal=True, dropout_p=0.1, dropout_seed=1234)\n"
              "np.testing.assert_array_equal(out, again)\n"),
    ("README.md", "cu = numpy.array([0, 5, 12, 30], numpy.int32)          # three documents: 5, 7 "
                  "and 18 tokens"): Example(
        setup="q, k, v, dout = (rng.standard_normal((30, 3, 20), dtype=np.float32) "
              "for _ in range(4))\n",
        check="assert out.shape == dq.shape == (30, 3, 20) and lse.shape == (3, 30)\n"
              "for g, expected in zip(vjp(dout), cuflash.attention_varlen_backward(\n"
              "        dout, q, k, v, out, *cuflash.attention_varlen(\n"
              "            q, k, v, cu, cu, 18, 18, causal=True, return_lse=True)[1:],\n"
              "        cu, cu, 18, 18, causal=True)):\n"
              "    np.testing.assert_array_equal(g, expected)\n"),
    ("README.md", "# q (B, 1, Hq, D); caches (B, S_cache, Hkv, D); k, v (B, 1, Hkv, D); lengths "
                  "int32 (B,)"): Example(
        setup="B, S, Hq, Hkv, D = 3, 37, 4, 2, 24\n"
              "q = rng.standard_normal((B, 1, Hq, D), dtype=np.float32)\n"
              "k_cache, v_cache = (rng.standard_normal((B, S, Hkv, D), dtype=np.float32) "
              "for _ in range(2))\n"
              "k, v = (rng.standard_normal((B, 1, Hkv, D), dtype=np.float32) for _ in range(2))\n"
              "lengths = np.array([0, 11, 30], np.int32)\n",
        check="assert out.shape == (B, 1, Hq, D)\n"
              "assert (lengths == [1, 12, 31]).all()\n"
              "np.testing.assert_array_equal(k_cache[1, 11], k[1, 0])  # appended in place\n"),
    ("docs/api.md", "cuflash.attention(q2d, k2d, v2d)                # (Nq, Dv)"): Example(
        setup="Hq, Nq, Nk, D, Dv = 3, 7, 11, 16, 9\n"
              "q2d = rng.standard_normal((Nq, D), dtype=np.float32)\n"
              "k2d = rng.standard_normal((Nk, D), dtype=np.float32)\n"
              "v2d = rng.standard_normal((Nk, Dv), dtype=np.float32)\n"
              "q_heads = rng.standard_normal((Hq, Nq, D), dtype=np.float32)\n",
        commented_shapes=True),
    ("docs/parallel.md", "import cuflash.parallel as cp"): Example(
        check="assert callable(cp.ring_attention) and callable(cp.LocalRing)\n"),
    ("docs/parallel.md", "import numpy as np, cuflash.parallel as cp"): Example(
        setup=_QKV.format(shape="(2, 3, 72, 16)"),
        check="expected = cuflash.attention(q, k, v, causal=True)\n"
              "np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)\n"),
    ("docs/sparse.md", "import cuflash"): Example(  # both blocks that start so
        setup="q, k, v = (rng.standard_normal((1, 1, N, 8), dtype=np.float32) "
              "for _ in range(3))\n",
        check="assert out.shape == q.shape\n"),
    ("docs/sparse.md", "# Element level: shape (Nq, Nk); a block is kept when any element in it is "
                       "set."): Example(
        setup="import scipy.sparse\n"
              "from cuflash.sparse import BlockMask\n"
              "Nq, Nk = 301, 517\n"
              "element_pattern = scipy.sparse.csr_array(rng.random((Nq, Nk)) < 0.01)\n"
              "block_pattern = scipy.sparse.csr_array(rng.random((5, 5)) < 0.5)\n",
        check="assert mask.shape == (Nq, Nk) and mask.block_size == (64, 128)\n"),
    ("docs/sparse.md", "layout = numpy.tril(numpy.ones((32, 32), dtype=bool))"): Example(
        setup="import numpy\nfrom cuflash.sparse import BlockMask\n",
        check="assert mask.shape == (2000, 2048)\n"
              "assert BlockMask.from_dense(layout, block_size=64).shape == (2048, 2048)\n"),
    ("docs/sparse.md", "from cuflash.sparse import bigbird"): Example(
        setup="from cuflash.sparse import BlockMask\nn = 1000\n",
        check="assert mask.num_heads == 16 and mask.shape == (n, n)\n"),
    ("docs/sparse.md", "from cuflash.sparse import causal, sliding_window"): Example(
        setup="from cuflash.sparse import BlockMask\n",
        check="assert mask.shape == (4096, 4096)\n"),
    ("docs/sparse.md", ">>> mask = ExactMask.from_scipy(document([300, 500, 224], "
                       "causal=True))"): Example(
        setup="from cuflash.sparse import ExactMask, document\n"),
    ("docs/sparse.md", ">>> mask = BlockMask.from_scipy(sliding_window(1000, window=100, "
                       "block_size=64),"): Example(
        setup="from cuflash.sparse import BlockMask, sliding_window\n"),
    ("README.md", "from cuflash.torch import scaled_dot_product_attention   # instead of "
                  "torch.nn.functional's"): Example(
        setup=_TORCH_QKV.format(q="(2, 3, 40, 16)", kv="(2, 3, 40, 16)"), check=_AS_TORCH_SDPA),
    ("docs/torch.md", "# out = torch.nn.functional.scaled_dot_product_attention(q, k, v, "
                      "is_causal=True)"): Example(
        setup=_TORCH_QKV.format(q="(2, 3, 40, 16)", kv="(2, 3, 40, 16)"), check=_AS_TORCH_SDPA),
    ("docs/torch.md", "# from flash_attn import flash_attn_func, flash_attn_qkvpacked_func, "
                      "flash_attn_kvpacked_func"): Example(
        setup=_TORCH_QKV.format(q="(2, 30, 4, 16)", kv="(2, 40, 2, 16)"),
        check="assert out.shape == q.shape\n"
              "expected = cuflash.attention(*(x.transpose(1, 2).numpy() for x in (q, k, v)),\n"
              "                             causal=True)\n"
              "np.testing.assert_allclose(out.transpose(1, 2).numpy(), expected, rtol=0, "
              "atol=1e-6)\n"),
    ("docs/torch.md", "# from flash_attn import flash_attn_varlen_func"): Example(
        setup=_TORCH_QKV.format(q="(30, 4, 16)", kv="(30, 2, 16)")
        + "cu_seqlens_q = cu_seqlens_k = torch.tensor([0, 5, 12, 30], dtype=torch.int32)\n"
          "max_seqlen_q = max_seqlen_k = 18\n",
        check="assert out.shape == q.shape and out.is_contiguous()\n"
              "cu = cu_seqlens_q.numpy()\n"
              "expected = cuflash.attention_varlen(q.numpy(), k.numpy(), v.numpy(), cu, cu, 18, "
              "18)\n"
              "np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)\n"),
    ("docs/torch.md", "from cuflash.sparse import BlockMask, sliding_window"): Example(
        setup="import cuflash.torch\nn = 2048\n"
              + _TORCH_QKV.format(q="(1, 2, n, 16)", kv="(1, 2, n, 16)"),
        check="assert handle == cuflash.torch.block_mask_handle(mask)\n"
              "expected = cuflash.attention(q.numpy(), k.numpy(), v.numpy(), block_mask=mask)\n"
              "np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-6)\n"),
}

# The sequence length N of each of docs/sparse.md's two "import cuflash" blocks, by its pattern.
_SPARSE_LENGTHS = {"document": 8192, "sliding_window": 65536}


def skip_reason(block: Block) -> str | None:
    """Why ``block`` cannot run here, or None (its comments aside)."""
    code = "\n".join(line.partition("#")[0] for line in block.code.splitlines())
    if ("<the same options>" in code or "-> " in code or re.search(r"\(\s*[^()]*\*,", code)
            or re.search(r"[(,]\s*\.\.\.\s*[),]", code)):
        return "a listing of signatures, not runnable code"
    if re.search(r"\bcupy\b", code):
        return "needs CuPy arrays on a GPU"
    if "NcclComm" in code or 'device="gpu"' in code or '"nccl"' in code:
        return "needs GPUs and NCCL"
    if re.search(r"\btorch\b", code) and importlib.util.find_spec("torch") is None:
        return NO_TORCH
    return None


NO_TORCH = "needs torch (cuflash.torch), which is not installed"


BLOCKS = python_blocks()


def test_the_docs_hold_examples():
    assert len(BLOCKS) >= 30
    assert sum((block.path, block.first_line) in EXAMPLES for block in BLOCKS) >= 17


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.path}:{b.line}" for b in BLOCKS])
def test_example(block, rng):
    example = EXAMPLES.get((block.path, block.first_line))
    if example is None:
        reason = skip_reason(block)
        assert reason is not None, (
            f"{block.path}:{block.line}: a new example; give it a setup in EXAMPLES or make "
            f"skip_reason say why it cannot run on the CPU")
        pytest.skip(reason)
    if skip_reason(block) == NO_TORCH:
        pytest.skip(NO_TORCH)
    assert skip_reason(block) is None, f"{block.path}:{block.line}: {skip_reason(block)}"
    import cuflash

    namespace = {"np": np, "numpy": np, "cuflash": cuflash, "rng": rng}
    if block.first_line == "import cuflash":
        pattern = "document" if "document" in block.code else "sliding_window"
        namespace["N"] = _SPARSE_LENGTHS[pattern]
    exec(example.setup, namespace)
    if block.first_line.startswith(">>>"):
        run_doctest(block, namespace)
        return
    exec(compile(block.code, f"{block.path}:{block.line}", "exec"), namespace)
    if example.commented_shapes:
        check_commented_shapes(block, namespace)
    else:
        exec(example.check, namespace)


def run_doctest(block: Block, namespace: dict) -> None:
    """The block's ``>>>`` session, its outputs compared as doctest compares them."""
    test = doctest.DocTestParser().get_doctest(block.code, namespace, block.path, block.path,
                                               block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = io.StringIO()
    with contextlib.redirect_stdout(report):
        runner.run(test, out=report.write)
    assert runner.tries > 0 and runner.failures == 0, report.getvalue()


def check_commented_shapes(block: Block, namespace: dict) -> None:
    """Each line ``expression  # (shape)...`` gives an array of that shape (the comment's names
    are the setup's)."""
    checked = 0
    for line in block.code.splitlines():
        expression, _, comment = line.partition("#")
        shape = re.match(r"\s*(\([^)]*\))", comment)
        if shape is None:
            continue
        result = eval(expression, namespace)
        assert result.shape == eval(shape.group(1), namespace), line
        checked += 1
    assert checked == len(block.code.splitlines())


def test_readme_one_liner():
    """The README's ``python -c`` command prints the output shape and a difference from the
    float64 reference of about 1e-6."""
    text = (ROOT / "README.md").read_text()
    (command,) = re.findall(r'^python -c "(.*)"$', text, re.M)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(command, {})
    shape, difference = printed.getvalue().strip().split(") ")
    assert shape + ")" == "(1, 8, 1024, 64)"
    assert 0 < float(difference) < 1e-5
    assert "prints the output shape `(1, 8, 1024, 64)`" in text


def _listed_calls(code: str):
    """``(name, argument text)`` of each ``cuflash.name(...)`` in a block, comments dropped."""
    code = "\n".join(line.partition("#")[0] for line in code.splitlines())
    for match in re.finditer(r"\bcuflash\.(\w+)\(", code):
        yield match.group(1), _arguments(code, match.end())


def _arguments(code: str, start: int) -> str:
    """The text of a call's arguments, from ``start`` (just past its opening parenthesis) to
    the parenthesis that closes it, its whitespace runs made single spaces."""
    depth, end = 1, start
    while depth:
        depth += {"(": 1, ")": -1}.get(code[end], 0)
        end += 1
    return " ".join(code[start:end - 1].split())


@pytest.mark.parametrize("name", ["attention", "attention_varlen", "attention_with_kvcache"])
def test_api_md_lists_every_keyword(name):
    """docs/api.md states every option: where it spells out a function's keywords (no ``...``,
    no ``<the same options>``), it names all of them, in order, with their defaults."""
    import inspect

    import cuflash

    parameters = inspect.signature(getattr(cuflash, name)).parameters.values()
    expected = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                         for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)
    listings = [arguments.partition("*, ")[2]
                for block in BLOCKS if block.path == "docs/api.md"
                for called, arguments in _listed_calls(block.code)
                if called == name and "*, " in arguments and "..." not in arguments
                and "<" not in arguments]
    assert listings, f"docs/api.md spells out no keywords of cuflash.{name}"
    for listed in listings:
        assert listed == expected


def _keywords(function) -> list[str]:
    import inspect

    return [p.name if p.default is p.empty else f"{p.name}={p.default!r}"
            for p in inspect.signature(function).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY]


@pytest.mark.parametrize("path", ["README.md", "docs/api.md", "docs/design.md"])
def test_listings_name_every_keyword(path):
    """Where README.md, docs/api.md or docs/design.md list a call's keywords in full (no ``...``)
    they name all of them, in order, with their defaults; where they list them after ``<the same
    options>`` (a backward or vjp after its forward), they name the keywords the forward lacks."""
    import cuflash

    checked = 0
    for block in BLOCKS:
        if block.path != path:
            continue
        for name, arguments in _listed_calls(block.code):
            if "*, " not in arguments or not hasattr(cuflash, name):
                continue
            listed = arguments.partition("*, ")[2]
            if "<the same options>, " in listed:
                forward = getattr(cuflash, name.removesuffix("_backward").removesuffix("_vjp"))
                own = [k for k in _keywords(getattr(cuflash, name))
                       if k.partition("=")[0] not in
                       {f.partition("=")[0] for f in _keywords(forward)}]
                assert listed.partition("<the same options>, ")[2] == ", ".join(own), name
            elif "..." not in listed and "<" not in listed:
                assert listed == ", ".join(_keywords(getattr(cuflash, name))), name
            else:
                continue
            checked += 1
    assert checked, f"{path} lists no call's keywords"


# The library's own modules whose docstrings hold ``>>>`` examples (found by their text, so that a
# new example is run without being listed here).
DOCSTRING_MODULES = sorted(
    ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for path in (ROOT / "cuflash").rglob("*.py") if ">>>" in path.read_text())


def test_the_docstrings_hold_examples():
    assert {"cuflash._api", "cuflash._kvcache", "cuflash._plan",
            "cuflash.check.rule"} <= set(DOCSTRING_MODULES)


@pytest.mark.parametrize("module_name", DOCSTRING_MODULES)
def test_docstring_examples(module_name):
    """The ``Examples`` of the public docstrings print what they say, as
    ``python -m pytest --doctest-modules`` would check them."""
    import importlib

    module = importlib.import_module(module_name)
    finder, runner = doctest.DocTestFinder(), doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    report = io.StringIO()
    for test in finder.find(module, module_name):
        runner.run(test, out=report.write)
    assert runner.tries > 0 and runner.failures == 0, report.getvalue()


def _layout_names(path: str) -> set:
    """The file names a page's "Layout" section names, ``{a,b}.cuh`` groups spelled out."""
    text = (ROOT / path).read_text().partition("## Layout")[2].partition("\n## ")[0]
    for group, suffix in re.findall(r"\{([\w,]+)\}(\.cuh?)", text):
        text += " " + " ".join(name + suffix for name in group.split(","))
    return set(re.findall(r"\w+\.(?:cuh?|py)\b", text)) | set(re.findall(r"cuflash/(\w+)/", text))


_TOP_MODULES = {p.name for p in (ROOT / "cuflash").glob("*.py")} - {"__init__.py"}
_SUBPACKAGES = {p.parent.name for p in (ROOT / "cuflash").glob("*/__init__.py")}


def test_the_readme_layout_names_every_cuda_source_module_and_example():
    """The README's "Layout" names each file of cuflash/kernels/csrc (``{a,b}.cuh`` groups
    spelled out), each module at the top of the package and each script of examples/."""
    files = {p.name for p in (ROOT / "cuflash" / "kernels" / "csrc").rglob("*.cu*")}
    files |= _TOP_MODULES | {p.name for p in (ROOT / "examples").glob("*.py")}
    assert files - _layout_names("README.md") == set()


def test_the_design_layout_names_every_module_subpackage_and_cuda_header():
    """docs/design.md's "Layout" names each module at the top of the package, each subpackage
    and each header of cuflash/kernels/csrc (its ``.cu`` files are "one per family")."""
    files = {p.name for p in (ROOT / "cuflash" / "kernels" / "csrc").rglob("*.cuh")}
    files |= _TOP_MODULES | _SUBPACKAGES
    assert files - _layout_names("docs/design.md") == set()


def _spelled(function) -> str:
    """``function``'s parameters as a listing writes them: names, ``*`` where the keyword-only
    ones begin, and ``name=default``."""
    import inspect

    parts, star = [], False
    for p in inspect.signature(function).parameters.values():
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not star:
            parts.append("*")
            star = True
        parts.append(p.name if p.default is p.empty else f"{p.name}={p.default!r}")
    return ", ".join(parts)


def test_internals_md_lists_the_decode_entry_points_as_defined():
    """docs/internals.md, "The KV-cache call path": the listing of ``cuflash.kernels.decode``'s
    entry points gives each one's parameters, in order, with their defaults."""
    from cuflash.kernels import decode

    listed = {}
    for block in BLOCKS:
        if block.path == "docs/internals.md":
            code = "\n".join(line.partition("#")[0] for line in block.code.splitlines())
            for match in re.finditer(r"^decode\.(\w+)\(([^)]*)\)", code, re.MULTILINE):
                listed[match.group(1)] = " ".join(match.group(2).split())
    assert {"why_not", "append", "forward"} <= set(listed)
    for name, arguments in listed.items():
        assert arguments == _spelled(getattr(decode, name)), name


def test_internals_md_names_every_field_of_the_spec():
    """docs/internals.md, "One spec per call": the paragraph that lists what an AttentionSpec
    holds names each of its fields."""
    import dataclasses

    from cuflash._spec import AttentionSpec

    section = (ROOT / "docs" / "internals.md").read_text().partition(
        "## One spec per call")[2].partition("\n## ")[0]
    named = set(re.findall(r"`(\w+)`", section))
    fields = {field.name for field in dataclasses.fields(AttentionSpec)}
    assert fields - named == set()


def _torch_md_listings() -> list:
    """``(name, argument text)`` of each call in docs/torch.md's blocks that spells out a
    ``cuflash.torch`` function's parameters: no ``...``, and at least three keywords, each at
    its default (a call such as ``flash_attn_func(q, k, v, causal=True)`` is an example)."""
    import inspect

    import cuflash.torch

    listings = []
    for block in BLOCKS:
        if block.path != "docs/torch.md":
            continue
        code = "\n".join(line.partition("#")[0] for line in block.code.splitlines())
        for match in re.finditer(r"(?<![\w.])(?:cuflash\.torch\.)?(\w+)\(", code):
            function = getattr(cuflash.torch, match.group(1), None)
            if not callable(function) or match.group(1).startswith("_"):
                continue
            arguments = _arguments(code, match.end())
            defaults = {p.name: repr(p.default)
                        for p in inspect.signature(function).parameters.values()
                        if p.default is not p.empty}
            given = dict(part.split("=", 1) for part in re.split(r",\s*(?![^()]*\))", arguments)
                         if "=" in part)
            if ("..." not in arguments and len(given) >= 3
                    and all(defaults.get(name) == value for name, value in given.items())):
                listings.append((match.group(1), arguments))
    return listings


def test_torch_md_lists_every_parameter():
    """docs/torch.md: where a block spells out a function's parameters (flash-attn's signatures,
    ``cuflash.torch.attention``'s options), it names all of them, in order, with their defaults,
    and marks where the keyword-only ones begin."""
    pytest.importorskip("torch")
    import cuflash.torch

    listings = _torch_md_listings()
    assert {"flash_attn_func", "flash_attn_varlen_func", "attention"} <= {n for n, _ in listings}
    for name, arguments in listings:
        assert arguments == _spelled(getattr(cuflash.torch, name)), name


def _captured_and_warmed(code: str) -> tuple[list, set]:
    """The statements of a block's ``with stream:`` between ``stream.begin_capture()`` and
    ``stream.end_capture()``, and those before the capture begins, each as the call it makes
    (an assignment's value; any other statement whole)."""
    import ast

    def made(statement) -> str:
        return ast.unparse(statement.value if isinstance(statement, (ast.Assign, ast.Expr))
                           else statement)

    (body,) = [node.body for node in ast.walk(ast.parse(code)) if isinstance(node, ast.With)]
    texts = [made(statement) for statement in body]
    begin = texts.index("stream.begin_capture()")
    end = texts.index("stream.end_capture()")
    return texts[begin + 1:end], set(texts[:begin])


def test_capture_examples_run_each_call_before_capturing():
    """README.md and docs/api.md, "Repeated calls and CUDA graphs": each call is run once before
    it is captured (that compiles its kernels and uploads a mask's index, which a capture cannot
    hold); every example that captures calls makes each of them, as captured, before
    ``stream.begin_capture()``."""
    examples = [block for block in BLOCKS if block.path in ("README.md", "docs/api.md")
                and "begin_capture()" in block.code]
    assert len(examples) >= 3
    for block in examples:
        captured, warmed = _captured_and_warmed(block.code)
        assert captured, f"{block.path}:{block.line}"
        missing = [call for call in captured if call not in warmed]
        assert not missing, f"{block.path}:{block.line} captures {missing} without a first run"


def test_install_commands_install_from_the_clone():
    """README.md, "Install and run": cuflash is installed from a clone of its repository,
    ``pip install ".[cuda13]"``, so every command of README.md and docs/*.md that installs it
    with CuPy (the cuda12 or cuda13 extra) names the clone, quoted (to zsh, unquoted brackets
    are a pattern of file names)."""
    commands = [command for path in FILES
                for command in re.findall(r"pip install ([^`\n]*)", path.read_text())
                if re.search(r"\bcuda1[23]\b", command)]
    assert len(commands) >= 2
    for command in commands:
        assert command.startswith('".['), command


def test_design_md_names_a_template_expression_the_forward_builds():
    """docs/design.md, "Kernels": its example of a variant's template expression is the one the
    portable forward names for a causal float16 call at D = 64 on 1,024 rows."""
    from cuflash import _api
    from cuflash.kernels import mma_forward

    text = " ".join((ROOT / "docs" / "design.md").read_text().split())
    (example,) = re.findall(r"`(flash_fwd<[^`]*>)`", text)
    q = np.zeros((1, 4, 1024, 64), np.float16)
    _, spec = _api._spec(q, q, q, causal=True)
    assert example == mma_forward.variant(spec, mma_forward.tiles_for(spec), aligned=True)


def test_api_md_names_the_options_attention_vjp_lacks():
    """docs/api.md: attention_vjp takes attention's options but return_lse and out (its own
    listing says "<the same options>" and the comment under it names the two)."""
    import cuflash

    lacking = ({k.partition("=")[0] for k in _keywords(cuflash.attention)}
               - {k.partition("=")[0] for k in _keywords(cuflash.attention_vjp)})
    assert lacking == {"return_lse", "out"}
    assert ("attention_vjp's options are attention's but return_lse and out"
            in (ROOT / "docs" / "api.md").read_text())


def test_api_md_names_the_options_the_varlen_backward_and_vjp_lack():
    """docs/api.md: attention_varlen_backward and attention_varlen_vjp take attention_varlen's
    options but return_lse, out and block_table (paged keys are the forward's only)."""
    import cuflash

    forward = {k.partition("=")[0] for k in _keywords(cuflash.attention_varlen)}
    for function in (cuflash.attention_varlen_backward, cuflash.attention_varlen_vjp):
        own = {k.partition("=")[0] for k in _keywords(function)}
        assert forward - own == {"return_lse", "out", "block_table"}, function.__name__
    assert ("the backward and the vjp take the forward's options but return_lse, out and "
            "block_table" in (ROOT / "docs" / "api.md").read_text())


def test_design_md_lists_what_attention_varlen_takes_beyond_attention():
    """docs/design.md: attention_varlen takes attention's options but block_mask and mask, and
    check_offsets and block_table besides, with their defaults as listed."""
    import cuflash

    dense, packed = _keywords(cuflash.attention), _keywords(cuflash.attention_varlen)
    assert {k for k in dense if k not in packed} == {"block_mask=None", "mask=None"}
    assert [k for k in packed if k not in dense] == ["check_offsets=True", "block_table=None"]
    text = " ".join((ROOT / "docs" / "design.md").read_text().split())
    assert ("*, <the same options but block_mask and mask>, check_offsets=True, "
            "block_table=None)" in text)


def _notes_entries() -> list[str]:
    """The headings of benchmarks/NOTES.md's entries, lower-cased."""
    text = (ROOT / "benchmarks" / "NOTES.md").read_text()
    return [line.lstrip("#").strip().lower() for line in text.splitlines() if line.startswith("##")]


_CITED_ENTRY = re.compile(r'NOTES\.md`?,? "([^"]+)"')


def _cited_entries() -> list[tuple[str, str]]:
    """``(file, name)`` of each NOTES entry that the docs, the README, the library's and the
    benchmarks' sources and the tests cite by ``NOTES.md`` followed by a comma and the name in
    double quotes (a name may run over a line break, and over a comment's continuation marks)."""
    files = [*FILES, *(ROOT / "cuflash").rglob("*.py"), *(ROOT / "cuflash").rglob("*.cu*"),
             *(ROOT / "benchmarks").glob("*.py"), *(ROOT / "tests").glob("*.py")]
    cited = []
    for path in files:
        text = re.sub(r"\s*\n\s*(?:#|//)?\s*", " ", path.read_text())
        cited += [(str(path.relative_to(ROOT)), m.group(1)) for m in _CITED_ENTRY.finditer(text)]
    return cited


def test_every_notes_entry_cited_by_name_exists():
    """A citation of benchmarks/NOTES.md by an entry's name names an entry there (its heading or
    a part of it, case aside), so that a renamed entry does not leave a reader with a name to
    search for in vain."""
    entries = _notes_entries()
    cited = _cited_entries()
    assert len(cited) > 20  # the pattern still finds the citations
    missing = [(path, name) for path, name in cited
               if not any(name.lower() in entry for entry in entries)]
    assert missing == []
