"""`gradcomp reproduce`: the quick variants run through the CLI, their reports, tables and assertions.

The full variants are not run here (minutes to half an hour); their reports live in results/.
"""

import dataclasses
import json
import math

import pytest
import torch

from gradcomp.cli import main
from gradcomp.train.models import resnet50
from gradcomp_studies.reproduce import common
from gradcomp_studies.reproduce.common import Check, Result, Study, StudySkipped, markdown_table
from helpers import compact_nbytes

PNG = b"\x89PNG\r\n\x1a\n"


def _run_cli(args, capsys):
    rc = main(args)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ---------------------------------------------------------------- ratio (no data needed)


@pytest.fixture(scope="module")
def ratio_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ratio")
    rc = main(["reproduce", "ratio", "--out", str(out), "--no-progress"])
    return rc, out


def test_ratio_quick_passes_and_writes_its_report(ratio_run):
    rc, out = ratio_run
    assert rc == 0
    report = (out / "ratio-quick.md").read_text()
    assert f"gradcomp reproduce ratio --out {out}" in report  # the command that produced it
    for field in ("| seed | 0 |", "| date |", "| wall time |", "| machine |", "torch 2.", "CPUs"):
        assert field in report, field
    # our figures beside the published ones
    assert "ResNet-50" in report and "PTB LSTM-1500" in report
    assert "97.49" in report and "277x" in report and "194.68" in report and "462x" in report
    assert "51,034,000" in report and "tied" in report
    assert "❌" not in report and "✅" in report
    assert (out / "ratio-quick.png").read_bytes()[:8] == PNG
    assert "![ratio-quick](ratio-quick.png)" in report


def test_ratio_counts_match_independent_formulas(ratio_run):
    _, out = ratio_run
    data = json.loads((out / "ratio-quick.json").read_text())
    assert all(c["passed"] for c in data["checks"])
    models = data["data"]["models"]
    assert set(models) == {"resnet50", "ptb_lstm_1500"}
    assert set(models["resnet50"]["compressors"]) == {"none", "dgc-plain", "dgc", "dgc-all", "dgc-all32", "topk",
                                                      "onebit", "powersgd"}

    # DGC on ResNet-50, recomputed here from the model itself: sparsified tensors send k = ceil(0.001 n) entries,
    # the dense ones (1-D or < 1024 entries) 4 bytes per entry.  Paper's format: fp32 value + int32 index.
    # Compact: see helpers.compact_nbytes.
    params = [p for p in resnet50().parameters()]
    dense = sum(4 * p.numel() for p in params)

    def compact(n):
        return compact_nbytes(n, math.ceil(n / 1000))

    matrix = [p.dim() > 1 and p.numel() >= 1024 for p in params]
    want = {
        "dgc-plain": sum(math.ceil(p.numel() / 1000) * 8 if m else 4 * p.numel() for p, m in zip(params, matrix)),
        "dgc": sum(compact(p.numel()) if m else 4 * p.numel() for p, m in zip(params, matrix)),
        "dgc-all": sum(compact(p.numel()) for p in params),
        "dgc-all32": sum(compact_nbytes(p.numel(), min(p.numel(), max(32, math.ceil(p.numel() / 1000))))
                         for p in params),
    }
    entry = models["resnet50"]
    assert entry["parameters"] == 25_557_032 and entry["dense_bytes"] == dense
    for key, nbytes in want.items():
        assert entry["compressors"][key]["bytes"] == nbytes, key
        assert entry["compressors"][key]["ratio"] == pytest.approx(dense / nbytes)
    assert dense / want["dgc-all"] > 1000 and dense / want["dgc-all32"] > 1000  # issue 5's goal for ResNet-50
    assert entry["compressors"]["none"]["bytes"] == dense and entry["compressors"]["none"]["ratio"] == 1.0
    assert entry["compressors"]["topk"]["bytes"] == sum(math.ceil(p.numel() / 1000) * 8 for p in params)
    # the paper's LSTM, tied as it trains it: 51,034,000 parameters, its 194.68 MiB
    assert models["ptb_lstm_1500"]["parameters"] == 51_034_000
    for model in models.values():
        for c in model["compressors"].values():
            assert c["bytes"] == c["expected_bytes"]


# ---------------------------------------------------------------- masking (MNIST)


