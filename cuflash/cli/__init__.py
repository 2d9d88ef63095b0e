"""The ``cuflash`` command: check, measure and inspect cuflash on this machine.

Each command parses its options, calls the library and prints; the work lives in the library
(``cuflash``, ``cuflash.sparse``, ``cuflash.check``, ``cuflash.bench``) and in the small
helpers next to the commands. See docs/cli.md.
"""

from __future__ import annotations

import logging

import click

import cuflash
from cuflash.cli.bench import bench
from cuflash.cli.check import check
from cuflash.cli.info import info
from cuflash.cli.mask import mask
from cuflash.cli.memory import memory

__all__ = ["main"]


class _EchoHandler(logging.Handler):
    """Log records on the current stderr (which changes under tests), through click."""

    def emit(self, record):
        click.echo(self.format(record), err=True)


def _configure_logging(verbosity: int) -> None:
    logger = logging.getLogger("cuflash")
    if not any(isinstance(h, _EchoHandler) for h in logger.handlers):
        handler = _EchoHandler()
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING - 10 * min(verbosity, 2))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(cuflash.__version__, "--version", prog_name="cuflash",
                      message="%(prog)s %(version)s")
@click.option("-v", "--verbose", count=True,
              help="Say more on stderr (-v: steps and estimates, -vv: debugging detail).")
@click.pass_context
def main(ctx, verbose):
    """Exact FlashAttention for CuPy and NumPy: check it, measure it, look at block masks.

    \b
      cuflash info                      versions, the GPU, and which paths can run here
      cuflash check                     Path-X: 16K tokens against float64, PASS or FAIL
      cuflash check --path-256          Path-256: 64K tokens
      cuflash check --gpus 2            Path-X sharded across 2 GPUs (ring attention)
      cuflash memory --plot mem.png     peak memory against sequence length
      cuflash bench                     TFLOP/s next to torch SDPA and FlexAttention
      cuflash mask show image-local     a block mask, drawn in the terminal

    Every command takes --help, with examples.
    """
    ctx.ensure_object(dict)
    ctx.obj["verbosity"] = verbose
    _configure_logging(verbose)


for _command in (info, check, memory, bench, mask):
    main.add_command(_command)
