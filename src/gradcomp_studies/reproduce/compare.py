"""Table ``compare``: every compressor on one image task and one language task, at matched steps.

Each row is a ``gradcomp train`` run in the simulator (4 workers, the same
seed, data, model, learning rate and number of steps for every row); only the
method differs.  Columns, in the shape of the PowerSGD paper's comparison:
final test accuracy (image) or perplexity (language), MB sent per worker per
epoch (counted from the real payloads), compression ratio, measured time per
step, and the time per step projected onto 1 Gbit/s links.

* image: the MLP (784-256-128-10, 235,146 parameters) on MNIST;
* language: the 2-layer character LSTM (256 units, 946,625 parameters) on Tiny Shakespeare.

The measured time per step is the simulator's: the 4 workers' forward,
backward and compression run one after another in one process, so it is
about 4x one worker's compute.  The projection takes a quarter of it as one
worker's compute and adds the ring-algorithm communication time of the bytes
the row sends (:func:`gradcomp.train.cost.estimate_step_time`: all-reduce
for dense, fp16, random-k and PowerSGD, all-gather for the rest).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .common import Check, Context, Result, Study, markdown_table, register, require_dataset, train_runs

if TYPE_CHECKING:
    from pathlib import Path

    from gradcomp.train.config import TrainConfig
    from gradcomp.train.data import DatasetName

#: Every compressor with the options it runs with here, and its row label.
METHODS: dict[str, tuple[str, dict, str]] = {
    "none": ("none", {}, "SGD (dense fp32)"),
    "fp16": ("fp16", {}, "fp16"),
    "topk": ("topk", {"density": 0.01}, "gradient dropping (top 1 %)"),
    "threshold": ("threshold", {"tau": 0.01}, "threshold quantization (τ 0.01)"),
    "dryden": ("dryden", {"proportion": 0.01}, "Dryden (1 % per sign)"),
    "randomk": ("randomk", {"density": 0.01}, "random-k (1 %)"),
    "onebit": ("onebit", {}, "1-bit SGD"),
    "terngrad": ("terngrad", {}, "TernGrad"),
    "qsgd": ("qsgd", {"levels": 16}, "QSGD (16 levels)"),
    "dorefa": ("dorefa", {"bits": 4}, "DoReFa gradients (4 bits)"),
    "adacomp": ("adacomp", {"bin_size": 50}, "AdaComp (L_T 50)"),
    "powersgd": ("powersgd", {"rank": 2}, "PowerSGD (rank 2)"),
    "dgc": ("dgc", {"density": 0.001}, "DGC (99.9 %)"),
}

#: Published (PowerSGD paper, ResNet-18 on CIFAR-10, 16 workers): test accuracy and data sent per epoch.
PUBLISHED = {"none": "94.3 %, 1023 MB", "powersgd": "94.4 %, 8 MB"}


@dataclass(frozen=True)
class Task:
    """One task of a study: the data, model and training every row of it shares (the ``dga`` study uses it too)."""

    #: the task's name in the tables and the report's data: ``"image"`` or ``"language"``
    key: str
    #: the dataset (:data:`~gradcomp.train.data.DATASETS`)
    dataset: DatasetName
    #: the model (:data:`~gradcomp.train.models.MODELS`)
    model: str
    #: training samples (images, or characters of text) taken (None: all)
    limit_train: int | None
    #: epochs of training
    epochs: int
    #: samples per worker and step (language models: rows of text)
    batch_per_worker: int
    #: the SGD learning rate
    lr: float
    #: test samples scored (None: all)
    limit_test: int | None = None
    #: the gradient clipping norm (None: no clipping)
    clip_norm: float | None = None
    #: simulated workers
    workers: int = 4
    #: the model's options (``TrainConfig.model.options``), as (key, value) pairs
    model_options: tuple[tuple[str, Any], ...] = ()
    #: SGD momentum
    momentum: float = 0.9
    #: the linear learning-rate warm-up, in epochs
    lr_warmup_epochs: float = 0.0
    #: the learning rate times 0.1 at each of these epochs
    lr_milestones: tuple[int, ...] = ()
    #: a language model scored by next-token accuracy instead of perplexity
    token_accuracy: bool = False

    @property
    def metric(self) -> str:
        """The summary key a row is scored by: ``test_accuracy``, ``test_token_accuracy`` or ``test_perplexity``."""
        if self.dataset in ("ptb", "shakespeare"):
            return "test_token_accuracy" if self.token_accuracy else "test_perplexity"
        return "test_accuracy"

    @property
    def accuracy(self) -> bool:
        """Whether the metric is an accuracy (higher is better, shown in %) rather than a perplexity."""
        return self.metric != "test_perplexity"

    def config(self, seed: int) -> TrainConfig:
        """The task as a ``gradcomp train`` config: its data, model, optimizer and schedule on simulated workers,
        the dense method (the studies choose theirs).

        Args:
            seed: the run's seed.

        Returns:
            The config, with SGD and the ``none`` method.
        """
        from gradcomp.train.config import Data, Exchange, Launch, Model, Optim, Schedule, TrainConfig

        return TrainConfig(
            data=Data(dataset=self.dataset, batch_size=self.batch_per_worker, limit_train=self.limit_train,
                      limit_test=self.limit_test),
            model=Model(name=self.model, options=dict(self.model_options)),
            exchange=Exchange(method="none"),
            optim=Optim(lr=self.lr, momentum=self.momentum, clip_norm=self.clip_norm),
            schedule=Schedule(epochs=self.epochs, lr_warmup_epochs=self.lr_warmup_epochs,
                              lr_milestones=list(self.lr_milestones)),
            launch=Launch(workers=self.workers, seed=seed, simulate=True))

    def describe(self) -> str:
        """``key: data, model, workers x batch`` for a report's setup.

        Returns:
            One line: the task's key, dataset, how much of it trains, the model and its options, the workers and
            batch.
        """
        size = "all" if self.limit_train is None else f"the first {self.limit_train:,}"
        unit = "characters" if self.dataset == "shakespeare" else "images"
        opts = ", ".join(f"{k}={v}" for k, v in self.model_options)
        model = f"{self.model} ({opts})" if opts else self.model
        return (f"{self.key}: {self.dataset}, {size} training {unit}, model {model}, {self.workers} simulated workers "
                f"× batch {self.batch_per_worker}")


FULL = (Task("image", "mnist", "mlp", None, 2, 32, 0.05),
        Task("language", "shakespeare", "lstm", 300_000, 2, 16, 1.0, clip_norm=1.0))
QUICK = (Task("image", "mnist", "mlp", 2_000, 1, 32, 0.05, limit_test=1_000),
         Task("language", "shakespeare", "lstm", 15_000, 1, 16, 1.0, limit_test=2_000, clip_norm=1.0,
              model_options=(("hidden", 128), ("layers", 1))))  # a smaller LSTM: CI time


def configs(task: Task, seed: int) -> list[TrainConfig]:
    """One ``gradcomp train`` config per compressor of :data:`METHODS`, in its order, on ``task``.

    Args:
        task: the data, model and training every row shares.
        seed: the seed of every run.

    Returns:
        The task's config with each method, its options and its label; DGC's warm-up is 1/40 of training.
    """
    base = task.config(seed)
    out = []
    for method, options, label in METHODS.values():
        if method == "dgc":
            options = {**options, "warmup_epochs": task.epochs / 40}
        out.append(base.replace(exchange={"method": method, "options": options}, output={"label": label}))
    return out


def score(task: Task, summary: dict) -> str:
    """A run's result as the tables print it: accuracy in %, perplexity to 3 decimals (in powers of ten
    once it has blown up past 1e4, or inf), or the epoch the run diverged in.

    Args:
        task: chooses the metric (:attr:`Task.metric`).
        summary: the run's summary (``summary.json``), with ``diverged`` set if it diverged.

    Returns:
        ``"97.12 %"``, ``"5.123"``, ``"3.2e+05 (blew up)"`` or ``"diverged (epoch 2)"``.
    """
    if "diverged" in summary:
        return f"diverged (epoch {summary['diverged_in_epoch']})"
    value = summary[task.metric]
    if task.accuracy:
        return f"{100 * value:.2f} %"
    return f"{value:.3f}" if value < 1e4 else f"{value:.1e} (blew up)"  # inf: beyond a float's range


def _table(task: Task, rows: dict[str, dict]) -> str:
    from gradcomp.train.cost import estimate_step_time

    body = []
    for key, s in rows.items():
        if "diverged" in s:
            body.append([METHODS[key][2], f"diverged in epoch {s['diverged_in_epoch']}", "—", "—", "—", "—",
                         PUBLISHED.get(key, "") if task.key == "image" else ""])
            continue
        per_epoch = s["bytes_sent"] / task.epochs
        projected = estimate_step_time(s["time_per_step"] / task.workers, s["bytes_sent"] / s["steps"],
                                       task.workers, 1.0, s["collective"])
        body.append([METHODS[key][2], score(task, s), f"{per_epoch / 1e6:.3g} MB", f"{s['compression_ratio']:.1f}x",
                     f"{1e3 * s['time_per_step']:.0f} ms", f"{1e3 * projected:.1f} ms",
                     PUBLISHED.get(key, "") if task.key == "image" else ""])
    metric = "test acc." if task.metric == "test_accuracy" else "test ppl (chars)"
    return markdown_table(["method", metric, "sent / epoch / worker", "ratio", "time / step (simulator)",
                           "projected step at 1 Gbit/s", "published (ResNet-18, CIFAR-10)"], body)


def _train(ctx: Context, tasks: tuple[Task, ...]) -> tuple[dict[str, dict[str, dict]], list[Path]]:
    """Train (or read back from ``--runs``) every method on each task: {task key: {method key: summary}}, and each
    task's plot of the training curves."""
    from gradcomp.train.report import plot_runs

    results: dict[str, dict[str, dict]] = {}
    plots = []
    with ctx.runs_folder("compare") as folder:
        for task in tasks:
            ctx.echo(f"{task.key} task: {task.dataset}, {task.model}")
            runs = train_runs(ctx, configs(task, ctx.seed), folder / task.key)
            results[task.key] = {key: s for key, (s, _) in zip(METHODS, runs)}
            plots.append(plot_runs([d for _, d in runs], ctx.path(f"-{task.key}.png")))
    return results, plots


