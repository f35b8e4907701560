"""Numbers and names more than one layer needs, defined once."""

NUM_CLASSES = 10              # MNIST's digits
MNIST_TRAIN_SIZE = 60_000     # training images
MNIST_TEST_SIZE = 10_000      # test images
# Set by the flmnist command ("inprocess" or "ray"), read in Flower's simulation process.
BACKEND_ENV = "FLMNIST_SIMULATION_BACKEND"
PRIVACY_LEDGER = "privacy_ledger.json"  # what a run has spent, after every accounting step (engine.privacy_ledger)
