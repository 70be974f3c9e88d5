"""Table ``ablation``: the DGC paper's ablation at 99.9 % sparsity, 8 workers, batch-norm CNN, Fashion-MNIST and MNIST.

Rows (the paper's Table 1 order): the dense baseline (``none``, SGD momentum
0.9); naive pruning (top 0.1 % sent, the rest dropped: no accumulation, no
momentum correction, no warm-up); + local accumulation; + accumulation +
momentum correction; + accumulation + warm-up; DGC with all techniques.  Two
more rows show DGC on other wires: ``dgc`` sends gradcomp's default compact
wire (float16 values, Elias-Fano indices), ``dgc_plain`` the paper's fp32
values and int32 indices, and ``dgc_all`` the compact wire with the biases and
batch-norm parameters sparsified too (the configuration that sends ResNet-50's
gradient 1130x smaller, ``gradcomp bench wire``).  ``dgc_shared`` is DGC
with the shared index set (``DGC(aggregate="shared")``: one worker per step
picks the indices, every worker's values there are all-reduced), the
aggregation whose bytes per worker do not grow with the number of workers
(``gradcomp bench scaling``).  Every DGC row runs
``torch.optim.SGD(momentum=0)``: DGC owns momentum (the dense tensors'
momentum included); weight decay stays in the optimizer, scaled by
``1 / (1 - momentum)`` (:func:`gradcomp.sgd_settings`) so that every row
decays its weights as much as the dense row's momentum SGD does.

The warm-up takes the paper's share of training (4 of 160 epochs, 2.5 %), so a
short run does not flatter DGC; its schedule advances per step
(``steps_per_epoch``).  The learning rate drops 10x at 50 % and 75 % of the
steps, as in the paper's CIFAR runs: each row ends annealed, so its single
final evaluation is not a snapshot of a noisy iterate at the full rate.  Each
row prints its average density over the whole run (the mean of the schedule's
density over the steps, for the sparsified tensors) and the share of dense
bytes it sent, beside its accuracy.

8 workers are simulated in one process (``gradcomp.Simulator``); for a given
seed every row starts from the same initialisation and sees the same batches.
Accuracy is on the full 10,000-image test set of each dataset.

Sizes: the full variant trains on 30,000 images of each dataset for 8 epochs
(per-worker batch 32), and the dense, DGC and every-tensor-at-least-32-entries
rows of Fashion-MNIST four more times with the next four seeds: final
accuracy moves by up to half a point from seed to seed, as much as the
differences the checks look for, so they compare means over the five seeds
there.  `--jobs 2` trains two rows at a time; the
quick variant (CI) trains only the dense, naive, DGC and shared-index DGC rows
on a slice of MNIST.

``gradcomp reproduce ablation-long`` (:func:`run_long`) trains the dense row,
DGC and the 1028x row (every tensor, at least 32 entries) twice as long, 16
epochs, with five seeds: 8 epochs are 940 steps, and at density 0.001 a worker sends
each weight about once in them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradcomp.method import DGC, Method, SGDSettings, sgd_settings
from gradcomp.simulator import Simulator

from .common import (
    Check,
    Context,
    Result,
    Study,
    classification_loss,
    evaluate_classifier,
    map_runs,
    markdown_table,
    new_figure,
    register,
    require_dataset,
    save_figure,
)

#: Published (DGC paper, Table 1: ResNet-110 on CIFAR-10, 99.9 % sparsity): baseline accuracy and each row's delta.
PUBLISHED_BASELINE = 92.92
PUBLISHED_DELTA: dict[str, str] = {
    "dense": "92.92 % (baseline)",
    "naive": "does not converge",
    "accum": "-1.56",
    "accum_mc": "-0.36",
    "accum_warmup": "-1.03",
    "dgc": "+0.37",
    "dgc_plain": "—",
    "dgc_all": "—",
    "dgc_all32": "—",
    "dgc_shared": "—",
}

DENSITY = 0.001
ALL_ROWS = ("dense", "naive", "accum", "accum_mc", "accum_warmup", "dgc", "dgc_plain", "dgc_all", "dgc_all32",
            "dgc_shared")
#: The rows that are DGC as gradcomp ships it in some configuration: each should train as well as dense.
DGC_ROWS = ("dgc", "dgc_plain", "dgc_all", "dgc_all32")
LABELS = {
    "dense": "dense baseline",
    "naive": "naive pruning",
    "accum": "+ local accumulation",
    "accum_mc": "+ accumulation + momentum correction",
    "accum_warmup": "+ accumulation + warm-up",
    "dgc": "DGC (all techniques)",
    "dgc_plain": "DGC, the paper's wire (fp32 values + int32 indices)",
    "dgc_all": "DGC, every tensor sparsified",
    "dgc_all32": "DGC, every tensor sparsified, at least 32 entries of each",
    "dgc_shared": "DGC, one shared index set per step (all-reduced)",
}


@dataclass(frozen=True)
class Variant:
    """The settings of one variant of the ablation (:data:`FULL`, :data:`QUICK`, :data:`LONG`, :data:`LONG_QUICK`).

    Raises:
        ValueError: ``seeds`` below 1, a ``seed_rows`` key not among ``rows``, or ``seed_rows`` without ``dense``.
    """

    #: the datasets, each trained with every row (``"fashion-mnist"``, ``"mnist"``)
    datasets: tuple[str, ...]
    #: training images taken from each dataset (None: all)
    limit_train: int | None
    #: epochs of training per row
    epochs: int
    #: the row keys trained (:data:`ALL_ROWS` order)
    rows: tuple[str, ...]
    #: simulated workers
    workers: int = 8
    #: images per worker and step
    batch_per_worker: int = 32
    #: the initial learning rate
    lr: float = 0.1
    #: the momentum: the optimizer's for the dense row, DGC's own for the others
    momentum: float = 0.9
    #: weight decay (the DGC rows' scaled by ``1 / (1 - momentum)``, :func:`gradcomp.sgd_settings`)
    weight_decay: float = 1e-4
    #: DGC's warm-up as a share of training: the paper's 4 of 160 epochs
    warmup_share: float = 4 / 160
    #: the learning rate drops 10x at these shares of training (the paper's)
    decay_at: tuple[float, ...] = (0.5, 0.75)
    #: evaluate on the first N test images (quick variant only; None: the full test set)
    limit_test: int | None = None
    #: these rows of the first dataset also train with the next ``seeds - 1`` seeds (their mean is checked)
    seed_rows: tuple[str, ...] = ()
    #: how many seeds the ``seed_rows`` train with (``ctx.seed``, ``ctx.seed + 1``, ...)
    seeds: int = 1

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ValueError(f"ablation: seeds must be at least 1, got {self.seeds}")
        unknown = [k for k in self.seed_rows if k not in self.rows]
        if unknown:
            raise ValueError(f"ablation: seed_rows {unknown} are not among the rows {self.rows}")
        if self.seed_rows and "dense" not in self.seed_rows:
            raise ValueError(f"ablation: seed_rows {self.seed_rows} need the dense row to compare against")

    @property
    def global_batch(self) -> int:
        """Images per step over all workers: ``workers * batch_per_worker``."""
        return self.workers * self.batch_per_worker

    @property
    def warmup_epochs(self) -> float:
        """DGC's warm-up in epochs: ``warmup_share * epochs``."""
        return self.warmup_share * self.epochs


