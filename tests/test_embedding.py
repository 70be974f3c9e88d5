"""DGC on a row-sparse embedding gradient (issue 24, item 1; see notes/embedding-divergence.md).

An embedding row gets gradient only in the steps its token is in the batch, and then a large one: its |v| is
among the largest, so it is sent the step its gradient arrives.  Momentum factor masking then zeroes its u, so
the momentum that dense momentum SGD would go on applying (m*g, m^2*g, ...: g/(1-m) in all) is dropped: such an
entry is trained by plain SGD, 1/(1-m) = 10x less than dense training moves it.
"""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradcomp import DGC, Simulator, split_batch

M = 0.9


def _pushed(method, grads):
    """How far entry (3, 0) of a zero-initialised 64x64 weight moves (lr 1) under ``grads``; ``method=None``:
    torch.optim.SGD with momentum M (the dense reference)."""
    model = nn.Linear(64, 64, bias=False).double()
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=M if method is None else 0.0)
    sim = None if method is None else Simulator(model, method, 1, optimizer=opt)
    for g in grads:
        if sim is None:
            opt.zero_grad()
            (model.weight * g).sum().backward()
            opt.step()
        else:
            sim.step([g], lambda mod, g: (mod.weight * g).sum())
    return -model.weight[3, 0].item()


def _row_grads(steps, every):
    torch.manual_seed(0)
    out = []
    for t in range(steps):
        g = torch.zeros(64, 64, dtype=torch.float64)
        if t % every == 0 and (every > 0 or t == 0):
            g[3] = 1.0  # row 3 "in the batch"
        g[10:] += 1e-3 * torch.randn(54, 64, dtype=torch.float64)  # a small dense background
        out.append(g)
    return out


@pytest.mark.parametrize("every", [1, 10])
def test_masking_drops_the_momentum_of_rows_sent_when_their_gradient_arrives(every):
    """The mechanism, measured: a row with gradient 1 every ``every`` steps for 200 steps.  Dense momentum SGD
    moves it sum(g)/(1-m) (less the tail still in the buffer); DGC without masking the same; DGC with masking
    exactly sum(g): momentum-less SGD."""
    grads = _row_grads(200, every)
    total = sum(float(g[3, 0]) for g in grads)
    dense = _pushed(None, grads)
    assert dense == pytest.approx(total / (1 - M), rel=0.05)
    dgc = dict(density=0.02, warmup_steps=0, wire="plain")  # 82 of 4096 entries: row 3 goes every time it has one
    assert _pushed(DGC(momentum_masking=False, **dgc), grads) == pytest.approx(dense, rel=1e-6)
    assert _pushed(DGC(**dgc), grads) == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("wire", ["plain", "compact"])
@pytest.mark.parametrize("every", [1, 10])
def test_delayed_masking_keeps_the_momentum_of_rows_sent_when_their_gradient_arrives(every, wire):
    """``momentum_masking="delayed"`` masks only entries that waited in v: a row sent whenever it has gradient
    moves as under dense momentum SGD (the compact wire's float16 rounding, kept in v, is not a wait)."""
    grads = _row_grads(200, every)
    dense = _pushed(None, grads)
    dgc = DGC(density=0.02, warmup_steps=0, wire=wire, momentum_masking="delayed")
    assert _pushed(dgc, grads) == pytest.approx(dense, rel=1e-5)


def test_momentum_masking_takes_true_false_or_delayed():
    for bad in ["yes", 1, None]:
        with pytest.raises(ValueError, match="momentum_masking"):
            DGC(momentum_masking=bad)


# -------------------------------------------------------------- the reproduction: a bag-of-embeddings classifier

VOCAB, DIM, CLASSES, LENGTH, BATCH, WORKERS, STEPS, LR = 5000, 32, 4, 8, 64, 2, 300, 0.5


class Bag(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, DIM)
        self.out = nn.Linear(DIM, CLASSES)

    def forward(self, x):
        return self.out(self.emb(x).mean(1))


def _batches():
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(VOCAB, CLASSES, generator=g)
    zipf = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float64) ** 1.1  # word frequencies
    for _ in range(STEPS):
        x = torch.multinomial(zipf, BATCH * LENGTH, replacement=True, generator=g).view(BATCH, LENGTH)
        yield x, teacher[x].sum(1).argmax(1)


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _final_loss(method):
    """Mean training loss over the last 100 of 300 steps; ``method=None``: SGD with momentum 0.9 on the full batch."""
    model = Bag()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=M if method is None else 0.0)
    sim = None if method is None else Simulator(model, method, WORKERS, optimizer=opt)
    losses = []
    for batch in _batches():
        if sim is None:
            opt.zero_grad()
            loss = _ce(model, batch)
            loss.backward()
            opt.step()
        else:
            loss = sim.step(split_batch(batch, WORKERS), _ce)
        losses.append(float(loss.detach()))
    return sum(losses[-100:]) / 100


MARGIN = 0.03  # DGC's final loss at most this much above dense training's


@pytest.mark.parametrize("density", [0.1, 0.001])
@pytest.mark.xfail(strict=True, reason="issue 24 item 1: momentum factor masking drops the momentum of embedding "
                   "rows sent in the step their gradient arrives (notes/embedding-divergence.md); no fix merged yet")
def test_dgc_tracks_dense_training_on_an_embedding(density):
    dense = _final_loss(None)
    dgc = _final_loss(DGC(density=density, warmup_steps=0))
    assert dgc <= dense + MARGIN, (dgc, dense)


@pytest.mark.parametrize("density", [0.1, 0.001])
def test_dgc_without_masking_tracks_dense_training_on_an_embedding(density):
    """The same run without masking: within the margin (the control that the margin is fair)."""
    dense = _final_loss(None)
    dgc = _final_loss(DGC(density=density, warmup_steps=0, momentum_masking=False))
    assert dgc <= dense + MARGIN, (dgc, dense)


@pytest.mark.parametrize("density", [0.1, pytest.param(0.001, marks=pytest.mark.xfail(
    strict=True, reason="at 0.001 most rows wait a few steps in v and are masked when sent, losing m^(s+1) of "
    "their momentum (notes/embedding-divergence.md)"))])
def test_dgc_with_delayed_masking_on_an_embedding(density):
    """``momentum_masking="delayed"``: where rows are sent when their gradient arrives (0.1), dense is tracked."""
    dense = _final_loss(None)
    dgc = _final_loss(DGC(density=density, warmup_steps=0, momentum_masking="delayed"))
    assert dgc <= dense + MARGIN, (dgc, dense)


@pytest.mark.parametrize("nesterov", [False, True])
def test_dgc_dense_with_delayed_masking_is_momentum_sgd(digits, nesterov):
    """At density 1 nothing waits, so ``"delayed"`` masks nothing: SGD with momentum on the averaged gradient
    (the paper's masking would make it momentum-less SGD)."""
    from test_simulator import assert_same_params, reference_sgd, simulated

    x, y = digits
    method = DGC(density=1.0, momentum=M, nesterov=nesterov, momentum_masking="delayed", warmup_steps=0,
                 wire="plain")
    model, _ = simulated(x, y, 50, method, workers=4)
    assert_same_params(model, reference_sgd(x, y, steps=50, momentum=M, nesterov=nesterov), rtol=1e-5)
