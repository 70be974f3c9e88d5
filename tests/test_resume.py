"""Reliability of `gradcomp train` on real gloo processes: exact mid-epoch resume, a killed worker restarted
from the last checkpoint (torchrun --max-restarts and the CLI's own --max-restarts), damaged or foreign
checkpoints refused with nothing in the run directory changed, the collective timeout."""

import glob
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from gradcomp.cli import main
from gradcomp.train.config import Data, Launch, Output, Schedule, TrainConfig
from gradcomp.train.loop import run
from gradcomp.train.rundir import RunDir
from helpers import assert_same

#: digits, 2 real workers, 256 samples: 4 steps an epoch (global batch 64), 12 in all
SMALL = TrainConfig(data=Data(limit_train=256, limit_test=100), schedule=Schedule(epochs=3), launch=Launch(workers=2),
                    output=Output(progress=False))
STOP = 6  # mid-epoch: 2 steps into the second epoch


def train(tmp_path, name, cfg=SMALL):
    return run(cfg.replace(output={"run_dir": str(tmp_path / name)}), echo=lambda _: None)


def resume(tmp_path, name, cfg=SMALL):
    """Resume ``tmp_path / name`` with ``cfg``'s resumable settings (its epochs, max_steps, checkpoint_every...)."""
    return run(cfg, resume=str(tmp_path / name), echo=lambda _: None)


def stopping(cfg, max_steps, **output):
    """``cfg`` stopped after ``max_steps`` steps, with these ``Output`` settings (checkpoint_every)."""
    return cfg.replace(schedule={"max_steps": max_steps}, output=output)


#: what a finished run's state is: the model, the optimizer, every rank's method memory (and, with DGA, every
#: rank's model), the simulator's workers, the RNG and LSTM states, the counters; not the wall-clock seconds
STATE = ("model", "optimizer", "methods", "simulator", "rng", "hidden", "epoch", "epoch_step", "steps", "bytes_sent",
         "lr_warmup")


def assert_same_run(dir_a, dir_b):
    a, b = RunDir(dir_a).load_checkpoint(), RunDir(dir_b).load_checkpoint()
    assert_same({k: a[k] for k in STATE if k in a}, {k: b[k] for k in STATE if k in b})
    keys = ("epoch", "step", "train_loss", "test_loss", "bytes_sent", "dense_bytes")
    ma, mb = ([{k: m.get(k) for k in keys} for m in RunDir(d).read_metrics()] for d in (dir_a, dir_b))
    assert ma == mb  # one record per epoch, no loss, byte or step counted twice


# ---------------------------------------------------------------- 1. exact resume, mid-epoch

DGC = SMALL.replace(exchange={"method": "dgc", "options": {"warmup_epochs": 2}})  # warm-up in progress at the stop
CASES = {
    "powersgd": SMALL.replace(exchange={"method": "powersgd", "options": {"rank": 2}}),
    "dga": DGC.replace(averaging={"dga_delay": 3}),  # 3 averages pending at the stop
}


@pytest.fixture(scope="module")
def dgc_runs(tmp_path_factory):
    """DGC on 2 real workers: a run that never stopped, and one stopped at step 6 (checkpoints at 2, 4, 6)."""
    path = tmp_path_factory.mktemp("dgc")
    train(path, "full", DGC)
    assert train(path, "part", stopping(DGC, STOP, checkpoint_every=2)) == {"stopped_after_step": STOP}
    return path


def check_stopped(path):
    ckpt = RunDir(path).load_checkpoint()
    assert (ckpt["epoch"], ckpt["epoch_step"], ckpt["steps"]) == (1, 2, STOP)
    assert len(ckpt["methods"]) == len(ckpt["rng"]) == 2  # every rank's memory and RNG state
    assert [m["epoch"] for m in RunDir(path).read_metrics()] == [1]
    return ckpt


