"""Table ``ratio``: gradient size and compression ratio per step of the paper's networks.

For AlexNet, VGG-16, ResNet-50 and the paper's 1500-unit PTB LSTM, one
worker's gradients (random normal, shaped like the parameters) go through
every registered compressor exactly as the simulator drives them
(``method.prepare`` then :func:`gradcomp.simulator.run_exchanges`), and the
bytes are the payloads' ``nbytes``: values, indices, scales and packed bits,
uncompressed tensors included.  ``ratio = dense fp32 bytes / bytes sent``.

DGC is the whole method, ``gradcomp.DGC(density=0.001, warmup_epochs=0)``, in
three rows: ``dgc-plain`` is the paper's format (fp32 values and int32
indices for tensors with ``dim() > 1`` and at least 1024 entries, the others
dense and counted); ``dgc`` is gradcomp's default compact wire (float16
values, Elias-Fano coded indices); ``dgc-all`` also sparsifies the biases and
batch-norm parameters (``sparsify_all=True``).  Every compressor's count is
also checked against a closed formula of the tensor shapes written here
independently of the compressors' code.

No training and no data: the payload sizes of all compressors but
``threshold`` depend only on the shapes (``threshold`` sends every entry with
``|g| >= tau``, so its size depends on the gradient's scale).
"""

from __future__ import annotations

import functools
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from gradcomp.compressors.base import available, get
from gradcomp.compressors.powersgd import PowerSGD
from gradcomp.compressors.quantize import QSGD, DoReFa
from gradcomp.compressors.sparse import AdaComp, Dryden, RandomK, Threshold, TopK
from gradcomp.method import DGC, Method
from gradcomp.simulator import run_exchanges
from gradcomp.train.models import PAPER_MODELS

from .common import Check, Context, Result, Study, markdown_table, memory_peak_mb, new_figure, register, save_figure

DENSITY = 0.001
MIB = 2**20
#: The DGC paper (Lin et al. 2018), its gradient size and compression ratio figures: (dense, DGC sent, ratio).
#: Its "MB" are MiB (2**20 bytes): ResNet-50's 25,557,032 fp32 parameters are 97.49 MiB to the digit.
PUBLISHED = {
    "alexnet": (232.56, 0.39, 597),
    "resnet50": (97.49, 0.35, 277),
    "ptb_lstm_1500": (194.68, 0.42, 462),
}
MODEL_LABELS = {"alexnet": "AlexNet", "vgg16": "VGG-16", "resnet50": "ResNet-50", "ptb_lstm_1500": "PTB LSTM-1500"}
FULL_MODELS = ("alexnet", "vgg16", "resnet50", "ptb_lstm_1500")
QUICK_MODELS = ("resnet50", "ptb_lstm_1500")
QUICK_COMPRESSORS = ("none", "dgc", "topk", "onebit", "powersgd")


# ---------------------------------------------------------------- the methods measured


@dataclass(frozen=True)
class Measured:
    """One registered compressor as this table runs it."""

    #: the registered compressor
    name: str
    #: how it is configured, for the table
    label: str
    #: builds a fresh method (its own state) at each call
    build: Callable[[], Method]
    #: the row: the name, or a variant of it (empty: the name)
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.name)


#: DGC's rows: the paper's wire format, gradcomp's default compact wire, compact with every tensor sparsified,
#: and that with at least 32 entries of each tensor.
DGC_VARIANTS: dict[str, dict[str, Any]] = {
    "dgc-plain": dict(wire="plain"),
    "dgc": dict(),
    "dgc-all": dict(sparsify_all=True),
    "dgc-all32": dict(sparsify_all=True, min_entries=32),
}


