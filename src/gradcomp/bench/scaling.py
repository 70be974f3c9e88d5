"""``gradcomp bench scaling``: an alpha-beta cost model fitted to real shaped-link runs, projected to 1024 workers.

Each collective costs latency plus bytes over bandwidth.  For gloo's ring
algorithms on ``n`` ranks (``S`` the all-reduced bytes, ``s`` the bytes each
rank contributes to an all-gather)::

    all-reduce   T = 2 (n - 1) alpha_r + 2 (n - 1) / n * S * beta_r    (per round)
    all-gather   T =   (n - 1) alpha_g +   (n - 1)     * s * beta_g

``beta`` is seconds per byte of one rank's link as each collective achieves
it, and ``alpha`` the cost of one ring step (software and kernel latency; no
latency is added on these links).  They are fitted by least squares (relative
errors; an alpha that comes out negative is fixed at 0 and the rest refitted) to runs on 2, 4 and 8 ranks behind real
``tc tbf`` links (:class:`~gradcomp.bench.netns.ShapedLinks`), and every
measurement is printed beside the model's prediction.

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

from ..launch import spawn
from ..reproduce.common import (Check, Context, Result, Study, StudySkipped, markdown_table, new_figure, register,
                                save_figure)
from ..compressors.powersgd import PowerSGD
from ..method import DGC, Method
from ..reproduce.ratio import _gradients, _shapes, bytes_sent
from .netns import NetworkSetupError, ShapedLinks, parse_rate
from .network import _timed

WORKERS = (8, 16, 32, 64, 128, 256, 512, 1024)
RATES = ("1gbit", "10gbit", "100gbit")


@dataclass(frozen=True)
class CostModel:
    """``alpha`` seconds per ring step and ``beta`` seconds per byte (at ``rate``) of each collective."""

    alpha_reduce: float
    alpha_gather: float
    beta_reduce: float
    beta_gather: float
    rate: str

    def at(self, rate: str) -> CostModel:
        """The same links at another rate: bytes cost in inverse proportion, latency stays."""
        scale = parse_rate(self.rate) / parse_rate(rate)
        return CostModel(self.alpha_reduce, self.alpha_gather, self.beta_reduce * scale, self.beta_gather * scale,
                         rate)

    def all_reduce(self, workers: int, nbytes: float, rounds: int = 1) -> float:
        """``rounds`` ring all-reduces in a row moving ``nbytes`` in all."""
        n = workers
        return rounds * 2 * (n - 1) * self.alpha_reduce + 2 * (n - 1) / n * nbytes * self.beta_reduce

    def all_gather(self, workers: int, nbytes_per_rank: float) -> float:
        n = workers
        return (n - 1) * self.alpha_gather + (n - 1) * nbytes_per_rank * self.beta_gather


def _fit(rows: list[dict], rate: str) -> CostModel:
    """Least squares of the relative errors over every measurement: (alpha_r, alpha_g, beta_r, beta_g).
    A coefficient that comes out negative (an alpha hidden in the noise) is fixed at 0 and the rest refitted."""
    def coeffs(r: dict) -> list[float]:
        n, s = r["workers"], r["bytes"]
        if r["op"] == "all_reduce":
            return [2 * (n - 1), 0.0, 2 * (n - 1) / n * s, 0.0]
        return [0.0, n - 1, 0.0, (n - 1) * s]

    free = [0, 1, 2, 3]
    while True:
        a = torch.tensor([[coeffs(r)[j] / r["seconds"] for j in free] for r in rows], dtype=torch.float64)
        solution = torch.linalg.lstsq(a, torch.ones(len(rows), 1, dtype=torch.float64)).solution.view(-1).tolist()
        values = dict(zip(free, solution))
        negative = [j for j in free if values[j] < 0]
        if not negative:
            break
        free.remove(negative[0])
    full = [values.get(j, 0.0) for j in range(4)]
    return CostModel(*full, rate)


def _worker(rank: int, world: int, reduce_bytes: tuple[int, ...], gather_bytes: tuple[int, ...],
            repeats: int) -> list[dict]:
    rows = []
    for nbytes in reduce_bytes:
        x = torch.ones(nbytes // 4)
        rows.append({"op": "all_reduce", "workers": world, "bytes": nbytes,
                     "seconds": _timed(lambda: dist.all_reduce(x), 1, repeats, "min")})
    for nbytes in gather_bytes:
        local = torch.ones(nbytes, dtype=torch.uint8)
        out = torch.empty(nbytes * world, dtype=torch.uint8)
        rows.append({"op": "all_gather", "workers": world, "bytes": nbytes,
                     "seconds": _timed(lambda: dist.all_gather_into_tensor(out, local), 1, repeats, "min")})
    return rows


def measure(worlds: tuple[int, ...], rate: str, reduce_bytes: tuple[int, ...], gather_bytes: tuple[int, ...],
            repeats: int) -> list[dict]:
    rows = []
    for world in worlds:
        with ShapedLinks(world, rate) as links:
            rows += spawn(_worker, world, reduce_bytes, gather_bytes, repeats, address=links.address(0),
                          before_init=links.before_init(), timeout_s=900, threads=1)[0]
    return rows


def _effective(beta: float) -> str:
    return f"{8 / beta / 1e9:.2f} Gbit/s effective" if beta > 0 else "no cost per byte measured"


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.3g}" if seconds < 1 else f"{1e3 * seconds:,.0f}"


def resnet50_bytes(seed: int) -> dict[str, int]:
    """One worker's bytes for one step of ResNet-50, counted from the payloads: dense fp32, PowerSGD rank 2
    (its two all-reduces together), DGC at density 0.001 with every tensor sparsified: on the compact wire
    (all-gathered) and with a shared index set (its two all-reduces together)."""
    grads = _gradients(_shapes("resnet50"), seed)
    return {"dense": 4 * sum(g.numel() for g in grads.values()),
            "powersgd": bytes_sent(Method(PowerSGD(rank=2)), grads),
            "dgc": bytes_sent(DGC(density=0.001, warmup_epochs=0, sparsify_all=True), grads),
            "dgc_shared": bytes_sent(DGC(density=0.001, warmup_epochs=0, sparsify_all=True, aggregate="shared"),
                                     grads)}


def projection(model: CostModel, sizes: dict[str, int], workers=WORKERS) -> dict[str, dict[int, float]]:
    """Seconds of communication per step for a gradient of ``sizes`` bytes at each worker count."""
    return {
        "dense all-reduce": {n: model.all_reduce(n, sizes["dense"]) for n in workers},
        "PowerSGD rank 2 (all-reduce)": {n: model.all_reduce(n, sizes["powersgd"], rounds=2) for n in workers},
        "DGC all-gather": {n: model.all_gather(n, sizes["dgc"]) for n in workers},
        "DGC shared indices (all-reduce)": {n: model.all_reduce(n, sizes["dgc_shared"], rounds=2) for n in workers},
    }


def crossover(model: CostModel, sizes: dict[str, int]) -> int | None:
    """The smallest worker count at which DGC's all-gather costs more than the dense all-reduce (None: never
    below 2**20 workers)."""
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
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers")
        ax.set_ylabel("communication per step (s), ResNet-50")
        ax.set_title(f"{rate} links (alpha-beta model)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize="x-small", loc="upper left")
    save_figure(fig, path)


def run(ctx: Context) -> Result:
    if ctx.full:
        # sizes where bytes dominate: on this 2-core machine 8 ranks share the cores, and a small message's
        # time is mostly the wait for a scheduled peer (an 8 KB all-gather on 8 ranks: 6 to 21 ms)
        worlds, reduce_bytes, gather_bytes, repeats = (2, 4, 8), (1 << 20, 1 << 22, 1 << 24), (1 << 18, 1 << 20,
                                                                                              1 << 22), 15
    else:
        # two sizes per collective (enough to fit its alpha and beta), both past the links' 1 ms burst
        worlds, reduce_bytes, gather_bytes, repeats = (2,), (1 << 20, 1 << 22), (1 << 20, 1 << 22), 5
    rate = RATES[0]
    try:
        rows = measure(worlds, rate, reduce_bytes, gather_bytes, repeats)
    except NetworkSetupError as error:
        raise StudySkipped(str(error)) from None
    model = _fit(rows, rate)
    errors = []
    fit_rows = []
    for r in rows:
        predicted = (model.all_reduce(r["workers"], r["bytes"]) if r["op"] == "all_reduce"
                     else model.all_gather(r["workers"], r["bytes"]))
        err = predicted / r["seconds"] - 1
        errors.append(err)
        fit_rows.append([r["op"].replace("_", "-"), r["workers"], f"{r['bytes']:,}", _ms(r["seconds"]),
                         _ms(predicted), f"{100 * err:+.1f} %"])
    models = {rt: model.at(rt) for rt in RATES}
    sizes = resnet50_bytes(ctx.seed)
    proj_rows = []
    for rt, m in models.items():
        for label, times in projection(m, sizes).items():
            proj_rows.append([rt, label, *[_ms(times[n]) for n in WORKERS]])
    crossings = {rt: crossover(m, sizes) for rt, m in models.items()}
    # without latency (a fabric whose per-step latency is negligible): where the bytes alone cross
    bytes_only = crossover(CostModel(0.0, 0.0, model.beta_reduce, model.beta_gather, rate), sizes)
    plot_path = ctx.path(".png")
    _plot(models, sizes, plot_path)

    worst = max(abs(e) for e in errors)
    if ctx.full:
        checks = [Check("the fitted model is within 20 % of every measured run", worst <= 0.20,
                        f"worst {100 * worst:.1f} %")]
        checks.append(Check("the model shows where DGC's all-gather stops paying against the dense all-reduce",
                            any(c is not None for c in crossings.values()),
                            ", ".join(f"{rt}: {c if c else 'beyond 2^20'} workers" for rt, c in crossings.items())
                            + f"; bytes alone: {bytes_only} workers"))
    else:  # two sizes on one pair of ranks: the fit passes through them unless a run is an outlier
        checks = [Check("every measured run's bytes cost time (both betas of the fit are positive)",
                        model.beta_reduce > 0 and model.beta_gather > 0, f"worst fit error {100 * worst:.1f} %")]
    fitted = (f"all-reduce: alpha = {1e6 * model.alpha_reduce:.0f} us per ring step, beta = "
              f"{model.beta_reduce * 1e9:.2f} ns per byte ({_effective(model.beta_reduce)}); "
              f"all-gather: alpha = {1e6 * model.alpha_gather:.0f} us, beta = {model.beta_gather * 1e9:.2f} ns per "
              f"byte ({_effective(model.beta_gather)}); links shaped at {rate}")
    notes = [
        "The fit uses messages of 256 KB and more: on this 2-core machine up to 8 ranks share the cores, and a "
        "small message's time is mostly the wait for a peer to be scheduled (an 8 KB all-gather on 8 ranks took "
        "6 to 21 ms in a separate run, 30 repeats), not the network's latency. alpha is therefore loosely "
        "constrained; the projections below are dominated by bytes except for DGC at few workers.",
        "Projection: beta scales with the link rate, alpha is kept as measured here (the software latency of gloo "
        "over TCP). The ring all-reduce pays 2 (n - 1) alpha, so at high rates and many workers latency, not "
        "bytes, dominates the dense curve; on a fabric with negligible latency the bytes alone decide, and "
        f"DGC's all-gather stops paying at {bytes_only} workers at any rate (where (n - 1) s beta_g exceeds "
        "2 (n - 1) / n S beta_r).",
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
                    for rt, c in crossings.items()) + ".",
    ]
    markdown = "\n".join([
        "## The model fitted to the measured runs", "", fitted, "",
        markdown_table(["collective", "ranks", "bytes", "measured ms", "model ms", "error"], fit_rows,
                       align="lrrrrr"), "",
        "## Projected communication per step for ResNet-50 (ms)", "",
        markdown_table(["links", "method", *[str(n) for n in WORKERS]], proj_rows, align="ll" + "r" * len(WORKERS)),
        "", "## Notes", "", *[f"- {n}" for n in notes], ""])
    title = "Scaling: an alpha-beta model of the collectives, fitted on shaped links and projected to 1024 workers"
    setup = [f"measured: gloo ring collectives on {', '.join(map(str, worlds))} ranks behind {rate} tc tbf links "
             f"(each rank in its own network namespace); all-reduce of {', '.join(f'{b:,}' for b in reduce_bytes)} "
             f"bytes, all-gather of {', '.join(f'{b:,}' for b in gather_bytes)} bytes per rank; the best of "
             f"{repeats} runs of the slowest rank"]
    return Result(title=title, console=title + "\n\n" + markdown, markdown=markdown, checks=checks,
                  plots=[plot_path], setup=setup,
                  data={"measured": rows, "model": vars(model), "crossover": crossings,
                        "crossover_bytes_only": bytes_only,
                        "resnet50_bytes": sizes,
                        "projection": {rt: projection(m, sizes) for rt, m in models.items()}})


register(Study("scaling", "alpha-beta model of all-reduce and all-gather fitted to 2/4/8-rank shaped-link runs, "
                          "projected to 1024 workers at 1, 10 and 100 Gbit/s (needs root)", run, order=4,
               kind="bench"))
