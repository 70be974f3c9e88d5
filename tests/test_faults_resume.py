"""Issue 23, "nothing lost, nothing crashes", for `gradcomp train` and `--resume`: each fault of the issue's
table run as a user runs it (`python -m gradcomp train` in a subprocess, on the small digits set, simulated
workers where the fault is not about processes), with the new answer: a resumed run keeps its settings, a flag
that would change it is refused, every check that can fail runs before the run directory exists, and a
failure is one line naming the value, with nothing half-made left behind."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradcomp
from gradcomp.cli import main
from gradcomp.train.config import flat_settings
from gradcomp.train.rundir import RunDir
from test_resume import assert_same_run

SRC = str(Path(gradcomp.__file__).parents[1])
#: 2 simulated workers, 128 samples, batch 16: 4 steps an epoch
FAST = ("--dataset", "digits", "--simulate", "--workers", "2", "--limit-train", "128", "--limit-test", "50",
        "--no-progress")
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE")


def train(*args, cwd, env=None, timeout=180):
    """``python -m gradcomp train ARGS`` in ``cwd``, on this checkout's gradcomp."""
    base = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    path = os.pathsep.join(filter(None, [SRC, base.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "gradcomp", "train", *map(str, args)], cwd=cwd, text=True,
                          capture_output=True, timeout=timeout,
                          env={**base, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **(env or {})})


def error_line(proc, rc=2):
    """The one line a failure prints (no traceback), checked to be the only one."""
    assert proc.returncode == rc, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gradcomp train: error: "), proc.stderr[-3000:]
    return lines[0]


def main_error(capsys, *args, rc=2):
    """The same through ``gradcomp.cli.main`` in this process (the further cases of a row: no interpreter to
    start)."""
    assert main(["train", *map(str, args)]) == rc
    return error_line(subprocess.CompletedProcess([], rc, "", capsys.readouterr().err), rc)


def config(path):
    """The run's config.json (by section), one key per setting."""
    return flat_settings(json.loads((Path(path) / "config.json").read_text()))


def files(path):
    return {p.name: p.read_bytes() for p in sorted(Path(path).iterdir())}


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped by --max-steps 3 (checkpoints at steps 1, 2, 3)."""
    path = tmp_path_factory.mktemp("stopped")
    proc = train(*FAST, "--epochs", 2, "--checkpoint-every", 1, "--max-steps", 3, "--run-dir", "run", cwd=path)
    assert proc.returncode == 0, proc.stderr
    return path / "run"


def copy(stopped, tmp_path):
    shutil.copytree(stopped, tmp_path / "run")
    return tmp_path / "run"


# ---------------------------------------------------------------- resume keeps the run


def test_the_printed_hint_resumes_the_intended_run(tmp_path):
    """Row 1: `--epochs 4 --checkpoint-every 10 --max-steps 37`, then the hint `gradcomp train --resume B`
    trained 20 epochs (the CLI's default) and dropped --checkpoint-every.  Here, with `--epochs 2
    --checkpoint-every 3 --max-steps 3`, the hint trains the 2 epochs
    with the checkpoint interval (the checkpoint before the last is at step 6: every 3), the end of the
    --max-steps stop is said and recorded, config.json and summary.json agree, and the result is an
    uninterrupted run's."""
    run = ("--epochs", 2, "--checkpoint-every", 3, "--run-dir")
    first = train(*FAST, "--max-steps", 3, *run, "B", cwd=tmp_path)
    hint = first.stdout.strip().splitlines()[-1]
    assert first.returncode == 0 and hint.endswith("continue with: gradcomp train --resume B"), first.stdout
    last = train(*hint.partition("gradcomp train ")[2].split(), cwd=tmp_path)
    assert last.returncode == 0, last.stderr
    assert last.stderr.splitlines() == ["WARNING gradcomp.train.loop: B: max_steps changes from 3 to None on "
                                        "resume (recorded in config.json)"]
    rd = RunDir(tmp_path / "B")
    assert torch.load(rd.prev_checkpoint_path, weights_only=True)["steps"] == 6  # --checkpoint-every 3 kept
    saved, summary = config(rd.path), rd.read_summary()
    assert (saved["epochs"], saved["checkpoint_every"], saved["max_steps"]) == (2, 3, None)
    assert (summary["epochs"], summary["steps"]) == (2, 8)  # config.json and summary.json agree
    whole = train(*FAST, *run, "whole", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr
    assert_same_run(tmp_path / "whole", rd.path)
    assert {**saved, "run_dir": "whole"} == config(tmp_path / "whole")


def test_flags_that_would_change_the_run_are_refused(stopped, tmp_path, capsys):
    """Row 2: `--resume B --compressor topk --density 0.5 --workers 3 --lr 5` ignored every flag, rc 0.  Now
    rc 2 and one line naming each of them (a flag is refused even where its value is the run's), nothing
    changed."""
    path = copy(stopped, tmp_path)
    before = files(path)
    line = error_line(train("--resume", path, "--compressor", "topk", "--density", 0.5, "--workers", 3, "--lr", 5,
                            cwd=tmp_path))
    assert line.startswith(f"gradcomp train: error: --resume {path} continues the run with its own settings: "
                           "--compressor, --density, --lr, --workers would change them (only --epochs, "
                           "--max-steps, --checkpoint-every, --device, --no-progress")
    assert ": --workers would change them" in main_error(capsys, "--resume", path, "--workers", 2, "--epochs", 3)
    assert files(path) == before


# ---------------------------------------------------------------- --resume of what cannot be resumed


def test_resume_of_a_broken_run_directory_is_one_line(stopped, tmp_path, capsys, monkeypatch):
    """Row 3: a missing directory, no checkpoint.pt beside checkpoint.prev.pt, checkpoint.pt a directory, no
    config.json: each was a traceback (rc 1).  Now one line (rc 2), the second naming how to resume from the
    previous checkpoint, which then resumes."""
    path = copy(stopped, tmp_path)
    monkeypatch.chdir(tmp_path)
    rd = RunDir("run")
    assert error_line(train("--resume", "missing", cwd=tmp_path)) == \
        "gradcomp train: error: cannot resume 'missing': no such directory"
    rd.checkpoint_path.unlink()
    assert main_error(capsys, "--resume", "run") == (
        "gradcomp train: error: cannot resume 'run': 'run/checkpoint.pt' is missing; the checkpoint saved before "
        "it is kept: to resume from it, move 'run/checkpoint.prev.pt' to 'run/checkpoint.pt'")
    rd.checkpoint_path.mkdir()
    assert main_error(capsys, "--resume", "run") == \
        "gradcomp train: error: cannot resume 'run': 'run/checkpoint.pt' is not a file"
    rd.checkpoint_path.rmdir()
    os.replace(rd.prev_checkpoint_path, rd.checkpoint_path)  # the advice
    saved = rd.config_path.read_bytes()
    rd.config_path.unlink()
    assert main_error(capsys, "--resume", "run") == (
        "gradcomp train: error: cannot resume 'run': it has no config.json (not a gradcomp train run directory, "
        "or its config was removed)")
    rd.config_path.write_bytes(saved)
    assert main(["train", "--resume", "run"]) == 0
    assert RunDir(path).read_summary()["steps"] == 8


def _mount_tmpfs(path, size):
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    return path


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name, size):
        mounted.append(_mount_tmpfs(tmp_path / name, size))
        return mounted[-1]

    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=True)


def test_a_read_only_run_directory_is_refused_before_training(stopped, tmp_path, tmpfs, capsys):
    """Row 4: resuming a read-only run directory trained a full epoch, then PermissionError.  Now rc 2 at
    once, one line; a new run beneath a read-only folder too, with no directory made."""
    disk = tmpfs("ro", "4m")
    shutil.copytree(stopped, disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    assert error_line(train("--resume", disk / "run", cwd=tmp_path)) == \
        f"gradcomp train: error: cannot write to '{disk / 'run'}': read-only file system"
    assert main_error(capsys, *FAST, "--run-dir", disk / "new" / "run") == \
        f"gradcomp train: error: cannot write to '{disk}' (to hold run directory '{disk / 'new' / 'run'}'): " \
        "read-only file system"


# ---------------------------------------------------------------- nothing half-made


def test_temporary_files_of_a_killed_write_are_removed(stopped, tmp_path):
    """Row 5: kill -9 while a checkpoint was written left a 1 MB .checkpoint.pt.*.tmp for good.  Now the
    resume removes what interrupted writes leave (made here as a killed os.replace-based write leaves them)."""
    path = copy(stopped, tmp_path)
    rd = RunDir(path)
    left = {".checkpoint.pt.k9x_2ab.tmp": rd.checkpoint_path.read_bytes()[:1 << 20],
            ".checkpoint.prev.pt.tmp": b"", ".metrics.jsonl.q1w2e3r4.tmp": b"{", ".config.json.zz.tmp": b"{"}
    for name, data in left.items():
        (path / name).write_bytes(data)
    (path / "notes.tmp").write_text("the user's")
    done = train("--resume", path, "--epochs", 3, "--max-steps", 4, "--checkpoint-every", 5, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert not set(left) & set(os.listdir(path)) and (path / "notes.tmp").exists()
    assert done.stderr.splitlines() == [f"WARNING gradcomp.train.loop: {path}: {k} changes from {a} to {b} on resume "
                                        "(recorded in config.json)"
                                        for k, a, b in (("epochs", 2, 3), ("max_steps", 3, 4),
                                                        ("checkpoint_every", 1, 5))]
    assert [config(path)[k] for k in ("epochs", "max_steps", "checkpoint_every")] == [3, 4, 5]
    assert rd.load_checkpoint()["steps"] == 4


def test_a_batch_larger_than_the_data_is_refused_and_a_half_made_run_directory_is_run_again(tmp_path, capsys,
                                                                                             caplog, monkeypatch):
    """Row 6: --batch-size 100000 gave two worker tracebacks and a half-written run directory that blocked a
    rerun ("already exists") and --resume (traceback).  Now rc 2, one line, no directory; a directory that a
    run left without a checkpoint (config and a metrics record, as a crash before the first checkpoint leaves
    it) is run again, and --resume of it starts it again from step 0 with its own config."""
    real = ("--dataset", "digits", "--workers", 2, "--limit-train", 128, "--epochs", 1, "--no-progress")
    line = error_line(train(*real, "--batch-size", 100000, "--run-dir", "run", cwd=tmp_path))
    assert line == ("gradcomp train: error: TrainConfig.data.batch_size=100000: a global batch of 200000 (2 workers) "
                    "is larger than the 128 training samples; lower batch_size or workers")
    assert not (tmp_path / "run").exists()
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text(json.dumps({"dataset": "digits", "simulate": True, "workers": 2,
                                                   "limit_train": 128, "limit_test": 50, "epochs": 1, "batch_size": 16,
                                                   "progress": False, "run_dir": "half"}))
    (half / "metrics.jsonl").write_text('{"epoch": 1, "step": 99}\n')
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="gradcomp.train.loop"):
        assert main(["train", "--resume", "half"]) == 0
    assert caplog.messages == ["half holds no checkpoint (its run stopped before the first): starting it again "
                               "from step 0 with its config"]
    assert [m["step"] for m in RunDir(half).read_metrics()] == [4]
    for name in ("checkpoint.pt", "checkpoint.prev.pt", "summary.json", "curves.png"):
        (half / name).unlink(missing_ok=True)
    assert main(["train", *FAST, "--epochs", "1", "--run-dir", "half"]) == 0  # the same command again
    assert RunDir(half).read_summary()["steps"] == 4
    assert main_error(capsys, *FAST, "--epochs", 1, "--run-dir", "half").endswith(
        "already exists and is not empty (resume into it, or choose another directory)")  # a finished run is kept


def test_too_many_workers_for_the_machine_are_refused(tmp_path):
    """Row 7: --workers 1000 started 1,003 processes, printed nothing for 150 s and left a half-written run
    directory.  Now rc 2 at once, one line, no directory (--simulate or --allow-oversubscribe lift it)."""
    cores = os.cpu_count() or 1
    limit = max(8, 4 * cores)
    line = error_line(train("--dataset", "digits", "--workers", 1000, "--run-dir", "run", cwd=tmp_path))
    assert line == (f"gradcomp train: error: TrainConfig.launch.workers=1000 would start 1000 processes on {cores} CPU "

                    f"core(s), more than {limit} (4 per core): use simulate (--simulate) or fewer workers, or allow "
                    "it (--allow-oversubscribe)")
    assert not (tmp_path / "run").exists()


def test_a_master_port_in_use_is_one_line_before_the_run_directory(tmp_path):
    """Row 8: a torchrun-style rank 0 whose MASTER_PORT is taken: an EADDRINUSE traceback and a half-written
    run directory.  Now rc 2, one line naming the port, no directory."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        line = error_line(train("--dataset", "digits", "--limit-train", 64, "--run-dir", "run", cwd=tmp_path,
                                env=env))
    assert line == (f"gradcomp train: error: MASTER_PORT={port} is in use on this machine (Address already in use): "
                    "rank 0 serves the rendezvous there; choose a free port")
    assert not (tmp_path / "run").exists()


def test_a_full_device_is_named_and_the_old_checkpoint_resumes(tmp_path, tmpfs):
    """Row 9: disk full while saving kept the old checkpoint, but said `[enforce fail at inline_container.cc:672]
    . unexpected pos ...`: no ENOSPC, no path.  Now one line naming the path and "no space left on device"
    (rc 1); the epoch-1 checkpoint is kept, no temporary file is left, and with room again --resume finishes
    the run."""
    disk = tmpfs("full", "1600k")  # room for the first checkpoint (about 1 MB) and not for a second beside it
    proc = train(*FAST, "--epochs", 2, "--run-dir", disk / "run", cwd=tmp_path)
    rd = RunDir(disk / "run")
    line = error_line(proc, rc=1)
    assert line.startswith(f"gradcomp train: error: [Errno 28] no space left on device: could not write "
                           f"'{rd.checkpoint_path}' (") and line.endswith(
        " bytes free on that device; what the file held before is kept)")
    assert rd.load_checkpoint()["steps"] == 4
    assert sorted(os.listdir(rd.path)) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    subprocess.run(["mount", "-o", "remount,size=8m", str(disk)], check=True)
    assert main(["train", "--resume", str(rd.path)]) == 0
    assert rd.read_summary()["steps"] == 8 and [m["epoch"] for m in rd.read_metrics()] == [1, 2]
