import pytest
import torch
from torch import nn
from torch.nn import functional as F


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's bundled 8x8 digits (real data, offline): float64 features in [0, 1], int labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    return x, y


def mlp(seed: int = 0, hidden: int = 48, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(dtype)


def ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def batches(x, y, batch_size: int, steps: int):
    """Deterministic cycling mini-batches."""
    n = x.shape[0]
    for step in range(steps):
        start = (step * batch_size) % (n - batch_size)
        yield x[start:start + batch_size], y[start:start + batch_size]