FULL = Variant(datasets=("fashion-mnist", "mnist"), limit_train=30_000, epochs=8, rows=ALL_ROWS,
               seed_rows=("dense", "dgc", "dgc_all32"), seeds=5)
QUICK = Variant(datasets=("mnist",), limit_train=3_000, epochs=1, rows=("dense", "naive", "dgc", "dgc_shared"),
                batch_per_worker=8, lr=0.05, limit_test=2_000)


@dataclass
class Row:
    """One trained row of the table: what it was, and what it measured (NaN and 0 until trained)."""

    #: the row's key (:data:`LABELS`)
    key: str
    #: the dataset it trained on
    dataset: str
    #: the seed of its initial weights and batch order
    seed: int = 0
    #: final test accuracy, 0 to 1
    accuracy: float = math.nan
    #: final mean test cross-entropy
    test_loss: float = math.nan
    #: the density of the sparsified tensors, mean over every step of the run (1.0 for the dense row)
    mean_density: float = math.nan
    #: bytes worker 0 sent over the whole run (payloads)
    bytes_sent: int = 0
    #: what worker 0 would have sent dense (fp32), over the whole run
    dense_bytes: int = 0
    #: optimizer steps taken
    steps: int = 0
    #: wall time of the training and evaluation, in seconds
    seconds: float = 0.0
    #: the last epoch's mean training loss
    final_train_loss: float = math.nan
    #: the mean training loss of each epoch
    history: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The row's label in the tables (:data:`LABELS`)."""
        return LABELS[self.key]

    @property
    def byte_share(self) -> float:
        """``bytes_sent / dense_bytes``: the share of the dense bytes sent (NaN before training)."""
        return self.bytes_sent / self.dense_bytes if self.dense_bytes else math.nan


