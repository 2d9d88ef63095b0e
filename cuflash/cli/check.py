"""``cuflash check``: the Path-X check — long inputs against a float64 reference, PASS or FAIL."""

from __future__ import annotations

import math

import click
import click.core

from cuflash.check import verify
from cuflash.check.pathfinder import MIN_SIDE, pathfinder_qkv, random_qkv
from cuflash.cli._common import (choose_device, duration, echo_json, log, progress,
                                 require_reasonable, seconds, size, stop_on_ctrl_c, tokens,
                                 translate_errors)
from cuflash.cli._options import (TOKENS, POSITIVE, RowCount, causal_option, device_option,
                                  dtype_option, force_option, head_dim_option, heads_option,
                                  json_option, pattern_parameter_options, seed_option)
from cuflash.cli._patterns import PATTERNS, build_cost, build_mask, pattern_parameters

PATH_X, PATH_256 = 128 * 128, 256 * 256
# Without a GPU the NumPy path checks this many tokens unless --seq-len or --path-256 asks
# otherwise: a 64×64 image, seconds on an ordinary CPU, where Path-X takes about a minute.
CPU_SEQ_LEN = 64 * 64
MIN_PATHFINDER_TOKENS = (MIN_SIDE - 1) ** 2 + 1  # the smallest length with an 8×8 image

EXAMPLES = """\b
Examples:
  cuflash check                                  Path-X: 16K tokens, 128×128 image
  cuflash check --path-256                       Path-256: 64K tokens, 256×256 image
  cuflash check --pattern image-local --radius 8 block-sparse 2-D neighbourhood
  cuflash check --causal --dtype float16 --rows all --seq-len 4K
  cuflash check --device cpu --seq-len 1024 --heads 2 --json

\b
Without a GPU the check runs on the CPU (NumPy path) at 4K tokens, which takes seconds;
--seq-len 16K asks for Path-X's full size there.

\b
Exit status: 0 PASS, 1 FAIL, 2 bad options, 3 does not fit in memory or would take over
30 minutes (--force runs it anyway), 130 interrupted by Ctrl-C.
"""


def _seq_len(seq_len, path_256):
    """The length asked for, or None when neither --seq-len nor --path-256 was given."""
    if path_256 and seq_len not in (None, PATH_256):
        raise click.BadParameter(f"--path-256 means 65536 tokens; it cannot go with --seq-len "
                                 f"{seq_len}", param_hint="--seq-len")
    return PATH_256 if path_256 else seq_len


def _check_mask_options(pattern, given, block_size_given):
    if pattern != "dense":
        return
    for option, value in given.items():
        if value is not None:
            raise click.BadParameter("applies to sparse patterns; add --pattern NAME",
                                     param_hint=f"--{option}")
    if block_size_given:
        raise click.BadParameter("applies to sparse patterns; add --pattern NAME",
                                 param_hint="--block-size")


def _cpu_length(target, reason, asked, heads, head_dim, dtype, rows, backward):
    """The length to check on the CPU when none was asked for, saying why on stderr."""
    if asked is not None:
        return asked
    full = verify.estimate_seconds(target, PATH_X, heads, head_dim, dtype, rows,
                                   backward=backward)
    why = "--device cpu was given" if not reason else "the GPU kernels cannot run here"
    click.echo(f"note: running on the CPU (cuflash's NumPy path): {why}. Path-X's 16K tokens "
               f"would take {duration(full)} here, so this check uses "
               f"{tokens(CPU_SEQ_LEN)} tokens (a 64×64 image); --seq-len 16K asks for the full "
               "size.", err=True)
    return CPU_SEQ_LEN


@click.command(short_help="Path-X check: long inputs against float64, PASS or FAIL.",
               epilog=EXAMPLES)
@click.option("--seq-len", type=TOKENS, default=None,
              help="Tokens [default: 16K on the GPU, 4K on the CPU]. The image is the smallest "
                   "square with that many pixels, read row by row and cut after N of them.")
@click.option("--path-256", is_flag=True, help="65,536 tokens: a 256×256 image.")
@heads_option(8)
@head_dim_option(64)
@dtype_option
@causal_option
@click.option("--pattern", type=click.Choice(["dense", *PATTERNS]), default="dense",
              show_default=True, metavar="NAME",
              help="dense, or a block-sparse pattern: " + ", ".join(PATTERNS)
                   + " (cuflash mask list describes them).")
