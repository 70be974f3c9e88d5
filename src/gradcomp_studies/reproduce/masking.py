"""Table ``masking``: keep only the largest gradients, without accumulation, and watch MNIST accuracy.

The keep-ratio sweep of the seed implementation's MNIST tables: each worker
keeps the ``keep`` % largest entries of every gradient tensor (exact top-k,
biases included) and drops the rest — no residual, no accumulation
(``Method(get("topk", density=keep/100), memory=Memory())``), with ordinary
momentum 0.9 in ``torch.optim.SGD``.  Keep 100 % is dense training (``none``);
keep 0 % sends nothing, so no update is ever applied and the model stays at
its initialisation (no training is run for it).  The sweep runs on 1 worker
and on 2 simulated workers (same global batch, split in two).

Then the same sweep with DGC (``gradcomp.DGC(density=keep/100)``: local
accumulation, momentum correction with factor masking, sparsity warm-up;
``torch.optim.SGD(momentum=0)`` since DGC owns momentum) on 2 workers.  Its
warm-up takes the paper's share of training (4 of 160 epochs, 2.5 %), so it
does not flatter DGC in a short run; each DGC row prints its average density
over the whole run beside its accuracy.

Every run starts from the same initialisation (seeded) and sees the same
batches; accuracy is on the full 10,000-image MNIST test set.

Sizes: the full variant trains a 256-128 MLP on all 60,000 training images
for 6 epochs (global batch 64) in 32 runs — about 24 minutes on one core of
a 2-core machine; the quick variant trains 6 runs on the first 8,000 images
for 3 epochs in about 20 seconds.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import torch

from gradcomp.compressors.base import get
from gradcomp.memory import Memory
from gradcomp.method import DGC, Method
from gradcomp.simulator import Simulator

from .common import (
    Check,
    Context,
    Result,
    Study,
    classification_loss,
    evaluate_classifier,
    markdown_table,
    new_figure,
    register,
    require_dataset,
    save_figure,
)

#: Published shape, from the seed implementation's MNIST tables: about 0.99 down to ~1 % kept, collapse at 0.1 %.
PUBLISHED_PLATEAU = 0.99  # "about 0.99" for keep >= 1 %
PUBLISHED_COLLAPSE = {1: 0.41, 2: 0.24}  # accuracy at keep 0.1 %, on one node and on two

FULL_KEEP = (100, 10, 5, 3, 2, 1, 0.9, 0.5, 0.3, 0.2, 0.1, 0)


@dataclass(frozen=True)
class Variant:
    """How big a run is: data, epochs, and which rows."""

    #: MNIST training images used (None: all 60,000)
    limit_train: int | None
    #: epochs of training per row
    epochs: int
    #: keep percentages of naive dropping on 1 worker (100: dense; 0: nothing sent, no training)
    keep_1: tuple[float, ...]
    #: keep percentages of naive dropping on 2 workers
    keep_2: tuple[float, ...]
    #: keep percentages (DGC's final density, in %) of DGC on ``dgc_workers`` workers
    keep_dgc: tuple[float, ...]
    #: images per step over all workers (split evenly among them)
    global_batch: int = 64
    #: the SGD learning rate
    lr: float = 0.05
    #: the momentum: the optimizer's for plain dropping, DGC's own for DGC
    momentum: float = 0.9
    #: the MLP's hidden layer widths
    hidden: tuple[int, ...] = (256, 128)
    #: simulated workers of the DGC rows
    dgc_workers: int = 2
    #: DGC's sparsity warm-up as a share of training, as in the paper
    warmup_share: float = 4 / 160

    @property
    def warmup_epochs(self) -> float:
        """DGC's warm-up in epochs: ``warmup_share * epochs``."""
        return self.warmup_share * self.epochs


FULL = Variant(limit_train=None, epochs=6, keep_1=FULL_KEEP, keep_2=FULL_KEEP,
               keep_dgc=tuple(k for k in FULL_KEEP if 0 < k < 100))
QUICK = Variant(limit_train=8000, epochs=3, keep_1=(100, 1, 0.1, 0), keep_2=(100, 0.1), keep_dgc=(0.1,))


