"""``gradcomp bench network``: time per step through real bandwidth-limited links.

The workers run in their own network namespaces, joined by a bridge, each
one's egress limited by ``tc tbf`` to the rate asked for
(:class:`~gradcomp_studies.bench.netns.ShapedLinks`; needs root).  Bandwidth is real;
latency is not shaped (no ``netem`` here), so none is added.  Over gloo:

1. **Communication alone**, for a gradient the size and shape of ResNet-50's
   and of the paper's PTB LSTM: the dense fp32 all-reduce, and the
   collectives of PowerSGD (rank 2 and 4: an all-reduce of the P factors,
   then of the Q factors and the tensors left dense, as PyTorch's
   ``powerSGD_hook`` sends them) and of DGC (one all-gather of the payloads
   the method really produced, compact wire, every tensor sparsified, at
   least 32 entries of each: the configuration that sends ResNet-50 1028x
   smaller).
2. **A DDP step**, with the real hooks: plain DDP (dense all-reduce),
   PyTorch's own ``powerSGD_hook`` (rank 2 and 4) and gradcomp's DGC hook, on
   a module whose parameters have the model's shapes (in one DDP bucket) and whose gradient is a
   fixed random tensor per parameter (computing it costs one multiply, so the
   step is almost all communication and compression).  ``compute`` is the same
   backward pass without DDP.

3. **Time to accuracy** (``--full``: at 1 Gbit/s): an MNIST CNN trained with
   plain DDP, DDP + PyTorch's ``powerSGD_hook`` (rank 2) and DDP +
   gradcomp's DGC hook, each from the same initialisation on the same
   batches; the training time until the test accuracy (first 2,000 test
   images, checked every ``EVAL_EVERY`` steps, not timed) first reaches each
   of ``TARGETS``.  Two CNNs (:data:`ACCURACY_MODELS`): gradcomp's default,
   whose step on this machine's shared cores is mostly compute at 1 Gbit/s,
   and the same network with a 2048-unit classifier, whose 9.9 MB gradient
   takes the link about as long as the step's compute: the regime DGC is for.

Each figure is the median over the timed steps of the slowest rank; ratios
are against the dense all-reduce measured in the same run.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradcomp.comm import all_gather_single
from gradcomp.compressors.powersgd import PowerSGD
from gradcomp.launch import spawn
from gradcomp.method import DGC, SGDSettings, sgd_settings
from gradcomp.train.models import PAPER_MODELS, build_model

from ..reproduce.common import Check, Context, Result, Study, StudySkipped, markdown_table, register
from ..reproduce.ratio import MODEL_LABELS, bytes_sent, model_shapes, random_gradients
from .netns import NetworkSetupError, ShapedLinks

DENSITY = 0.001
GOAL = 50  # DGC's communication at least 50x below dense at 1 Gbit/s, ResNet-50 size
METHODS = ("dense", "powersgd-2", "powersgd-4", "dgc")
LABELS = {"dense": "dense fp32 all-reduce (DDP)", "powersgd-2": "PyTorch powerSGD_hook, rank 2",
          "powersgd-4": "PyTorch powerSGD_hook, rank 4",
          "dgc": "gradcomp DGC, density 0.001 (compact wire, every tensor, >= 32 entries each)"}
#: the collectives alone: what each method puts on the wire, without its compression compute
COMM_LABELS = {"dense": "dense fp32 all-reduce", "powersgd-2": "PowerSGD rank 2: all-reduce of P, then of Q + dense",
               "powersgd-4": "PowerSGD rank 4: all-reduce of P, then of Q + dense",
               "dgc": "DGC: all-gather of its real payloads (compact wire, every tensor, >= 32 entries each)"}


def _dgc(warmup_epochs: float = 0.0, **options) -> DGC:
    """DGC as this bench runs it: every tensor sparsified, at least 32 entries of each (1028x on ResNet-50)."""
    return DGC(density=DENSITY, sparsify_all=True, min_entries=32, warmup_epochs=warmup_epochs, **options)


class Gradients(nn.Module):
    """Parameters shaped like a model's; ``forward(scale)`` is ``scale * sum_p <p, d_p>`` for a fixed random
    ``d_p`` per parameter, so every backward gives the realistic gradient ``scale * d_p`` at the cost of one
    multiply.

    The parameters start at zero; the directions are standard normal, drawn from ``seed``, and are plain
    tensors, not buffers (DDP never sends them).

    Args:
        shapes: ``(name, shape)`` of each parameter, in order (:func:`~gradcomp_studies.reproduce.ratio.model_shapes`).
        seed: seeds the directions: the same seed gives every rank the same gradient.
    """

    def __init__(self, shapes: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weights = nn.ParameterList([nn.Parameter(torch.zeros(shape)) for _, shape in shapes])
        self.directions = [torch.randn(shape, generator=gen) for _, shape in shapes]  # not buffers: never sent

    def forward(self, scale: torch.Tensor) -> torch.Tensor:
        """The scalar whose gradient is ``scale * d_p`` for each parameter ``p``.

        Args:
            scale: a 0-d tensor (1.0 in this benchmark).

        Returns:
            ``scale * sum_p <p, d_p>``, a 0-d tensor.
        """
        return sum(torch.dot(p.view(-1), d.view(-1)) for p, d in zip(self.weights, self.directions)) * scale


def _slowest(seconds: list[float], statistic: str) -> float:
    """Every rank's per-step times -> the slowest rank's per-step time, then its median (or min) over the steps."""
    world = dist.get_world_size()
    mine = torch.tensor(seconds, dtype=torch.float64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    per_step = torch.stack(every).max(0).values
    return float(per_step.median() if statistic == "median" else per_step.min())


def _timed(fn, warmup: int, repeats: int, statistic: str = "median") -> float:
    """Seconds per call of a collective step ``fn``: the slowest rank's time per repeat (between barriers),
    median over the repeats (``statistic="min"``: the best repeat, for latency fits)."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return _slowest(seconds, statistic)