def _byte_checks(full: bool, task: Task, ok: dict[str, dict]) -> list[Check]:
    """fp16 sends half the dense bytes, the sparsifiers over 20x fewer; full: DGC fewer than gradient dropping."""
    checks = []
    if {"none", "fp16"} <= ok.keys():
        checks.append(Check(f"{task.key}: fp16 sends exactly half of dense fp32",
                            2 * ok["fp16"]["bytes_sent"] == ok["none"]["bytes_sent"],
                            f"{ok['fp16']['bytes_sent']} vs {ok['none']['bytes_sent']}"))
    sparse = [k for k in ("topk", "dryden", "randomk", "dgc") if k in ok]
    checks.append(Check(f"{task.key}: the sparsifiers send under 5 % of the dense bytes",
                        all(ok[k]["compression_ratio"] > 20 for k in sparse),
                        ", ".join(f"{k} {ok[k]['compression_ratio']:.0f}x" for k in sparse)))
    if full and {"dgc", "topk"} <= ok.keys():
        checks.append(Check(f"{task.key}: DGC (0.1 %) sends fewer bytes than gradient dropping (1 %)",
                            ok["dgc"]["bytes_sent"] < ok["topk"]["bytes_sent"],
                            f"{ok['dgc']['compression_ratio']:.0f}x vs {ok['topk']['compression_ratio']:.0f}x"))
    return checks


