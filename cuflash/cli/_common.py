"""What the commands share: choosing the device, estimates and refusals, errors, progress,
number formatting, plotting."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys

import click
import click.core

from cuflash._files import write_atomically
from cuflash.bench.devices import Unavailable, select_device
from cuflash.bench.devices import format_bytes as size

log = logging.getLogger("cuflash.cli")


# A long request: above WARN_SECONDS the estimate says so (and that Ctrl-C stops it); above
# REFUSE_SECONDS the command refuses unless --force is given.
WARN_SECONDS = 60
REFUSE_SECONDS = 30 * 60


class NotEnoughMemory(click.ClickException):
    """A request that cannot fit the device: says what it needs and what is free. Exit status 3."""

    exit_code = 3


class TooLong(click.ClickException):
    """A request estimated to run longer than REFUSE_SECONDS without --force. Exit status 3."""

    exit_code = 3


class Interrupted(click.ClickException):
    """Ctrl-C: the command stopped where it was, without a traceback. Exit status 130."""

    exit_code = 130


def given_options(ctx: click.Context) -> set:
    """The names of the parameters the user gave (on the command line or through the
    environment), not left at their defaults: what a command may refuse to ignore."""
    return {name for name in ctx.params
            if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}


def choose_device(requested: str):
    """``(device, reason)`` for ``--device``; says on stderr which device is used and, when
    ``auto`` fell back to the CPU, why (``reason``, empty otherwise)."""
    try:
        device, note = select_device(requested)
    except Unavailable as error:
        raise click.BadParameter(str(error), param_hint="--device") from error
    click.echo(f"device: {device.name} — {device.description}"
               + (f" ({note})" if note else ""), err=True)
    return device, note


def duration(t: float) -> str:
    """Seconds in words for an estimate: ``under a second``, ``about 40 s``, ``about 12 min``,
    ``about 3.5 h``."""
    if t < 1:
        return "under a second"
    if t < 100:
        return f"about {t:.0f} s"
    if t < 100 * 60:
        return f"about {t / 60:.0f} min"
    if t < 48 * 3600:
        return f"about {t / 3600:.1f} h"
    return f"about {t / 86400:,.0f} days"


def require_reasonable(device, *, seconds: float, needed: int, what: str, force: bool,
                       smaller: str, quiet: bool = False,
                       each: dict[str, int] | None = None) -> None:
    """Check an estimate before a long request runs, and say it on stderr.

    Memory: raise NotEnoughMemory (exit status 3) when ``needed`` bytes exceed what ``device``
    has free. Time: raise TooLong (exit status 3) above REFUSE_SECONDS unless ``force``, and warn
    above WARN_SECONDS. ``smaller`` says how to ask for less (it ends both messages);
    ``quiet`` leaves out the estimate when nothing is wrong. ``each``: the memory of each
    sequence length of a sweep (label → bytes; ``needed`` is what the first needs), which the
    estimate gives one length a line when there are several, marking those that need more than
    is free.
    """
    free = device.free_bytes()
    log.info("%s needs about %s; %s free on the %s", what, size(needed), size(free), device.name)
    where = "CPU (NumPy path)" if device.name == "cpu" else "GPU"
    if needed > free:
        raise NotEnoughMemory(
            f"{what} needs about {size(needed)} of {device.name} memory, but only {size(free)} "
            f"is free; {smaller}")
    if seconds > REFUSE_SECONDS and not force:
        raise TooLong(
            f"{what} would take {duration(seconds)} on the {where}, over the "
            f"{REFUSE_SECONDS // 60} min this command runs without asking; {smaller}, or add "
            "--force to run it anyway")
    several = each is not None and len(each) > 1
    memory = "memory of each length below" if several else f"{size(needed)} of memory"
    line = f"estimate: {duration(seconds)} on the {where}, {memory} ({size(free)} free)"
    if seconds > WARN_SECONDS:
        line += "; Ctrl-C stops it"
    elif quiet:
        return
    click.echo(line, err=True)
    if several:
        width = max(map(len, each))
        sizes = {label: size(nbytes) for label, nbytes in each.items()}
        size_width = max(map(len, sizes.values()))
        for label, nbytes in each.items():
            click.echo(f"  {label.rjust(width)}: {sizes[label].rjust(size_width)}"
                       + ("  more than is free" if nbytes > free else ""), err=True)


def interrupted_with_results(what: str, as_json: bool) -> Interrupted:
    """The error that ends a sweep stopped by Ctrl-C once its results (``what``: "rows",
    "lengths") are printed: a table, or with --json the record, whose "stopped" says where."""
    printed = 'the record (its "stopped" says where)' if as_json else "the table above"
    return Interrupted(f"interrupted by Ctrl-C; {printed} holds the {what} measured before it")


@contextlib.contextmanager
def stop_on_ctrl_c(what: str):
    """Turn Ctrl-C into a one-line message and exit status 130 instead of a traceback."""
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted by Ctrl-C; {what}") from None


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


def _plot_format(path: str) -> str:
    """The format of a --plot file, read from its name as matplotlib reads it (PNG without)."""
    return os.path.splitext(path)[1][1:].lower() or "png"


def pyplot_or_fail(path: str | None = None):
    """matplotlib.pyplot with a file-only back end, or a clear message on how to get it. The
    format of ``path`` (--plot) is checked here, before the run, not when the plot is saved."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError as error:
        raise click.ClickException(
            "--plot needs matplotlib, which is not installed: pip install 'cuflash[plot]'"
        ) from error
    supported = FigureCanvasBase.get_supported_filetypes()
    if path is not None and _plot_format(path) not in supported:
        raise click.BadParameter(
            f"matplotlib cannot write {path!r} ({_plot_format(path)!r} is no format it knows); "
            f"give a name ending in one of {', '.join('.' + k for k in sorted(supported))}",
            param_hint="--plot")
    return plt


def save_figure(plt, figure, path: str) -> None:
    """Write a matplotlib figure to ``path`` (as given to --plot), whole or not at all
    (``write_file``), and say so on stderr."""
    figure.tight_layout()
    picture = io.BytesIO()
    # Rendered in memory, so matplotlib no longer reads the format from the name: say it.
    try:
        figure.savefig(picture, format=_plot_format(path), dpi=120)
    finally:
        plt.close(figure)
    write_file(path, picture.getvalue(), "--plot")
    click.echo(f"plot written to {path}", err=True)


class _NoBar:
    """What ``progress`` gives when no bar is drawn: a context whose ``update`` does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, steps: int) -> None:
        pass


def progress(length: int, label: str, *, enabled: bool = True):
    """A progress bar on stderr, or nothing at all when ``enabled`` is false (``--json``) or
    stderr is not a terminal (a log file, a pipe, a test)."""
    if not enabled or not sys.stderr.isatty():
        return _NoBar()
    return click.progressbar(length=length, label=label, file=sys.stderr)


def write_file(path: str, data: bytes, option: str) -> None:
    """Write ``data`` to ``path`` whole or not at all (``cuflash._files.write_atomically``): the
    one way the commands write a file. An OSError becomes a one-line error naming the option.
    A symbolic link is written through, as open() would: the new file is renamed over the file
    it names, not over the link."""
    try:
        write_atomically(os.path.realpath(path), data)
    except OSError as error:
        raise click.ClickException(f"{option} {path}: cannot write it ({error.strerror or error})"
                                   ) from error
