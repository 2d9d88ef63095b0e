"""The benchmark protocol of docs/design.md, in one command.

    python benchmarks/bench_attention.py             dense: N 1K–16K, D 64 and 128, causal and
                                                     not, forward and forward+backward, bf16
    python benchmarks/bench_attention.py --sparse    block-sparse masks against FlexAttention
    python benchmarks/bench_attention.py --smoke     tiny sizes: does everything run? (seconds)

Any other ``cuflash bench`` option may follow (``cuflash bench --help``); given later, it wins.
The sweep lives in ``cuflash.bench``, so an installed wheel runs the same thing as
``cuflash bench``.
"""

import sys

from cuflash.cli import main

PROTOCOL = ["--seq-lens", "1K,2K,4K,8K,16K", "--head-dims", "64,128", "--causal", "both",
            "--mode", "both", "--total-tokens", "16K", "--hidden", "2048", "--dtype", "bfloat16"]

if __name__ == "__main__":
    options = sys.argv[1:]
    # --smoke shrinks only the options left at their defaults, so the grid is not spelled out.
    grid = [] if "--smoke" in options else PROTOCOL
    main(["bench", *grid, *options], prog_name="bench_attention.py")
