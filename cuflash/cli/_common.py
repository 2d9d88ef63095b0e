"""What the commands share: choosing the device, errors, number formatting, plotting."""

from __future__ import annotations

import contextlib
import json
import logging
import sys

import click

from cuflash import _bench
from cuflash._bench import format_bytes as size

log = logging.getLogger("cuflash.cli")


class NotEnoughMemory(click.ClickException):
    """A request that cannot fit the device: says what it needs and what is free. Exit status 3."""

    exit_code = 3


def choose_device(requested: str, *, quiet: bool = False):
    """The device for ``--device``; says on stderr which one was used and why."""
    try:
        device, note = _bench.select_device(requested)
    except _bench.Unavailable as error:
        raise click.BadParameter(str(error), param_hint="--device") from error
    if not quiet:
        click.echo(f"device: {device.name} — {device.description}"
                   + (f" ({note})" if note else ""), err=True)
    return device


def require_fit(device, needed: int, what: str):
    """Raise NotEnoughMemory when ``needed`` bytes exceed what ``device`` has free."""
    free = device.free_bytes()
    log.info("%s needs about %s; %s free on the %s", what, size(needed), size(free), device.name)
    if needed > free:
        raise NotEnoughMemory(
            f"{what} needs about {size(needed)} of {device.name} memory, but only {size(free)} "
            "is free; use fewer tokens, heads or rows")


@contextlib.contextmanager
def translate_errors(device):
    """Turn the library's complaints about the request (ValueError, whose message names the
    value) into usage errors (exit status 2) and running out of device memory into
    NotEnoughMemory (exit status 3), never a traceback."""
    try:
        yield
    except device.out_of_memory as error:
        raise NotEnoughMemory(f"out of {device.name} memory: {error}") from error
    except ValueError as error:
        raise click.UsageError(str(error)) from error


def seconds(t: float) -> str:
    return f"{t * 1e3:.3f} ms" if t < 1 else f"{t:.2f} s"


def tokens(n: int) -> str:
    """``16384`` → ``16K`` when exact, else with a thousands separator."""
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 2**20}M" if n % 2**20 == 0 else f"{n // 1024}K"
    return f"{n:,}"


def echo_json(record) -> None:
    click.echo(json.dumps(record, indent=None, allow_nan=False, default=_json_default))


def _json_default(value):
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def pyplot_or_fail():
    """matplotlib.pyplot with a file-only back end, or a clear message on how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise click.ClickException(
            "--plot needs matplotlib, which is not installed: pip install 'cuflash[plot]'"
        ) from error
    return plt


def progress(length: int, label: str):
    """A progress bar on stderr (a single label line when stderr is not a terminal)."""
    return click.progressbar(length=length, label=label, file=sys.stderr)
