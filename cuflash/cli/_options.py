"""Options shared by several commands, as decorators, and the parameter types they need."""

from __future__ import annotations

import decimal
import os

import click

from cuflash.bench.problems import DTYPES


# NumPy and CuPy sizes are int64: no larger count can be a length, a number of heads or of
# runs. Refusing it up front keeps the estimates, which work in floating point, from overflowing.
INT64_MAX = 2**63 - 1


class TokenCount(click.ParamType):
    """A token count of at least ``minimum`` (positive by default) and at most ``maximum`` (no
    limit by default): ``16384``, ``16K`` or ``16k`` (×1024), ``1M`` (×1024²), ``1.5K``, ``1e6``
    — any spelling of a whole number."""

    name = "N"
    _suffixes = {"k": 2**10, "m": 2**20}

    def __init__(self, minimum: int = 1, maximum: int | None = None):
        self.minimum = minimum
        self.maximum = maximum

    def convert(self, value, param, ctx):
        if isinstance(value, int) and not isinstance(value, bool):
            count = value
        else:
            text = str(value).strip().lower()
            factor = self._suffixes.get(text[-1:], 1)
            digits = text[:-1] if factor > 1 else text
            try:
                number = decimal.Decimal(digits) * factor
            except decimal.Overflow:  # past decimal's exponent range (1e99999999)
                self.fail(self._too_large(value), param, ctx)
            except decimal.InvalidOperation:
                number = None
            if number is None or not number.is_finite() or number != number.to_integral_value():
                self.fail(f"{value!r} is not a whole number of tokens (examples: 4096, 16K, 1M)",
                          param, ctx)
            # Compared before the conversion: int() of 1e999999 builds a million-digit number.
            if self.maximum is not None and number > self.maximum:
                self.fail(self._too_large(value), param, ctx)
            count = int(number)
        if count < self.minimum:
            self.fail(f"must be at least {self.minimum}, got {value!r}", param, ctx)
        if self.maximum is not None and count > self.maximum:
            self.fail(self._too_large(value), param, ctx)
        return count

    def _too_large(self, value) -> str:
        if self.maximum is None:
            return f"{value!r} is too large a number of tokens"
        return f"must be at most {self.maximum:,}, got {value!r}"


class OutputFile(click.ParamType):
    """A file to write: its directory must exist and be writable, it must not be a directory,
    and a file already there must be writable. Checked when the command starts, so that a long
    run never ends on a bad path."""

    name = "FILE"

    def __init__(self, suffix: str = ""):
        self.suffix = suffix
        if suffix:
            self.name = f"FILE{suffix}"

    def convert(self, value, param, ctx):
        path = os.fspath(value)
        if not path or path.endswith(tuple(filter(None, (os.sep, os.altsep)))):
            self.fail(f"{path!r} has no file name; give one such as "
                      f"{os.path.join(path, 'out' + self.suffix)!r}", param, ctx)
        # where the file is written: through a symbolic link, beside the file it names
        directory = os.path.dirname(os.path.realpath(path))
        if os.path.isdir(path):
            self.fail(f"{path!r} is a directory; give a file name such as "
                      f"{os.path.join(path, 'out' + self.suffix)!r}", param, ctx)
        if not os.path.isdir(directory):
            self.fail(f"cannot write {path!r}: directory {os.path.dirname(path) or directory!r} "
                      "does not exist", param, ctx)
        if not os.access(directory, os.W_OK):
            self.fail(f"cannot write {path!r}: directory {directory!r} is not writable",
                      param, ctx)
        # a file already there is replaced only where open() could write it (write_file)
        if os.path.exists(path) and not os.access(os.path.realpath(path), os.W_OK):
            self.fail(f"cannot write {path!r}: the file is there and not writable", param, ctx)
        return path


class CommaList(click.ParamType):
    """A comma-separated list of distinct values of another type: ``1K,2K,4K``."""

    def __init__(self, item: click.ParamType, name: str):
        self.item = item
        self.name = name

    def convert(self, value, param, ctx):
        if isinstance(value, (list, tuple)):
            return tuple(value)
        items = [part for part in str(value).split(",") if part.strip()]
        if not items:
            self.fail("give at least one value", param, ctx)
        values = tuple(self.item.convert(part.strip(), param, ctx) for part in items)
        for i, value in enumerate(values):
            if value in values[:i]:
                self.fail(f"{value!r} is given twice ({', '.join(map(str.strip, items))})",
                          param, ctx)
        return values