@pattern_parameter_options
@click.option("--inputs", type=click.Choice(["pathfinder", "random"]), default="pathfinder",
              show_default=True,
              help="q, k, v projected from a Pathfinder-style image, or plain normal noise.")
@click.option("--backward/--no-backward", default=True, show_default=True,
              help="Also run and check the backward pass.")
@device_option
@click.option("--rows", type=RowCount(), default="256", show_default=True,
              help="Query rows compared with float64 (sampled, always with the first and last), "
                   "or 'all'.")
@click.option("--repeats", type=POSITIVE, default=10, show_default=True,
              help="Timed runs on the GPU (the median is shown); the CPU times its one run.")
@seed_option
@force_option
@json_option
@click.pass_context
def check(ctx, seq_len, path_256, heads, head_dim, dtype, causal, pattern, block_size, inputs,
          backward, device, rows, repeats, seed, force, as_json, **pattern_options):
    """Run cuflash on long inputs and check it against a float64 reference.

    The inputs are those of Path-X: a 128×128 Pathfinder-style image (two markers, joined or
    not by a dashed curve, among distractor curves) read pixel by pixel, 16,384 tokens; each
    token's q, k and v are a seeded projection of its pixel value and its 2-D position, so
    attention is sharp and depends on where pixels are, unlike attention over noise.

    The forward output is compared on --rows sampled query rows with float64 attention on the
    same rows. For the backward pass the output gradient is random on those rows and zero on
    the others: dq, dk and dv then have an exact float64 reference that needs only those rows.
    A result passes when its largest error is at most twice the error of a plain implementation
    in the same precision on the same rows, plus 1e-5.

    Before it starts, the check estimates its time and memory: it stops (exit status 3) when
    the memory is not free, or when it would take over 30 minutes unless --force is given.

    Prints time, TFLOP/s (4·H·N²·D forward, half when causal, times the kept fraction of a
    block mask; backward 2.5 times that) and peak memory (inputs included), then PASS or FAIL.
    """
    asked = _seq_len(seq_len, path_256)
    given = {name.replace("_", "-"): value for name, value in pattern_options.items()}
    explicit = lambda name: (ctx.get_parameter_source(name)  # noqa: E731
                             != click.core.ParameterSource.DEFAULT)
    _check_mask_options(pattern, given, explicit("block_size"))
    parameters = pattern_parameters(pattern, given) if pattern != "dense" else {}
    if inputs == "pathfinder" and asked is not None and asked < MIN_PATHFINDER_TOKENS:
        raise click.BadParameter(
            f"Pathfinder images need at least {MIN_PATHFINDER_TOKENS} tokens (an 8×8 image), "
            f"got {asked}; add --inputs random for shorter sequences", param_hint="--seq-len")

    target, reason = choose_device(device)
    row_count = 256 if rows is None else rows  # for the estimates only; 'all' is set below
    if target.name == "cpu":
        n = _cpu_length(target, reason, asked, heads, head_dim, dtype, row_count, backward)
        if explicit("repeats"):
            click.echo("note: --repeats applies to the GPU; the CPU times its one run", err=True)
    else:
        n = asked or PATH_X
    row_count = n if rows is None else min(rows, n)

    smaller = "use fewer tokens (--seq-len), heads or rows"
    mask_bytes, mask_seconds = (0, 0.0) if pattern == "dense" else \
        build_cost(pattern, n, block_size, parameters)
    needed = verify.estimate_bytes(n, heads, head_dim, dtype.itemsize, row_count, backward)
    if mask_bytes + needed > target.free_bytes():  # before anything large is built
        require_reasonable(target, seconds=0, needed=mask_bytes + needed, what="this check",
                           force=force, smaller=smaller)
    block_mask = None if pattern == "dense" else \
        build_mask(pattern, n, block_size=block_size, parameters=parameters, seed=seed)
    fraction = block_mask.element_density if block_mask is not None else 1.0
    estimate = mask_seconds + verify.estimate_seconds(
        target, n, heads, head_dim, dtype, row_count, backward=backward, causal=causal,
        fraction=fraction, repeats=repeats)
    require_reasonable(target, seconds=estimate, needed=needed, what="this check", force=force,
                       smaller=smaller)
    sample = verify.sample_rows(n, rows, seed)

    make = pathfinder_qkv if inputs == "pathfinder" else random_qkv
    with translate_errors(target), stop_on_ctrl_c("the check did not finish"):
        made = make(n, heads=heads, head_dim=head_dim, seed=seed, dtype=dtype)
        q, k, v = (target.asarray(x) for x in made[:3])
        image = made[3] if inputs == "pathfinder" else None
        steps = verify.reference_steps(heads, n, sample, backward)
        log.info("running cuflash, then %d reference steps", steps)
        with progress(steps, "float64 reference", enabled=not as_json) as bar:
            result = verify.run_check(target, q, k, v, rows=sample, causal=causal,
                                      block_mask=block_mask, backward=backward,
                                      repeats=repeats, seed=seed,
                                      on_step=lambda: bar.update(1))

    setup = {"seq_len": n, "inputs": inputs, "heads": heads, "head_dim": head_dim,
             "dtype": dtype.name, "causal": causal, "seed": seed,
             "rows": "all" if len(sample) == n else len(sample),
             "image": None if image is None else {"side": image.side,
                                                  "connected": image.connected},
             "pattern": {"name": pattern, "block_size": block_size if block_mask else None,
                         "parameters": parameters,
                         "density": block_mask.density if block_mask else 1.0}}
    if as_json:
        echo_json({"command": "check", "passed": result.passed, "device": target.name,
                   "device_description": target.description, **setup,
                   "forward": result.forward.record(),
                   "backward": result.backward.record() if result.backward else None,
                   "checks": {c.name: c.record() for c in result.comparisons}})
    else:
        _print_report(setup, result, dtype.name, n)
    if not result.passed:
        ctx.exit(1)


