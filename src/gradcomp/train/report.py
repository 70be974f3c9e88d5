"""Reports of ``gradcomp train`` and ``gradcomp plot``: the summary text, the curves and the comparison table,
read from run directories (:mod:`gradcomp.train.rundir`).

Config keys read here (all optional)
------------------------------------
``label``            legend / table label of the run
``method``           method name (``"dgc"``), or a dict ``{"name": "dgc", **options}``
``method_options``   dict of the method's options (``options`` is accepted too)
``dataset``, ``model``, ``workers``   shown in figure titles

Metric record keys (one record per epoch; all but ``epoch`` optional)
--------------------------------------------------------------------
``epoch``            int, epochs completed (1 for the first record)
``step``             optimizer steps completed
``train_loss``       mean training loss over the epoch
``test_loss``        test loss
``test_accuracy``    fraction in [0, 1] (classification)
``test_perplexity``  perplexity (language models)
``bytes_sent``       bytes each worker has sent so far (cumulative, counted from payloads)
``dense_bytes``      bytes each worker would have sent so far as dense fp32
``compression_ratio``  ``dense_bytes / bytes_sent``
``seconds``, ``time_per_step``   wall-clock seconds

Summary keys (``summary.json``, :func:`format_summary`)
-------------------------------------------------------
``dataset``, ``model``   str
``method``               str (or dict with ``name``, as in the config)
``method_options``       dict, optional
``label``                str, optional
``workers``              int, number of data-parallel workers N
``epochs``               int, epochs trained
``steps``                int, optimizer steps per worker over the whole run
``test_accuracy``        fraction in [0, 1]  -- or --
``test_perplexity``      float (language models)
``bytes_sent``           int, bytes each worker sent over the whole run
``dense_bytes``          int, bytes each worker would have sent as dense fp32
``compression_ratio``    float, ``dense_bytes / bytes_sent`` (computed when absent)
``time_per_step``        float, measured wall seconds per step
``compute_time_per_step``  float, optional: seconds per step without communication
                         (forward, backward, compression, optimizer); defaults to
                         ``time_per_step``, which under the simulator contains no
                         network time anyway
``collective``           ``"allreduce"`` or ``"allgather"``: how the method's
                         payloads travel; without it no link estimate is printed
``link_gbps``            float or list of floats, links to estimate a step on
                         (default ``[1, 10]``)

Byte units are decimal (1 MB = 10**6 bytes), like link speeds (1 Gbit/s = 10**9 bit/s).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import flat_settings
from .cost import COLLECTIVES, DEFAULT_LINKS_GBPS, estimate_step_time
from .rundir import RunDir, atomic_write

__all__ = [
    "compare_table",
    "format_summary",
    "human_bytes",
    "markdown_cell",
    "new_figure",
    "plot_run",
    "plot_runs",
    "run_label",
]

logger = logging.getLogger(__name__)


def _as_rundir(run: RunDir | str | os.PathLike[str]) -> RunDir:
    rd = run if isinstance(run, RunDir) else RunDir(run)
    if not rd.path.is_dir():
        raise FileNotFoundError(f"run directory {str(rd.path)!r} does not exist")
    return rd


# ---------------------------------------------------------------- labels and units

def human_bytes(n: float) -> str:
    """A byte count in decimal units (B, kB, MB, GB, TB, PB), three significant figures.

    Args:
        n: the number of bytes (None, Inf or NaN: shown as they are).

    Returns:
        The text.

    Example:
        >>> from gradcomp.train.report import human_bytes
        >>> human_bytes(3420000), human_bytes(999), human_bytes(1.5e12)
        ('3.42 MB', '999 B', '1.50 TB')
    """
    if n is None or (isinstance(n, float) and not math.isfinite(n)):
        return str(n)
    sign = "-" if n < 0 else ""
    value = float(abs(n))
    if value < 999.5:  # what rounds to 1000 B is shown as 1.00 kB
        return f"{sign}{int(round(value))} B"
    units = ("kB", "MB", "GB", "TB", "PB", "EB")
    unit = -1
    while unit < len(units) - 1 and value >= 999.5:
        value /= 1000.0
        unit += 1
    digits = 2 if value < 9.995 else 1 if value < 99.95 else 0
    return f"{sign}{value:.{digits}f} {units[unit]}"


def _fmt_value(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return ",".join(_fmt_value(x) for x in v)
    return str(v)


def _method_parts(info: Mapping[str, Any]) -> tuple[str | None, dict[str, Any]]:
    method = info.get("method")
    options: dict[str, Any] = {}
    if isinstance(method, Mapping):
        options.update({k: v for k, v in method.items() if k != "name"})
        method = method.get("name")
    for key in ("method_options", "options"):
        extra = info.get(key)
        if isinstance(extra, Mapping):
            options.update(extra)
            break
    return (str(method) if method is not None else None), options


def _method_text(info: Mapping[str, Any], max_options: int = 4) -> str | None:
    """``"dgc (density=0.001, momentum=0.9)"``; at most ``max_options`` options, then an ellipsis."""
    name, options = _method_parts(info)
    if name is None:
        return None
    shown = [f"{k}={_fmt_value(v)}" for k, v in options.items() if v is not None and not isinstance(v, Mapping)]
    if not shown:
        return name
    more = ", ..." if len(shown) > max_options else ""
    return f"{name} ({', '.join(shown[:max_options])}{more})"


def run_label(run: RunDir | str | os.PathLike[str], config: Mapping[str, Any] | None = None) -> str:
    """How tables and legends name a run.

    Args:
        run: the run directory.
        config: its config (None: read from the directory; none there counts as empty).

    Returns:
        The config's ``label``, else the method and its first three options, else the directory name.

    Example:
        >>> from gradcomp.train.report import run_label
        >>> run_label("runs/a", {"method": "dgc", "method_options": {"density": 0.001, "momentum": 0.9}})
        'dgc (density=0.001, momentum=0.9)'
        >>> run_label("runs/a", {"label": "DGC 99.9 %"}), run_label("runs/a", {})
        ('DGC 99.9 %', 'a')
    """
    rd = run if isinstance(run, RunDir) else RunDir(run)
    if config is None:
        try:
            config = flat_settings(rd.read_config())  # a gradcomp train config's sections: one key per setting
        except (FileNotFoundError, ValueError):
            config = {}
    label = config.get("label")
    if label:
        return str(label)
    return _method_text(config, max_options=3) or rd.name


# ---------------------------------------------------------------- summary text

def _links(value: Any) -> list[float]:
    if value is None:
        return list(DEFAULT_LINKS_GBPS)
    if isinstance(value, (int, float)):
        return [float(value)]
    return [float(v) for v in value]


def _ratio(info: Mapping[str, Any]) -> float | None:
    ratio = info.get("compression_ratio")
    if ratio is None and info.get("dense_bytes") is not None and info.get("bytes_sent"):
        ratio = info["dense_bytes"] / info["bytes_sent"]
    return ratio


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g} s" if ms >= 10_000 else f"{ms:.1f} ms" if ms >= 1 else f"{ms:.3f} ms"


def _fmt_time(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 10 else _ms(seconds)


def format_summary(summary: Mapping[str, Any], link_gbps: float | Sequence[float] | None = None) -> str:
    """A multi-line, human-readable final summary (keys: module docstring).

    Missing keys are left out rather than failing: this runs after training.
    ``link_gbps`` overrides ``summary["link_gbps"]`` (default 1 and 10 Gbit/s).

    Args:
        summary: the summary (``summary.json``).
        link_gbps: the links to estimate a step on, in Gbit/s (None: the summary's, else 1 and 10).

    Returns:
        The text: a title, then one line per figure.

    Example:
        >>> from gradcomp.train.report import format_summary
        >>> print(format_summary({"dataset": "mnist", "method": "dgc", "workers": 4, "epochs": 2, "steps": 100,
        ...                       "test_accuracy": 0.9912, "bytes_sent": 2e6, "dense_bytes": 4e8}))
        gradcomp run summary
          dataset        mnist
          method         dgc
          workers        4
          epochs         2 (100 steps)
          test accuracy  99.12 %
          bytes sent     2.00 MB per worker
          dense fp32     400 MB per worker
          compression    200.0x
    """
    rows: list[tuple[str, str]] = []

    def add(key: str, value: Any) -> None:
        if value is not None:
            rows.append((key, str(value)))

    add("dataset", summary.get("dataset"))
    add("model", summary.get("model"))
    add("method", _method_text(summary, max_options=8))
    if summary.get("label"):
        add("label", summary["label"])
    workers = summary.get("workers")
    add("workers", workers)
    steps = summary.get("steps")
    epochs = summary.get("epochs")
    if epochs is not None:
        add("epochs", f"{epochs}" + (f" ({steps} steps)" if steps is not None else ""))
    if summary.get("test_accuracy") is not None:
        add("test accuracy", f"{100.0 * summary['test_accuracy']:.2f} %")
    if summary.get("test_perplexity") is not None:
        add("test perplexity", f"{summary['test_perplexity']:.2f}")
    if summary.get("test_loss") is not None:
        add("test loss", f"{summary['test_loss']:.4f}")

    sent, dense = summary.get("bytes_sent"), summary.get("dense_bytes")
    if sent is not None:
        add("bytes sent", f"{human_bytes(sent)} per worker")
    if dense is not None:
        add("dense fp32", f"{human_bytes(dense)} per worker")
    ratio = _ratio(summary)
    if ratio is not None:
        add("compression", f"{ratio:.1f}x")

    step_time = summary.get("time_per_step")
    compute = summary.get("compute_time_per_step", step_time)
    if step_time is not None:
        extra = f" (compute {_fmt_time(compute)})" if compute is not None and compute != step_time else ""
        add("time per step", _fmt_time(step_time) + " measured" + extra)

    bytes_per_step = summary.get("bytes_per_step")
    if bytes_per_step is None and sent is not None and steps:
        bytes_per_step = sent / steps
    dense_per_step = dense / steps if dense is not None and steps else None
    collective = summary.get("collective")
    links = _links(link_gbps if link_gbps is not None else summary.get("link_gbps"))
    if compute is not None and bytes_per_step is not None and workers:
        if collective in COLLECTIVES:
            add("bytes per step", f"{human_bytes(bytes_per_step)} per worker ({collective})")
            for gbps in links:
                t = estimate_step_time(compute, bytes_per_step, int(workers), gbps, collective)
                text = f"{_fmt_time(t)} (compute {_fmt_time(compute)} + comm {_fmt_time(t - compute)})"
                if dense_per_step is not None:
                    t_dense = estimate_step_time(compute, dense_per_step, int(workers), gbps, "allreduce")
                    text += f"; dense fp32 all-reduce {_fmt_time(t_dense)}, speedup {t_dense / t:.2f}x"
                add(f"step on {gbps:g} Gbit/s", text)
        else:
            add("step on a link", "not estimated (summary has no 'collective')")

    width = max((len(k) for k, _ in rows), default=0)
    title = "gradcomp run summary"
    return "\n".join([title] + [f"  {k.ljust(width)}  {v}" for k, v in rows])


# ---------------------------------------------------------------- plots

def _series(records: Sequence[Mapping[str, Any]], key: str, scale: float = 1.0,
            positive: bool = False) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(records):
        y = r.get(key)
        if y is None or not isinstance(y, (int, float)) or not math.isfinite(y):
            continue
        if positive and y <= 0:
            continue
        xs.append(r.get("epoch", i + 1))
        ys.append(y * scale)
    return xs, ys


def new_figure(width: float, height: float):
    """A matplotlib figure drawn by the Agg canvas, without pyplot: no display, no global backend switch.

    Args:
        width: inches.
        height: inches.

    Returns:
        A ``matplotlib.figure.Figure`` with the constrained layout.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _common(configs: Sequence[Mapping[str, Any]], key: str) -> Any:
    """The value of ``key`` when every config has the same one, else None."""
    values = {json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}
    return configs[0].get(key) if configs and len(values) == 1 else None


def plot_runs(run_dirs: Sequence[RunDir | str | os.PathLike[str]], out_path: str | os.PathLike[str]) -> Path:
    """Overlay several runs in one PNG: training loss, test accuracy (%) and/or
    test perplexity (log y), and cumulative MB sent per worker (log y; dashed:
    dense fp32 for the same steps), all against epochs.

    A run missing a metric just has no line in that panel; a run with few
    epochs is drawn with markers.  Needs matplotlib (the ``train`` extra).

    Args:
        run_dirs: the run directories.
        out_path: the PNG to write (its folder is made if missing).

    Returns:
        ``out_path`` as a ``Path``.

    Raises:
        ValueError: no run directory given, or a metrics file is corrupt.
        FileNotFoundError: a run directory does not exist.
    """
    if not run_dirs:
        raise ValueError("plot_runs needs at least one run directory")
    runs = [_as_rundir(r) for r in run_dirs]
    configs, metrics = _read_runs(runs)
    labels = [run_label(rd, cfg) for rd, cfg in zip(runs, configs)]
    if len(set(labels)) < len(labels):  # two runs alike: tell them apart by directory
        labels = [f"{lab} [{rd.name}]" if labels.count(lab) > 1 else lab for lab, rd in zip(labels, runs)]
    panels = _panels(metrics)
    fig = new_figure(4.6 * len(panels), 4.2)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(runs))]
    dense_refs = _dense_references(metrics, colors)
    for ax, key in zip(axes, panels):
        _draw_panel(ax, key, metrics, colors, labels, dense_refs if key == "bytes_sent" else {})
    _legend(fig, axes, colors, labels, bool(dense_refs))
    title_bits = [str(value) for value in (_common(configs, "dataset"), _common(configs, "model")) if value]
    workers = _common(configs, "workers")
    if workers:
        title_bits.append(f"{workers} workers")
    if len(runs) == 1 and labels[0] not in title_bits:
        title_bits.insert(0, labels[0])
    if title_bits:
        fig.suptitle(" · ".join(title_bits))
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110))
    return out