class Fraction(click.FloatRange):
    """A number in (0, 1]; ``nan``, which click's range comparisons let through, is refused."""

    name = "X"

    def __init__(self):
        super().__init__(0, 1, min_open=True)

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number != number:
            self.fail(f"{value!r} is not in the range 0<x<=1.", param, ctx)
        return number


class Count(click.IntRange):
    """A whole number of at least ``minimum`` that fits int64 (a number of heads, of runs...)."""

    def __init__(self, minimum: int):
        super().__init__(min=minimum)

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if number > INT64_MAX:
            self.fail(f"must be at most {INT64_MAX:,}, got {value!r}", param, ctx)
        return number


class RowCount(click.ParamType):
    """A number of query rows to check, or ``all``."""

    name = "K|all"

    def convert(self, value, param, ctx):
        if value is None or value == "all":
            return None
        try:
            count = int(value)
        except (TypeError, ValueError):
            self.fail(f"must be a positive number of rows or 'all', got {value!r}", param, ctx)
        if count < 1:
            self.fail(f"must be a positive number of rows or 'all', got {value!r}", param, ctx)
        return count


TOKENS = TokenCount()  # no upper limit: `mask show` refuses lengths past int64 itself
BOUNDED_TOKENS = TokenCount(maximum=INT64_MAX)  # what check, memory and bench can run
LENGTH = TokenCount(minimum=0, maximum=INT64_MAX)  # a window's or a prefix's length, maybe 0
POSITIVE = Count(1)
COUNT = Count(0)


def _dtype_callback(ctx, param, value):
    return DTYPES[value]


def heads_option(default):
    return click.option("--heads", type=POSITIVE, default=default, show_default=True,
                        metavar="H", help="Attention heads.")


def head_dim_option(default):
    return click.option("--head-dim", type=POSITIVE, default=default, show_default=True,
                        metavar="D", help="Size of each head.")


def batch_option(default=1):
    return click.option("--batch", type=POSITIVE, default=default, show_default=True,
                        metavar="B", help="Batch size.")


dtype_option = click.option(
    "--dtype", type=click.Choice(list(DTYPES)), default="bfloat16", show_default=True,
    callback=_dtype_callback, help="Element type of q, k and v.")

causal_option = click.option(
    "--causal/--no-causal", default=False, show_default=True,
    help="Causal masking (query i sees keys 0..i).")

device_option = click.option(
    "--device", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True,
    help="Where to run: the GPU kernels (CuPy arrays), the NumPy path, or the GPU when usable.")

seed_option = click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
                           metavar="INT", help="Seed of every random choice.")

json_option = click.option("--json", "as_json", is_flag=True,
                           help="Print one JSON record on stdout and nothing else there.")

plot_option = click.option(
    "--plot", type=OutputFile(".png"), default=None, metavar="FILE",
    help="Also draw the results into this file: a PNG, or the format its name ends in (.svg, "
         ".pdf...) (needs matplotlib: pip install 'cuflash[plot]').")

force_option = click.option(
    "--force", is_flag=True,
    help="Run even when the estimate says it takes more than 30 minutes.")


def pattern_parameter_options(f):
    """The parameters of the sparse patterns (see ``cuflash mask list``); each pattern reads
    only its own and rejects the others."""
    from cuflash.cli._patterns import PARAMETERS, default_text
    for name, (kind, text) in reversed(list(PARAMETERS.items())):
        option_type, metavar = {"tokens": (BOUNDED_TOKENS, "N"), "length": (LENGTH, "N"),
                                "count": (COUNT, "INT"), "positive": (POSITIVE, "INT"),
                                "fraction": (Fraction(), "X")}[kind]
        f = click.option(f"--{name}", type=option_type, default=None, metavar=metavar,
                         help=f"{text}  [default: {default_text(name)}]")(f)
    # BlockMask and the NumPy path take any block size; only the GPU kernels, which walk the
    # mask in their own tiles, need a multiple of them (docs/sparse.md).
    return click.option("--block-size", type=POSITIVE, default=128, show_default=True,
                        metavar="N",
                        help="Block size of the block mask, in tokens. The CPU path takes any "
                             "size; the GPU kernels need a multiple of their tiles, which a "
                             "multiple of 64 always is.")(f)
