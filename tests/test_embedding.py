"""DGC on a row-sparse embedding gradient (issue 24, item 1; see notes/embedding-divergence.md).

An embedding row gets gradient only in the steps its token is in the batch, and then a large one: its |v| is
among the largest, so it is sent the step its gradient arrives.  Momentum factor masking then zeroes its u, so
the momentum that dense momentum SGD would go on applying (m*g, m^2*g, ...: g/(1-m) in all) is dropped: such an
entry is trained by plain SGD, 1/(1-m) = 10x less than dense training moves it.
"""

import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gradcomp import DGC, Simulator, split_batch
from gradcomp.memory import lookup_table

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
        g[10:20] += 1e-3 * torch.randn(10, 64, dtype=torch.float64)  # a small background on a few other rows
        out.append(g)
    return out


@pytest.mark.parametrize("every", [1, 10])
def test_masking_drops_the_momentum_of_rows_sent_when_their_gradient_arrives(every):
    """The mechanism, measured: a row with gradient 1 every ``every`` steps for 200 steps.  Dense momentum SGD
    moves it sum(g)/(1-m) (less the tail still in the buffer); DGC without masking the same; DGC with the paper's
    masking on every tensor (``momentum_masking=True``) exactly sum(g): momentum-less SGD."""
    grads = _row_grads(200, every)
    total = sum(float(g[3, 0]) for g in grads)
    dense = _pushed(None, grads)
    assert dense == pytest.approx(total / (1 - M), rel=0.05)
    dgc = dict(density=0.02, warmup_steps=0, wire="plain")  # 82 of 4096 entries: row 3 goes every time it has one
    assert _pushed(DGC(momentum_masking=False, **dgc), grads) == pytest.approx(dense, rel=1e-6)
    assert _pushed(DGC(momentum_masking=True, **dgc), grads) == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("wire", ["plain", "compact"])
@pytest.mark.parametrize("every", [1, 10])
def test_by_default_a_lookup_table_keeps_its_momentum(every, wire):
    """53 of the weight's 64 rows never get gradient, so DGC's default masking (``"auto"``) takes it for a lookup
    table and does not mask it: row 3 moves as under dense momentum SGD."""
    grads = _row_grads(200, every)
    dense = _pushed(None, grads)
    assert _pushed(DGC(density=0.02, warmup_steps=0, wire=wire), grads) == pytest.approx(dense, rel=1e-4)


def test_the_default_masks_a_weight_whose_every_row_has_gradient_as_the_paper_does(digits):
    """Where no gradient leaves most of its rows at zero (the digits MLP), the default is the paper's masking,
    bit for bit: nothing but lookup tables changes."""
    from test_simulator import simulated

    x, y = digits
    runs = [simulated(x, y, 30, DGC(density=0.01, warmup_steps=0, momentum_masking=masking), workers=2)[0]
            for masking in ("auto", True, False)]
    auto, paper, none = ([p.detach() for p in model.parameters()] for model in runs)
    assert all(torch.equal(a, b) for a, b in zip(auto, paper))
    assert not all(torch.equal(a, b) for a, b in zip(auto, none))  # masking does act on this model


def test_lookup_table_is_a_gradient_with_most_rows_at_zero():
    g = torch.randn(5, 3, 2)
    assert not lookup_table(g) and not lookup_table(torch.randn(7)) and not lookup_table(torch.zeros(1, 4))
    g[1:3] = 0
    assert not lookup_table(g)  # 2 of 5 rows: dead units, not a table
    g[4] = 0
    assert lookup_table(g) and lookup_table(torch.zeros(3, 4))
    g[4, 2, 1] = 1e-30
    assert not lookup_table(g)


def test_momentum_masking_takes_auto_true_or_false():
    for bad in ["yes", "delayed", 1, None]:
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


MARGIN = 0.03  # DGC's final loss at most this much above dense training's (the dense loss is about 1.0)


@functools.cache
def _dense_loss():
    return _final_loss(None)


@pytest.mark.parametrize("density", [0.1, 0.001])
def test_dgc_tracks_dense_training_on_an_embedding(density):
    """The reproduction of the issue: default DGC within MARGIN of dense momentum SGD (measured: 1.005 dense;
    DGC 1.005 at 0.1, 1.017 at 0.001)."""
    dense = _dense_loss()
    dgc = _final_loss(DGC(density=density, warmup_steps=0))
    assert dgc <= dense + MARGIN, (dgc, dense)


def test_the_papers_masking_on_the_embedding_falls_behind():
    """The control that the reproduction sees the defect: masking the embedding too (``momentum_masking=True``)
    ends more than MARGIN above dense training (measured: 1.186 against 1.005)."""
    dense = _dense_loss()
    dgc = _final_loss(DGC(density=0.1, warmup_steps=0, momentum_masking=True))
    assert dgc > dense + MARGIN, (dgc, dense)
