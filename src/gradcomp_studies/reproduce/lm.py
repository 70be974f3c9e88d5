"""Table ``lm``: language modeling on Penn Treebank, dense vs DGC at 99.9 % sparsity, 4 workers.

The paper's recipe (section 4.1): "vanilla SGD with gradient clipping", the
encoder and decoder weights tied, the learning rate decayed when validation
stops improving (here: divided by 4 at fixed epochs), DGC warming up over 1 of
40 epochs.  Rows: the dense baseline (the averaged gradient clipped to norm
0.25); DGC at density 0.001 with local gradient clipping (each worker clips
its own mean gradient to ``0.25 * sqrt(4)``: section 3.2 clips each worker's
share ``g / 4`` of the summed gradient to ``0.25 / sqrt(4)``); and, in the
quick variant, the same DGC without clipping, to show clipping's share.  With
vanilla SGD, DGC's momentum correction and masking do nothing: DGC is top-k
with local accumulation, clipping and warm-up.

Every row is a ``gradcomp train`` run in the simulator (4 workers, per-worker
batch 5, BPTT 35) on PyTorch's ``word_language_model`` 2-layer LSTM (200
units, tied: 2,650,000 parameters; the paper's 1500-unit model is in the
``ratio`` table).  Test perplexity is on the whole PTB test set (82,430 tokens)
in the full variant, whose rows are resumable runs (``--runs DIR``: a
checkpoint every 200 steps; a stopped row continues where it stopped).
Gradient size counts worker 0's payloads per step, dense tensors (biases)
included, averaged over the run, warm-up included.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .common import Check, Context, Result, Study, markdown_table, register, require_dataset, train_rows

if TYPE_CHECKING:
    from gradcomp.train.config import TrainConfig

#: Published (DGC paper, Table 4: 2-layer LSTM, 1500 units, PTB, 4 nodes).
PUBLISHED = {"dense": "72.30", "dgc": "72.24", "dgc_noclip": "—"}
PUBLISHED_SIZE = {"dense": "194.68 MB", "dgc": "0.42 MB (462x)", "dgc_noclip": "—"}
DENSITY = 0.001
LABELS = {"dense": "dense baseline", "dgc": "DGC 99.9 %", "dgc_noclip": "DGC 99.9 %, no local clipping"}


@dataclass(frozen=True)
class Variant:
    """The settings of one variant of the study (:data:`FULL` or :data:`QUICK`)."""

    #: training tokens (None: all of PTB's training split)
    limit_train: int | None
    #: epochs of training
    epochs: int
    #: test tokens (None: the whole test set)
    limit_test: int | None = None
    #: simulated workers
    workers: int = 4
    #: rows of text per worker and step: global 20, the word_language_model example's batch
    batch_per_worker: int = 5
    #: tokens per row (truncated backpropagation through time)
    bptt: int = 35
    #: the learning rate: vanilla SGD, as the paper and the word_language_model example
    lr: float = 20.0
    #: divide the learning rate by 4 at these epochs (PTB's usual annealing)
    lr_milestones: tuple[int, ...] = ()
    #: SGD momentum (0: vanilla SGD)
    momentum: float = 0.0
    #: the gradient clipping norm: dense after averaging, DGC locally (scaled by ``sqrt(workers)``)
    clip_norm: float = 0.25
    #: DGC's warm-up as a share of training: the paper's LSTM, one warm-up epoch of 40
    warmup_share: float = 1 / 40
    #: the rows trained (:data:`LABELS` keys)
    rows: tuple[str, ...] = ("dense", "dgc", "dgc_noclip")
    #: checkpoint each run every this many steps, so ``--runs`` resumes a stopped row (None: at epoch ends only)
    checkpoint_every: int | None = None

    @property
    def warmup_epochs(self) -> float:
        """DGC's warm-up in epochs: ``warmup_share * epochs``."""
        return self.warmup_share * self.epochs


FULL = Variant(limit_train=None, epochs=12, lr_milestones=(8, 10), rows=("dense", "dgc"), checkpoint_every=200)
QUICK = Variant(limit_train=20_000, epochs=1, limit_test=3_000)