def _method(key: str, variant: Variant, steps: int) -> Method:
    """The row's method."""
    from gradcomp.compressors.base import get

    if key == "dense":
        return Method(get("none"))
    w = variant.warmup_epochs
    options: dict[str, dict[str, Any]] = {
        "naive": dict(accumulate=False, momentum_correction=False, warmup_epochs=0),
        "accum": dict(momentum_correction=False, warmup_epochs=0),
        "accum_mc": dict(warmup_epochs=0),
        "accum_warmup": dict(momentum_correction=False, warmup_epochs=w),
        "dgc": dict(warmup_epochs=w),
        "dgc_plain": dict(warmup_epochs=w, wire="plain"),
        "dgc_all": dict(warmup_epochs=w, sparsify_all=True),
        "dgc_all32": dict(warmup_epochs=w, sparsify_all=True, min_entries=32),
        "dgc_shared": dict(warmup_epochs=w, aggregate="shared"),
    }
    kwargs = options[key]
    return DGC(density=DENSITY, momentum=variant.momentum, steps_per_epoch=steps, **kwargs)


def _sgd(key: str, variant: Variant) -> SGDSettings:
    """The row's ``torch.optim.SGD`` momentum and weight decay (the dense row's, as DGC owning momentum needs them)."""
    return sgd_settings(_method(key, variant, 1), variant.momentum, variant.weight_decay)


@functools.lru_cache(maxsize=2)
def _load(name: str, limit_train: int | None):
    from gradcomp.train.data import load_dataset

    return load_dataset(name, limit_train=limit_train)


def _train(key: str, dataset: str, variant: Variant, seed: int) -> Row:
    """Train one row from scratch (its own seed and data: rows may run in any order, in any process)."""
    from gradcomp.train.data import image_batches, steps_per_epoch
    from gradcomp.train.models import CNN

    row = Row(key, dataset, seed)
    data = _load(dataset, variant.limit_train)
    torch.manual_seed(seed)
    model = CNN(data.input_shape, data.num_classes)
    steps = steps_per_epoch(len(data.y_train), variant.global_batch)
    method = _method(row.key, variant, steps)
    optimizer = torch.optim.SGD(model.parameters(), lr=variant.lr, **_sgd(row.key, variant))
    total = variant.epochs * steps
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [round(s * total) for s in variant.decay_at], 0.1)
    sim = Simulator(model, method, variant.workers, optimizer=optimizer)
    densities: list[float] = []
    start = time.perf_counter()
    for epoch in range(variant.epochs):
        losses = []
        for shards in image_batches(data.x_train, data.y_train, variant.global_batch, variant.workers, epoch, seed):
            method = sim.method
            densities.append(method.current_density if isinstance(method, DGC) else 1.0)  # what this step sends
            loss = sim.step(shards, classification_loss).item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"{row.label}: training loss became {loss}")
            losses.append(loss)
            schedule.step()
        row.history.append(sum(losses) / len(losses))
    row.final_train_loss = row.history[-1]
    row.accuracy, row.test_loss = evaluate_classifier(model, data, variant.limit_test)
    row.mean_density = sum(densities) / len(densities)
    row.bytes_sent = sim.bytes_sent[0]
    row.dense_bytes = sim.dense_bytes
    row.steps = sim.steps
    row.seconds = time.perf_counter() - start
    return row


def _train_kept(key: str, dataset: str, variant: Variant, seed: int, folder: str) -> Row:
    """:func:`_train`, its row kept as ``folder/DATASET-KEY-seedSEED.json`` and read back when it was trained
    with the same variant (whatever other rows and seeds the study has) and seed (``--runs``: a stopped study
    resumes with the rows it had finished, and a new row or seed trains alone)."""
    path = Path(folder) / f"{dataset}-{key}-seed{seed}.json"
    settings = {"variant": dataclasses.asdict(variant), "seed": seed, "optimizer": _sgd(key, variant)}

    def training(kept: dict) -> dict:  # what trains this row: the study's other rows and seeds do not matter
        kept = json.loads(json.dumps(kept))
        study = ("rows", "seed_rows", "seeds")
        return {**kept, "variant": {k: v for k, v in kept["variant"].items() if k not in study}}

    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        if training(kept["settings"]) == training(settings):
            return Row(**{**kept["row"], "seed": seed})
    except (OSError, ValueError, KeyError, TypeError):
        pass  # absent, unreadable or from other settings: train it again
    row = _train(key, dataset, variant, seed)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "row": dataclasses.asdict(row)}), encoding="utf-8")
    tmp.replace(path)
    return row


