"""Train a tiny causal transformer language model with cuflash attention, next to an exact copy
that uses torch's scaled_dot_product_attention, and compare the two loss curves.

The data are synthetic token streams with structure to learn: each next token is a fixed random
permutation of the current one with probability 0.9, a random token otherwise (the best possible
loss is about 0.74 nats for the default 64 tokens, from ln 64 ≈ 4.16 at the start). Both models
start from the same weights and see the same batches, so their losses agree step by step up to
rounding.

    python examples/train_tiny_lm.py                      # CUDA, bfloat16 autocast, 50 steps
    python examples/train_tiny_lm.py --device cpu --dtype float32 --steps 5 --seq-len 64

Prints one line per step and exits non-zero when the loss did not decrease or the two curves
differ by more than ``--tolerance``.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys

import torch
import torch.nn.functional as F

import cuflash.torch as cuflash_torch


class Block(torch.nn.Module):
    def __init__(self, dim: int, heads: int, attention):
        super().__init__()
        self.heads = heads
        self.attention = attention
        self.norm1 = torch.nn.LayerNorm(dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(),
                                       torch.nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, n, dim = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, dim // self.heads)
        q, k, v = qkv.unbind(2)                                   # (B, N, H, D) each
        out = self.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                             is_causal=True)                      # (B, H, N, D)
        x = x + self.proj(out.transpose(1, 2).reshape(b, n, dim))
        return x + self.mlp(self.norm2(x))


class TinyLM(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, heads: int, layers: int, max_len: int, attention):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.position = torch.nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = torch.nn.ModuleList(Block(dim, heads, attention) for _ in range(layers))
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def set_attention(self, attention):
        for block in self.blocks:
            block.attention = attention


def synthetic_batches(steps, batch, seq_len, vocab, device, seed):
    """``steps`` batches of (batch, seq_len + 1) tokens following a noisy permutation."""
    generator = torch.Generator().manual_seed(seed)
    permutation = torch.randperm(vocab, generator=generator)
    batches = []
    for _ in range(steps):
        tokens = torch.empty(batch, seq_len + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(vocab, (batch,), generator=generator)
        noise = torch.rand(batch, seq_len, generator=generator) < 0.1
        random = torch.randint(vocab, (batch, seq_len), generator=generator)
        for t in range(seq_len):
            tokens[:, t + 1] = torch.where(noise[:, t], random[:, t], permutation[tokens[:, t]])
        batches.append(tokens.to(device))
    return batches


def train(model, batches, *, lr, autocast_dtype, device_type):
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for tokens in batches:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with torch.autocast(device_type, dtype=autocast_dtype,
                            enabled=autocast_dtype is not None):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run(*, device="cuda", dtype="bfloat16", steps=50, batch=8, seq_len=256, vocab=64, dim=128,
        heads=4, layers=2, lr=3e-3, seed=0, compile=False):
    """Train both models; returns ``(cuflash_losses, sdpa_losses)``."""
    device = torch.device(device)
    autocast_dtype = None if dtype == "float32" else getattr(torch, dtype)
    torch.manual_seed(seed)
    model = TinyLM(vocab, dim, heads, layers, seq_len, cuflash_torch.scaled_dot_product_attention)
    model.to(device)
    twin = copy.deepcopy(model)
    twin.set_attention(F.scaled_dot_product_attention)
    if compile:
        model = torch.compile(model, fullgraph=True)
    batches = synthetic_batches(steps, batch, seq_len, vocab, device, seed)
    options = dict(lr=lr, autocast_dtype=autocast_dtype, device_type=device.type)
    return train(model, batches, **options), train(twin, batches, **options)


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


POSITIVE_INT = number(int, 1)


def main(argv=None) -> int:
    # the first paragraph, whole (its first line alone stopped mid-sentence)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--device", default="cuda",
                        help="a torch device: cuda (the default), cpu, cuda:1...")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                        help="autocast dtype (float32: no autocast)")
    parser.add_argument("--steps", type=number(int, 2), default=50,
                        help="at least 2: the check compares the last loss with the first")
    parser.add_argument("--batch", type=POSITIVE_INT, default=8)
    parser.add_argument("--seq-len", type=POSITIVE_INT, default=256)
    parser.add_argument("--dim", type=POSITIVE_INT, default=128)
    parser.add_argument("--heads", type=POSITIVE_INT, default=4)
    parser.add_argument("--layers", type=POSITIVE_INT, default=2)
    parser.add_argument("--lr", type=number(float, 0, above=True, finite=True), default=3e-3)
    # torch.manual_seed takes at most 2**64 - 1: a larger seed failed in a traceback
    parser.add_argument("--seed", type=number(int, 0, maximum=2**64 - 1), default=0,
                        help="initial weights and batches (default 0)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the cuflash model")
    parser.add_argument("--tolerance", type=number(float, 0), default=None,
                        help="largest allowed |loss difference| between the two models "
                             "(default 0.1 with autocast, 1e-3 in float32)")
    args = parser.parse_args(argv)
    if args.dim % args.heads:
        parser.error(f"--dim ({args.dim}) must be a multiple of --heads ({args.heads})")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device visible to torch; use --device cpu")
    ours, theirs = run(device=args.device, dtype=args.dtype, steps=args.steps, batch=args.batch,
                       seq_len=args.seq_len, dim=args.dim, heads=args.heads, layers=args.layers,
                       lr=args.lr, seed=args.seed, compile=args.compile)
    tolerance = args.tolerance
    if tolerance is None:
        tolerance = 1e-3 if args.dtype == "float32" else 0.1
    print(f"{'step':>5} {'cuflash':>10} {'sdpa':>10} {'|diff|':>10}")
    for step, (a, b) in enumerate(zip(ours, theirs)):
        print(f"{step:5d} {a:10.4f} {b:10.4f} {abs(a - b):10.2e}")
    worst = max(abs(a - b) for a, b in zip(ours, theirs))
    decreased = ours[-1] < 0.9 * ours[0]
    print(f"initial loss {ours[0]:.4f}, final {ours[-1]:.4f} (sdpa {theirs[-1]:.4f}); "
          f"largest |diff| {worst:.2e} (tolerance {tolerance:g})")
    if not decreased:
        print("FAIL: the loss did not decrease")
        return 1
    if not worst <= tolerance:
        print("FAIL: the cuflash and sdpa loss curves differ")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
