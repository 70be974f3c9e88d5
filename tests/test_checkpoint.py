"""Every rank's gradcomp state in torch.distributed.checkpoint and in Accelerate checkpoints (gradcomp.checkpoint).

Real gloo processes: a run checkpointed at step K and resumed in a fresh model, optimizer and hook (whose memory
does not exist yet) ends bit-identical to a run that never stopped, on every rank, and each rank gets its own
memory back; checkpoints of another number of ranks, density or model are refused with the difference named.
"""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gradcomp
from gradcomp.checkpoint import RankState, load_rank_state, rank_file, save_rank_state
from gradcomp.launch import free_port, spawn
from helpers import exchange_step

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
K = 3  # the workers' checkpoint step (checkpoint_workers.K, accelerate_resume.K)


def same(a, b):
    """Nested state dicts equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def tensors(state):
    """Every tensor of a nested state dict."""
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in tensors(v)]
    return []


@pytest.fixture(scope="module")
def dcp_runs(tmp_path_factory, digits):
    """Every DCP case in one 2-rank gloo job (one process start-up): reference, resume, refusals."""
    from checkpoint_workers import dcp_two_ranks

    root = str(tmp_path_factory.mktemp("dcp"))
    return root, spawn(dcp_two_ranks, 2, root, digits, timeout_s=60, deadline_s=120)


@pytest.mark.parametrize("method", ["DGC", "topk"])
def test_dcp_resume_in_a_fresh_hook_is_bit_identical_on_every_rank(dcp_runs, method):
    _, two = dcp_runs
    for rank, out in enumerate(two):
        run = out[method]
        assert not tensors(run["fresh"]["method"]["memory"]) and run["fresh"]["method"]["steps"] == 0
        for name, reference in run["reference"].items():
            assert torch.equal(run["resumed"][name], reference), f"rank {rank}: {name}"


@pytest.mark.parametrize("method", ["DGC", "topk"])
def test_dcp_each_rank_gets_its_own_memory_back(dcp_runs, method):
    _, two = dcp_runs
    saved = [out[method]["saved"] for out in two]
    assert not same(saved[0]["method"]["memory"], saved[1]["method"]["memory"])  # the ranks' memories differ
    assert tensors(saved[1]["method"]["memory"])
    for rank, out in enumerate(two):
        assert same(out[method]["restored"], saved[rank])
        assert out[method]["restored"]["method"]["steps"] == K


def test_dcp_stores_one_bytes_entry_per_rank_readable_with_weights_only(dcp_runs):
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    root, two = dcp_runs
    stored = FileSystemReader(f"{root}/DGC").read_metadata().state_dict_metadata
    assert {k for k in stored if k.startswith("gradcomp.")} == {"gradcomp.meta", "gradcomp.rank0", "gradcomp.rank1"}
    assert all(isinstance(stored[k], BytesStorageMetadata) for k in ("gradcomp.meta", "gradcomp.rank1"))
    for rank, out in enumerate(two):
        entry = out["DGC"]["entry"]
        assert entry.keys() == {"meta", f"rank{rank}"}
        meta = torch.load(io.BytesIO(entry["meta"]), weights_only=True)
        assert meta["world_size"] == 2 and meta["method"]["density"] == 0.01
        assert meta["parameters"] is None  # RankState(state) without model: parameters not recorded
        mine = torch.load(io.BytesIO(entry[f"rank{rank}"]), weights_only=True)
        assert mine["rank"] == rank and same(mine["state"], out["DGC"]["saved"])


def assert_refused(out, key, message):
    assert out[key] == f"ValueError: gradcomp checkpoint {message}; gradcomp's state was not loaded"
    assert "\n" not in out[key]
    untouched = out[f"{key}_untouched"]["method"]
    assert not tensors(untouched["memory"]) and untouched["steps"] == 0


def test_dcp_refuses_another_density(dcp_runs):
    for out in dcp_runs[1]:
        assert_refused(out, "density", "saved with density=0.01, this run has density=0.02")
        assert out["density_params_unchanged"]


def test_dcp_refuses_another_model(dcp_runs):
    for out in dcp_runs[1]:
        assert_refused(out, "model", "saved parameter '0.weight' as [48, 64] float64, this run's model has "
                                     "[32, 64] float64; saved parameter '0.bias' as [48] float64, this run's model "
                                     "has [32] float64; saved parameter '2.weight' as [10, 48] float64, this run's "
                                     "model has [10, 32] float64")


def test_dcp_refuses_a_checkpoint_of_more_ranks(dcp_runs):
    """Saved by 2 ranks, loaded by 1 (each rank alone, DCP's process_group): the rank finds its entry and the
    fingerprint refuses.  DCP has loaded the model and optimizer entries of the same dcp.load in place by
    then; gradcomp's state is untouched."""
    for out in dcp_runs[1]:
        assert_refused(out, "more", "saved by 2 ranks, this run has 1")


def test_dcp_refuses_a_checkpoint_of_fewer_ranks_before_reading_anything(dcp_runs):
    """Saved by 1 rank, loaded by 2: rank 1 has no entry, so DCP's load planner stops every rank first, naming
    the missing rank's entry; nothing of any entry was read."""
    for out in dcp_runs[1]:
        assert out["fewer"].startswith("CheckpointException: CheckpointException ranks:dict_keys([1])")
        assert "RuntimeError: Missing key in checkpoint state_dict: gradcomp.rank1." in out["fewer"]
        assert out["fewer_params_unchanged"]
        untouched = out["fewer_untouched"]["method"]
        assert not tensors(untouched["memory"]) and untouched["steps"] == 0


def test_rank_files_round_trip_and_refusals_in_one_process(tmp_path):
    """save_rank_state / load_rank_state without a process group (rank 0 of 1): a method with memory."""
    method = gradcomp.as_method(gradcomp.get("topk", density=0.25))
    grad = torch.linspace(-1, 1, 64, dtype=torch.float64).view(8, 8)
    exchange_step([method], [{"w": grad}])
    model = {"w": torch.zeros(8, 8, dtype=torch.float64)}
    path = save_rank_state(method, tmp_path, model=model)
    assert path == rank_file(tmp_path, 0) == tmp_path / "gradcomp_rank0.pt"
    stored = torch.load(path, weights_only=True)
    assert stored["meta"] == {"format": 1, "world_size": 1, "method": method.config(),
                              "parameters": {"w": "[8, 8] float64"}}

    fresh = gradcomp.as_method(gradcomp.get("topk", density=0.25))
    load_rank_state(fresh, tmp_path, model=model)
    assert same(fresh.state_dict(), method.state_dict()) and tensors(fresh.state_dict()["memory"])

    other = gradcomp.as_method(gradcomp.get("topk", density=0.5))
    with pytest.raises(ValueError, match=r"^gradcomp checkpoint .* saved with density=0.25, this run has "
                                         r"density=0.5; nothing was loaded$"):
        load_rank_state(other, tmp_path, model=model)
    assert not tensors(other.state_dict()) and other.steps == 0
    other = gradcomp.as_method(gradcomp.get("topk", density=0.25))
    with pytest.raises(ValueError, match=r"saved parameter 'w' as \[8, 8\] float64, this run's model has "
                                         r"\[4\] float64"):
        load_rank_state(other, tmp_path, model={"w": torch.zeros(4, dtype=torch.float64)})
    assert not tensors(other.state_dict()) and other.steps == 0
    with pytest.raises(ValueError, match="holds no gradcomp state"):
        load_rank_state(fresh, tmp_path / "elsewhere")
    (tmp_path / "more").mkdir()
    os.replace(path, tmp_path / "more" / "gradcomp_rank1.pt")  # a directory with rank 1's file only
    with pytest.raises(ValueError, match=r"saved by 1 rank, this run has 1 \(no gradcomp_rank0.pt\)"):
        load_rank_state(fresh, tmp_path / "more")

    with pytest.raises(TypeError, match="state_dict"):
        RankState(object())


# ------------------------------------------------------------------ Accelerate


def launcher(name, port):
    """The command that starts tests/accelerate_resume.py in 2 processes.  ``accelerate launch --multi_gpu`` runs
    torchrun's agent in-process; ``--cpu --num_processes 2`` would start a single process (Accelerate's simple
    launcher, whose multi-CPU mode needs mpirun).  ACCELERATE_USE_CPU=true makes Accelerator() use gloo on CPU."""
    if name == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port)]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(port)]