@dataclass
class Row:
    """One run of the sweep: what it was, and what it measured (NaN and 0 until trained)."""

    #: ``"drop"`` (keep the largest entries, drop the rest) or ``"dgc"``
    kind: str
    #: the share of entries kept, in percent
    keep: float
    #: simulated workers
    workers: int
    #: final test accuracy on the 10,000 MNIST test images, 0 to 1
    accuracy: float = math.nan
    #: final mean test cross-entropy
    test_loss: float = math.nan
    #: bytes worker 0 sent over the whole run (payloads)
    bytes_sent: int = 0
    #: what worker 0 would have sent dense (fp32), over the whole run
    dense_bytes: int = 0
    #: DGC: average density of the sparsified tensors over the run; plain dropping: ``keep / 100``
    mean_density: float = math.nan
    #: optimizer steps taken
    steps: int = 0
    #: wall time of the training and evaluation, in seconds
    seconds: float = 0.0

    @property
    def ratio(self) -> float:
        """The compression ratio, ``dense_bytes / bytes_sent`` (inf when nothing was sent)."""
        return self.dense_bytes / self.bytes_sent if self.bytes_sent else math.inf

    @property
    def label(self) -> str:
        """The row's label in the tables: ``drop keep 1 % on 2 workers``."""
        what = "DGC" if self.kind == "dgc" else "drop"
        return f"{what} keep {_pct(self.keep)} on {self.workers} worker{'s' if self.workers > 1 else ''}"


def _pct(keep: float) -> str:
    return f"{keep:g} %"


def _method(row: Row, variant: Variant, steps_per_epoch: int) -> tuple[Method, float]:
    """The row's method and the optimizer momentum that goes with it."""
    if row.kind == "dgc":
        return DGC(density=row.keep / 100, momentum=variant.momentum, warmup_epochs=variant.warmup_epochs,
                   steps_per_epoch=steps_per_epoch), 0.0
    if row.keep >= 100:
        return Method(get("none")), variant.momentum
    return Method(get("topk", density=row.keep / 100), memory=Memory()), variant.momentum


def _train(row: Row, data, variant: Variant, seed: int, bar) -> None:
    from gradcomp.train.data import image_batches, steps_per_epoch
    from gradcomp.train.models import MLP

    torch.manual_seed(seed)
    model = MLP(data.input_shape, data.num_classes, hidden=variant.hidden)
    start = time.perf_counter()
    if row.keep <= 0:  # nothing is sent, nothing is applied: the model stays at its initialisation
        row.accuracy, row.test_loss = evaluate_classifier(model, data)
        row.mean_density = 0.0
        row.seconds = time.perf_counter() - start
        return
    method, momentum = _method(row, variant, steps_per_epoch(len(data.y_train), variant.global_batch))
    optimizer = torch.optim.SGD(model.parameters(), lr=variant.lr, momentum=momentum)
    sim = Simulator(model, method, row.workers, optimizer=optimizer)
    steps = steps_per_epoch(len(data.y_train), variant.global_batch)
    densities = []
    bar.set_postfix_str(row.label)
    for epoch in range(variant.epochs):
        for i, shards in enumerate(image_batches(data.x_train, data.y_train, variant.global_batch, row.workers,
                                                 epoch, seed)):
            sim.set_epoch(epoch + i / steps)
            if row.kind == "dgc":
                method = sim.method
                assert isinstance(method, DGC)  # a DGC row
                densities.append(method.current_density)
            sim.step(shards, classification_loss)
            bar.update(1)
    row.accuracy, row.test_loss = evaluate_classifier(model, data)
    row.bytes_sent = sim.bytes_sent[0]
    row.dense_bytes = sim.dense_bytes
    row.steps = sim.steps
    row.mean_density = sum(densities) / len(densities) if densities else row.keep / 100
    row.seconds = time.perf_counter() - start


def _rows(variant: Variant) -> list[Row]:
    rows = [Row("drop", k, 1) for k in variant.keep_1]
    rows += [Row("drop", k, 2) for k in variant.keep_2]
    rows += [Row("dgc", k, variant.dgc_workers) for k in variant.keep_dgc]
    return rows


def _find(rows: list[Row], kind: str, keep: float, workers: int) -> Row | None:
    for r in rows:
        if r.kind == kind and r.keep == keep and r.workers == workers:
            return r
    return None


def _acc(row: Row | None) -> str:
    return f"{row.accuracy:.4f}" if row is not None else "—"


def _published(keep: float, workers: int) -> str:
    if keep == 0.1:
        return f"{PUBLISHED_COLLAPSE[workers]:.2f}"
    if keep >= 1:
        return f"~{PUBLISHED_PLATEAU:.2f}"
    return "—"


