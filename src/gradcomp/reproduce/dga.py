"""Table ``dga``: delayed gradient averaging (Zhu et al. 2021) against synchronous SGD and FedAvg.

Accuracy: every row is a ``gradcomp train`` run in the simulator (4 workers,
the same seed, data, model, learning rate and steps); only the way the
workers combine their work differs:

* synchronous SGD (``D = 0``);
* DGA with delay ``D`` in {5, 10, 15, 20}, with the correction
  (``w - lr (g_i - g_{i-D} + avg(g_{i-D}))``) and without it (the stale
  average alone, the paper's "w/o correction");
* FedAvg with period ``K`` in {5, 10, 20} (local steps, then the weights
  averaged), the other way to save communication rounds.

Each on an image task (an MLP on Fashion-MNIST) and on a character LSTM
(Tiny Shakespeare), with the training data split i.i.d. among the workers
and skewed (each worker a few classes, or a few speakers:
``TrainConfig.partition``).

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

from .common import Check, Context, Result, Study, StudySkipped, markdown_table, register, train_runs
from .compare import Task, score


@dataclass(frozen=True)
class Variant:
    tasks: tuple[Task, ...]
    delays: tuple[int, ...]
    periods: tuple[int, ...]
    #: the emulated latency of the speed measurement, its ranks and steps per method
    latency_ms: float
    ranks: int
    timed_steps: int


_CHAR_LSTM = (("hidden", 128), ("layers", 1))
FULL = Variant(
    tasks=(Task("image", "fashion-mnist", "mlp", None, 1, 32, 0.05),
           Task("language", "shakespeare", "lstm", 300_000, 2, 16, 1.0, model_options=_CHAR_LSTM)),
    delays=(5, 10, 15, 20), periods=(5, 10, 20), latency_ms=100.0, ranks=4, timed_steps=60)
QUICK = Variant(
    tasks=(Task("image", "fashion-mnist", "mlp", 4_096, 1, 32, 0.05, limit_test=1_000),
           Task("language", "shakespeare", "lstm", 20_000, 1, 8, 1.0, limit_test=3_000, model_options=_CHAR_LSTM)),
    delays=(5,), periods=(5,), latency_ms=40.0, ranks=2, timed_steps=16)
PARTITIONS = {"iid": "i.i.d.", "skewed": "skewed"}
#: Published (DGA paper, Table 2: ResNet-18 on CIFAR-10, test accuracy): (w/o correction, with correction).
PUBLISHED = {5: ("88.7 %", "89.2 %"), 20: ("84.2 %", "88.7 %")}


def rows(variant: Variant) -> dict[str, tuple[str, dict]]:
    """Row key -> (label, the TrainConfig fields that make it)."""
    out = {"sync": ("synchronous SGD (D = 0)", {})}
    for d in variant.delays:
        out[f"dga{d}"] = (f"DGA, D = {d}", {"dga_delay": d})
        out[f"dga{d}_nc"] = (f"DGA, D = {d}, w/o correction", {"dga_delay": d, "dga_correction": False})
    for k in variant.periods:
        out[f"fedavg{k}"] = (f"FedAvg, K = {k}", {"fedavg_period": k})
    return out


def configs(variant: Variant, seed: int) -> list[tuple[str, str, str, object]]:
    """(task key, partition, row key, TrainConfig) of every run."""
    from ..train.loop import TrainConfig

    out = []
    for task in variant.tasks:
        for partition in PARTITIONS:
            for key, (label, fields) in rows(variant).items():
                out.append((task.key, partition, key, TrainConfig(
                    dataset=task.dataset, model=task.model, model_options=dict(task.model_options), method="none",
                    label=f"{label}, {PARTITIONS[partition]}", workers=task.workers, epochs=task.epochs,
                    batch_size=task.batch_per_worker, lr=task.lr, momentum=0.9, limit_train=task.limit_train,
                    limit_test=task.limit_test, seed=seed, simulate=True, partition=partition, **fields)))
    return out


# ----------------------------------------------------------------------------- speed under latency

def _speed_plan(variant: Variant) -> list[tuple[str, int]]:
    delay = max(variant.delays)
    return [("dga", 0), ("dga", delay)] + [("fedavg", k) for k in variant.periods]


def _speed_worker(rank: int, world: int, variant: Variant, seed: int) -> dict[str, list[float]]:
    """Per task: seconds per step of each plan entry, without latency and with ``variant.latency_ms``."""
    import torch

    from ..bench.latency import step_time
    from ..train.data import load_dataset
    from ..train.loop import Task as Batches, TrainConfig
    from ..train.models import build_model

    out = {}
    for task in variant.tasks:
        torch.manual_seed(seed)
        data = load_dataset(task.dataset, limit_train=task.limit_train)
        model = build_model(task.model, data, **dict(task.model_options))
        cfg = TrainConfig(dataset=task.dataset, model=task.model, model_options=dict(task.model_options),
                          method="none", batch_size=task.batch_per_worker, limit_train=task.limit_train, seed=seed,
                          progress=False)
        batches = Batches(data, cfg, 1)  # one worker's batches and loss, as gradcomp train computes them
        [shard] = next(batches.epoch(0))

        def loss_fn(m, batches=batches, shard=shard):
            return batches.loss(m, shard)

        step_time("dga", 0, 0.0, 4, model, loss_fn)  # warm-up, not timed
        out[task.key] = [step_time(kind, param, latency, variant.timed_steps, model, loss_fn)
                         for latency in (0.0, variant.latency_ms) for kind, param in _speed_plan(variant)]
    return out


def measure_speed(variant: Variant, seed: int) -> dict[str, dict[tuple[str, int, float], float]]:
    """Per task: {(kind, param, latency): seconds per step of the slowest rank}."""
    from ..launch import spawn

    per_rank = spawn(_speed_worker, variant.ranks, variant, seed, timeout_s=1800, threads=1)
    keys = [(kind, param, latency) for latency in (0.0, variant.latency_ms) for kind, param in _speed_plan(variant)]
    return {task.key: {k: max(r[task.key][i] for r in per_rank) for i, k in enumerate(keys)}
            for task in variant.tasks}


# ----------------------------------------------------------------------------- the table

def _value(task: Task, summary: dict) -> float:
    """Higher is better: accuracy, or minus the perplexity; -inf for a diverged run."""
    if "diverged" in summary:
        return -math.inf
    return summary[task.metric] if task.metric == "test_accuracy" else -summary[task.metric]


def _accuracy_table(variant: Variant, task: Task, results: dict) -> str:
    body = []
    for key, (label, fields) in rows(variant).items():
        published = ""
        if task.key == "image" and "dga_delay" in fields and fields["dga_delay"] in PUBLISHED:
            published = PUBLISHED[fields["dga_delay"]][1 if fields.get("dga_correction", True) else 0]
        done = [results[(task.key, p, key)] for p in PARTITIONS if "bytes_sent" in results[(task.key, p, key)]]
        sent = f"{done[0]['bytes_sent'] / done[0]['steps'] / 1e6:.3g} MB" if done else "—"  # diverged at once
        body.append([label, *[score(task, results[(task.key, p, key)]) for p in PARTITIONS], sent, published])
    metric = "test acc." if task.metric == "test_accuracy" else "test ppl (chars)"
    return markdown_table(["row", *[f"{metric}, {name}" for name in PARTITIONS.values()], "sent / step / worker",
                           "published (ResNet-18, CIFAR-10)"], body)


def _speed_table(variant: Variant, seconds: dict) -> str:
    body = []
    for task in variant.tasks:
        t = seconds[task.key]
        for kind, param in _speed_plan(variant):
            label = ("synchronous SGD" if param == 0 else f"DGA, D = {param}") if kind == "dga" else \
                f"FedAvg, K = {param}"
            base, slow = t[(kind, param, 0.0)], t[(kind, param, variant.latency_ms)]
            sync = t[("dga", 0, variant.latency_ms)]
            body.append([task.key, label, f"{1e3 * base:.1f} ms", f"{1e3 * slow:.1f} ms", f"{slow / base:.2f}x",
                         f"{sync / slow:.2f}x"])
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
            def y(key: str) -> float:
                s = results[(task.key, partition, key)]
                if "diverged" in s or not s[task.metric] < 1e4:
                    return math.nan  # no point: the run stopped, or its perplexity blew up (the table has it)
                return 100 * s[task.metric] if task.metric == "test_accuracy" else s[task.metric]

            name = PARTITIONS[partition]
            ax.plot(delays, [y("sync")] + [y(f"dga{d}") for d in variant.delays], "o" + style, color="C0",
                    label=f"DGA, {name}")
            ax.plot(delays, [y("sync")] + [y(f"dga{d}_nc") for d in variant.delays], "s" + style, color="C3",
                    label=f"DGA w/o correction, {name}")
            ax.plot(variant.periods, [y(f"fedavg{k}") for k in variant.periods], "^" + style, color="C2",
                    label=f"FedAvg (x = period K), {name}")
        ax.set_xlabel("delay D (steps)")
        ax.set_ylabel("test accuracy (%)" if task.metric == "test_accuracy" else "test perplexity (log)")
        if task.metric != "test_accuracy":
            ax.set_yscale("log")
        ax.set_title(f"{task.key}: {task.dataset}, {task.model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(ctx: Context) -> Result:
    from ..train.data import DatasetNotFoundError, load_dataset

    variant = FULL if ctx.full else QUICK
    for task in variant.tasks:
        try:
            load_dataset(task.dataset, limit_train=1)
        except DatasetNotFoundError as error:
            raise StudySkipped(f"{task.dataset} is needed for this table and was not found: {error}") from None
    runs = configs(variant, ctx.seed)
    with ctx.runs_folder("dga") as folder:
        summaries = train_runs(ctx, [cfg for *_, cfg in runs], folder)
    results = {(t, p, k): s for (t, p, k, _), (s, _) in zip(runs, summaries)}
    ctx.echo(f"speed: {variant.ranks} gloo ranks, emulated latency {variant.latency_ms:g} ms")
    seconds = measure_speed(variant, ctx.seed)
    plot_path = ctx.path(".png")
    _plot(variant, results, plot_path)

    checks, notes = [], []
    d, lat = max(variant.delays), variant.latency_ms
    for task in variant.tasks:
        # the stale average alone (w/o correction) is the ablation: it may not learn at this learning rate
        r = {k: results[(task.key, "iid", k)] for k in rows(variant) if not k.endswith("_nc")}
        if task.metric == "test_accuracy":
            floor = 0.5 if ctx.full else 0.3
            learned = all(_value(task, s) > floor for s in r.values())
            what = f"test accuracy above {100 * floor:g} %; chance is 10 %"
        else:
            vocab = load_dataset(task.dataset, limit_train=1).vocab_size
            learned = all(-_value(task, s) < vocab / 2 for s in r.values())
            what = f"perplexity under half the uniform guess, {vocab}"
        checks.append(Check(f"{task.key}, i.i.d.: synchronous SGD, DGA and FedAvg learn ({what})", learned,
                            ", ".join(score(task, s) for s in r.values())))
        if ctx.full:
            sync_iid, dga_iid = results[(task.key, "iid", "sync")], results[(task.key, "iid", f"dga{d}")]
            close = (_value(task, dga_iid) >= _value(task, sync_iid) - 0.01 if task.metric == "test_accuracy"
                     else -_value(task, dga_iid) <= -1.05 * _value(task, sync_iid))
            checks.append(Check(f"{task.key}, i.i.d.: DGA at D = {d} within "
                                + ("1 point" if task.metric == "test_accuracy" else "5 %")
                                + " of synchronous SGD (the paper, CIFAR-10: 88.7 % at D = 20 with the correction)",
                                close,
                                f"{score(task, dga_iid)} vs {score(task, sync_iid)}"))
            for partition in PARTITIONS:
                with_c = results[(task.key, partition, f"dga{d}")]
                without = results[(task.key, partition, f"dga{d}_nc")]
                checks.append(Check(f"{task.key}, {PARTITIONS[partition]}: at D = {d} the correction does at least as "
                                    "well as the stale average alone (the paper's finding)",
                                    _value(task, with_c) >= _value(task, without),
                                    f"{score(task, with_c)} vs {score(task, without)}"))
        t = seconds[task.key]
        sync, dga = t[("dga", 0, lat)], t[("dga", d, lat)]
        if ctx.full:
            checks.append(Check(f"{task.key}: at L = {lat:g} ms, DGA (D = {d}) steps faster than synchronous SGD by "
                                "more than L / 2 (it hides the latency)", dga < sync - lat / 2e3,
                                f"{1e3 * dga:.1f} vs {1e3 * sync:.1f} ms ({sync / dga:.2f}x)"))
        else:  # CI: a busy machine moves both; the behaviour only
            checks.append(Check(f"{task.key}: at L = {lat:g} ms, DGA (D = {d}) steps faster than synchronous SGD",
                                dga < sync, f"{1e3 * dga:.1f} vs {1e3 * sync:.1f} ms ({sync / dga:.2f}x)"))
        for partition in PARTITIONS:
            shown = {k: score(task, results[(task.key, partition, k)]) for k in rows(variant)}
            best = max(variant.periods, key=lambda k: _value(task, results[(task.key, partition, f"fedavg{k}")]))
            k = max(variant.periods)
            notes.append(f"{task.key}, {PARTITIONS[partition]}: synchronous {shown['sync']}; DGA D = {d} "
                         f"{shown[f'dga{d}']} (w/o correction {shown[f'dga{d}_nc']}); FedAvg K = {k} "
                         f"{shown[f'fedavg{k}']} (its best period here: K = {best}).")

    title = "Delayed gradient averaging: accuracy for delay D with and without correction, FedAvg, and speed " \
            "under emulated latency"
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
                 "## Notes", "", *[f"- {n}" for n in notes], ""]
    markdown = "\n".join(sections)
    setup = []
    for task in variant.tasks:
        setup.append(f"{task.describe()}, {task.epochs} epoch(s), SGD lr {task.lr}, momentum 0.9 (the optimizer's "
                     "own, applied to the corrected gradient), no clipping")
    setup.append("partitions: i.i.d. (images: a random global batch split among workers; characters: each worker a "
                 "contiguous block of rows of the text) and skewed (images: sorted by class, each worker a quarter, "
                 "2 or 3 classes; characters: speeches grouped by speaker, each worker its own speakers)")
    setup.append(f"speed: {variant.ranks} gloo ranks, {variant.timed_steps} steps per method on one batch, emulated "
                 f"latency {variant.latency_ms:g} ms, slowest rank")
    return Result(title=title, console=title + "\n\n" + markdown, markdown=markdown, checks=checks,
                  plots=[plot_path], setup=setup,
                  data={"variant": dataclasses.asdict(variant),
                        "rows": {f"{t}/{p}/{k}": s for (t, p, k), s in results.items()},
                        "seconds": {task: {f"{k}-{p}-{lat:g}": v for (k, p, lat), v in t.items()}
                                    for task, t in seconds.items()}})


register(Study("dga", "Delayed gradient averaging: delay, correction, FedAvg, i.i.d. and skewed data, speed under "
               "emulated latency", run, order=6, threads=1))
