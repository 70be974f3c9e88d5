"""``gradcomp bench``: the quick variants through the CLI, checked against figures computed here."""

import json
import math

import pytest
import torch

from gradcomp.cli import main
from gradcomp.train.models import resnet50
from helpers import compact_nbytes


def test_bench_wire_quick_counts_match_the_formats(tmp_path, capsys):
    assert main(["bench", "wire", "--out", str(tmp_path), "--no-progress"]) == 0
    report = (tmp_path / "bench-wire-quick.md").read_text()
    assert f"gradcomp bench wire --out {tmp_path}" in report and "❌" not in report
    variants = json.loads((tmp_path / "bench-wire-quick.json").read_text())["data"]["models"]["resnet50"]["variants"]

    params = list(resnet50().parameters())
    k = [max(1, math.ceil(p.numel() / 1000)) for p in params]
    matrix = [p.dim() > 1 and p.numel() >= 1024 for p in params]
    small = sum(4 * p.numel() for p, m in zip(params, matrix) if not m)
    plain = variants["dgc-plain"]["parts"]
    assert plain["values"] == plain["indices"] == sum(4 * kk for kk, m in zip(k, matrix) if m)
    assert plain["dense"] == small and plain["scales"] == 0
    every = variants["dgc-all"]["parts"]
    assert every["values"] == sum(2 * kk for kk in k) and every["scales"] == 4 * len(params) and every["dense"] == 0
    assert variants["dgc-all"]["bytes"] == sum(compact_nbytes(p.numel(), kk) for p, kk in zip(params, k))
    assert 4 * sum(p.numel() for p in params) / variants["dgc-all"]["bytes"] >= 1000
    assert all(v.get("inexact_payloads", 0) == 0 for v in variants.values())


def test_bench_unknown_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "nonsense"])
    assert "invalid choice" in capsys.readouterr().err


def _can_shape():
    import os
    import shutil

    return os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc")


needs_root = pytest.mark.skipif(not _can_shape(), reason="shaping links needs root and iproute2")


@needs_root
def test_shaped_links_limit_the_rate_and_are_torn_down_even_on_error():
    from dist_workers import timed_all_reduce
    from gradcomp.launch import spawn
    from gradcomp_studies.bench.netns import ShapedLinks

    links = ShapedLinks(2, "100mbit")
    with pytest.raises(RuntimeError, match="on purpose"):
        with links:
            assert len(links.leftovers()) == 5  # 2 namespaces, the bridge, 2 veth ends on the bridge
            # ring all-reduce of 1.25 MB on 2 ranks: each sends 1.25 MB through its 100 Mbit/s link, >= 0.1 s
            seconds = spawn(timed_all_reduce, 2, 312_500, address=links.address(0),
                            before_init=links.before_init(), timeout_s=60)
            assert all(0.09 < s < 1.0 for s in seconds), seconds
            raise RuntimeError("on purpose")
    assert links.leftovers() == []


@pytest.mark.slow  # 21 s: the shaped links themselves are tested above in a fraction of that
@needs_root
def test_bench_network_quick(tmp_path):
    assert main(["bench", "network", "--out", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "bench-network-quick.json").read_text())["data"]
    result = data["runs"]["1gbit"]["results"]["cnn"]
    assert set(result["ddp"]) == {"compute", "dense", "powersgd-2", "powersgd-4", "dgc"}
    assert result["communication"]["dgc_payload_bytes"] > 0
    runs = data["runs"]["1gbit"]["results"]["time_to_accuracy"]["cnn-wide"]
    assert set(runs) == {"dense", "powersgd-2", "dgc"}
    assert all(r["steps"] == 50 and r["seconds"] > 0 and 0.1 < r["accuracy"] <= 1 for r in runs.values())
    for r in runs.values():  # each target: not reached, or reached at an evaluation (the 50th step), in that time
        assert set(r["targets"]) == {"0.97", "0.98", "0.99"}
        reached = [c for t, c in r["targets"].items() if c is not None]
        assert all(c["steps"] == 50 and c["seconds"] == r["seconds"] for c in reached)
        assert (r["targets"]["0.97"] is not None) == (r["accuracy"] >= 0.97)


