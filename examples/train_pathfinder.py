"""Train a small transformer on Pathfinder-style images, pixel by pixel, with cuflash attention or
torch's scaled_dot_product_attention.

Each image (``cuflash.check.pathfinder``, ``separate=True``) holds two round markers, joined by
one dashed curve or not, among distractor curves that never touch it; the label is "connected".
Every pixel is a token (a learned embedding of its value plus a 2-D position embedding); pre-norm
transformer blocks, max or mean pooling or a CLS token, and a linear head. 32×32, 64×64 and 128×128
images are 1,024, 4,096 and 16,384 tokens (the last is the length of LRA's Path-X). The training
set (seeds 0, 1, ...) and the held-out test set (seeds from 2**40) are fixed and balanced,
generated once at start (``--cache-dir`` keeps them). The model is initialised, and batches (with
a random flip or rotation) are drawn, from ``--seed``: both ``--attention`` choices see the same
weights and the same batches.

    python examples/train_pathfinder.py --size 32 --budget-minutes 4 --out runs
    python examples/train_pathfinder.py --size 32 --budget-minutes 4 --out runs --attention sdpa
    python examples/pathfinder_report.py runs --plot runs/loss.png
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy
import torch
import torch.nn.functional as F

from cuflash._files import why_not_writable, write_atomically
from cuflash.check.pathfinder import pathfinder_image
from cuflash.torch import scaled_dot_product_attention

TEST_SEEDS = 2**40      # the first test image's seed; training images use seeds 0, 1, ...
TIMING_SKIP = 10        # steps left out of the mean step time (allocator and autotuning warm-up)
EVAL_IMAGES = 512       # test images of the periodic evaluations (the final one uses all)


def _draw(job):
    side, seed = job
    image = pathfinder_image(side, seed=seed, connected=seed % 2 == 0, separate=True)  # balanced
    return numpy.rint(image.pixels * 255).astype(numpy.uint8).ravel(), image.connected


def cache_file(cache_dir: str, side: int, first_seed: int, count: int) -> Path:
    """Where --cache-dir keeps the ``count`` images of ``side`` from seed ``first_seed`` on."""
    return Path(cache_dir) / f"pathfinder-{side}-{first_seed}-{count}.npz"


def pathfinder_set(side: int, count: int, first_seed: int, *, name: str, workers: int,
                   cache_dir: str | None):
    """``count`` images as (uint8 pixels (count, side*side), int64 labels (count,))."""
    cache = cache_file(cache_dir, side, first_seed, count) if cache_dir else None
    if cache and cache.exists():
        with numpy.load(cache) as saved:
            print(f"{name} set: {count} images of {side}×{side} from {cache}", flush=True)
            return saved["pixels"], saved["labels"]
    print(f"{name} set: generating {count} images of {side}×{side} ...", flush=True)
    start = time.perf_counter()
    jobs = [(side, first_seed + i) for i in range(count)]
    if workers > 1 and count >= 64:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_draw, jobs, chunksize=max(1, count // (8 * workers))))
    else:
        results = [_draw(job) for job in jobs]
    pixels = numpy.stack([pixels for pixels, _ in results])
    labels = numpy.array([connected for _, connected in results], dtype=numpy.int64)
    print(f"  done in {time.perf_counter() - start:.1f}s ({labels.sum()} connected)", flush=True)
    if cache:
        save_whole(cache, pixels=pixels, labels=labels)
    return pixels, labels


def save_whole(cache: Path, **arrays) -> None:
    """numpy.savez into ``cache`` whole or not at all: a cache is loaded whenever its file
    exists, so a save cut short (a full disk, Ctrl-C) must not leave part of one there."""
    archive = io.BytesIO()
    numpy.savez(archive, **arrays)
    write_whole(cache, archive.getvalue())


def write_whole(path: Path, data: bytes) -> None:
    """``data`` into ``path`` as cuflash writes its files (``write_atomically``): a write cut
    short leaves what was there, never part of a new file, and an existing file keeps its
    permissions. A symbolic link is written through, as open() would. The folder is made first
    (``--out`` names one the run creates)."""
    target = Path(os.path.realpath(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(str(target), data)


def batches(rng: numpy.random.Generator, count: int, batch: int):
    """(image indices, flips in 0..7) for each step: shuffled epochs of the training set."""
    while True:
        order = rng.permutation(count)
        for i in range(0, count - batch + 1, batch):
            yield order[i:i + batch], rng.integers(8, size=batch)


def dihedral_indices(side: int) -> torch.Tensor:
    """(8, side*side): the pixel gathers of the 8 flips and rotations of a square image."""
    grid = torch.arange(side * side).view(side, side)
    views = [torch.rot90(g, r) for g in (grid, grid.T) for r in range(4)]
    return torch.stack([view.reshape(-1) for view in views])


# The one-import switch: cuflash.torch.scaled_dot_product_attention takes torch's arguments.
# (B, H, N, D) in, (B, H, N, D) out; non-causal, no mask, the default 1/sqrt(D) scale.
ATTENTION = {
    "cuflash": scaled_dot_product_attention,
    "sdpa": F.scaled_dot_product_attention,
}
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


def sdpa_with(backend: str):
    """torch's attention restricted to one back end (to measure how much two correct attention
    implementations' rounding alone moves the loss curve)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    chosen = getattr(SDPBackend, SDPA_BACKENDS[backend])

    def attention(q, k, v):
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v)
    return attention


