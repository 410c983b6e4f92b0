"""``python -m kfac_cli``."""

from kfac_cli.cli import main

main()
