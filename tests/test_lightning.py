"""gradcomp.lightning.GradientCompression: real 2-process Lightning DDP runs on gloo, against plain DDP."""

import ast
import os
import pathlib
import shutil
import subprocess

import pytest
import torch

pl = pytest.importorskip("pytorch_lightning")

import gradcomp  # noqa: E402
from gradcomp.launch import spawn  # noqa: E402
from gradcomp.lightning import GradientCompression  # noqa: E402
from lightning_workers import README_EXAMPLE  # noqa: E402

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "gradcomp"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from lightning_workers import run_all

    root = tmp_path_factory.mktemp("lightning")
    return root, spawn(run_all, 2, str(root), timeout_s=60, deadline_s=240)


def same(a, b):
    """Equal bit for bit: nested dicts and lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def lightning_names(params):
    """Plain DDP's parameter names as the LightningModule (``self.net``) names them."""
    return {f"net.{name}": p for name, p in params.items()}


def test_the_callback_trains_as_plain_ddp_with_the_hook(runs):
    """Under Lightning on CPU the callback's run equals plain DDP + register_ddp_hook bit for bit, sends the same
    bytes, and differs from Lightning's dense DDP (what DDPStrategy(ddp_comm_hook=...) silently trains on CPU)."""
    _, out = runs
    for rank in out:
        assert same(rank["dgc"], lightning_names(rank["ref"]))
        assert rank["dgc_bytes"] == rank["ref_bytes"] > 0
        assert not same(rank["dgc"], rank["dense"])
    assert same(out[0]["dgc"], out[1]["dgc"])


def test_resume_from_a_checkpoint_is_bit_identical(runs):
    """fit(ckpt_path=the first epoch's checkpoint) into a fresh model and callback ends where the run that never
    stopped ended, on both ranks; without gradcomp's entry in the checkpoint it does not (and says so)."""
    _, out = runs
    for rank in out:
        assert same(rank["resumed"], rank["dgc"])
        assert not same(rank["amnesic"], rank["dgc"])
        assert len(rank["amnesic_warned"]) == 1 and "holds no gradcomp state" in rank["amnesic_warned"][0]


def test_every_rank_restores_its_own_memory(runs):
    """The checkpoint (written by rank 0) holds each rank's own state; on resume rank 1 gets rank 1's, not rank
    0's (the ranks' DGC memories differ: each accumulates its own gradients)."""
    root, out = runs
    saved = torch.load(root / "checkpoints" / "epoch=0.ckpt", weights_only=True)["callbacks"]["GradientCompression"]
    assert saved["world_size"] == 2 and saved["method"] == gradcomp.DGC(density=0.01, warmup_epochs=0).config()
    assert not same(out[0]["dgc_epoch0"], out[1]["dgc_epoch0"])
    for r, rank in enumerate(out):
        assert rank["dgc_epoch0"]["method"]["steps"] == 8 and rank["dgc_epoch0"]["method"]["memory"]["v"]
        assert same(saved["ranks"][r], rank["dgc_epoch0"])
        assert same(rank["restored"], rank["dgc_epoch0"])


def test_a_nonfinite_gradient_on_one_rank_skips_the_step_on_every_rank(runs):
    """An Inf in rank 1's loss at step 3 (momentum SGD with weight decay, which would move zeroed weights): the
    weights after step 3 are those after step 2 on both ranks, training goes on, and the run equals plain DDP whose
    loop skips optimizer.step() when the hook says so."""
    _, out = runs
    for rank in out:
        steps = rank["skip_steps"]
        assert len(steps) == 8
        assert same(steps[3], steps[2])
        assert all(not same(steps[i], steps[i - 1]) for i in range(1, 8) if i != 3)
        assert rank["skip_count"] == rank["skip_ref_count"] == 1
        assert same(rank["skip_final"], lightning_names(rank["skip_ref"]))
    assert same(out[0]["skip_final"], out[1]["skip_final"])