# torchrun alone: the same worker code as under accelerate launch (which runs torchrun's agent), 7 s more
@pytest.fixture(scope="module", params=["accelerate", pytest.param("torchrun", marks=pytest.mark.slow)])
def accelerate_run(request, tmp_path_factory, digits):
    """tests/accelerate_resume.py under a real launcher, 2 gloo CPU processes; what each rank saw."""
    pytest.importorskip("accelerate")
    out = tmp_path_factory.mktemp(request.param)
    torch.save(digits, out / "data.pt")
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "HF_HOME": str(out / "hf"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    command = launcher(request.param, free_port()) + [str(TESTS / "accelerate_resume.py"), str(out)]
    proc = subprocess.run(command, env=env, cwd=TESTS, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "outlived destroy_process_group" not in proc.stderr
    return out, [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_accelerate_launch_runs_two_gloo_processes(accelerate_run):
    for out in accelerate_run[1]:
        assert out["multi_cpu"] and out["world"] == 2 and out["backend"] == "gloo"


def test_accelerate_resume_is_bit_identical_and_each_rank_gets_its_own_memory(accelerate_run):
    root, outs = accelerate_run
    assert not same(outs[0]["saved"]["method"]["memory"], outs[1]["saved"]["method"]["memory"])
    for rank, out in enumerate(outs):
        assert same(out["restored"], out["saved"]) and out["restored"]["method"]["steps"] == K
        for name, reference in out["reference"].items():
            assert torch.equal(out["resumed"][name], reference), f"rank {rank}: {name}"
        stored = torch.load(rank_file(root / "ckpt", rank), weights_only=True)
        assert stored["rank"] == rank and same(stored["state"], out["saved"])
        assert stored["meta"]["world_size"] == 2 and stored["meta"]["parameters"]["0.weight"] == "[48, 64] float64"


def test_accelerate_refuses_another_density_before_loading_anything(accelerate_run):
    root, outs = accelerate_run
    for out in outs:
        assert out["refused"] == (f"gradcomp checkpoint {root / 'ckpt'} saved with density=0.01, this run has "
                                  "density=0.02; nothing was loaded")
        assert not tensors(out["untouched"]["method"]["memory"]) and out["untouched"]["method"]["steps"] == 0
        assert out["params_unchanged"]  # the pre-hook refused before Accelerate loaded the model
