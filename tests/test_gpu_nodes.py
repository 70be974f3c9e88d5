"""`gradcomp train` on GPU nodes: ``--device``, each rank on its own device under torchrun, checkpoints that hold
CPU tensors only and resume onto each rank's device (CUDA's RNG state too), and DGC's C kernel never built for
CUDA tensors.  The CPU variants run in the default suite (gloo); the CUDA ones (NCCL, marked ``gpu``) where a GPU
is, skipped elsewhere.  The other front doors' resume on the CPU is tests/test_resume.py's and test_train.py's, the
kernel's CPU dtypes tests/test_kernels.py's."""

import os
import subprocess
import sys

import pytest
import torch

import gradcomp
from gradcomp import kernels
from gradcomp.checkpoint import state_tensors, state_to_cpu, state_to_device
from gradcomp.cli import main
from gradcomp.launch import device_kind, spawn
from gradcomp.method import DGC
from gradcomp.train.config import Averaging, Data, Exchange, Launch, Output, Schedule, TrainConfig
from gradcomp.train.loop import run
from gradcomp.train.rundir import RunDir
from helpers import exchange_step
from test_resume import assert_same, assert_same_run

HAS_CUDA = torch.cuda.is_available()
GPU = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")]
CUDA = pytest.param("cuda", marks=GPU)

#: digits on one rank, 256 samples: 8 steps in one epoch (batch 32); stopped at step 5, DGC's warm-up in progress
SMALL = ["--dataset", "digits", "--workers", "1", "--limit-train", "256", "--limit-test", "100", "--epochs", "1",
         "--batch-size", "32", "--warmup-epochs", "2", "--no-progress"]
STOP = 5


def _torchrun(tmp_path, *args, returncode=0, **env):
    """``gradcomp -v train ARGS`` as the one rank of ``torchrun --standalone --nproc-per-node 1``."""
    # the threads gradcomp's own launcher gives its one worker: the same sums, bit for bit
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "gradcomp", "-v", "train", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc


# ---------------------------------------------------------------- choosing the device


def test_the_device_is_chosen_per_machine_and_a_bad_one_is_named():
    gpus = torch.cuda.device_count() if HAS_CUDA else 0
    assert device_kind("cpu", 1) == "cpu"
    assert device_kind("auto", 1) == ("cuda" if gpus else "cpu")
    assert device_kind("auto", gpus + 1) == "cpu"  # a GPU for every local rank, or none at all
    with pytest.raises(ValueError, match="one GPU per local rank" if gpus else "CUDA is not available"):
        device_kind("cuda", gpus + 1)
    with pytest.raises(ValueError, match=r"device must be one of auto, cpu, cuda, got 'gpu'"):
        device_kind("gpu", 1)
    with pytest.raises(ValueError, match=r"^TrainConfig.launch.device must be one of auto, cpu, cuda, got 'gpu'$"):
        Launch(device="gpu")
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'auto'"):
        spawn(print, 1, device="auto")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error where CUDA is absent")
