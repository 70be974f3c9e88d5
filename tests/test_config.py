"""``TrainConfig`` by section: each section checks its own fields, the config the rules across them; configs are
derived with ``replace``; ``config.json`` is written by section, and the flat files of earlier versions (the
committed runs in results/runs) are read back, compare equal and resume."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from gradcomp.train.config import (
    NOT_CHECKED,
    SETTINGS,
    Averaging,
    Data,
    Exchange,
    Launch,
    Model,
    Optim,
    Output,
    Schedule,
    TrainConfig,
    flat_settings,
)
from gradcomp.train.loop import run
from gradcomp.train.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
#: the finished runs of the long studies, kept with their config.json as earlier versions wrote it (flat)
COMMITTED = sorted(REPO.glob("results/runs/*/*/config.json"))
#: the committed full LM study's DGC row
LM_DGC = REPO / "results" / "runs" / "lm" / "1-dgc" / "config.json"


def test_every_field_of_every_section_has_one_flat_name_and_a_doc_comment():
    sections = {f.name: f.default_factory for f in dataclasses.fields(TrainConfig)}
    assert list(sections) == ["data", "model", "exchange", "averaging", "optim", "schedule", "launch", "output"]
    fields = [(name, f.name) for name, kind in sections.items() for f in dataclasses.fields(kind)]
    assert sorted(SETTINGS.values()) == sorted(fields)  # one flat name each, none shared
    source = (REPO / "src" / "gradcomp" / "train" / "config.py").read_text()
    for kind in [TrainConfig, *sections.values()]:
        block = source[source.index(f"class {kind.__name__}:"):]
        for f in dataclasses.fields(kind):
            line = next(line for line in block.splitlines() if line.startswith(f"    {f.name}: "))
            before = block[:block.index(line)].rstrip().splitlines()[-1].strip()
            assert before.startswith("#:"), f"{kind.__name__}.{f.name} has no #: doc comment (Sphinx shows them)"


def test_sections_name_the_bad_field_and_value():
    cases = [
        (lambda: Data(dataset="cifar"), r"^TrainConfig.data.dataset must be one of digits, .*, got 'cifar'$"),
        (lambda: Data(batch_size=0), r"^TrainConfig.data.batch_size must be an integer >= 1, got 0$"),
        (lambda: Data(limit_test=0), r"^TrainConfig.data.limit_test must be an integer >= 1, got 0$"),
        (lambda: Exchange(method="zip"), r"^TrainConfig.exchange.method must be one of .*, got 'zip'$"),
        (lambda: Optim(lr=0), r"^TrainConfig.optim.lr must be in \(0.0, inf\), got 0$"),
        (lambda: Optim(momentum=1.0), r"^TrainConfig.optim.momentum must be in \[0.0, 1.0\), got 1.0$"),
        (lambda: Optim(clip_norm=-1.0), r"^TrainConfig.optim.clip_norm must be in \(0.0, inf\), got -1.0$"),
        (lambda: Schedule(epochs=0), r"^TrainConfig.schedule.epochs must be an integer >= 1, got 0$"),
        (lambda: Launch(workers=0), r"^TrainConfig.launch.workers must be an integer >= 1, got 0$"),
        (lambda: Launch(seed=-1), r"^TrainConfig.launch.seed must be an integer >= 0, got -1$"),
        (lambda: Output(link_gbps=0), r"^TrainConfig.output.link_gbps must be in \(0.0, inf\), got 0$"),
        (lambda: TrainConfig(optim=Optim(clip_norm=1.0), exchange=Exchange(method="none"),
                             averaging=Averaging(fedavg_period=2)),
         r"^TrainConfig.optim.clip_norm with averaging.fedavg_period: there is no averaged gradient to clip$"),
        (lambda: TrainConfig(exchange=Exchange(method="topk", options={"density": 2.0})), r"density"),
    ]
    for build, message in cases:
        with pytest.raises(ValueError, match=message):
            build()
    with pytest.raises(TypeError, match=r"^TrainConfig.data must be a Data, got dict \(TrainConfig.from_dict"):
        TrainConfig(data={"dataset": "mnist"})


def test_replace_changes_fields_of_a_section_or_swaps_it_and_checks_again():
    base = TrainConfig(data=Data(dataset="mnist", batch_size=8), optim=Optim(lr=0.5))
    longer = base.replace(schedule={"epochs": 40}, data={"limit_train": 100})
    assert (longer.schedule.epochs, longer.data.dataset, longer.data.batch_size, longer.data.limit_train) == \
        (40, "mnist", 8, 100)
    assert base.schedule.epochs == 20 and base.data.limit_train is None  # a copy: the original is unchanged
    assert base.replace(optim=Optim()).optim.lr == 0.1  # a whole section replaced
    with pytest.raises(ValueError, match="fedavg_period averages weights"):  # the rules across sections again
        base.replace(averaging={"fedavg_period": 2})
    with pytest.raises(TypeError, match=r"^TrainConfig has no section 'optimizer' \(its sections: data, model"):
        base.replace(optimizer={"lr": 1.0})


def test_config_json_round_trips_by_section_and_flat():
    cfg = TrainConfig(data=Data(dataset="shakespeare", bptt=20), model=Model(name="lstm", options={"hidden": 32}),
                      exchange=Exchange(method="topk", options={"density": 0.01}), optim=Optim(name="adamw",
                      momentum=0.0), averaging=Averaging(dga_delay=2), schedule=Schedule(lr_milestones=[3]),
                      output=Output(label="x"))
    saved = json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert saved["model"] == {"name": "lstm", "options": {"hidden": 32}} and saved["optim"]["name"] == "adamw"
    assert TrainConfig.from_dict(saved) == cfg
    flat = cfg.flat()
    assert (flat["model"], flat["model_options"], flat["optimizer"], flat["options"]) == \
        ("lstm", {"hidden": 32}, "adamw", {"density": 0.01})
    assert flat_settings(saved) == flat and TrainConfig.from_dict(flat) == cfg
    assert TrainConfig.from_dict({}) == TrainConfig() == TrainConfig.from_dict({"data": {}})  # defaults
    with pytest.raises(TypeError, match="TrainConfig has no setting 'colour'"):
        TrainConfig.from_dict({**flat, "colour": "red"})
    with pytest.raises(TypeError, match="TrainConfig has no setting 'data.colour'"):
        TrainConfig.from_dict({"data": {"colour": "red"}})


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_the_committed_flat_configs_are_read_back(path):
    """Each committed run's config.json (flat, as earlier versions wrote it) gives a TrainConfig holding every
    setting it names; its flat view and resume fingerprint are what they were."""
    saved = json.loads(path.read_text())
    assert "dataset" in saved and "data" not in saved  # flat
    cfg = TrainConfig.from_dict(saved)
    assert cfg.flat() == saved
    assert cfg.fingerprint() == {k: v for k, v in saved.items() if k not in NOT_CHECKED}


def test_the_committed_lm_dgc_run_reads_into_its_sections():
    cfg = TrainConfig.from_dict(json.loads(LM_DGC.read_text()))
    assert (cfg.data.dataset, cfg.data.batch_size, cfg.data.bptt) == ("ptb", 5, 35)
    assert (cfg.model.name, cfg.model.options) == ("lstm", {"tie_weights": True})
    assert cfg.exchange.method == "dgc" and cfg.exchange.options["density"] == 0.001
    assert cfg.exchange.nonfinite == "raise"
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.clip_norm) == ("sgd", 20.0, 0.0, 0.25)
    assert (cfg.schedule.epochs, cfg.schedule.lr_milestones, cfg.schedule.lr_decay) == (12, [8, 10], 0.25)
    assert (cfg.launch.workers, cfg.launch.simulate, cfg.launch.device) == (4, True, "cpu")
    assert (cfg.output.label, cfg.output.checkpoint_every) == ("DGC 99.9 %", 200)


SMALL = TrainConfig(data=Data(limit_train=256, limit_test=100), exchange=Exchange(options={"warmup_epochs": 2}),
                    schedule=Schedule(epochs=1), launch=Launch(workers=2, simulate=True), output=Output(progress=False))


def test_a_run_written_now_and_one_written_flat_resume_to_the_uninterrupted_result(tmp_path):
    """A run stopped mid-epoch writes its config.json by section and resumes; the same run with its config.json
    flat, as earlier versions wrote it (their checkpoints' fingerprints are flat too), resumes the same, its
    config.json then rewritten by section."""
    full = run(SMALL.replace(output={"run_dir": str(tmp_path / "full")}), plot=False, echo=lambda _: None)
    stopped = SMALL.replace(output={"run_dir": str(tmp_path / "new")}, schedule={"max_steps": 2})  # mid-epoch (4 steps)
    assert run(stopped, plot=False, echo=lambda _: None) == {"stopped_after_step": 2}
    new = RunDir(tmp_path / "new")
    assert set(new.read_config()) == {"data", "model", "exchange", "averaging", "optim", "schedule", "launch",
                                      "output"}
    assert new.load_checkpoint()["config"] == SMALL.fingerprint()  # flat, as before
    shutil.copytree(new.path, tmp_path / "old")
    old = RunDir(tmp_path / "old")
    old.write_config({**TrainConfig.from_dict(new.read_config()).flat(), "run_dir": str(old.path)})
    for rd in (new, old):
        resumed = run(SMALL, resume=str(rd.path), plot=False, echo=lambda _: None)
        for key in ("test_loss", "test_accuracy", "bytes_sent", "steps"):
            assert resumed[key] == full[key], (rd.path.name, key)
        cfg = TrainConfig.from_dict(rd.read_config())  # by section now
        assert "launch" in rd.read_config() and cfg.launch.device in ("cpu", "cuda")  # as the run resolved it
        assert cfg.replace(launch={"device": "auto"}) == SMALL.replace(output={"run_dir": str(rd.path)})


@pytest.mark.parametrize("dataset, model, message", [
    ("digits", "nope", "TrainConfig.model.name must be one of mlp, cnn, resnet, lstm, gpt or None, got 'nope'"),
    ("ptb", "cnn", "TrainConfig.model.name 'cnn' is a model for image datasets, but data.dataset 'ptb' is an lm "
                   "dataset (its models: lstm, gpt)"),
    ("digits", "lstm", "TrainConfig.model.name 'lstm' is a model for lm datasets, but data.dataset 'digits' is an "
                       "image dataset (its models: mlp, cnn, resnet)"),
])
def test_a_model_that_cannot_train_on_the_dataset_is_refused_before_the_run_directory(tmp_path, monkeypatch, capsys,
                                                                                       dataset, model, message):
    """An unknown model, or one of the other kind of data, used to pass the config and fail in the workers, after
    the run directory was made: now the config refuses it, and ``gradcomp train`` says so in one line and writes
    nothing.  The model names and kinds here are those of build_model's own error for the same pair."""
    from gradcomp.cli import main
    from gradcomp.train.models import build_model

    with pytest.raises(ValueError, match=r"model|unknown"):  # what the workers would have said
        build_model(model, dataset)
    with pytest.raises(ValueError) as error:
        TrainConfig(data=Data(dataset=dataset), model=Model(name=model))
    assert str(error.value) == message
    monkeypatch.chdir(tmp_path)
    if model != "nope":  # the CLI's --model choices refuse "nope" in argparse's own words
        assert main(["train", "--dataset", dataset, "--model", model, "--simulate", "--no-progress"]) == 2
        assert capsys.readouterr().err.strip() == f"gradcomp train: error: {message}"
        assert not list(tmp_path.iterdir()), "something was written"