#: each panel of :func:`plot_runs`: title, y label, scale of the metric, y axis scale
_PANELS = {
    "train_loss": ("Training loss", "training loss", 1.0, "linear"),
    "test_accuracy": ("Test accuracy", "test accuracy (%)", 100.0, "linear"),
    "test_perplexity": ("Test perplexity", "test perplexity (log scale)", 1.0, "log"),
    "bytes_sent": ("Communication per worker", "cumulative MB sent per worker (log scale)", 1e-6, "log"),
}
#: the dashed lines of the dense fp32 references: (epochs, MB) -> the colors of the runs that share it
_DenseRefs = dict[tuple[tuple[float, ...], tuple[float, ...]], list[str]]


def _settings(rd: RunDir) -> dict[str, Any]:
    """The run's settings, one key each (:func:`flat_settings`); ``{}`` where it has no ``config.json``."""
    try:
        return flat_settings(rd.read_config())
    except FileNotFoundError:
        return {}


def _read_runs(runs: list[RunDir]) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """Each run's flat settings (``{}`` without a ``config.json``) and metrics (a warning where it has none)."""
    configs, metrics = [], []
    for rd in runs:
        configs.append(_settings(rd))
        records = rd.read_metrics()
        if not records:
            logger.warning("%s: no metrics to plot", rd.metrics_path)
        metrics.append(records)
    return configs, metrics


