"""``python -m cuflash``: the ``cuflash`` command without the installed script, as
``python -m cuflash.cli`` runs it."""

from cuflash.cli import main

main(prog_name="cuflash")