def _seeds_table(repeats: list[Row], variant: Variant, seeds: list[int]) -> tuple[str, dict[str, float]]:
    """The rows trained with every seed: each seed's accuracy, the mean, the spread and the mean's distance
    to the dense row's mean; and the means."""
    by = {(r.key, r.seed): r.accuracy for r in repeats}
    mean = {k: sum(by[k, s] for s in seeds) / len(seeds) for k in variant.seed_rows}
    body = []
    for k in variant.seed_rows:
        accs = [by[k, s] for s in seeds]
        body.append([LABELS[k], *[f"{100 * a:.2f} %" for a in accs], f"{100 * mean[k]:.2f} %",
                     f"{100 * (max(accs) - min(accs)):.2f}",
                     "—" if k == "dense" else f"{100 * (mean[k] - mean['dense']):+.2f}"])
    headers = ["row", *[f"seed {s}" for s in seeds], "mean", "spread (max - min, points)", "mean Δ vs dense (points)"]
    return markdown_table(headers, body), mean


def _find(rows: list[Row], key: str) -> Row | None:
    return next((r for r in rows if r.key == key), None)


def _trained(rows: list[Row], key: str) -> Row:
    """:func:`_find` for a row every variant trains."""
    row = _find(rows, key)
    assert row is not None, key
    return row


def _table(rows: list[Row]) -> str:
    dense = _find(rows, "dense")
    body = []
    for r in rows:
        delta = "—" if dense is None or r.key == "dense" else f"{100 * (r.accuracy - dense.accuracy):+.2f}"
        body.append([r.label, f"{100 * r.accuracy:.2f} %", delta, PUBLISHED_DELTA[r.key],
                     f"{100 * r.mean_density:.3g} %", f"{100 * r.byte_share:.3g} %", f"{r.final_train_loss:.3f}",
                     f"{r.seconds:.1f} s"])
    return markdown_table(["row", "test acc.", "Δ vs dense (points)", "published Δ (ResNet-110, CIFAR-10)",
                           "avg density (sparsified)", "bytes sent / dense", "last-epoch train loss", "time"], body)


NAMES = {"fashion-mnist": "Fashion-MNIST", "mnist": "MNIST"}


def _plot(rows: list[Row], variant: Variant, path) -> None:
    fig = new_figure(8.6 * len(variant.datasets), 4.8)
    axes = fig.subplots(1, len(variant.datasets), squeeze=False)[0]
    size = "all" if variant.limit_train is None else f"{variant.limit_train:,}"
    for ax, name in zip(axes, variant.datasets):
        mine = [r for r in rows if r.dataset == name]
        xs = range(len(mine))
        colors = ["0.5" if r.key == "dense" else "C3" if r.key == "naive" else "C2" if r.key.startswith("dgc")
                  else "C0" for r in mine]
        bars = ax.bar(xs, [100 * r.accuracy for r in mine], color=colors)
        for b, r in zip(bars, mine):
            ax.annotate(f"{100 * r.accuracy:.2f}\n(avg density {100 * r.mean_density:.3g} %)",
                        (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize="x-small")
        dense = _find(mine, "dense")
        if dense is not None:
            ax.axhline(100 * dense.accuracy, color="0.3", linestyle="--", linewidth=1.0, label="dense baseline")
            ax.legend(loc="lower right", fontsize="small")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r.label.replace(" + ", "\n+ ").replace(" (", "\n(") for r in mine], fontsize="small")
        accs = [100 * r.accuracy for r in mine]
        ax.set_ylim(max(0.0, min(accs) - 5), min(100.0, max(accs)) + 4)  # the differences are tenths of a point
        ax.set_ylabel(f"{NAMES[name]} test accuracy (%)")
        ax.set_title(f"DGC ablation at 99.9 % sparsity, {variant.workers} workers\n"
                     f"BN CNN on {size} {NAMES[name]} images, {variant.epochs} epochs")
    save_figure(fig, path)


_ORDER = ("naive", "accum", "accum_mc", "dgc")  # the paper's rows rise in this order (warm-up alone aside)


