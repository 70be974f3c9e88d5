"""The GPT model, the AdamW optimizer of `gradcomp train`, and the quick `gradcomp reproduce gpt` through the CLI.

Figures are computed here from the model's shapes (parameters, bytes per step), not taken from the study's report.
"""

import math

import pytest
import torch

from gradcomp.cli import main
from gradcomp.train.config import Data, Exchange, Launch, Model, Optim, Output, Schedule, TrainConfig
from gradcomp.train.loop import run
from gradcomp.train.models import GPT, build_model, count_parameters
from gradcomp.train.rundir import RunDir
from helpers import assert_same, need_datasets, quick_study

# ---------------------------------------------------------------- the model


def test_gpt_is_causal():
    """Changing a later token changes no earlier position's logits (and does change its own)."""
    torch.manual_seed(0)
    model = GPT(50, layers=2, d=32, heads=4, context=16).eval()
    tokens = torch.randint(0, 50, (3, 16))
    changed = tokens.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 50
    with torch.no_grad():
        before, state = model(tokens)
        after, _ = model(changed)
    assert before.shape == (3, 16, 50) and state is None
    torch.testing.assert_close(before[:, :9], after[:, :9], rtol=0, atol=0)
    assert not torch.allclose(before[:, 9:], after[:, 9:])


def test_gpt_ties_the_decoder_and_counts_parameters_by_hand():
    vocab, layers, d, context = 65, 4, 128, 128
    model = build_model("gpt", "shakespeare", bptt=context)
    assert (model.layers, model.d, model.heads, model.context) == (layers, d, 4, context)
    assert model.decoder.weight is model.tok_emb.weight and model.decoder.bias is None
    block = (2 * d + 2 * d  # two LayerNorms, weight and bias
             + d * 3 * d + 3 * d  # qkv
             + d * d + d  # attention output projection
             + d * 4 * d + 4 * d + 4 * d * d + d)  # MLP
    expected = vocab * d + context * d + layers * block + 2 * d  # the decoder shares the token embedding
    assert count_parameters(model) == expected == 818_048
    assert len(list(model.parameters())) == 2 + 12 * layers + 2


def test_gpt_context_and_option_errors():
    model = GPT(10, layers=1, d=8, heads=2, context=16)
    assert model(torch.zeros(2, 16, dtype=torch.long))[0].shape == (2, 16, 10)
    with pytest.raises(ValueError, match=r"^sequence length 17 exceeds the GPT's context of 16 tokens$"):
        model(torch.zeros(2, 17, dtype=torch.long))
    assert build_model("gpt", "shakespeare", bptt=35).context == 35  # the loop's window unless given
    assert build_model("gpt", "shakespeare", bptt=35, context=64).context == 64
    with pytest.raises(ValueError, match=r"^d must be a multiple of heads, got d=10, heads=4$"):
        GPT(10, d=10, heads=4)
    with pytest.raises(ValueError, match=r"^layers must be an integer >= 1, got 0$"):
        build_model("gpt", "shakespeare", layers=0)
    with pytest.raises(ValueError, match=r"^dropout must be in \[0, 1\), got 1.0$"):
        GPT(10, dropout=1.0)
    with pytest.raises(ValueError, match="context=16 is shorter than TrainConfig.data.bptt=35"):
        TrainConfig(data=Data(dataset="shakespeare", bptt=35), model=Model(name="gpt", options={"context": 16}))


# ---------------------------------------------------------------- AdamW in gradcomp train


