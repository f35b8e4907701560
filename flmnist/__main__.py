"""``python -m flmnist`` runs the ``flmnist`` command."""

from flmnist.launch.cli import main

main()
