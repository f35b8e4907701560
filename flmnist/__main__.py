"""``python -m flmnist`` runs the ``flmnist`` command."""

from flmnist.cli import main

main()