def _panels(metrics: list[list[dict[str, Any]]]) -> list[str]:
    """The panels to draw: loss, accuracy and/or perplexity (whichever the runs have; accuracy if neither),
    bytes."""
    def has(key: str) -> bool:
        return any(any(r.get(key) is not None for r in recs) for recs in metrics)

    panels = ["train_loss"]
    if has("test_accuracy") or not has("test_perplexity"):
        panels.append("test_accuracy")
    if has("test_perplexity"):
        panels.append("test_perplexity")
    return panels + ["bytes_sent"]


def _dense_references(metrics: list[list[dict[str, Any]]], colors: list[str]) -> _DenseRefs:
    """One dashed dense fp32 line per distinct series, none where it equals the run's own bytes (an
    uncompressed run); the runs sharing one are listed (grey when several: same model, same steps)."""
    dense_refs: _DenseRefs = {}
    for records, color in zip(metrics, colors):
        dx, dy = _series(records, "dense_bytes", 1e-6, positive=True)
        sx, sy = _series(records, "bytes_sent", 1e-6, positive=True)
        if not dx or (dx == sx and all(abs(a - b) <= 1e-3 * b for a, b in zip(sy, dy))):
            continue
        ref = (tuple(dx), tuple(round(y, 6) for y in dy))
        dense_refs.setdefault(ref, []).append(color)
    return dense_refs