def _powersgd_sizes(shapes: list[tuple[str, tuple[int, ...]]], rank: int) -> tuple[int, int]:
    """Elements PowerSGD all-reduces in its two rounds (P factors; Q factors + the tensors it sends dense),
    by :meth:`gradcomp.compressors.powersgd.PowerSGD.matrix_shape` (PyTorch's hook's rule)."""
    planner = PowerSGD(rank=rank)
    p_elems, q_and_dense = 0, 0
    for _, shape in shapes:
        matrix = planner.matrix_shape(torch.empty(shape, device="meta"))
        if matrix is None:
            q_and_dense += math.prod(shape)
        else:
            p_elems += matrix[0] * rank
            q_and_dense += matrix[1] * rank
    return p_elems, q_and_dense


def _communication(shapes, warmup: int, repeats: int, seed: int) -> dict[str, float]:
    numel = sum(math.prod(s) for _, s in shapes)
    dense = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    out = {"dense": _timed(lambda: dist.all_reduce(dense), warmup, repeats)}
    for r in (2, 4):
        p_elems, q_elems = _powersgd_sizes(shapes, r)
        p, q = torch.randn(p_elems), torch.randn(q_elems)

        def rounds(p=p, q=q) -> None:
            dist.all_reduce(p)
            dist.all_reduce(q)

        out[f"powersgd-{r}"] = _timed(rounds, warmup, repeats)
    # DGC: the payload bytes the method really produces for this gradient, in one all-gather
    payload_bytes = bytes_sent(_dgc(), random_gradients(shapes, seed + dist.get_rank()))
    local = torch.zeros(payload_bytes, dtype=torch.uint8)
    gathered = torch.empty(payload_bytes * dist.get_world_size(), dtype=torch.uint8)
    out["dgc"] = _timed(lambda: all_gather_single(gathered, local), warmup, repeats)
    out["dgc_payload_bytes"] = payload_bytes
    return out


