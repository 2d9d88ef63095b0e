"""Packed sequences whose keys and values live in a paged cache (flash-attn's
``flash_attn_varlen_func(..., block_table=...)``).

Sequence ``b``'s key ``j`` is in page ``block_table[b, j // page_size]``, at offset
``j % page_size`` (``page_slots``, the rule the KV-cache calls use too). The keys and values the
sequences use are gathered into packed rows, ``(total_k, Hkv, D)`` as ``cu_seqlens_k`` lays them
out, and the call then runs as an unpaged one: one copy of the used keys and values, and the
offsets read on the host to size it.
"""

from __future__ import annotations

from typing import Any

import numpy

from . import _checks
from ._kvcache_spec import _check_index_array as check_index_array, page_slots


def host_key_offsets(cu_seqlens_k: Any, max_seqlen_k: int):
    """``cu_seqlens_k`` on the host (int64), checked: a paged call sizes its gather by them. CuPy
    offsets are read back (a synchronisation)."""
    host = _checks.host_offsets(cu_seqlens_k)
    _checks.check_offset_values(host, "cu_seqlens_k", int(host[-1]), "max_seqlen_k", max_seqlen_k)
    return host


def check_pages(q: Any, k_pages: Any, v_pages: Any) -> None:
    """Paged caches ``(num_pages, page_size, Hkv, D)`` / ``(num_pages, page_size, Hkv, Dv)``,
    whose heads and head dimension pair with those of a packed q ``(total_q, Hq, D)`` (checked
    here, the empty axes too, so that a refusal shows the pages as given rather than the rows
    gathered from them; any other q is refused by the packed call)."""
    layout = "(num_pages, page_size, Hkv, {})"
    for name, x, last in (("k", k_pages, "D"), ("v", v_pages, "Dv")):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"with a block_table, {name} is a paged cache {layout.format(last)}, "
                             f"got shape {tuple(getattr(x, 'shape', ()))}")
    if tuple(k_pages.shape[:3]) != tuple(v_pages.shape[:3]):
        raise ValueError(f"with a block_table, v must match k in its first three axes "
                         f"{layout.format('Dv')}, got k {tuple(k_pages.shape)} and v "
                         f"{tuple(v_pages.shape)}")
    for name, x in (("k", k_pages), ("v", v_pages)):
        if 0 in x.shape:
            raise ValueError(f"with a block_table, {name} must not have an empty axis (at least "
                             f"one page of at least one key, one head and a head dimension of "
                             f"at least 1), got shape {tuple(x.shape)}")
    if getattr(q, "ndim", None) == 3 and 0 not in q.shape[1:]:
        _checks._check_qk_pairing(q, k_pages, q.shape[2], k_pages.shape[3], q.shape[1],
                                  k_pages.shape[2])


