"""``python -m sam4med``: the same command line as ``sam4med``."""

from sam4med.cli import app

app(prog_name="sam4med")
