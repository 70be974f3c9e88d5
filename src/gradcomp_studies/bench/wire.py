"""``gradcomp bench wire``: the bytes DGC puts on the wire, and where they go.

One worker's gradient of each of the paper's networks (random normal, shaped
like the parameters; the sizes depend only on the shapes) goes through DGC
at density 0.001 after warm-up, in four configurations:

* ``dgc-plain`` — the paper's format: fp32 values and int32 indices for the
  tensors with ``dim() > 1`` and >= 1024 entries, the others dense in fp32;
* ``dgc`` — gradcomp's default compact wire: float16 values with one fp32
  power-of-two scale per tensor (the rounding stays in the residual) and
  Elias-Fano coded sorted indices; the small tensors still dense;
* ``dgc-all`` — the compact wire with every tensor sparsified
  (``DGC(sparsify_all=True)``);
* ``dgc-all32`` — that, with at least 32 entries of each tensor sent
  (``DGC(sparsify_all=True, min_entries=32)``: small layers are not starved).

Every byte is counted from the payloads the method really produced, split
into values, indices, scales and dense tensors; the ratio is against the
dense fp32 gradient of the same model (the baseline, 1.0x).  PowerSGD at
rank 1 and 2 stand beside them.  Each payload is also decoded and checked
against the entries the selection chose: the encoding must be exact.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable
from typing import Any

import torch

from gradcomp.compressors.base import Payload
from gradcomp.compressors.powersgd import PowerSGD
from gradcomp.compressors.sparse import DGCSelect
from gradcomp.method import DGC, Method

from ..reproduce.common import Check, Context, Result, Study, markdown_table, register
from ..reproduce.ratio import DGC_VARIANTS, MODEL_LABELS, model_shapes, random_gradients

DENSITY = 0.001
GOAL = 1000  # issue 5: at least 1000x on ResNet-50
FULL_MODELS = ("alexnet", "vgg16", "resnet50", "ptb_lstm_1500")
QUICK_MODELS = ("resnet50",)
DGC_LABELS = {
    "dgc-plain": "DGC, the paper's format (fp32 values, int32 indices, small tensors dense)",
    "dgc": "DGC, compact wire (fp16 values, Elias-Fano indices), small tensors dense",
    "dgc-all": "DGC, compact wire, every tensor sparsified",
    "dgc-all32": "DGC, compact wire, every tensor sparsified, at least 32 entries of each",
}
#: DGC's configurations are the ratio table's (:data:`~gradcomp_studies.reproduce.ratio.DGC_VARIANTS`), PowerSGD
#: beside them
VARIANTS: dict[str, tuple[str, Callable[[], Method]]] = {
    **{key: (DGC_LABELS[key], functools.partial(DGC, density=DENSITY, warmup_epochs=0, **options))
       for key, options in DGC_VARIANTS.items()},
    "powersgd-1": ("PowerSGD rank 1", lambda: Method(PowerSGD(rank=1))),
    "powersgd-2": ("PowerSGD rank 2", lambda: Method(PowerSGD(rank=2))),
}
PARTS = ("values", "indices", "scales", "dense", "factors")


def _parts(method: Method, payload: Payload) -> dict[str, int]:
    """Split one payload's bytes by what they carry."""
    sizes = [t.numel() * t.element_size() for t in payload.tensors]
    if isinstance(method.compressor, PowerSGD):  # its factors and the tensors it leaves dense, together
        return {"factors": sum(sizes)}
    if payload.op == "sum":  # a dense tensor, all-reduced
        return {"dense": sum(sizes)}
    if len(sizes) == 2:  # plain: (values, indices)
        return {"values": sizes[0], "indices": sizes[1]}
    return {"values": sizes[0], "scales": sizes[1], "indices": sizes[2]}  # compact: (values, scale, code)


