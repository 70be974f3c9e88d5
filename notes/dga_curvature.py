"""The top Hessian eigenvalue of the Fashion-MNIST MLP's training loss along synchronous SGD (notes/dga-stability.md).

    python notes/dga_curvature.py LR MOMENTUM

gradcomp's "mlp" on the first 20,000 Fashion-MNIST images, batch 128, torch.manual_seed(0); lambda_max by 30
power iterations of Hessian-vector products on a fixed probe of 2,048 training images.
"""

import sys

import torch
from torch.nn import functional as F

from gradcomp.train.data import load_dataset
from gradcomp.train.models import build_model


def lambda_max(model, params, x, y, iters: int = 30) -> float:
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    v = [torch.randn_like(p) for p in params]
    lam = 0.0
    for _ in range(iters):
        norm = torch.sqrt(sum((a * a).sum() for a in v))
        v = [a / norm for a in v]
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        lam = sum((a * b).sum() for a, b in zip(hv, v)).item()
        v = [h.detach() for h in hv]
    return lam


def main(lr: float, momentum: float) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = load_dataset("fashion-mnist", limit_train=20_000)
    x, y = data.x_train, data.y_train
    model = build_model("mlp", data)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    g = torch.Generator().manual_seed(0)
    for step in range(1201):
        if step in (0, 50, 200, 600, 1200):
            lam = lambda_max(model, params, x[:2048], y[:2048])
            print(f"step {step}: lambda_max {lam:.2f}, lr * lambda_max {lr * lam:.3f}", flush=True)
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


if __name__ == "__main__":
    main(float(sys.argv[1]), float(sys.argv[2]))
