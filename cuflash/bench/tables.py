"""The sweeps' records as aligned text tables; reasons an implementation did not run become
numbered footnotes, so that the cells stay narrow."""

from __future__ import annotations

from cuflash.bench.sweeps import IMPLEMENTATIONS, cuflash_over

__all__ = ["format_dense_table", "format_sparse_table"]


class _Footnotes:
    """Numbers the reasons an implementation could not run, so table cells stay narrow."""

    def __init__(self):
        self.reasons: dict[str, int] = {}

    def cell(self, record, name, table="tflops", digits=1):
        value = record[table].get(name)
        if value is not None:  # small values (the CPU path) keep three significant digits
            return f"{value:.{digits}f}" if value >= 10**(2 - digits) else f"{value:.3g}"
        note = record["notes"].get(name, "n/a")
        reason = note[len("n/a ("):-1] if note.startswith("n/a (") else note
        return f"n/a [{self.reasons.setdefault(reason, len(self.reasons) + 1)}]"

    def lines(self):
        return [f"[{i}] {reason}" for reason, i in self.reasons.items()]


def _format(header, rows, footnotes):
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths))
             for row in [header, *rows]]
    return "\n".join(lines + footnotes.lines())


# Every ratio column is cuflash's TFLOP/s over a baseline's (sweeps.cuflash_over): the
# baseline's time over cuflash's, the way the performance targets are stated.
RATIOS = "cuflash/X = X's time / cuflash's, above 1: cuflash is faster"
DENSE_RATIOS = {"sdpa-flash": "cuflash/flash", "sdpa-cudnn": "cuflash/cudnn",
                "flex": "cuflash/flex"}


def _ratio_cell(record, baseline):
    """cuflash over ``baseline`` on this row, or "-" where either did not run."""
    ratio = cuflash_over(record, baseline)
    if ratio is None:
        return "-"
    # two decimals; below 0.1 three significant digits (the CPU's ratios), not "0.01" or "0.00"
    return f"{ratio:.2f}" if ratio >= 0.1 else f"{ratio:.3g}"


def format_dense_table(records) -> str:
    """The dense sweep as an aligned text table of TFLOP/s, with cuflash over each baseline."""
    notes = _Footnotes()
    header = ["mode", "causal", "D", "N", "B", "H", *IMPLEMENTATIONS, *DENSE_RATIOS.values()]
    rows = [[r["mode"], "yes" if r["causal"] else "no", r["head_dim"], r["seq_len"], r["batch"],
             r["heads"], *(notes.cell(r, name) for name in IMPLEMENTATIONS),
             *(_ratio_cell(r, baseline) for baseline in DENSE_RATIOS)]
            for r in records]
    return f"TFLOP/s (median of the timed runs); {RATIOS}\n" + _format(header, rows, notes)


def format_sparse_table(records) -> str:
    """The block-sparse sweep: time and effective TFLOP/s of cuflash and FlexAttention."""
    notes = _Footnotes()
    header = ["mode", "mask", "density", "cuflash ms", "cuflash TFLOP/s", "flex ms",
              "flex TFLOP/s", "cuflash/flex"]
    rows = [[r["mode"], r["mask"], f"{r['density']:.3f}",
             notes.cell(r, "cuflash", "time_ms", 3), notes.cell(r, "cuflash"),
             notes.cell(r, "flex", "time_ms", 3), notes.cell(r, "flex"), _ratio_cell(r, "flex")]
            for r in records]
    return ("effective TFLOP/s = dense FLOPs × kept fraction / time (median of the timed runs); "
            f"{RATIOS}\n" + _format(header, rows, notes))