def test_mid_epoch_resume_is_bit_identical_dgc(tmp_path, dgc_runs):
    shutil.copytree(dgc_runs / "part", tmp_path / "part")
    assert check_stopped(tmp_path / "part")["methods"][1]["epoch"] == pytest.approx(1.5)  # warm-up in progress
    assert resume(tmp_path, "part")["steps"] == 12  # max_steps may change on resume (here: back to None)
    assert_same_run(dgc_runs / "full", tmp_path / "part")


# dga is slow-marked (12 s): DGA's mid-run resume with averages pending is also checked on real ranks in
# test_dga.py (state_dict round trip, plain and DGC) and through gradcomp train in test_train.py
@pytest.mark.parametrize("case", ["powersgd", pytest.param("dga", marks=pytest.mark.slow)])
def test_mid_epoch_resume_is_bit_identical(tmp_path, monkeypatch, case):
    cfg = CASES[case]
    if case == "powersgd":
        # MKL's products depend on memory alignment by default, and the first step after DDP is built runs its
        # buckets in another order (before DDP rebuilds them), so the received factors lie elsewhere in the
        # communicator's flat buffers: about 1e-8 apart.  Alignment-independent MKL (inherited by the workers):
        monkeypatch.setenv("MKL_CBWR", "AUTO,STRICT")
    train(tmp_path, "full", cfg)
    train(tmp_path, "part", stopping(cfg, STOP))
    ckpt = check_stopped(tmp_path / "part")
    if case == "powersgd":  # the warm-start factors travel with the checkpoint
        for state in ckpt["methods"]:
            qs = [s["q"] for s in state["compressor_state"].values() if "q" in s]
            assert qs and all(q.shape[1] == 2 for q in qs)
    if case == "dga":
        assert len(ckpt["methods"][1]["dga"]["pending"]) == 3
    resume(tmp_path, "part")
    assert_same_run(tmp_path / "full", tmp_path / "part")


def test_simulated_mid_epoch_resume_is_bit_identical_through_several_stops(tmp_path):
    cfg = DGC.replace(launch={"simulate": True})
    train(tmp_path, "full", cfg)
    train(tmp_path, "part", stopping(cfg, 5))
    resume(tmp_path, "part", stopping(cfg, 9, checkpoint_every=2))  # 9: an epoch end is passed, a stop mid-epoch
    assert RunDir(tmp_path / "part").load_checkpoint()["steps"] == 9
    resume(tmp_path, "part", cfg)
    assert_same_run(tmp_path / "full", tmp_path / "part")


def test_dense_language_model_resume_carries_each_ranks_lstm_state(tmp_path):
    """Mid-epoch, each rank's LSTM state (carried from step to step), its RNG state (dropout) and the
    learning-rate warm-up are restored (method none: the dense baseline)."""
    from gradcomp.train.data import DatasetNotFoundError, load_dataset

    try:
        load_dataset("shakespeare", limit_train=10)
    except DatasetNotFoundError as error:
        pytest.skip(str(error))
    cfg = SMALL.replace(data={"dataset": "shakespeare", "limit_train": 3_000, "limit_test": 500, "batch_size": 4,
                              "bptt": 20},
                        schedule={"epochs": 2, "lr_warmup_epochs": 1.5}, exchange={"method": "none"},
                        model={"options": {"emb": 16, "hidden": 16, "layers": 2, "dropout": 0.2}})
    train(tmp_path, "full", cfg)  # 3000 tokens / 8 rows: 375 columns, 19 steps an epoch
    train(tmp_path, "part", stopping(cfg, 25))
    hidden = RunDir(tmp_path / "part").load_checkpoint()["hidden"]
    assert [list(h) for h in hidden] == [[0], [1]]  # rank r carries worker r's state
    resume(tmp_path, "part", cfg)
    assert_same_run(tmp_path / "full", tmp_path / "part")


# ---------------------------------------------------------------- 2. a killed worker

#: slow enough (emulated 4 ms per collective) to be killed mid-run: 3 epochs of 44 steps
KILL_ARGS = ["--dataset", "digits", "--compressor", "dgc", "--workers", "2", "--epochs", "3", "--batch-size", "16",
             "--limit-test", "100", "--checkpoint-every", "20", "--no-progress", "--timeout", "120"]