def test_rates_are_validated():
    from gradcomp_studies.bench.netns import ShapedLinks, parse_rate

    assert parse_rate("1gbit") == 10**9 and parse_rate("100mbit") == 10**8 and parse_rate("2.5gbit") == 25 * 10**8
    with pytest.raises(ValueError, match="rate must look like"):
        ShapedLinks(2, "1 gigabit")


def test_cost_model_formulas_and_rate_scaling():
    from gradcomp_studies.bench.scaling import CostModel

    m = CostModel(alpha_reduce=1e-4, alpha_gather=2e-4, beta_reduce=8e-9, beta_gather=9e-9, rate="1gbit")
    # ring all-reduce of S bytes on n ranks: 2 (n - 1) steps, each rank sends 2 (n - 1) / n * S bytes
    assert m.all_reduce(4, 1e6) == pytest.approx(6 * 1e-4 + 1.5 * 1e6 * 8e-9)
    # ring all-gather of s bytes per rank: n - 1 steps, each rank forwards (n - 1) * s bytes
    assert m.all_gather(4, 1e5) == pytest.approx(3 * 2e-4 + 3 * 1e5 * 9e-9)
    fast = m.at("10gbit")
    assert fast.beta_reduce == pytest.approx(8e-10) and fast.alpha_reduce == m.alpha_reduce
    # two rounds in a row: the latency twice, the bytes once
    assert m.all_reduce(4, 1e6, rounds=2) == pytest.approx(12 * 1e-4 + 1.5 * 1e6 * 8e-9)


def test_scaling_fit_recovers_the_betas_that_made_the_times_given_the_alphas():
    from gradcomp_studies.bench.scaling import CostModel, _fit

    truth = CostModel(alpha_reduce=1e-4, alpha_gather=3e-5, beta_reduce=8e-9, beta_gather=9e-9, rate="1gbit")
    rows = [{"op": op, "workers": n, "bytes": s,
             "seconds": truth.all_reduce(n, s) if op == "all_reduce" else truth.all_gather(n, s)}
            for n in (2, 4, 8) for op in ("all_reduce", "all_gather") for s in (1 << 16, 1 << 20)]
    fitted = _fit(rows, "1gbit", truth.alpha_reduce, truth.alpha_gather)
    assert fitted == CostModel(truth.alpha_reduce, truth.alpha_gather, pytest.approx(8e-9, rel=1e-9),
                               pytest.approx(9e-9, rel=1e-9), "1gbit")
    # every run of a latency-free model 10 % slower: beta absorbs it exactly, whatever the size and rank count
    bytes_only = CostModel(0.0, 0.0, 8e-9, 9e-9, "1gbit")
    slow = [{**r, "seconds": 1.1 * (bytes_only.all_reduce(r["workers"], r["bytes"]) if r["op"] == "all_reduce"
                                    else bytes_only.all_gather(r["workers"], r["bytes"]))} for r in rows]
    fitted = _fit(slow, "1gbit", 0.0, 0.0)
    assert (fitted.beta_reduce, fitted.beta_gather) == (pytest.approx(8.8e-9), pytest.approx(9.9e-9))


def test_scaling_latency_is_seconds_per_ring_step_of_the_fastest_small_run():
    from gradcomp_studies.bench.scaling import latency

    rows = [{"op": "all_reduce", "workers": 2, "bytes": 256, "seconds": 6e-4},  # 2 ring steps
            {"op": "all_reduce", "workers": 4, "bytes": 256, "seconds": 3e-3},  # 6 steps: 500 us each
            {"op": "all_gather", "workers": 2, "bytes": 256, "seconds": 4e-4},  # 1 step
            {"op": "all_gather", "workers": 4, "bytes": 256, "seconds": 9e-4}]  # 3 steps: 300 us each
    assert latency(rows) == (pytest.approx(3e-4), pytest.approx(3e-4))


