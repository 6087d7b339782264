"""`python -m aim_rt ...` runs the command line (also under torchrun)."""

from aim_rt.cli import main

main()
