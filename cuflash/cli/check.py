"""``cuflash check``: the Path-X check — long inputs against a float64 reference, PASS or FAIL."""

from __future__ import annotations

import math

import click

from cuflash.bench.devices import CpuDevice
from cuflash.bench.estimate import attention_seconds
from cuflash.check import verify
from cuflash.check.pathfinder import MIN_TOKENS, pathfinder_qkv, random_qkv
from cuflash.cli._common import (REFUSE_SECONDS, choose_device, duration, echo_json,
                                 given_options, log, progress, require_reasonable, seconds,
                                 size, stop_on_ctrl_c, tokens, translate_errors)
from cuflash.cli._options import (BOUNDED_TOKENS, POSITIVE, RowCount, causal_option,
                                  device_option, dtype_option, force_option, head_dim_option,
                                  heads_option, json_option, pattern_parameter_options, seed_option)
from cuflash.cli._patterns import (PATTERNS, build_cost, build_mask, least_element_density,
                                   pattern_parameters)

PATH_X, PATH_256 = 128 * 128, 256 * 256
# Without a GPU the NumPy path checks this many tokens unless --seq-len or --path-256 asks
# otherwise: a 64×64 image, seconds on an ordinary CPU, where Path-X takes about a minute.
CPU_SEQ_LEN = 64 * 64

# --gpus N (ring attention, zigzag layout) estimates. A ring simulated on the CPU runs its ranks
# as threads of one process that share the cores: about this many times the time of the same
# attention in one call. Host work (making, saving, loading, gathering and comparing the arrays
# in float64) costs about HOST_SECONDS_PER_ELEMENT and HOST_BYTES_PER_ELEMENT per element of q;
# each process of a real ring also loads the inputs (RANK_HOST_ITEMS of them per element).
# A simulated ring also makes N steps on each of its N ranks, per pass, each some Python and
# NumPy work on the host whatever its size: about RING_STEP_SECONDS each (measured on the CPU
# with 16 to 128 ranks), which decides the time once N is in the hundreds.
CPU_RING_SLOWDOWN = 4
RING_STEP_SECONDS = 5e-4
HOST_SECONDS_PER_ELEMENT = 2e-7
HOST_BYTES_PER_ELEMENT = 64
RANK_HOST_ITEMS = 5
PROCESS_START_SECONDS = 10
RING_TIMEOUT = 300.0  # seconds a rank waits for another before the ring gives up

