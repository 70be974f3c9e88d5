"""Models for ``gradcomp train``, and the paper's architectures for counting gradient sizes.

Trainable models (registry :data:`MODELS`, built with :func:`build_model`):

- :class:`MLP`, :class:`CNN`, :class:`ResNet` for image datasets (``(N, C, H, W)`` in, logits ``(N, classes)`` out);
- :class:`LSTMLM` for language-model datasets, **batch-first**: tokens ``(B, T)`` in,
  logits ``(B, T, V)`` and the new ``(h, c)`` state out;
- :class:`GPT`, a causal decoder-only transformer for the same datasets: tokens ``(B, T)`` in,
  logits ``(B, T, V)`` and ``None`` (no state carried between windows) out.

The paper's architectures (:data:`PAPER_MODELS`; Lin et al. 2018 compress
their gradients): :func:`alexnet`, :func:`vgg16`, :func:`resnet50` with
torchvision's exact parameter shapes and names (written here, torchvision is
not needed), and :func:`ptb_lstm_1500`.  Build them under
``torch.device("meta")`` to count parameters without allocating memory.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .data import DATASET_INFO, DataKind, Dataset

__all__ = [
    "CNN",
    "DEFAULT_MODEL",
    "GPT",
    "LSTMLM",
    "MLP",
    "MODELS",
    "PAPER_MODELS",
    "ModelSpec",
    "ResNet",
    "alexnet",
    "build_model",
    "count_parameters",
    "detach_hidden",
    "ptb_lstm_1500",
    "resnet50",
    "vgg16",
]

Hidden = tuple[Tensor, Tensor]


def count_parameters(model: nn.Module) -> int:
    """Number of parameter entries (shared parameters counted once).

    Args:
        model: the model (its parameters may be on the ``meta`` device).

    Returns:
        The number of entries.

    Example:
        The paper's ResNet-50, counted without allocating its weights:

        >>> import torch
        >>> from gradcomp.train.models import count_parameters, resnet50
        >>> with torch.device("meta"):
        ...     count_parameters(resnet50())
        25557032
    """
    return sum(p.numel() for p in model.parameters())


def _check_image_args(input_shape: Sequence[int], num_classes: int) -> tuple[int, int, int]:
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(s, int) and s >= 1 for s in shape):
        raise ValueError(f"input_shape must be (channels, height, width) of positive integers, got {input_shape!r}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, got {num_classes!r}")
    return shape


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _widths(name: str, value: Any) -> None:
    """``value`` must be a list (or tuple) of integers >= 1: ``ValueError`` naming ``name`` otherwise."""
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list of integers >= 1, got {value!r}")
    for i, v in enumerate(value):
        _positive(f"{name}[{i}]", v)


def _dropout(name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


# ----------------------------------------------------------------------------- image models

class MLP(nn.Module):
    """Flatten, then ``Linear-ReLU`` per entry of ``hidden``, then a linear classifier.

    Args:
        input_shape: ``(channels, height, width)`` of an image.
        num_classes: the number of classes.
        hidden: the widths of the hidden layers.

    Raises:
        ValueError: a bad shape, number of classes or width.

    Example:
        >>> import torch
        >>> from gradcomp.train.models import MLP
        >>> MLP((1, 8, 8), 10, hidden=(32,))(torch.zeros(5, 1, 8, 8)).shape
        torch.Size([5, 10])
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (256, 128)) -> None:
        super().__init__()
        shape = _check_image_args(input_shape, num_classes)
        _widths("hidden", hidden)
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """The logits of a batch of images.

        Args:
            x: images ``(N, C, H, W)``.

        Returns:
            Logits ``(N, num_classes)``.
        """
        return self.net(x)


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class CNN(nn.Module):
    """Small batch-norm CNN: ``conv-bn-relu(c0), maxpool, conv-bn-relu(c1), maxpool, conv-bn-relu(c2)``,
    adaptive average pooling to 3x3, then ``Linear(9*c2, hidden)-ReLU-Dropout-Linear``.

    Pooling early keeps it cheap on a CPU: 7.4 M multiply-adds per 28x28 image.

    With the defaults it has 390,634 parameters whatever the input size (the
    adaptive pooling fixes the classifier's width), so it runs on 8x8 digits
    and 28x28 (Fashion-)MNIST alike.

    Args:
        input_shape: ``(channels, height, width)`` of an image.
        num_classes: the number of classes.
        channels: the widths of the three convolutions.
        hidden: the width of the classifier's hidden layer.
        dropout: dropout before the last layer, in ``[0, 1)``.

    Raises:
        ValueError: a bad shape, number of classes, width or dropout.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (32, 64, 128),
                 hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        c_in = _check_image_args(input_shape, num_classes)[0]
        _widths("channels", channels)
        if len(channels) != 3:
            raise ValueError(f"channels must hold 3 widths, got {channels!r}")
        _positive("hidden", hidden)
        _dropout("dropout", dropout)
        c0, c1, c2 = channels
        self.features = nn.Sequential(*_conv_bn_relu(c_in, c0), nn.MaxPool2d(2), *_conv_bn_relu(c0, c1),
                                      nn.MaxPool2d(2), *_conv_bn_relu(c1, c2), nn.AdaptiveAvgPool2d(3))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(9 * c2, hidden), nn.ReLU(inplace=True),
                                        nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """The logits of a batch of images.

        Args:
            x: images ``(N, C, H, W)``.

        Returns:
            Logits ``(N, num_classes)``.
        """
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: ``conv3x3-bn-relu-conv3x3-bn`` plus shortcut, then ReLU (He et al. 2016).
    The shortcut is the identity, or a strided ``conv1x1-bn`` projection where the shape changes.

    Args:
        cin: input channels.
        cout: output channels.
        stride: the stride of the first convolution (and the projection).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        """The block's output.

        Args:
            x: feature maps ``(N, cin, H, W)``.

        Returns:
            Feature maps ``(N, cout, H / stride, W / stride)`` (rounded up).
        """
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2) of ``depth = 6n + 2`` layers: ResNet-8/14/20/32...

    A 3x3 stem of ``width`` channels, three stages of ``n`` basic blocks with
    ``width, 2*width, 4*width`` channels (the last two halve the resolution),
    global average pooling and a linear classifier.  28x28 inputs go
    28 -> 14 -> 7, 8x8 inputs 8 -> 4 -> 2; any size >= 1 works.

    Args:
        input_shape: ``(channels, height, width)`` of an image.
        num_classes: the number of classes.
        depth: the number of layers, ``6n + 2`` (8, 14, 20, 32, ...).
        width: the channels of the stem and the first stage.

    Raises:
        ValueError: a bad shape, number of classes, depth or width.
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 20, width: int = 16) -> None:
        super().__init__()
        c_in = _check_image_args(input_shape, num_classes)[0]
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...), got {depth!r}")
        _positive("width", width)
        n = (depth - 2) // 6
        self.depth = depth
        self.conv1 = nn.Conv2d(c_in, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            blocks = [BasicBlock(cin, cout, stride=1 if i == 0 else 2)]
            blocks += [BasicBlock(cout, cout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """The logits of a batch of images.

        Args:
            x: images ``(N, C, H, W)``.

        Returns:
            Logits ``(N, num_classes)``.
        """
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# ----------------------------------------------------------------------------- language model

def detach_hidden(hidden: Any) -> Any:
    """Cut the autograd history of an RNN state (a tensor, or nested tuples/lists of tensors) between
    truncated-BPTT windows, keeping its values.

    Args:
        hidden: the state: a tensor, nested tuples or lists of tensors, or None (a model that carries no
            state, :class:`GPT`).

    Returns:
        The same structure of detached tensors; None for None.
    """
    if hidden is None:
        return None
    if isinstance(hidden, Tensor):
        return hidden.detach()
    return type(hidden)(detach_hidden(h) for h in hidden)


class LSTMLM(nn.Module):
    """Word/char LSTM language model in the shape of PyTorch's ``word_language_model`` example, batch-first.

    ``embedding -> dropout -> layers x LSTM (dropout between layers) -> dropout -> linear decoder``.

    ``forward(tokens, hidden=None)`` takes int64 tokens ``(B, T)`` and the
    state ``(h, c)``, each ``(layers, B, hidden)`` (zeros when None), and
    returns ``(logits (B, T, vocab_size), (h, c))``.  Carry the returned state
    into the next window through :func:`detach_hidden`.  ``tie_weights``
    shares the embedding with the decoder (Press & Wolf 2017) and needs
    ``emb == hidden``.  Parameter names follow the example: ``encoder``,
    ``rnn``, ``decoder``.

    Args:
        vocab_size: the number of tokens.
        emb: the embedding width.
        hidden: the LSTM's width.
        layers: the number of LSTM layers.
        dropout: dropout on the embeddings, between layers and before the decoder, in ``[0, 1)``.
        tie_weights: share the embedding with the decoder.

    Raises:
        ValueError: a bad width, count or dropout, or ``tie_weights`` with ``emb != hidden``.

    Example:
        >>> import torch
        >>> from gradcomp.train.models import LSTMLM, detach_hidden
        >>> model = LSTMLM(50, emb=16, hidden=16, layers=1)
        >>> logits, state = model(torch.zeros(3, 5, dtype=torch.long))
        >>> logits.shape, state[0].shape
        (torch.Size([3, 5, 50]), torch.Size([1, 3, 16]))
        >>> logits, state = model(torch.zeros(3, 5, dtype=torch.long), detach_hidden(state))  # the next window
    """

    def __init__(self, vocab_size: int, emb: int = 200, hidden: int = 200, layers: int = 2, dropout: float = 0.2,
                 tie_weights: bool = False) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("emb", emb), ("hidden", hidden), ("layers", layers)):
            _positive(name, value)
        _dropout("dropout", dropout)
        if tie_weights and emb != hidden:
            raise ValueError(f"tie_weights needs emb == hidden, got emb={emb}, hidden={hidden}")
        self.vocab_size, self.emb, self.hidden, self.layers = vocab_size, emb, hidden, layers
        self.tie_weights = tie_weights
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emb)
        self.rnn = nn.LSTM(emb, hidden, layers, dropout=dropout if layers > 1 else 0.0, batch_first=True)
        self.decoder = nn.Linear(hidden, vocab_size)
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if tie_weights:
            self.decoder.weight = self.encoder.weight
        else:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)

    def init_hidden(self, batch: int) -> Hidden:
        """The zero state.

        Args:
            batch: the number of rows of a batch (>= 1).

        Returns:
            ``(h, c)``, each zeros ``(layers, batch, hidden)``, on the model's device and dtype.

        Raises:
            ValueError: ``batch`` < 1.
        """
        _positive("batch", batch)
        w = self.decoder.bias
        shape = (self.layers, batch, self.hidden)
        return (w.new_zeros(shape), w.new_zeros(shape))

    def forward(self, tokens: Tensor, hidden: Hidden | None = None) -> tuple[Tensor, Hidden]:
        """The logits of each position, and the state after the window.

        Args:
            tokens: int64 tokens ``(B, T)``.
            hidden: the state ``(h, c)`` from the previous window (None: zeros).

        Returns:
            ``(logits (B, T, vocab_size), (h, c))``.

        Raises:
            ValueError: ``tokens`` is not 2-D.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        if hidden is None:
            hidden = self.init_hidden(tokens.shape[0])
        out, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(out)), hidden


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: one ``qkv`` projection ``d -> 3d``, ``heads`` heads attending to
    earlier positions only (``scaled_dot_product_attention(is_causal=True)``), output projection ``proj``.

    Args:
        d: the model width (a multiple of ``heads``).
        heads: the number of heads.
        dropout: dropout on the attention weights (in training), in ``[0, 1)``.
    """

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: Tensor) -> Tensor:
        """Attend, each position to itself and the earlier ones.

        Args:
            x: ``(B, T, d)``.

        Returns:
            ``(B, T, d)``.
        """
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in self.qkv(x).split(d, dim=2))
        y = nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                                       is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))`` (MLP ``d -> 4d -> d``,
    GELU), dropout on each residual branch.

    Args:
        d: the model width (a multiple of ``heads``).
        heads: the number of attention heads.
        dropout: dropout on the attention weights and the residual branches, in ``[0, 1)``.
    """

    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads, dropout)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        """The block's output.

        Args:
            x: ``(B, T, d)``.

        Returns:
            ``(B, T, d)``.
        """
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    """Causal decoder-only transformer language model (GPT-2's layout, Radford et al. 2019), batch-first.

    ``token embedding + learned position embedding -> dropout -> layers x pre-LN block -> LayerNorm ->
    decoder``, the decoder's weight tied to the token embedding (Press & Wolf 2017; no decoder bias).
    Weights are drawn from N(0, 0.02), the residual output projections from N(0, 0.02 / sqrt(2 * layers)).

    It fits ``gradcomp train``'s language-model interface: ``forward(tokens, hidden=None)`` takes int64
    tokens ``(B, T)`` with ``T <= context`` and returns ``(logits (B, T, vocab_size), None)``: no state is
    carried from one window to the next (``hidden`` is ignored), each window is read from its start.

    Parameters: ``vocab_size * d + context * d + layers * (12 d^2 + 13 d) + 2 d`` (the decoder shares the
    embedding).  ``gradcomp train`` sets ``context`` to its ``bptt`` unless the option is given.

    Args:
        vocab_size: number of tokens.
        layers: transformer blocks.
        d: model width (a multiple of ``heads``).
        heads: attention heads.
        context: the longest sequence it reads (size of the position embedding).
        dropout: dropout on the embeddings, attention weights and residual branches, in ``[0, 1)``.

    Raises:
        ValueError: a bad option, or (in ``forward``) a sequence longer than ``context``.

    Example:
        >>> import torch
        >>> from gradcomp.train.models import GPT
        >>> model = GPT(65, layers=2, d=32, heads=4, context=16)
        >>> logits, state = model(torch.zeros(3, 16, dtype=torch.long))
        >>> logits.shape, state
        (torch.Size([3, 16, 65]), None)
    """

    def __init__(self, vocab_size: int, layers: int = 4, d: int = 128, heads: int = 4, context: int = 256,
                 dropout: float = 0.0) -> None:
        super().__init__()
        for name, value in (("vocab_size", vocab_size), ("layers", layers), ("d", d), ("heads", heads),
                            ("context", context)):
            _positive(name, value)
        _dropout("dropout", dropout)
        if d % heads:
            raise ValueError(f"d must be a multiple of heads, got d={d}, heads={heads}")
        self.vocab_size, self.layers, self.d, self.heads, self.context = vocab_size, layers, d, heads, context
        self.tok_emb = nn.Embedding(vocab_size, d)
        self.pos_emb = nn.Embedding(context, d)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(TransformerBlock(d, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.decoder = nn.Linear(d, vocab_size, bias=False)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() > 1:  # LayerNorm weights stay 1
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
        self.decoder.weight = self.tok_emb.weight

    def forward(self, tokens: Tensor, hidden: Any = None) -> tuple[Tensor, None]:
        """The logits of each position.

        Args:
            tokens: int64 tokens ``(B, T)``, ``T <= context``.
            hidden: ignored (the language-model interface's state; none is carried).

        Returns:
            ``(logits (B, T, vocab_size), None)``.

        Raises:
            ValueError: ``tokens`` is not 2-D, or longer than ``context``.
        """
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time), got shape {tuple(tokens.shape)}")
        t = tokens.shape[1]
        if t > self.context:
            raise ValueError(f"sequence length {t} exceeds the GPT's context of {self.context} tokens")
        positions = torch.arange(t, device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.decoder(self.ln_f(x)), None


# ----------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class ModelSpec:
    """A trainable model: its constructor, the dataset kind it fits and per-dataset default options.

    Args:
        name: the name :func:`build_model` takes.
        factory: the constructor: ``factory(input_shape, num_classes, **options)`` for an image model,
            ``factory(vocab_size, **options)`` for a language model.
        kind: the kind of dataset it fits, ``"image"`` or ``"lm"``.
        summary: one line for listings.
        defaults: options by dataset name, given unless overridden.
        context_option: the option that takes the training loop's sequence length (None: none does).
    """

    name: str
    factory: Callable[..., nn.Module]
    kind: DataKind
    summary: str
    defaults: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: the option that takes the training loop's sequence length (``bptt``) when not given (None: none does)
    context_option: str | None = None

    def options(self) -> list[str]:
        """The keyword options ``build_model`` accepts for this model.

        Returns:
            The factory's parameters but the shape, classes and vocabulary, in order.
        """
        skip = {"self", "input_shape", "num_classes", "vocab_size"}
        return [p for p in inspect.signature(self.factory).parameters if p not in skip]


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", MLP, "image", "multi-layer perceptron (hidden=(256, 128))"),
    "cnn": ModelSpec("cnn", CNN, "image", "3-conv batch-norm CNN, 0.39M parameters"),
    "resnet": ModelSpec("resnet", ResNet, "image", "CIFAR-style ResNet-(6n+2) (depth 20; 8 on digits)",
                        defaults={"digits": {"depth": 8}}),
    "lstm": ModelSpec("lstm", LSTMLM, "lm", "2-layer LSTM language model (200 units on PTB, 256 on Shakespeare)",
                      defaults={"ptb": {"emb": 200, "hidden": 200, "layers": 2, "dropout": 0.2},
                                "shakespeare": {"emb": 128, "hidden": 256, "layers": 2, "dropout": 0.1}}),
    "gpt": ModelSpec("gpt", GPT, "lm", "causal transformer, 4 layers, d=128, 4 heads, context = bptt",
                     context_option="context"),
}
#: The model ``build_model(None, dataset)`` picks.
DEFAULT_MODEL = {"digits": "mlp", "mnist": "cnn", "fashion-mnist": "cnn", "ptb": "lstm", "shakespeare": "lstm"}


def build_model(name: str | None, dataset: Dataset | str, *, bptt: int | None = None, **options: Any) -> nn.Module:
    """Build model ``name`` (one of :data:`MODELS`; None: :data:`DEFAULT_MODEL` of the dataset) for ``dataset``.

    ``dataset`` is a loaded :class:`~gradcomp.train.data.Dataset` or a dataset
    name (its shape is then taken from ``DATASET_INFO`` without loading).
    Input shape, classes and vocabulary come from the dataset; ``options``
    override the model's per-dataset defaults.  ``bptt``, the training loop's
    sequence length, becomes the model's context (:attr:`ModelSpec.context_option`, the GPT's ``context``)
    where that option is not given; other models ignore it.  An image model for an LM
    dataset (or the reverse) or an unknown option raises ``ValueError``.

    Args:
        name: the model, or None for the dataset's default.
        dataset: a loaded dataset or a dataset name.
        bptt: the training loop's sequence length (None: not given).
        **options: the model's options.

    Returns:
        The model, freshly initialized (with torch's global generator).

    Raises:
        TypeError: ``dataset`` is neither a :class:`~gradcomp.train.data.Dataset` nor a name.
        ValueError: an unknown model, dataset or option, or a model of the other kind of dataset.

    Example:
        >>> import torch
        >>> from gradcomp.train.models import build_model
        >>> model = build_model("resnet", "digits")  # the digits default: depth 8
        >>> model.depth, model(torch.zeros(2, 1, 8, 8)).shape
        (8, torch.Size([2, 10]))
        >>> build_model("gpt", "shakespeare", bptt=64, layers=2).context
        64
        >>> build_model("cnn", "ptb")
        Traceback (most recent call last):
        ...
        ValueError: model 'cnn' is for image datasets but 'ptb' is an lm dataset; allowed models: lstm, gpt
    """
    if isinstance(dataset, Dataset):
        ds_name, kind = dataset.name, dataset.kind
        input_shape = tuple(dataset.input_shape)
        classes = dataset.vocab_size if kind == "lm" else dataset.num_classes
    elif isinstance(dataset, str):
        if dataset not in DATASET_INFO:
            raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_INFO)}")
        info = DATASET_INFO[dataset]
        ds_name, kind, input_shape, classes = dataset, info["kind"], info["input_shape"], info["num_classes"]
    else:
        raise TypeError(f"dataset must be a Dataset or a dataset name, got {type(dataset).__name__}")
    if name is None:
        name = DEFAULT_MODEL.get(ds_name, "mlp" if kind == "image" else "lstm")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    spec = MODELS[name]
    if spec.kind != kind:
        allowed = [n for n, s in MODELS.items() if s.kind == kind]
        raise ValueError(f"model {name!r} is for {spec.kind} datasets but {ds_name!r} is an {kind} dataset; "
                         f"allowed models: {', '.join(allowed)}")
    unknown = sorted(set(options) - set(spec.options()))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for model {name!r}; allowed: "
                         f"{', '.join(spec.options())}")
    kwargs = {**spec.defaults.get(ds_name, {}), **options}
    if bptt is not None and spec.context_option is not None:
        kwargs.setdefault(spec.context_option, bptt)
    if kind == "lm":
        return spec.factory(classes, **kwargs)
    return spec.factory(input_shape, classes, **kwargs)