def _ddp_steps(shapes, warmup: int, repeats: int, seed: int) -> dict[str, float]:
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradcomp.ddp_hook import HookState, ddp_comm_hook

    scale = torch.ones(())

    def backward(model: nn.Module) -> None:
        model.zero_grad(set_to_none=False)
        model(scale).backward()

    module = Gradients(shapes, seed)
    out = {"compute": _timed(lambda: backward(module), 1, repeats)}
    for key in METHODS:
        # one bucket for every method: with gloo's two threads, powerSGD_hook's nested waits (a wait inside
        # a future's callback, one per bucket) deadlock as soon as two buckets are in flight
        model = DDP(Gradients(shapes, seed), broadcast_buffers=False, bucket_cap_mb=1e6)
        if key.startswith("powersgd"):
            state = psgd.PowerSGDState(process_group=None, matrix_approximation_rank=int(key.split("-")[1]),
                                       start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
            model.register_comm_hook(state, psgd.powerSGD_hook)
        elif key == "dgc":
            model.register_comm_hook(HookState(_dgc(), model=model), ddp_comm_hook)
        out[key] = _timed(lambda model=model: backward(model), max(warmup, 3), repeats)
        del model
    return out


def _model_shapes(model: str) -> list[tuple[str, tuple[int, ...]]]:
    """A paper model's parameter shapes, or (quick variant) those of gradcomp's MNIST CNN."""
    if model in PAPER_MODELS:
        return model_shapes(model)
    return [(n, tuple(p.shape)) for n, p in build_model("cnn", "mnist").named_parameters()]


#: the MNIST CNNs trained to the target: gradcomp's default, whose step on this machine's shared cores is mostly
#: compute at 1 Gbit/s, and the same network with a 2048-unit classifier, whose 9.9 MB gradient the link carries
#: in about as long as the step computes (the regime DGC is for: the paper's AlexNet, VGG and LSTMs)
ACCURACY_MODELS: dict[str, dict[str, Any]]  # key -> its label and CNN options
ACCURACY_MODELS = {"cnn": {"label": "MNIST CNN (390,634 parameters)", "options": {}},
                   "cnn-wide": {"label": "MNIST CNN, 2048-unit classifier (2,474,730 parameters)",
                                "options": {"hidden": 2048}}}
#: the test accuracies timed (first reached, evaluated every EVAL_EVERY steps); the goal is judged at the last,
#: 99 % (the accuracy an MNIST CNN is trained to; 97 % comes before the first half epoch, in DGC's warm-up)
TARGETS = (0.97, 0.98, 0.99)
EVAL_EVERY = 50
BATCH_PER_RANK = 32
LR = 0.05
SGD: SGDSettings = {"momentum": 0.9, "weight_decay": 1e-4}  # the optimizer's, for dense DDP and PowerSGD


def _time_to_accuracy(method: str, model_key: str, seed: int, max_steps: int, targets: tuple[float, ...],
                      limit_train: int | None) -> dict:
    """Train the MNIST CNN ``model_key`` (:data:`ACCURACY_MODELS`) under DDP with ``method``'s hook until the
    test accuracy reaches the last of ``targets`` (or ``max_steps``); the steps and training seconds (the
    slowest rank's) at which it first reached each target."""
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd
    from torch.nn.parallel import DistributedDataParallel as DDP

    from gradcomp.ddp_hook import HookState, ddp_comm_hook
    from gradcomp.train.data import image_batches, load_dataset, steps_per_epoch
    from gradcomp.train.models import CNN

    from ..reproduce.common import classification_loss, evaluate_classifier

    rank, world = dist.get_rank(), dist.get_world_size()
    data = load_dataset("mnist", limit_train=limit_train)
    assert data.x_train is not None and data.y_train is not None  # an image dataset's
    torch.manual_seed(seed)
    model = DDP(CNN(data.input_shape, data.num_classes, **ACCURACY_MODELS[model_key]["options"]),
                bucket_cap_mb=1e6)  # one bucket (see _ddp_steps)
    settings = SGD
    if method == "powersgd-2":
        model.register_comm_hook(psgd.PowerSGDState(process_group=None, matrix_approximation_rank=2,
                                                    start_powerSGD_iter=2), psgd.powerSGD_hook)
    elif method == "dgc":
        per_epoch = steps_per_epoch(len(data.y_train), BATCH_PER_RANK * world)
        dgc = _dgc(momentum=SGD["momentum"], warmup_epochs=0.1, steps_per_epoch=per_epoch)
        model.register_comm_hook(HookState(dgc, model=model), ddp_comm_hook)
        settings = sgd_settings(dgc, **SGD)  # DGC applies momentum itself
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, **settings)
    steps, seconds, epoch = 0, 0.0, 0
    crossed: dict[float, tuple[int, float]] = {}  # target -> (steps, this rank's seconds) when first reached
    accuracy = torch.zeros(1)  # rank 0 evaluates and broadcasts
    while steps < max_steps and len(crossed) < len(targets):
        for shards in image_batches(data.x_train, data.y_train, BATCH_PER_RANK * world, world, epoch, seed):
            dist.barrier()
            start = time.perf_counter()
            optimizer.zero_grad()
            classification_loss(model, shards[rank]).backward()
            optimizer.step()
            seconds += time.perf_counter() - start
            steps += 1
            if steps % EVAL_EVERY == 0 or steps >= max_steps:
                if rank == 0:
                    accuracy.fill_(evaluate_classifier(model.module, data, 2000)[0])
                dist.broadcast(accuracy, 0)
                for target in targets:
                    if target not in crossed and accuracy.item() >= target:
                        crossed[target] = (steps, seconds)
                if steps >= max_steps or len(crossed) == len(targets):
                    break
        epoch += 1
    times = torch.tensor([crossed.get(t, (0, math.nan))[1] for t in targets] + [seconds], dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX)  # the slowest rank's
    return {"steps": steps, "seconds": float(times[-1]), "accuracy": float(accuracy),
            "targets": {f"{t:g}": ({"steps": crossed[t][0], "seconds": float(times[i])} if t in crossed else None)
                        for i, t in enumerate(targets)}}


