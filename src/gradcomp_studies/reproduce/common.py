"""The machinery every study shares: the registry, the run context, checks and the markdown report.

A study is a function ``run(ctx) -> Result`` registered under a table name
with :func:`register`.  Its ``kind`` says which command runs it:
``gradcomp reproduce TABLE`` (a published result) or ``gradcomp bench NAME``
(speed and bytes; its report is ``bench-NAME.md``).  ``ctx.full`` chooses the
variant:

* quick (CI): seconds to a couple of minutes, fixed seeds, and checks that
  hold with margin on those seeds;
* full: the table as it is meant to be read, run once and kept as
  ``results/TABLE.md``.

:func:`run_study` times the study, prints its tables, and writes
``DIR/TABLE.md`` (full) or ``DIR/TABLE-quick.md`` (quick) holding the command
that produced it, the seed, the machine, the date and the wall time, then the
study's own sections, its checks and its plots; the numbers behind the tables
go to ``DIR/TABLE[-quick].json``.  Nothing in a report is typed in by hand
except the published figures, which each study keeps in one labelled constant.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.nn import functional as F

from gradcomp.train.report import markdown_cell, new_figure
from gradcomp.train.rundir import json_default

if TYPE_CHECKING:
    from gradcomp.train.data import Dataset

__all__ = [
    "Check",
    "Context",
    "Outcome",
    "Result",
    "Study",
    "StudySkipped",
    "UnknownStudyError",
    "canonical_command",
    "discover",
    "get_study",
    "machine_info",
    "map_runs",
    "markdown_table",
    "memory_peak_mb",
    "new_figure",
    "register",
    "report_name",
    "require_dataset",
    "run_study",
    "save_figure",
    "studies",
    "train_runs",
]


class StudySkipped(Exception):
    """A study cannot run here (its data is missing); the message says why and how to fix it."""


class UnknownStudyError(ValueError):
    """No study is registered under the requested table name."""


@dataclass(frozen=True)
class Check:
    """One assertion of a study: what was checked, whether it held, and the numbers behind it.

    Args:
        name: what was checked, as a sentence (shown in the console and in the report's ``Checks`` section).
        passed: whether it held; a failed check makes the ``gradcomp reproduce`` command exit 1.
        detail: the measured numbers behind the verdict (empty: none shown).
    """

    name: str
    passed: bool
    detail: str = ""


@dataclass
class Context:
    """What a study is asked to do, and where it may write.

    :func:`run_study` builds it from the command's options and hands it to the study's ``run``.
    """

    #: the full variant (the published table) rather than the quick one that CI runs
    full: bool
    #: the folder for the report, its JSON data and the study's plots
    out_dir: Path
    #: the seed every run of the study starts from
    seed: int = 0
    #: show progress bars (``--no-progress`` hides them)
    progress: bool = True
    #: where a study prints its progress lines and tables
    echo: Callable[[str], None] = print
    #: the file stem of this run's outputs: ``TABLE`` or ``TABLE-quick``
    stem: str = ""
    #: independent runs a study may train at once, each in its own process (:func:`map_runs`)
    jobs: int = 1
    #: where training runs are kept (``--runs``): None trains them in a temporary folder
    runs_dir: Path | None = None

    def path(self, suffix: str) -> Path:
        """A file of this run in the output folder: ``path(".png")`` -> ``DIR/TABLE[-quick].png``.

        Args:
            suffix: appended to the run's stem, dot included (``".png"``, ``"-curves.png"``).

        Returns:
            ``out_dir / (stem + suffix)``; nothing is created.
        """
        return self.out_dir / f"{self.stem}{suffix}"

    @contextmanager
    def runs_folder(self, name: str) -> Iterator[Path]:
        """The folder a study trains its runs in: ``runs_dir / name`` (kept, and the unfinished runs found
        there resumed by :func:`train_runs`), or a temporary folder removed afterwards.

        Args:
            name: the study's sub-folder of ``runs_dir`` (and the temporary folder's prefix).

        Yields:
            The folder, created if needed; a temporary one is removed when the ``with`` block ends.
        """
        if self.runs_dir is None:
            with tempfile.TemporaryDirectory(prefix=f"gradcomp-{name}-") as tmp:
                yield Path(tmp)
        else:
            folder = self.runs_dir / name
            folder.mkdir(parents=True, exist_ok=True)
            yield folder

    def tqdm(self, *args: Any, **kwargs: Any):
        """A tqdm progress bar, hidden with ``--no-progress``.

        Args:
            *args: passed to ``tqdm.tqdm`` (an iterable, usually).
            **kwargs: passed to ``tqdm.tqdm``; ``dynamic_ncols`` and ``leave`` default to True and False.

        Returns:
            The ``tqdm`` object, disabled when ``progress`` is False.
        """
        from tqdm import tqdm

        kwargs.setdefault("dynamic_ncols", True)
        kwargs.setdefault("leave", False)
        return tqdm(*args, disable=not self.progress, **kwargs)


@dataclass
class Result:
    """What a study hands back to :func:`run_study`.

    ``console`` is printed (our table beside the published figures);
    ``markdown`` is the body of the report; ``plots`` are PNGs the study
    wrote into the output folder (shown in the report); ``data`` is the raw
    numbers, written as JSON; ``setup`` is a short list of facts about the
    variant (sizes, epochs, options) shown at the top of the report.

    Args:
        title: the report's heading.
        console: the text printed at the end of the run.
        markdown: the body of the report (its sections and tables).
        checks: the study's assertions, listed at the end of the report.
        plots: PNG files the study wrote into the output folder, embedded in the report.
        data: the raw numbers behind the tables, written to ``DIR/TABLE[-quick].json``.
        setup: short facts about the variant, shown in the report's header table.
    """

    title: str
    console: str
    markdown: str
    checks: list[Check] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    setup: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        """Whether every check held (True when there are none)."""
        return all(c.passed for c in self.checks)


@dataclass(frozen=True)
class Study:
    """A reproducible table: ``gradcomp reproduce NAME``.

    ``order`` sorts the listing (the issue numbers the tables 1-5);
    ``summary`` is one line for ``--help`` and ``--list``; ``kind`` is the
    command that runs it (``"reproduce"`` or ``"bench"``).  ``threads`` is
    the number of torch intra-op threads the study runs with by default
    (None: torch's default).  One thread keeps results independent of the
    machine's core count, and small models gain nothing from more: on a
    busy 2-core machine two threads made a small MLP's steps ten times slower.

    Args:
        name: the table's name on the command line (a plain word; ``-`` and ``_`` allowed).
        summary: one line for ``--help`` and ``--list``.
        run: the study itself: ``run(ctx)`` trains or measures and returns its :class:`Result`.
        order: sorts the listing (lower first; ties by name).
        threads: torch intra-op threads the study runs with by default (None: torch's default).
        kind: ``"reproduce"`` or ``"bench"``: the command that runs it.

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
    """

    name: str
    summary: str
    run: Callable[[Context], Result]
    order: int = 100
    threads: int | None = None
    kind: str = "reproduce"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Study.kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def stem(self) -> str:
        """The report's file name without variant and suffix: ``TABLE`` or ``bench-NAME``."""
        return self.name if self.kind == "reproduce" else f"{self.kind}-{self.name}"


KINDS = ("reproduce", "bench")
_WHAT = {"reproduce": "table", "bench": "benchmark"}
_STUDIES: dict[tuple[str, str], Study] = {}
#: study modules that failed to import: (kind, module name) -> the exception (raised again when asked for)
IMPORT_ERRORS: dict[tuple[str, str], BaseException] = {}


def register(study: Study) -> Study:
    """Make ``study`` available as ``gradcomp {study.kind} {study.name}``.

    Registering the same study again (the same ``run``, as a reloaded module does) replaces it.

    Args:
        study: the study to register.

    Returns:
        ``study`` itself.

    Raises:
        ValueError: the name is not a plain word, or another study of the same kind already has it.
    """
    if not study.name or not study.name.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"a study name must be a plain word, got {study.name!r}")
    key = (study.kind, study.name)
    if key in _STUDIES and _STUDIES[key].run is not study.run:
        raise ValueError(f"{_WHAT[study.kind]} {study.name!r} is already registered")
    _STUDIES[key] = study
    return study


def studies(kind: str = "reproduce") -> list[Study]:
    """The registered studies of one kind, in table order.

    Args:
        kind: ``"reproduce"`` or ``"bench"``.

    Returns:
        The studies sorted by ``(order, name)``; empty when none of that kind is registered.
    """
    return sorted((s for s in _STUDIES.values() if s.kind == kind), key=lambda s: (s.order, s.name))


def get_study(name: str, kind: str = "reproduce") -> Study:
    """The study registered as ``name``; :class:`UnknownStudyError` lists the names otherwise.

    Args:
        name: the table (or benchmark) name.
        kind: ``"reproduce"`` or ``"bench"``.

    Returns:
        The registered :class:`Study`.

    Raises:
        UnknownStudyError: no study of that kind has the name (the message lists those that exist), or its
            module failed to import (the message gives the import error, chained as the cause).
    """
    if (kind, name) in _STUDIES:
        return _STUDIES[kind, name]
    if (kind, name) in IMPORT_ERRORS:
        error = IMPORT_ERRORS[kind, name]
        raise UnknownStudyError(f"{_WHAT[kind]} {name!r} failed to import: {type(error).__name__}: {error}") \
            from error
    names = ", ".join(s.name for s in studies(kind)) or "(none)"
    raise UnknownStudyError(f"unknown {_WHAT[kind]} {name!r}; available {_WHAT[kind]}s: {names}")


def discover(package: str, path: Iterable[str], kind: str) -> None:
    """Import every module of ``package`` (but ``common`` and private ``_*`` ones): each registers its study.

    A module that fails to import is left out (with a logged warning) and its
    error is raised again when its study is asked for, so one broken study
    never breaks the ``gradcomp`` command.

    Args:
        package: the package's dotted name (``__name__`` of its ``__init__``).
        path: the package's ``__path__``, where its modules are looked for.
        kind: ``"reproduce"`` or ``"bench"``: the key under which an import error is kept.
    """
    import importlib
    import logging
    import pkgutil

    for info in pkgutil.iter_modules(path):
        if info.name == "common" or info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{package}.{info.name}")
        except Exception as error:  # one broken study must not break the others or the CLI
            IMPORT_ERRORS[kind, info.name] = error
            logging.getLogger(package).warning("%s: module %r failed to import: %s: %s", package, info.name,
                                               type(error).__name__, error)


# ---------------------------------------------------------------- the machine and the run


def _git_commit() -> str | None:
    """``abc1234`` (``+ uncommitted changes`` when the tree is dirty), or None outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit + (" + uncommitted changes" if dirty.returncode == 0 and dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    """Where a study ran: platform, processor, CPU count, torch threads and versions.

    Returns:
        ``platform``, ``processor``, ``cpus``, ``torch_threads``, ``python``, ``torch`` and ``gradcomp``, plus
        ``git_commit`` (with `` + uncommitted changes`` when the tree is dirty) inside a git checkout.
    """
    from gradcomp import __version__

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gradcomp": __version__,
    }
    commit = _git_commit()
    if commit:
        info["git_commit"] = commit
    return info


def report_name(stem: str, full: bool) -> str:
    """``STEM`` for the full variant, ``STEM-quick`` for the quick one (see :attr:`Study.stem`).

    Args:
        stem: the study's stem, :attr:`Study.stem`.
        full: the full variant.

    Returns:
        The file name of the report without its suffix.
    """
    return stem if full else f"{stem}-quick"


@dataclass
class Outcome:
    """What :func:`run_study` did: the result, the report it wrote and how long it took."""

    #: the study that ran
    study: Study
    #: what it handed back
    result: Result
    #: the markdown report written: ``DIR/TABLE[-quick].md``
    report: Path
    #: the numbers behind it: ``DIR/TABLE[-quick].json``
    data_path: Path
    #: the study's wall time, in seconds
    seconds: float

    @property
    def passed(self) -> bool:
        """Whether every check of the result held."""
        return self.result.passed


def _fmt_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min ({seconds:.0f} s)"


def run_study(name: str, *, full: bool = False, out_dir: str | os.PathLike[str] = "results", seed: int = 0,
              progress: bool = True, threads: int | None = None, jobs: int = 1, command: str | None = None,
              echo: Callable[[str], None] = print, kind: str = "reproduce",
              runs_dir: str | os.PathLike[str] | None = None) -> Outcome:
    """Run study ``name``, print its tables and write its report; returns the :class:`Outcome`.

    ``threads`` sets torch's intra-op threads for the run (default: the
    study's own choice, :attr:`Study.threads`; restored afterwards).
    ``jobs`` lets a study train that many independent runs at once in
    separate processes (each with ``threads`` threads); the results do not
    depend on it.
    ``runs_dir`` keeps the study's training runs (see :meth:`Context.runs_folder`): a study stopped
    part-way continues from its runs' checkpoints when run again with the same ``runs_dir``.
    ``command`` is the command line shown in the report (default: the
    ``gradcomp reproduce`` (or ``bench``) command equivalent to the arguments).
    The report is written even when checks fail (``Outcome.passed`` says
    whether they held).

    Args:
        name: the table (or benchmark) name.
        full: the full variant rather than the quick one.
        out_dir: the folder for the report, its JSON data and plots (created if needed).
        seed: the seed the study starts from.
        progress: show progress bars.
        threads: torch intra-op threads during the run (None: :attr:`Study.threads`).
        jobs: independent training runs at once, each in its own process.
        command: the command line shown in the report (None: :func:`canonical_command`).
        echo: where the tables, checks and the verdict are printed.
        kind: ``"reproduce"`` or ``"bench"``.
        runs_dir: the folder that keeps the training runs (None: a temporary one per study).

    Returns:
        The :class:`Outcome`: the study's result, the report and data paths, the wall time in seconds.

    Raises:
        UnknownStudyError: no study ``name`` of this kind (or its module failed to import).
        ValueError: ``threads`` or ``jobs`` is not an integer >= 1.
        StudySkipped: the study cannot run here (raised by the study; no report is written).
    """
    study = get_study(name, kind)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads must be an integer >= 1 or None, got {threads!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be an integer >= 1, got {jobs!r}")
    if command is None:
        command = canonical_command(name, full=full, out_dir=out_dir, seed=seed, threads=threads, kind=kind)
    ctx = Context(full=full, out_dir=out, seed=seed, progress=progress, echo=echo,
                  stem=report_name(study.stem, full), jobs=jobs,
                  runs_dir=None if runs_dir is None else Path(runs_dir))
    default_threads = torch.get_num_threads()
    threads = threads if threads is not None else study.threads
    started = datetime.now().astimezone()
    start = time.perf_counter()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        machine = machine_info()
        result = study.run(ctx)
        if runs_dir is not None:
            result.setup.append(f"training runs kept in {runs_dir} (--runs): a run that had finished there was "
                                "loaded, not trained again, so the wall time is this invocation's only")
    finally:
        torch.set_num_threads(default_threads)
    seconds = time.perf_counter() - start

    report = ctx.path(".md")
    data_path = ctx.path(".json")
    report.write_text(_report_text(study, result, ctx, command, machine, started, seconds), encoding="utf-8")
    payload = {"table": name, "variant": "full" if full else "quick", "command": command, "seed": seed,
               "machine": machine, "date": started.isoformat(timespec="seconds"), "wall_seconds": seconds,
               "checks": [vars(c) for c in result.checks], "data": result.data}
    data_path.write_text(json.dumps(payload, indent=1, default=json_default) + "\n", encoding="utf-8")

    echo(result.console)
    echo("")
    for c in result.checks:
        echo(f"  [{'ok' if c.passed else 'FAILED'}] {c.name}" + (f": {c.detail}" if c.detail else ""))
    verdict = "all checks passed" if result.passed else \
        f"{sum(not c.passed for c in result.checks)} of {len(result.checks)} checks FAILED"
    echo(f"{name} ({'full' if full else 'quick'}): {verdict}; {_fmt_seconds(seconds)}; wrote {report}"
         + "".join(f", {p}" for p in result.plots))
    return Outcome(study, result, report, data_path, seconds)


def canonical_command(name: str, *, full: bool, out_dir: str | os.PathLike[str], seed: int,
                      threads: int | None = None, kind: str = "reproduce") -> str:
    """The ``gradcomp reproduce`` (or ``bench``) command line that reruns this study with these settings.

    Options at their default (``--out results``, ``--seed 0``, no ``--threads``) are left out.

    Args:
        name: the table (or benchmark) name.
        full: adds ``--full``.
        out_dir: the output folder.
        seed: the seed.
        threads: the torch thread count asked for (None: the study's).
        kind: ``"reproduce"`` or ``"bench"``.

    Returns:
        The command, quoted for a POSIX shell.
    """
    import shlex

    parts = ["gradcomp", kind, name]
    if full:
        parts.append("--full")
    if os.fspath(out_dir) != "results":
        parts += ["--out", os.fspath(out_dir)]
    if seed != 0:
        parts += ["--seed", str(seed)]
    if threads is not None:
        parts += ["--threads", str(threads)]
    return shlex.join(parts)


def _report_text(study: Study, result: Result, ctx: Context, command: str, machine: dict[str, Any],
                 started: datetime, seconds: float) -> str:
    variant = "full" if ctx.full else "quick (CI)"
    lines = [f"# {result.title}", "",
             f"Produced by `{command}` — every number below comes from that run, except the columns "
             "headed *published*.", "",
             "| | |", "|---|---|",
             f"| variant | {variant} |",
             f"| seed | {ctx.seed} |",
             f"| date | {started.isoformat(timespec='seconds')} |",
             f"| wall time | {_fmt_seconds(seconds)} |",
             f"| machine | {machine['platform']}, {machine['processor']}, {machine['cpus']} CPUs "
             f"({machine['torch_threads']} torch thread{'s' if machine['torch_threads'] != 1 else ''}) |",
             f"| software | Python {machine['python']}, torch {machine['torch']}, gradcomp {machine['gradcomp']}"
             + (f" (git {machine['git_commit']})" if "git_commit" in machine else "") + " |"]
    lines += [f"| setup | {markdown_cell(s)} |" for s in result.setup]
    lines += ["", result.markdown.strip(), ""]
    for plot in result.plots:
        rel = os.path.relpath(plot, ctx.out_dir)
        lines += [f"![{Path(rel).stem}]({rel})", ""]
    if result.checks:
        lines += ["## Checks", ""]
        lines += [f"- {'✅' if c.passed else '❌ FAILED'} {c.name}" + (f" — {c.detail}" if c.detail else "")
                  for c in result.checks]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- tables and figures


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None) -> str:
    """A markdown table; ``align`` holds one of ``l``/``r``/``c`` per column (default: first left, rest right).

    Columns are padded so the same text reads as a table in a terminal too.

    Args:
        headers: the column headings.
        rows: the rows, each one cell per heading (any value; written with ``str`` and escaped for markdown).
        align: one character per column (``l``, ``r`` or ``c``); None: first left, the rest right.

    Returns:
        The table's lines joined by newlines, without a trailing one.

    Raises:
        ValueError: a row has a different number of cells than there are headers.
    """
    rows = [[markdown_cell(c) for c in row] for row in rows]
    headers = [markdown_cell(h) for h in headers]
    n = len(headers)
    if any(len(r) != n for r in rows):
        raise ValueError("every row must have as many cells as there are headers")
    align = align or "l" + "r" * (n - 1)
    widths = [max([len(headers[i])] + [len(r[i]) for r in rows] + [3]) for i in range(n)]

    def fmt(cells: Sequence[str]) -> str:
        out = []
        for c, w, a in zip(cells, widths, align):
            out.append(c.ljust(w) if a == "l" else c.rjust(w) if a == "r" else c.center(w))
        return "| " + " | ".join(out) + " |"

    rule = []
    for w, a in zip(widths, align):
        rule.append(":" + "-" * (w - 1) if a == "l" else "-" * (w - 1) + ":" if a == "r"
                    else ":" + "-" * (w - 2) + ":")
    return "\n".join([fmt(headers), "| " + " | ".join(rule) + " |"] + [fmt(r) for r in rows])


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as PNG to ``path`` (through a temporary file, so a reader never sees half of it).

    Args:
        fig: a matplotlib figure.
        path: the PNG to write; its folder is created if needed.
        dpi: the resolution, in dots per inch.

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, path)
    return path


def memory_peak_mb() -> float | None:
    """This process's peak resident memory in MB so far (Linux/macOS), None where unknown.

    Returns:
        The peak resident set size in MB (1e6 bytes), or None where the ``resource`` module is missing.
    """
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak / 1e3


def classification_loss(model, batch):
    """Cross-entropy of a classifier on an ``(x, y)`` shard: the studies' ``loss_fn``.

    Args:
        model: a module mapping inputs to class logits.
        batch: ``(x, y)``: inputs and integer class labels.

    Returns:
        The mean cross-entropy over the shard, a scalar tensor.
    """
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def evaluate_classifier(model, data, limit: int | None = None, chunk: int = 1000) -> tuple[float, float]:
    """(test accuracy, mean test loss) on the first ``limit`` test samples (all by default), in chunks.

    The model is put in eval mode for the evaluation and back in train mode afterwards.

    Args:
        model: a module mapping inputs to class logits.
        data: a dataset with ``x_test`` and ``y_test`` tensors.
        limit: how many test samples to score (None: all).
        chunk: samples per forward pass.

    Returns:
        The fraction classified correctly (0 to 1) and the mean cross-entropy per sample.
    """
    model.eval()
    try:
        correct, loss = 0, 0.0
        n = len(data.y_test) if limit is None else min(limit, len(data.y_test))
        for i in range(0, n, chunk):
            x, y = data.x_test[i:min(i + chunk, n)], data.y_test[i:min(i + chunk, n)]
            out = model(x)
            correct += (out.argmax(1) == y).sum().item()
            loss += F.cross_entropy(out, y, reduction="sum").item()
        return correct / n, loss / n
    finally:
        model.train()


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def map_runs(ctx: Context, fn: Callable[..., Any], calls: Sequence[tuple], describe: Callable[[Any], str],
             desc: str = "runs") -> list[Any]:
    """``[fn(*args) for args in calls]``, up to ``ctx.jobs`` at a time in spawned processes.

    ``fn`` must be a module-level function and every call independent of the
    others (its own seed, its own data), so the results are the same for any
    number of jobs.  Each process runs with this process's torch thread
    count.  ``describe(result)`` is the line printed as each run finishes.
    A progress bar counts finished runs.

    Args:
        ctx: the study's context: ``jobs``, progress bar, ``echo``.
        fn: a module-level (picklable) function.
        calls: the arguments of each call.
        describe: the line printed for a finished call, from its result.
        desc: the progress bar's label.

    Returns:
        The results, in the order of ``calls`` whatever order they finished in.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    results: list[Any] = [None] * len(calls)
    with ctx.tqdm(total=len(calls), desc=desc, unit="run") as bar:
        say = bar.write if ctx.progress else ctx.echo
        if ctx.jobs == 1 or len(calls) == 1:
            for i, args in enumerate(calls):
                results[i] = fn(*args)
                say(describe(results[i]))
                bar.update(1)
            return results
        with ProcessPoolExecutor(max_workers=min(ctx.jobs, len(calls)), mp_context=get_context("spawn"),
                                 initializer=_init_worker, initargs=(torch.get_num_threads(),)) as pool:
            futures = {pool.submit(fn, *args): i for i, args in enumerate(calls)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                say(describe(results[futures[future]]))
                bar.update(1)
    return results


def _train_one(cfg: Any) -> dict[str, Any]:
    """One ``gradcomp train`` run; a diverged run returns its last epoch's record with ``diverged`` set
    (a study stops a run at its first non-finite gradient instead of skipping steps, so divergence shows).

    A run directory that holds a finished run (its ``summary.json``, written at the end of training or on
    divergence) is read back, checkpoint or not: a study's finished rows can be kept (config, metrics and
    summary, a few kB) without their checkpoints, and a later session trains only the others."""
    from gradcomp.method import NonFiniteGradientError
    from gradcomp.train.loop import run as train
    from gradcomp.train.rundir import RunDir

    cfg = cfg.replace(exchange={"nonfinite": "raise"})
    run_dir, epochs = cfg.output.run_dir, cfg.schedule.epochs
    rd = RunDir(run_dir)
    if rd.summary_path.is_file():
        summary = rd.read_summary()
        _resumable(cfg)
        if "diverged" in summary or summary.get("epochs") == epochs:
            return summary
        if not rd.has_checkpoint():
            raise ValueError(f"{run_dir} holds a run finished after {summary.get('epochs')} epochs without "
                             f"its checkpoint, so it cannot go on to {epochs}: remove it to train again")
    try:
        if rd.has_checkpoint():
            return train(_resumable(cfg), resume=run_dir, plot=False, echo=lambda _: None)
        if Path(run_dir).is_dir():  # a kept run that stopped before its first checkpoint: start it again
            shutil.rmtree(run_dir)
        return train(cfg, plot=False, echo=lambda _: None)
    except NonFiniteGradientError as error:
        records = rd.read_metrics()
        diverged = {**(records[-1] if records else {}), "diverged": str(error),
                    "diverged_in_epoch": len(records) + 1, "label": cfg.output.label}
        rd.write_summary(diverged)
        return diverged


def _resumable(cfg: Any) -> Any:
    """``cfg``, checked against the config saved in its run directory: a run there from other settings is
    not continued (ValueError naming the folder and the settings that differ).  The run's ``config.json`` may
    be flat (written by earlier versions) or by section: both compare by setting (flat names)."""
    from gradcomp.train.config import RESUMABLE
    from gradcomp.train.rundir import RunDir

    # settings added since: defaults
    saved = type(cfg).from_dict(RunDir(cfg.output.run_dir).read_config()).flat()
    free = {"run_dir", "data_dir", *RESUMABLE}  # may change on resume
    differ = sorted(k for k, v in cfg.flat().items() if k not in free and saved[k] != v)
    if differ:
        raise ValueError(f"{cfg.output.run_dir} holds a run with other settings ({', '.join(differ)}): remove it or "
                         "choose another --runs folder")
    return cfg


def _describe(summary: dict[str, Any]) -> str:
    name = summary.get("label") or summary.get("method")
    if "diverged" in summary:
        return f"{name}: diverged in epoch {summary['diverged_in_epoch']} ({summary['diverged']})"
    metric = (f"test accuracy {summary['test_accuracy']:.4f}" if "test_accuracy" in summary
              else f"test perplexity {summary['test_perplexity']:.2f}")
    return f"{name}: {metric}, {summary['compression_ratio']:.1f}x, {1e3 * summary['time_per_step']:.1f} ms per step"


def train_runs(ctx: Context, configs: Sequence[Any], folder: Path) -> list[tuple[dict[str, Any], Path]]:
    """Train each :class:`~gradcomp.train.loop.TrainConfig` with ``gradcomp train``'s own loop.

    Each config runs into ``folder / f"{i}-{method}"`` (its ``run_dir`` is set
    here), up to ``ctx.jobs`` at a time (:func:`map_runs`); returns
    ``(summary, run_dir)`` per config, in order.  The run directories hold the
    per-epoch metrics that :func:`gradcomp.train.report.plot_runs` draws.  A
    run that diverges (its gradients become NaN or Inf) does not stop the
    others: its summary is its last finished epoch's record (if any) with
    ``diverged`` set to the message.

    Args:
        ctx: the study's context (``jobs``, ``progress``).
        configs: the runs' :class:`~gradcomp.train.config.TrainConfig`; their ``run_dir`` is replaced.
        folder: where the run directories go (:meth:`Context.runs_folder`); a finished run found there is read
            back instead of trained, an unfinished one resumed from its checkpoint.

    Returns:
        ``(summary, run_dir)`` per config, in order: the run's ``summary.json`` mapping and its folder.
    """
    dirs = [folder / f"{i}-{cfg.exchange.method}" for i, cfg in enumerate(configs)]
    calls = [(cfg.replace(output={"run_dir": str(d), "progress": ctx.progress and ctx.jobs == 1}),)
             for cfg, d in zip(configs, dirs)]
    return list(zip(map_runs(ctx, _train_one, calls, describe=_describe, desc=folder.name), dirs))


def train_rows(ctx: Context, name: str, rows: dict[str, Any],
               plotted: Collection[str] | None = None) -> tuple[dict[str, dict[str, Any]], Path]:
    """Train each config of ``rows`` (:func:`train_runs`, in the study's runs folder ``name``) and draw the
    curves of those ``plotted`` (default: all) into the study's plot.

    Args:
        ctx: the study's context.
        name: the study's folder under ``--runs`` (:meth:`Context.runs_folder`).
        rows: row key -> :class:`~gradcomp.train.config.TrainConfig`, in table order.
        plotted: the row keys whose curves are drawn (None: all).

    Returns:
        ``{row key: summary}`` and the plot's path (``ctx.path(".png")``).  Each summary gains ``"epochs"``:
        the run's per-epoch held-out records, in order.
    """
    from gradcomp.train.report import plot_runs
    from gradcomp.train.rundir import RunDir

    plot_path = ctx.path(".png")
    with ctx.runs_folder(name) as folder:
        runs = train_runs(ctx, list(rows.values()), folder)
        plot_runs([d for key, (_, d) in zip(rows, runs) if plotted is None or key in plotted], plot_path)
        epochs = [[m for m in RunDir(d).read_metrics() if "test_loss" in m] for _, d in runs]
    return {key: {**summary, "epochs": e} for key, (summary, _), e in zip(rows, runs, epochs)}, plot_path


def require_dataset(name: str, shown: str | None = None, limit_train: int | None = 1) -> Dataset:
    """Load a dataset a study needs, or skip the study when it is not on this machine.

    Args:
        name: the dataset (:data:`~gradcomp.train.data.DATASETS`).
        shown: its name in the skip message (None: ``name``).
        limit_train: the training samples loaded (1: just enough to check it is there; None: all).

    Returns:
        The dataset (:func:`~gradcomp.train.data.load_dataset`).

    Raises:
        StudySkipped: the dataset was not found.
    """
    from gradcomp.train.data import DatasetNotFoundError, load_dataset

    try:
        return load_dataset(name, limit_train=limit_train)
    except DatasetNotFoundError as error:
        raise StudySkipped(f"{shown or name} is needed for this table and was not found: {error}") from None
