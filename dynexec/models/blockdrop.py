"""BlockDrop (Wu et al., CVPR 2018), state_dict-compatible with Tushar-N/blockdrop.

Backbones keep the flat key layout ``blocks.<stage>.<idx>.*`` / ``ds.<stage>.*`` of
``FlatResNet32`` and ``FlatResNet224``; agents are ``Policy32`` / ``Policy224`` with the
unused value head ``vnet`` so official agent state_dicts load strictly
(official ``models/base.py`` and ``models/resnet.py``; see docs/official-models.md).

Inference semantics: the agent sees the preprocessed image once, block t is kept iff
sigmoid(logit_t) >= 0.5 (0.5 counts as keep); a kept block gives relu(ds(x) + F(x)), a
dropped one gives ds(x) with no ReLU; the stage's downsample always runs at b == 0.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .common import BlockView, ConvBN, HeadView, RoutedModel, StemView, conv3x3, official_init_


class BasicBlock(nn.Module):
    """Returns only the residual branch F(x); the add and ReLU happen in the ResNet."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))

    def layers(self) -> tuple[ConvBN, ...]:
        return (self.conv1, self.bn1), (self.conv2, self.bn2)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))

    def layers(self) -> tuple[ConvBN, ...]:
        return (self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)


class DownsampleB(nn.Module):
    """Parameter-free CIFAR shortcut: 2x2 average pool, then zero channels appended."""

    def __init__(self, n_in: int, n_out: int, stride: int):
        super().__init__()
        self.avg = nn.AvgPool2d(stride)
        self.expand_ratio = n_out // n_in
        self.out_channels = n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avg(x)
        return torch.cat([x] + [x.mul(0)] * (self.expand_ratio - 1), dim=1)


class FlatResNet(nn.Module):
    """Blocks kept flat in ``blocks[stage][idx]`` with one shortcut per stage in ``ds``."""

    input_size = 32

    def _make_stages(self, block: type, widths: list[int], strides: list[int],
                     layers: list[int], downsample: str) -> None:
        blocks, ds = [], []
        for planes, stride, count in zip(widths, strides, layers):
            out = planes * block.expansion
            if stride != 1 or self.inplanes != out:
                if downsample == "B":
                    shortcut = DownsampleB(self.inplanes, out, stride)
                else:
                    shortcut = nn.Sequential(
                        nn.Conv2d(self.inplanes, out, kernel_size=1, stride=stride, bias=False),
                        nn.BatchNorm2d(out))
            else:
                shortcut = nn.Sequential()
            stage = [block(self.inplanes, planes, stride)]
            self.inplanes = out
            stage += [block(self.inplanes, planes, 1) for _ in range(1, count)]
            blocks.append(nn.ModuleList(stage))
            ds.append(shortcut)
        self.blocks = nn.ModuleList(blocks)
        self.ds = nn.ModuleList(ds)
        self.layer_config = list(layers)

    def _flat(self):
        for s, stage in enumerate(self.blocks):
            for b, block in enumerate(stage):
                yield s, b, block

    def shortcut_views(self) -> list[BlockView]:
        views = []
        for s, b, block in self._flat():
            layers = block.layers()
            shortcut: Optional[nn.Module] = None
            kind, shortcut_layers = "identity", None
            ds = self.ds[s]
            is_empty = isinstance(ds, nn.Sequential) and len(ds) == 0
            if b == 0 and not is_empty:
                shortcut = ds
                if isinstance(ds, DownsampleB):
                    if ds.avg.kernel_size not in (2, (2, 2)):
                        raise ValueError(f"DownsampleB shortcuts pool 2x2 in BlockDrop, got {ds.avg}")
                    kind = "downsample_b"
                else:
                    kind, shortcut_layers = "projection", ((ds[0], ds[1]),)
            views.append(BlockView(branch=block, shortcut=shortcut, shortcut_kind=kind,
                                   out_channels=layers[-1][1].num_features, branch_layers=layers,
                                   shortcut_layers=shortcut_layers))
        return views

    def head(self, h: torch.Tensor) -> torch.Tensor:
        h = self.avgpool(h)
        return self.fc(h.reshape(h.shape[0], -1))

    def head_view(self) -> HeadView:
        return HeadView(self.avgpool, self.fc)

    def forward_full(self, x: torch.Tensor) -> torch.Tensor:
        """Every block executed (used by the agents' feature extractors)."""
        h = self.seed(x)
        for s, b, block in self._flat():
            residual = self.ds[s](h) if b == 0 else h
            h = F.relu(residual + block(h))
        return self.head(h)

    def forward_masked(self, x: torch.Tensor, policy: torch.Tensor) -> torch.Tensor:
        """The official batched ``forward(x, policy)``: per-sample 0/1 masking; a column
        that is all zero takes the shortcut for the whole batch without computing."""
        h = self.seed(x)
        n = x.shape[0]
        for t, (s, b, block) in enumerate(self._flat()):
            residual = self.ds[s](h) if b == 0 else h
            keep = policy[:, t]
            if not bool(keep.any()):
                h = residual
                continue
            fx = F.relu(residual + block(h))
            h = torch.where(keep.view(n, 1, 1, 1), fx, residual)
        return self.head(h)