def _notes(rows: list[Row], variant: Variant) -> list[str]:
    notes = []
    name = NAMES[rows[0].dataset]
    dense, naive, dgc = _find(rows, "dense"), _find(rows, "naive"), _find(rows, "dgc")
    if naive is not None and dense is not None:
        verdict = "does not converge (near chance)" if naive.accuracy < 0.2 else \
            "lags rather than diverges"
        notes.append(f"{name}: naive pruning reaches {100 * naive.accuracy:.2f} % against "
                     f"{100 * dense.accuracy:.2f} % dense: it {verdict} at this scale (published: does not converge).")
    if naive is not None and dgc is not None:
        notes.append(f"{name}: DGC with all techniques beats naive pruning by "
                     f"{100 * (dgc.accuracy - naive.accuracy):+.2f} points.")
    if dgc is not None and dense is not None:
        notes.append(f"{name}: DGC vs dense: {100 * (dgc.accuracy - dense.accuracy):+.2f} points (published +0.37), "
                     f"sending {100 * dgc.mean_density:.3g} % of the sparsified entries on average over the run "
                     f"(warm-up of {variant.warmup_epochs:g} epochs included).")
    shared = _find(rows, "dgc_shared")
    if shared is not None and dgc is not None:
        notes.append(f"{name}: DGC with one shared index set per step: {100 * shared.accuracy:.2f} % "
                     f"({100 * (shared.accuracy - dgc.accuracy):+.2f} points against DGC's own top-k per worker), "
                     f"sending {100 * shared.byte_share:.3g} % of the dense bytes whatever the number of workers.")
    present = [r for r in (_find(rows, k) for k in _ORDER) if r is not None]
    if len(present) == len(_ORDER):
        bad = [f"{a.label} ({100 * a.accuracy:.2f}) >= {b.label} ({100 * b.accuracy:.2f})"
               for a, b in zip(present, present[1:]) if a.accuracy >= b.accuracy]
        notes.append(f"{name}: the rows naive < + accumulation < + momentum correction < DGC order as the paper's."
                     if not bad else f"{name}: where the order differs from the paper's: " + "; ".join(bad)
                     + " (one seed; differences of a few tenths are within run-to-run noise at this scale).")
    return notes


def _need(variant: Variant) -> None:
    """Skip the study (``StudySkipped``, :func:`~gradcomp_studies.reproduce.common.require_dataset`) when a
    dataset of the variant is missing."""
    for name in variant.datasets:
        require_dataset(name, NAMES[name])


def _setup(variant: Variant, seed: int) -> list[str]:
    """The report's setup lines for ``variant``: data, model, training, sparsity."""
    names = " and ".join(NAMES[n] for n in variant.datasets)
    size = "all 60,000" if variant.limit_train is None else f"the first {variant.limit_train:,}"
    test = "all 10,000" if variant.limit_test is None else f"the first {variant.limit_test:,}"
    each = " each" if len(variant.datasets) > 1 else ""
    return [f"data: {names}, {size} training images{each}, {test} test images",
            f"model: gradcomp.train.models.CNN (batch norm, 390,634 parameters; torch.manual_seed({seed}) "
            "before each row: every row starts from the same weights)",
            f"training: {variant.workers} simulated workers, per-worker batch {variant.batch_per_worker} (global "
            f"{variant.global_batch}), {variant.epochs} epochs, SGD lr {variant.lr}"
            + (f" (10x lower at {', '.join(f'{100 * s:g} %' for s in variant.decay_at)} of the steps)"
               if variant.decay_at else "")
            + f", weight decay {variant.weight_decay}; momentum {variant.momentum} in the optimizer for the dense "
            f"row, inside DGC for the others (optimizer momentum 0, weight decay "
            f"{_sgd('dgc', variant)['weight_decay']:g}: the dense row's, as its momentum applies it)",
            f"sparsity: density {DENSITY} (99.9 %); warm-up {variant.warmup_epochs:g} epochs "
            f"({100 * variant.warmup_share:g} % of training, the paper's 4 of 160), advancing per step"]


def _train_rows(ctx: Context, variant: Variant, seeds: list[int]) -> tuple[list[Row], list[Row]]:
    """Train (or read back) every row on each dataset, then the seed rows with the other seeds: the rows of
    ``ctx.seed``, and the seed rows of every seed on the first dataset."""
    first = variant.datasets[0]
    with ctx.runs_folder("ablation") as folder:
        calls = [(k, name, variant, ctx.seed, str(folder)) for name in variant.datasets for k in variant.rows]
        calls += [(k, first, variant, seed, str(folder)) for seed in seeds[1:] for k in variant.seed_rows]
        every = map_runs(ctx, _train_kept, calls, desc="ablation rows",
                         describe=lambda r: f"{NAMES[r.dataset]}, {r.label}"
                                            + ("" if r.seed == ctx.seed else f" (seed {r.seed})")
                                            + f": test accuracy {r.accuracy:.4f}, avg density "
                                              f"{100 * r.mean_density:.3g} % ({r.seconds:.0f} s)")
    rows = [r for r in every if r.seed == ctx.seed]
    return rows, [r for r in every if r.dataset == first and r.key in variant.seed_rows]


