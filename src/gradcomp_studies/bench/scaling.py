"""``gradcomp bench scaling``: an alpha-beta cost model fitted to real shaped-link runs, projected to 1024 workers.

Each collective costs latency plus bytes over bandwidth.  For gloo's ring
algorithms on ``n`` ranks (``S`` the all-reduced bytes, ``s`` the bytes each
rank contributes to an all-gather)::

    all-reduce   T = 2 (n - 1) alpha_r + 2 (n - 1) / n * S * beta_r    (per round)
    all-gather   T =   (n - 1) alpha_g +   (n - 1)     * s * beta_g

``beta`` is seconds per byte of one rank's link as each collective achieves
it, and ``alpha`` the cost of one ring step (software and kernel latency; no
latency is added on these links).  alpha is measured on messages too small
for their bytes to count, between 2 ranks; beta is fitted by least squares
(relative errors) to big messages on 2, 4 and 8 ranks behind real ``tc tbf``
links (:class:`~gradcomp_studies.bench.netns.ShapedLinks`) of 100 Mbit/s, and every
run is printed beside the model's prediction.  100 Mbit/s because this
machine has 2 cores, and at 1 Gbit/s 8 ranks wait for a core at every ring
step.  The same runs at 1 Gbit/s are printed beside the model scaled to that
rate, and the betas refitted on their 2- and 4-rank runs check that bytes
cost in inverse proportion to the rate, as the projection assumes.

The fitted model then projects one step's communication for ResNet-50's
gradient, 8 to 1024 workers, at 1, 10 and 100 Gbit/s (``beta`` scaled by the
rate, ``alpha`` kept as measured): the dense all-reduce, PowerSGD's two
all-reduces (P, then Q), DGC's all-gather, whose volume grows with the number
of workers (every rank receives every other rank's entries: "gradients get
denser during all-reduce"), and DGC with a shared index set
(``DGC(aggregate="shared")``: two all-reduces, the leader's index code then
every rank's values there), whose volume does not.  The table and the plot say
where the sparse all-gather stops paying against the dense all-reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from gradcomp.comm import all_gather_single
from gradcomp.compressors.powersgd import PowerSGD
from gradcomp.launch import spawn
from gradcomp.method import DGC, Method

from ..reproduce.common import (
    Check,
    Context,
    Result,
    Study,
    StudySkipped,
    markdown_table,
    new_figure,
    register,
    save_figure,
)
from ..reproduce.ratio import bytes_sent, model_shapes, random_gradients
from .netns import NetworkSetupError, ShapedLinks, parse_rate
from .network import _timed

WORKERS = (8, 16, 32, 64, 128, 256, 512, 1024)
RATES = ("1gbit", "10gbit", "100gbit")
FIT_RATE = "100mbit"  # the full variant's links: see run()


@dataclass(frozen=True)
class CostModel:
    """``alpha`` seconds per ring step and ``beta`` seconds per byte (at ``rate``) of each collective.

    Args:
        alpha_reduce: seconds per ring step of the all-reduce (latency).
        alpha_gather: seconds per ring step of the all-gather.
        beta_reduce: seconds per byte of the all-reduce at ``rate``.
        beta_gather: seconds per byte of the all-gather at ``rate``.
        rate: the link rate the betas hold at, in tc's units (``"100mbit"``, ``"1gbit"``).
    """

    alpha_reduce: float
    alpha_gather: float
    beta_reduce: float
    beta_gather: float
    rate: str

    def at(self, rate: str) -> CostModel:
        """The same links at another rate: bytes cost in inverse proportion, latency stays.

        Args:
            rate: the other rate, in tc's units.

        Returns:
            A model with both betas scaled by ``self.rate / rate``, the same alphas, at ``rate``.

        Raises:
            ValueError: ``rate`` (or this model's) is not a rate (:func:`~gradcomp_studies.bench.netns.parse_rate`).
        """
        scale = parse_rate(self.rate) / parse_rate(rate)
        return CostModel(self.alpha_reduce, self.alpha_gather, self.beta_reduce * scale, self.beta_gather * scale,
                         rate)

    def all_reduce(self, workers: int, nbytes: float, rounds: int = 1) -> float:
        """``rounds`` ring all-reduces in a row moving ``nbytes`` in all.

        Args:
            workers: the ranks, n.
            nbytes: the bytes all-reduced, S, summed over the rounds.
            rounds: the all-reduces in a row (each pays the ring's latency).

        Returns:
            Seconds: ``rounds * 2 (n - 1) alpha_r + 2 (n - 1) / n * S * beta_r``.
        """
        n = workers
        return rounds * 2 * (n - 1) * self.alpha_reduce + 2 * (n - 1) / n * nbytes * self.beta_reduce

    def all_gather(self, workers: int, nbytes_per_rank: float) -> float:
        """One ring all-gather in which every rank contributes ``nbytes_per_rank``.

        Args:
            workers: the ranks, n.
            nbytes_per_rank: the bytes each rank contributes, s.

        Returns:
            Seconds: ``(n - 1) alpha_g + (n - 1) * s * beta_g``.
        """
        n = workers
        return (n - 1) * self.alpha_gather + (n - 1) * nbytes_per_rank * self.beta_gather


SMALL = 256  # bytes: a message whose time is latency alone


def _seconds(model: CostModel, row: dict) -> float:
    """The model's seconds for one run's collective, at the model's rate."""
    if row["op"] == "all_reduce":
        return model.all_reduce(row["workers"], row["bytes"])
    return model.all_gather(row["workers"], row["bytes"])


#: one ring step's latency and one byte per second: _seconds gives a run's ring steps, and its bytes on the link
_STEPS, _BYTES = CostModel(1.0, 1.0, 0.0, 0.0, "1gbit"), CostModel(0.0, 0.0, 1.0, 1.0, "1gbit")


def latency(rows: list[dict]) -> tuple[float, float]:
    """(alpha_r, alpha_g): seconds per ring step of each collective, from runs of messages too small for their
    bytes to count.

    Args:
        rows: measured runs (:func:`measure`), of both collectives.

    Returns:
        ``(alpha_r, alpha_g)``: per collective, the smallest over its runs of seconds divided by ring steps.
    """
    per_step = {op: min(r["seconds"] / _seconds(_STEPS, r) for r in rows if r["op"] == op)
                for op in ("all_reduce", "all_gather")}
    return per_step["all_reduce"], per_step["all_gather"]


def _fit(rows: list[dict], rate: str, alpha_reduce: float, alpha_gather: float) -> CostModel:
    """Each collective's beta by least squares of the relative errors over its runs, its alpha given: beta
    minimises sum_runs ((steps alpha + c beta) / t - 1)^2, c the bytes each rank sends."""
    alphas = CostModel(alpha_reduce, alpha_gather, 0.0, 0.0, rate)
    betas = {}
    for op in ("all_reduce", "all_gather"):
        num = den = 0.0
        for r in rows:
            if r["op"] == op:
                x = _seconds(_BYTES, r) / r["seconds"]
                num += x * (1 - _seconds(alphas, r) / r["seconds"])
                den += x * x
        betas[op] = num / den
    return CostModel(alpha_reduce, alpha_gather, betas["all_reduce"], betas["all_gather"], rate)


def _worker(rank: int, world: int, reduce_bytes: tuple[int, ...], gather_bytes: tuple[int, ...],
            repeats: int) -> list[dict]:
    rows = []
    for nbytes in reduce_bytes:
        x = torch.ones(nbytes // 4)
        rows.append({"op": "all_reduce", "workers": world, "bytes": nbytes,
                     "seconds": _timed(lambda x=x: dist.all_reduce(x), 1, repeats, "min")})
    for nbytes in gather_bytes:
        local = torch.ones(nbytes, dtype=torch.uint8)
        out = torch.empty(nbytes * world, dtype=torch.uint8)
        rows.append({"op": "all_gather", "workers": world, "bytes": nbytes,
                     "seconds": _timed(lambda out=out, local=local: all_gather_single(out, local), 1, repeats, "min")})
    return rows


def measure(worlds: tuple[int, ...], rate: str, reduce_bytes: tuple[int, ...], gather_bytes: tuple[int, ...],
            repeats: int) -> list[dict]:
    """Time gloo's all-reduce and all-gather on each number of ranks behind shaped links.

    Each world size runs in fresh processes behind its own
    :class:`~gradcomp_studies.bench.netns.ShapedLinks`, one torch thread per rank.

    Args:
        worlds: the numbers of ranks, one run each.
        rate: each rank's egress rate, in tc's units.
        reduce_bytes: the sizes all-reduced (float32 tensors of ``nbytes // 4`` elements), in bytes.
        gather_bytes: the bytes each rank contributes to an all-gather.
        repeats: timed calls of each collective (after one warm-up call); the best is kept.

    Returns:
        One row per world size and collective size: ``{"op": "all_reduce" | "all_gather", "workers", "bytes",
        "seconds" (the best repeat of the slowest rank), "rate"}``.

    Raises:
        NetworkSetupError: the shaped links cannot be built here (not root, no iproute2, a command failed).
    """
    rows = []
    for world in worlds:
        with ShapedLinks(world, rate) as links:
            rows += spawn(_worker, world, reduce_bytes, gather_bytes, repeats, address=links.address(0),
                          before_init=links.before_init(), timeout_s=900, threads=1)[0]
    return [{**r, "rate": rate} for r in rows]


def predict(model: CostModel, row: dict) -> float:
    """The model's seconds for one measured run (at the run's own link rate).

    Args:
        model: the cost model.
        row: a run of :func:`measure` (its ``"rate"`` absent: the model's own).

    Returns:
        The seconds the model gives that run's collective at its rate.
    """
    return _seconds(model.at(row.get("rate", model.rate)), row)


def _effective(beta: float) -> str:
    return f"{8 / beta / 1e9:.2f} Gbit/s effective" if beta > 0 else "no cost per byte measured"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3g}" if seconds < 1 else f"{1e3 * seconds:,.0f}"


def resnet50_bytes(seed: int) -> dict[str, int]:
    """One worker's bytes for one step of ResNet-50, counted from the payloads: dense fp32, PowerSGD rank 2
    (its two all-reduces together), DGC at density 0.001 with every tensor sparsified: on the compact wire
    (all-gathered) and with a shared index set (its two all-reduces together).

    Args:
        seed: seeds ResNet-50's random (standard normal) gradient.

    Returns:
        Bytes per worker and step: ``{"dense", "powersgd", "dgc", "dgc_shared"}``.
    """
    grads = random_gradients(model_shapes("resnet50"), seed)
    return {"dense": 4 * sum(g.numel() for g in grads.values()),
            "powersgd": bytes_sent(Method(PowerSGD(rank=2)), grads),
            "dgc": bytes_sent(DGC(density=0.001, warmup_epochs=0, sparsify_all=True), grads),
            "dgc_shared": bytes_sent(DGC(density=0.001, warmup_epochs=0, sparsify_all=True, aggregate="shared"),
                                     grads)}


def projection(model: CostModel, sizes: dict[str, int], workers=WORKERS) -> dict[str, dict[int, float]]:
    """Seconds of communication per step for a gradient of ``sizes`` bytes at each worker count.

    Args:
        model: the cost model, at the rate projected.
        sizes: bytes per worker and step (:func:`resnet50_bytes`).
        workers: the worker counts.

    Returns:
        Method label -> worker count -> seconds: the dense all-reduce, PowerSGD's two all-reduces, DGC's
        all-gather, and DGC with a shared index set (two all-reduces).
    """
    return {
        "dense all-reduce": {n: model.all_reduce(n, sizes["dense"]) for n in workers},
        "PowerSGD rank 2 (all-reduce)": {n: model.all_reduce(n, sizes["powersgd"], rounds=2) for n in workers},
        "DGC all-gather": {n: model.all_gather(n, sizes["dgc"]) for n in workers},
        "DGC shared indices (all-reduce)": {n: model.all_reduce(n, sizes["dgc_shared"], rounds=2) for n in workers},
    }


def crossover(model: CostModel, sizes: dict[str, int]) -> int | None:
    """The smallest worker count at which DGC's all-gather costs more than the dense all-reduce (None: never
    below 2**20 workers).

    Args:
        model: the cost model, at the rate asked about.
        sizes: bytes per worker and step (:func:`resnet50_bytes`): ``"dense"`` and ``"dgc"`` are read.

    Returns:
        The first power of two from 2 up at which the all-gather costs more, or None.
    """
    n = 2
    while n <= 2**20:
        if model.all_gather(n, sizes["dgc"]) > model.all_reduce(n, sizes["dense"]):
            return n
        n *= 2
    return None


def _plot(models: dict[str, CostModel], sizes: dict[str, int], path) -> None:
    fig = new_figure(5.2 * len(models), 4.6)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    styles = {"dense all-reduce": ("0.35", "-"), "PowerSGD rank 2 (all-reduce)": ("C0", "-"),
              "DGC all-gather": ("C3", "-"), "DGC shared indices (all-reduce)": ("C2", "-")}
    workers = [2**i for i in range(3, 15)]
    for ax, (rate, model) in zip(axes, models.items()):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        for label, times in projection(model, sizes, workers).items():
            color, style = styles[label]
            ax.plot(workers, list(times.values()), color=color, linestyle=style, marker="o", markersize=3,
                    label=label)
        bytes_only = [2 * (n - 1) / n * sizes["dense"] * model.beta_reduce for n in workers]
        ax.plot(workers, bytes_only, color="0.35", linestyle="--", linewidth=1,
                label="dense all-reduce, bytes only (no latency)")
        cross = crossover(model, sizes)
        if cross is not None and cross <= workers[-1]:
            ax.axvline(cross, color="C3", linestyle=":", linewidth=1)
            ax.annotate(f"DGC's all-gather\nstops paying: {cross} workers", (cross, ax.get_ylim()[0]),
                        xytext=(4, 12), textcoords="offset points", fontsize="x-small", color="C3")
        ax.set_xlabel("workers")
        ax.set_ylabel("communication per step (s), ResNet-50")
        ax.set_title(f"{rate} links (alpha-beta model)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize="x-small", loc="upper left")
    save_figure(fig, path)


def _fit_table(model: CostModel, rows: list[dict]) -> tuple[list[list], list[float]]:
    """Each run beside the model's prediction: the table's rows and the relative errors."""
    table, errors = [], []
    for r in rows:
        predicted = predict(model, r)
        errors.append(predicted / r["seconds"] - 1)
        table.append([r["op"].replace("_", "-"), r["workers"], r["rate"], f"{r['bytes']:,}", _ms(r["seconds"]),
                      _ms(predicted), f"{100 * errors[-1]:+.1f} %"])
    return table, errors


@dataclass(frozen=True)
class _Plan:
    """The runs a variant measures: those the model is fitted to and (full variant only) those that check the
    rate scaling."""

    rate: str
    worlds: tuple[int, ...]
    reduce_bytes: tuple[int, ...]
    gather_bytes: tuple[int, ...]
    repeats: int
    check_rate: str | None = None  # the rate of the runs that check the rate scaling (full variant only)
    check_repeats: int = 0


def _plan(full: bool) -> _Plan:
    """The full variant's runs, or the quick variant's."""
    if full:
        # fitted where the links, not the cores, set the pace: at 1 Gbit/s, 8 ranks on this 2-core machine
        # wait for a core at every ring step (the report's second table shows it); at 100 Mbit/s each step's
        # bytes take 10x longer.  The same runs at 1 Gbit/s check the rate scaling.
        return _Plan(FIT_RATE, (2, 4, 8), (1 << 20, 1 << 22, 1 << 24), (1 << 18, 1 << 20, 1 << 22), 15,
                     check_rate=RATES[0], check_repeats=15)
    # two sizes per collective, both past the links' 1 ms burst
    return _Plan(RATES[0], (2,), (1 << 20, 1 << 22), (1 << 20, 1 << 22), 5)


def _measure_plan(plan: _Plan) -> tuple[tuple[float, float], list[dict], list[dict]]:
    """The alphas, the runs the betas are fitted to and the runs that check the rate scaling (StudySkipped where
    the shaped links cannot be set up)."""
    try:
        # alpha from small messages between 2 ranks that each have a core; beta fitted to the big ones
        alphas = latency(measure((2,), plan.rate, (SMALL,), (SMALL,), 30))
        rows = measure(plan.worlds, plan.rate, plan.reduce_bytes, plan.gather_bytes, plan.repeats)
        check_rows = (measure(plan.worlds, plan.check_rate, plan.reduce_bytes, plan.gather_bytes, plan.check_repeats)
                      if plan.check_rate else [])
    except NetworkSetupError as error:
        raise StudySkipped(str(error)) from None
    return alphas, rows, check_rows


def _checks(full: bool, plan: _Plan, model: CostModel, errors: list[float], refit: CostModel | None,
            crossings: dict[str, int | None], bytes_only: int | None) -> list[Check]:
    """The fit's accuracy, (full variant) the rate scaling and the crossing the projection shows."""
    worst = max(abs(e) for e in errors)
    if not full:
        return [Check("every measured run's bytes cost time (both betas of the fit are positive)",
                      model.beta_reduce > 0 and model.beta_gather > 0, f"worst fit error {100 * worst:.1f} %")]
    rate, check_rate = plan.rate, plan.check_rate
    checks = [Check(f"the model is within 20 % of every run it was fitted to ({', '.join(map(str, plan.worlds))} "
                    f"ranks at {rate})", worst <= 0.20, f"worst {100 * worst:.1f} %")]
    # the projection's assumption, tested on the ranks that each have a core at 1 Gbit/s: refitted there,
    # the betas are the 100 Mbit/s ones divided by 10
    assert check_rate is not None and refit is not None  # the full variant runs at check_rate and refits
    scaled = model.at(check_rate)
    drift = [refit.beta_reduce / scaled.beta_reduce - 1, refit.beta_gather / scaled.beta_gather - 1]
    checks.append(Check(f"bytes cost in inverse proportion to the link rate: refitted on the 2- and 4-rank "
                        f"{check_rate} runs, both betas are within 20 % of the {rate} ones scaled",
                        max(map(abs, drift)) <= 0.20,
                        f"all-reduce {100 * drift[0]:+.1f} %, all-gather {100 * drift[1]:+.1f} %"))
    checks.append(Check("the model shows where DGC's all-gather stops paying against the dense all-reduce",
                        any(c is not None for c in crossings.values()),
                        ", ".join(f"{rt}: {c if c else 'beyond 2^20'} workers" for rt, c in crossings.items())
                        + f"; bytes alone: {bytes_only} workers"))
    return checks


def _notes(plan: _Plan, model: CostModel, check_rows: list[dict], refit: CostModel | None, sizes: dict[str, int],
           crossings: dict[str, int | None], bytes_only: int | None) -> list[str]:
    """The report's notes: how alpha and beta were measured, what the projection assumes, the bytes projected."""
    rate, check_rate = plan.rate, plan.check_rate
    waited = refitted = ""
    if check_rate:
        wait = next((r for r in check_rows
                     if r["op"] == "all_reduce" and r["workers"] == 8 and r["bytes"] == 1 << 20), None)
        assert wait is not None and refit is not None  # 8 ranks ran at check_rate; refit from its runs
        waited = (f" For the same reason the full variant fits at {rate}: at {check_rate} that wait shows on 8 ranks "
                  f"(the second table: a 1 MB all-reduce on 8 ranks took {_ms(wait['seconds'])} ms where the model "
                  f"says {_ms(predict(model, wait))}), at {rate} each step's bytes take 10x longer than the wait.")
        refitted = (f" (refitted on the 2- and 4-rank {check_rate} runs the betas give {_effective(refit.beta_reduce)} "
                    f"and {_effective(refit.beta_gather)}: the check below)")
    return [
        f"alpha is the latency of one ring step, measured on {SMALL}-byte messages between 2 ranks (each with "
        "a core), where the bytes do not count; beta is fitted to messages of 256 KB and more. Small messages on "
        "8 ranks would measure this 2-core machine's scheduler instead: each ring step waits for a peer to get a "
        "core (an 8 KB all-gather on 8 ranks took 6 to 21 ms in a separate run, 30 repeats)." + waited,
        "Projection: beta scales with the link rate" + refitted
        + ", alpha stays as measured: the latency of gloo over TCP between processes on this machine, more than a "
        "datacenter fabric's. The ring all-reduce pays 2 (n - 1) alpha, so at high rates and many workers "
        "latency, not bytes, dominates every curve, the dense one too; with no latency at all the bytes alone "
        f"decide, and DGC's all-gather stops paying at {bytes_only} workers at any rate (where (n - 1) s beta_g "
        "exceeds 2 (n - 1) / n S beta_r).",
        "ResNet-50 bytes per worker and step, counted from the payloads of one step (as `gradcomp bench wire`): "
        "dense fp32 "
        f"{sizes['dense']:,}, PowerSGD rank 2 {sizes['powersgd']:,}, DGC (compact wire, every tensor) "
        f"{sizes['dgc']:,}, DGC with a shared index set {sizes['dgc_shared']:,} (the leader's index code and "
        "float32 values, every rank).",
        "DGC with a shared index set: one worker per step picks the indices and every worker's values there are "
        "all-reduced, so its bytes per worker stay near 2 x its payload at any worker count, like the dense "
        "all-reduce's but ~"
        f"{sizes['dense'] / sizes['dgc_shared']:.0f}x smaller; only the ring's latency grows with n. It updates k "
        "entries per step where the all-gather updates up to n k (see the ablation table for what that costs in "
        "accuracy).",
        "DGC's all-gather: every rank receives the other ranks' entries, (n - 1) x its own payload, so its cost "
        "grows linearly with the number of workers while the ring all-reduce's stays near 2 x the gradient: "
        + "; ".join(f"at {rt} it stops paying at {c} workers" if c else f"at {rt} it pays up to 2^20 workers"
                    for rt, c in crossings.items()) + "."
        + (f" Latency moves the crossing {'earlier' if model.alpha_gather > 2 * model.alpha_reduce else 'later'} "
           f"than the bytes alone: one all-gather step costs alpha_g ({1e6 * model.alpha_gather:.0f} us), one "
           f"position of the ring all-reduce 2 alpha_r ({2e6 * model.alpha_reduce:.0f} us)."),
    ]


def _markdown(plan: _Plan, model: CostModel, fit_rows: list[list], check_table: list[list], proj_rows: list[list],
              notes: list[str]) -> str:
    """The report: the fitted model and its runs, (full variant) the runs at the check rate, the projection and
    the notes."""
    rate, check_rate = plan.rate, plan.check_rate
    fitted = (f"all-reduce: alpha = {1e6 * model.alpha_reduce:.0f} us per ring step (measured), beta = "
              f"{model.beta_reduce * 1e9:.2f} ns per byte ({_effective(model.beta_reduce)}); "
              f"all-gather: alpha = {1e6 * model.alpha_gather:.0f} us (measured), beta = "
              f"{model.beta_gather * 1e9:.2f} ns per byte ({_effective(model.beta_gather)}); links shaped at {rate}")
    run_header = ["collective", "ranks", "links", "bytes", "measured ms", "model ms", "error"]
    return "\n".join([
        "## The model fitted to the measured runs", "", fitted, "",
        markdown_table(run_header, fit_rows, align="lrlrrrr"), "",
        *([f"## The same model at {check_rate} (scaled, not refitted) beside runs at {check_rate}", "",
           markdown_table(run_header, check_table, align="lrlrrrr"), ""] if check_rate else []),
        "## Projected communication per step for ResNet-50 (ms)", "",
        markdown_table(["links", "method", *[str(n) for n in WORKERS]], proj_rows, align="ll" + "r" * len(WORKERS)),
        "", "## Notes", "", *[f"- {n}" for n in notes], ""])


def _setup(plan: _Plan) -> list[str]:
    """The report's setup lines: what was measured, on how many ranks, behind which links."""
    setup = [f"measured: gloo ring collectives on {', '.join(map(str, plan.worlds))} ranks behind {plan.rate} tc tbf "
             f"links (each rank in its own network namespace); all-reduce of "
             f"{', '.join(f'{b:,}' for b in plan.reduce_bytes)} bytes, all-gather of "
             f"{', '.join(f'{b:,}' for b in plan.gather_bytes)} bytes per rank; the best of {plan.repeats} runs of "
             "the slowest rank"]
    if plan.check_rate:
        setup.append(f"checked: the same collectives on the same ranks behind {plan.check_rate} links, the best of "
                     f"{plan.check_repeats} runs")
    return setup


def run(ctx: Context) -> Result:
    """``gradcomp bench scaling``: fit the alpha-beta model to shaped-link runs, check it, project it to 1024
    workers for ResNet-50 and plot the projection.

    Args:
        ctx: the run's variant (``full``: 2, 4 and 8 ranks at 100 Mbit/s, checked at 1 Gbit/s; quick: 2 ranks at
            1 Gbit/s), seed (of ResNet-50's random gradient) and output folder (the plot is written there).

    Returns:
        The report: the fit beside every measured run, the projected milliseconds per step, the checks, and as
        data the measured runs, the model, the crossings and the projection.

    Raises:
        StudySkipped: the shaped links cannot be set up here (not root, no ``ip`` or ``tc``).
    """
    plan = _plan(ctx.full)
    alphas, rows, check_rows = _measure_plan(plan)
    model = _fit(rows, plan.rate, *alphas)
    fit_rows, errors = _fit_table(model, rows)
    check_table, _ = _fit_table(model, check_rows)
    refit = (_fit([r for r in check_rows if r["workers"] <= 4], plan.check_rate, *alphas) if plan.check_rate
             else None)
    models = {rt: model.at(rt) for rt in RATES}
    sizes = resnet50_bytes(ctx.seed)
    proj_rows = [[rt, label, *[_ms(times[n]) for n in WORKERS]]
                 for rt, m in models.items() for label, times in projection(m, sizes).items()]
    crossings = {rt: crossover(m, sizes) for rt, m in models.items()}
    # without latency (a fabric whose per-step latency is negligible): where the bytes alone cross
    bytes_only = crossover(CostModel(0.0, 0.0, model.beta_reduce, model.beta_gather, plan.rate), sizes)
    plot_path = ctx.path(".png")
    _plot(models, sizes, plot_path)
    checks = _checks(ctx.full, plan, model, errors, refit, crossings, bytes_only)
    notes = _notes(plan, model, check_rows, refit, sizes, crossings, bytes_only)
    markdown = _markdown(plan, model, fit_rows, check_table, proj_rows, notes)
    title = "Scaling: an alpha-beta model of the collectives, fitted on shaped links and projected to 1024 workers"
    return Result(title=title, console=title + "\n\n" + markdown, markdown=markdown, checks=checks,
                  plots=[plot_path], setup=_setup(plan),
                  data={"measured": rows, "checked": check_rows, "model": vars(model),
                        "crossover": crossings, "crossover_bytes_only": bytes_only, "resnet50_bytes": sizes,
                        "projection": {rt: projection(m, sizes) for rt, m in models.items()}})


register(Study("scaling", "alpha-beta model of all-reduce and all-gather fitted to 2/4/8-rank shaped-link runs, "
                          "projected to 1024 workers at 1, 10 and 100 Gbit/s (needs root)", run, order=4,
               kind="bench"))
