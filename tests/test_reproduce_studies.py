"""The quick variants of `gradcomp reproduce` ablation, lm, compare and dga, through the CLI.

Each is checked against figures computed here from the models themselves (bytes per step), not against its
own report.  A study whose dataset is missing is skipped.
"""

import json
import math
import shutil

import pytest

from gradcomp.cli import main
from gradcomp.train.models import build_model
from helpers import REPO, compact_nbytes, need_datasets, quick_study

PNG = b"\x89PNG\r\n\x1a\n"


def _params(model, dataset, **options):
    return [p.numel() for p in build_model(model, dataset, **options).parameters()]


# ---------------------------------------------------------------- ablation


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    need_datasets("mnist")
    return quick_study("ablation", tmp_path_factory)


def test_ablation_quick_report(ablation):
    rc, out, report, data = ablation
    assert rc == 0 and "❌" not in report
    assert f"gradcomp reproduce ablation --out {out}" in report
    assert "naive pruning" in report and "DGC (all techniques)" in report and "does not converge" in report
    assert "one shared index set per step" in report
    assert "avg density" in report and "92.92" in report
    assert (out / "ablation-quick.png").read_bytes()[:8] == PNG


def test_ablation_quick_densities_and_bytes(ablation):
    *_, data = ablation
    rows = {r["key"]: r for r in data["data"]["rows"]}
    assert rows["dense"]["mean_density"] == 1.0 and rows["dense"]["bytes_sent"] == rows["dense"]["dense_bytes"]
    assert rows["naive"]["mean_density"] == pytest.approx(0.001)  # no warm-up
    assert rows["dgc"]["mean_density"] > 0.001  # its warm-up starts at 25 %
    # naive pruning at 0.1 %: sparse tensors send ceil(n / 1000) entries on DGC's compact wire, 1-D and small
    # ones are dense
    per_step = sum(compact_nbytes(n, math.ceil(n / 1000)) if dim > 1 and n >= 1024 else 4 * n
                   for n, dim in ((p.numel(), p.dim()) for p in build_model("cnn", "mnist").parameters()))
    assert rows["naive"]["bytes_sent"] == per_step * rows["naive"]["steps"]


# ---------------------------------------------------------------- ablation-long


@pytest.mark.slow  # ~16 s; the default suite runs the ablation's quick study (test_ablation_quick_report)
def test_ablation_long_quick_pairs_seeds(tmp_path_factory):
    """The longer ablation: every seed trains both rows; its paired difference is recomputed here from the rows,
    and its dense row of seed 1 is what training that row directly gives."""
    import statistics

    from gradcomp_studies.reproduce import ablation

    need_datasets("mnist")
    rc, out, report, data = quick_study("ablation-long", tmp_path_factory)
    assert rc == 0 and "❌" not in report and (out / "ablation-long-quick.png").read_bytes()[:8] == PNG
    data = data["data"]
    rows = {(r["key"], r["seed"]): r for r in data["rows"]}
    assert set(rows) == {(k, s) for k in ("dense", "dgc_all32") for s in (0, 1)}
    diffs = [rows["dgc_all32", s]["accuracy"] - rows["dense", s]["accuracy"] for s in (0, 1)]
    assert data["paired"]["dgc_all32"]["mean"] == pytest.approx(statistics.mean(diffs))
    assert data["paired"]["dgc_all32"]["standard_error"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(2))
    assert f"{100 * statistics.mean(diffs):+.2f} points on average" in report
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the study's (Study.threads): the order of the sums, and so the last bits, follow it
    try:
        direct = ablation._train("dense", "mnist", ablation.LONG_QUICK, 1)
    finally:
        torch.set_num_threads(threads)
    assert direct.accuracy == rows["dense", 1]["accuracy"] and direct.history == rows["dense", 1]["history"]
    assert rows["dgc_all32", 0]["bytes_sent"] < 0.01 * rows["dgc_all32", 0]["dense_bytes"]


# ---------------------------------------------------------------- lm


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    need_datasets("ptb")
    return quick_study("lm", tmp_path_factory)


def test_lm_full_report_from_the_committed_rows(tmp_path):
    """The full study's report code (its table, checks and notes, which the quick variant does not reach) on the
    rows of results/runs/lm, read back without training: each row's figures are those of its summary.json, and
    its bytes are what the model's parameter count gives."""
    need_datasets("ptb")
    runs = tmp_path / "runs"
    shutil.copytree(REPO / "results" / "runs" / "lm", runs / "lm")
    assert main(["reproduce", "lm", "--full", "--runs", str(runs), "--out", str(tmp_path), "--no-progress"]) == 0
    assert not list(runs.rglob("checkpoint*.pt")), "a committed row was trained again"
    report = (tmp_path / "lm.md").read_text()
    assert "❌" not in report and "DGC at 99.9 % within 3 % of the dense perplexity" in report
    dense_per_step = 4 * sum(_params("lstm", "ptb", tie_weights=True))
    rows = json.loads((tmp_path / "lm.json").read_text())["data"]["rows"]
    assert set(rows) == {"dense", "dgc"}
    for key, folder in (("dense", "0-none"), ("dgc", "1-dgc")):  # a row's folder is named after its method
        row, committed = rows[key], json.loads((runs / "lm" / folder / "summary.json").read_text())
        assert row["test_perplexity"] == committed["test_perplexity"]
        assert f"{committed['test_perplexity']:.2f}" in report
        assert row["dense_bytes"] == dense_per_step * row["steps"]
    assert rows["dense"]["bytes_sent"] == rows["dense"]["dense_bytes"]
    assert rows["dgc"]["bytes_sent"] * 100 < rows["dgc"]["dense_bytes"]


