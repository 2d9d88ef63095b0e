"""``python -m cuflash.cli``: the ``cuflash`` command without the installed script."""

from cuflash.cli import main

main(prog_name="cuflash")
