"""Damaged checkpoints and states that do not fit: refused in one line, never trained on, never a crash.

A real ``gradcomp train`` checkpoint gets a flipped byte or a zeroed 4 KiB block inside a tensor's data (which
``torch.load`` alone accepts), NaN weights, or a method memory of the wrong shape: ``--resume`` exits 2 with a
one-line error naming the file and the entry, and the run directory is left as it was.  The design keeps
``checkpoint.prev.pt`` and says how to resume from it; nothing falls back silently.  The library's own per-rank
files are verified the same way, and wrong states loaded through the public ``load_state_dict`` of DGC, a
Method and a HookState raise a ValueError naming the entry (run in a subprocess: a kernel writing out of
bounds would show as a negative return code).
"""

import io
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from gradcomp.checkpoint import RankState, load_rank_state, save_rank_state
from gradcomp.method import DGC
from gradcomp.train.config import Data, Launch, Output, Schedule, TrainConfig
from gradcomp.train.loop import run
from gradcomp.train.rundir import RunDir
from helpers import exchange_step
from test_resume import _refused

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A simulated 2-worker DGC run stopped at step 2, checkpointing every step (step 1's kept as prev)."""
    path = tmp_path_factory.mktemp("damaged") / "run"
    run(TrainConfig(data=Data(limit_train=256, limit_test=100), schedule=Schedule(epochs=1, max_steps=2),
                    launch=Launch(workers=2, simulate=True),
                    output=Output(run_dir=str(path), checkpoint_every=1, progress=False)), echo=lambda _: None)

    assert RunDir(path).prev_checkpoint_path.is_file()
    return path


def data_region(data: bytes, smallest: int = 4096) -> tuple[str, int, int]:
    """The largest tensor's data in a torch.save archive (an entry ``*/data/N``): (entry, start, size)."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        info = max((i for i in archive.infolist() if re.search(r"/data/\d+$", i.filename)), key=lambda i: i.file_size)
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size >= smallest
    at = info.header_offset
    name_len, extra_len = struct.unpack("<HH", data[at + 26:at + 30])  # the local header's own lengths
    return info.filename, at + 30 + name_len + extra_len, info.file_size


def flip_byte(data: bytes) -> tuple[bytes, str]:
    entry, start, size = data_region(data)
    out = bytearray(data)
    out[start + size // 2] ^= 0x10
    return bytes(out), entry


def zero_block(data: bytes) -> tuple[bytes, str]:
    entry, start, size = data_region(data)
    at = start + (size - 4096) // 2
    assert any(data[at:at + 4096])
    return data[:at] + bytes(4096) + data[at + 4096:], entry


def resume_refused(tmp_path, good, capsys, damage):
    """Resume a damaged copy through the CLI (test_resume's ``_refused``: exit 2, nothing changed): the error,
    one line."""
    err = _refused(tmp_path, good, damage, capsys).strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("damage", [flip_byte, zero_block])
def test_damaged_tensor_data_is_refused_naming_the_file_and_entry(tmp_path, good, capsys, damage):
    entries = []

    def apply(path):
        data, entry = damage(path.read_bytes())
        path.write_bytes(data)
        entries.append(entry)
        assert torch.load(path, weights_only=True)["steps"] == 2  # torch.load alone takes the damaged bytes

    err = resume_refused(tmp_path, good, capsys, apply)
    path = RunDir(tmp_path / "copy")
    assert (f"checkpoint {str(path.checkpoint_path)!r} is corrupt: entry {entries[0]!r} does not match the "
            "CRC-32 written with it (damaged bytes); the checkpoint saved before it is kept: to resume from it, "
            f"move {str(path.prev_checkpoint_path)!r} to {str(path.checkpoint_path)!r}") in err


def resave(change):
    def damage(path):
        state = torch.load(path, weights_only=True)
        change(state)
        torch.save(state, path)  # CRCs that match: only the values are wrong
    return damage


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, good, capsys):
    err = resume_refused(tmp_path, good, capsys, resave(lambda s: s["model"]["net.1.weight"].view(-1)[7:9].fill_(
        float("nan"))))
    assert "holds non-finite values (NaN or Inf) in model['net.1.weight']; refusing to train from it" in err


def test_non_finite_method_memory_is_refused_naming_it(tmp_path, good, capsys):
    err = resume_refused(tmp_path, good, capsys, resave(
        lambda s: s["methods"][1]["memory"]["v"]["net.3.weight"].view(-1)[0].fill_(float("inf"))))
    assert "holds non-finite values (NaN or Inf) in methods[1]['memory']['v']['net.3.weight']" in err


def test_method_memory_that_does_not_fit_the_model_is_refused(tmp_path, good, capsys):
    err = resume_refused(tmp_path, good, capsys, resave(
        lambda s: s["methods"][1]["memory"]["u"].update({"net.1.weight": torch.zeros(3)})))
    assert ("worker 1's DGC state memory.u['net.1.weight'] is [3] torch.float32, its parameter [256, 64] "
            "torch.float32") in err


def stepped_dgc():
    method = DGC(density=0.05, min_numel=16, warmup_steps=0)
    g = torch.Generator().manual_seed(0)
    exchange_step([method], [{"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)}])
    return method


def test_rank_files_and_dcp_entries_are_verified(tmp_path):
    method = stepped_dgc()
    path = save_rank_state(method, tmp_path)
    data, entry = flip_byte(path.read_bytes())
    path.write_bytes(data)
    fresh = DGC(density=0.05, min_numel=16, warmup_steps=0)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} is corrupt: entry {re.escape(repr(entry))} "
                                         r"does not match the CRC-32 written with it \(damaged bytes\)$"):
        load_rank_state(fresh, tmp_path)
    assert fresh.state_dict()["memory"]["u"] == {}  # nothing loaded
    saved = RankState(method).state_dict()
    damaged, entry = zero_block(saved["rank0"])
    with pytest.raises(ValueError, match=r"^gradcomp checkpoint entry 'rank0' is corrupt: entry .* CRC-32"):
        RankState(fresh).load_state_dict({**saved, "rank0": damaged})
    RankState(fresh).load_state_dict(saved)  # the undamaged entry loads
    assert torch.equal(fresh.memory.u["w"], method.memory.u["w"])


def test_states_that_do_not_fit_raise_value_errors_and_never_reach_the_kernel(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(TESTS / "damaged_workers.py"), str(tmp_path / "store")], env=env,
                          cwd=TESTS, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"return code {proc.returncode} (negative: a crash)\n{proc.stderr[-3000:]}"
    lines = proc.stdout.splitlines()
    assert lines[-1] == "done, compiled kernel used"
    got = {line.split(":", 1)[0]: line.split(": ", 1)[1] for line in lines[:-1]}
    assert len(got) == 4 * 5
    assert got["dgc memory.u.0.weight shape"] == ("DGCMemory.u['0.weight'] is [3] torch.float32 on cpu, its "
                                                  "gradient [64, 64] torch.float32 on cpu: the loaded state does "
                                                  "not fit this model")
    assert got["dgc memory.u.0.weight dtype"].startswith("DGCMemory.u['0.weight'] is [64, 64] torch.float64 on cpu")
    assert got["dgc memory.u.0.weight device"] == ("DGC state memory.u['0.weight'] is a torch.float32 strided tensor "
                                                   "on meta, expected a dense floating-point tensor holding data")
    assert got["dgc memory.u.0.weight non-tensor"] == ("DGC state memory.u['0.weight'] is a list, expected a "
                                                       "floating-point tensor")
    assert got["dgc-dense dense_momentum.buffers.0.bias shape"].startswith("Momentum.buffers['0.bias'] is [3]")
    assert got["topk memory.residuals.0.weight shape"].startswith("Residual.residuals['0.weight'] is [3]")
    assert got["hook method.memory.v.0.weight shape"] == ("DGC state memory.v['0.weight'] is [3] torch.float32, its "
                                                          "parameter [64, 64] torch.float32")
    assert all("\n" not in message for message in got.values())
