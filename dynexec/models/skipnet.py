"""SkipNet (Wang et al., ECCV 2018), state_dict-compatible with ucbdrive/skipnet.

Attribute names, module nesting and registration follow the official ``cifar/models.py``
and ``imagenet/models.py`` (see docs/official-models.md): flat ``group{g}_layer{i}``,
``group{g}_gate{i}`` and ``group{g}_ds{i}`` attributes, the downsample module registered
twice (as ``group{g}_ds{i}`` and as the block's ``downsample``), a gate for every block
including the last, and the shared recurrent controller ``control``.

Inference semantics (the official models' ``forward``): block 0 always runs; the gate of block
k reads the mixed output of block k and block k+1 runs iff p > 0.5 (strict); a skipped
block outputs its shortcut (the projection without ReLU, or the identity). The LSTM
state lives inside ``forward`` (zeros at every call), never on the module.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .common import (
    BlockView,
    ConvBN,
    HeadView,
    RecurrentGateView,
    RoutedModel,
    StemView,
    conv3x3,
    official_init_,
)


# --------------------------------------------------------------------------------------
# Blocks (both files): the ReLU comes after the residual add.
# --------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))

    def layers(self) -> tuple[ConvBN, ...]:
        return (self.conv1, self.bn1), (self.conv2, self.bn2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.branch(x) + residual)


class Bottleneck(nn.Module):
    """torchvision v1.5 placement: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1,
                 downsample: Optional[nn.Module] = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def layers(self) -> tuple[ConvBN, ...]:
        return (self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.branch(x) + residual)


class _Branch(nn.Module):
    """Adapter exposing a SkipNet block's residual function as a module (not registered
    on the model, so it adds no state_dict keys)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block.branch(x)


def _projection(inplanes: int, outplanes: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inplanes, outplanes, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(outplanes),
    )


def _block_view(layer: nn.Module, downsample: Optional[nn.Sequential]) -> BlockView:
    """A block (BasicBlock or Bottleneck) with its projection shortcut or none."""
    branch_layers = layer.layers()
    return BlockView(branch=_Branch(layer), shortcut=downsample,
                     shortcut_kind="identity" if downsample is None else "projection",
                     out_channels=branch_layers[-1][1].num_features, branch_layers=branch_layers,
                     shortcut_layers=None if downsample is None else ((downsample[0], downsample[1]),))


# --------------------------------------------------------------------------------------
# Gates
# --------------------------------------------------------------------------------------
class FeedforwardGateI(nn.Module):
    """FFGate-I: maxpool, two 3x3 convs (the second with stride 2), global avg, 1x1 conv."""

    def __init__(self, pool_size: int, channel: int):
        super().__init__()
        self.pool_size = pool_size
        self.channel = channel
        self.maxpool = nn.MaxPool2d(2)
        self.conv1 = conv3x3(channel, channel)
        self.bn1 = nn.BatchNorm2d(channel)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(channel, channel, stride=2)
        self.bn2 = nn.BatchNorm2d(channel)
        self.relu2 = nn.ReLU(inplace=True)
        pool = math.floor(math.floor(pool_size / 2) / 2 + 0.5)
        self.avg_layer = nn.AvgPool2d(pool)
        self.linear_layer = nn.Conv2d(channel, 2, kernel_size=1, stride=1)
        self.prob_layer = nn.Softmax(dim=1)
        self.logprob = nn.LogSoftmax(dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(x)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.linear_layer(self.avg_layer(x)).view(x.shape[0], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probability that the next block executes, shape [N]."""
        return self.prob_layer(self.logits(x))[:, 1]