@pytest.fixture(scope="module")
def masking_run(tmp_path_factory):
    from gradcomp.train.data import DatasetNotFoundError, load_dataset

    try:
        load_dataset("mnist", limit_train=1)
    except DatasetNotFoundError as error:
        pytest.skip(f"MNIST not available: {error}")
    out = tmp_path_factory.mktemp("masking")
    rc = main(["reproduce", "masking", "--out", str(out), "--no-progress"])
    return rc, out


# the masking study's quick run takes 14 s on 2 cores: slow-marked to keep the default suite under 10 minutes
@pytest.mark.slow
def test_masking_quick_passes_and_writes_its_report(masking_run):
    rc, out = masking_run
    assert rc == 0
    report = (out / "masking-quick.md").read_text()
    assert f"gradcomp reproduce masking --out {out}" in report
    assert "| seed | 0 |" in report and "| wall time |" in report
    assert "published 1 node" in report and "0.41" in report and "0.24" in report
    assert "❌" not in report
    assert (out / "masking-quick.png").read_bytes()[:8] == PNG


@pytest.mark.slow
def test_masking_quick_shape(masking_run):
    _, out = masking_run
    data = json.loads((out / "masking-quick.json").read_text())
    rows = {(r["kind"], r["keep"], r["workers"]): r for r in data["data"]["rows"]}
    dense = rows[("drop", 100, 1)]
    assert dense["accuracy"] > 0.85  # far above chance (0.1)
    assert rows[("drop", 0, 1)]["accuracy"] < 0.3  # keep 0 %: nothing applied, the model stays at its init
    assert rows[("drop", 0, 1)]["bytes_sent"] == 0
    assert rows[("dgc", 0.1, 2)]["accuracy"] > rows[("drop", 0.1, 2)]["accuracy"] + 0.03
    # bytes are the payloads': at 0.1 % plain dropping sends ~500x less than dense
    assert 400 < rows[("drop", 0.1, 1)]["ratio"] < 600
    assert dense["ratio"] == 1.0
    assert all(c["passed"] for c in data["checks"])


# ---------------------------------------------------------------- the command itself