def _accuracy_table(rows: list[Row], variant: Variant) -> str:
    keeps = sorted({r.keep for r in rows}, reverse=True)
    dgc_w = variant.dgc_workers
    body = []
    for k in keeps:
        dgc = _find(rows, "dgc", k, dgc_w)
        body.append([_pct(k), _acc(_find(rows, "drop", k, 1)), _published(k, 1), _acc(_find(rows, "drop", k, 2)),
                     _published(k, 2), _acc(dgc), f"{100 * dgc.mean_density:.3g} %" if dgc else "—"])
    return markdown_table(["keep", "drop, 1 worker", "published 1 node", "drop, 2 workers", "published 2 nodes",
                           f"DGC, {dgc_w} workers", "DGC avg density"], body)


def _traffic_table(rows: list[Row]) -> str:
    body = []
    for r in rows:
        if r.keep <= 0:
            body.append([r.label + " (no update applied)", f"{r.accuracy:.4f}", "0", "—", 0, "—"])
            continue
        body.append([r.label, f"{r.accuracy:.4f}", f"{r.bytes_sent / 1e6:.2f}", f"{r.ratio:.0f}x", r.steps,
                     f"{r.seconds:.1f} s"])
    return markdown_table(["run", "test acc.", "MB sent / worker", "ratio", "steps", "time"], body)


def _plot(rows: list[Row], variant: Variant, path) -> None:
    fig = new_figure(8.6, 5.0)
    ax = fig.add_subplot()
    series = [("drop", 1, "C0", "o", "drop small gradients, 1 worker"),
              ("drop", 2, "C1", "s", "drop small gradients, 2 workers"),
              ("dgc", variant.dgc_workers, "C2", "^", f"DGC, {variant.dgc_workers} workers")]
    for kind, workers, color, marker, label in series:
        pts = sorted((r.keep, r.accuracy) for r in rows if r.kind == kind and r.workers == workers and r.keep > 0)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, linewidth=1.6,
                    markersize=5, label=label)
    zero = [r for r in rows if r.keep <= 0]
    if zero:
        ax.axhline(zero[0].accuracy, color="0.4", linestyle=":", linewidth=1.2,
                   label=f"keep 0 % (no update): {zero[0].accuracy:.2f}")
    ax.plot([100, 1], [PUBLISHED_PLATEAU] * 2, color="0.25", linestyle="--", linewidth=1.0,
            label="published: ~0.99 down to 1 % kept")
    ax.plot([0.1], [PUBLISHED_COLLAPSE[1]], linestyle="none", marker="o", markerfacecolor="none", color="C0",
            markersize=9, markeredgewidth=1.5, label=f"published at 0.1 %, 1 node: {PUBLISHED_COLLAPSE[1]}")
    ax.plot([0.1], [PUBLISHED_COLLAPSE[2]], linestyle="none", marker="s", markerfacecolor="none", color="C1",
            markersize=9, markeredgewidth=1.5, label=f"published at 0.1 %, 2 nodes: {PUBLISHED_COLLAPSE[2]}")
    ax.set_xscale("log")
    ax.set_xlim(150, 0.07)  # keep decreases to the right, as in the table
    ax.set_xticks([100, 10, 5, 2, 1, 0.5, 0.2, 0.1])
    ax.set_xticklabels(["100", "10", "5", "2", "1", "0.5", "0.2", "0.1"])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("gradient entries kept per tensor (%, log scale)")
    ax.set_ylabel("MNIST test accuracy")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower left", fontsize="small", framealpha=0.9)
    size = "60,000" if variant.limit_train is None else f"{variant.limit_train:,}"
    ax.set_title(f"Dropping small gradients without accumulation vs DGC\n"
                 f"MLP {'-'.join(map(str, variant.hidden))} on {size} MNIST images, {variant.epochs} "
                 f"epoch{'s' if variant.epochs != 1 else ''}")
    save_figure(fig, path)