def test_16_mixed_hands_lightnings_grad_scaler_to_the_hook(runs):
    """precision "16-mixed": an Inf on rank 1 at step 3 halves both ranks' loss scale once (GradScaler's backoff
    from its initial 2**16), and with power-of-two scales on a float64 model the run ends bit for bit where the
    same run without a scaler does (the hook divides the scale out before top-k and multiplies it back)."""
    _, out = runs
    for rank in out:
        assert rank["amp_scale"] == 2.0**15 and rank["amp_skipped"] == 1
        assert same(rank["amp_final"], rank["skip_final"])


def test_an_optimizer_with_momentum_is_refused_for_dgc(runs):
    _, out = runs
    for rank in out:
        message = rank["momentum_error"]
        assert message.startswith("ValueError: DGC applies momentum itself") and "gradcomp.sgd_settings" in message


def test_a_checkpoint_of_another_method_config_or_world_size_is_refused(runs):
    _, out = runs
    for rank in out:
        assert rank["config_error"] == ("ValueError: GradientCompression: checkpoint saved with another method config "
                                        "(density: 0.01 in the checkpoint, 0.02 in this run)")
        assert rank["world_error"].startswith("ValueError: GradientCompression: checkpoint saved by 4 ranks, this run "
                                              "has 2")
        assert "\n" not in rank["config_error"] + rank["world_error"]


def test_a_strategy_that_is_not_ddp_is_refused(digits):
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_workers import Digits

    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, precision="64-true", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[GradientCompression("topk")])
    with pytest.raises(ValueError, match=r"needs Lightning's DDPStrategy .*found SingleDeviceStrategy"):
        trainer.fit(Digits(), DataLoader(TensorDataset(*digits), batch_size=32))


def test_the_callback_is_built_and_checked_before_any_process_group():
    import torch.distributed as dist

    assert not dist.is_initialized()
    assert GradientCompression("topk").state is None
    assert GradientCompression(gradcomp.DGC(density=0.01), nonfinite="raise").nonfinite == "raise"
    with pytest.raises(ValueError, match="unknown compressor or method 'nope'"):
        GradientCompression("nope")
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        GradientCompression("topk", nonfinite="ignore")
    with pytest.raises(TypeError, match="expected a gradcomp Method"):
        GradientCompression(0.01)


def test_import_gradcomp_does_not_import_lightning():
    """Only gradcomp/lightning.py imports Lightning (statically: every other module's import statements)."""
    for path in SRC.rglob("*.py"):
        if path == SRC / "lightning.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names), path


def test_readme_example(runs):
    """The README example, run by both workers of the shared gloo group (Lightning finds it initialised): it
    compresses, and its gradcomp.shutdown() ends the group with no gloo thread left behind."""
    _, out = runs
    for rank in out:
        assert rank["readme_bytes"] > 0 and rank["readme_ended_group"] and rank["readme_warnings"] == []
    assert out[0]["readme_bytes"] == out[1]["readme_bytes"]


@pytest.mark.slow  # ~10-20 s of process start-ups and imports: the fast variant is test_readme_example
@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_example(tmp_path):
    """The README example, as a user runs it: torchrun starts the ranks, Lightning creates the group."""
    script = tmp_path / "lightning_example.py"
    script.write_text(README_EXAMPLE)
    path = os.pathsep.join(p for p in (str(SRC.parent), os.environ.get("PYTHONPATH")) if p)  # this checkout's gradcomp
    proc = subprocess.run(["torchrun", "--standalone", "--nproc-per-node", "2", str(script)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "outlived destroy_process_group" not in proc.stderr
    sent = sorted(line for line in proc.stdout.splitlines() if "bytes" in line)
    assert len(sent) == 2 and sent[0].startswith("rank 0: sent ") and sent[1].startswith("rank 1: sent ")
    assert all(int(line.split()[3]) > 0 for line in sent)


def test_the_manual_shows_this_example_verbatim():
    from lightning_workers import README_EXAMPLE

    page = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    assert README_EXAMPLE in page