class FlatResNet32(FlatResNet):
    """CIFAR backbone: 3x3 stem (no max-pool), stages 16/32/64, DownsampleB shortcuts."""

    input_size = 32

    def __init__(self, block: type, layers: list[int], num_classes: int = 10):
        super().__init__()
        self.inplanes = 16
        self.conv1 = conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self._make_stages(block, [16, 32, 64], [1, 2, 2], layers, downsample="B")
        self.fc_dim = 64 * block.expansion
        self.fc = nn.Linear(self.fc_dim, num_classes)
        official_init_(self)
        for m in self.modules():  # the official FlatResNet keeps PyTorch's Linear init
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def seed(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn1(self.conv1(x)))

    def seed_view(self) -> StemView:
        return StemView(self.conv1, self.bn1)


class FlatResNet224(FlatResNet):
    """ImageNet backbone: 7x7 stem + max-pool, stages 64/128/256/512, conv+BN shortcuts."""

    input_size = 224

    def __init__(self, block: type, layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self._make_stages(block, [64, 128, 256, 512], [1, 2, 2, 2], layers, downsample="conv")
        self.avgpool = nn.AvgPool2d(7)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        official_init_(self)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def seed(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def seed_view(self) -> StemView:
        return StemView(self.conv1, self.bn1, post=self.maxpool)


class _Policy(nn.Module):
    """Agent: a small flat ResNet whose fc is replaced by identity, plus the policy head
    ``logit`` and the (unused at inference) value head ``vnet``."""

    def _finish(self, feat_dim: int, num_blocks: int) -> None:
        self.features.fc = nn.Sequential()
        self.feat_dim = feat_dim
        self.num_blocks = num_blocks
        self.logit = nn.Linear(feat_dim, num_blocks)
        self.vnet = nn.Linear(feat_dim, 1)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.features.forward_full(self.prepare(x))
        return torch.sigmoid(self.logit(feats)), self.vnet(feats)

    # The agent as a dense program (every block runs), so the engine can lower it too.
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.features.seed(self.prepare(x))

    def stem_view(self) -> StemView:
        # (no pre-step for an agent that sees the input as is: lets the engine fold its
        # whole forward into C++)
        identity = type(self).prepare is _Policy.prepare
        return dataclasses.replace(self.features.seed_view(), pre=None if identity else self.prepare)

    def block_views(self) -> list[BlockView]:
        return self.features.shortcut_views()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Block probabilities from the last feature map (the value head is not needed)."""
        h = self.features.avgpool(h)
        return torch.sigmoid(self.logit(h.reshape(h.shape[0], -1)))

    def head_view(self) -> HeadView:
        return HeadView(self.features.avgpool, self.logit, sigmoid=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # Legacy agents carry features.fc.* keys; the official override drops them.
        for key in [k for k in state_dict if k.startswith(prefix + "features.fc.")]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


class Policy32(_Policy):
    """CIFAR agent: a ResNet-8 (FlatResNet32 with [1,1,1]) on the full 32x32 image."""

    def __init__(self, layer_config: Optional[list[int]] = None, num_blocks: int = 15):
        super().__init__()
        self.features = FlatResNet32(BasicBlock, list(layer_config or [1, 1, 1]), num_classes=10)
        self._finish(self.features.fc_dim, num_blocks)


class Policy224(_Policy):
    """ImageNet agent: a ResNet-10 on the image average-pooled to 112x112, avgpool(4).
    The official constructor downloads torchvision resnet18 weights as initialisation;
    dynexec never downloads (checkpoint weights override them anyway)."""

    def __init__(self, layer_config: Optional[list[int]] = None, num_blocks: int = 16):
        super().__init__()
        self.features = FlatResNet224(BasicBlock, list(layer_config or [1, 1, 1, 1]), num_classes=1000)
        self.features.avgpool = nn.AvgPool2d(4)
        self._finish(512, num_blocks)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 2)


class BlockDrop(RoutedModel):
    """A BlockDrop model: agent (``agent``) + backbone (``resnet``), as in the finetune
    checkpoints ``{'agent': ..., 'resnet': ...}``."""

    router = "planned"
    # The official rule: a block is kept iff its probability p >= 0.5 (0.5 keeps; NaN drops).
    threshold, runs_at_threshold = 0.5, True

    def __init__(self, resnet: FlatResNet, agent: _Policy, name: str = "blockdrop"):
        super().__init__()
        k = sum(resnet.layer_config)
        if agent.num_blocks != k:
            raise ValueError(f"{name}: the agent decides {agent.num_blocks} blocks but the "
                             f"backbone has {k}")
        self.model_name = name
        self.resnet = resnet
        self.agent = agent
        self.input_size = resnet.input_size

    @property
    def fc(self) -> nn.Linear:
        return self.resnet.fc

    @property
    def num_blocks(self) -> int:
        return sum(self.resnet.layer_config)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet.seed(x)

    def stem_view(self) -> StemView:
        return self.resnet.seed_view()

    def block_views(self) -> list[BlockView]:
        return self.resnet.shortcut_views()

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.resnet.head(h)

    def head_view(self) -> HeadView:
        return self.resnet.head_view()

    def policy_probs(self, x: torch.Tensor) -> torch.Tensor:
        return self.agent(x)[0]

    def policy_network(self) -> _Policy:
        """The agent, which exposes stem/block_views/head like a dense routed model."""
        return self.agent


    def _masked_forward(self, x: torch.Tensor):
        routing = self.decide(self.policy_probs(x))
        return self.resnet.forward_masked(x, routing), routing


# Official model ids (utils.get_model): backbone class, block, layer_config, classes.
BLOCKDROP_MODELS = {
    "R32_C10": (FlatResNet32, BasicBlock, [5, 5, 5], 10),
    "R110_C10": (FlatResNet32, BasicBlock, [18, 18, 18], 10),
    "R32_C100": (FlatResNet32, BasicBlock, [5, 5, 5], 100),
    "R110_C100": (FlatResNet32, BasicBlock, [18, 18, 18], 100),
    "R101_ImgNet": (FlatResNet224, Bottleneck, [3, 4, 23, 3], 1000),
}


def build_blockdrop(name: str = "R110_C10", *, layers: Optional[list[int]] = None,
                    num_classes: Optional[int] = None, imagenet: Optional[bool] = None,
                    bottleneck: Optional[bool] = None) -> BlockDrop:
    """Build a BlockDrop model by official id, or any depth through ``layers``."""
    if name in BLOCKDROP_MODELS:
        cls, block, cfg, classes = BLOCKDROP_MODELS[name]
    else:
        cls, block, cfg, classes = FlatResNet32, BasicBlock, None, 10
    if imagenet is not None:
        cls = FlatResNet224 if imagenet else FlatResNet32
    if bottleneck is not None:
        block = Bottleneck if bottleneck else BasicBlock
    cfg = list(layers) if layers is not None else cfg
    if cfg is None:
        raise ValueError(f"unknown BlockDrop model {name!r}; give layers=[...] or one of "
                         f"{sorted(BLOCKDROP_MODELS)}")
    classes = num_classes if num_classes is not None else classes
    resnet = cls(block, cfg, classes)
    k = sum(cfg)
    agent = Policy224(num_blocks=k) if cls is FlatResNet224 else Policy32(num_blocks=k)
    return BlockDrop(resnet, agent, name=name)