def _worker(rank: int, world: int, models: tuple[str, ...], warmup: int, repeats: int, seed: int,
            accuracy_run: dict | None = None, accuracy_models: tuple[str, ...] = ()) -> dict:
    results: dict[str, Any] = {}
    for model in models:
        shapes = _model_shapes(model)
        results[model] = {"communication": _communication(shapes, warmup, repeats, seed),
                          "ddp": _ddp_steps(shapes, warmup, repeats, seed)}
    for key in accuracy_models:
        assert accuracy_run is not None  # given with accuracy_models
        results.setdefault("time_to_accuracy", {})[key] = {
            m: _time_to_accuracy(m, key, seed, **accuracy_run) for m in METHODS if m != "powersgd-4"}
    return results


def measure(workers: int, rate: str, models: tuple[str, ...], *, warmup: int, repeats: int, seed: int,
            accuracy_run: dict | None = None, accuracy_models: tuple[str, ...] = (),
            timeout_s: float = 3600.0) -> dict:
    """Run the benchmark on ``workers`` ranks behind ``rate`` links; rank 0's results (all ranks agree).

    Args:
        workers: the gloo ranks, each in its own namespace (:class:`~gradcomp_studies.bench.netns.ShapedLinks`).
        rate: each rank's egress rate, in tc's units (``"1gbit"``).
        models: the gradients timed: paper models (``"resnet50"``, ``"ptb_lstm_1500"``) or ``"cnn"`` (gradcomp's
            MNIST CNN); none when only accuracy is run.
        warmup: untimed calls before each timing (of the DDP steps: at least 3; of the compute-only backward: 1).
        repeats: timed steps; each figure is the median over them of the slowest rank's.
        seed: seeds the gradients and the training.
        accuracy_run: the time-to-accuracy run's ``max_steps``, ``targets`` and ``limit_train`` (needed with
            ``accuracy_models``).
        accuracy_models: the CNNs of :data:`ACCURACY_MODELS` trained to accuracy with each method but PowerSGD
            rank 4.
        timeout_s: seconds the ranks may take in all.

    Returns:
        ``{"results": ..., "links_existed": ..., "leftovers": ...}``: the results are, per model,
        ``{"communication": seconds per step of each method's collectives (and "dgc_payload_bytes", one rank's
        DGC payload in bytes), "ddp": seconds per DDP step of each method (and "compute", the backward without
        DDP)}``, and under ``"time_to_accuracy"`` per CNN and method the steps, training seconds, last accuracy
        and the steps and seconds at which each target was first reached (None: not reached);
        ``links_existed`` says the namespaces and links were found during the run, ``leftovers`` names those
        still there after teardown.

    Raises:
        NetworkSetupError: the shaped links cannot be built here (not root, no iproute2, a command failed).
        ValueError: ``rate`` is not a rate, or ``workers`` is not in [1, 250].
    """
    with ShapedLinks(workers, rate) as links:
        out = spawn(_worker, workers, models, warmup, repeats, seed, accuracy_run, accuracy_models,
                    address=links.address(0),
                    before_init=links.before_init(), timeout_s=timeout_s,
                    threads=max(1, (torch.get_num_threads() or 1) // workers))
        leftovers_inside = links.leftovers()
    return {"results": out[0], "links_existed": bool(leftovers_inside), "leftovers": links.leftovers()}


def _crossing(run: dict, dense: dict, target: float) -> str:
    """``steps, seconds (ratio to dense's)`` when ``run`` first reached ``target``, or ``not reached``."""
    mine, theirs = run["targets"][f"{target:g}"], dense["targets"][f"{target:g}"]
    if mine is None:
        return "not reached"
    ratio = f" ({theirs['seconds'] / mine['seconds']:.2f}x)" if theirs else ""
    return f"{mine['steps']}, {mine['seconds']:.1f}{ratio}"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.1f}" if seconds < 10 else f"{seconds:.2f} s"


@dataclass(frozen=True)
class _Plan:
    """What a variant measures: the ranks, the step-time rates and gradients, and where it trains to accuracy."""

    workers: int
    rates: tuple[str, ...]
    models: tuple[str, ...]
    warmup: int
    repeats: int
    accuracy_at: dict[str, tuple[str, ...]]  # rate -> the models timed to accuracy there
    accuracy_run: dict[str, Any]  # _time_to_accuracy's max_steps, targets and limit_train

    def models_at(self) -> dict[str, tuple[str, ...]]:
        """The gradients timed at each rate: every model at the step-time rates, none where only accuracy is run."""
        rates = dict.fromkeys(self.rates + tuple(self.accuracy_at))
        return {rate: self.models if rate in self.rates else () for rate in rates}


def _plan(full: bool) -> _Plan:
    """The full variant's runs, or the quick variant's."""
    if full:
        # at 1 Gbit/s the default CNN's step is mostly compute on this machine, the wide one's half communication
        return _Plan(4, ("1gbit", "10gbit"), ("resnet50", "ptb_lstm_1500"), 2, 5, {"1gbit": ("cnn-wide", "cnn")},
                     {"max_steps": 2000, "targets": TARGETS, "limit_train": None})
    return _Plan(2, ("1gbit",), ("cnn",), 1, 2, {"1gbit": ("cnn-wide",)},
                 {"max_steps": EVAL_EVERY, "targets": TARGETS, "limit_train": 2000})


def _step_tables(measured: dict, rate_models: tuple[str, ...]) -> list[str]:
    """The communication-alone and DDP-step tables of one rate's gradients (no lines where none was timed)."""
    if not rate_models:
        return []
    comm_rows, step_rows = [], []
    for model in rate_models:
        res = measured["results"][model]
        comm, ddp = res["communication"], res["ddp"]
        label = MODEL_LABELS.get(model, "MNIST CNN")
        for key in METHODS:
            comm_rows.append([label, COMM_LABELS[key], _ms(comm[key]), f"{comm['dense'] / comm[key]:.1f}x"])
            step_rows.append([label, LABELS[key], _ms(ddp[key]), _ms(ddp[key] - ddp["compute"]),
                              f"{ddp['dense'] / ddp[key]:.2f}x"])
            label = ""
        step_rows.append(["", "compute only (the same backward, no DDP)", _ms(ddp["compute"]), "—", "—"])
    return ["### Communication alone (ms per step)", "",
            markdown_table(["gradient", "method", "ms", "faster than dense"], comm_rows, align="llrr"),
            "", "### A DDP step with the real hooks (ms)", "",
            markdown_table(["gradient", "method", "step ms", "step - compute ms", "faster than dense"],
                           step_rows, align="llrrr"), ""]


def _accuracy_table(label: str, runs: dict[str, dict]) -> list[str]:
    """The time-to-accuracy table of one CNN: each method's time per step and its steps and seconds to each
    target."""
    return [f"### Time to accuracy, {label} (training seconds, evaluation excluded)", "",
            "Dense DDP and the DGC hook are bit-reproducible (the same seed gives the same steps and "
            "accuracy on every run); PyTorch's powerSGD_hook is not (two runs from the same seed part "
            "within a few steps), so its steps to a target are one draw.", "",
            markdown_table(["method", "ms per step", *[f"to {100 * t:g} %: steps, s (x faster than dense)"
                                                       for t in TARGETS], "steps run", "last accuracy"],
                           [[LABELS[m], f"{1e3 * r['seconds'] / r['steps']:.0f}",
                             *[_crossing(r, runs["dense"], t) for t in TARGETS], r["steps"],
                             f"{100 * r['accuracy']:.2f} %"] for m, r in runs.items()],
                           align="lr" + "r" * (len(TARGETS) + 2)), ""]


def _accuracy_check(rate: str, label: str, runs: dict[str, dict]) -> Check:
    """Whether DDP + gradcomp's DGC reached the last target in the shortest training time."""
    goal = f"{TARGETS[-1]:g}"
    reached = {m: r["targets"][goal]["seconds"] for m, r in runs.items() if r["targets"][goal]}
    return Check(f"{rate}, {label}: DDP + gradcomp DGC reaches {100 * TARGETS[-1]:g} % in the "
                 "shortest time", bool(reached) and min(reached, key=reached.__getitem__) == "dgc",
                 ", ".join(f"{m} " + (f"{reached[m]:.1f} s" if m in reached else "not reached")
                           for m in runs))


def _communication_checks(full: bool, plan: _Plan, data: dict[str, dict]) -> list[Check]:
    """(Full variant) DGC's goal on ResNet-50's gradient, and at every rate and gradient DGC's all-gather faster than
    the dense all-reduce."""
    checks = []
    first = data[plan.rates[0]]["results"]
    if full and "resnet50" in first:
        comm = first["resnet50"]["communication"]
        ratio = comm["dense"] / comm["dgc"]
        checks.append(Check(f"ResNet-50 size at {plan.rates[0]}: DGC's communication at least {GOAL}x below dense",
                            ratio >= GOAL, f"{ratio:.0f}x ({_ms(comm['dgc'])} vs {_ms(comm['dense'])} ms)"))
    models_at = plan.models_at()
    for rate, measured in data.items():
        for model in models_at[rate]:
            comm = measured["results"][model]["communication"]
            checks.append(Check(f"{rate}, {MODEL_LABELS.get(model, 'MNIST CNN')}: DGC's all-gather is faster than the "
                                "dense all-reduce", comm["dgc"] < comm["dense"],
                                f"{_ms(comm['dgc'])} vs {_ms(comm['dense'])} ms"))
    return checks


def _setup(plan: _Plan) -> list[str]:
    """The report's setup lines: the ranks and links, the gradients and steps timed, the training to accuracy."""
    workers, accuracy_at = plan.workers, plan.accuracy_at
    return [f"{workers} gloo ranks, each in its own network namespace, egress shaped with tc tbf at "
            f"{' and '.join(plan.rates)} (time to accuracy: "
            + "; ".join(f"{', '.join(ACCURACY_MODELS[k]['label'] for k in keys)} at {rate}"
                        for rate, keys in accuracy_at.items()) + "); latency not shaped (no "
            "netem on this kernel), none added",
            f"gradients: {', '.join(MODEL_LABELS.get(m, 'MNIST CNN') for m in plan.models)}; {plan.warmup} warm-up "
            f"and {plan.repeats} timed steps; each figure is the median over steps of the slowest rank",
            f"time to accuracy: per-rank batch {BATCH_PER_RANK}, SGD lr {LR}, momentum {SGD['momentum']:g} (inside "
            f"DGC for DGC, density {DENSITY}, warm-up 0.1 epoch), weight decay {SGD['weight_decay']:g} "
            f"({sgd_settings(_dgc(momentum=SGD['momentum']), **SGD)['weight_decay']:g} with DGC's optimizer momentum "
            f"0: gradcomp.sgd_settings); test accuracy on the first 2,000 test images every {EVAL_EVERY} steps, "
            f"until {100 * TARGETS[-1]:g} % or {plan.accuracy_run['max_steps']} steps",
            f"torch threads per rank: {max(1, (torch.get_num_threads() or 1) // workers)}; the ranks share this "
            f"machine's {os.cpu_count()} cores, so compute (compression included) is slower than on one machine "
            "per rank, and the DDP step times carry it"]


def run(ctx: Context) -> Result:
    """``gradcomp bench network``: time the methods' communication and DDP steps, and (``--full``) train to
    accuracy, through real shaped links at each rate.

    Args:
        ctx: the run's variant (``full``: 4 workers, ResNet-50 and the PTB LSTM at 1 and 10 Gbit/s, two CNNs
            trained to 99 % at 1 Gbit/s; quick: 2 workers, the MNIST CNN's gradient at 1 Gbit/s and the wide CNN
            trained for one evaluation) and seed.

    Returns:
        The report: per rate, milliseconds per step of each method's communication alone and of its DDP step,
        the time-to-accuracy tables, the checks, and as data every rate's measurements.

    Raises:
        StudySkipped: the shaped links cannot be set up here (not root, no ``ip`` or ``tc``).
    """
    plan = _plan(ctx.full)
    data, checks, sections = {}, [], []
    for rate, rate_models in plan.models_at().items():
        try:
            measured = measure(plan.workers, rate, rate_models, warmup=plan.warmup, repeats=plan.repeats,
                               seed=ctx.seed, accuracy_run=plan.accuracy_run,
                               accuracy_models=plan.accuracy_at.get(rate, ()))
        except NetworkSetupError as error:
            raise StudySkipped(str(error)) from None
        data[rate] = measured
        checks.append(Check(f"{rate}: the namespaces and links existed during the run and are gone after it",
                            measured["links_existed"] and not measured["leftovers"],
                            ", ".join(measured["leftovers"]) or "none left"))
        sections += [f"## {rate} per worker link, {plan.workers} workers", "", *_step_tables(measured, rate_models)]
        for key, runs in measured["results"].get("time_to_accuracy", {}).items():
            label = ACCURACY_MODELS[key]["label"]
            sections += _accuracy_table(label, runs)
            if ctx.full:
                checks.append(_accuracy_check(rate, label, runs))
    checks += _communication_checks(ctx.full, plan, data)
    title = "Time per step through real bandwidth-limited links (network namespaces + tc tbf)"
    markdown = "\n".join(sections)
    return Result(title=title, console=title + "\n\n" + markdown, markdown=markdown, checks=checks,
                  data={"workers": plan.workers, "rates": list(plan.rates),
                        "accuracy_rates": list(plan.accuracy_at), "models": list(plan.models), "runs": data},
                  setup=_setup(plan))


register(Study("network", "dense all-reduce vs PowerSGD vs DGC through real 1 and 10 Gbit/s links "
                          "(network namespaces + tc tbf; needs root)", run, order=3, kind="bench"))
