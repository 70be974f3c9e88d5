"""The main job, `gradcomp train`, end to end: simulator, real gloo workers, torchrun, resume, reports."""

import json
import os
import shutil
import subprocess

import pytest
import torch

import gradcomp
from gradcomp.cli import main
from gradcomp.train.config import (
    Averaging,
    Data,
    Exchange,
    Launch,
    Model,
    Optim,
    Output,
    Schedule,
    TrainConfig,
)
from gradcomp.train.loop import run
from gradcomp.train.rundir import RunDir

QUIET = Output(progress=False)
#: resuming takes the run's own config.json; only the length of training (and the display) come from here
TWO_EPOCHS = TrainConfig(schedule=Schedule(epochs=2), output=QUIET)


def quick(tmp_path, name, **sections):
    """Train ``TWO_EPOCHS`` with ``sections`` (section objects) into ``tmp_path / name``; the summary."""
    cfg = TWO_EPOCHS.replace(**sections, output={"run_dir": str(tmp_path / name)})
    return run(cfg, echo=lambda _: None)


def test_simulated_run_writes_a_complete_run_directory(tmp_path):
    summary = quick(tmp_path, "sim", launch=Launch(simulate=True))
    rd = RunDir(tmp_path / "sim")
    for f in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", "curves.png"):
        assert (rd.path / f).exists(), f
    metrics = rd.read_metrics()
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert summary["bytes_sent"] == metrics[-1]["bytes_sent"] > 0
    assert summary["compression_ratio"] == pytest.approx(summary["dense_bytes"] / summary["bytes_sent"])
    assert 0 < summary["test_accuracy"] <= 1
    assert rd.read_config()["exchange"]["method"] == "dgc"  # config.json by section
    assert (rd.path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_real_workers_match_the_simulator(tmp_path):
    one = Schedule(epochs=1)
    real = quick(tmp_path, "real", launch=Launch(workers=2), schedule=one)
    sim = quick(tmp_path, "sim", launch=Launch(workers=2, simulate=True), schedule=one)
    assert real["bytes_sent"] == sim["bytes_sent"]
    assert real["test_loss"] == pytest.approx(sim["test_loss"], rel=1e-5)
    assert real["test_accuracy"] == pytest.approx(sim["test_accuracy"], abs=1 / 360)


def test_resume_continues_exactly(tmp_path):
    """At an epoch's end, simulated (real workers, stopped mid-epoch: tests/test_resume.py)."""
    # warm-up in progress at the stop
    kw = dict(launch=Launch(workers=2, simulate=True), exchange=Exchange(options={"warmup_epochs": 2}))
    full = quick(tmp_path, "full", **kw)
    quick(tmp_path, "part", schedule=Schedule(epochs=1), **kw)
    resumed = run(TWO_EPOCHS, resume=str(tmp_path / "part"), echo=lambda _: None)
    for key in ("test_loss", "test_accuracy", "bytes_sent", "steps"):
        assert resumed[key] == full[key], key
    a = RunDir(tmp_path / "full").load_checkpoint()["model"]
    b = RunDir(tmp_path / "part").load_checkpoint()["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [m["epoch"] for m in RunDir(tmp_path / "part").read_metrics()] == [1, 2]


def test_dga_resume_continues_exactly(tmp_path):
    """Delayed averaging stopped at an epoch's end (3 averages pending, every worker's model its own) and
    resumed: the same as a run that never stopped, on every worker (real workers, stopped mid-epoch:
    tests/test_resume.py)."""
    kw = dict(launch=Launch(workers=2, simulate=True), averaging=Averaging(dga_delay=3),
              exchange=Exchange(options={"warmup_epochs": 2}))
    full = quick(tmp_path, "full", **kw)
    quick(tmp_path, "part", schedule=Schedule(epochs=1), **kw)
    resumed = run(TWO_EPOCHS, resume=str(tmp_path / "part"), echo=lambda _: None)
    for key in ("test_loss", "test_accuracy", "bytes_sent", "steps"):
        assert resumed[key] == full[key], key
    a, b = (RunDir(tmp_path / name).load_checkpoint() for name in ("full", "part"))
    models = [(a["model"], b["model"]), *zip(a["simulator"]["replicas"], b["simulator"]["replicas"])]
    assert len(models) == 2  # worker 0, and worker 1's copy
    for x, y in models:
        for name in x:
            assert torch.equal(x[name], y[name]), name
    assert any(not torch.equal(models[0][0][n], models[-1][0][n]) for n in models[0][0])  # workers differ


def test_dga_real_workers_match_the_simulator(tmp_path):
    one, dga = Schedule(epochs=1), Averaging(dga_delay=2)
    real = quick(tmp_path, "real", launch=Launch(workers=2), schedule=one, averaging=dga)
    sim = quick(tmp_path, "sim", launch=Launch(workers=2, simulate=True), schedule=one, averaging=dga)
    assert real["bytes_sent"] == sim["bytes_sent"]
    assert real["test_loss"] == pytest.approx(sim["test_loss"], rel=1e-5)
    sync = quick(tmp_path, "sync", launch=Launch(workers=2, simulate=True), schedule=one)
    assert sync["test_loss"] != sim["test_loss"]


def test_dga_settings_are_checked():
    with pytest.raises(ValueError, match=r"^TrainConfig.averaging.dga_delay must be an integer >= 0, got -1$"):
        Averaging(dga_delay=-1)
    with pytest.raises(ValueError, match=r"^TrainConfig.averaging.dga_correction=False needs dga_delay$"):
        Averaging(dga_correction=False)
    with pytest.raises(ValueError, match=r"^TrainConfig.launch.emulate_latency_ms needs real processes"):
        Launch(emulate_latency_ms=10.0, simulate=True)
    with pytest.raises(ValueError, match=r"^TrainConfig.optim.clip_norm with averaging.dga_delay: only DGC clips"):
        TrainConfig(exchange=Exchange(method="topk"), optim=Optim(clip_norm=1.0), averaging=Averaging(dga_delay=2))


def test_fedavg_real_workers_match_the_simulator_and_resume_exactly(tmp_path):
    """FedAvg through the loop: the simulator's local steps and gradcomp.FedAvg on real ranks agree, and a run
    stopped between two averages (period 5 does not divide the 22 steps of an epoch) resumes exactly."""
    dense, fedavg = Exchange(method="none"), Averaging(fedavg_period=5)
    real = quick(tmp_path, "real", schedule=Schedule(epochs=1), launch=Launch(workers=2), exchange=dense,
                 averaging=fedavg)
    sim = quick(tmp_path, "sim", launch=Launch(workers=2, simulate=True), exchange=dense, averaging=fedavg)
    first = RunDir(tmp_path / "sim").read_metrics()[0]
    assert real["bytes_sent"] == first["bytes_sent"] == (22 // 5) * 4 * sum(
        p.numel() for p in gradcomp.train.models.build_model("mlp", "digits").parameters())
    assert real["test_loss"] == pytest.approx(first["test_loss"], rel=1e-5)
    quick(tmp_path, "part", schedule=Schedule(epochs=1), launch=Launch(workers=2, simulate=True), exchange=dense,
          averaging=fedavg)
    resumed = run(TWO_EPOCHS, resume=str(tmp_path / "part"), echo=lambda _: None)
    for key in ("test_loss", "test_accuracy", "bytes_sent", "steps"):
        assert resumed[key] == sim[key], key
    sync = quick(tmp_path, "sync", exchange=dense, launch=Launch(workers=2, simulate=True), schedule=Schedule(epochs=1))
    assert sync["test_loss"] != first["test_loss"]


def test_fedavg_with_delay_trains_from_the_cli_and_real_ranks_match_the_simulator(tmp_path):
    """DGA with local steps (K = 2, D = 3) through `gradcomp train`, simulated, and through the real-rank door:
    the same test loss and bytes (the weights, every 2 steps), unlike FedAvg without the delay."""
    common = ["--compressor", "none", "--workers", "2", "--epochs", "1", "--limit-train", "256", "--no-progress"]
    assert main(["train", "--simulate", "--fedavg-period", "2", "--dga-delay", "3", *common,
                 "--run-dir", str(tmp_path / "sim")]) == 0
    sim = RunDir(tmp_path / "sim").read_summary()
    cfg = TrainConfig.from_dict(RunDir(tmp_path / "sim").read_config())
    assert (cfg.averaging.fedavg_period, cfg.averaging.dga_delay, sim["steps"]) == (2, 3, 8)
    kw = dict(exchange=Exchange(method="none"), schedule=Schedule(epochs=1),
              data=Data(limit_train=256, batch_size=16))  # as the CLI
    real = quick(tmp_path, "real", launch=Launch(workers=2), averaging=Averaging(fedavg_period=2, dga_delay=3), **kw)
    assert real["bytes_sent"] == sim["bytes_sent"] == 4 * 4 * sum(
        p.numel() for p in gradcomp.train.models.build_model("mlp", "digits").parameters())
    assert real["test_loss"] == pytest.approx(sim["test_loss"], rel=1e-5)
    plain = quick(tmp_path, "plain", launch=Launch(workers=2, simulate=True), averaging=Averaging(fedavg_period=2),
                  **kw)
    assert plain["test_loss"] != sim["test_loss"]


def test_skewed_partition_gives_each_worker_its_own_classes(tmp_path):
    from gradcomp.train.data import load_dataset
    from gradcomp.train.loop import Task

    skewed = dict(exchange=Exchange(method="none"), launch=Launch(workers=4, simulate=True),
                  data=Data(partition="skewed"))
    cfg = TrainConfig(output=QUIET, **skewed)
    data = load_dataset("digits")
    task = Task(data, cfg, 4)
    seen = [set() for _ in range(4)]
    steps = 0
    for shards in task.epoch(0):
        steps += 1
        for w, _, y in shards:
            seen[w] |= set(y.tolist())
    assert steps == task.steps == (len(data.y_train) // 4) // cfg.data.batch_size
    assert all(len(s) <= 4 for s in seen) and set().union(*seen) == set(range(10))  # 10 classes over 4 workers
    summary = quick(tmp_path, "skewed", schedule=Schedule(epochs=1), **skewed)
    assert summary["steps"] == task.steps


def test_model_options_reach_the_model(tmp_path):
    summary = quick(tmp_path, "small", schedule=Schedule(epochs=1), launch=Launch(simulate=True),
                    exchange=Exchange(method="none"), model=Model(options={"hidden": [16]}))
    assert summary["dense_bytes"] // summary["steps"] == 4 * (64 * 16 + 16 + 16 * 10 + 10)


def test_a_language_model_that_blew_up_evaluates_to_infinite_perplexity_not_an_error():
    from gradcomp.train.data import load_dataset
    from gradcomp.train.loop import Task
    from gradcomp.train.models import build_model

    try:
        data = load_dataset("shakespeare", limit_train=2_000)
    except gradcomp.train.data.DatasetNotFoundError as error:
        pytest.skip(str(error))
    task = Task(data, TrainConfig(data=Data(dataset="shakespeare", limit_test=500), exchange=Exchange(method="none"),
                                  output=QUIET), 1)
    model = build_model("lstm", data, hidden=16, layers=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e4)  # logits of order 1e8: the cross-entropy is far beyond exp's range
    result = task.evaluate(model)
    assert result["test_loss"] > 709 and result["test_perplexity"] == float("inf")


def test_new_settings_are_checked():
    with pytest.raises(ValueError, match=r"^TrainConfig.averaging.fedavg_period must be an integer >= 1, got 0$"):
        Averaging(fedavg_period=0)
    with pytest.raises(ValueError, match=r"^TrainConfig.averaging.fedavg_period averages weights, dense: it takes "
                                         r"exchange.method='none', got method='dgc'$"):
        TrainConfig(exchange=Exchange(method="dgc"), averaging=Averaging(fedavg_period=5))
    with pytest.raises(ValueError, match="method='dgc'"):
        TrainConfig(exchange=Exchange(method="dgc"), averaging=Averaging(fedavg_period=5, dga_delay=2))
    with pytest.raises(ValueError, match=r"^TrainConfig.averaging.dga_correction=False with fedavg_period"):
        Averaging(fedavg_period=5, dga_delay=2, dga_correction=False)
    with pytest.raises(ValueError, match=r"^TrainConfig.data.partition must be one of iid, skewed, got 'by-class'$"):
        Data(partition="by-class")
    with pytest.raises(ValueError, match="ptb has neither"):
        Data(dataset="ptb", partition="skewed")
    with pytest.raises(ValueError, match=r"^TrainConfig.model.options: 'mlp' has no option 'width'"):
        TrainConfig(model=Model(options={"width": 3}))


def test_lr_milestones_decay_the_learning_rate_like_multisteplr(tmp_path):
    quick(tmp_path, "decay", launch=Launch(workers=2, simulate=True), optim=Optim(lr=0.2),
          schedule=Schedule(epochs=3, lr_milestones=[1, 2], lr_decay=0.5), data=Data(limit_train=256))
    lr = RunDir(tmp_path / "decay").load_checkpoint()["optimizer"]["param_groups"][0]["lr"]
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.2)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[1, 2], gamma=0.5)
    for _ in range(2):  # into the third epoch
        opt.step()
        sched.step()
    assert lr == pytest.approx(opt.param_groups[0]["lr"])
    with pytest.raises(ValueError, match=r"^TrainConfig.schedule.lr_milestones must increase strictly, got \[2, 1\]$"):
        Schedule(lr_milestones=[2, 1])
    with pytest.raises(ValueError, match=r"^TrainConfig.schedule.lr_decay must be in \(0.0, 1.0\], got 0$"):
        Schedule(lr_decay=0)


def test_weight_decay_with_dgc_decays_as_much_as_momentum_sgd(tmp_path):
    """--weight-decay means momentum SGD's: DGC, which owns momentum, gets it scaled by 1/(1 - momentum)."""
    quick(tmp_path, "dgc", exchange=Exchange(method="dgc"), launch=Launch(workers=2, simulate=True),
          schedule=Schedule(epochs=1), optim=Optim(momentum=0.9, weight_decay=1e-4), data=Data(limit_train=256))
    group = RunDir(tmp_path / "dgc").load_checkpoint()["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["weight_decay"]) == (0.0, pytest.approx(1e-3))


@pytest.mark.parametrize("method,options", [(name, {}) for name in gradcomp.available() if name != "dgc"]
                         + [("topk", {"density": 0.01}), ("powersgd", {"rank": 2})])
def test_every_method_trains(tmp_path, method, options):
    summary = quick(tmp_path, method, exchange=Exchange(method=method, options=options), schedule=Schedule(epochs=1),
                    launch=Launch(workers=2, simulate=True), data=Data(limit_train=256))
    assert summary["bytes_sent"] > 0
    assert summary["test_loss"] == summary["test_loss"]  # finite, not NaN


@pytest.mark.parametrize("dataset,model", [("mnist", "cnn"), ("mnist", "resnet"), ("ptb", "lstm"),
                                           ("shakespeare", "lstm")])
def test_real_datasets(tmp_path, dataset, model):
    from gradcomp.train.data import DatasetNotFoundError, load_dataset

    try:
        load_dataset(dataset)
    except DatasetNotFoundError as error:
        pytest.skip(str(error))
    # DGC past its warm-up: the warm-up's 25 % density would make the 4.6M-parameter PTB model's steps slow
    summary = quick(tmp_path, dataset, data=Data(dataset=dataset, limit_train=160 if dataset == "mnist" else 8_000,
                                                 limit_test=200 if dataset == "mnist" else 5000, batch_size=8, bptt=20),
                    model=Model(name=model), schedule=Schedule(epochs=1), launch=Launch(workers=2, simulate=True),
                    exchange=Exchange(options={"warmup_epochs": 0}))
    key = "test_accuracy" if dataset == "mnist" else "test_perplexity"
    assert summary[key] > 0


def test_cli_help_and_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "torchrun --standalone" in out and "--compressor" in out
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--no-progress",
                 "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "GRADCOMP_DATA" in err
    assert main(["train", "--compressor", "topk", "-o", "bogus=1", "--run-dir", str(tmp_path / "r2")]) == 2
    assert "bogus" in capsys.readouterr().err
    assert main(["train", "--compressor", "dgc", "--density", "0.01", "-o", "nonsense=3",
                 "--run-dir", str(tmp_path / "r3")]) == 2
    assert "DGC's options are" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--density", "1.5"])


def test_cli_train_with_its_dense_baseline_and_plot(tmp_path, capsys):
    """--baseline: the run, then the same settings with the dense all-reduce into RUN_DIR-dense, then both side
    by side (the table's figures are the summaries'); gradcomp plot draws and tables any runs."""
    run_dir, dense_dir = tmp_path / "dgc", tmp_path / "dgc-dense"
    assert main(["train", "--baseline", "--simulate", "--epochs", "1", "--workers", "2", "--density", "0.01",
                 "--no-progress", "--run-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "compression" in out and "step on 1 Gbit/s" in out
    mine, dense = (TrainConfig.from_dict(RunDir(d).read_config()).flat() for d in (run_dir, dense_dir))
    assert (mine["method"], dense["method"], dense["label"]) == ("dgc", "none", "dense baseline")
    differ = {k for k in mine if mine[k] != dense[k]}
    assert differ == {"method", "options", "run_dir", "label"}
    table = out[out.index("| run |"):].splitlines()
    for line, d in zip(table[2:4], (run_dir, dense_dir)):
        summary = RunDir(d).read_summary()
        assert f"| {100 * summary['test_accuracy']:.2f} % | " in line
        assert f"| {summary['compression_ratio']:.1f}x | " in line
    assert table[3].startswith("| dense baseline | none |")
    assert (run_dir / "vs-dense.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", str(dense_dir), str(run_dir), "-o", str(tmp_path / "cmp.png")]) == 0
    assert "| dense baseline | none |" in capsys.readouterr().out
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["train", "--baseline", "--simulate", "--compressor", "none", "--run-dir", str(tmp_path / "x")]) == 2
    assert "this run is dense already" in capsys.readouterr().err
    assert main(["train", "--baseline", "--resume", str(run_dir)]) == 2
    assert "--baseline" in capsys.readouterr().err and not (tmp_path / "x").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_launch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ["torchrun", "--standalone", "--nproc-per-node", "2", "-m", "gradcomp", "train", "--epochs", "1",
           "--no-progress", "--run-dir", str(tmp_path / "tr")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "outlived destroy_process_group" not in proc.stderr  # shutdown() ended gloo's threads: no abort at exit
    summary = json.loads((tmp_path / "tr" / "summary.json").read_text())
    assert summary["workers"] == 2 and not summary["simulated"]
    assert "compression" in proc.stdout


def test_a_language_model_is_scored_by_next_token_accuracy_too():
    """``test_token_accuracy``: the share of test tokens whose most likely next token is right, recomputed here
    from one pass over the whole test stream (a bigram model has no state, so windows do not matter)."""
    from gradcomp.train.data import load_dataset
    from gradcomp.train.loop import Task

    try:
        data = load_dataset("shakespeare", limit_train=2_000)
    except gradcomp.train.data.DatasetNotFoundError as error:
        pytest.skip(str(error))

    class Bigram(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.table = torch.nn.Embedding(data.vocab_size, data.vocab_size)

        def forward(self, tokens, hidden=None):
            return self.table(tokens), hidden

    task = Task(data, TrainConfig(data=Data(dataset="shakespeare", limit_test=1_001, bptt=7),
                                  exchange=Exchange(method="none"), output=QUIET), 1)
    model = Bigram()
    result = task.evaluate(model)
    stream = data.test[:1_001]
    rows = stream.numel() // 10 * 10  # batchify(stream, 10): 10 rows, the tail dropped
    x = stream[:rows].view(10, -1)
    predicted, target = model.table.weight[x[:, :-1]].argmax(-1), x[:, 1:]
    assert result["test_token_accuracy"] == (predicted == target).sum().item() / target.numel()
    assert 0 < result["test_token_accuracy"] < 1


@pytest.mark.parametrize("simulate", [True, False])
@pytest.mark.parametrize("door", [Averaging(dga_delay=3), Averaging(fedavg_period=4)])
def test_dga_and_fedavg_epochs_are_scored_on_the_workers_average(tmp_path, simulate, door):
    """Under DGA and FedAvg each worker's model differs from the others by its own unaveraged steps (under
    skewed data, a lean to its own classes): an epoch is scored on their average, recomputed here from the
    checkpoint's models (worker 0's beside the simulator's replicas, or every rank's own)."""
    from gradcomp.train.data import load_dataset
    from gradcomp.train.loop import Task
    from gradcomp.train.models import build_model

    cfg = dict(schedule=Schedule(epochs=1), exchange=Exchange(method="none"), data=Data(partition="skewed"),
               averaging=door)
    summary = quick(tmp_path, "run", launch=Launch(workers=2, simulate=simulate), **cfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    states = ([ckpt["model"], *ckpt["simulator"]["replicas"]] if simulate
              else [rank["model"] for rank in ckpt["methods"]])  # every real rank's own model
    data = load_dataset("digits")
    models = []
    for state in states:
        m = build_model(None, data)
        m.load_state_dict(state)
        models.append(m)
    average = build_model(None, data)
    with torch.no_grad():
        for name, p in average.named_parameters():
            p.copy_(sum(dict(m.named_parameters())[name] for m in models) / len(models))
    task = Task(data, TrainConfig(launch=Launch(workers=2), output=QUIET, **cfg), 1)

    assert not all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    scored, own = task.evaluate(average), task.evaluate(models[0])
    assert summary["test_loss"] == pytest.approx(scored["test_loss"], rel=1e-6)
    assert summary["test_accuracy"] == scored["test_accuracy"]
    assert own["test_loss"] != pytest.approx(scored["test_loss"], rel=1e-3)  # worker 0's own model scores otherwise