def configs(variant: Variant, seed: int) -> dict[str, TrainConfig]:
    """The variant's rows as ``gradcomp train`` configs.

    Args:
        variant: the data, model, schedule, clipping and rows.
        seed: the seed of every run.

    Returns:
        Row key -> config, for the keys of ``variant.rows`` in their order: ``dense`` (clipped after averaging),
        ``dgc`` (density :data:`DENSITY`, clipped locally), ``dgc_noclip`` (the same without clipping).
    """
    from gradcomp.train.config import Data, Exchange, Launch, Model, Optim, Output, Schedule, TrainConfig

    dense = TrainConfig(  # the rows differ in their method and label
        data=Data(dataset="ptb", batch_size=variant.batch_per_worker, bptt=variant.bptt,
                  limit_train=variant.limit_train, limit_test=variant.limit_test),
        model=Model(name="lstm", options={"tie_weights": True}),
        exchange=Exchange(method="none"),
        optim=Optim(lr=variant.lr, momentum=variant.momentum, clip_norm=variant.clip_norm),
        schedule=Schedule(epochs=variant.epochs, lr_milestones=list(variant.lr_milestones), lr_decay=0.25),
        launch=Launch(workers=variant.workers, seed=seed, simulate=True),
        output=Output(label=LABELS["dense"], checkpoint_every=variant.checkpoint_every))
    dgc = {"density": DENSITY, "warmup_epochs": variant.warmup_epochs}
    rows = {"dense": dense,
            "dgc": dense.replace(exchange=Exchange(method="dgc", options=dgc), output={"label": LABELS["dgc"]}),
            "dgc_noclip": dense.replace(exchange=Exchange(method="dgc", options={**dgc, "clip_norm": None}),
                                        output={"label": LABELS["dgc_noclip"]})}
    return {key: rows[key] for key in variant.rows}


def _gap(row: dict, dense: dict) -> float:
    """A row's test perplexity relative to dense: ``row / dense - 1``."""
    return row["test_perplexity"] / dense["test_perplexity"] - 1


def _table(results: dict[str, dict]) -> str:
    """The main table: each row's test perplexity, its gap to dense, bytes per step, ratio and time per step,
    beside the published figures."""
    from gradcomp.train.report import human_bytes

    body = []
    for key, s in results.items():
        per_step = s["bytes_sent"] / s["steps"]
        delta = "—" if key == "dense" else f"{100 * _gap(s, results['dense']):+.2f} %"
        body.append([LABELS[key], f"{s['test_perplexity']:.2f}", delta, PUBLISHED[key], human_bytes(per_step),
                     human_bytes(s["dense_bytes"] / s["steps"]), f"{s['compression_ratio']:.0f}x", PUBLISHED_SIZE[key],
                     f"{1e3 * s['time_per_step']:.0f} ms"])
    return markdown_table(["row", "test ppl", "vs dense", "published ppl (1500 units)",
                           "gradient sent / step", "dense fp32 / step", "ratio", "published size",
                           "time / step (4 workers, 1 process)"], body)


def _checks(full: bool, vocab: int, results: dict[str, dict]) -> list[Check]:
    """DGC's compression ratio above its floor; full: DGC within 3 % of the dense perplexity; quick: every row
    below a quarter of the uniform guess."""
    dense, dgc = results["dense"], results["dgc"]
    gap = _gap(dgc, dense)
    floor = 100 if full else 10  # a short run is dominated by its first warm-up steps (25 % density)
    checks = [Check(f"DGC sends under {100 / floor:g} % of the dense bytes", dgc["compression_ratio"] > floor,
                    f"{dgc['compression_ratio']:.0f}x")]
    if full:
        checks.append(Check("DGC at 99.9 % within 3 % of the dense perplexity", gap <= 0.03,
                            f"{dgc['test_perplexity']:.2f} vs {dense['test_perplexity']:.2f} ({100 * gap:+.2f} %)"))
    else:
        checks.append(Check(f"every row learns: test perplexity below a quarter of the uniform guess ({vocab:,})",
                            all(s["test_perplexity"] < vocab / 4 for s in results.values()),
                            ", ".join(f"{s['test_perplexity']:.0f}" for s in results.values())))
    return checks


def _notes(results: dict[str, dict]) -> list[str]:
    """DGC's gap and ratio against the published ones, (quick) what clipping does, and any diverged row."""
    dense, dgc = results["dense"], results["dgc"]
    gap = _gap(dgc, dense)
    notes = [f"DGC at 99.9 % sparsity: {100 * gap:+.2f} % perplexity against dense (published: -0.08 %), "
             f"sending {dgc['compression_ratio']:.0f}x fewer bytes (published 462x for the 1500-unit model; our "
             "200-unit model's dense biases are a larger share, see the ratio table for the paper's model)."]
    if "dgc_noclip" in results:
        gap_noclip = _gap(results["dgc_noclip"], dense)
        notes.append(f"Without local gradient clipping: {100 * gap_noclip:+.2f} % against dense"
                     + (" — clipping is what keeps the accumulated LSTM gradient in check." if gap_noclip > gap
                        else " (no worse than with clipping at this scale)."))
    if not all(math.isfinite(s["test_perplexity"]) for s in results.values()):
        notes.append("A row diverged (non-finite perplexity).")
    return notes