def test_adamw_refuses_momentum(capsys, tmp_path):
    with pytest.raises(ValueError, match=r"^TrainConfig.optim.momentum=0.9 with name='adamw'"):
        Optim(name="adamw", momentum=0.9)
    with pytest.raises(ValueError, match=r"^TrainConfig.optim.name must be one of sgd, adamw, got 'adam'$"):
        Optim(name="adam")
    with pytest.raises(ValueError, match=r"^TrainConfig.exchange.options momentum=0.9 with optim.name='adamw'"):
        TrainConfig(optim=Optim(name="adamw", momentum=0.0),  # DGC's own option
                    exchange=Exchange(method="dgc", options={"momentum": 0.9}))
    assert main(["train", "--optimizer", "adamw", "--momentum", "0.9", "--simulate", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gradcomp train: error: TrainConfig.optim.momentum=0.9 with name='adamw'")
    assert len(err.splitlines()) == 1
    # without --momentum, adamw trains with momentum 0 (sgd keeps its 0.9)
    assert main(["train", "--optimizer", "adamw", "--lr", "0.01", "--compressor", "none", "--simulate", "--workers",
                 "2", "--epochs", "1", "--limit-train", "64", "--limit-test", "50", "--run-dir",
                 str(tmp_path / "run"), "--no-progress"]) == 0
    saved = RunDir(tmp_path / "run").read_config()["optim"]
    assert (saved["name"], saved["momentum"]) == ("adamw", 0.0)
    assert "betas" in RunDir(tmp_path / "run").load_checkpoint()["optimizer"]["param_groups"][0]


def _checkpoint_state(path):
    ckpt = RunDir(path).load_checkpoint()
    return {k: ckpt[k] for k in ("model", "optimizer", "methods", "simulator", "rng", "epoch", "epoch_step", "steps",
                                 "bytes_sent", "lr_warmup")}


def test_adamw_dgc_resume_mid_epoch_is_bit_identical(tmp_path):
    """AdamW's moments travel with the checkpoint: stopped at step 3 and resumed, DGC(momentum=0) with AdamW ends
    where the unbroken run does (digits, 2 simulated workers, 3 epochs of 2 steps, warm-up in progress at the stop)."""
    cfg = TrainConfig(data=Data(limit_train=128, limit_test=100), schedule=Schedule(epochs=3),
                      launch=Launch(workers=2, simulate=True), output=Output(progress=False),
                      exchange=Exchange(method="dgc", options={"warmup_epochs": 2}),
                      optim=Optim(name="adamw", momentum=0.0, lr=0.01, weight_decay=0.01))
    run(cfg.replace(output={"run_dir": str(tmp_path / "full")}), plot=False, echo=lambda _: None)
    stopped = run(cfg.replace(output={"run_dir": str(tmp_path / "part")}, schedule={"max_steps": 3}), plot=False,
                  echo=lambda _: None)
    assert stopped == {"stopped_after_step": 3}
    state = RunDir(tmp_path / "part").load_checkpoint()["optimizer"]
    assert state["param_groups"][0]["betas"] == (0.9, 0.999) and state["param_groups"][0]["weight_decay"] == 0.01
    assert all("exp_avg_sq" in s for s in state["state"].values()) and state["state"]
    run(cfg, resume=str(tmp_path / "part"), plot=False, echo=lambda _: None)

    assert_same(_checkpoint_state(tmp_path / "full"), _checkpoint_state(tmp_path / "part"))
    assert [m["test_loss"] for m in RunDir(tmp_path / "full").read_metrics()] == \
        [m["test_loss"] for m in RunDir(tmp_path / "part").read_metrics()]


# ---------------------------------------------------------------- the quick study


@pytest.fixture(scope="module")
def gpt_quick(tmp_path_factory):
    need_datasets("shakespeare")
    return quick_study("gpt", tmp_path_factory, jobs=1)  # one process: no spawn start-up


def test_gpt_quick_report(gpt_quick):
    from gradcomp_studies.reproduce import gpt

    rc, out, report, data = gpt_quick
    assert rc == 0 and "❌" not in report and "✅ every row learns" in report
    for label in gpt.LABELS.values():
        assert f"| {label}" in report
    assert (out / "gpt-quick.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = data["data"]["rows"]
    assert list(rows) == ["dense", "dgc", "topk", "powersgd", "qsgd"]
    assert all(r["test_loss"] < math.log(65) for r in rows.values())


def test_gpt_quick_bytes(gpt_quick):
    """Dense bytes are 4 x parameters x steps for every row; the dense row sends them all; top-k at 0.001 on its
    plain wire sends ceil(n / 1000) entries of 8 bytes (fp32 value, int32 index) per tensor; every ratio is
    dense bytes over bytes sent."""
    from gradcomp_studies.reproduce import gpt

    *_, data = gpt_quick
    rows, v = data["data"]["rows"], gpt.QUICK
    sizes = [p.numel() for p in build_model("gpt", "shakespeare", bptt=v.bptt, layers=v.layers, d=v.d,
                                            heads=v.heads).parameters()]
    steps = rows["dense"]["steps"]
    assert steps == 20 and data["data"]["parameters"] == sum(sizes)
    for key, r in rows.items():
        assert r["steps"] == steps and r["dense_bytes"] == 4 * sum(sizes) * steps, key
        assert r["compression_ratio"] == pytest.approx(r["dense_bytes"] / r["bytes_sent"]), key
    assert rows["dense"]["bytes_sent"] == rows["dense"]["dense_bytes"]
    assert rows["topk"]["bytes_sent"] == 8 * sum(math.ceil(n / 1000) for n in sizes) * steps
    assert rows["topk"]["compression_ratio"] > 100
    assert rows["dgc"]["compression_ratio"] > 50  # its first step's warm-up density, 25 %, weighs on 20 steps
    assert 1 < rows["qsgd"]["compression_ratio"] < 8 and 1 < rows["powersgd"]["compression_ratio"] < 100