def measure(method: Method, grads: dict[str, torch.Tensor]) -> tuple[dict[str, int], int]:
    """One worker, one step: bytes per part, and how many sparse payloads decoded to other entries than chosen.

    Every tensor goes through the method's exchange with a world of one (each payload is its own round's
    result); for DGC, each sparsified tensor's last payload is decoded and compared with the entries the
    selection chose.  Ends the method's step.

    Args:
        method: a fresh method (its state advances by one step).
        grads: one worker's gradient, name -> tensor (the method may change them in place: pass copies).

    Returns:
        ``(parts, inexact)``: bytes sent per part (:data:`PARTS`: values, indices, scales, dense, factors; 0 for a
        part not sent), and the number of sparse payloads that did not decode exactly.
    """
    parts = dict.fromkeys(PARTS, 0)
    inexact = 0
    prepared = method.prepare(grads, 1)
    for name, g in prepared.items():
        gen = method.exchange(name, g, 1)
        payload = next(gen)
        while True:
            for part, nbytes in _parts(method, payload).items():
                parts[part] += nbytes
            try:
                payload = gen.send([payload])
            except StopIteration:
                break
        if isinstance(method, DGC) and method.sparsified(g):
            inexact += not _decodes_exactly(method, payload, g)
    method.end_step()
    return parts, inexact


def _decodes_exactly(method: DGC, payload: Payload, grad: torch.Tensor) -> bool:
    """The decoded payload holds exactly the k largest |entries| of the gradient (the accumulator at step 1),
    at their indices, each within float16 rounding (exactly, for the plain wire)."""
    selector = method.compressor
    assert isinstance(selector, DGCSelect)  # DGC's
    values, indices = selector.decode(payload, grad.numel())
    flat = grad.reshape(-1)
    k = selector.entries(flat.numel())
    chosen = torch.topk(flat.abs(), k).values
    if indices.numel() != k or not torch.equal(flat.abs()[indices].sort().values, chosen.sort().values):
        return False
    if method.wire == "plain":
        return torch.equal(values, flat[indices])
    # float16 keeps 11 significant bits: relative error <= 2**-11 for the normal range the scale puts them in
    return bool(((values - flat[indices]).abs() <= flat[indices].abs() * 2**-11 + 2**-24 * values.abs().max())
                .all())


def _measure_variant(key: str, build: Callable[[], Method], grads: dict[str, torch.Tensor],
                     dense: int) -> tuple[dict[str, Any], str]:
    """One variant on one worker's gradient: its entry of the data (bytes per part, total, ratio, inexact
    payloads) and its *B per kept entry* (``dgc-all*`` only, where every tensor is sparse; else "")."""
    method = build()
    parts, inexact = measure(method, {n: g.clone() for n, g in grads.items()})
    total = sum(parts.values())
    per_entry = ""
    if key.startswith("dgc-all"):  # every tensor sparse
        selector = method.compressor
        assert isinstance(selector, DGCSelect)  # DGC's
        kept = sum(selector.entries(g.numel()) for g in grads.values())
        per_entry = f"{(parts['values'] + parts['indices']) / kept:.2f}"
    del method
    gc.collect()
    return {"parts": parts, "bytes": total, "ratio": dense / total, "inexact_payloads": inexact}, per_entry


def _measure_model(model: str, seed: int, bar: Any) -> tuple[dict[str, Any], list[list], list[Check]]:
    """Every variant on one model's random gradient: the model's entry of the data, its table rows (the dense
    baseline first) and its decoding checks (DGC's variants)."""
    shapes = model_shapes(model)
    grads = random_gradients(shapes, seed)
    dense = 4 * sum(g.numel() for g in grads.values())
    entry: dict[str, Any] = {"dense_bytes": dense, "tensors": len(shapes), "variants": {}}
    rows = [[f"**{MODEL_LABELS[model]}**", "dense fp32 (baseline)", "", "", "", "", "", f"{dense:,}", "1.00x", ""]]
    checks = []
    for key, (label, build) in VARIANTS.items():
        bar.set_postfix_str(f"{MODEL_LABELS[model]}: {key}")
        v, per_entry = _measure_variant(key, build, grads, dense)
        entry["variants"][key] = v
        parts, total = v["parts"], v["bytes"]
        rows.append(["", f"`{key}`: {label}", *[f"{parts[p]:,}" if parts[p] else "—" for p in PARTS],
                     f"{total:,}", f"{dense / total:.0f}x", per_entry])
        if key.startswith("dgc"):
            inexact = v["inexact_payloads"]
            checks.append(Check(f"{MODEL_LABELS[model]} `{key}`: every payload decodes to exactly the chosen "
                                "entries", inexact == 0, f"{inexact} inexact"))
        bar.update(1)
    del grads
    gc.collect()
    return entry, rows, checks