KILL_CONFIG = TrainConfig(data=Data(dataset="digits", batch_size=16, limit_test=100), schedule=Schedule(epochs=3),
                          launch=Launch(workers=2), output=Output(progress=False))  # as KILL_ARGS
KILL_AT = 60  # steps in the checkpoint before one worker is killed


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    path = tmp_path_factory.mktemp("reference") / "run"
    run(KILL_CONFIG.replace(output={"run_dir": str(path)}), echo=lambda _: None)
    return path


def _children(pid):
    found = []
    for f in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            found += [int(c) for c in open(f).read().split()]
        except OSError:
            pass
    return found


def _descendants(pid):
    kids = _children(pid)
    return kids + [d for k in kids for d in _descendants(k)]


def _cmdline(pid):
    try:
        return open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _parent(pid):
    try:
        return int(next(line for line in open(f"/proc/{pid}/status") if line.startswith("PPid:")).split()[1])
    except (OSError, StopIteration):
        return 0


def _is_forkserver_child(pid):
    """A worker of gradcomp's launcher: forked by the forkserver (which has the same command line)."""
    return "forkserver" in _cmdline(pid) and "forkserver" in _cmdline(_parent(pid))


def _kill_one_worker_and_finish(cmd, tmp_path, is_worker):
    """Start ``cmd``, wait for a checkpoint at step >= KILL_AT, SIGKILL one worker; return the finished job."""
    rd = RunDir(tmp_path / "run")
    threads = str(max(1, (os.cpu_count() or 1) // 2))  # as gradcomp's own launcher gives each of 2 workers
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        try:
            deadline = time.monotonic() + 150
            steps = 0
            while steps < KILL_AT:
                assert proc.poll() is None, f"the job ended before a worker was killed: {(tmp_path / 'err.txt')}"
                assert time.monotonic() < deadline, "no checkpoint at step {KILL_AT} in time"
                time.sleep(0.05)
                try:
                    steps = rd.load_checkpoint()["steps"]
                except (FileNotFoundError, ValueError):
                    pass
            workers = [p for p in _descendants(proc.pid) if is_worker(p)]
            assert len(workers) == 2, [_cmdline(p) for p in _descendants(proc.pid)]
            assert not rd.summary_path.exists()
            os.kill(workers[-1], signal.SIGKILL)
            proc.wait(timeout=200)
        finally:
            if proc.poll() is None:
                for pid in [*_descendants(proc.pid), proc.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.wait(timeout=30)
    return proc.returncode, (tmp_path / "out.txt").read_text(), (tmp_path / "err.txt").read_text()


@pytest.mark.skipif(not glob.glob("/proc/self/task/*/children"), reason="needs /proc/PID/task/*/children")
def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(tmp_path, uninterrupted):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "-m", "gradcomp", "train", *KILL_ARGS, "--emulate-latency-ms", "4",
           "--run-dir", str(tmp_path / "run")]
    code, out, err = _kill_one_worker_and_finish(cmd, tmp_path, lambda p: "gradcomp train" in _cmdline(p))
    assert code == 0, err[-3000:]
    assert "resuming from the checkpoint" in err
    assert_same_run(uninterrupted, tmp_path / "run")


@pytest.mark.skipif(not glob.glob("/proc/self/task/*/children"), reason="needs /proc/PID/task/*/children")
def test_own_launcher_restarts_a_killed_worker_from_the_last_checkpoint(tmp_path, uninterrupted):
    cmd = [sys.executable, "-m", "gradcomp", "train", *KILL_ARGS, "--emulate-latency-ms", "4", "--max-restarts", "1",
           "--run-dir", str(tmp_path / "run")]
    code, out, err = _kill_one_worker_and_finish(cmd, tmp_path, _is_forkserver_child)
    assert code == 0, err[-3000:]
    assert re.search(r"2 of 2 workers failed: rank \d died during the run without reporting: killed by signal "
                     r"SIGKILL \(exit code -9\); restart 1 of 1 from the checkpoint at step \d+ \(tracebacks: "
                     r".*worker-errors\.log\)", out), out
    assert_same_run(uninterrupted, tmp_path / "run")


#: a torchrun worker of attempt RESTART: joins through gradcomp's init_from_env, sums its rank + 1 with the other
_ATTEMPT = """
import os, sys, time, torch, torch.distributed as dist
from gradcomp.launch import init_from_env, shutdown
time.sleep(float(sys.argv[1]))
init_from_env(timeout_s=30)
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
print(t.item(), flush=True)
if sys.argv[2] == "killed":
    os._exit(0)  # as a killed rank: no destroy_process_group, which would have taken its keys out of the store
shutdown()
"""


def test_a_restarted_attempt_does_not_read_the_killed_attempts_addresses():
    """torchrun's agent keeps one store across restarts (pytorch/pytorch#135712).  Attempt 0's ranks, killed, leave
    their gloo addresses there; in attempt 1 rank 1 starts 6 s late, so rank 0 would read rank 1's stale address and
    fail to connect (gloo gives up after a few refused tries) unless each attempt has keys of its own."""
    from datetime import timedelta

    import torch.distributed as dist

    from gradcomp.launch import free_port

    port = free_port()
    agent = dist.TCPStore("127.0.0.1", port, 3, is_master=True, timeout=timedelta(seconds=60), wait_for_workers=False)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
           "TORCHELASTIC_USE_AGENT_STORE": "True", "OMP_NUM_THREADS": "1"}
    for attempt, late, end in ((0, 0, "killed"), (1, 6, "clean")):
        procs = [subprocess.Popen([sys.executable, "-c", _ATTEMPT, str(late if rank else 0), end], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env={**env, "RANK": str(rank), "TORCHELASTIC_RESTART_COUNT": str(attempt)})
                 for rank in (0, 1)]
        outs = [p.communicate(timeout=90) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], f"attempt {attempt}: {outs[0][1][-2000:]}"
        assert [float(o) for o, _ in outs] == [3.0, 3.0]
    del agent


# ---------------------------------------------------------------- 3. damaged or foreign checkpoints


@pytest.fixture
def good(dgc_runs):
    """A real 2-worker DGC run stopped at step 6 (step 4's checkpoint kept as checkpoint.prev.pt)."""
    return dgc_runs / "part"


def _files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _refused(tmp_path, good, damage, capsys):
    """Copy the good run, damage its checkpoint, resume it through the CLI: the error text; nothing changed."""
    path = tmp_path / "copy"
    shutil.copytree(good, path)
    damage(RunDir(path).checkpoint_path)
    before = _files(path)
    assert main(["train", "--resume", str(path), "--epochs", "3", "--no-progress"]) == 2
    assert _files(path) == before  # the good checkpoint(s), config and metrics byte for byte
    return capsys.readouterr().err


def test_truncated_or_garbage_checkpoint_is_refused_and_the_previous_one_resumes(tmp_path, good, dgc_runs,
                                                                                  capsys):
    assert RunDir(good).prev_checkpoint_path.is_file()
    assert RunDir(good).load_checkpoint()["steps"] == STOP
    assert torch.load(RunDir(good).prev_checkpoint_path, weights_only=True)["steps"] == STOP - 2
    err = _refused(tmp_path, good, lambda p: p.write_bytes(p.read_bytes()[:1000]), capsys)
    assert "checkpoint.pt" in err and "truncated or corrupt" in err and "checkpoint.prev.pt" in err
    shutil.rmtree(tmp_path / "copy")
    err = _refused(tmp_path, good, lambda p: p.write_bytes(os.urandom(5000)), capsys)
    assert "truncated or corrupt" in err and "move" in err and "checkpoint.prev.pt" in err
    # the message's advice works: the previous checkpoint resumes and the run finishes
    rd = RunDir(tmp_path / "copy")
    os.replace(rd.prev_checkpoint_path, rd.checkpoint_path)
    assert main(["train", "--resume", str(rd.path), "--epochs", "3", "--no-progress"]) == 0
    assert_same_run(dgc_runs / "full", rd.path)  # exact from the older checkpoint too


def _foreign(tmp_path_factory, cfg):
    path = tmp_path_factory.mktemp("foreign") / "run"
    run(stopping(cfg, 2, run_dir=str(path)).replace(launch={"simulate": True}), echo=lambda _: None)
    return RunDir(path).checkpoint_path


FOREIGN = {
    "other method": (SMALL.replace(exchange={"method": "powersgd"}),
                     "was written by method 'powersgd', this run uses 'dgc'"),
    "other model": (DGC.replace(model={"options": {"hidden": [16]}}),
                    "parameter 'net.1.weight' has shape [16, 64] in {path}, [256, 64] in the model"),
    "other density": (SMALL.replace(exchange={"options": {"density": 0.01, "warmup_epochs": 2}}),
                      "was written with other settings: options={'density': 0.01, 'warmup_epochs': 2} in the "
                      "checkpoint, {'warmup_epochs': 2} in this run"),
    "other workers": (DGC.replace(launch={"workers": 4}), "holds the state of 4 workers, this run has 2"),
    "simulated": (DGC, "simulate=True in the checkpoint, False in this run"),
}


@pytest.mark.parametrize("case", FOREIGN)
def test_a_checkpoint_of_another_run_is_refused(tmp_path, tmp_path_factory, good, capsys, case):
    cfg, message = FOREIGN[case]
    foreign = _foreign(tmp_path_factory, cfg)
    err = _refused(tmp_path, good, lambda p: shutil.copyfile(foreign, p), capsys)
    assert message.replace("{path}", str(RunDir(tmp_path / "copy").checkpoint_path)) in err


# ---------------------------------------------------------------- 4. settings, the collective timeout


def test_new_settings_are_checked(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^TrainConfig.output.checkpoint_every must be an integer >= 1, got 0$"):
        Output(checkpoint_every=0)
    with pytest.raises(ValueError, match=r"^TrainConfig.schedule.max_steps must be an integer >= 1, got 0$"):
        Schedule(max_steps=0)
    with pytest.raises(ValueError, match="timeout_s"):
        run(SMALL.replace(output={"run_dir": str(tmp_path / "t")}), timeout_s=0)
    with pytest.raises(ValueError, match="simulator"):
        run(SMALL.replace(output={"run_dir": str(tmp_path / "s")}, launch={"simulate": True}), max_restarts=1)
    for flags in (["--timeout", "0"], ["--checkpoint-every", "0"], ["--max-restarts", "-1"], ["--max-steps", "x"]):
        with pytest.raises(SystemExit):
            main(["train", *flags])
    assert not (tmp_path / "t").exists() and not (tmp_path / "s").exists()
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for flag in ("--checkpoint-every", "--max-steps", "--max-restarts", "--timeout SECONDS"):
        assert flag in out, flag


class _Reached(Exception):
    pass


def test_the_timeout_reaches_the_launcher_and_the_collectives(tmp_path, monkeypatch):
    import gradcomp.launch

    seen = {}

    def record(name):
        def fake(*args, **kwargs):
            seen[name] = kwargs["timeout_s"]
            raise _Reached

        return fake

    monkeypatch.setattr(gradcomp.launch, "spawn", record("spawn"))
    monkeypatch.setattr(gradcomp.launch, "init_from_env", record("init_from_env"))
    with pytest.raises(_Reached):
        run(SMALL.replace(output={"run_dir": str(tmp_path / "a")}), timeout_s=42.0)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(_Reached):
        run(SMALL.replace(output={"run_dir": str(tmp_path / "b")}), timeout_s=43.0)

    assert seen == {"spawn": 42.0, "init_from_env": 43.0}