def _learned(full: bool, task: Task, ok: dict[str, dict]) -> tuple[dict[str, bool], str]:
    """Whether each finished method learned (test accuracy over a floor, or perplexity under the uniform guess),
    and what that means."""
    if task.metric == "test_accuracy":
        floor = 0.9 if full else 0.2
        return ({k: r["test_accuracy"] > floor for k, r in ok.items()},
                f"test accuracy > {floor}; chance is 0.1")
    vocab = require_dataset(task.dataset).vocab_size
    assert vocab is not None  # an lm dataset's (Dataset sets it)
    return {k: r["test_perplexity"] < vocab for k, r in ok.items()}, f"perplexity below the uniform guess, {vocab}"


def _dgc_check(task: Task, ok: dict[str, dict]) -> Check:
    """DGC within a point of dense accuracy, or 5 % of its perplexity, at matched steps."""
    dgc, dense = ok["dgc"], ok["none"]
    if task.metric == "test_accuracy":
        return Check(f"{task.key}: DGC within 1 point of dense at matched steps",
                     dgc["test_accuracy"] >= dense["test_accuracy"] - 0.01,
                     f"{dgc['test_accuracy']:.4f} vs {dense['test_accuracy']:.4f}")
    return Check(f"{task.key}: DGC within 5 % of dense perplexity at matched steps",
                 dgc["test_perplexity"] <= 1.05 * dense["test_perplexity"],
                 f"{dgc['test_perplexity']:.3f} vs {dense['test_perplexity']:.3f}")