def _describe(setup, n):
    image = setup["image"]
    if image is None:
        source = "random normal q, k, v"
    else:
        cut = "" if image["side"] ** 2 == n else f", cut to {n:,} pixels"
        joined = "joined" if image["connected"] else "not joined"
        source = (f"{image['side']}×{image['side']} Pathfinder image (markers {joined}, "
                  f"seed {setup['seed']}{cut})")
    mask = setup["pattern"]
    if mask["name"] == "dense":
        shape = "dense"
    else:
        options = PATTERNS[mask["name"]].describe(mask["parameters"])
        shape = (f"{mask['name']}{' ' + options if options else ''}, "
                 f"{mask['block_size']}×{mask['block_size']} blocks, "
                 f"density {mask['density']:.3f}")
    return (f"{tokens(n)} tokens: {source}; {setup['heads']} heads × {setup['head_dim']}, "
            f"{setup['dtype']}, {shape}, {'causal' if setup['causal'] else 'non-causal'}")


def _print_report(setup, result, dtype_name, n):
    click.echo(f"cuflash check — {_describe(setup, n)}")
    rows = setup["rows"]
    sampled = "all" if rows == "all" else f"{rows} sampled"
    note = f"reference: float64 on {sampled} of {n:,} query rows"
    if result.backward and rows != "all":
        note += "; backward: dout random on those rows, zero elsewhere"
    click.echo(note)
    click.echo("")
    click.echo(f"{'':10}{'time':>12}{'TFLOP/s':>10}{'peak memory':>14}")
    for name, phase in (("forward", result.forward), ("backward", result.backward)):
        if phase is not None:
            tflops = f"{phase.tflops:.3g}" if math.isfinite(phase.tflops) else "-"
            click.echo(f"{name:10}{seconds(phase.seconds):>12}{tflops:>10}"
                       f"{size(phase.peak_bytes):>14}")
    click.echo("")
    naive = f"naive {dtype_name}"
    click.echo(f"{'':6}{'rows':>12}{'max |error|':>14}{'allowed':>12}{naive:>18}")
    for c in result.comparisons:
        verdict = "ok" if c.passed else "FAIL"
        click.echo(f"{c.name:6}{c.where:>12}{c.error:>14.3e}{c.allowed:>12.3e}"
                   f"{c.naive_error:>18.3e}  {verdict}")
    click.echo("")
    click.echo("PASS" if result.passed else "FAIL")