def _full_checks(name: str, mine: list[Row], means: dict[str, float], seeds: list[int]) -> list[Check]:
    """Every DGC row within 0.5 points of dense (on the seeds' means where ``means`` has them), and DGC more than
    a point above naive pruning."""
    checks = []
    dense, naive, dgc = _trained(mine, "dense"), _trained(mine, "naive"), _trained(mine, "dgc")
    for r in (_trained(mine, k) for k in DGC_ROWS):
        if r.key in means:
            checks.append(Check(f"{NAMES[name]}: {r.label} at 99.9 %, mean of {len(seeds)} seeds, within 0.5 "
                                "points of the dense baseline's mean", means[r.key] >= means["dense"] - 0.005,
                                f"{means[r.key]:.4f} vs {means['dense']:.4f}"))
            continue
        checks.append(Check(f"{NAMES[name]}: {r.label} at 99.9 % within 0.5 points of the dense baseline",
                            r.accuracy >= dense.accuracy - 0.005, f"{r.accuracy:.4f} vs {dense.accuracy:.4f}"))
    checks.append(Check(f"{NAMES[name]}: DGC beats naive pruning by more than 1 point",
                        dgc.accuracy > naive.accuracy + 0.01, f"{dgc.accuracy:.4f} vs {naive.accuracy:.4f}"))
    return checks


def _quick_checks(name: str, mine: list[Row]) -> list[Check]:
    """Dense above 60 % and every row above 20 %: ~45 steps are too few for DGC's accumulated updates to catch
    up, so the quick run shows that every row trains."""
    dense = _trained(mine, "dense")
    return [Check(f"{NAMES[name]}: dense training is far above chance (> 0.6)", dense.accuracy > 0.6,
                  f"{dense.accuracy:.4f}"),
            Check(f"{NAMES[name]}: every row trains above chance (> 0.2)",
                  all(r.accuracy > 0.2 for r in mine), ", ".join(f"{r.accuracy:.4f}" for r in mine))]


def _checks(full: bool, per: dict[str, list[Row]], means: dict[str, float], seeds: list[int]) -> list[Check]:
    """Every dataset's checks; the seeds' ``means`` stand for the first dataset's rows."""
    checks = []
    for i, (name, mine) in enumerate(per.items()):
        checks += _full_checks(name, mine, means if i == 0 else {}, seeds) if full else _quick_checks(name, mine)
    return checks


def _all_notes(variant: Variant, per: dict[str, list[Row]]) -> list[str]:
    """Each dataset's notes (:func:`_notes`), then what the densities and bytes count."""
    return [*(n for mine in per.values() for n in _notes(mine, variant)),
            "Densities count the sparsified tensors (dim > 1, >= 1024 entries; every tensor for *every tensor "
            "sparsified*); the other rows send biases and batch-norm parameters densely. Bytes count payloads: "
            "about 3.5 bytes per sparse entry on the compact wire, 8 on the paper's, 4 per dense entry."]


def _texts(title: str, per: dict[str, list[Row]], seeds: list[int], seeds_table: str,
           notes: list[str]) -> tuple[str, str]:
    """The report's markdown body and its console text: a table per dataset, the seeds table, the published
    figures, the notes."""
    tables = {name: _table(mine) for name, mine in per.items()}
    published = (f"Published (DGC paper, Table 1, ResNet-110 on CIFAR-10): baseline {PUBLISHED_BASELINE} %; "
                 "naive pruning does not converge; -1.56, -0.36, -1.03 and +0.37 points for the other rows.")
    sections = []
    for name, table in tables.items():
        sections += [f"## {NAMES[name]}: test accuracy beside the published deltas", "", table, ""]
    seeds_title = f"{NAMES[next(iter(per))]} over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
    if seeds_table:
        sections += [f"## {seeds_title}", "", "Each seed draws its own initial weights and batch order; the checks "
                     "compare these means.", "", seeds_table, ""]
    markdown = "\n".join([*sections, published, "", "## Notes", "", *[f"- {n}" for n in notes], ""])
    console = "\n".join([title, "", *[f"{NAMES[n]}\n{t}\n" for n, t in tables.items()],
                          *([f"{seeds_title}\n{seeds_table}\n"] if seeds_table else []), *[f"* {n}" for n in notes]])
    return markdown, console


