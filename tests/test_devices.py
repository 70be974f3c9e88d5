"""The hook, a DCP round trip and the Lightning callback on each device: CPU (gloo) in the default suite, CUDA
(NCCL) where a GPU is (marked ``gpu``; CI has none and skips it).  World size 1: one GPU holds one NCCL rank."""

import pytest
import torch

pytest.importorskip("pytorch_lightning")

from gradcomp.launch import spawn  # noqa: E402
from test_lightning import same  # noqa: E402

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                         reason="no CUDA device")])


def run(device, root):
    from device_workers import run_all

    backend = "nccl" if device == "cuda" else "gloo"
    return spawn(run_all, 1, device, str(root), backend=backend, timeout_s=120, deadline_s=300)[0]


@pytest.fixture(scope="module", params=["cpu", CUDA])
def runs(request, tmp_path_factory):
    return request.param, run(request.param, tmp_path_factory.mktemp(f"on-{request.param}"))


@pytest.mark.parametrize("kind", ["topk", "dgc"])
def test_hook_sends_compressed_and_dcp_resumes_bit_identically(runs, kind):
    device, out = runs
    hook = out[f"{kind}_hook"]
    assert hook["bytes"] > 0 and hook["memory_device"] == [device if device == "cpu" else "cuda:0"]
    assert same(out[f"{kind}_hook_resumed"]["params"], hook["params"])


@pytest.mark.parametrize("kind", ["topk", "dgc"])
def test_lightning_callback_equals_the_hook_and_resumes_bit_identically(runs, kind):
    device, out = runs
    fitted = out[f"{kind}_lightning"]
    assert fitted["device"].startswith(device) and fitted["bytes"] == out[f"{kind}_hook"]["bytes"] > 0
    torch.testing.assert_close(fitted["params"], out[f"{kind}_hook"]["params"], rtol=1e-12, atol=1e-12)
    assert same(out[f"{kind}_lightning_resumed"]["params"], fitted["params"])
    assert out[f"{kind}_lightning_resumed"]["restored"]["method"]["steps"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_trains_as_cpu_does(tmp_path):
    """Exact top-k through the hook on CUDA (NCCL) against the same run on CPU (gloo), float64."""
    cpu, cuda = run("cpu", tmp_path / "cpu"), run("cuda", tmp_path / "cuda")
    torch.testing.assert_close(cuda["topk_hook"]["params"], cpu["topk_hook"]["params"], rtol=1e-9, atol=1e-9)
    assert cuda["topk_hook"]["bytes"] == cpu["topk_hook"]["bytes"]
