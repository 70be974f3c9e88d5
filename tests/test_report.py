"""Run directory, checkpoints, plots and summaries of ``gradcomp train``."""

import functools
import json
import logging

import pytest
import torch

from gradcomp.train import report
from gradcomp.train.cost import estimate_step_time
from gradcomp.train.report import (
    compare_table,
    format_summary,
    human_bytes,
    plot_run,
    plot_runs,
)
from gradcomp.train.rundir import RunDir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class NotAllowed:
    """A class torch.load(weights_only=True) must refuse."""


def records(epochs, lm=False, ratio=400.0, per_epoch=1_000_000):
    out = []
    for e in range(1, epochs + 1):
        r = {"epoch": e, "step": 100 * e, "train_loss": 2.0 / e, "test_loss": 2.2 / e,
             "bytes_sent": per_epoch * e, "dense_bytes": int(per_epoch * ratio) * e,
             "compression_ratio": ratio, "seconds": 3.0, "time_per_step": 0.03}
        if lm:
            r["test_perplexity"] = 300.0 / e
        else:
            r["test_accuracy"] = 0.5 + 0.05 * e
        out.append(r)
    return out


def make_run(path, config, recs, summary=None):
    rd = RunDir.create(path)
    rd.write_config(config)
    for r in recs:
        rd.append_metrics(r)
    if summary is not None:
        rd.write_summary(summary)
    return rd


# ---------------------------------------------------------------- run directory

def test_config_metrics_summary_round_trip(tmp_path):
    rd = RunDir.create(tmp_path / "run")
    config = {"method": "dgc", "method_options": {"density": 0.001}, "workers": 4, "lr": 0.1, "tags": ["a"]}
    rd.write_config(config)
    assert rd.read_config() == config
    assert rd.read_metrics() == []
    recs = records(3)
    for r in recs:
        rd.append_metrics(r)
    assert rd.read_metrics() == recs
    # numpy / torch scalars are stored as plain numbers
    rd.append_metrics({"epoch": 4, "train_loss": torch.tensor(0.25), "step": torch.tensor(400)})
    assert rd.read_metrics()[-1] == {"epoch": 4, "train_loss": 0.25, "step": 400}
    summary = {"dataset": "cifar10", "bytes_sent": 123, "test_accuracy": 0.9}
    rd.write_summary(summary)
    assert rd.read_summary() == summary
    with pytest.raises(TypeError, match="config"):
        rd.write_config({"bad": object()})
    assert rd.read_config() == config  # the failed write left the old file
    assert sorted(p.name for p in rd.path.iterdir()) == ["config.json", "metrics.jsonl", "summary.json"]


def test_create_refuses_non_empty_dir(tmp_path):
    path = tmp_path / "run"
    RunDir.create(path)  # empty or missing: fine
    RunDir.create(path)
    (path / "config.json").write_text("{}")
    (path / ".checkpoint.pt.abc123.tmp").write_bytes(b"x")
    RunDir.create(path)  # a run that failed before its first checkpoint: started again
    for name in ("checkpoint.pt", "notes.txt"):  # a checkpoint, or a file that is not the run's: kept
        (path / name).write_text("x")
        with pytest.raises(FileExistsError, match=str(path)):
            RunDir.create(path)
        assert RunDir.create(path, exist_ok=True).path == path
        (path / name).unlink()
    assert RunDir(path).remove_temporaries() == [".checkpoint.pt.abc123.tmp"]
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]