def methods(names: list[str] | tuple[str, ...] | None = None) -> list[Measured]:
    """Every registered compressor (or ``names``): density 0.001 where there is one, defaults otherwise.

    Args:
        names: the compressors to measure (None: every registered one).  ``sampled-topk`` is skipped (DGC's
            selection alone, measured inside the DGC rows).

    Returns:
        One entry per compressor, in the order of ``names``; ``dgc`` gives one per :data:`DGC_VARIANTS` entry.
    """
    out = []
    for name in names if names is not None else available():
        if name == "sampled-topk":
            continue  # DGC's selection alone: measured inside the "dgc" rows
        if name == "dgc":
            for key, options in DGC_VARIANTS.items():
                text = "".join(f", {k}={v!r}" for k, v in options.items())
                out.append(Measured(name, f"gradcomp.DGC(density=0.001, warmup_epochs=0{text})",
                                    functools.partial(DGC, density=DENSITY, warmup_epochs=0, **options), key))
        elif name in ("topk", "randomk"):
            comp = get(name, density=DENSITY)
            out.append(Measured(name, repr(comp), _plain(name, density=DENSITY)))
        else:
            comp = get(name)
            out.append(Measured(name, repr(comp) + " (defaults)", _plain(name)))
    return out


def _plain(name: str, **options: Any) -> Callable[[], Method]:
    """What builds a fresh ``Method(get(name, **options))`` at each call."""
    return lambda: Method(get(name, **options))


def bytes_sent(method: Method, grads: dict[str, torch.Tensor]) -> int:
    """One step of one worker, driven as the simulator drives it; the bytes its payloads put on the wire.

    Args:
        method: a fresh method; its state advances by one step.
        grads: parameter name -> gradient.

    Returns:
        The payloads' ``nbytes`` summed over every tensor.
    """
    prepared = method.prepare(grads, 1)
    _, sent = run_exchanges([{name: method.exchange(name, g, 1) for name, g in prepared.items()}])
    method.end_step()
    return sent[0]


# ---------------------------------------------------------------- closed formulas (independent of the code)