def _shape_notes(rows: list[Row], variant: Variant) -> list[str]:
    notes = []
    for w in (1, 2):
        r = _find(rows, "drop", 0.1, w)
        if r is None:
            continue
        collapsed = r.accuracy < 0.5
        pub = PUBLISHED_COLLAPSE[w]
        notes.append(f"Dropping at 0.1 % on {w} worker{'s' if w > 1 else ''}: {r.accuracy:.4f} "
                     f"(published {pub}) — " + ("collapses, as published." if collapsed else
                                                "it lags the dense run but does not collapse at this scale."))
    dense = _find(rows, "drop", 100, 1)
    low = [r for r in rows if r.kind == "drop" and r.workers == 1 and 1 <= r.keep < 100]
    if dense and low:
        worst = min(low, key=lambda r: r.accuracy)
        mlp = "-".join(map(str, variant.hidden))
        notes.append(f"Dense on 1 worker: {dense.accuracy:.4f} (published ~0.99; a {mlp} MLP after {variant.epochs} "
                     f"epochs). Worst kept >= 1 % on 1 worker: {worst.accuracy:.4f} at {_pct(worst.keep)}.")
    dgc = _find(rows, "dgc", 0.1, variant.dgc_workers)
    drop = _find(rows, "drop", 0.1, variant.dgc_workers)
    if dgc and drop:
        notes.append(f"At 0.1 % on {variant.dgc_workers} workers DGC reaches {dgc.accuracy:.4f} against "
                     f"{drop.accuracy:.4f} for plain dropping ({100 * (dgc.accuracy - drop.accuracy):+.2f} points), "
                     f"sending {100 * dgc.mean_density:.3g} % of the sparsified entries on average over the run "
                     f"(warm-up included) and every bias densely.")
    notes.append("Plain dropping sparsifies every tensor, biases included (at least one entry each); DGC sends "
                 "tensors with dim() == 1 or fewer than 1024 entries densely, as the paper does. Bytes are counted "
                 "from the payloads: a kept entry costs 8 bytes (fp32 value + int32 index) against 4 dense.")
    return notes


def _sweep(ctx: Context, variant: Variant, data) -> list[Row]:
    """Train every row of the variant, one after another, a progress bar counting the steps."""
    from gradcomp.train.data import steps_per_epoch

    rows = _rows(variant)
    assert data.y_train is not None  # an image dataset's
    steps = steps_per_epoch(len(data.y_train), variant.global_batch) * variant.epochs
    total = sum(steps for r in rows if r.keep > 0)
    with ctx.tqdm(total=total, desc="masking", unit="step") as bar:
        for row in rows:
            _train(row, data, variant, ctx.seed, bar)
            (bar.write if ctx.progress else ctx.echo)(f"{row.label}: test accuracy {row.accuracy:.4f}")
    return rows


def _accuracy_checks(full: bool, variant: Variant, rows: list[Row]) -> list[Check]:
    """Dense training learns; DGC at 0.1 % trains (quick) or is within a point of dense (full)."""
    dense1 = _find(rows, "drop", 100, 1)
    w = variant.dgc_workers
    dgc_low, dense_w = _find(rows, "dgc", 0.1, w), _find(rows, "drop", 100, w)
    checks = []
    if full:
        if dense1:
            checks.append(Check("dense training on 1 worker reaches 0.965", dense1.accuracy >= 0.965,
                                f"{dense1.accuracy:.4f}"))
        if dgc_low and dense_w:
            checks.append(Check(f"DGC at 0.1 % on {w} workers within 1 point of dense training on {w} workers",
                                dgc_low.accuracy >= dense_w.accuracy - 0.01,
                                f"{dgc_low.accuracy:.4f} vs {dense_w.accuracy:.4f}"))
        return checks
    if dense1:
        checks.append(Check("dense training on 1 worker is far above chance (> 0.85)", dense1.accuracy > 0.85,
                            f"{dense1.accuracy:.4f}"))
    if dgc_low:
        checks.append(Check(f"DGC at 0.1 % on {w} workers trains (> 0.85)", dgc_low.accuracy > 0.85,
                            f"{dgc_low.accuracy:.4f}"))
    return checks


def _checks(full: bool, variant: Variant, rows: list[Row], data) -> list[Check]:
    """Every check: the accuracy ones, keep 0 % at chance, DGC ahead of plain dropping at 0.1 %, and plain
    dropping's bytes exactly 8 per kept entry."""
    checks = _accuracy_checks(full, variant, rows)
    zero1 = _find(rows, "drop", 0, 1)
    if zero1:
        checks.append(Check("keep 0 % applies no update: accuracy stays at chance (< 0.3)", zero1.accuracy < 0.3,
                            f"{zero1.accuracy:.4f}"))
    w, margin = variant.dgc_workers, 0.02 if full else 0.03
    dgc_low, drop_low = _find(rows, "dgc", 0.1, w), _find(rows, "drop", 0.1, w)
    if dgc_low and drop_low:
        checks.append(Check(f"DGC beats plain dropping at 0.1 % on {w} workers by more than {margin} "
                            f"({100 * margin:g} points)", dgc_low.accuracy > drop_low.accuracy + margin,
                            f"{dgc_low.accuracy:.4f} vs {drop_low.accuracy:.4f}"))
    sparse_drop = [r for r in rows if r.kind == "drop" and 0 < r.keep < 100]
    bad = [r.label for r in sparse_drop
           if r.bytes_sent != r.steps * _topk_bytes_per_step(data, variant, r.keep)]
    checks.append(Check("plain dropping sends exactly 8 bytes per kept entry, ceil(keep * n) per tensor", not bad,
                        ", ".join(bad)))
    return checks