def test_cuda_asked_for_where_there_is_none_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    for mode in (["--simulate"], ["--workers", "2"]):
        run_dir = tmp_path / mode[0].strip("-")
        assert main(["train", "--device", "cuda", *mode, "--no-progress", "--run-dir", str(run_dir)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "device='cuda'" in err and "CUDA is not available" in err, err
        assert not run_dir.exists()
    with pytest.raises(ValueError, match="device='cuda', but CUDA is not available"):
        spawn(print, 1, device="cuda")  # before any process starts
    failed = _torchrun(tmp_path, "--device", "cuda", "--no-progress", "--run-dir", str(tmp_path / "torchrun"),
                       returncode=1)  # torchrun's status; its rank exited with the CLI's 2
    assert "exitcode  : 2" in failed.stderr
    assert "gradcomp train: error: TrainConfig.launch.device='cuda', but CUDA is not available" in failed.stderr
    assert not (tmp_path / "torchrun").exists()
    with pytest.raises(SystemExit):
        main(["train", "--device", "gpu"])
    assert "invalid choice: 'gpu'" in capsys.readouterr().err



# ---------------------------------------------------------------- checkpoints: CPU tensors, resumed on the device


def test_a_ranks_state_goes_to_the_cpu_and_back_onto_its_device_generator_states_stay():
    """What a checkpoint does to a rank's state, with ``meta`` standing in for the rank's GPU: the memory (float)
    moves, a generator's state (uint8, which ``torch.Generator.set_state`` takes on the CPU only) stays."""
    dgc, randomk = DGC(warmup_epochs=0, sparsify_all=True), gradcomp.Method(gradcomp.get("randomk", density=0.1))
    for method in (dgc, randomk):
        exchange_step([method], [{"w": torch.randn(64, 32)}])
    state = {"dgc": dgc.state_dict(), "randomk": randomk.state_dict()}
    on_device = state_to_device(state, "meta")
    kinds = {(t.dtype.is_floating_point, str(t.device)) for t in state_tensors(on_device)}
    assert kinds == {(True, "meta"), (False, "cpu")}
    assert_same(state_to_cpu(state), state)  # a copy, equal bit for bit


# ---------------------------------------------------------------- torchrun: train, checkpoint, resume


#: the cpu variant is slow-marked: the default suite resumes torchrun runs on the CPU in test_resume.py
@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), CUDA])
def test_torchrun_trains_checkpoints_and_resumes_bit_identically_on_the_ranks_device(tmp_path, device):
    """One rank of a torchrun launch on ``device`` (cuda: cuda:0, NCCL), DGC: a run that never stopped against one
    stopped mid-epoch and resumed.  The checkpoint holds CPU tensors only, with the GPU's RNG state on CUDA; the
    resumed rank's memory is back on its device.  On CUDA the C kernel was never built.  The run that never
    stopped is gradcomp's own launcher's, with ``--device auto`` where that is ``device`` (one local rank)."""
    flags = [*SMALL, "--device", device]
    # where a GPU run would build the kernel (the CPU runs use the usual cache: built once, not per test)
    cache = {"GRADCOMP_CACHE": str(tmp_path / "kernel-cache")} if device == "cuda" else {}
    auto = "auto" if device == ("cuda" if HAS_CUDA else "cpu") else device
    assert main(["train", *SMALL, "--device", auto, "--run-dir", str(tmp_path / "full")]) == 0
    _torchrun(tmp_path, *flags, "--max-steps", str(STOP), "--run-dir", str(tmp_path / "part"), **cache)
    ckpt = torch.load(RunDir(tmp_path / "part").checkpoint_path, weights_only=True)  # no map_location
    assert {str(t.device) for t in state_tensors(ckpt)} == {"cpu"}
    assert ckpt["steps"] == STOP and set(ckpt["rng"][0]) == ({"torch", "cuda"} if device == "cuda" else {"torch"})
    assert ckpt["methods"][0]["memory"]["v"], "no DGC memory in the checkpoint"
    # the run's own settings come from its config.json: only the device (and what else may change) is given
    resumed = _torchrun(tmp_path, "--device", device, "--no-progress", "--resume", str(tmp_path / "part"), **cache)
    where = "cuda:0" if device == "cuda" else "cpu"
    assert f"rank 0 resumed at step {STOP}, its gradcomp state on {where}\n" in resumed.stderr, resumed.stderr[-2000:]
    assert_same_run(tmp_path / "full", tmp_path / "part")
    assert [RunDir(tmp_path / d).read_config()["launch"]["device"] for d in ("full", "part")] == [device, device]
    if device == "cuda":
        assert not list((tmp_path / "kernel-cache").glob("kernels-*.so")), "DGC's C kernel was built on CUDA"


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("front", ["simulated", "dga", "fedavg"])
def test_every_front_door_trains_on_cuda_and_resumes_bit_identically(tmp_path, front):
    door = {"simulated": dict(launch={"simulate": True, "workers": 2}), "dga": dict(averaging=Averaging(dga_delay=2)),
            "fedavg": dict(exchange=Exchange(method="none"), averaging=Averaging(fedavg_period=2))}[front]
    cfg = TrainConfig(data=Data(limit_train=256, limit_test=100, batch_size=16), schedule=Schedule(epochs=2),
                      launch=Launch(device="cuda", workers=1), output=Output(progress=False)).replace(**door)
    run(cfg.replace(output={"run_dir": str(tmp_path / "full")}), echo=lambda _: None)
    run(cfg.replace(output={"run_dir": str(tmp_path / "part")}, schedule={"max_steps": STOP}), echo=lambda _: None)
    assert RunDir(tmp_path / "part").read_config()["launch"]["device"] == "cuda"
    run(cfg, resume=str(tmp_path / "part"), echo=lambda _: None)

    assert_same_run(tmp_path / "full", tmp_path / "part")


# ---------------------------------------------------------------- DGC's C kernel: never built for CUDA tensors


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
def test_a_dgc_step_on_cuda_never_builds_the_kernel_that_float32_cpu_tensors_do(monkeypatch):
    """A step on a GPU never compiles the C kernel (with ``-march=native``, for a CPU it will not run on), while
    the same step on float32 CPU tensors does ask for it (here refused, so the torch ops run): the control that
    shows the count below would see a build."""
    builds = []

    def build(compiler):
        builds.append(compiler)
        raise OSError("not built in this test")

    def step(device):
        method = DGC(warmup_epochs=0, sparsify_all=True, density=0.1)
        return method.sparsify({"w": torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).to(device)})

    monkeypatch.setenv("GRADCOMP_KERNELS", "1")
    monkeypatch.setattr(kernels, "_build", build)
    kernels.library.cache_clear()
    try:
        step("cuda")
        assert builds == []
        with pytest.warns(RuntimeWarning, match="not built in this test"):
            step("cpu")
        assert len(builds) == 1
    finally:
        kernels.library.cache_clear()  # the next user loads the real kernel again
