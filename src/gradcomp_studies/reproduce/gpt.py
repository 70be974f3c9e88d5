"""Table ``gpt``: a character-level GPT on Tiny Shakespeare, 4 workers, AdamW: dense vs compressed, at matched steps.

Rows (every one a ``gradcomp train`` run in the simulator, the same model,
data, steps and AdamW schedule; only the gradient exchange differs):

- dense (``none``): fp32 all-reduce;
- DGC in its AdamW form, ``DGC(momentum=0)``: error-feedback top-k with
  DGC's sampled selection at density 0.001 and its sparsity warm-up (25 %,
  6.25 %, 1.5625 %, 0.39 %, then 0.1 %) over the first 1/40 of training,
  AdamW's moments on the averaged sparse gradient.  ``sparsify_all=True``:
  the biases and LayerNorm weights (0.85 % of the parameters) go through the
  same accumulation instead of dense; sent dense, as the paper does for
  convnets, they alone would be ~90 % of DGC's bytes and cap the ratio near
  120x;
- top-k with error feedback (``topk``, exact selection, gradient dropping's
  residual) at the same density, no warm-up;
- PowerSGD, rank 4, with error feedback and warm start (matrices too small
  to gain 2x go dense: its ``min_compression_rate``);
- QSGD with its default 16 levels and buckets of 512 (unbiased, no error feedback).

The model is :class:`gradcomp.train.models.GPT` (pre-LN, tied decoder,
context = BPTT window).  Loss is measured on the held-out split the loop
evaluates (the last 5 % of the text: ``Dataset.test``), each window read from
its start.  Bytes count worker 0's payloads, dense tensors included, averaged
over the run, warm-up included; dense fp32 bytes are ``4 * parameters`` per step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .common import Check, Context, Result, Study, StudySkipped, markdown_table, register, train_rows

if TYPE_CHECKING:
    from gradcomp.train.config import TrainConfig

DENSITY = 0.001
POWERSGD_RANK = 4
LABELS = {"dense": "dense (fp32 all-reduce)", "dgc": "DGC(momentum=0) 99.9 %, warm-up",
          "topk": "top-k 99.9 %, error feedback", "powersgd": f"PowerSGD rank {POWERSGD_RANK}",
          "qsgd": "QSGD 16 levels"}
METHODS = {"dense": "none", "dgc": "dgc", "topk": "topk", "powersgd": "powersgd", "qsgd": "qsgd"}
#: the full variant's must-hold: the best row at >= RATIO_FLOOR x fewer bytes within LOSS_GAP of dense
LOSS_GAP, RATIO_FLOOR = 0.02, 100


@dataclass(frozen=True)
class Variant:
    limit_train: int | None  # training characters
    epochs: int
    limit_test: int | None = None  # held-out characters
    workers: int = 4
    batch_per_worker: int = 8
    bptt: int = 128  # the GPT's context
    layers: int = 4
    d: int = 128
    heads: int = 4
    lr: float = 2e-3
    weight_decay: float = 0.1
    lr_warmup_epochs: float = 0.25
    warmup_share: float = 1 / 40  # DGC's sparsity warm-up: the paper's LSTM share (1 of 40 epochs)
    checkpoint_every: int | None = None

    @property
    def warmup_epochs(self) -> float:
        return self.warmup_share * self.epochs


#: 246 steps an epoch (1,003,854 characters, 4 x 8 windows of 128 a step), 6 epochs: 1,476 steps a row; measured
#: 0.63-0.89 s a step on one loaded CPU thread (20 steps a row), so 15-22 min a row
FULL = Variant(limit_train=None, epochs=6, checkpoint_every=100)
#: 20 steps of a 2-layer d=32 model on 4 x 4 windows of 32 characters
QUICK = Variant(limit_train=10_256, epochs=1, limit_test=4_000, batch_per_worker=4, bptt=32, layers=2, d=32,
                lr=1e-2, lr_warmup_epochs=0.0)


def configs(variant: Variant, seed: int) -> dict[str, TrainConfig]:
    """The five rows as ``gradcomp train`` configs."""
    from gradcomp.train.config import Data, Exchange, Launch, Model, Optim, Output, Schedule, TrainConfig

    options: dict[str, dict[str, Any]]
    options = {"dense": {}, "dgc": {"density": DENSITY, "warmup_epochs": variant.warmup_epochs, "sparsify_all": True},
               "topk": {"density": DENSITY}, "powersgd": {"rank": POWERSGD_RANK}, "qsgd": {}}
    return {key: TrainConfig(  # the rows differ in their method and label
        data=Data(dataset="shakespeare", batch_size=variant.batch_per_worker, bptt=variant.bptt,
                  limit_train=variant.limit_train, limit_test=variant.limit_test),
        model=Model(name="gpt", options={"layers": variant.layers, "d": variant.d, "heads": variant.heads}),
        exchange=Exchange(method=METHODS[key], options=options[key]),
        optim=Optim(name="adamw", lr=variant.lr, momentum=0.0, weight_decay=variant.weight_decay),
        schedule=Schedule(epochs=variant.epochs, lr_warmup_epochs=variant.lr_warmup_epochs),
        launch=Launch(workers=variant.workers, seed=seed, simulate=True),
        output=Output(label=LABELS[key], checkpoint_every=variant.checkpoint_every)) for key in LABELS}


def run(ctx: Context) -> Result:
    from gradcomp.train.data import DatasetNotFoundError, load_dataset
    from gradcomp.train.report import human_bytes

    variant = FULL if ctx.full else QUICK
    try:
        vocab = load_dataset("shakespeare", limit_train=1).vocab_size
    except DatasetNotFoundError as error:
        raise StudySkipped(f"Tiny Shakespeare is needed for this table and was not found: {error}") from None
    assert vocab is not None  # an lm dataset's (Dataset sets it)
    results, plot_path = train_rows(ctx, "gpt", configs(variant, ctx.seed))

    dense = results["dense"]
    parameters = dense["dense_bytes"] // (4 * dense["steps"])

    def gap(s: dict) -> float:
        return s.get("test_loss", math.inf) / dense["test_loss"] - 1

    body = []
    for key, s in results.items():
        if "diverged" in s:
            body.append([LABELS[key], "diverged", "—", "—", "—", "—", "—"])
            continue
        delta = "—" if key == "dense" else f"{100 * gap(s):+.2f} %"
        body.append([LABELS[key], f"{s['test_loss']:.4f}", delta, human_bytes(s["bytes_sent"] / s["steps"]),
                     human_bytes(s["dense_bytes"] / s["steps"]), f"{s['compression_ratio']:.1f}x",
                     f"{1e3 * s['time_per_step']:.0f} ms"])
    table = markdown_table(["row", "held-out loss", "vs dense", "sent / step / worker", "dense fp32 / step",
                            "ratio", "time / step (4 workers, 1 process)"], body)

    finished = {k: s for k, s in results.items() if "diverged" not in s}
    uniform = math.log(vocab)
    checks = [Check(f"every row learns: held-out loss below the uniform guess ln({vocab}) = {uniform:.3f}",
                    len(finished) == len(results) and all(s["test_loss"] < uniform for s in finished.values()),
                    ", ".join(f"{k} {s.get('test_loss', math.nan):.3f}" for k, s in results.items()))]
    qualified = {k: s for k, s in finished.items() if k != "dense" and s["compression_ratio"] >= RATIO_FLOOR}
    best = min(qualified, key=lambda k: qualified[k]["test_loss"]) if qualified else None
    notes = []
    if best is not None:
        top = qualified[best]
        notes.append(f"Best row at >= {RATIO_FLOOR}x fewer bytes: {LABELS[best]}, held-out loss "
                     f"{top['test_loss']:.4f} vs dense {dense['test_loss']:.4f} ({100 * gap(top):+.2f} %) "
                     f"at {top['compression_ratio']:.0f}x.")
    else:
        notes.append(f"No compressed row reached {RATIO_FLOOR}x fewer bytes.")
    for key in ("powersgd", "qsgd"):
        if key in finished:
            s = finished[key]
            notes.append(f"{LABELS[key]}: {100 * gap(s):+.2f} % at {s['compression_ratio']:.1f}x "
                         f"(below {RATIO_FLOOR}x: not a candidate for the check).")
    if ctx.full:
        held = best is not None and gap(qualified[best]) <= LOSS_GAP
        detail = (f"{LABELS[best]}: {qualified[best]['test_loss']:.4f} vs {dense['test_loss']:.4f} "
                  f"({100 * gap(qualified[best]):+.2f} %), {qualified[best]['compression_ratio']:.0f}x"
                  if best is not None else "no row at that ratio")
        checks.append(Check(f"the best compressed row at >= {RATIO_FLOOR}x fewer bytes is within "
                            f"{100 * LOSS_GAP:g} % of the dense held-out loss", held, detail))
        if not held:
            notes.append(f"The {100 * LOSS_GAP:g} % target is missed at this length ({variant.epochs} epochs). A "
                         "likely cause, not isolated by this table: at density 0.001 each weight is sent about "
                         "once in a thousand steps, and AdamW divides each rare, accumulated update by a second "
                         "moment that saw mostly zeros, so those updates come large and late.")

    title = "Character-level GPT on Tiny Shakespeare, AdamW, 4 workers: dense vs DGC, top-k, PowerSGD, QSGD"
    chars = "all 1,003,854" if variant.limit_train is None else f"the first {variant.limit_train:,}"
    held_out = "all 55,770" if variant.limit_test is None else f"the first {variant.limit_test:,}"
    setup = [f"data: Tiny Shakespeare, {chars} training characters, {held_out} held-out characters "
             "(the loop's test split, the text's last 5 %)",
             f"model: gradcomp.train.models.GPT, {variant.layers} layers, d={variant.d}, {variant.heads} heads, "
             f"context {variant.bptt}, dropout 0, tied decoder ({parameters:,} parameters)",
             f"training: {variant.workers} simulated workers, per-worker batch {variant.batch_per_worker} windows "
             f"of {variant.bptt} characters, {variant.epochs} epoch(s) = {dense['steps']} steps, AdamW lr "
             f"{variant.lr:g} (betas 0.9, 0.999), decoupled weight decay {variant.weight_decay:g} on every "
             f"parameter" + (f", linear lr warm-up over {variant.lr_warmup_epochs:g} epoch"
                             if variant.lr_warmup_epochs else ""),
             f"DGC: density {DENSITY}, momentum 0, sparsify_all, compact wire, sparsity warm-up "
             f"{variant.warmup_epochs:g} epochs ({100 * variant.warmup_share:g} % of training); top-k: density "
             f"{DENSITY}, plain wire (fp32 values, int32 indices), residual error feedback; PowerSGD rank "
             f"{POWERSGD_RANK}, warm start; QSGD 16 levels, buckets of 512"]
    markdown = "\n".join(["## Held-out loss and gradient size, at matched steps", "", table, "",
                          "## Notes", "", *[f"- {n}" for n in notes], ""])
    console = "\n".join([title, "", table, "", *[f"* {n}" for n in notes]])
    return Result(title=title, console=console, markdown=markdown, checks=checks, plots=[plot_path],
                  data={"variant": dataclasses.asdict(variant), "parameters": parameters, "rows": results},
                  setup=setup)


register(Study("gpt", "character-level GPT on Tiny Shakespeare, AdamW, 4 workers: dense vs DGC, top-k, PowerSGD, "
               "QSGD", run, order=7, threads=1))
