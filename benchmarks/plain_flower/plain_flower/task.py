"""plain-flower: the model, the data and the train/test loops (plain PyTorch + torchvision)."""

import os

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, random_split
from torchvision.datasets import MNIST
from torchvision.transforms import Compose, Normalize, ToTensor

# Seed 002: node i holds every training example of these digits.
DIGIT_GROUPS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
HOLDOUT = 0.1  # share of a node's examples kept for local evaluation


class Net(nn.Module):
    """LeNet: conv 1->20 5x5, pool, conv 20->50 5x5, pool, fc 800->500, fc 500->10."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return F.log_softmax(self.fc2(x), dim=1)


def mnist(data_root: str, train: bool) -> MNIST:
    root = data_root or os.environ["FLMNIST_DATA_DIR"]
    transform = Compose([ToTensor(), Normalize((0.1307,), (0.3081,))])
    return MNIST(root, train=train, download=False, transform=transform)


_partitions = {}  # cached per process, like the quickstart's FederatedDataset


def load_data(partition_id: int, data_root: str, batch_size: int):
    """This node's (train, held-out) DataLoaders: the digits of its group, 90/10."""
    if partition_id not in _partitions:
        dataset = mnist(data_root, train=True)
        mine = torch.isin(dataset.targets, torch.tensor(DIGIT_GROUPS[partition_id]))
        part = Subset(dataset, mine.nonzero().flatten().tolist())
        generator = torch.Generator().manual_seed(partition_id)
        _partitions[partition_id] = random_split(part, [1 - HOLDOUT, HOLDOUT], generator=generator)
    train_set, holdout_set = _partitions[partition_id]
    return (DataLoader(train_set, batch_size=batch_size, shuffle=True),
            DataLoader(holdout_set, batch_size=1000))


def train(net, trainloader, steps, lr, device):
    """`steps` SGD steps (no momentum) on the node's data; returns the mean batch loss."""
    net.to(device).train()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    losses = []
    while len(losses) < steps:
        for images, labels in trainloader:
            optimizer.zero_grad()
            loss = F.nll_loss(net(images.to(device)), labels.to(device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return sum(losses) / len(losses)


@torch.no_grad()
def test(net, testloader, device):
    """(mean loss, accuracy) on a DataLoader."""
    net.to(device).eval()
    loss, correct = 0.0, 0
    for images, labels in testloader:
        images, labels = images.to(device), labels.to(device)
        out = net(images)
        loss += F.nll_loss(out, labels, reduction="sum").item()
        correct += (out.argmax(1) == labels).sum().item()
    n = len(testloader.dataset)
    return loss / n, correct / n