# ----------------------------------------------------------------------------- the paper's architectures

def alexnet(num_classes: int = 1000) -> nn.Module:
    """AlexNet with torchvision's layout and names (``features``, ``avgpool``, ``classifier``): 61,100,840
    parameters at 1000 classes, input ``(N, 3, 224, 224)``.

    Args:
        num_classes: the number of classes.

    Returns:
        The model (a :class:`FeaturesClassifier`).
    """
    features = nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
    classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(256 * 36, 4096), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))
    return FeaturesClassifier(features, nn.AdaptiveAvgPool2d(6), classifier)


class FeaturesClassifier(nn.Module):
    """``features -> avgpool -> flatten -> classifier``, torchvision's AlexNet/VGG layout and parameter names.

    Args:
        features: the convolutional part.
        avgpool: the pooling to the classifier's input size.
        classifier: the fully connected part.
    """

    def __init__(self, features: nn.Module, avgpool: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.features, self.avgpool, self.classifier = features, avgpool, classifier

    def forward(self, x: Tensor) -> Tensor:
        """The logits of a batch of images.

        Args:
            x: images ``(N, C, H, W)``.

        Returns:
            Logits ``(N, num_classes)``.
        """
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16(num_classes: int = 1000) -> nn.Module:
    """VGG-16 (configuration D, no batch norm) with torchvision's layout and names: 138,357,544 parameters
    at 1000 classes.

    Args:
        num_classes: the number of classes.

    Returns:
        The model (a :class:`FeaturesClassifier`).
    """
    layers: list[nn.Module] = []
    cin = 3
    config: tuple[int | Literal["M"], ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                                              512, 512, 512, "M")
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU(inplace=True)]
            cin = v
    classifier = nn.Sequential(
        nn.Linear(512 * 49, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
        nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(4096, num_classes))
    return FeaturesClassifier(nn.Sequential(*layers), nn.AdaptiveAvgPool2d(7), classifier)


class Bottleneck(nn.Module):
    """ResNet-50's bottleneck (torchvision "v1.5": the stride sits on the 3x3 conv).

    Args:
        cin: input channels.
        planes: the width of the 3x3 convolution; the block puts out ``4 * planes`` channels.
        stride: the stride of the 3x3 convolution (and the projection).
    """

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        """The block's output.

        Args:
            x: feature maps ``(N, cin, H, W)``.

        Returns:
            Feature maps ``(N, 4 * planes, H / stride, W / stride)`` (rounded up).
        """
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """ResNet-50 with torchvision's names (``conv1, bn1, layer1..4, fc``): 25,557,032 parameters in 161
    tensors at 1000 classes.

    Args:
        num_classes: the number of classes.
    """

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin, stages = 64, []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layer = [Bottleneck(cin, planes, stride)]
            cin = planes * Bottleneck.expansion
            layer += [Bottleneck(cin, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """The logits of a batch of images.

        Args:
            x: images ``(N, C, H, W)``.

        Returns:
            Logits ``(N, num_classes)``.
        """
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(num_classes: int = 1000) -> nn.Module:
    """ResNet-50 (see :class:`ResNet50`).

    Args:
        num_classes: the number of classes.

    Returns:
        The model.
    """
    return ResNet50(num_classes)


def ptb_lstm_1500() -> LSTMLM:
    """The paper's PTB language model: 2-layer LSTM, 1500 units, vocabulary 10000, encoder and decoder tied
    (section 4.1: "tying the weights of encoder and decoder as suggested in Inan et al. (2016)"; Zaremba et
    al.'s "large" configuration, dropout 0.65).

    With PyTorch's ``nn.LSTM`` (two bias vectors per layer, ``b_ih`` and
    ``b_hh``) it has 51,034,000 parameters: the shared 10000x1500 matrix
    15,000,000 + two LSTM layers of 18,012,000 + the decoder's bias 10,000;
    4 bytes each, 194.68 MiB, the paper's gradient size.  (Untied it would be
    66,034,000.)

    Returns:
        The model (an :class:`LSTMLM`).
    """
    return LSTMLM(10000, emb=1500, hidden=1500, layers=2, dropout=0.65, tie_weights=True)


#: The paper's architectures, for counting gradient sizes (no training).
PAPER_MODELS: dict[str, Callable[[], nn.Module]] = {
    "alexnet": alexnet,
    "vgg16": vgg16,
    "resnet50": resnet50,
    "ptb_lstm_1500": ptb_lstm_1500,
}
