"""``python -m flmnist`` runs the ``flmnist`` command."""

from flmnist.launch.command import main

main()