def test_scaling_projects_the_shared_index_set_flat_in_the_number_of_workers():
    from gradcomp_studies.bench.scaling import CostModel, projection, resnet50_bytes
    from gradcomp_studies.reproduce.ratio import model_shapes

    sizes = resnet50_bytes(0)
    # every tensor sparsified at density 0.001: the leader's index code and float32 values, from the definitions
    ks = [(math.prod(s), math.ceil(math.prod(s) / 1000)) for _, s in model_shapes("resnet50")]
    assert sizes["dgc_shared"] == sum(compact_nbytes(n, k) - 2 * k - 4 + 4 * k for n, k in ks)
    bytes_only = CostModel(0.0, 0.0, 8e-9, 8e-9, "1gbit")
    curves = projection(bytes_only, sizes, workers=(8, 64, 1024))
    shared, gather = curves["DGC shared indices (all-reduce)"], curves["DGC all-gather"]
    assert shared[1024] < 2 * sizes["dgc_shared"] * 8e-9 and shared[1024] / shared[8] < 1.15  # flat in n
    assert gather[1024] / gather[8] == pytest.approx(1023 / 7)  # grows with n


@needs_root
def test_bench_scaling_quick_measures_both_collectives(tmp_path):
    assert main(["bench", "scaling", "--out", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "bench-scaling-quick.json").read_text())["data"]
    assert {r["op"] for r in data["measured"]} == {"all_reduce", "all_gather"}
    assert all(r["seconds"] > 0 for r in data["measured"])
    assert (tmp_path / "bench-scaling-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_compress_quick_times_every_step(tmp_path):
    assert main(["bench", "compress", "--out", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "bench-compress-quick.json").read_text())["data"]
    seconds = data["layouts"]["one flat tensor"]["seconds"]
    assert {"sgd", "topk", "dgc", "dgc-plain", "decompress+aggregate, 32 workers"} <= set(seconds)
    assert data["layouts"]["one flat tensor"]["numel"] == 2_000_000


def test_bench_latency_quick_dga_hides_what_synchronous_sgd_pays(tmp_path):
    assert main(["bench", "latency", "--out", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "bench-latency-quick.json").read_text())["data"]
    seconds = data["seconds"]
    assert set(seconds) == {f"{m}-{lat}" for m in ("dga-0", "dga-10", "fedavg-10") for lat in ("0", "150")}
    # synchronous SGD pays the 150 ms every step (on top of 20 ms of computation), FedAvg every 10th step,
    # DGA (10 steps >= 150 ms) hardly at all
    assert seconds["dga-0-150"] >= 0.17
    assert seconds["dga-10-150"] < seconds["dga-0-150"] - 0.075
    assert seconds["fedavg-10-150"] < seconds["dga-0-150"] - 0.075


def test_bench_step_quick_times_each_door_against_ddp(tmp_path):
    assert main(["bench", "step", "--out", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "bench-step-quick.json").read_text())["data"]
    assert set(data["ratios"]) == {f"{m}|2" for m in ("DDP all-reduce (baseline)", "gradcomp none",
                                                     "gradcomp DGC 0.1 %")}
    assert data["ratios"]["DDP all-reduce (baseline)|2"] == 1.0
    assert all(len(t) == 2 and min(t) > 0 for t in data["seconds"].values())


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_bench_step_full_on_the_gpu(tmp_path):
    """ResNet-50 at batch 64 and 256 under bf16 autocast on cuda:0 (NCCL): writes the figures issue 22 asks for."""
    assert main(["bench", "step", "--full", "--out", str(tmp_path), "--no-progress"]) == 0
    data = json.loads((tmp_path / "bench-step.json").read_text())["data"]
    assert {k.split("|")[1] for k in data["ratios"]} == {"64", "256"}