def run(ctx: Context) -> Result:
    """Train every row of the ablation on each dataset and compare them with the dense baseline.

    Each row is trained (or read back from ``--runs``) by :func:`_train_kept` in the simulator; the full variant
    trains the ten rows on Fashion-MNIST and MNIST and the seed rows four more times, the quick one four rows on a
    slice of MNIST.

    Args:
        ctx: the run's context: ``ctx.full`` chooses the variant, ``ctx.seed`` the first seed, ``ctx.jobs`` how
            many rows train at once, ``ctx.runs_dir`` keeps the rows.

    Returns:
        The report: per dataset, each row's test accuracy (%), its difference from dense in points beside the
        published delta, its mean density, share of the dense bytes, last-epoch training loss and time; the
        seeds table (full); a bar chart of the accuracies; the checks (full: every DGC row within 0.5 points of
        dense, on the mean of the seeds where there are several, and DGC more than a point above naive pruning;
        quick: dense above 60 % and every row above 20 %).
        ``data`` holds the variant, every row and the published figures.

    Raises:
        StudySkipped: a dataset of the variant is not on this machine.
    """
    variant = FULL if ctx.full else QUICK
    _need(variant)
    seeds = [ctx.seed + i for i in range(variant.seeds)]
    rows, repeats = _train_rows(ctx, variant, seeds)
    seeds_table, means = _seeds_table(repeats, variant, seeds) if variant.seeds > 1 else ("", {})
    per = {name: [r for r in rows if r.dataset == name] for name in variant.datasets}
    checks = _checks(ctx.full, per, means, seeds)
    notes = _all_notes(variant, per)
    plot_path = ctx.path(".png")
    _plot(rows, variant, plot_path)
    title = f"DGC ablation at 99.9 % sparsity: 8 workers, batch-norm CNN, {' and '.join(NAMES[n] for n in per)}"
    setup = _setup(variant, ctx.seed)
    if variant.seeds > 1:
        setup.insert(3, f"seeds: {', '.join(map(str, seeds))} for {', '.join(LABELS[k] for k in variant.seed_rows)} "
                        f"on {NAMES[variant.datasets[0]]}; {ctx.seed} for the others")
    markdown, console = _texts(title, per, seeds, seeds_table, notes)
    data_out = {"variant": dataclasses.asdict(variant),
                "rows": [{**vars(r), "label": r.label, "byte_share": r.byte_share} for r in rows],
                "seeds": seeds, "seed_rows": [{**vars(r), "label": r.label} for r in repeats],
                "published": {"baseline": PUBLISHED_BASELINE, "delta": PUBLISHED_DELTA}}
    return Result(title=title, console=console, markdown=markdown, checks=checks, plots=[plot_path],
                  data=data_out, setup=setup)


register(Study("ablation", "DGC ablation at 99.9 % sparsity: 8 workers, BN CNN, Fashion-MNIST and MNIST", run,
               order=2, threads=1))


# ---------------------------------------------------------------- ablation-long: the same rows trained twice as long

#: ``gradcomp reproduce ablation-long``: dense, DGC and DGC at 1028x (every tensor sparsified, at least 32 entries
#: of each) on Fashion-MNIST, 16 epochs instead of 8, five seeds.  At density 0.001 a worker sends each weight about
#: once in 940 steps, so the 8-epoch run ends before DGC's delayed updates have caught up; the paper's runs are
#: tens of thousands of steps long.
LONG = Variant(datasets=("fashion-mnist",), limit_train=30_000, epochs=16, rows=("dense", "dgc", "dgc_all32"),
               seed_rows=("dense", "dgc", "dgc_all32"), seeds=5)
LONG_QUICK = Variant(datasets=("mnist",), limit_train=1_024, epochs=2, rows=("dense", "dgc_all32"), workers=4,
                     batch_per_worker=8, lr=0.05, limit_test=2_000, seed_rows=("dense", "dgc_all32"), seeds=2)


def _paired(by: dict[tuple[str, int], Row], key: str, seeds: list[int]) -> dict[str, float]:
    """``key``'s accuracy minus dense's, seed by seed (a seed gives both rows the same initial weights and batches,
    so the differences are paired): their mean, its standard error and on how many seeds ``key`` is ahead."""
    diffs = torch.tensor([by[key, s].accuracy - by["dense", s].accuracy for s in seeds], dtype=torch.float64)
    error = float(diffs.std() / math.sqrt(len(seeds))) if len(seeds) > 1 else math.nan
    return {"mean": float(diffs.mean()), "standard_error": error, "ahead": int((diffs > 0).sum())}