def _size_checks(data: dict[str, dict[str, Any]]) -> list[Check]:
    """ResNet-50's sparsified-everywhere variants at least :data:`GOAL` x smaller than dense, and on every model
    the compact wire below the paper's format."""
    checks = []
    if "resnet50" in data:
        for key in ("dgc-all", "dgc-all32"):
            ratio = data["resnet50"]["variants"][key]["ratio"]
            checks.append(Check(f"ResNet-50: `{key}` at least {GOAL}x smaller than the dense gradient",
                                ratio >= GOAL, f"{ratio:.0f}x"))
    for model, entry in data.items():
        v = entry["variants"]
        checks.append(Check(f"{MODEL_LABELS[model]}: the compact wire sends less than the paper's format",
                            v["dgc"]["bytes"] < v["dgc-plain"]["bytes"],
                            f"{v['dgc']['bytes']:,} < {v['dgc-plain']['bytes']:,}"))
    return checks


#: the report's notes: how bytes and ratios are counted, the per-entry costs, the rounding, decoding, PowerSGD
_NOTES = [
    f"One worker, one step after warm-up, density {DENSITY}: k = ceil({DENSITY} n) entries per sparsified "
    "tensor (`dgc-all32`: at least 32, all of a smaller tensor). Bytes (B) are counted from the payloads the "
    "method produced; the ratio is dense fp32 bytes / bytes sent.",
    "*B per kept entry* (for `dgc-all` and `dgc-all32`, where every tensor is sparse): (values + indices) / "
    "number of kept entries. The paper's format costs 8; float16 values cost 2 and Elias-Fano indices about "
    "(2 + log2(1 / density)) / 8 = 1.5.",
    "The compact wire's float16 rounding is not lost: the sender subtracts the decoded (rounded) values "
    "from its accumulator, so the rounding error is sent in a later step (tests/test_dgc.py checks this "
    "against a float64 recomputation).",
    "Decoding checks lengths, entry counts, index range and order; a corrupt payload raises instead of "
    "writing out of bounds (tests/test_sparse.py, tests/test_bits.py).",
    "PowerSGD's *factors* column holds its P and Q factors and the tensors it leaves dense (1-D ones and "
    "those not worth compressing), together; its rank-1 ResNet-50 size equals that of PyTorch's own "
    "`powerSGD_hook` at rank 1 (546 KB).",
]


def run(ctx: Context) -> Result:
    """``gradcomp bench wire``: the bytes each DGC wire format and PowerSGD send in one step, by part.

    Args:
        ctx: the run's variant (``full``: AlexNet, VGG-16, ResNet-50 and the PTB LSTM; quick: ResNet-50) and
            seed (of the random gradients).

    Returns:
        The report: per model and method the bytes of each part, the total and the ratio to the dense fp32
        gradient, the checks (exact decoding, ResNet-50 at least :data:`GOAL` x smaller, the compact wire below
        the paper's format), and as data every count.
    """
    models = FULL_MODELS if ctx.full else QUICK_MODELS
    data: dict[str, dict[str, Any]] = {}
    rows, checks = [], []
    bar = ctx.tqdm(total=len(models) * len(VARIANTS), desc="wire")
    for model in models:
        data[model], model_rows, model_checks = _measure_model(model, ctx.seed, bar)
        rows += model_rows
        checks += model_checks
    bar.close()
    checks += _size_checks(data)
    table = markdown_table(["model", "method", *[f"{p} B" for p in PARTS], "total B", "ratio",
                            "B per kept entry"], rows, align="ll" + "r" * 8)
    markdown = "\n".join(["## Bytes per step, by part", "", table, "", "## Notes", "",
                          *[f"- {n}" for n in _NOTES], ""])
    title = "Bytes on the wire: DGC's wire formats on the paper's networks"
    setup = [f"models: {', '.join(MODEL_LABELS[m] for m in models)}",
             f"gradients: N(0, 1), torch.Generator seeded with {ctx.seed}; one worker, one step"]
    return Result(title=title, console=title + "\n\n" + table, markdown=markdown, checks=checks,
                  data={"density": DENSITY, "models": data}, setup=setup)


register(Study("wire", "bytes DGC sends per step on AlexNet, VGG-16, ResNet-50 and the PTB LSTM, split into "
                       "values, indices, scales and dense tensors", run, order=1, threads=1, kind="bench"))