def _texts(title: str, table: str, notes: list[str]) -> tuple[str, str]:
    """The report's markdown body and its console text: the main table, the published figures, the notes."""
    markdown = "\n".join(["## Test perplexity and gradient size", "", table, "",
                          "Published (DGC paper, Table 4): 2-layer LSTM with 1500 units on PTB, 4 nodes: "
                          "perplexity 72.30 dense, 72.24 with DGC; gradient 194.68 MB to 0.42 MB (462x).", "",
                          "## Notes", "", *[f"- {n}" for n in notes], ""])
    console = "\n".join([title, "", table, "", *[f"* {n}" for n in notes]])
    return markdown, console


def _setup(variant: Variant, parameters: int) -> list[str]:
    """The report's setup lines: the data, the model, the training, the sparsity."""
    tokens = "all 929,589" if variant.limit_train is None else f"the first {variant.limit_train:,}"
    test = "all 82,430" if variant.limit_test is None else f"the first {variant.limit_test:,}"
    return [f"data: Penn Treebank, {tokens} training tokens, {test} test tokens",
            f"model: gradcomp.train.models.LSTMLM, 2 layers, 200 units, dropout 0.2, encoder and decoder tied "
            f"({parameters:,} parameters)",
            f"training: {variant.workers} simulated workers, per-worker batch {variant.batch_per_worker}, BPTT "
            f"{variant.bptt}, {variant.epochs} epochs, SGD lr {variant.lr}"
            + (f" divided by 4 at epoch {', '.join(map(str, variant.lr_milestones))}" if variant.lr_milestones else "")
            + (f", momentum {variant.momentum}" if variant.momentum else " (vanilla SGD, as the paper)") + ", "
            f"clip norm {variant.clip_norm} (dense: after averaging; DGC: locally, "
            f"{variant.clip_norm}*sqrt({variant.workers}) on each worker's mean gradient)",
            f"sparsity: density {DENSITY}; warm-up {variant.warmup_epochs:g} epochs "
            f"({100 * variant.warmup_share:g} % of training), advancing per step"]


def run(ctx: Context) -> Result:
    """Train dense and DGC at 99.9 % on Penn Treebank and compare their test perplexity and bytes.

    Args:
        ctx: the run's context: ``ctx.full`` chooses the variant, ``ctx.seed`` seeds every run, ``ctx.runs_dir``
            keeps the runs (the full rows checkpoint every 200 steps, so a stopped study resumes).

    Returns:
        The report: each row's test perplexity (per word) and its gap to dense in %, beside the published
        figures; the gradient sent and dense fp32 size per step and worker, the compression ratio and time per
        step; the training curves; the checks (DGC's ratio above 100x, full, or 10x, quick; full: DGC within 3 %
        of the dense perplexity; quick: every row below a quarter of the vocabulary size).  ``data`` holds the
        variant, the parameter count and every run's summary.

    Raises:
        StudySkipped: Penn Treebank is not on this machine.
    """
    variant = FULL if ctx.full else QUICK
    vocab = require_dataset("ptb", "Penn Treebank").vocab_size
    assert vocab is not None  # an lm dataset's (Dataset sets it)
    results, plot_path = train_rows(ctx, "lm", configs(variant, ctx.seed))
    dense = results["dense"]
    parameters = dense["dense_bytes"] // (4 * dense["steps"])
    title = "Language modeling on Penn Treebank: dense vs DGC at 99.9 % sparsity, 4 workers"
    markdown, console = _texts(title, _table(results), _notes(results))
    return Result(title=title, console=console, markdown=markdown, checks=_checks(ctx.full, vocab, results),
                  plots=[plot_path],
                  data={"variant": dataclasses.asdict(variant),
                        "rows": results, "published": {"perplexity": PUBLISHED, "size": PUBLISHED_SIZE}},
                  setup=_setup(variant, parameters))


register(Study("lm", "PTB language model, 4 workers: dense vs DGC 99.9 % (with and without clipping)", run,
               order=3, threads=1))