def test_truncated_last_metrics_line_is_ignored(tmp_path, caplog):
    rd = RunDir.create(tmp_path / "run")
    recs = records(3)
    for r in recs:
        rd.append_metrics(r)
    with open(rd.metrics_path, "ab") as f:  # a crash in the middle of the fourth append
        f.write(json.dumps(records(4)[-1]).encode()[:25])
    with caplog.at_level(logging.WARNING, logger=report.__name__):
        assert rd.read_metrics() == recs
    assert "last line" in caplog.text
    # the next append cuts the partial line off instead of gluing onto it
    rd.append_metrics(records(4)[-1])
    assert rd.read_metrics() == records(4)
    # zeros at the end of the file (a power loss after the size grew) are dropped the same way
    with open(rd.metrics_path, "ab") as f:
        f.write(b"\0" * 100 + b"\n")
    assert rd.read_metrics() == records(4)
    rd.append_metrics(records(5)[-1])
    assert rd.read_metrics() == records(5)
    # a complete record that only lost its newline is kept
    rd.metrics_path.write_bytes(rd.metrics_path.read_bytes()[:-1])
    assert rd.read_metrics() == records(5)
    rd.append_metrics(records(6)[-1])
    assert rd.read_metrics() == records(6)


def test_corrupt_middle_metrics_line_raises(tmp_path):
    rd = RunDir.create(tmp_path / "run")
    rd.metrics_path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        rd.read_metrics()


def test_truncate_metrics(tmp_path):
    rd = RunDir.create(tmp_path / "run")
    for r in records(5):
        rd.append_metrics(r)
    with open(rd.metrics_path, "ab") as f:
        f.write(b'{"epoch": 6, "tra')
    assert rd.truncate_metrics(3) == 2
    assert rd.read_metrics() == records(3)
    assert rd.metrics_path.read_bytes().endswith(b"\n")
    assert rd.truncate_metrics(3) == 0
    assert rd.truncate_metrics(0) == 3
    assert rd.read_metrics() == []
    assert [p.name for p in rd.path.iterdir()] == ["metrics.jsonl"]  # no temporary files left


# ---------------------------------------------------------------- checkpoints

def state(seed):
    g = torch.Generator().manual_seed(seed)
    return {"epoch": seed, "model": {"w": torch.randn(64, 64, generator=g), "b": torch.zeros(64)},
            "rng": torch.get_rng_state(), "note": "plain values only", "lrs": [0.1, 0.01]}


def assert_state_equal(a, b):
    assert a.keys() == b.keys()
    assert a["epoch"] == b["epoch"] and a["note"] == b["note"] and a["lrs"] == b["lrs"]
    assert torch.equal(a["model"]["w"], b["model"]["w"])
    assert torch.equal(a["rng"], b["rng"])


def test_checkpoint_round_trip_uses_weights_only(tmp_path, monkeypatch):
    rd = RunDir.create(tmp_path / "run")
    assert not rd.has_checkpoint()
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        rd.load_checkpoint()
    rd.save_checkpoint(state(1))
    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    assert_state_equal(rd.load_checkpoint(), state(1))
    assert seen["weights_only"] is True
    # and independently of our loader
    monkeypatch.setattr(torch, "load", real_load)
    assert_state_equal(torch.load(rd.checkpoint_path, weights_only=True), state(1))