def sincos_2d(side: int, width: int) -> torch.Tensor:
    """(side*side, width): sin/cos of the row in the first half of the width, of the column in
    the second half, at geometrically spaced frequencies."""
    frequencies = 10000.0 ** (-torch.arange(width // 4) / (width // 4))
    angles = torch.arange(side, dtype=torch.float32)[:, None] * frequencies
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)               # (side, width/2)
    rows, cols = axis[:, None].expand(-1, side, -1), axis[None].expand(side, -1, -1)
    return torch.cat([rows, cols], dim=-1).reshape(side * side, width)


class Block(torch.nn.Module):
    def __init__(self, width: int, heads: int, attention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.proj = torch.nn.Linear(width, width)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                       torch.nn.Linear(4 * width, width))

    def forward(self, x):
        b, n, width = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, width // self.heads)
        q, k, v = qkv.transpose(1, 3).unbind(2)                        # (B, H, N, D) each
        out = self.attention(q, k, v)                                   # (B, H, N, D)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, width))
        return x + self.mlp(self.norm2(x))


class PathfinderTransformer(torch.nn.Module):
    def __init__(self, side, width, heads, layers, attention, position="sincos", pool="max",
                 stem=0):
        super().__init__()
        self.side, self.pool = side, pool
        self.value = torch.nn.Embedding(256, width)                     # one per pixel value
        # Optional: 3×3 convolutions over the image whose output is added to each pixel's token,
        # so a token also describes its neighbourhood (still one token per pixel).
        convs = []
        for i in range(stem):
            convs += [torch.nn.Conv2d(1 if i == 0 else width, width, 3, padding=1),
                      torch.nn.GELU()]
        self.stem = torch.nn.Sequential(*convs[:-1]) if stem else None
        if position == "learned":
            self.position = torch.nn.Parameter(0.02 * torch.randn(side * side, width))
        else:
            self.register_buffer("position", sincos_2d(side, width), persistent=False)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, width)) if pool == "cls" else None
        self.blocks = torch.nn.ModuleList(Block(width, heads, attention) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 2)

    def forward(self, pixels):                                          # (B, side*side) uint8
        x = self.value(pixels.long()) + self.position
        if self.stem is not None:
            image = pixels.view(-1, 1, self.side, self.side).to(x.dtype) / 255
            x = x + self.stem(image).flatten(2).transpose(1, 2)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        if self.pool == "max":
            return self.head(x.amax(dim=1))
        return self.head(x[:, 0] if self.cls is not None else x.mean(dim=1))


def evaluate(model, pixels, labels, batch, autocast) -> int:
    """The number of test images classified correctly."""
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(**autocast):
        for i in range(0, pixels.shape[0], batch):
            logits = model(pixels[i:i + batch])
            correct += int((logits.argmax(dim=1) == labels[i:i + batch]).sum())
    model.train()
    return correct


def optimizer_kind(args) -> str:
    """AdamW's implementation: --optimizer, else fused on CUDA and foreach on the CPU."""
    return args.optimizer or ("fused" if args.device == "cuda" else "foreach")