def _checks(full: bool, task: Task, rows: dict[str, dict]) -> tuple[list[Check], list[str]]:
    """One task's checks, and its notes on the methods that diverged or did not learn."""
    ok = {k: r for k, r in rows.items() if "diverged" not in r}
    notes = [f"{task.key}: {METHODS[k][2]} diverged in epoch {rows[k]['diverged_in_epoch']} "
             f"(its gradients became non-finite; the run stopped there)." for k in rows.keys() - ok.keys()]
    checks = [Check(f"{task.key}: dense, DGC and PowerSGD train without diverging",
                    {"none", "dgc", "powersgd"} <= ok.keys(),
                    "diverged: " + (", ".join(sorted(rows.keys() - ok.keys())) or "none")),
              *_byte_checks(full, task, ok)]
    core = [k for k in ("none", "dgc", "powersgd") if k in ok]  # the methods this table is about
    learned, what = _learned(full, task, ok)
    checks.append(Check(f"{task.key}: dense, DGC and PowerSGD learn ({what})", all(learned[k] for k in core),
                        ", ".join(f"{k} {score(task, ok[k])}" for k in core)))
    notes += [f"{task.key}: {METHODS[k][2]} did not learn ({score(task, ok[k])}: {what.split(';')[0]} fails) "
              "with the shared learning rate and momentum 0.9 on top of its error feedback."
              for k, good in learned.items() if not good]
    if full and {"none", "dgc"} <= ok.keys():
        checks.append(_dgc_check(task, ok))
    return checks, notes


def _setup(tasks: tuple[Task, ...]) -> list[str]:
    """The report's setup lines: each task's data, model and training, and the methods' options."""
    setup = [f"{task.describe()}, {task.epochs} epochs, SGD lr {task.lr}, momentum 0.9"
             + (f", clip norm {task.clip_norm}" if task.clip_norm else "") for task in tasks]
    return setup + ["DGC warm-up: 1/40 of training (the paper's share); every other method as listed, with its "
                    "error feedback where it has one"]


def _markdown(tasks: tuple[Task, ...], tables: dict[str, str], notes: list[str]) -> str:
    """The report's body: a table per task, the published figures, how the step times were taken, the notes."""
    markdown = []
    for task in tasks:
        markdown += [f"## {task.key.capitalize()} task: {task.dataset}, {task.model}", "", tables[task.key], ""]
    markdown += ["Published (PowerSGD paper, ResNet-18 on CIFAR-10): SGD 94.3 % sending 1023 MB per epoch, "
                 "rank-2 PowerSGD 94.4 % sending 8 MB.", "",
                 "Time per step is measured in the simulator (4 workers one after another in one process); the "
                 "projection is a quarter of it plus ring-algorithm communication at 1 Gbit/s per worker.", ""]
    if notes:
        markdown += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(markdown)


def run(ctx: Context) -> Result:
    """Train every compressor of :data:`METHODS` on the image and the language task at matched steps.

    Args:
        ctx: the run's context: ``ctx.full`` chooses the tasks (:data:`FULL` or :data:`QUICK`), ``ctx.seed``
            seeds every run, ``ctx.jobs`` how many train at once, ``ctx.runs_dir`` keeps the runs.

    Returns:
        The report: per task, each method's test accuracy (%) or perplexity, MB sent per worker and epoch,
        compression ratio, measured time per step (ms, the simulator's 4 workers in one process) and the step
        time projected onto 1 Gbit/s links; the training curves per task; the checks (dense, DGC and PowerSGD
        train and learn, fp16 sends half the dense bytes, the sparsifiers over 20x; full: DGC under top-k's bytes
        and within a point of dense accuracy, or 5 % of its perplexity).  ``data`` holds the tasks, every run's
        summary and the methods.

    Raises:
        StudySkipped: MNIST or Tiny Shakespeare is not on this machine.
    """
    tasks = FULL if ctx.full else QUICK
    for task in tasks:
        require_dataset(task.dataset)
    results, plots = _train(ctx, tasks)
    checks, notes = [], []
    for task in tasks:
        task_checks, task_notes = _checks(ctx.full, task, results[task.key])
        checks += task_checks
        notes += task_notes
    tables = {task.key: _table(task, results[task.key]) for task in tasks}
    title = "Every compressor at matched steps: MNIST MLP and Tiny Shakespeare char-LSTM, 4 workers"
    console = "\n".join([title, ""] + [f"{t.key}\n{tables[t.key]}\n" for t in tasks] + [f"* {n}" for n in notes])
    return Result(title=title, console=console, markdown=_markdown(tasks, tables, notes), checks=checks,
                  plots=plots, setup=_setup(tasks),
                  data={"tasks": [dataclasses.asdict(t) for t in tasks],
                        "rows": results, "methods": {k: {"method": m, "options": o, "label": lab}
                                                      for k, (m, o, lab) in METHODS.items()}})


register(Study("compare", "every compressor at matched steps: accuracy / perplexity, MB per epoch, time per step",
               run, order=5, threads=1))