EXAMPLES = """\b
Examples:
  cuflash check                                    Path-X: 16K tokens, 128×128 image
  cuflash check --path-256                         Path-256: 64K tokens, 256×256 image
  cuflash check --pattern image-local --radius 8   block-sparse 2-D neighbourhood
  cuflash check --causal --dtype float16 --rows all --seq-len 4K
  cuflash check --device cpu --seq-len 1024 --heads 2 --json
  cuflash check --gpus 2 --seq-len 1M --causal     ring attention over 2 GPUs, 1M tokens

\b
Without a GPU the check runs on the CPU (NumPy path) at 4K tokens, which takes seconds;
--seq-len 16K asks for Path-X's full size there. --gpus N with fewer than N GPUs visible
simulates the N ranks in one process (on the CPU, at 4K tokens unless --seq-len says).

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


def _cpu_length(target, reason, asked, heads, head_dim, dtype, rows, backward, inputs):
    """The length to check on the CPU when none was asked for, saying why on stderr. ``rows``:
    --rows, None for all (at Path-X's length, all of its rows)."""
    if asked is not None:
        return asked
    full = verify.estimate_seconds(target, PATH_X, heads, head_dim, dtype,
                                   PATH_X if rows is None else rows, backward=backward)
    why = "--device cpu was given" if not reason else "the GPU kernels cannot run here"
    image = " (a 64×64 image)" if inputs == "pathfinder" else ""
    click.echo(f"note: running on the CPU (cuflash's NumPy path): {why}. Path-X's 16K tokens "
               f"would take {duration(full)} here, so this check uses "
               f"{tokens(CPU_SEQ_LEN)} tokens{image}; --seq-len 16K asks for the full size.",
               err=True)
    return CPU_SEQ_LEN


@click.command(short_help="Path-X check: long inputs against float64, PASS or FAIL.",
               epilog=EXAMPLES)
@click.option("--seq-len", type=BOUNDED_TOKENS, default=None,
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
@click.option("--gpus", type=POSITIVE, default=1, show_default=True, metavar="N",
              help="Shard the sequence across N GPUs (ring attention, zigzag layout: the length "
                   "must be a multiple of 2·N), one process each, on random normal q, k, v; "
                   "with fewer GPUs visible the N ranks are simulated in one process.")
@click.option("--rows", type=RowCount(), default="256", show_default=True, metavar="K|all",
              help="Query rows compared with float64 (sampled, always with the first and last), "
                   "or 'all'.")
@click.option("--repeats", type=POSITIVE, default=10, show_default=True, metavar="N",
              help="Timed runs on the GPU (the median is shown); the CPU times one run.")
@seed_option
@force_option
@json_option
@click.pass_context
@stop_on_ctrl_c("the check did not finish")  # also while it estimates or builds a mask
def check(ctx, seq_len, path_256, heads, head_dim, dtype, causal, pattern, block_size, inputs,
          backward, device, gpus, rows, repeats, seed, force, as_json, **pattern_options):
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
    block mask, of causal's pairs when causal; backward 2.5 times that) and peak memory (inputs
    included), then PASS or FAIL.

    --gpus N shards the sequence across N GPUs with ring attention (one process per GPU), on
    random normal q, k, v, and compares the gathered result with float64 as above (out and lse
    on the sampled rows) and with cuflash on one GPU; it prints the time of the slowest rank
    next to one GPU's, and the speed-up and scaling efficiency.
    """
    asked = _seq_len(seq_len, path_256)
    given = {name.replace("_", "-"): value for name, value in pattern_options.items()}
    explicit = given_options(ctx)
    _check_mask_options(pattern, given, "block_size" in explicit)
    if gpus > 1:
        _check_sharded(ctx, gpus=gpus, asked=asked, path_256=path_256, heads=heads,
                       head_dim=head_dim, dtype=dtype, causal=causal, pattern=pattern,
                       inputs=inputs, backward=backward, device=device, rows=rows,
                       repeats=repeats, seed=seed, force=force, as_json=as_json,
                       explicit=explicit)
        return
    parameters = pattern_parameters(pattern, given) if pattern != "dense" else {}
    if inputs == "pathfinder" and asked is not None and asked < MIN_TOKENS:
        raise click.BadParameter(
            f"Pathfinder images need at least {MIN_TOKENS} tokens (an 8×8 image), "
            f"got {asked}; add --inputs random for shorter sequences", param_hint="--seq-len")

    target, reason = choose_device(device)
    if target.name == "cpu":
        n = _cpu_length(target, reason, asked, heads, head_dim, dtype, rows, backward, inputs)
        if "repeats" in explicit:
            click.echo("note: --repeats applies to the GPU; the CPU times one run", err=True)
    else:
        n = asked or PATH_X
    row_count = n if rows is None else min(rows, n)

    smaller = "use fewer tokens (--seq-len), heads or rows"
    mask_bytes, mask_seconds = (0, 0.0) if pattern == "dense" else \
        build_cost(pattern, n, block_size, parameters, seed)
    needed = verify.estimate_bytes(n, heads, head_dim, dtype.itemsize, row_count, backward)

    def estimate(fraction):
        return mask_seconds + verify.estimate_seconds(
            target, n, heads, head_dim, dtype, row_count, backward=backward, causal=causal,
            fraction=fraction, repeats=repeats)

    # the block mask's size follows its blocks, not the heads or rows
    larger_blocks = ", or a larger --block-size" if mask_bytes else ""
    if target.name != "cpu":
        # The inputs, the output gradient and the block mask are made on the host (the CPU
        # path's host memory is its device's, checked below).
        host = mask_bytes + verify.estimate_host_bytes(
            n, heads, head_dim, dtype.itemsize, row_count, backward,
            block_size=None if pattern == "dense" else block_size)
        require_reasonable(CpuDevice(), seconds=0, needed=host, what="this check", force=force,
                           smaller=smaller + larger_blocks, quiet=True)
    if mask_bytes + needed > target.free_bytes():  # before anything large is built
        require_reasonable(target, seconds=0, needed=mask_bytes + needed, what="this check",
                           force=force, smaller=smaller + larger_blocks)
    if pattern != "dense" and not force:
        # Building a mask of a long sequence takes a while: refuse first what would be refused
        # anyway with the fewest pairs the pattern can keep, which cannot overstate the time.
        least = estimate(least_element_density(pattern, n, block_size, parameters, seed))
        if least > REFUSE_SECONDS:
            require_reasonable(target, seconds=least, needed=needed, what="this check",
                               force=force, smaller=smaller)
    block_mask = None if pattern == "dense" else \
        build_mask(pattern, n, block_size=block_size, parameters=parameters, seed=seed)
    fraction = verify.attended_fraction(block_mask, causal)
    require_reasonable(target, seconds=estimate(fraction), needed=needed, what="this check",
                       force=force, smaller=smaller)
    sample = verify.sample_rows(n, rows, seed)

    make = pathfinder_qkv if inputs == "pathfinder" else random_qkv
    with translate_errors(target):
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


# ----------------------------------------------------------------------------- --gpus N

def _multiple(n, chunks):
    """The largest multiple of ``chunks`` up to ``n`` (at least ``chunks``)."""
    return max(chunks, n // chunks * chunks)


def _sharded_length(gpus, asked, path_256):
    """The length asked for, refused unless the zigzag layout can split it over ``gpus``
    ranks; None when none was asked for."""
    chunks = 2 * gpus
    if asked is None or asked % chunks == 0:
        return asked
    lower, upper = asked // chunks * chunks, (asked // chunks + 1) * chunks
    nearest = f"{lower:,} or {upper:,}" if lower else f"{upper:,}"
    raise click.BadParameter(
        f"--gpus {gpus} cuts the sequence into 2·N = {chunks} equal chunks (the zigzag layout: "
        f"rank r holds chunks r and 2·N−1−r), so the length must be a multiple of {chunks}; "
        f"{asked:,} is not (nearest: {nearest})",
        param_hint="--path-256" if path_256 else "--seq-len")


def _default_length(gpus, full, what):
    """``full`` tokens, or the largest multiple of 2·N below it, saying so on stderr."""
    n = _multiple(full, 2 * gpus)
    if n != full:
        click.echo(f"note: {n:,} tokens, the largest multiple of 2·N = {2 * gpus} up to {what} "
                   f"(the zigzag layout needs one)", err=True)
    return n


def _sharded_estimate(target, mode, gpus, n, heads, head_dim, dtype, rows, backward, causal,
                      repeats):
    """``(seconds, device bytes, host bytes)`` of check_sharded; host bytes are 0 on the CPU,
    where they are part of the device's."""
    elements = heads * n * head_dim
    # One device: cuflash's calls and the float64 reference, as in the plain check.
    single = verify.estimate_seconds(target, n, heads, head_dim, dtype, rows,
                                     backward=backward, causal=causal, repeats=repeats)
    calls = repeats + 2 if mode == "processes" else 1  # first call, warm-up, timed calls
    ring = attention_seconds(target, batch=1, heads=heads, seq_len=n, head_dim=head_dim,
                             dtype=dtype, causal=causal, backward=backward, calls=calls)
    if mode == "processes":
        ring = ring / gpus + PROCESS_START_SECONDS
    else:
        if target.name == "cpu":
            ring *= CPU_RING_SLOWDOWN
        ring += gpus * gpus * (2 if backward else 1) * RING_STEP_SECONDS
    estimate = single + ring + HOST_SECONDS_PER_ELEMENT * elements
    # The one-device check and its reference run on the device after the ring (in processes
    # mode, on GPU 0 once the ranks have exited); a simulated ring adds its shards, outputs
    # and float32 accumulators there.
    needed = verify.estimate_bytes(n, heads, head_dim, dtype.itemsize, rows, backward)
    if mode == "simulated":
        needed += elements * (12 * dtype.itemsize + 8)
    host = elements * HOST_BYTES_PER_ELEMENT
    if mode == "processes":
        host += gpus * elements * RANK_HOST_ITEMS * dtype.itemsize
    if target.name == "cpu":
        return estimate, needed + host, 0
    return estimate, needed, host


def _scaling(times, gpus):
    """Speed-up and efficiency (one GPU's time / (N × the ring's)) of each timed phase."""
    scaling = {}
    for phase in ("forward", "backward"):
        ring, single = times.get(f"ring_{phase}"), times.get(f"single_{phase}")
        if ring and single:
            speedup = single / ring
            scaling[phase] = {"speedup": speedup, "efficiency": speedup / gpus}
    return scaling or None


def _check_sharded(ctx, *, gpus, asked, path_256, heads, head_dim, dtype, causal, pattern,
                   inputs, backward, device, rows, repeats, seed, force, as_json, explicit):
    """``cuflash check --gpus N``: check_sharded with the options of the plain check."""
    from cuflash.parallel.check import check_sharded, gpu_count

    if pattern != "dense":
        raise click.BadParameter(
            f"block-sparse patterns run on one device; --gpus {gpus} shards dense attention "
            "only (leave out --pattern, or use --gpus 1)", param_hint="--pattern")
    if inputs == "pathfinder" and "inputs" in explicit:
        raise click.BadParameter(
            f"--gpus {gpus} checks ring attention on random normal q, k, v; Pathfinder inputs "
            "run with --gpus 1 (leave out --inputs, or give --inputs random)",
            param_hint="--inputs")
    asked = _sharded_length(gpus, asked, path_256)

    target, reason = choose_device(device)
    visible = gpu_count() if target.name == "gpu" else 0
    mode = "processes" if visible >= gpus else "simulated"
    if mode == "processes":
        click.echo(f"sharded: ring attention across {gpus} GPUs ({visible} visible), one "
                   "process each, zigzag layout; q, k, v random normal", err=True)
    elif target.name == "gpu":
        click.echo(f"note: --gpus {gpus} asks for {gpus} GPUs but {visible} "
                   f"{'is' if visible == 1 else 'are'} visible: simulating {gpus} ranks in one "
                   f"process (a thread each) on GPU 0; the results are checked the same way, "
                   f"but the time is not that of {gpus} GPUs", err=True)
    else:
        why = "--device cpu was given" if not reason else "the GPU kernels cannot run here"
        click.echo(f"note: simulating {gpus} ranks in one process (a thread each) on the CPU "
                   f"(cuflash's NumPy path): {why}; the results are checked the same way, but "
                   f"the time is not that of {gpus} GPUs", err=True)
    if mode == "simulated" and "repeats" in explicit:
        click.echo("note: --repeats times a ring of one process per GPU; a simulated ring is "
                   "timed once", err=True)

    if asked is not None:
        n = asked
    elif target.name == "cpu":
        full_length = _multiple(PATH_X, 2 * gpus)
        full, _, _ = _sharded_estimate(target, mode, gpus, full_length, heads, head_dim, dtype,
                                       full_length if rows is None else min(rows, full_length),
                                       backward, causal, repeats)
        n = _multiple(CPU_SEQ_LEN, 2 * gpus)
        # --seq-len 16K is refused where 2·N does not divide it: name the length that runs.
        full_size = "16K asks for the full size" if full_length == PATH_X else \
            (f"{full_length} asks for the full size (the largest multiple of 2·N = {2 * gpus} "
             "up to 16K)")
        click.echo(f"note: Path-X's 16K tokens would take {duration(full)} here, so this check "
                   f"uses {tokens(n)} tokens; --seq-len {full_size}.", err=True)
    else:
        n = _default_length(gpus, PATH_X, "Path-X's 16K")
    row_count = n if rows is None else min(rows, n)

    smaller = "use fewer tokens (--seq-len), heads or rows"
    estimate, needed, host = _sharded_estimate(target, mode, gpus, n, heads, head_dim, dtype,
                                               row_count, backward, causal, repeats)
    if host:
        require_reasonable(CpuDevice(), seconds=0, needed=host, what="this check", force=force,
                           smaller=smaller, quiet=True)
    require_reasonable(target, seconds=estimate, needed=needed, what="this check", force=force,
                       smaller=smaller)

    with translate_errors(target):
        try:
            result = check_sharded(
                ranks=gpus, device=target.name, mode=mode, seq_len=n, heads=heads,
                head_dim=head_dim, dtype=dtype.name, causal=causal, backward=backward,
                rows=row_count, seed=seed, repeats=repeats,
                # check_sharded stops the processes after 10 × timeout: room for a forced run
                timeout=max(RING_TIMEOUT, estimate / 5))
        except (RuntimeError, TimeoutError) as error:
            raise click.ClickException(str(error)) from error

    record = result.record()
    config = record["config"]
    scaling = _scaling(result.times, gpus) if mode == "processes" else None
    if as_json:
        echo_json({"command": "check", "passed": result.passed, "gpus": gpus, "mode": mode,
                   "visible_gpus": visible, "device": target.name,
                   "device_description": target.description, "inputs": "random",
                   **{key: config[key] for key in ("seq_len", "heads", "kv_heads", "head_dim",
                                                   "dtype", "causal", "layout", "seed")},
                   "rows": "all" if config["rows_checked"] == n else config["rows_checked"],
                   "backward": backward, "times_s": record["times_s"], "scaling": scaling,
                   "checks": record["comparisons"]})
    else:
        body, _, verdict = result.report().rpartition("\n\n")
        click.echo(body)
        click.echo("")
        if scaling:
            click.echo(f"{'':10}{'speed-up':>12}{'efficiency':>14}   one GPU / ring; ring: the "
                       f"slowest of {gpus} ranks")
            for phase, s in scaling.items():
                click.echo(f"{phase:10}{s['speedup']:>11.2f}×{s['efficiency']:>14.3f}")
            click.echo("")
        click.echo(verdict)
    if not result.passed:
        ctx.exit(1)