def train(args) -> dict:
    attention = ATTENTION[args.attention]
    if args.attention == "sdpa" and args.sdpa_backend != "default":
        attention = sdpa_with(args.sdpa_backend)
    device = torch.device(args.device)
    side, tokens = args.size, args.size ** 2
    (train_x, train_y), (test_x, test_y) = [
        [torch.from_numpy(a).to(device) for a in pathfinder_set(
            side, count, first, name=name, workers=args.workers, cache_dir=args.cache_dir)]
        for name, count, first in (("train", args.train_size, 0),
                                   ("test", args.test_size, TEST_SEEDS))]
    flips = dihedral_indices(side).to(device)

    torch.manual_seed(args.seed)
    model = PathfinderTransformer(side, args.width, args.heads, args.layers,
                                  attention, args.position, args.pool, args.stem).to(device)
    parameters = sum(p.numel() for p in model.parameters())
    adamw = optimizer_kind(args)
    # One update rule either way; "fused" runs it in one kernel per step, "foreach" in a few
    # kernels per group of tensors, whose launches cost host time a small step may not hide.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98),
                                  weight_decay=args.weight_decay,
                                  **{adamw: True})
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / max(1, args.warmup)))
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    draw = batches(numpy.random.default_rng(args.seed), args.train_size, args.batch)
    evals = []                                       # (step, training seconds, test accuracy)

    def periodic_eval(step, elapsed):
        count = min(EVAL_IMAGES, args.test_size)
        accuracy = evaluate(model, test_x[:count], test_y[:count], args.batch, autocast) / count
        evals.append((step, elapsed, accuracy))
        print(f"step {step:6d}  test accuracy {100 * accuracy:.1f}% on {count} images", flush=True)
    print(f"{args.attention}{'' if args.sdpa_backend == 'default' else ' ' + args.sdpa_backend}: "
          f"{tokens} tokens, {args.layers}-layer transformer of width "
          f"{args.width} ({args.heads} heads, {parameters:,} parameters), batch {args.batch}, "
          f"{args.dtype}, {adamw} AdamW, {device}", flush=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

    def loss_of(index, flip):
        index, flip = torch.as_tensor(index, device=device), torch.as_tensor(flip, device=device)
        with torch.autocast(**autocast):
            logits = model(train_x[index].gather(1, flips[flip]))
        return F.cross_entropy(logits.float(), train_y[index])

    # One forward and backward before the clock starts, so that compiling kernels on first use
    # does not count against the budget; the optimizer does not step, so nothing changes.
    start = time.perf_counter()
    loss_of(numpy.arange(args.batch), numpy.zeros(args.batch, dtype=numpy.int64)).backward()
    optimizer.zero_grad(set_to_none=True)
    sync()
    print(f"warm-up pass, not timed (GPU kernels compile on first use): "
          f"{time.perf_counter() - start:.1f}s", flush=True)

    budget = math.inf if args.budget_minutes is None else 60 * args.budget_minutes
    losses, step_times, window = [], [], []
    stopped, start = "steps", time.perf_counter()
    for step in range(1, args.steps + 1):
        tick = time.perf_counter()
        loss = loss_of(*next(draw))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        sync()
        step_times.append(time.perf_counter() - tick)
        window.append(losses[-1])
        elapsed = time.perf_counter() - start
        if elapsed >= budget:
            stopped = "budget"
        if step == 1 or step % args.print_every == 0 or step == args.steps or stopped == "budget":
            recent = step_times[-len(window):]
            print(f"step {step:6d}  loss {sum(window) / len(window):.4f}  "
                  f"{args.batch * tokens * len(recent) / sum(recent):12,.0f} tokens/s  "
                  f"elapsed {elapsed:7.1f}s", flush=True)
            window = []
        if args.eval_every and step % args.eval_every == 0 and stopped != "budget":
            sync()
            pause = time.perf_counter()
            periodic_eval(step, elapsed)
            start += time.perf_counter() - pause      # evaluations do not count against the budget
        if stopped == "budget":
            break

    correct = evaluate(model, test_x, test_y, args.batch, autocast)
    accuracy = correct / args.test_size
    print(f"test accuracy {100 * accuracy:.1f}% ({correct}/{args.test_size} images; chance 50%)")
    evals.append((len(losses), sum(step_times), accuracy))
    timed = step_times[TIMING_SKIP:] if len(step_times) > TIMING_SKIP else step_times
    mean = sum(timed) / len(timed)
    print(f"mean step time {1e3 * mean:.2f} ms over steps {len(step_times) - len(timed) + 1}-"
          f"{len(step_times)} ({args.batch * tokens / mean:,.0f} tokens/s); {len(step_times)} "
          f"steps in {sum(step_times):.1f}s, stopped by {stopped}")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    config = dict(vars(args), optimizer=adamw, tokens=tokens, parameters=parameters, device_name=name)
    return dict(config=config, loss=losses, step_time=step_times, test_accuracy=accuracy,
                test_correct=correct, evals=evals, mean_step_time=mean,
                timed_steps=len(timed), images_per_second=args.batch / mean, stopped=stopped)


def plot_format(path: str) -> str:
    """The format of a --plot file, read from its name as matplotlib reads it (PNG without)."""
    return os.path.splitext(path)[1][1:].lower() or "png"


def plot(logs: list[dict], path: str) -> None:
    """Loss against step and against training time, one curve per log (smoothed), written to
    ``path`` whole or not at all (``write_whole``)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("--plot needs matplotlib (pip install matplotlib)")
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), layout="constrained")
    for log in logs:
        config, loss = log["config"], numpy.asarray(log["loss"])
        width = max(1, len(loss) // 20)
        smooth = numpy.convolve(loss, numpy.ones(width) / width, mode="valid")
        steps = numpy.arange(width, len(loss) + 1)
        seconds = numpy.cumsum(log["step_time"])[width - 1:]
        label = (f"{config['attention']} {config['size']}² ({config['tokens']:,} tokens): "
                 f"test {100 * log['test_accuracy']:.1f}%")
        by_step.plot(steps, smooth, label=label)
        by_time.plot(seconds, smooth, label=label)
    for axes, xlabel in ((by_step, "step"), (by_time, "training time (s)")):
        axes.axhline(math.log(2), color="grey", linestyle=":", linewidth=1)   # chance
        axes.set(xlabel=xlabel, ylabel="training loss")
        axes.grid(alpha=0.3)
    by_step.legend(fontsize=8)
    sizes = sorted({log["config"]["size"] for log in logs})
    figure.suptitle("Pathfinder " + ", ".join(f"{size}×{size}" for size in sizes))
    picture = io.BytesIO()
    # rendered in memory, so matplotlib no longer reads the format from the name: say it
    try:
        figure.savefig(picture, format=plot_format(path), dpi=120)
    finally:
        plt.close(figure)
    write_whole(Path(path), picture.getvalue())
    print(f"plot written to {path}")


def number(kind, minimum, *, above: bool = False, maximum=None, finite: bool = False):
    """An argparse type: a ``kind`` (int or float) of at least ``minimum``, or above it, and at
    most ``maximum`` where one is given; with ``finite``, not infinite."""
    def parse(text: str):
        value = kind(text)
        # Written as "not ..." so that nan, which compares false with everything, is refused too.
        if not (value > minimum if above else value >= minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'above' if above else 'at least'} {minimum}, got {text}")
        if finite and value == math.inf:
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, got {text}")
        return value
    parse.__name__ = kind.__name__      # argparse names it in "invalid int value: 'x'"
    return parse


POSITIVE_INT, NON_NEGATIVE_INT = number(int, 1), number(int, 0)
# torch.manual_seed takes at most 2**64 - 1: a larger --seed failed once the images were drawn
SEED = number(int, 0, maximum=2**64 - 1)
POSITIVE_FLOAT = number(float, 0, above=True)
# a learning rate or weight decay of inf turns every weight into nan at the first step
FINITE_POSITIVE_FLOAT = number(float, 0, above=True, finite=True)
FINITE_NON_NEGATIVE_FLOAT = number(float, 0, finite=True)


def power_of_two_side(text: str) -> int:
    side = int(text)
    if side < 32 or side & (side - 1):   # 16×16 has no room for two separate curves
        raise argparse.ArgumentTypeError(f"--size must be a power of two ≥ 32, got {text}")
    return side


LOG_KEYS = {"config", "loss", "step_time", "test_accuracy"}   # what plot() reads of a log
CONFIG_KEYS = {"attention", "size", "tokens"}


def read_log(parser, name: str) -> dict:
    """The --log file ``name`` given to --compare; argparse names one it cannot read."""
    try:
        log = json.loads(Path(name).read_text())
    except (OSError, ValueError) as error:
        parser.error(f"--compare: cannot read {name}: {error}")
    if not (isinstance(log, dict) and LOG_KEYS <= log.keys() and isinstance(log["config"], dict)
            and CONFIG_KEYS <= log["config"].keys()):
        parser.error(f"--compare: {name} is not a --log of this script (a log holds "
                     f"{', '.join(sorted(LOG_KEYS))}; its config "
                     f"{', '.join(sorted(CONFIG_KEYS))})")
    return log


def refuse_unwritable_folder(parser, given: str, folder: Path, *, written: bool = True) -> None:
    """Refuse ``given`` (an option and its value) where ``folder``, which the run makes (with
    its missing parents) and writes into, could not be: its nearest existing ancestor is a
    file, or, with ``written`` (the run surely writes there), a folder that may not be written."""
    nearest = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if nearest is not None and not nearest.is_dir():
        parser.error(f"{given}: {nearest} is a file, not a folder")
    if written and nearest is not None and not os.access(nearest, os.W_OK | os.X_OK):
        parser.error(f"{given}: folder {nearest} is not writable")


def refuse_unwritable_outputs(parser, args) -> None:
    """Refuse now, not once the training is over, a --log (or --out) or --plot that could not
    be written: the run would end in a traceback, and a --log's results would be lost."""
    if args.log:
        log = Path(args.log)
        if log.is_dir():
            parser.error(f"--log {args.log} is a folder; give a file name")
        if log.exists() and not os.access(log, os.W_OK):  # write_atomically replaces none such
            parser.error(f"--log {args.log} is read-only")
        refuse_unwritable_folder(parser, f"--log {args.log}", log.parent)
    if args.plot:
        refuse_unwritable_plot(parser, args.plot)
        refuse_unplottable(parser, args.plot)
        if args.log and os.path.realpath(args.log) == os.path.realpath(args.plot):
            parser.error(f"--log and --plot name one file, {args.log}; give two names")


def refuse_unwritable_plot(parser, name: str) -> None:
    """Refuse a --plot that could not be written: a folder, a file in a missing or read-only
    folder, a read-only file."""
    reason = why_not_writable(name)
    if reason:
        parser.error(f"--plot {name}{reason}")


def refuse_unplottable(parser, name: str) -> None:
    """Refuse a --plot without matplotlib, or in a format it does not write."""
    if importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib (pip install matplotlib)")
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase
    supported = FigureCanvasBase.get_supported_filetypes()
    if plot_format(name) not in supported:
        parser.error(f"--plot {name}: matplotlib cannot write {plot_format(name)!r} files; give "
                     f"a name ending in one of {', '.join('.' + k for k in sorted(supported))}")


def refuse_unusable_sdpa_backend(parser, args) -> None:
    """Refuse an --sdpa-backend torch cannot run here (efficient or cudnn on the CPU, flash in
    float32 on CUDA...): it failed at the first step, once the image sets were drawn. One small
    forward and backward, in the run's dtype and head size, asks torch."""
    if args.attention != "sdpa" or args.sdpa_backend == "default":
        return
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    q = torch.randn(1, args.heads, 1024, args.width // args.heads, device=args.device,
                    dtype=dtype, requires_grad=True)
    try:
        sdpa_with(args.sdpa_backend)(q, q, q).sum().backward()
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        parser.error(f"--sdpa-backend {args.sdpa_backend}: torch cannot run it here "
                     f"(--device {args.device}, --dtype {args.dtype}): {reason}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    add = parser.add_argument
    add("--size", type=power_of_two_side, default=32,
        help="image side: 32, 64, 128 (1K, 4K, 16K tokens); any power of two ≥ 32")
    add("--attention", choices=sorted(ATTENTION), default="cuflash")
    add("--steps", type=POSITIVE_INT, default=1000, help="at most this many steps")
    add("--budget-minutes", type=POSITIVE_FLOAT, default=None,
        help="stop after this much training time")
    add("--batch", type=POSITIVE_INT, default=32)
    add("--lr", type=FINITE_POSITIVE_FLOAT, default=1e-3)
    add("--warmup", type=NON_NEGATIVE_INT, default=200,
        help="steps of linear learning-rate warm-up (0: none)")
    add("--weight-decay", type=FINITE_NON_NEGATIVE_FLOAT, default=0.05)
    add("--optimizer", choices=["fused", "foreach"], default=None,
        help="AdamW's implementation, one update rule: fused (the default on CUDA) or foreach "
             "(the default on the CPU)")
    add("--dtype", choices=["bf16", "fp32"], default=None,
        help="bf16: bfloat16 autocast (CUDA only); default bf16 on CUDA, fp32 on CPU")
    add("--device", choices=["cuda", "cpu"], default="cuda")
    add("--layers", type=POSITIVE_INT, default=4)
    add("--width", type=POSITIVE_INT, default=128)
    add("--heads", type=POSITIVE_INT, default=4)
    add("--position", choices=["sincos", "learned"], default="sincos")
    add("--pool", choices=["max", "mean", "cls"], default="max",
        help="max or mean over the tokens, or a CLS token")
    add("--stem", type=NON_NEGATIVE_INT, default=0, metavar="N",
        help="N 3×3 convolutions over the image added to the pixel tokens (default 0: none)")
    add("--sdpa-backend", choices=["default", *SDPA_BACKENDS], default="default",
        help="with --attention sdpa: the back end torch may use (default: its own choice)")
    add("--seed", type=SEED, default=0, help="initialisation and batch order")
    add("--train-size", type=POSITIVE_INT, default=20000, help="training images")
    add("--test-size", type=POSITIVE_INT, default=1000, help="held-out test images")
    add("--workers", type=POSITIVE_INT, default=os.cpu_count() or 1,
        help="processes drawing images")
    add("--cache-dir", default=None, help="keep generated image sets here (.npz)")
    add("--print-every", type=POSITIVE_INT, default=50)
    add("--eval-every", type=NON_NEGATIVE_INT, default=0,
        help="also test on the first 512 test images every this many steps (0: only at the end)")
    add("--out", default=None, metavar="DIR",
        help="write the log as DIR/pathfinder-SIZE-ATTENTION.json, or "
             "DIR/pathfinder-SIZE-sdpa-BACKEND.json with --sdpa-backend (unless --log is given)")
    add("--prepare-only", action="store_true",
        help="generate (or load) the image sets, save them to --cache-dir, and stop")
    add("--log", default=None, help="write losses, step times, accuracy and config (JSON)")
    add("--plot", default=None,
        help="plot the loss curves (PNG, or the format the name ends in: .svg, .pdf...; needs "
             "matplotlib)")
    add("--compare", nargs="+", default=None, metavar="LOG",
        help="plot these --log files with --plot instead of training")
    args = parser.parse_args(argv)

    if args.compare and args.prepare_only:
        parser.error("--compare and --prepare-only are two different runs; give one")
    # what a run that trains nothing would leave unwritten, without a word
    for mode, given in (("--compare", args.compare), ("--prepare-only", args.prepare_only)):
        if given:
            ignored = [option for option, value in (("--log", args.log), ("--out", args.out))
                       if value] + (["--plot"] if args.prepare_only and args.plot else [])
            if ignored:
                parser.error(f"{mode} trains nothing, so it writes no {ignored[0]}; leave "
                             f"{ignored[0]} out")
    if args.compare:
        if not args.plot:
            parser.error("--compare needs --plot OUT.png")
        refuse_unwritable_plot(parser, args.plot)
        if os.path.realpath(args.plot) in {os.path.realpath(name) for name in args.compare}:
            parser.error(f"--plot {args.plot} is one of the --compare logs; give another name, "
                         "so that the plot does not replace it")
        logs = [read_log(parser, name) for name in args.compare]
        refuse_unplottable(parser, args.plot)
        plot(logs, args.plot)
        return 0
    if args.cache_dir:  # written once the image sets are drawn, which may take minutes (a
        # read-only folder is fine where it holds them already)
        cached = all(cache_file(args.cache_dir, args.size, first, count).exists()
                     for count, first in ((args.train_size, 0), (args.test_size, TEST_SEEDS)))
        refuse_unwritable_folder(parser, f"--cache-dir {args.cache_dir}", Path(args.cache_dir),
                                 written=not cached)
    if args.prepare_only:
        if not args.cache_dir:
            parser.error("--prepare-only needs --cache-dir")
        for count, first in ((args.train_size, 0), (args.test_size, TEST_SEEDS)):
            pathfinder_set(args.size, count, first, name="prepare", workers=args.workers,
                           cache_dir=args.cache_dir)
        return 0
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cpu" and args.dtype == "bf16":
        parser.error("bf16 autocast is for --device cuda; use --dtype fp32 on CPU")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device visible to torch; use --device cpu")
    if args.width % args.heads or args.width % 4:
        parser.error("--width must be a multiple of --heads and of 4")
    if args.train_size < args.batch:
        parser.error("--train-size must be at least --batch")

    if args.sdpa_backend != "default" and args.attention != "sdpa":
        parser.error("--sdpa-backend is for --attention sdpa")
    refuse_unusable_sdpa_backend(parser, args)
    if args.out and not args.log:
        backend = "" if args.sdpa_backend == "default" else f"-{args.sdpa_backend}"
        args.log = str(Path(args.out) / f"pathfinder-{args.size}-{args.attention}{backend}.json")
    refuse_unwritable_outputs(parser, args)
    result = train(args)
    if args.log:
        write_whole(Path(args.log), json.dumps(result).encode())
        print(f"log written to {args.log}")
    if args.plot:
        plot([result], args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
