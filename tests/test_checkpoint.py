"""Every rank's gradcomp state in torch.distributed.checkpoint (gradcomp.checkpoint.RankState).

Real gloo processes: a run checkpointed at step K and resumed in a fresh model, optimizer and hook (whose memory
does not exist yet) ends bit-identical to a run that never stopped, on every rank, and each rank gets its own
memory back; checkpoints of another number of ranks, density or model are refused with the difference named.
"""

import io

import pytest
import torch

from gradcomp.checkpoint import RankState
from gradcomp.launch import spawn

K = 3  # the workers' checkpoint step (checkpoint_workers.K)


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