def check_table(host_offsets, table, page_size: int, num_pages: int) -> None:
    """The pages each sequence uses (``table`` on the host) are listed in its row of the table and
    exist; entries past them are not read."""
    lengths = numpy.diff(host_offsets)
    needed = -(-lengths // page_size)
    if needed.size and needed.max() > table.shape[1]:
        b = int(numpy.argmax(needed))
        raise ValueError(f"block_table has {table.shape[1]} page{'s' * (table.shape[1] != 1)} per "
                         f"sequence, but sequence {b} has {int(lengths[b])} keys: "
                         f"{int(needed[b])} pages of {page_size}")
    used = numpy.arange(table.shape[1]) < needed[:, None]
    bad = numpy.argwhere(used & ((table < 0) | (table >= num_pages)))
    if bad.size:
        b, column = (int(i) for i in bad[0])
        raise ValueError(f"block_table[{b}, {column}] = {int(table[b, column])} is not a page of k "
                         f"(it holds {num_pages}: 0 … {num_pages - 1})")


def used_rows(host_offsets, table, page_size: int):
    """The row of every packed key in the pages laid end to end (``page · page_size + offset``),
    sequence by sequence: NumPy int64, computed page by page (a sequence's keys are the first of
    its pages' rows), where key by key the table's lookups would be ``page_size`` times as many.
    Sized by the keys used, not by the rows of the pages used (a large page, shared by many
    sequences, holds far more rows than they use)."""
    lengths = numpy.diff(host_offsets)
    needed = -(-lengths // page_size)
    page_starts = numpy.cumsum(needed) - needed  # each sequence's first page among those used
    sequence_of_page = numpy.repeat(numpy.arange(lengths.size), needed)
    first_keys = (numpy.arange(int(needed.sum())) - numpy.repeat(page_starts, needed)) * page_size
    pages, _ = page_slots(numpy.asarray(table), sequence_of_page, first_keys, page_size)
    keys = numpy.minimum(numpy.repeat(lengths, needed) - first_keys, page_size)  # in each page
    first_rows = numpy.repeat(host_offsets[:-1], needed) + first_keys  # packed row of its first
    return numpy.repeat(pages * page_size - first_rows, keys) + numpy.arange(int(host_offsets[-1]))


def key_rows(cu_seqlens_k: Any, table, max_seqlen_k: int, page_size: int, num_pages: int):
    """``used_rows`` of a call: from ``cu_seqlens_k`` (NumPy, or CuPy read back) and the table
    on the host, both checked first (``host_key_offsets``, ``check_table``)."""
    host = host_key_offsets(cu_seqlens_k, max_seqlen_k)
    check_table(host, table, page_size, num_pages)
    return used_rows(host, table, page_size)


def page_shapes(q: Any, k_pages: Any, v_pages: Any, batch: int, max_q: int, max_k: int):
    """The ``Shapes`` of a paged call, its pages checked first (``check_pages``): those of
    ``_checks.varlen_shapes`` with a row of each page standing for the packed keys and values,
    whose heads and head dimensions they have (the rows are counted once the offsets are
    read)."""
    check_pages(q, k_pages, v_pages)
    return _checks.varlen_shapes(q, k_pages[:, 0], v_pages[:, 0], batch, max_q, max_k)


def check_query_offsets(cu_seqlens_q: Any, q: Any, max_seqlen_q: int) -> None:
    """The values of ``cu_seqlens_q`` (NumPy, or CuPy read back) against q's rows and the checked
    ``max_seqlen_q``: a paged call checks them before the key offsets and the table are read, in
    the packed call's order, so that a call refused for them gathers nothing."""
    _checks.check_offset_values(_checks.host_offsets(cu_seqlens_q), "cu_seqlens_q",
                                int(q.shape[0]), "max_seqlen_q", max_seqlen_q)


def gather_pages(q, k_pages, v_pages, cu_seqlens_q, cu_seqlens_k, max_lengths, block_table,
                 check_offsets):
    """Packed ``(k, v, hosts)``: k ``(total_k, Hkv, D)`` and v ``(total_k, Hkv, Dv)`` gathered
    from the pages the block table lists for each sequence, once the call's other arguments are
    checked (``_api._varlen_checks`` with ``page_shapes``; ``max_lengths``: the checked
    ``(max_seqlen_q, max_seqlen_k)``), and ``hosts`` the offsets ``(cu_seqlens_q,
    cu_seqlens_k)`` on the host. Both are read before the gather, for the packed call to check
    (``_checks.checked_offsets``): read after it, they would wait for its copy. The query
    offsets are checked here too, before the key offsets and the table, in the packed call's
    order: a call refused for them gathers nothing, and raises what the packed call raises."""
    xp = _checks.array_module(q)
    check_index_array("block_table", block_table, (cu_seqlens_k.shape[0] - 1, None), xp, q)
    if xp is not numpy and not check_offsets:
        raise ValueError(
            "a block_table is read on the host, with cu_seqlens_k, to gather each sequence's "
            "keys, so check_offsets=False (no read-back from the device) cannot be kept: pass "
            "check_offsets=True")
    max_q, max_k = max_lengths
    table = numpy.asarray(_checks._host_values(block_table))
    page_size, num_pages = int(k_pages.shape[1]), int(k_pages.shape[0])
    hosts = _checks.host_offsets(cu_seqlens_q), _checks.host_offsets(cu_seqlens_k)
    check_query_offsets(hosts[0], q, max_q)
    rows = key_rows(hosts[1], table, max_k, page_size, num_pages)
    with _checks.device_context(q):
        rows = xp.asarray(rows)
        return _rows_of(k_pages, rows, xp), _rows_of(v_pages, rows, xp), hosts


def _rows_of(pages: Any, rows: Any, xp) -> Any:
    """Rows ``rows`` of the pages laid end to end: one take over the pages viewed as
    ``(num_pages · page_size, Hkv, D)`` where their first two axes allow that view (a copy of the
    whole cache otherwise, avoided by indexing page and row apart). Rows of whole 16-byte words
    are taken as such (complex128 elements): a copy of bits, an eighth of the elements to index."""
    if pages.strides[0] != pages.shape[1] * pages.strides[1]:
        return pages[rows // pages.shape[1], rows % pages.shape[1]]
    flat = pages.reshape((-1,) + pages.shape[2:])
    if (xp is not numpy and flat.flags.c_contiguous and flat[0].nbytes % 16 == 0
            and flat.data.ptr % 16 == 0):
        words = flat.reshape(flat.shape[0], -1).view(xp.complex128)
        return xp.take(words, rows, axis=0).view(pages.dtype).reshape((-1,) + pages.shape[2:])
    return xp.take(flat, rows, axis=0)