class FeedforwardGateII(nn.Module):
    """FFGate-II: one 3x3 stride-2 conv, global avg, 1x1 conv."""

    def __init__(self, pool_size: int, channel: int):
        super().__init__()
        self.pool_size = pool_size
        self.channel = channel
        self.conv1 = conv3x3(channel, channel, stride=2)
        self.bn1 = nn.BatchNorm2d(channel)
        self.relu1 = nn.ReLU(inplace=True)
        self.avg_layer = nn.AvgPool2d(math.floor(pool_size / 2 + 0.5))
        self.linear_layer = nn.Conv2d(channel, 2, kernel_size=1, stride=1)
        self.prob_layer = nn.Softmax(dim=1)
        self.logprob = nn.LogSoftmax(dim=1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        return self.linear_layer(self.avg_layer(x)).view(x.shape[0], 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prob_layer(self.logits(x))[:, 1]


class RNNGate(nn.Module):
    """The shared recurrent controller: one LSTM step per gate, then a projection and a
    sigmoid. CIFAR projects with Linear(10, 1); ImageNet with Conv2d(10, 1, 1)."""

    def __init__(self, input_dim: int = 10, hidden_dim: int = 10, conv_proj: bool = False):
        super().__init__()
        self.input_dim = input_dim
        self.hidden_dim = hidden_dim
        self.conv_proj = conv_proj
        self.rnn = nn.LSTM(input_dim, hidden_dim)
        self.proj = nn.Conv2d(hidden_dim, 1, kernel_size=1) if conv_proj else nn.Linear(hidden_dim, 1)
        self.prob = nn.Sigmoid()

    def init_state(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = like.new_zeros((1, batch, self.hidden_dim))
        return zeros, zeros.clone()

    def step(self, embedding: torch.Tensor, state):
        """embedding [N, input_dim, 1, 1] -> (p [N], new state)."""
        n = embedding.shape[0]
        out, state = self.rnn(embedding.reshape(1, n, self.input_dim), state)
        out = out.reshape(n, self.hidden_dim)
        if self.conv_proj:
            z = self.proj(out.reshape(n, self.hidden_dim, 1, 1))
        else:
            z = self.proj(out)
        return self.prob(z).reshape(n), state


def _rnn_embedding(pool_size: int, channel: int, embed_dim: int) -> nn.Sequential:
    # AvgPool at index 0 and the 1x1 conv at index 1 give the keys '.1.weight'/'.1.bias'.
    return nn.Sequential(nn.AvgPool2d(pool_size), nn.Conv2d(channel, embed_dim, kernel_size=1))


class _ResNetTrunk(RoutedModel):
    """Stem and head shared by the SkipNet repository's gated and plain ResNets."""

    def _make_stem(self, dataset: str) -> None:
        if dataset == "cifar":
            self.input_size, self.inplanes = 32, 16
            self.conv1 = conv3x3(3, 16)
        else:
            self.input_size, self.inplanes = 224, 64
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        if dataset == "imagenet":
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    @property
    def num_blocks(self) -> int:
        return sum(self.num_layers)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        if self.dataset == "imagenet":
            x = self.maxpool(x)
        return x

    def stem_view(self) -> StemView:
        return StemView(self.conv1, self.bn1,
                        post=self.maxpool if self.dataset == "imagenet" else None)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.avgpool(h)
        return self.fc(h.reshape(h.shape[0], -1))

    def head_view(self) -> HeadView:
        return HeadView(self.avgpool, self.fc)


# --------------------------------------------------------------------------------------
# Gated SkipNet (CIFAR and ImageNet, feed-forward and recurrent gates)
# --------------------------------------------------------------------------------------
class SkipNet(_ResNetTrunk):
    """A gated SkipNet. ``dataset`` is 'cifar' or 'imagenet'; ``gate_type`` is 'rnn',
    'ffgate1' or 'ffgate2'. SP and RL variants share parameters and inference semantics
    (docs/official-models.md); ``variant`` only records which name built the model."""

    router = "online"
    # The official rule: a block runs iff its gate's p > 0.5 (p == 0.5 and NaN skip it).
    threshold, runs_at_threshold = 0.5, False

    def __init__(self, block: type, layers: list[int], num_classes: int = 10, *,
                 dataset: str = "cifar", gate_type: str = "rnn", embed_dim: int = 10,
                 hidden_dim: int = 10, variant: str = "sp", name: str = "skipnet"):
        super().__init__()
        if dataset not in ("cifar", "imagenet"):
            raise ValueError(f"dataset must be 'cifar' or 'imagenet', got {dataset!r}")
        if gate_type not in ("rnn", "ffgate1", "ffgate2"):
            raise ValueError(f"gate_type must be 'rnn', 'ffgate1' or 'ffgate2', got {gate_type!r}")
        if dataset == "imagenet" and gate_type != "rnn":
            raise ValueError("ImageNet SkipNets only use the recurrent gate (gate_type='rnn')")
        self.model_name = name
        self.dataset = dataset
        self.gate_type = gate_type
        self.variant = variant
        self.num_layers = list(layers)
        self.embed_dim = embed_dim
        self.hidden_dim = hidden_dim
        self.block_type = block

        self._make_stem(dataset)
        if dataset == "cifar":
            widths, pools = [16, 32, 64], [32, 16, 8]
        else:
            widths, pools = [64, 128, 256, 512], [56, 28, 14, 7]
        if len(layers) != len(widths):
            raise ValueError(f"{name}: expected {len(widths)} group sizes for {dataset}, got {layers}")
        if min(layers) < 1:
            raise ValueError(f"{name}: every group needs at least one block, got {layers}")

        for g, (planes, pool, count) in enumerate(zip(widths, pools, layers), start=1):
            self._make_group(block, planes, count, g, pool)
        if gate_type == "rnn":
            self.control = RNNGate(embed_dim, hidden_dim, conv_proj=(dataset == "imagenet"))
        self.avgpool = nn.AvgPool2d(8 if dataset == "cifar" else 7)
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        official_init_(self, zero_linear_bias=(variant == "rl"))

    def _make_group(self, block: type, planes: int, count: int, group: int, pool: int) -> None:
        for i in range(count):
            stride = 2 if (group > 1 and i == 0) else 1
            downsample = None
            if stride != 1 or self.inplanes != planes * block.expansion:
                downsample = _projection(self.inplanes, planes * block.expansion, stride)
            layer = block(self.inplanes, planes, stride, downsample)
            self.inplanes = planes * block.expansion
            channels = planes * block.expansion
            if self.gate_type == "rnn":
                gate = _rnn_embedding(pool, channels, self.embed_dim)
            elif self.gate_type == "ffgate1":
                gate = FeedforwardGateI(pool, channels)
            else:
                gate = FeedforwardGateII(pool, channels)
            # Same registration order as the official _make_group: ds, layer, gate. The
            # downsample object is shared with layer.downsample, so its keys appear twice.
            setattr(self, f"group{group}_ds{i}", downsample)
            setattr(self, f"group{group}_layer{i}", layer)
            setattr(self, f"group{group}_gate{i}", gate)

    # -- flattened views ------------------------------------------------------------
    def _names(self) -> list[tuple[int, int]]:
        return [(g, i) for g, n in enumerate(self.num_layers, start=1) for i in range(n)]

    def block_views(self) -> list[BlockView]:
        return [_block_view(getattr(self, f"group{g}_layer{i}"), getattr(self, f"group{g}_ds{i}"))
                for g, i in self._names()]

    def gates(self) -> list[nn.Module]:
        return [getattr(self, f"group{g}_gate{i}") for g, i in self._names()]

    # -- routed-model interface ------------------------------------------------------
    def gate_init_state(self, batch: int, like: torch.Tensor):
        if self.gate_type == "rnn":
            return self.control.init_state(batch, like)
        return None

    def recurrent_gate_view(self) -> Optional[RecurrentGateView]:
        if self.gate_type != "rnn":
            return None
        return RecurrentGateView(embeddings=tuple(g[1] for g in self.gates()), lstm=self.control.rnn,
                                 proj=self.control.proj)

    # -- official masked execution ---------------------------------------------------
    def _masked_forward(self, x: torch.Tensor):
        views = self.block_views()
        gates = self.gates()
        n = x.shape[0]
        routing = torch.zeros((n, len(views)), dtype=torch.bool, device=x.device)
        h = self.stem(x)
        state = self.gate_init_state(n, h)
        h = getattr(self, "group1_layer0")(h)
        routing[:, 0] = True
        for k in range(1, len(views)):
            p, state = self.gate_step(gates[k - 1], h, state)
            mask = self.decide(p)
            routing[:, k] = mask
            view = views[k]
            prev = h if view.shortcut is None else view.shortcut(h)
            out = view.branch.block(h)
            # torch.where equals the official mask*x + (1-mask)*prev for finite values.
            h = torch.where(mask.view(n, 1, 1, 1), out, prev)
        return self.head(h), routing

    def gate_step(self, gate: nn.Module, h: torch.Tensor, state):
        """(p [N], new state) from one gate module applied to a block output h."""
        if self.gate_type == "rnn":
            return self.control.step(gate(h), state)
        return gate(h), state


# --------------------------------------------------------------------------------------
# Plain ResNets of the SkipNet repository (base models; every block always runs)
# --------------------------------------------------------------------------------------
class PlainResNet(_ResNetTrunk):
    """``layer{k}`` nn.Sequential ResNets: CIFAR (3 groups, projection shortcuts) and
    ImageNet (torchvision key layout)."""

    router = "none"

    def __init__(self, block: type, layers: list[int], num_classes: int = 10, *,
                 dataset: str = "cifar", name: str = "resnet"):
        super().__init__()
        self.model_name = name
        self.dataset = dataset
        self.num_layers = list(layers)
        self._make_stem(dataset)
        widths = [16, 32, 64] if dataset == "cifar" else [64, 128, 256, 512]
        if len(layers) != len(widths):
            raise ValueError(f"{name}: expected {len(widths)} group sizes, got {layers}")
        for g, (planes, count) in enumerate(zip(widths, layers), start=1):
            blocks = []
            for i in range(count):
                stride = 2 if (g > 1 and i == 0) else 1
                downsample = None
                if stride != 1 or self.inplanes != planes * block.expansion:
                    downsample = _projection(self.inplanes, planes * block.expansion, stride)
                blocks.append(block(self.inplanes, planes, stride, downsample))
                self.inplanes = planes * block.expansion
            setattr(self, f"layer{g}", nn.Sequential(*blocks))
        self.avgpool = nn.AvgPool2d(8 if dataset == "cifar" else 7)
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        official_init_(self)

    def _blocks(self) -> list[nn.Module]:
        return [b for g in range(1, len(self.num_layers) + 1) for b in getattr(self, f"layer{g}")]

    def block_views(self) -> list[BlockView]:
        return [_block_view(b, b.downsample) for b in self._blocks()]

    def _masked_forward(self, x: torch.Tensor):
        h = self.stem(x)
        for block in self._blocks():
            h = block(h)
        routing = torch.ones((x.shape[0], self.num_blocks), dtype=torch.bool, device=x.device)
        return self.head(h), routing


# --------------------------------------------------------------------------------------
# Constructors under the official names
# --------------------------------------------------------------------------------------
CIFAR_DEPTHS = {38: 6, 74: 12, 110: 18, 152: 25}
IMAGENET_LAYERS = {
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    74: (Bottleneck, [3, 4, 14, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
    152: (Bottleneck, [3, 8, 36, 3]),
}


def _cifar_factory(kind: str, depth: int, classes: int, variant: str, gate_type: str, name: str):
    n = CIFAR_DEPTHS[depth]

    def build(num_classes: int = classes, layers: Optional[list[int]] = None, **_ignored):
        cfg = list(layers) if layers is not None else [n, n, n]
        if kind == "plain":
            return PlainResNet(BasicBlock, cfg, num_classes, dataset="cifar", name=name)
        return SkipNet(BasicBlock, cfg, num_classes, dataset="cifar", gate_type=gate_type,
                       variant=variant, name=name)

    build.__name__ = name
    build.__doc__ = f"Official SkipNet constructor {name} ({kind}, depth {depth}, {classes} classes)."
    return build


def _imagenet_factory(kind: str, depth: int, variant: str, name: str):
    block, cfg = IMAGENET_LAYERS[depth]

    def build(num_classes: int = 1000, layers: Optional[list[int]] = None, **_ignored):
        cfg_ = list(layers) if layers is not None else list(cfg)
        if kind == "plain":
            return PlainResNet(block, cfg_, num_classes, dataset="imagenet", name=name)
        return SkipNet(block, cfg_, num_classes, dataset="imagenet", gate_type="rnn",
                       variant=variant, name=name)

    build.__name__ = name
    return build


def _ff_gate(depth: int) -> str:
    return "ffgate2" if depth == 110 else "ffgate1"


def skipnet_constructors() -> dict[str, callable]:
    """name -> constructor, including the official misspellings as aliases."""
    table: dict[str, callable] = {}
    for classes in (10, 100):
        pre = f"cifar{classes}"
        for depth in (38, 74, 110, 152):
            for name, kind, gate in ((f"{pre}_resnet_{depth}", "plain", ""),
                                     (f"{pre}_rnn_gate_{depth}", "gated", "rnn")):
                table[name] = _cifar_factory(kind, depth, classes, "sp", gate, name)
        for depth in (38, 74, 110):
            for name, variant, gate in ((f"{pre}_feedforward_{depth}", "sp", _ff_gate(depth)),
                                        (f"{pre}_feedforward_rl_{depth}", "rl", _ff_gate(depth)),
                                        (f"{pre}_rnn_gate_rl_{depth}", "rl", "rnn")):
                table[name] = _cifar_factory("gated", depth, classes, variant, gate, name)
    # The official misspelled names (the correctly spelled ones above are conveniences).
    table["cifar100_feeforward_38"] = table["cifar100_feedforward_38"]
    table["cifar10_feedfoward_rl_38"] = table["cifar10_feedforward_rl_38"]
    table["cifar100_feedford_rl_38"] = table["cifar100_feedforward_rl_38"]
    for depth in (18, 34, 50, 101, 152):
        for name, variant in ((f"imagenet_rnn_gate_{depth}", "sp"), (f"imagenet_rnn_gate_rl_{depth}", "rl")):
            table[name] = _imagenet_factory("gated", depth, variant, name)
    for depth in (18, 34, 50, 74, 101, 152):
        table[f"resnet{depth}"] = _imagenet_factory("plain", depth, "sp", f"resnet{depth}")
    return table
