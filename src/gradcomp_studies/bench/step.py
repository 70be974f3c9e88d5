"""``gradcomp bench step``: the hook's cost in a whole training step, as a ratio to DDP's own all-reduce.

One rank (one GPU holds one NCCL rank; the CPU runs gloo) trains ResNet-50
under bf16 autocast through plain DDP (its built-in all-reduce) and through
gradcomp's hook with ``none`` (dense, gradcomp's path) and with DGC at
density 0.1 %.  With one rank the collectives move nothing over a network,
so the ratio is what the hook adds to the step: selection, encoding,
decoding, memory updates and their host-device synchronizations.  ``--full``
runs batch 64 and 256 at 224 x 224 and needs a CUDA device; the quick
variant runs ResNet-50 at batch 2 on 32 x 32 images on whatever device there
is (a smoke test of the same code; CPU ratios say little about a GPU's).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from gradcomp.ddp_hook import register_ddp_hook
from gradcomp.launch import spawn
from gradcomp.method import DGC, sgd_settings
from gradcomp.train.models import resnet50

from ..reproduce.common import Check, Context, Result, Study, StudySkipped, markdown_table, register

#: what each row trains through: None is DDP's own all-reduce (no hook registered)
METHODS = {"DDP all-reduce (baseline)": None, "gradcomp none": "none", "gradcomp DGC 0.1 %": "dgc"}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(device: torch.device, method: str | None, batch: int, size: int, steps: int, warmup: int
                 ) -> list[float]:
    """Seconds of each timed training step (forward and loss under bf16 autocast, backward, SGD step).

    ResNet-50 in DDP on one rank of an initialized process group, trained on one fixed random batch with SGD
    (lr 0.01, :func:`gradcomp.method.sgd_settings` of momentum 0.9 for the method: 0 in the optimizer for DGC,
    which applies momentum itself); the device is synchronized before and after each step, so a step's time
    includes its kernels.

    Args:
        device: where the model trains (a CUDA device or the CPU).
        method: None (DDP's own all-reduce, no hook), ``"none"`` (gradcomp's hook, dense) or ``"dgc"``
            (gradcomp's hook with DGC at density 0.001, no warm-up).
        batch: images per step.
        size: the images' height and width, in pixels.
        steps: timed steps.
        warmup: untimed steps first.

    Returns:
        The ``steps`` timed steps' wall-clock seconds, in order.
    """
    torch.manual_seed(0)
    model = resnet50().to(device)
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    chosen = DGC(density=0.001, warmup_steps=0) if method == "dgc" else method
    opt = torch.optim.SGD(model.parameters(), lr=0.01, **sgd_settings(chosen or "none", momentum=0.9))
    if chosen is not None:
        register_ddp_hook(net, chosen, optimizer=opt)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    times = []
    for i in range(warmup + steps):
        _synchronize(device)
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        _synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _worker(rank: int, world: int, device_type: str, plan: list[tuple[str, int]], size: int, steps: int,
            warmup: int) -> dict[str, list[float]]:
    device = torch.device("cuda", rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return {f"{label}|{batch}": step_seconds(device, METHODS[label], batch, size, steps, warmup)
            for label, batch in plan}


def run(ctx: Context) -> Result:
    """``gradcomp bench step``: a ResNet-50 step through gradcomp's hook as a ratio to DDP's own all-reduce.

    Args:
        ctx: the run's variant (``full``: batch 64 and 256 at 224 x 224, 5 warm-up and 20 timed steps, on CUDA;
            quick: batch 2 at 32 x 32, 1 warm-up and 2 timed steps, on CUDA if there is one, else the CPU).

    Returns:
        The report: each method's median milliseconds per step and its ratio to DDP's, the checks (every method
        trained every timed step), and as data the seconds of every step and the ratios.

    Raises:
        StudySkipped: ``full`` and no CUDA device.
    """
    cuda = torch.cuda.is_available()
    if ctx.full and not cuda:
        raise StudySkipped("gradcomp bench step --full measures ResNet-50 at batch 64 and 256 on a GPU: no CUDA "
                           "device here (the quick variant runs on the CPU)")
    device_type = "cuda" if cuda else "cpu"
    batches, size, steps, warmup = ((64, 256), 224, 20, 5) if ctx.full else ((2,), 32, 2, 1)
    plan = [(label, batch) for batch in batches for label in METHODS]
    seconds = spawn(_worker, 1, device_type, plan, size, steps, warmup, backend="nccl" if cuda else "gloo",
                    timeout_s=1800)[0]
    median = {key: statistics.median(t) for key, t in seconds.items()}
    baseline = next(iter(METHODS))
    body, ratios = [], {}
    for batch in batches:
        base = median[f"{baseline}|{batch}"]
        for label in METHODS:
            t = median[f"{label}|{batch}"]
            ratios[f"{label}|{batch}"] = t / base
            body.append([str(batch), label, f"{1e3 * t:.1f}", f"{t / base:.2f}x"])
    table = markdown_table(["batch", "step through", "ms per step (median)", "ratio to DDP"], body, align="llrr")
    checks = [Check(f"batch {b}: every method trained {steps} timed steps", all(
        len(seconds[f"{label}|{b}"]) == steps for label in METHODS), f"{steps} steps") for b in batches]
    device = torch.cuda.get_device_name(0) if cuda else "CPU"
    title = f"The hook's cost in a ResNet-50 step under bf16 autocast, one rank on {device}: ratio to DDP's all-reduce"
    notes = ["One rank: the all-reduce moves no bytes over a network, so the ratio is the hook's own work per step "
             "(selection, encoding, decoding, memory, host-device synchronizations), the cost a slow network must "
             "repay.", f"Warm-up steps: {warmup}, then {steps} timed steps; median shown."]
    markdown = "\n".join(["## Step time", "", table, "", "## Notes", "", *[f"- {n}" for n in notes], ""])
    setup = [f"ResNet-50 (25.6 M parameters), {size} x {size} random images, SGD momentum 0.9, bf16 autocast, "
             f"{device_type} ({'NCCL' if cuda else 'gloo'}), world size 1"]
    return Result(title=title, console=title + "\n\n" + markdown, markdown=markdown, checks=checks, plots=[],
                  setup=setup, data={"seconds": seconds, "ratios": ratios, "device": device})


register(Study("step", "the hook's cost in a ResNet-50 bf16 step: ratio to DDP's all-reduce (GPU with --full)", run,
               order=9, kind="bench"))