def test_help_lists_the_registered_studies(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--full" in out and "--out DIR" in out
    tables = out.split("tables:", 1)[1]
    assert "ratio" in tables and "masking" in tables
    assert tables.index("masking") < tables.index("ratio")  # in the order


def test_list(capsys):
    rc, out, _ = _run_cli(["reproduce", "--list"], capsys)
    assert rc == 0
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert names.index("masking") < names.index("ablation") < names.index("ratio")  # the order


def test_unknown_table_is_a_clear_error(capsys, tmp_path):
    rc, _, err = _run_cli(["reproduce", "nope", "--out", str(tmp_path)], capsys)
    assert rc == 2
    assert "unknown table 'nope'" in err and "masking" in err and "ratio" in err
    assert not list(tmp_path.iterdir())


def test_no_table_is_an_error(capsys):
    rc, out, err = _run_cli(["reproduce"], capsys)
    assert rc == 2 and "name a TABLE" in err and "ratio" in out


def _fake(monkeypatch, name, run):
    monkeypatch.setitem(common._STUDIES, ("reproduce", name), Study(name, "a test study", run, threads=1))


def test_failed_check_exits_1_and_is_reported(monkeypatch, capsys, tmp_path):
    threads = torch.get_num_threads()
    seen = {}

    def run(ctx):
        seen["threads"] = torch.get_num_threads()
        return Result("Fake", "our table", "## body\n\n" + markdown_table(["a", "b"], [["x", 1]]),
                      checks=[Check("holds", True, "1"), Check("fails", False, "2")], data={"x": 1})

    _fake(monkeypatch, "fake", run)
    rc, out, _ = _run_cli(["reproduce", "fake", "--full", "--out", str(tmp_path), "--seed", "3"], capsys)
    assert rc == 1
    assert seen["threads"] == 1 and torch.get_num_threads() == threads  # the study's threads, then restored
    report = (tmp_path / "fake.md").read_text()
    assert f"gradcomp reproduce fake --full --out {tmp_path} --seed 3" in report
    assert "| seed | 3 |" in report and "| variant | full |" in report
    assert "❌ FAILED fails — 2" in report and "✅ holds — 1" in report
    assert "| a   |   b |" in report
    assert json.loads((tmp_path / "fake.json").read_text())["data"] == {"x": 1}
    assert "our table" in out and "1 of 2 checks FAILED" in out


def test_skipped_study_says_why(monkeypatch, capsys, tmp_path):
    def run(ctx):
        raise StudySkipped("MNIST was not found in /nowhere")

    _fake(monkeypatch, "needs-data", run)
    rc, _, err = _run_cli(["reproduce", "needs-data", "--out", str(tmp_path)], capsys)
    assert rc == 0
    assert "skipped" in err and "/nowhere" in err
    assert not (tmp_path / "needs-data-quick.md").exists()


def _seeded_draw(seed):
    torch.manual_seed(seed)
    return torch.randn(3).tolist(), torch.get_num_threads()


def test_map_runs_gives_the_same_results_in_parallel_processes(tmp_path):
    from gradcomp_studies.reproduce.common import Context, map_runs

    calls = [(s,) for s in (3, 1, 4, 1, 5)]
    lines = []
    sequential = map_runs(Context(full=False, out_dir=tmp_path, progress=False, echo=lines.append), _seeded_draw,
                          calls, describe=str)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        parallel = map_runs(Context(full=False, out_dir=tmp_path, progress=False, jobs=2, echo=lines.append),
                            _seeded_draw, calls, describe=str)
    finally:
        torch.set_num_threads(threads)
    assert [r[0] for r in parallel] == [r[0] for r in sequential]  # in call order, bit for bit
    assert [r[0] for r in sequential] == [_seeded_draw(s)[0] for (s,) in calls]
    assert {r[1] for r in parallel} == {1}  # the workers run with the parent's thread count
    assert len(lines) == 10  # one line per finished run


def test_train_runs_reports_a_diverged_run_and_goes_on(tmp_path):
    from gradcomp.train.config import Data, Exchange, Launch, Optim, Output, Schedule, TrainConfig
    from gradcomp_studies.reproduce.common import Context, train_runs

    common = TrainConfig(data=Data(limit_train=256), exchange=Exchange(method="none"), schedule=Schedule(epochs=2),
                         launch=Launch(workers=2, simulate=True))
    lines = []
    ctx = Context(full=False, out_dir=tmp_path, progress=False, echo=lines.append)
    runs = train_runs(ctx, [common.replace(optim=Optim(lr=1e30), output=Output(label="too fast")), common],
                      tmp_path / "runs")
    (bad, _), (good, good_dir) = runs
    assert bad["diverged_in_epoch"] == 1 and "non-finite" in bad["diverged"] and bad["label"] == "too fast"
    assert "diverged" not in good and math.isfinite(good["test_loss"]) and good_dir == tmp_path / "runs" / "1-none"
    assert "too fast: diverged in epoch 1" in lines[0] and "test accuracy" in lines[1]


def test_a_study_stopped_part_way_resumes_from_its_runs_folder(tmp_path):
    """--runs keeps the runs; the same study run again continues each from its checkpoint (one of them
    stopped after its first epoch here) and ends where an uninterrupted run ends."""
    from gradcomp.train.config import Data, Exchange, Launch, Output, Schedule, TrainConfig
    from gradcomp.train.rundir import RunDir
    from gradcomp_studies.reproduce.common import Context, train_runs

    two = TrainConfig(data=Data(limit_train=512), exchange=Exchange(method="dgc", options={"warmup_epochs": 2}),
                      schedule=Schedule(epochs=2), launch=Launch(workers=2, simulate=True),
                      output=Output(progress=False))
    one = two.replace(schedule={"epochs": 1})
    ctx = Context(full=False, out_dir=tmp_path, progress=False, echo=lambda _: None, runs_dir=tmp_path / "keep")
    with ctx.runs_folder("table") as folder:
        assert folder == tmp_path / "keep" / "table"
        train_runs(ctx, [one], folder)  # "stopped" after epoch 1
        [(resumed, run_dir)] = train_runs(ctx, [two], folder)
    [(straight, _)] = train_runs(Context(full=False, out_dir=tmp_path, progress=False, echo=lambda _: None),
                                 [two], tmp_path / "straight")
    for key in ("test_loss", "test_accuracy", "bytes_sent", "steps"):
        assert resumed[key] == straight[key], key
    assert [m["epoch"] for m in RunDir(run_dir).read_metrics()] == [1, 2]
    [(again, _)] = train_runs(ctx, [two], tmp_path / "keep" / "table")  # finished
    assert again["test_loss"] == straight["test_loss"]
    with pytest.raises(ValueError, match=r"0-dgc holds a run with other settings \(lr\)"):
        train_runs(ctx, [two.replace(optim={"lr": 0.5})], tmp_path / "keep" / "table")
    stopped = tmp_path / "keep" / "other" / "0-dgc"  # a kept run that stopped before its first checkpoint
    stopped.mkdir(parents=True)
    (stopped / "config.json").write_text("{}")
    [(fresh, _)] = train_runs(ctx, [two], stopped.parent)
    assert fresh["test_loss"] == straight["test_loss"]
    with Context(full=False, out_dir=tmp_path).runs_folder("table") as temporary:
        assert temporary.is_dir() and tmp_path not in temporary.parents
    assert not temporary.exists()


def test_a_finished_run_is_read_back_without_its_checkpoint(tmp_path, monkeypatch):
    """A study's finished rows can be kept without their checkpoints (config, metrics, summary): they are read
    back, not trained again; a diverged row is kept as diverged; a kept run cannot be extended without its
    checkpoint, and a run from other settings is refused."""
    from gradcomp.train.config import Data, Exchange, Launch, Optim, Schedule, TrainConfig
    from gradcomp.train.rundir import RunDir
    from gradcomp_studies.reproduce.common import Context, train_runs

    one = TrainConfig(data=Data(limit_train=256), exchange=Exchange(method="none"), schedule=Schedule(epochs=1),
                      launch=Launch(workers=2, simulate=True), optim=Optim(lr=0.1))
    ctx = Context(full=False, out_dir=tmp_path, progress=False, echo=lambda _: None)
    configs = [one, one.replace(optim={"lr": 1e30})]
    first = train_runs(ctx, configs, tmp_path / "runs")
    for _, run_dir in first:
        for path in run_dir.glob("checkpoint*.pt"):
            path.unlink()
    monkeypatch.setattr("gradcomp.train.loop.run", lambda *args, **kwargs: pytest.fail("trained again"))
    again = train_runs(ctx, configs, tmp_path / "runs")
    assert [s for s, _ in again] == [s for s, _ in first] and "diverged" in again[1][0]
    assert not any(RunDir(d).has_checkpoint() for _, d in again)
    with pytest.raises(ValueError, match=r"0-none holds a run finished after 1 epochs without its checkpoint"):
        train_runs(ctx, [one.replace(schedule={"epochs": 2})], tmp_path / "runs")
    with pytest.raises(ValueError, match=r"0-none holds a run with other settings \(lr\)"):
        train_runs(ctx, [one.replace(optim={"lr": 0.2})], tmp_path / "runs")



def test_ablation_keeps_each_finished_row_and_reads_it_back(tmp_path, monkeypatch):
    """--runs for the ablation: a row trained once is read back (same numbers, no training) while its variant
    (other rows aside) and seed match; other settings or a damaged file train it again."""
    from gradcomp_studies.reproduce import ablation

    pytest.importorskip("sklearn")
    tiny = ablation.Variant(datasets=("digits",), limit_train=128, epochs=1, rows=("naive",), workers=2,
                            batch_per_worker=16)
    first = ablation._train_kept("naive", "digits", tiny, 0, str(tmp_path))
    trained = []
    real_train = ablation._train
    monkeypatch.setattr(ablation, "_train", lambda *args: trained.append(args) or real_train(*args))
    assert ablation._train_kept("naive", "digits", tiny, 0, str(tmp_path)) == first and not trained
    more_rows = dataclasses.replace(tiny, rows=("dense", "naive", "dgc"), seed_rows=("dense", "naive"), seeds=3)
    assert ablation._train_kept("naive", "digits", more_rows, 0, str(tmp_path)) == first and not trained  # kept
    assert ablation._train_kept("naive", "digits", dataclasses.replace(tiny, lr=0.05), 0, str(tmp_path)) != first
    assert len(trained) == 1  # another learning rate trains again
    trained.clear()
    (tmp_path / "digits-naive-seed0.json").unlink()
    other = ablation._train_kept("naive", "digits", tiny, 1, str(tmp_path))  # another seed: trained, kept
    assert len(trained) == 1 and other.history != first.history and (first.seed, other.seed) == (0, 1)
    (tmp_path / "digits-naive-seed1.json").write_text('{"settings": ')  # cut short
    assert ablation._train_kept("naive", "digits", tiny, 1, str(tmp_path)).history == other.history
    assert len(trained) == 2
    kept = json.loads((tmp_path / "digits-naive-seed1.json").read_text())
    assert kept["settings"]["optimizer"] == {"momentum": 0.0, "weight_decay": pytest.approx(1e-3)}  # DGC's
    del kept["settings"]["optimizer"]  # a run from before the optimizer was recorded: trained again
    (tmp_path / "digits-naive-seed1.json").write_text(json.dumps(kept))
    ablation._train_kept("naive", "digits", tiny, 1, str(tmp_path))
    assert len(trained) == 3


def test_ablation_learning_rate_drops_10x_at_the_decay_points():
    """The ablation's schedule: the same steps as a constant rate before the drop, other steps after it; a drop
    at the very end of training changes nothing; a drop at the start equals training at a tenth of the rate."""
    from gradcomp_studies.reproduce import ablation

    pytest.importorskip("sklearn")
    flat = ablation.Variant(datasets=("digits",), limit_train=256, epochs=2, rows=("dense",), workers=2,
                            batch_per_worker=16, decay_at=())
    constant = ablation._train("dense", "digits", flat, 0)
    decayed = ablation._train("dense", "digits", dataclasses.replace(flat, decay_at=(0.5,)), 0)
    assert decayed.history[0] == constant.history[0] and decayed.history[1] != constant.history[1]
    assert ablation._train("dense", "digits", dataclasses.replace(flat, decay_at=(1.0,)), 0).history == \
        constant.history
    tenth = ablation._train("dense", "digits", dataclasses.replace(flat, lr=flat.lr / 10), 0)
    at_start = ablation._train("dense", "digits", dataclasses.replace(flat, decay_at=(0.0,)), 0)
    assert at_start.history == pytest.approx(tenth.history, rel=1e-6)


def test_ablation_trains_the_seed_rows_with_more_seeds_and_reports_their_means(tmp_path, monkeypatch):
    """seed_rows x seeds: those rows of the first dataset train again with the next seeds (other weights,
    other batches); the report's seed table holds each seed's accuracy and the means, recomputed here."""
    from gradcomp_studies.reproduce import ablation

    pytest.importorskip("sklearn")
    tiny = ablation.Variant(datasets=("digits",), limit_train=512, epochs=2, rows=("dense", "naive", "dgc"),
                            workers=2, batch_per_worker=16, seed_rows=("dense", "dgc"), seeds=2)
    monkeypatch.setattr(ablation, "QUICK", tiny)
    monkeypatch.setitem(ablation.NAMES, "digits", "Digits")
    main(["reproduce", "ablation", "--out", str(tmp_path), "--no-progress", "--runs", str(tmp_path / "runs")])
    data = json.loads((tmp_path / "ablation-quick.json").read_text())["data"]
    assert [r["key"] for r in data["rows"]] == ["dense", "naive", "dgc"] and {r["seed"] for r in data["rows"]} == {0}
    repeats = {(r["key"], r["seed"]): r for r in data["seed_rows"]}
    assert sorted(repeats) == [("dense", 0), ("dense", 1), ("dgc", 0), ("dgc", 1)] and data["seeds"] == [0, 1]
    for r in data["rows"]:
        if r["key"] in ("dense", "dgc"):
            assert repeats[r["key"], 0]["history"] == r["history"]  # seed 0 is the main table's row
    assert repeats["dgc", 1]["history"] != repeats["dgc", 0]["history"]
    report = (tmp_path / "ablation-quick.md").read_text()
    mean = {k: (repeats[k, 0]["accuracy"] + repeats[k, 1]["accuracy"]) / 2 for k in ("dense", "dgc")}
    assert repeats["dgc", 0]["accuracy"] != repeats["dgc", 1]["accuracy"]  # (else the mean checks nothing)
    row = next(line for line in report.splitlines() if line.startswith("| DGC (all techniques)") and "seed" not in line
               and line.count("|") == 7)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == f"{100 * mean['dgc']:.2f} %" and cells[5] == f"{100 * (mean['dgc'] - mean['dense']):+.2f}"
    assert sorted(p.name for p in (tmp_path / "runs" / "ablation").iterdir()) == \
        ["digits-dense-seed0.json", "digits-dense-seed1.json", "digits-dgc-seed0.json", "digits-dgc-seed1.json",
         "digits-naive-seed0.json"]


def test_ablation_variant_refuses_seed_rows_it_cannot_compare():
    from gradcomp_studies.reproduce import ablation

    for bad, match in ((dict(seeds=0), "seeds must be at least 1"),
                       (dict(seed_rows=("dense", "dgc_all")), r"seed_rows \['dgc_all'\] are not among"),
                       (dict(seed_rows=("dgc",), seeds=2), "need the dense row")):
        with pytest.raises(ValueError, match=match):
            ablation.Variant(datasets=("mnist",), limit_train=10, epochs=1, rows=("dense", "dgc"), **bad)
