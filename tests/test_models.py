"""Models for training (shapes, hidden state) and the paper's architectures (exact parameter counts)."""

import pytest
import torch
from torch import nn

from gradcomp.train.data import load_dataset
from gradcomp.train.models import (
    CNN,
    LSTMLM,
    MODELS,
    PAPER_MODELS,
    ResNet,
    alexnet,
    build_model,
    count_parameters,
    detach_hidden,
    ptb_lstm_1500,
    resnet50,
    vgg16,
)


@pytest.mark.parametrize("dataset,shape", [("digits", (1, 8, 8)), ("mnist", (1, 28, 28))])
@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_image_models_forward(name, dataset, shape):
    torch.manual_seed(0)
    model = build_model(name, dataset)
    out = model(torch.randn(5, *shape))
    assert out.shape == (5, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("depth", [8, 14, 20])
def test_resnet_depths_on_both_sizes(depth):
    model = ResNet((1, 28, 28), 10, depth=depth).eval()
    convs = sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in model.modules())
    assert convs + 1 == depth  # 3x3 convs + the classifier
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10) and model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="depth"):
        ResNet((1, 28, 28), 10, depth=18)


def test_cnn_parameter_count():
    model = CNN((1, 28, 28), 10)
    n = count_parameters(model)
    print(f"CNN on 28x28: {n:,} parameters")
    # independent count: 3 bias-free 3x3 convs + their BN (2 per channel), Linear(128*3*3, 256), Linear(256, 10)
    convs = 9 * (1 * 32 + 32 * 64 + 64 * 128) + 2 * (32 + 64 + 128)
    assert n == convs + (1152 * 256 + 256) + (256 * 10 + 10) == 390_634
    assert count_parameters(CNN((1, 8, 8), 10)) == n


def test_lstm_shapes_and_hidden_state_carry():
    torch.manual_seed(0)
    model = LSTMLM(50, emb=16, hidden=24, layers=2, dropout=0.3).eval()
    tokens = torch.randint(0, 50, (4, 12))
    h0 = model.init_hidden(4)
    assert [h.shape for h in h0] == [(2, 4, 24), (2, 4, 24)] and all(h.abs().sum() == 0 for h in h0)
    logits, (h, c) = model(tokens)  # batch-first: (B, T, V)
    assert logits.shape == (4, 12, 50) and h.shape == c.shape == (2, 4, 24)
    # two windows with the state carried (detached) give the same logits as one long window
    first, state = model(tokens[:, :5], h0)
    state = detach_hidden(state)
    assert all(s.grad_fn is None for s in state)
    second, _ = model(tokens[:, 5:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), logits)
    # workers' row blocks with their block of the state give the single-process rows (lm_batches' contract)
    blocks = [model(tokens[i:i + 2, 5:], tuple(s[:, i:i + 2] for s in state))[0] for i in (0, 2)]
    torch.testing.assert_close(torch.cat(blocks), second)


def test_lstm_tie_weights():
    with pytest.raises(ValueError, match="emb == hidden"):
        LSTMLM(100, emb=16, hidden=32, tie_weights=True)
    tied = LSTMLM(100, emb=32, hidden=32, tie_weights=True)
    untied = LSTMLM(100, emb=32, hidden=32)
    assert tied.decoder.weight is tied.encoder.weight
    assert count_parameters(untied) - count_parameters(tied) == 100 * 32


def test_build_model_defaults_and_errors():
    digits = load_dataset("digits")
    assert isinstance(build_model(None, digits), nn.Module)
    assert isinstance(build_model(None, "mnist"), CNN)
    lstm = build_model(None, "ptb")
    assert isinstance(lstm, LSTMLM) and lstm.vocab_size == 10000 and lstm.hidden == 200
    assert build_model("lstm", "shakespeare", hidden=64).hidden == 64
    assert build_model("resnet", digits, depth=14).depth == 14
    with pytest.raises(ValueError, match="allowed models: mlp, cnn, resnet"):
        build_model("lstm", digits)
    with pytest.raises(ValueError, match="allowed models: lstm"):
        build_model("cnn", "ptb")
    with pytest.raises(ValueError, match="unknown model 'vit'.*" + ", ".join(MODELS)):
        build_model("vit", "mnist")
    with pytest.raises(ValueError, match="unknown option.*widht.*allowed: hidden"):
        build_model("mlp", "mnist", widht=3)
    for name, option, value in (("mlp", "hidden", -3), ("mlp", "hidden", "abc"), ("cnn", "channels", 8)):
        with pytest.raises(ValueError, match=rf"^{option} must be a list of integers >= 1, got {value!r}$"):
            build_model(name, "mnist", **{option: value})


# ----------------------------------------------------------------------------- the paper's architectures

def _meta(factory):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        return factory()


@pytest.mark.parametrize("factory,params,tensors", [
    (alexnet, 61_100_840, 16),
    (vgg16, 138_357_544, 32),
    (resnet50, 25_557_032, 161),  # torchvision's resnet50: 161 parameter tensors
])
def test_paper_cnn_parameter_counts_and_forward(factory, params, tensors):
    model = _meta(factory)
    assert count_parameters(model) == params
    assert len(list(model.parameters())) == tensors
    with torch.device("meta"):
        assert model(torch.empty(2, 3, 224, 224)).shape == (2, 1000)


def test_resnet50_uses_torchvision_names():
    names = dict(_meta(resnet50).named_parameters())
    assert names["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)
    assert names["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert names["fc.weight"].shape == (1000, 2048)


def test_ptb_lstm_1500_parameter_count():
    """The paper's 2-layer 1500-unit PTB LSTM, vocab 10000, encoder and decoder tied (its section 4.1).

    PyTorch's nn.LSTM keeps two bias vectors per layer (b_ih, b_hh), so the count is 51,034,000:
    15,000,000 (the shared embedding) + 2 x 18,012,000 (LSTM) + 10,000 (the decoder's bias), 4 bytes each
    194.68 MiB: the paper's gradient size (Table 4).
    """
    model = _meta(ptb_lstm_1500)
    with torch.device("meta"):  # reference: the word_language_model example's modules, the decoder's weight shared
        reference = [nn.Embedding(10000, 1500), nn.LSTM(1500, 1500, 2)]
    expected = sum(count_parameters(m) for m in reference) + 10000
    layer = 4 * 1500 * (1500 + 1500) + 2 * 4 * 1500
    assert count_parameters(model) == expected == 10000 * 1500 + 2 * layer + 10000 == 51_034_000
    assert round(4 * expected / 2**20, 2) == 194.68
    assert model.rnn.num_layers == 2 and model.tie_weights and model.decoder.weight is model.encoder.weight
    assert set(PAPER_MODELS) == {"alexnet", "vgg16", "resnet50", "ptb_lstm_1500"}