def _draw_panel(ax: Any, key: str, metrics: list[list[dict[str, Any]]], colors: list[str], labels: list[str],
                dense_refs: _DenseRefs) -> None:
    """Draw metric ``key`` of every run on ``ax`` (markers where a run has few points; "no data" where none
    has it), over the dashed ``dense_refs``."""
    from matplotlib.ticker import MaxNLocator

    title, ylabel, scale, yscale = _PANELS[key]
    for (dx, dy), owners in dense_refs.items():
        ax.plot(dx, dy, color=owners[0] if len(owners) == 1 else "0.45", linestyle="--",
                linewidth=1.2, alpha=0.8, marker="o" if len(dx) <= 30 else None, markersize=4,
                markerfacecolor="none", zorder=1)
    xs_all: list[float] = []
    for records, color, label in zip(metrics, colors, labels):
        xs, ys = _series(records, key, scale, positive=yscale == "log")
        if xs:
            ax.plot(xs, ys, color=color, marker="o" if len(xs) <= 30 else None, markersize=4, linewidth=1.6,
                    label=label, zorder=2)
            xs_all.extend(xs)
    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, which="major", alpha=0.3)
    if not xs_all:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
    elif yscale == "log":
        ax.set_yscale("log")
        ax.grid(True, which="minor", alpha=0.1)
    if xs_all and max(xs_all) - min(xs_all) < 2:  # one or two epochs: whole-number ticks around them
        ax.set_xlim(min(xs_all) - 1, max(xs_all) + 1)


