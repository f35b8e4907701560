"""plain-flower: seed002's work as a plain, quickstart-style Flower app (Flower's FedAvg only).

flmnist's second benchmark reference (benchmarks/seed002.py --ratios). Same work as
`flmnist experiment=seed002 'eval.update_rounds=[]'`: 3 nodes holding digits 0-3, 4-6, 7-9
(90% of each for training), LeNet, 40 rounds of 10 SGD steps of batch 32 at lr 0.1, FedAvg
weighted by examples, the global model tested on the 10,000 test images after rounds
1, 11, 21, 31 and 40, no client evaluation.

    FLMNIST_DATA_DIR=/path/to/mnist flwr run benchmarks/plain_flower --stream \
        --federation-config "num-supernodes=3 client-resources-num-cpus=2"

Differs from flmnist (so accuracies differ slightly, run to run too): the held-out 10% is
drawn by torch's random_split (seeded by partition id), the clients' batch order is not
seeded, data comes through torchvision's MNIST dataset and DataLoader.
"""