def _plot_seeds(by: dict[tuple[str, int], Row], variant: Variant, seeds: list[int], path) -> None:
    fig = new_figure(7.0, 4.4)
    ax = fig.subplots()
    for i, key in enumerate(variant.seed_rows):
        accs = [100 * by[key, s].accuracy for s in seeds]
        color = "0.4" if key == "dense" else f"C{i + 1}"
        ax.plot(seeds, accs, marker="o", linestyle="none", color=color, label=LABELS[key])
        ax.axhline(sum(accs) / len(accs), color=color, linestyle="--", linewidth=0.8)
    ax.set_xticks(seeds)
    ax.set_xlabel("seed (initial weights and batch order, shared by both rows)")
    ax.set_ylabel(f"{NAMES[variant.datasets[0]]} test accuracy (%)")
    ax.set_title(f"Dense vs DGC, {variant.epochs} epochs, {variant.workers} workers (dashed: means)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), fontsize="small")
    save_figure(fig, path)


def run_long(ctx: Context) -> Result:
    """``ablation-long``: dense, DGC and DGC at 1028x trained twice as long (16 epochs) with five seeds.

    Args:
        ctx: the run's context: ``ctx.full`` chooses :data:`LONG` or :data:`LONG_QUICK`, ``ctx.seed`` the first
            of the seeds, ``ctx.jobs`` how many rows train at once, ``ctx.runs_dir`` keeps the rows.

    Returns:
        The report: the test accuracy (%) of each row and seed with their means, the paired differences from
        dense (mean in points, its standard error, on how many seeds each row is ahead, its share of the dense
        bytes), the last-epoch training losses, the accuracies plotted by seed and the checks (full: each row's
        mean within 0.5 points of dense's; quick: every row above 20 %).  ``data`` holds the variant, seeds,
        means, the paired differences and every row.

    Raises:
        StudySkipped: the variant's dataset is not on this machine.
    """
    variant = LONG if ctx.full else LONG_QUICK
    _need(variant)
    name = variant.datasets[0]
    seeds = [ctx.seed + i for i in range(variant.seeds)]
    with ctx.runs_folder("ablation-long") as folder:
        calls = [(k, name, variant, seed, str(folder)) for seed in seeds for k in variant.rows]
        rows = map_runs(ctx, _train_kept, calls, desc="ablation-long rows",
                        describe=lambda r: f"{r.label} (seed {r.seed}): test accuracy {r.accuracy:.4f}, "
                                           f"avg density {100 * r.mean_density:.3g} % ({r.seconds:.0f} s)")
    table, means = _seeds_table(rows, variant, seeds)
    by = {(r.key, r.seed): r for r in rows}
    compared = [k for k in variant.rows if k != "dense"]
    pairs = {key: _paired(by, key, seeds) for key in compared}
    paired = "\n\n".join(
        f"Seed by seed, {LABELS[key]} minus dense: {100 * p['mean']:+.2f} points on average (standard error "
        f"{100 * p['standard_error']:.2f}), ahead on {p['ahead']} of {len(seeds)} seeds; it sends "
        f"{100 * sum(by[key, s].byte_share for s in seeds) / len(seeds):.3g} % of the dense bytes over the run "
        "(warm-up included)." for key, p in pairs.items())
    losses = markdown_table(["row", *[f"seed {s}" for s in seeds]],
                            [[LABELS[k], *[f"{by[k, s].final_train_loss:.3f}" for s in seeds]] for k in variant.rows])
    if ctx.full:
        checks = [Check(f"{NAMES[name]}, {variant.epochs} epochs: {LABELS[k]} at 99.9 %, mean of {len(seeds)} seeds, "
                        "within 0.5 points of the dense baseline's mean", means[k] >= means["dense"] - 0.005,
                        f"{means[k]:.4f} vs {means['dense']:.4f}") for k in compared]
    else:
        checks = [Check(f"{NAMES[name]}: every row trains above chance (> 0.2)", all(r.accuracy > 0.2 for r in rows),
                        ", ".join(f"{r.accuracy:.4f}" for r in rows))]
    plot_path = ctx.path(".png")
    _plot_seeds(by, variant, seeds, plot_path)
    title = (f"DGC against dense over {len(seeds)} seeds: {variant.epochs} epochs, {variant.workers} workers, "
             f"{NAMES[name]}")
    setup = [*_setup(variant, ctx.seed),
             f"rows: {', '.join(LABELS[k] for k in variant.rows)} (the last is the configuration that sends "
             "ResNet-50's gradient 1028x smaller, results/bench-wire.md); seeds "
             f"{', '.join(map(str, seeds))}, each giving every row the same weights and batches"]
    markdown = "\n".join([f"## {NAMES[name]}: test accuracy by seed", "", table, "", paired, "",
                          "### Last-epoch training loss", "", losses, ""])
    console = "\n".join([title, "", table, "", paired, "", losses])
    data_out = {"variant": dataclasses.asdict(variant), "seeds": seeds, "means": means, "paired": pairs,
                "rows": [{**vars(r), "label": r.label, "byte_share": r.byte_share} for r in rows]}
    return Result(title=title, console=console, markdown=markdown, checks=checks, plots=[plot_path], data=data_out,
                  setup=setup)


register(Study("ablation-long", "dense vs DGC and DGC at 1028x trained twice as long (16 epochs), 5 seeds, "
                                "Fashion-MNIST",
               run_long, order=2, threads=1))