def _setup(variant: Variant, seed: int) -> list[str]:
    """The report's setup lines: the data, the model, the training, DGC's warm-up, the simulator."""
    size = "all 60,000" if variant.limit_train is None else f"the first {variant.limit_train:,}"
    return [f"data: MNIST, {size} training images, 10,000 test images",
            f"model: MLP {'-'.join(map(str, variant.hidden))} (torch.manual_seed({seed}) before each run: "
            "every row starts from the same weights)",
            f"training: {variant.epochs} epochs, global batch {variant.global_batch} (split evenly over the "
            f"workers), SGD lr {variant.lr}; momentum {variant.momentum} in the optimizer for plain dropping, "
            f"inside DGC for DGC",
            f"DGC: warm-up {variant.warmup_epochs:g} epochs ({100 * variant.warmup_share:g} % of training, the "
            "paper's 4 of 160), densities 25 % -> 6.25 % -> 1.56 % -> 0.39 % -> final",
            "workers simulated in one process (gradcomp.Simulator)"]


def _texts(title: str, variant: Variant, rows: list[Row]) -> tuple[str, str]:
    """The report's markdown body and its console text: the accuracy and traffic tables, the notes."""
    accuracy = _accuracy_table(rows, variant)
    traffic = _traffic_table(rows)
    notes = _shape_notes(rows, variant)
    markdown = "\n".join(["## Test accuracy beside the published shape", "", accuracy, "",
                           "Published (seed implementation's MNIST tables): about 0.99 down to ~1 % kept, collapse "
                           "near 0.1 % (0.41 on one node, 0.24 on two); no figures were given for the other rows.",
                           "", "## Traffic and time per run", "", traffic, "", "## Notes", "",
                           *[f"- {n}" for n in notes], ""])
    console = "\n".join([title, "", accuracy, "", traffic, "", *[f"* {n}" for n in notes]])
    return markdown, console


def run(ctx: Context) -> Result:
    """Train the keep-ratio sweep on MNIST (plain dropping on 1 and 2 workers, DGC on 2) and check its shape.

    Args:
        ctx: the run's context: ``ctx.full`` chooses the variant, ``ctx.seed`` seeds every run (the same initial
            weights and batches for each row).

    Returns:
        The report: test accuracy by keep ratio beside the published shape (about 0.99 down to 1 % kept,
        collapse near 0.1 %), DGC's mean density; the traffic table (MB sent per worker, ratio, steps, time);
        accuracy against the keep ratio plotted; the checks (dense well above chance, DGC at 0.1 % training and
        ahead of plain dropping at 0.1 %, keep 0 % at chance, plain dropping's bytes exactly 8 per kept entry).
        ``data`` holds the variant, every row and the published figures.

    Raises:
        StudySkipped: MNIST is not on this machine.
    """
    variant = FULL if ctx.full else QUICK
    data = require_dataset("mnist", "MNIST", limit_train=variant.limit_train)
    rows = _sweep(ctx, variant, data)
    checks = _checks(ctx.full, variant, rows, data)
    plot_path = ctx.path(".png")
    _plot(rows, variant, plot_path)
    title = "Keep-ratio sweep on MNIST: dropping small gradients vs DGC"
    markdown, console = _texts(title, variant, rows)
    data_out = {"variant": dataclasses.asdict(variant),
                "rows": [{**vars(r), "ratio": r.ratio, "label": r.label} for r in rows],
                "published": {"plateau": PUBLISHED_PLATEAU, "collapse_at_0.1": PUBLISHED_COLLAPSE}}
    return Result(title=title, console=console, markdown=markdown, checks=checks, plots=[plot_path], data=data_out,
                  setup=_setup(variant, ctx.seed))


def _topk_bytes_per_step(data, variant: Variant, keep: float) -> int:
    """Bytes one worker sends per step when it keeps ``keep`` % of every tensor: 8 bytes per kept entry."""
    from fractions import Fraction

    from gradcomp.train.models import MLP

    with torch.device("meta"):
        model = MLP(data.input_shape, data.num_classes, hidden=variant.hidden)
    frac = Fraction(str(keep)) / 100
    return sum(8 * max(1, -((-p.numel() * frac.numerator) // frac.denominator)) for p in model.parameters())


register(Study("masking", "MNIST keep-ratio sweep: dropping small gradients (1 and 2 workers) vs DGC", run,
               order=1, threads=1))