def _legend(fig: Any, axes: Any, colors: list[str], labels: list[str], dense: bool) -> None:
    """One legend for all panels, below them: a line per run, and the dashed dense reference if drawn."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=c, marker="o", markersize=4, label=lab) for c, lab in zip(colors, labels)]
    if dense:
        handles.append(Line2D([], [], color="0.45", linestyle="--", marker="o", markersize=4,
                              markerfacecolor="none", label="dense fp32, same steps (dashed)"))
    try:
        fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), frameon=False)
    except ValueError:  # matplotlib < 3.7 has no "outside"
        axes[0].legend(handles=handles, fontsize="small")


def plot_run(run_dir: RunDir | str | os.PathLike[str]) -> Path:
    """The single-run figure (:func:`plot_runs` of one run), written to ``curves.png`` in the run directory.

    Args:
        run_dir: the run directory.

    Returns:
        The path of ``curves.png``.

    Raises:
        FileNotFoundError: the run directory does not exist.
    """
    rd = _as_rundir(run_dir)
    return plot_runs([rd], rd.curves_path)


# ---------------------------------------------------------------- comparison table

def _run_facts(rd: RunDir) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, facts): the summary when the run finished, else its last metrics record."""
    config = _settings(rd)
    try:
        facts = dict(rd.read_summary())
    except FileNotFoundError:
        records = rd.read_metrics()
        facts = dict(records[-1]) if records else {}
        facts["_unfinished"] = True
    for key in ("method", "method_options", "options", "label"):
        if key not in facts and key in config:
            facts[key] = config[key]
    return config, facts


def _mb(n: float) -> str:
    """Megabytes with about three significant figures and no exponent: 2400, 12.3, 6.00, 0.0123."""
    mb = n / 1e6
    if mb >= 99.95:
        return f"{mb:.0f}"
    if mb >= 9.995:
        return f"{mb:.1f}"
    if mb >= 0.995 or mb == 0:
        return f"{mb:.2f}"
    return f"{mb:.3g}"


def markdown_cell(text: Any) -> str:
    r"""``text`` as one markdown table cell: ``|`` escaped, line breaks as spaces.

    Args:
        text: anything; its ``str`` is used.

    Returns:
        The cell's text.

    Example:
        >>> from gradcomp.train.report import markdown_cell
        >>> markdown_cell("a|b\nc")
        'a\\|b c'
    """
    return str(text).replace("|", "\\|").replace("\n", " ")


