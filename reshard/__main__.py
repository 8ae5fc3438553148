"""``python -m reshard`` runs the CLI."""

from reshard.cli import main

main()