def _ceil_frac(n: int, frac: Fraction) -> int:
    return -((-n * frac.numerator) // frac.denominator)


def expected_bytes(name: str, method: Method, grads: dict[str, torch.Tensor]) -> int | None:
    """What compressor ``name`` must send for these gradients, from its paper's wire format; None if unknown.

    Written from the wire formats, independently of the compressors' code, so that :func:`measure`'s counts
    are checked against it.

    Args:
        name: the registered compressor (:attr:`Measured.name`).
        method: the method built for it (its options: density, rank, levels, wire...).
        grads: parameter name -> gradient (the size of ``threshold``, ``dryden`` and ``adacomp`` depends on the
            values).

    Returns:
        The bytes one worker sends in one step, or None for a compressor without a formula here.
    """
    comp = method.compressor
    total = 0
    for g in grads.values():
        shape, n = tuple(g.shape), g.numel()
        rows = shape[0] if len(shape) >= 2 else n
        cols = n // rows if len(shape) >= 2 else 1
        if name == "none":
            total += 4 * n
        elif name == "fp16":
            total += 2 * n
        elif name == "dgc":  # k = ceil(0.001 n) (>= min_entries, <= n) of the sparsified tensors; others dense fp32
            assert isinstance(method, DGC)
            sparse = method.sparsify_all or (len(shape) > 1 and n >= method.min_numel)
            k = min(n, max(1, method.min_entries, _ceil_frac(n, Fraction(str(DENSITY)))))
            if not sparse:
                total += 4 * n
            elif method.wire == "plain":  # fp32 values + int32 indices
                total += 8 * k
            else:  # fp16 values, an fp32 scale, Elias-Fano: l low bits each + k + (n >> l) + 1 unary bits
                low = math.floor(math.log2(n / k))
                total += 2 * k + 4 + -(-k * low // 8) + -(-(k + ((n - 1) >> low) + 1) // 8)
        elif name == "topk":
            assert isinstance(comp, TopK)
            total += 8 * max(1, _ceil_frac(n, Fraction(str(comp.density))))
        elif name == "randomk":  # values only: every rank draws the same indices
            assert isinstance(comp, RandomK)
            total += 4 * max(1, _ceil_frac(n, Fraction(str(comp.density))))
        elif name == "onebit":  # packed signs + two fp32 reconstruction values per column
            total += -(-n // 8) + 2 * 4 * cols
        elif name == "terngrad":  # fp32 shared scale (round 1) + 2-bit codes (round 2)
            total += 4 + -(-2 * n // 8)
        elif name == "qsgd":  # fp32 norm per bucket + codes of ceil(log2(2s+1)) bits
            assert isinstance(comp, QSGD)
            width = math.ceil(math.log2(2 * comp.levels + 1))
            total += 4 * -(-n // comp.bucket_size) + -(-n * width // 8)
        elif name == "powersgd":  # rank-r P (rows x r) and Q (cols x r) in fp32, or dense when not worth it
            assert isinstance(comp, PowerSGD)
            r = comp.rank
            if len(shape) >= 2 and n >= comp.min_compression_rate * (rows + cols) * r:
                total += 4 * r * (rows + cols)
            else:
                total += 4 * n
        elif name == "threshold":  # one 32-bit word (index and sign) per |g| >= tau
            assert isinstance(comp, Threshold)
            total += 4 * int((g.abs() >= comp.tau).sum())
        elif name == "dryden":  # a proportion of the positive and of the negative entries + two fp32 means
            assert isinstance(comp, Dryden)
            p = Fraction(str(comp.proportion))
            total += 4 * (_ceil_frac(int((g > 0).sum()), p) + _ceil_frac(int((g < 0).sum()), p)) + 8
        elif name == "adacomp":  # a fresh residue: per bin of L_T, |2g| >= max |g| of the bin (g != 0); 4 B + scale
            assert isinstance(comp, AdaComp)
            b = comp.bin_size
            flat = g.reshape(-1).double()
            chosen = sum(int(((2 * flat[i:i + b]).abs() >= flat[i:i + b].abs().max()).logical_and(flat[i:i + b] != 0)
                             .sum()) for i in range(0, n, b))
            total += 4 * chosen + 4
        elif name == "dorefa":  # k-bit codes packed + one fp32 scale per tensor (per row with per_row)
            assert isinstance(comp, DoReFa)
            total += -(-n * comp.bits // 8) + 4 * (rows if comp.per_row and len(shape) >= 2 else 1)
        else:
            return None
    return total


# ---------------------------------------------------------------- the study


def model_shapes(model_name: str) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes, from a model built on the meta device (no memory).

    Args:
        model_name: a key of :data:`~gradcomp.train.models.PAPER_MODELS`.

    Returns:
        ``(name, shape)`` of each trainable parameter, in the model's order.
    """
    with torch.device("meta"):
        model = PAPER_MODELS[model_name]()
    shapes = [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    del model
    return shapes


def random_gradients(shapes: list[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, torch.Tensor]:
    """A standard normal gradient of each shape, drawn from a generator seeded with ``seed``.

    Args:
        shapes: ``(name, shape)`` pairs (:func:`model_shapes`).
        seed: the generator's seed.

    Returns:
        Name -> float32 tensor of that shape.
    """
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in shapes}


def _mib(nbytes: float) -> str:
    mib = nbytes / MIB
    if mib >= 0.995:
        return f"{mib:.2f}"
    return f"{mib:.2g}" if mib < 0.0995 else f"{mib:.2f}"


def _ratio(r: float) -> str:
    return f"{r:.0f}x" if r >= 9.5 else f"{r:.2f}x"


def measure(model_names, measured: list[Measured], seed: int, ctx: Context) -> dict:
    """Bytes per step of every compressor on every model; one model's gradients in memory at a time.

    Args:
        model_names: keys of :data:`~gradcomp.train.models.PAPER_MODELS`.
        measured: the compressors (:func:`methods`).
        seed: the seed of the random gradients (the same for every compressor of a model).
        ctx: the study's context, for the progress bar.

    Returns:
        Model name -> ``parameters``, ``tensors``, ``dense_bytes`` (fp32) and ``compressors``: row key ->
        ``option`` (its label), ``bytes`` (sent), ``expected_bytes`` (:func:`expected_bytes`, or None) and
        ``ratio`` (dense bytes / bytes sent).
    """
    results: dict = {}
    bar = ctx.tqdm(total=len(model_names) * len(measured), desc="ratio")
    for model_name in model_names:
        shapes = model_shapes(model_name)
        grads = random_gradients(shapes, seed)
        params = sum(g.numel() for g in grads.values())
        entry: dict[str, Any]
        entry = {"parameters": params, "tensors": len(shapes), "dense_bytes": 4 * params, "compressors": {}}
        for m in measured:
            bar.set_postfix_str(f"{MODEL_LABELS[model_name]}: {m.key}")
            method = m.build()
            sent = bytes_sent(method, grads)
            expected = expected_bytes(m.name, method, grads)
            entry["compressors"][m.key] = {"option": m.label, "bytes": sent, "expected_bytes": expected,
                                            "ratio": 4 * params / sent if sent else math.inf}
            del method
            gc.collect()
            bar.update(1)
        results[model_name] = entry
        del grads
        gc.collect()
    bar.close()
    return results


def _caffe_alexnet_parameters() -> int:
    """The original two-GPU AlexNet (Caffe's bvlc_alexnet: grouped conv2/4/5, 227x227 input, fc6 from 6x6x256)."""
    convs = [(96, 3, 11, 1), (256, 96, 5, 2), (384, 256, 3, 1), (384, 384, 3, 2), (256, 384, 3, 2)]
    total = sum(cout * (cin // groups) * k * k + cout for cout, cin, k, groups in convs)
    for fin, fout in ((256 * 6 * 6, 4096), (4096, 4096), (4096, 1000)):
        total += fin * fout + fout
    return total


def _notes(results: dict) -> list[str]:
    notes = ["Sizes are MiB (2^20 bytes): the paper's \"MB\" are MiB — ResNet-50's 25,557,032 fp32 parameters "
             f"are {25_557_032 * 4 / MIB:.2f} MiB, its published 97.49 MB."]
    if "alexnet" in results:
        caffe = _caffe_alexnet_parameters()
        ours = results["alexnet"]["parameters"]
        notes.append(
            f"AlexNet: we count torchvision's single-tower AlexNet, {ours:,} parameters = {4 * ours / MIB:.2f} MiB. "
            f"The published 232.56 MB is the original two-GPU (grouped) AlexNet, {caffe:,} parameters = "
            f"{4 * caffe / MIB:.2f} MiB.")
    if "ptb_lstm_1500" in results:
        ours = results["ptb_lstm_1500"]["parameters"]
        notes.append(
            f"PTB LSTM: the 1500-unit 2-layer LSTM on the 10,000-word vocabulary with encoder and decoder tied, as "
            f"the paper trains it (section 4.1), and two bias vectors per LSTM layer as in PyTorch: {ours:,} "
            f"parameters = {4 * ours / MIB:.2f} MiB, the published 194.68 MB (which are MiB).  Untied it would be "
            f"{ours + 10000 * 1500:,}.")
    per_entry = {m: pub[1] / (pub[0] / 4 * DENSITY) for m, pub in PUBLISHED.items() if m in results}
    if per_entry:
        listed = ", ".join(f"{MODEL_LABELS[m]} {b:.1f}" for m, b in per_entry.items())
        below = [f"{MODEL_LABELS[m]}'s {PUBLISHED[m][2]}x" for m, b in per_entry.items() if b < 8]
        notes.append(
            "Top-k sparsification with an fp32 value and an int32 index, 8 bytes, per kept entry (`topk`, "
            "`dgc-plain`) cannot beat 500x at density 0.001 (less once dense tensors are counted; random-k, whose "
            "indices come from a shared seed, sends 4). The published figures correspond to "
            f"{listed} bytes per kept entry (published sent / (published dense / 4 bytes x 0.001))"
            + (f": below 8 for {' and '.join(below)}, which needs a more compact coding of values or indices."
               if below else "."))
    notes += [
        "`dgc-plain`, `dgc`, `dgc-all` and `dgc-all32` are the whole method, "
        "`gradcomp.DGC(density=0.001, warmup_epochs=0)` "
        "after warm-up. `dgc-plain` is the paper's format: tensors with dim() > 1 and >= 1024 entries send "
        "ceil(0.001 n) fp32 values + int32 indices, the rest (biases, batch-norm) go dense in fp32 and are "
        "counted. `dgc` (gradcomp's default) sends the same entries as float16 values with one fp32 power-of-two "
        "scale per tensor and Elias-Fano coded indices (about 2 + log2(1000) = 12 bits each): ~3.5 bytes per "
        "entry. `dgc-all` also sparsifies the biases and batch-norm parameters; `dgc-all32` does and sends at "
        "least 32 entries of each tensor (`min_entries=32`). `topk` and `randomk` sparsify every tensor, biases "
        "included.",
        "`threshold` sends every entry with |g| >= tau as one 32-bit word; its size depends on the gradient's "
        "scale, here N(0, 1) gradients with the default tau = 0.01 (nearly every entry): not a meaningful "
        "ratio for real gradients. Every other size depends only on the tensor shapes.",
        "Every count is checked against a closed formula of the shapes (the wire format of each method), "
        "written independently of the compressors' code.",
    ]
    return notes


def _published_table(results: dict) -> str:
    rows = []
    for model_name, entry in results.items():
        pub = PUBLISHED.get(model_name)
        comps = entry["compressors"]
        cells = []
        for key in ("dgc-plain", "dgc-all"):
            c = comps.get(key)
            cells += [_mib(c["bytes"]), _ratio(c["ratio"])] if c else ["—", "—"]
        rows.append([
            MODEL_LABELS[model_name], f"{entry['parameters']:,}", entry["tensors"], _mib(entry["dense_bytes"]),
            f"{pub[0]:.2f}" if pub else "—", f"{pub[1]:.2f}" if pub else "—", f"{pub[2]}x" if pub else "—",
            *cells,
        ])
    return markdown_table(["model", "parameters", "tensors", "dense MiB", "published dense", "published DGC MiB",
                           "published ratio", "`dgc-plain` MiB", "ratio", "`dgc-all` MiB", "ratio"], rows)


def _all_table(results: dict, measured: list[Measured]) -> str:
    models = list(results)
    rows = []
    for m in measured:
        cells = []
        for model_name in models:
            c = results[model_name]["compressors"][m.key]
            cells.append(f"{_mib(c['bytes'])} ({_ratio(c['ratio'])})")
        rows.append([f"`{m.key}`", *cells, m.label])
    return markdown_table(["compressor", *[f"{MODEL_LABELS[n]} MiB (ratio)" for n in models], "configuration"],
                          rows, align="l" + "r" * len(models) + "l")


def _plot(results: dict, measured: list[Measured], path) -> None:
    from matplotlib.artist import Artist
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    models = list(results)
    names = [m.key for m in measured]
    # compressors from the largest to the smallest payload (mean log size over models), so the bars step down
    names.sort(key=lambda n: -sum(math.log(results[mo]["compressors"][n]["bytes"]) for mo in models))
    fig = new_figure(12.5, 5.6)
    ax = fig.add_subplot()
    width = 0.84 / len(names)
    palette = [f"C{i}" for i in range(10) if i != 3] + ["#222222", "#aec7e8", "#ffbb78", "#98df8a"]
    others = [n for n in names if n not in DGC_VARIANTS]
    reds = {"dgc-plain": "#f4a09c", "dgc": "C3", "dgc-all": "#7f0000", "dgc-all32": "#b22222"}  # DGC in reds
    colors = {n: palette[i % len(palette)] for i, n in enumerate(others)} | reds
    for j, model_name in enumerate(models):
        entry = results[model_name]
        for i, n in enumerate(names):
            c = entry["compressors"][n]
            x = j + (i - (len(names) - 1) / 2) * width
            ours = n in DGC_VARIANTS
            ax.bar(x, c["bytes"] / MIB, width=width * 0.92, color=colors[n], edgecolor="black" if ours else "0.25",
                   linewidth=1.4 if ours else 0.4)
            ax.text(x, c["bytes"] / MIB * 1.12, _ratio(c["ratio"]), rotation=90, ha="center", va="bottom",
                    fontsize=6.5, color="0.2")
        pub = PUBLISHED.get(model_name)
        if pub and "dgc-plain" in names:
            x = j + (names.index("dgc-plain") - (len(names) - 1) / 2) * width
            ax.plot([x], [pub[1]], marker="D", color="black", markersize=5, zorder=5)
    ax.set_yscale("log")
    ax.set_xticks(range(len(models)))
    ax.set_xticklabels([f"{MODEL_LABELS[m]}\n{results[m]['parameters'] / 1e6:.1f}M parameters\n"
                        f"{results[m]['dense_bytes'] / MIB:.0f} MiB dense fp32" for m in models])
    ax.set_ylabel("MiB sent per worker per step (log scale)")
    top = max(results[m]["dense_bytes"] for m in models) / MIB
    ax.set_ylim(bottom=min(c["bytes"] for m in models for c in results[m]["compressors"].values()) / MIB / 3,
                top=top * 5)
    ax.grid(True, axis="y", which="major", alpha=0.3)
    ax.grid(True, axis="y", which="minor", alpha=0.08)
    ax.set_axisbelow(True)
    ax.set_title(f"Bytes one worker sends per step (dgc, topk, randomk at density {DENSITY:g}; others at their "
                 "defaults)\nbar labels: compression ratio against dense fp32")
    handles: list[Artist] = [Patch(facecolor=colors[n], edgecolor="0.25", label=n) for n in names]
    if any(m in PUBLISHED for m in models) and "dgc-plain" in names:
        handles.append(Line2D([], [], marker="D", color="black", linestyle="none", label="DGC, published"))
    fig.legend(handles=handles, loc="outside right center", frameon=False, title="compressor")
    save_figure(fig, path)


def run(ctx: Context) -> Result:
    """Count the bytes every compressor sends for one step of each paper network, and compare with the paper.

    No training and no data: random N(0, 1) gradients shaped like the parameters.

    Args:
        ctx: the run's context: ``ctx.full`` chooses every model and compressor (quick: ResNet-50 and the PTB
            LSTM, five compressors), ``ctx.seed`` seeds the gradients.

    Returns:
        The report: DGC's dense and sent sizes (MiB per worker per step) and ratios beside the published ones;
        every compressor's size and ratio per model; the sizes plotted per model; the checks (every count equals its
        closed formula, ``none`` sends the dense bytes, DGC above 100x and within a factor 2 of the published
        ratio, the compact wire smaller than the paper's, ResNet-50 at 97.49 MiB).  ``data`` holds the density,
        every measurement (:func:`measure`) and the published figures.
    """
    model_names = FULL_MODELS if ctx.full else QUICK_MODELS
    measured = methods(None if ctx.full else QUICK_COMPRESSORS)
    results = measure(model_names, measured, ctx.seed, ctx)

    checks = []
    for model_name, entry in results.items():
        label = MODEL_LABELS[model_name]
        comps = entry["compressors"]
        mismatched = [f"{n}: sent {c['bytes']:,}, formula {c['expected_bytes']:,}" for n, c in comps.items()
                      if c["expected_bytes"] is not None and c["bytes"] != c["expected_bytes"]]
        unknown = [n for n, c in comps.items() if c["expected_bytes"] is None]
        checked = len(comps) - len(unknown)
        checks.append(Check(f"{label}: bytes counted from payloads equal the wire-format formula for {checked} "
                            "compressors" + (f" (no formula for {', '.join(unknown)})" if unknown else ""),
                            not mismatched, "; ".join(mismatched)))
        if "none" in comps:
            checks.append(Check(f"{label}: `none` sends exactly the dense fp32 bytes (ratio 1)",
                                comps["none"]["bytes"] == entry["dense_bytes"],
                                f"{comps['none']['bytes']:,} vs {entry['dense_bytes']:,}"))
        if "dgc-plain" in comps:
            r = comps["dgc-plain"]["ratio"]
            checks.append(Check(f"{label}: DGC compresses more than 100x", r > 100, f"{r:.0f}x"))
            order = [comps[k]["bytes"] for k in ("dgc-plain", "dgc", "dgc-all")]
            checks.append(Check(f"{label}: the compact wire sends less than the paper's format, and sparsifying "
                                "every tensor less again", order[0] > order[1] > order[2],
                                " > ".join(f"{b:,}" for b in order)))
        pub = PUBLISHED.get(model_name)
        if pub and "dgc-plain" in comps:
            r = comps["dgc-plain"]["ratio"]
            within = 0.5 * pub[2] <= r <= 2 * pub[2]
            checks.append(Check(f"{label}: DGC in the paper's format within a factor 2 of the published {pub[2]}x",
                                within, f"{r:.0f}x"))
    if "resnet50" in results:
        dense = results["resnet50"]["dense_bytes"] / MIB
        checks.append(Check("ResNet-50 dense size equals the published 97.49 MB (MiB)", f"{dense:.2f}" == "97.49",
                            f"{dense:.2f} MiB"))

    published = _published_table(results)
    every = _all_table(results, measured)
    notes = _notes(results)
    plot_path = ctx.path(".png")
    _plot(results, measured, plot_path)
    plots = [plot_path]

    title = "Gradient size and compression ratio per step (DGC paper)"
    setup = [f"models: {', '.join(MODEL_LABELS[m] for m in results)}",
             f"compressors: {', '.join(m.key for m in measured)}"
             + ("" if ctx.full else " (quick subset; --full runs every registered compressor)"),
             f"gradients: N(0, 1), torch.Generator seeded with {ctx.seed}; one worker, one step",
             f"peak memory of the process: {memory_peak_mb():.0f} MB" if memory_peak_mb() else "peak memory: unknown"]
    markdown = "\n".join([
        "## Beside the published figures (DGC at density 0.1%)", "",
        "`dgc-plain` is the paper's wire format; `dgc-all` is gradcomp's compact wire with every tensor "
        "sparsified (see the notes).", "", published, "",
        "## Every compressor", "", every, "",
        "## Notes", "", *[f"- {n}" for n in notes], ""])
    console = "\n".join([title, "", "Beside the published figures (DGC, density 0.1%; MiB = 2^20 bytes):",
                         published, "", "Every compressor: MiB sent per worker per step (ratio):", every, "",
                         *[f"* {n}" for n in notes]])
    data = {"density": DENSITY, "models": results, "published": {k: list(v) for k, v in PUBLISHED.items()}}
    return Result(title=title, console=console, markdown=markdown, checks=checks, plots=plots, data=data,
                  setup=setup)


register(Study("ratio", "bytes per step and compression ratio of every compressor: AlexNet, VGG-16, ResNet-50, "
                        "PTB LSTM", run, order=4, threads=1))