@pytest.mark.slow  # ~22 s: trains three rows; the default suite reads the full rows back instead (above)
def test_lm_quick(lm):
    rc, out, report, data = lm
    assert rc == 0 and "❌" not in report
    for published in ("72.30", "72.24", "194.68 MB", "462x"):
        assert published in report
    assert "no local clipping" in report
    rows = data["data"]["rows"]
    dense_per_step = 4 * sum(_params("lstm", "ptb", tie_weights=True))  # the paper ties encoder and decoder
    for row in rows.values():
        assert row["dense_bytes"] == dense_per_step * row["steps"]
    assert rows["dense"]["bytes_sent"] == rows["dense"]["dense_bytes"]
    assert rows["dgc"]["bytes_sent"] == rows["dgc_noclip"]["bytes_sent"]  # clipping changes values, not sizes
    assert rows["dgc"]["test_perplexity"] != rows["dgc_noclip"]["test_perplexity"]
    assert (out / "lm-quick.png").read_bytes()[:8] == PNG


# ---------------------------------------------------------------- compare


@pytest.fixture(scope="module")
def compare(tmp_path_factory):
    need_datasets("mnist", "shakespeare")
    return quick_study("compare", tmp_path_factory)


def test_compare_quick_covers_every_compressor(compare):
    import gradcomp

    rc, out, report, data = compare
    assert rc == 0 and "❌" not in report
    assert "94.3 %, 1023 MB" in report and "94.4 %, 8 MB" in report
    for task in ("image", "language"):
        # every method; "sampled-topk" is DGC's selection alone, trained in the "dgc" row
        assert set(data["data"]["rows"][task]) == set(gradcomp.available()) - {"sampled-topk"}
        assert (out / f"compare-quick-{task}.png").read_bytes()[:8] == PNG


@pytest.mark.parametrize("task,model,dataset,options", [
    ("image", "mlp", "mnist", {}), ("language", "lstm", "shakespeare", {"hidden": 128, "layers": 1})])
def test_compare_quick_bytes_match_the_formulas(compare, task, model, dataset, options):
    *_, data = compare
    rows = data["data"]["rows"][task]
    sizes = _params(model, dataset, **options)
    steps = rows["none"]["steps"]
    assert all(r["steps"] == steps for r in rows.values())  # matched steps
    assert rows["none"]["bytes_sent"] == 4 * sum(sizes) * steps
    assert rows["fp16"]["bytes_sent"] == 2 * sum(sizes) * steps
    # top 1 % of every tensor: ceil(n / 100) fp32 values and int32 indices
    assert rows["topk"]["bytes_sent"] == sum(math.ceil(n / 100) * 8 for n in sizes) * steps


# ---------------------------------------------------------------- dga


@pytest.fixture(scope="module")
def dga(tmp_path_factory):
    need_datasets("fashion-mnist", "shakespeare")
    return quick_study("dga", tmp_path_factory)


def test_dga_quick_rows_bytes_and_speed(dga):
    rc, out, report, data = dga
    assert rc == 0 and "❌" not in report
    assert "88.7 %" in report and "89.2 %" in report and "emulated" in report
    rows = data["data"]["rows"]
    for task, model, dataset, opts in (("image", "mlp", "fashion-mnist", {}),
                                       ("language", "lstm", "shakespeare", {"hidden": 128, "layers": 1})):
        dense = 4 * sum(p.numel() for p in build_model(model, dataset, **opts).parameters())
        for partition in ("iid", "skewed"):
            r = {k.split("/")[2]: v for k, v in rows.items() if k.startswith(f"{task}/{partition}/")}
            assert set(r) == {"sync", "dga5", "dga5_nc", "fedavg5", "dga_k5_d5"}
            steps = r["sync"]["steps"]
            for key in ("sync", "dga5"):  # every step averages the dense gradient
                assert r[key]["bytes_sent"] == dense * steps
            for key in ("fedavg5", "dga_k5_d5"):  # the weights, every 5 steps
                assert r[key]["bytes_sent"] == dense * (steps // 5)
            if task == "language":  # next-character accuracy, a fraction
                assert all(0 < v["test_token_accuracy"] < 1 for v in r.values() if "diverged" not in v)
    seconds = data["data"]["seconds"]
    for task in ("image", "language"):
        t = seconds[task]
        assert t["dga-0-0-40"] >= 0.040  # a synchronous step waits for its average: at least the latency
        assert t["dga-5-0-40"] < t["dga-0-0-40"]
        assert t["fedavg-5-5-40"] < t["fedavg-5-0-40"]  # the delayed rounds hide the latency FedAvg pays
    assert (out / "dga-quick.png").read_bytes()[:8] == PNG
