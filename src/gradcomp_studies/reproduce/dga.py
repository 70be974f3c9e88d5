"""Table ``dga``: delayed gradient averaging (Zhu et al. 2021) against synchronous SGD and FedAvg.

Accuracy: every row is a ``gradcomp train`` run in the simulator (4 workers,
the same seed, data, model, learning rate and steps); only the way the
workers combine their work differs:

* synchronous SGD (``D = 0``);
* DGA with delay ``D`` in {5, 10, 15, 20}, with the correction
  (``w - lr (g_i - g_{i-D} + avg(g_{i-D}))``) and without it (the stale
  average alone, the paper's "w/o correction");
* FedAvg with period ``K`` in {5, 10, 20} (local steps, then the weights
  averaged), the other way to save communication rounds;
* DGA combined with local steps, K = 5 and D = 20 (``FedAvg(period=5,
  delay=20)``: each round's average applied 20 steps late, the worker's own
  progress since kept), the DGA paper's second table.

The image task trains with lr 0.005 and momentum 0.9, a one-epoch warm-up
and step decay: delayed momentum SGD tolerates a step 38-177x smaller than
synchronous SGD (D = 1-5, ``notes/dga-stability.md``), and at lr 0.05 the
rows without correction diverge from the first step.

Each on an image task (an MLP on Fashion-MNIST) and on a character LSTM
(Tiny Shakespeare), with the training data split i.i.d. among the workers
and skewed (each worker a few classes, or a few speakers:
``TrainConfig.data.partition``).

Speed: real gloo ranks train each task's model for a number of steps with
the latency emulated (``Communicator(emulate_latency_ms=L)``: a collective
completes no earlier than L ms after it was issued; this kernel has no
netem), and the step time of DGA and FedAvg is compared with synchronous
SGD's at the same latency.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import Check, Context, Result, Study, markdown_table, register, require_dataset, train_runs
from .compare import Task, score

if TYPE_CHECKING:
    from gradcomp.train.config import TrainConfig
    from gradcomp.train.data import Partition


@dataclass(frozen=True)
class Variant:
    """The settings of one variant of the study (:data:`FULL` or :data:`QUICK`)."""

    #: the tasks, each trained with every row: the image task and the language task
    tasks: tuple[Task, ...]
    #: the DGA delays D (steps), each a row with and one without the correction
    delays: tuple[int, ...]
    #: the FedAvg periods K (local steps between two averages of the weights)
    periods: tuple[int, ...]
    #: DGA with local steps: (period K, delay D) pairs
    combined: tuple[tuple[int, int], ...]
    #: the emulated latency of the speed measurement, in ms: a collective completes no earlier than this
    latency_ms: float
    #: the gloo ranks of the speed measurement
    ranks: int
    #: the steps timed per method and latency
    timed_steps: int
    #: diagnostic rows, trained after the table's: the rows where the pattern differs from the paper's (skewed
    #: images, the language task's delays) again at this fraction of the learning rate (None: none)
    diagnostic_lr: float | None = None


_CHAR_LSTM = (("hidden", 128), ("layers", 1))
_IMAGE: dict[str, Any] = dict(momentum=0.9, lr_warmup_epochs=1.0)
FULL = Variant(
    tasks=(Task("image", "fashion-mnist", "mlp", None, 15, 32, 0.005, lr_milestones=(10, 13), **_IMAGE),
           Task("language", "shakespeare", "lstm", 300_000, 8, 16, 0.3, model_options=_CHAR_LSTM,
                lr_warmup_epochs=0.5, lr_milestones=(6,), token_accuracy=True)),
    delays=(5, 10, 15, 20), periods=(5, 10, 20), combined=((5, 20),), latency_ms=100.0, ranks=4, timed_steps=60,
    diagnostic_lr=1 / 3)
QUICK = Variant(
    tasks=(Task("image", "fashion-mnist", "mlp", 4_096, 1, 32, 0.05, limit_test=1_000),
           Task("language", "shakespeare", "lstm", 20_000, 1, 8, 1.0, limit_test=3_000, model_options=_CHAR_LSTM,
                token_accuracy=True)),
    delays=(5,), periods=(5,), combined=((5, 5),), latency_ms=40.0, ranks=2, timed_steps=24)
PARTITIONS: dict[Partition, str] = {"iid": "i.i.d.", "skewed": "skewed"}
#: Published (DGA paper, Table 2: ResNet-18 on CIFAR-10, test accuracy): (w/o correction, with correction).
PUBLISHED = {5: ("88.7 %", "89.2 %"), 20: ("84.2 %", "88.7 %")}
#: Published next-character accuracy on Shakespeare, FedAvg K = 5 / 10 / 20 and DGA (K = 5, D = 20), as
#: issue 24 quotes the DGA paper's second table.
PUBLISHED_LANGUAGE = {"fedavg5": "47.6 %", "fedavg10": "47.3 %", "fedavg20": "47.4 %", "dga_k5_d20": "47.1 %"}


def rows(variant: Variant) -> dict[str, tuple[str, dict[str, Any]]]:
    """Row key -> (label, the ``TrainConfig.averaging`` fields that make it).

    Args:
        variant: the delays, periods and (K, D) pairs to make rows of.

    Returns:
        In table order: ``sync``; ``dga{D}`` and ``dga{D}_nc`` (without correction) per delay; ``fedavg{K}``
        per period; ``dga_k{K}_d{D}`` per combined pair.
    """
    out: dict[str, tuple[str, dict[str, Any]]] = {"sync": ("synchronous SGD (D = 0)", {})}
    for d in variant.delays:
        out[f"dga{d}"] = (f"DGA, D = {d}", {"dga_delay": d})
        out[f"dga{d}_nc"] = (f"DGA, D = {d}, w/o correction", {"dga_delay": d, "dga_correction": False})
    for k in variant.periods:
        out[f"fedavg{k}"] = (f"FedAvg, K = {k}", {"fedavg_period": k})
    for k, d in variant.combined:
        out[f"dga_k{k}_d{d}"] = (f"DGA with local steps, K = {k}, D = {d}", {"fedavg_period": k, "dga_delay": d})
    return out


def diagnostics(variant: Variant) -> list[tuple[str, Partition, str]]:
    """(task key, partition, row key) of the rows trained again at ``variant.diagnostic_lr`` times the lr.

    Args:
        variant: the variant; its largest delay and first combined pair name the rows.

    Returns:
        Skewed images: synchronous SGD and DGA at the largest delay with and without correction; i.i.d.
        language: synchronous SGD, DGA at the largest delay, FedAvg and DGA with local steps at the first
        combined pair.  Empty when ``variant.diagnostic_lr`` is None.
    """
    if variant.diagnostic_lr is None:
        return []
    d, (k, x) = max(variant.delays), variant.combined[0]
    return [*[("image", "skewed", key) for key in ("sync", f"dga{d}", f"dga{d}_nc")],
            *[("language", "iid", key) for key in ("sync", f"dga{d}", f"fedavg{k}", f"dga_k{k}_d{x}")]]


def configs(variant: Variant, seed: int) -> list[tuple[str, Partition, str, TrainConfig]]:
    """(task key, partition, row key, TrainConfig) of every run: the table's, then the diagnostic ones (their
    row key ends in ``@lr``).

    Every run is its task's config (:meth:`~gradcomp_studies.reproduce.compare.Task.config`) without gradient
    clipping, with the partition and the row's averaging fields set.

    Args:
        variant: the tasks, rows and diagnostic learning rate factor.
        seed: the seed of every run.

    Returns:
        Per task, per partition (:data:`PARTITIONS`), per row (:func:`rows`), then the rows of
        :func:`diagnostics` at the smaller learning rate (their label ends in ``lr VALUE``).
    """
    out: list[tuple[str, Partition, str, TrainConfig]] = []
    for task in variant.tasks:
        dense = task.config(seed).replace(optim={"clip_norm": None})  # no clipping here: the rows average late
        for partition in PARTITIONS:
            for key, (label, fields) in rows(variant).items():
                out.append((task.key, partition, key, dense.replace(
                    data={"partition": partition}, averaging=fields,
                    output={"label": f"{label}, {PARTITIONS[partition]}"})))
    made = {(t, p, k): cfg for t, p, k, cfg in out}
    for t, p, k in diagnostics(variant):
        assert variant.diagnostic_lr is not None  # diagnostics() is empty otherwise
        cfg = made[(t, p, k)]
        lr = cfg.optim.lr * variant.diagnostic_lr
        label = f"{cfg.output.label}, lr {lr:.3g}"
        out.append((t, p, f"{k}@lr", cfg.replace(optim={"lr": lr}, output={"label": label})))
    return out


# ----------------------------------------------------------------------------- speed under latency

def _speed_plan(variant: Variant) -> list[tuple[str, int, int]]:
    """(kind, delay or period, FedAvg's delay) of each method timed: synchronous SGD, DGA at the largest delay,
    FedAvg at each period, DGA with local steps."""
    return [("dga", 0, 0), ("dga", max(variant.delays), 0), *[("fedavg", k, 0) for k in variant.periods],
            *[("fedavg", k, d) for k, d in variant.combined]]


def _speed_label(kind: str, param: int, delay: int) -> str:
    if kind == "dga":
        return "synchronous SGD" if param == 0 else f"DGA, D = {param}"
    return f"FedAvg, K = {param}" if delay == 0 else f"DGA with local steps, K = {param}, D = {delay}"


def _speed_worker(rank: int, world: int, variant: Variant, seed: int) -> dict[str, list[float]]:
    """Per task: seconds per step of each plan entry, without latency and with ``variant.latency_ms``."""
    import torch

    from gradcomp.train.data import load_dataset
    from gradcomp.train.loop import Task as Batches
    from gradcomp.train.models import build_model

    from ..bench.latency import step_time

    out = {}
    for task in variant.tasks:
        torch.manual_seed(seed)
        data = load_dataset(task.dataset, limit_train=task.limit_train)
        model = build_model(task.model, data, **dict(task.model_options))
        batches = Batches(data, task.config(seed), 1)  # one worker's batches and loss, as gradcomp train computes them
        [shard] = next(batches.epoch(0))

        def loss_fn(m, batches=batches, shard=shard):
            return batches.loss(m, shard)

        step_time("dga", 0, 0.0, 4, model, loss_fn)  # warm-up, not timed
        out[task.key] = [step_time(kind, param, latency, variant.timed_steps, model, loss_fn, delay=delay)
                         for latency in (0.0, variant.latency_ms) for kind, param, delay in _speed_plan(variant)]
    return out


def measure_speed(variant: Variant, seed: int) -> dict[str, dict[tuple[str, int, int, float], float]]:
    """Per task: {(kind, param, delay, latency): seconds per step of the slowest rank}.

    ``variant.ranks`` gloo ranks (one thread each) train each task's model on one batch, ``variant.timed_steps``
    steps per method, once without latency and once with ``variant.latency_ms`` emulated.

    Args:
        variant: the tasks, the methods timed (synchronous SGD, DGA at the largest delay, FedAvg at each period,
            DGA with local steps), the latency, ranks and steps.
        seed: the seed of each task's model.

    Returns:
        Task key -> {(``"dga"`` or ``"fedavg"``, delay or period, FedAvg's delay, latency in ms): seconds per
        step}; synchronous SGD is ``("dga", 0, 0, latency)``.
    """
    from gradcomp.launch import spawn

    per_rank = spawn(_speed_worker, variant.ranks, variant, seed, timeout_s=1800, threads=1)
    keys = [(kind, param, delay, latency) for latency in (0.0, variant.latency_ms)
            for kind, param, delay in _speed_plan(variant)]
    return {task.key: {k: max(r[task.key][i] for r in per_rank) for i, k in enumerate(keys)}
            for task in variant.tasks}


# ----------------------------------------------------------------------------- the table

def _value(task: Task, summary: dict) -> float:
    """Higher is better: accuracy, or minus the perplexity; -inf for a diverged run."""
    if "diverged" in summary:
        return -math.inf
    return summary[task.metric] if task.accuracy else -summary[task.metric]


def _accuracy_table(variant: Variant, task: Task, results: dict) -> str:
    body = []
    for key, (label, fields) in rows(variant).items():
        published = ""
        if task.key == "image" and "fedavg_period" not in fields and fields.get("dga_delay") in PUBLISHED:
            published = PUBLISHED[fields["dga_delay"]][1 if fields.get("dga_correction", True) else 0]
        elif task.key == "language":
            published = PUBLISHED_LANGUAGE.get(key, "")
        done = [s for s in (results[(task.key, p, key)] for p in PARTITIONS) if "diverged" not in s]
        sent = f"{done[0]['bytes_sent'] / done[0]['steps'] / 1e6:.3g} MB" if done else "—"  # diverged at once
        body.append([label, *[score(task, results[(task.key, p, key)]) for p in PARTITIONS], sent, published])
    metric = {"test_accuracy": "test acc.", "test_token_accuracy": "next-char acc."}.get(task.metric,
                                                                                          "test ppl (chars)")
    source = "ResNet-18, CIFAR-10" if task.key == "image" else "Shakespeare, as issue 24 quotes it"
    return markdown_table(["row", *[f"{metric}, {name}" for name in PARTITIONS.values()], "sent / step / worker",
                           f"published ({source})"], body)


def _speed_table(variant: Variant, seconds: dict) -> str:
    body = []
    for task in variant.tasks:
        t = seconds[task.key]
        for kind, param, delay in _speed_plan(variant):
            base, slow = t[(kind, param, delay, 0.0)], t[(kind, param, delay, variant.latency_ms)]
            sync = t[("dga", 0, 0, variant.latency_ms)]
            body.append([task.key, _speed_label(kind, param, delay), f"{1e3 * base:.1f} ms", f"{1e3 * slow:.1f} ms",
                         f"{slow / base:.2f}x", f"{sync / slow:.2f}x"])
    lat = f"{variant.latency_ms:g} ms"
    return markdown_table(["task", "method", "step, L = 0", f"step, L = {lat}", "slowdown from latency",
                           f"speedup over synchronous SGD at L = {lat}"], body, align="llrrrr")


def _plot(variant: Variant, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(variant.tasks), figsize=(6 * len(variant.tasks), 4.2), squeeze=False)
    delays = (0, *variant.delays)
    for ax, task in zip(axes[0], variant.tasks):
        for partition, style in zip(PARTITIONS, ("-", "--")):
            def y(key: str, task: Task = task, partition: str = partition) -> float:
                s = results[(task.key, partition, key)]
                if "diverged" in s or not s[task.metric] < 1e4:
                    return math.nan  # no point: the run stopped, or its perplexity blew up (the table has it)
                return 100 * s[task.metric] if task.accuracy else s[task.metric]

            name = PARTITIONS[partition]
            ax.plot(delays, [y("sync")] + [y(f"dga{d}") for d in variant.delays], "o" + style, color="C0",
                    label=f"DGA, {name}")
            ax.plot(delays, [y("sync")] + [y(f"dga{d}_nc") for d in variant.delays], "s" + style, color="C3",
                    label=f"DGA w/o correction, {name}")
            ax.plot(variant.periods, [y(f"fedavg{k}") for k in variant.periods], "^" + style, color="C2",
                    label=f"FedAvg (x = period K), {name}")
            for k, d in variant.combined:
                ax.plot([d], [y(f"dga_k{k}_d{d}")], "D", color="C4", fillstyle="full" if style == "-" else "none",
                        label=f"DGA, K = {k} (x = D), {name}")
        ax.set_xlabel("delay D (steps)")
        ax.set_ylabel("test accuracy (%)" if task.accuracy else "test perplexity (log)")
        if not task.accuracy:
            ax.set_yscale("log")
        ax.set_title(f"{task.key}: {task.dataset}, {task.model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _diagnostics(variant: Variant, results: dict) -> tuple[str, list[str]]:
    """The diagnostic rows beside the table's, and what they show."""
    tasks = {task.key: task for task in variant.tasks}
    factor = variant.diagnostic_lr or 1.0
    body = []
    for t, p, key in diagnostics(variant):
        task, base, low = tasks[t], results[(t, p, key)], results[(t, p, f"{key}@lr")]
        body.append([f"{t}, {PARTITIONS[p]}", rows(variant)[key][0], f"{task.lr:g}: {score(task, base)}",
                     f"{task.lr * factor:.3g}: {score(task, low)}"])
    table = markdown_table(["task", "row", "lr of the table: score", "smaller lr: score"], body, align="llrr")
    d, (k, x) = max(variant.delays), variant.combined[0]

    def behind(t: str, p: str, key: str, suffix: str = "", than: str = "sync") -> float:  # points behind `than`
        task = tasks[t]
        return 100 * (_value(task, results[(t, p, than + suffix)]) - _value(task, results[(t, p, key + suffix)]))

    notes = []
    with_c, without = behind("image", "skewed", f"dga{d}"), behind("image", "skewed", f"dga{d}_nc")
    with_low, without_low = behind("image", "skewed", f"dga{d}", "@lr"), behind("image", "skewed", f"dga{d}_nc", "@lr")
    notes.append(f"Skewed images: DGA (D = {d}) is {with_c:.1f} points behind synchronous SGD with the correction "
                 f"and {without:.1f} without it; at {factor:.3g} x the lr, {with_low:.1f} and {without_low:.1f}.")
    if with_c > without:
        notes.append(f"Why the correction hurts here and not on i.i.d. data: it applies each worker's own last {d} "
                     "gradients at once (w - lr (g_i - g_(i-D) + avg g_(i-D))), so with skewed data each worker's "
                     f"model moves toward its own 2 or 3 classes for {d} steps before the average pulls it back, and "
                     "the scored model is the average of four models that disagree; without the correction every "
                     "worker applies the same stale average and the models stay equal. "
                     + ("At the smaller lr the harm shrinks, as a drift proportional to the step would."
                        if with_low - without_low < (with_c - without) / 2 else
                        "At the smaller lr the harm does not shrink by half: the step size alone does not explain it."))
    lang, lang_low = behind("language", "iid", f"dga{d}"), behind("language", "iid", f"dga{d}", "@lr")
    both = behind("language", "iid", f"dga_k{k}_d{x}", than=f"fedavg{k}")
    both_low = behind("language", "iid", f"dga_k{k}_d{x}", "@lr", than=f"fedavg{k}")
    language = tasks["language"]
    notes.append(f"Language, i.i.d.: DGA (D = {d}) is {lang:.1f} points of next-character accuracy behind "
                 f"synchronous SGD at lr {language.lr:g} and {lang_low:.1f} at lr {language.lr * factor:.3g}; DGA "
                 f"with local steps (K = {k}, D = {x}) is {both:.1f} and {both_low:.1f} points behind FedAvg K = {k}.")
    published = (f"The paper's flat Shakespeare figures ({PUBLISHED_LANGUAGE[f'fedavg{k}']} to "
                 f"{PUBLISHED_LANGUAGE[f'dga_k{k}_d{x}']})")
    if lang_low < lang / 2:
        notes.append("The delay's cost shrinks with the step: the stability limit of delayed SGD "
                     f"(notes/dga-stability.md). {published} come from far longer runs.")
    else:
        notes.append("The delay's cost does not shrink by half with the step, so it is not the stability limit of "
                     "delayed SGD. What it shares with the skewed images: the language task's i.i.d. split gives "
                     "each worker a contiguous block of rows of the text (its own scenes and speakers), so local "
                     "gradients differ from the average as they do with skewed images, and the correction keeps "
                     "each worker's own last D gradients on its own model (the cost grows with D: "
                     + ", ".join(f"D = {x_}: {behind('language', 'iid', f'dga{x_}'):.1f}" for x_ in variant.delays)
                     + " points); FedAvg pulls the models together every K steps. Not isolated further here (a "
                     f"split by random rows did not run). {published} come from far longer runs.")
    return table, notes


def _train(ctx: Context, variant: Variant) -> dict[tuple[str, str, str], dict]:
    """Train (or read back from ``--runs``) every row of ``configs``: {(task key, partition, row key): summary}.

    Raises:
        StudySkipped: a task's dataset is not on this machine.
    """
    for task in variant.tasks:
        require_dataset(task.dataset)
    runs = configs(variant, ctx.seed)
    with ctx.runs_folder("dga") as folder:
        summaries = train_runs(ctx, [cfg for *_, cfg in runs], folder)
    return {(t, p, k): s for (t, p, k, _), (s, _) in zip(runs, summaries)}


def _learning_check(full: bool, task: Task, iid: dict[str, dict]) -> Check:
    """Synchronous SGD, DGA and FedAvg learn on i.i.d. data (the rows without correction may not: the ablation)."""
    r = {k: s for k, s in iid.items() if not k.endswith("_nc")}
    if task.metric == "test_accuracy":
        floor = 0.5 if full else 0.3
        what = f"test accuracy above {100 * floor:g} %; chance is 10 %"
    else:
        vocab = require_dataset(task.dataset).vocab_size
        assert vocab is not None  # an lm dataset's (Dataset sets it)
        floor = 2 / vocab
        what = f"next-character accuracy above twice chance, {100 * floor:.1f} %"
    learned = all(_value(task, s) > floor for s in r.values())
    return Check(f"{task.key}, i.i.d.: synchronous SGD, DGA and FedAvg learn ({what})", learned,
                 ", ".join(score(task, s) for s in r.values()))


def _image_checks(variant: Variant, task: Task, iid: dict[str, dict], t: dict) -> list[Check]:
    """The issue's must-holds on i.i.d. Fashion-MNIST (full variant): DGA within a point of synchronous SGD, the
    stale average alone worse but training, DGA with local steps as good as FedAvg and faster."""
    d, lat, sync = max(variant.delays), variant.latency_ms, iid["sync"]
    checks = [Check(f"{task.key}, i.i.d.: DGA with the correction within 1 point of synchronous SGD at "
                    f"every D up to {d} (the paper, CIFAR-10: 89.2 % to 88.7 %)",
                    all(_value(task, iid[f"dga{x}"]) >= _value(task, sync) - 0.01 for x in variant.delays),
                    ", ".join(f"D = {x}: {score(task, iid[f'dga{x}'])}" for x in variant.delays)
                    + f"; synchronous {score(task, sync)}")]
    low = min(variant.delays)
    stale, fresh = iid[f"dga{low}_nc"], iid[f"dga{low}"]
    checks.append(Check(f"{task.key}, i.i.d.: DGA w/o correction at D = {low} worse than with it, but "
                        "training (above 50 %; the paper: 88.7 % against 89.2 %)",
                        0.5 < _value(task, stale) < _value(task, fresh),
                        f"{score(task, stale)} vs {score(task, fresh)}"))
    for k, x in variant.combined:
        both, fed = iid[f"dga_k{k}_d{x}"], iid[f"fedavg{k}"]
        quick, slow = t[("fedavg", k, x, lat)], t[("fedavg", k, 0, lat)]
        checks.append(Check(f"{task.key}, i.i.d.: DGA with local steps (K = {k}, D = {x}) within 1 point "
                            f"of FedAvg K = {k}, and faster at L = {lat:g} ms",
                            _value(task, both) >= _value(task, fed) - 0.01 and quick < slow,
                            f"{score(task, both)} vs {score(task, fed)}; {1e3 * quick:.1f} vs "
                            f"{1e3 * slow:.1f} ms a step ({slow / quick:.2f}x)"))
    return checks


def _speed_check(full: bool, variant: Variant, task: Task, t: dict) -> Check:
    """DGA at the largest delay steps faster than synchronous SGD under latency: by more than L / 2 (full), at all
    (quick: a busy CI machine moves both)."""
    d, lat = max(variant.delays), variant.latency_ms
    sync_s, dga_s = t[("dga", 0, 0, lat)], t[("dga", d, 0, lat)]
    detail = f"{1e3 * dga_s:.1f} vs {1e3 * sync_s:.1f} ms ({sync_s / dga_s:.2f}x)"
    if full:
        return Check(f"{task.key}: at L = {lat:g} ms, DGA (D = {d}) steps faster than synchronous SGD by "
                     "more than L / 2 (it hides the latency)", dga_s < sync_s - lat / 2e3, detail)
    return Check(f"{task.key}: at L = {lat:g} ms, DGA (D = {d}) steps faster than synchronous SGD", dga_s < sync_s,
                 detail)


def _checks(full: bool, variant: Variant, results: dict, seconds: dict) -> list[Check]:
    """Every check of the study, task by task."""
    checks = []
    d = max(variant.delays)
    for task in variant.tasks:
        iid = {k: results[(task.key, "iid", k)] for k in rows(variant)}
        checks.append(_learning_check(full, task, iid))
        if full and task.key == "image":
            checks += _image_checks(variant, task, iid, seconds[task.key])
        if full:  # the paper's finding, in its setting (i.i.d.); skewed data: the diagnostics
            with_c, without = iid[f"dga{d}"], iid[f"dga{d}_nc"]
            checks.append(Check(f"{task.key}, i.i.d.: at D = {d} the correction does at least as well as the stale "
                                "average alone (the paper's finding)", _value(task, with_c) >= _value(task, without),
                                f"{score(task, with_c)} vs {score(task, without)}"))
        checks.append(_speed_check(full, variant, task, seconds[task.key]))
    return checks


def _notes(variant: Variant, results: dict) -> list[str]:
    """One line per task and partition: the main rows' scores, and FedAvg's best period."""
    notes = []
    d, k = max(variant.delays), max(variant.periods)
    for task in variant.tasks:
        for partition in PARTITIONS:
            shown = {key: score(task, results[(task.key, partition, key)]) for key in rows(variant)}
            best = max(variant.periods, key=lambda p: _value(task, results[(task.key, partition, f"fedavg{p}")]))
            combined = "; ".join(f"DGA with local steps K = {a}, D = {b} {shown[f'dga_k{a}_d{b}']}"
                                 for a, b in variant.combined)
            notes.append(f"{task.key}, {PARTITIONS[partition]}: synchronous {shown['sync']}; DGA D = {d} "
                         f"{shown[f'dga{d}']} (w/o correction {shown[f'dga{d}_nc']}); FedAvg K = {k} "
                         f"{shown[f'fedavg{k}']} (its best period here: K = {best}); {combined}.")
    return notes


def _markdown(variant: Variant, results: dict, seconds: dict, notes: list[str]) -> str:
    """The report's body: an accuracy table per task, the step times, the published figures, the notes and the
    diagnostic rows."""
    sections = []
    for task in variant.tasks:
        sections += [f"## {task.key.capitalize()} task: {task.dataset}, {task.model}", "",
                     _accuracy_table(variant, task, results), ""]
    speed = _speed_table(variant, seconds)
    sections += [f"## Step time under emulated latency ({variant.ranks} gloo ranks)", "", speed, "",
                 "Latency is emulated (this kernel has no netem): every collective completes no earlier than L ms "
                 "after it was issued; bandwidth is loopback's. Published speedups of DGA over synchronous SGD "
                 "(real networks): up to 3.16x on CIFAR-10, 4.07x on Shakespeare.", "",
                 "Published (DGA paper, ResNet-18 on CIFAR-10, test accuracy without / with correction): "
                 "D = 5: 88.7 % / 89.2 %; D = 20: 84.2 % / 88.7 %.", "",
                 "Why the rows without correction need a small step: delayed momentum SGD is stable only for "
                 "lr * lambda_max under 0.1 at D = 1 and 0.0215 at D = 5 (3.8 synchronous), see "
                 "notes/dga-stability.md.", "",
                 "## Notes", "", *[f"- {n}" for n in notes], ""]
    if variant.diagnostic_lr is not None:
        table, why = _diagnostics(variant, results)
        sections += [f"## Where the pattern differs: the same rows at {variant.diagnostic_lr:.3g} x the learning "
                     "rate", "", table, "", *[f"- {n}" for n in why], ""]
    return "\n".join(sections)


def _setup(variant: Variant) -> list[str]:
    """The report's setup lines: each task's training, the partitions, the speed measurement."""
    setup = []
    for task in variant.tasks:
        schedule = (f", warm-up {task.lr_warmup_epochs:g} epoch(s)" if task.lr_warmup_epochs else "") + \
            (f", x0.1 at epoch {', '.join(map(str, task.lr_milestones))}" if task.lr_milestones else "")
        setup.append(f"{task.describe()}, {task.epochs} epoch(s), SGD lr {task.lr}{schedule}, momentum "
                     f"{task.momentum} (the optimizer's own, applied to the corrected gradient; FedAvg's stays local),"
                     " no clipping")
    setup.append("partitions: i.i.d. (images: a random global batch split among workers; characters: each worker a "
                 "contiguous block of rows of the text) and skewed (images: sorted by class, each worker a quarter, "
                 "2 or 3 classes; characters: speeches grouped by speaker, each worker its own speakers)")
    setup.append(f"speed: {variant.ranks} gloo ranks, {variant.timed_steps} steps per method on one batch, emulated "
                 f"latency {variant.latency_ms:g} ms, slowest rank")
    return setup


def run(ctx: Context) -> Result:
    """Train every row, time the methods under emulated latency, and build the report.

    The full variant trains 2 tasks x 2 partitions x 13 rows plus 7 diagnostic rows (``--runs`` keeps the
    finished rows, which a later invocation reads back instead of training them again); the quick one 2 x 2 x 5
    rows on small slices of the data.  The speed phase is never kept: it runs each time, on ``variant.ranks`` gloo
    ranks.

    Args:
        ctx: the run's context: ``ctx.full`` chooses the variant, ``ctx.seed`` seeds every run and the timed
            steps, ``ctx.runs_dir`` keeps the training runs.

    Returns:
        The report: one accuracy table per task (accuracy in % for images, next-character accuracy for the
        language task, per partition, with the MB sent per step and worker), the step times in ms at L = 0 and
        L = ``latency_ms``, the notes and diagnostic rows, the plot of each task's test metric against the delay
        D, and the checks.  ``data`` holds the variant, every run's summary under ``"TASK/PARTITION/ROW"`` and
        the seconds per step under ``"KIND-PARAM-DELAY-LATENCY"`` per task.

    Raises:
        StudySkipped: Fashion-MNIST or Tiny Shakespeare is not on this machine.
    """
    variant = FULL if ctx.full else QUICK
    results = _train(ctx, variant)
    ctx.echo(f"speed: {variant.ranks} gloo ranks, emulated latency {variant.latency_ms:g} ms")
    seconds = measure_speed(variant, ctx.seed)
    plot_path = ctx.path(".png")
    _plot(variant, results, plot_path)
    checks = _checks(ctx.full, variant, results, seconds)
    title = "Delayed gradient averaging: accuracy for delay D with and without correction, FedAvg, and speed " \
            "under emulated latency"
    markdown = _markdown(variant, results, seconds, _notes(variant, results))
    return Result(title=title, console=title + "\n\n" + markdown, markdown=markdown, checks=checks,
                  plots=[plot_path], setup=_setup(variant),
                  data={"variant": dataclasses.asdict(variant),
                        "rows": {f"{t}/{p}/{k}": s for (t, p, k), s in results.items()},
                        "seconds": {task: {f"{k}-{p}-{x}-{lat:g}": v for (k, p, x, lat), v in t.items()}
                                    for task, t in seconds.items()}})


register(Study("dga", "Delayed gradient averaging: delay, correction, FedAvg, i.i.d. and skewed data, speed under "
               "emulated latency", run, order=6, threads=1))