def test_crash_mid_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    rd = RunDir.create(tmp_path / "run")
    rd.save_checkpoint(state(1))
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        import io
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        rd.save_checkpoint(state(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert_state_equal(rd.load_checkpoint(), state(1))
    assert [p.name for p in rd.path.iterdir()] == ["checkpoint.pt"]  # temporary file removed
    rd.save_checkpoint(state(2))
    assert_state_equal(rd.load_checkpoint(), state(2))


@pytest.mark.parametrize("keep", [0, 0.02, 0.5, 0.98])
def test_truncated_checkpoint_raises_value_error_naming_file(tmp_path, keep):
    rd = RunDir.create(tmp_path / "run")
    rd.save_checkpoint(state(1))
    data = rd.checkpoint_path.read_bytes()
    rd.checkpoint_path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="checkpoint.pt") as info:
        rd.load_checkpoint()
    assert "truncated or corrupt" in str(info.value)
    assert info.value.__cause__ is not None


def test_checkpoint_with_arbitrary_objects_is_refused(tmp_path):
    rd = RunDir.create(tmp_path / "run")
    rd.save_checkpoint({"epoch": 1, "thing": NotAllowed()})
    with pytest.raises(ValueError, match="weights_only"):
        rd.load_checkpoint()


# ---------------------------------------------------------------- numbers and text

def test_estimate_step_time_hand_computed():
    # 1 Gbit/s = 1.25e8 bytes/s
    # ring all-reduce, 4 workers, 1 MB: 2*3/4 * 1e6 = 1.5e6 bytes -> 12 ms
    assert estimate_step_time(0.05, 1e6, 4, 1.0, "allreduce") == pytest.approx(0.062)
    # all-gather, 4 workers, 1 MB: 3 * 1e6 bytes -> 24 ms
    assert estimate_step_time(0.05, 1e6, 4, 1.0, "allgather") == pytest.approx(0.074)
    # 10 Gbit/s, 8 workers, 10 MB all-reduce: 2*7/8 * 1e7 = 1.75e7 bytes / 1.25e9 -> 14 ms
    assert estimate_step_time(0.0, 1e7, 8, 10.0, "allreduce") == pytest.approx(0.014)
    # one worker communicates nothing
    assert estimate_step_time(0.05, 1e9, 1, 1.0, "allgather") == pytest.approx(0.05)
    # latency: 2(N-1) messages for all-reduce, N-1 for all-gather
    assert estimate_step_time(0.0, 0, 4, 1.0, "allreduce", latency_s=1e-3) == pytest.approx(6e-3)
    assert estimate_step_time(0.0, 0, 4, 1.0, "allgather", latency_s=1e-3) == pytest.approx(3e-3)
    for kwargs, field in [({"workers": 0}, "workers"), ({"link_gbps": 0}, "link_gbps"),
                          ({"collective": "broadcast"}, "collective"), ({"compute_s": -1}, "compute_s")]:
        args = {"compute_s": 0.1, "bytes_per_step": 1e6, "workers": 4, "link_gbps": 1.0,
                "collective": "allreduce"} | kwargs
        with pytest.raises(ValueError, match=field):
            estimate_step_time(**args)


def test_human_bytes():
    assert human_bytes(0) == "0 B"
    assert human_bytes(999) == "999 B"
    assert human_bytes(999.4) == "999 B" and human_bytes(999.6) == "1.00 kB"  # no "1000 B"
    assert human_bytes(1000) == "1.00 kB"
    assert human_bytes(3_420_000) == "3.42 MB"
    assert human_bytes(12_345_678) == "12.3 MB"
    assert human_bytes(412_300_000) == "412 MB"
    assert human_bytes(999_700) == "1.00 MB"  # rounds up into the next unit, not "1000 kB"
    assert human_bytes(1.41e9) == "1.41 GB"
    assert human_bytes(-2500) == "-2.50 kB"


SUMMARY = {
    "dataset": "cifar10", "model": "resnet20", "method": "dgc",
    "method_options": {"density": 0.001, "momentum": 0.9}, "workers": 4, "epochs": 10, "steps": 1000,
    "test_accuracy": 0.9123, "bytes_sent": 3_420_000, "dense_bytes": 1_410_000_000,
    "compression_ratio": 412.28, "time_per_step": 0.0521, "collective": "allgather",
}


def test_format_summary_contains_key_figures():
    text = format_summary(SUMMARY)
    for needle in ["cifar10", "resnet20", "dgc", "density=0.001", "momentum=0.9", "workers", "4",
                   "91.23 %", "3.42 MB", "1.41 GB", "412.3x", "52.1 ms", "1 Gbit/s", "10 Gbit/s"]:
        assert needle in text, needle
    # bytes per step 3420 per worker, all-gather over 4 workers on 1 Gbit/s:
    # 3 * 3420 / 1.25e8 = 0.082 ms -> 52.2 ms; dense: 2*3/4 * 1.41e6 / 1.25e8 = 16.92 ms -> 69.0 ms
    expected = estimate_step_time(0.0521, 3420, 4, 1.0, "allgather")
    assert f"{expected * 1e3:.1f} ms" in text
    assert "52.2 ms" in text and "69.0 ms" in text
    lm = dict(SUMMARY, test_perplexity=85.37, collective=None, dataset="wikitext2")
    del lm["test_accuracy"]
    text = format_summary(lm, link_gbps=25)
    assert "85.37" in text and "%" not in text and "not estimated" in text
    assert format_summary({}).startswith("gradcomp run summary")  # missing keys never fail


# ---------------------------------------------------------------- plots and tables

@pytest.fixture
def three_runs(tmp_path):
    dense = make_run(tmp_path / "dense", {"method": "none", "dataset": "cifar10", "workers": 4},
                     records(6, ratio=1.0, per_epoch=400_000_000),
                     summary=dict(SUMMARY, method="none", method_options={}, bytes_sent=2.4e9,
                                  dense_bytes=2.4e9, compression_ratio=1.0, test_accuracy=0.915))
    dgc = make_run(tmp_path / "dgc", {"method": "dgc", "method_options": {"density": 0.001},
                                      "dataset": "cifar10", "workers": 4}, records(6))
    lm = make_run(tmp_path / "lm", {"label": "LSTM + DGC", "method": "dgc", "dataset": "wikitext2"},
                  records(1, lm=True))
    return [dense, dgc, lm]


def check_png(path, monkeypatch_calls):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    import matplotlib.image
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert monkeypatch_calls, "the figure was not drawn by the Agg canvas"


@pytest.fixture
def agg_calls(monkeypatch):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    calls = []
    real = FigureCanvasAgg.print_png

    @functools.wraps(real)  # matplotlib passes only the keywords print_png's signature accepts
    def spy(self, *args, **kwargs):
        calls.append(type(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FigureCanvasAgg, "print_png", spy)
    return calls


def test_plot_one_run(tmp_path, agg_calls):
    rd = make_run(tmp_path / "one", {"method": "dgc", "method_options": {"density": 0.001}}, records(1))
    out = plot_run(rd)
    assert out == rd.curves_path
    check_png(out, agg_calls)
    assert all(c.__name__ == "FigureCanvasAgg" for c in agg_calls)


def test_plot_three_runs_with_lm_and_missing_metric(tmp_path, three_runs, agg_calls):
    # the dgc run has no test accuracy in its second record: that point is skipped, not an error
    recs = three_runs[1].read_metrics()
    del recs[1]["test_accuracy"]
    three_runs[1].truncate_metrics(0)
    for r in recs:
        three_runs[1].append_metrics(r)
    out = plot_runs(three_runs, tmp_path / "figs" / "compare.png")
    check_png(out, agg_calls)
    assert report.run_label(three_runs[0]) == "none"
    assert report.run_label(three_runs[1]) == "dgc (density=0.001)"
    assert report.run_label(three_runs[2]) == "LSTM + DGC"
    assert report.run_label(RunDir.create(tmp_path / "bare")) == "bare"


def test_compare_table(three_runs):
    table = compare_table(three_runs)
    lines = table.splitlines()
    assert lines[0].startswith("| run | method | test acc. / ppl | MB / worker | ratio | time / step |")
    assert len([ln for ln in lines if ln.startswith("|")]) == 2 + 3
    assert "91.50 %" in table and "| 2400 |" in table and "1.0x" in table and "52.1 ms" in table
    assert "| dgc * | dgc (density=0.001) |" in table and "| 6.00 |" in table and "400.0x" in table
    assert "| LSTM + DGC * | dgc |" in table and "| dense | none |" in table and "ppl 300.00" in table
    assert "unfinished" in table
    # the step on the run's link, estimated with the measured step as compute: the dense summary all-gathers
    # 2.4 MB a step among 4 workers, 3 x 2.4 MB over 125 MB/s = 57.6 ms on top of its 52.1 ms
    assert lines[0].endswith("| step on 1 Gbit/s (est.) |") and lines[2].endswith("| 52.1 ms | 109.7 ms |")
    assert all(line.endswith("| - |") for line in lines[3:5])  # unfinished runs: no collective recorded