def compare_table(run_dirs: Sequence[RunDir | str | os.PathLike[str]]) -> str:
    """A markdown table of several runs: label (else directory name), method, test accuracy / perplexity,
    MB sent per worker, compression ratio, measured time per step, and the step time estimated on the run's
    link (:func:`~gradcomp.train.cost.estimate_step_time`, the measured step as compute; ``link_gbps`` of its
    summary, else 1 Gbit/s).

    Uses each run's ``summary.json``, or its last metrics record when the run
    has not finished (marked with ``*``).

    Args:
        run_dirs: the run directories, one row each, in order.

    Returns:
        The markdown table (and a footnote when a run has not finished).

    Raises:
        FileNotFoundError: a run directory does not exist.
        ValueError: a run's summary or metrics are corrupt.

    Example:
        >>> import tempfile
        >>> from gradcomp.train.report import compare_table
        >>> from gradcomp.train.rundir import RunDir
        >>> root = tempfile.mkdtemp()
        >>> for name, accuracy, sent, collective in (("dense", 0.99, 4e8, "allreduce"),
        ...                                          ("dgc", 0.985, 2e6, "allgather")):
        ...     RunDir.create(f"{root}/{name}").write_summary({
        ...         "label": name, "method": name, "workers": 4, "steps": 100, "test_accuracy": accuracy,
        ...         "bytes_sent": sent, "dense_bytes": 4e8, "time_per_step": 0.05, "collective": collective})
        >>> print(compare_table([f"{root}/dense", f"{root}/dgc"]))
        | run | method | test acc. | MB / worker | ratio | time / step | step on 1 Gbit/s (est.) |
        |---|---|---:|---:|---:|---:|---:|
        | dense | dense | 99.00 % | 400 | 1.0x | 50.0 ms | 98.0 ms |
        | dgc | dgc | 98.50 % | 2.00 | 200.0x | 50.0 ms | 50.5 ms |
    """
    runs = [_as_rundir(r) for r in run_dirs]
    rows = []
    links: set[float] = set()
    any_acc = any_ppl = unfinished = False
    for rd in runs:
        config, facts = _run_facts(rd)
        label = str(config.get("label") or facts.get("label") or rd.name)
        if facts.get("_unfinished"):
            label += " *"
            unfinished = True
        if facts.get("test_accuracy") is not None:
            metric = f"{100.0 * facts['test_accuracy']:.2f} %"
            any_acc = True
        elif facts.get("test_perplexity") is not None:
            metric = f"ppl {facts['test_perplexity']:.2f}"
            any_ppl = True
        else:
            metric = "-"
        sent = facts.get("bytes_sent")
        ratio = _ratio(facts)
        step = facts.get("time_per_step")
        link = _links(facts.get("link_gbps", config.get("link_gbps", 1.0)))[0]
        estimate = _estimate(facts, config, link)
        if estimate is not None:
            links.add(link)
        rows.append([
            label,
            _method_text(facts, max_options=3) or "-",
            metric,
            _mb(sent) if sent is not None else "-",
            f"{ratio:.1f}x" if ratio is not None else "-",
            _ms(step) if step is not None else "-",
            _fmt_time(estimate) if estimate is not None else "-",
        ])
    metric_head = "test acc. / ppl" if any_acc and any_ppl else "test ppl" if any_ppl else "test acc."
    on = f"{links.pop():g} Gbit/s" if len(links) == 1 else "its link"
    head = ["run", "method", metric_head, "MB / worker", "ratio", "time / step", f"step on {on} (est.)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---", "---", *["---:"] * 5]) + "|"]
    lines += ["| " + " | ".join(markdown_cell(c) for c in row) + " |" for row in rows]
    if unfinished:
        lines.append("")
        lines.append("\\* unfinished run: figures from its last epoch record")
    return "\n".join(lines)


def _estimate(facts: Mapping[str, Any], config: Mapping[str, Any], link_gbps: float) -> float | None:
    """The run's step time on ``link_gbps`` (:func:`~gradcomp.train.cost.estimate_step_time`), or None when its
    record lacks a figure the estimate needs."""
    step, sent, steps = facts.get("time_per_step"), facts.get("bytes_sent"), facts.get("steps", facts.get("step"))
    workers = facts.get("workers", config.get("workers"))
    collective = facts.get("collective", config.get("collective"))
    if step is None or sent is None or workers is None or not steps or collective not in COLLECTIVES:
        return None
    return estimate_step_time(step, sent / steps, int(workers), link_gbps, collective)
