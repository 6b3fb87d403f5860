"""Pieces shared by the SkipNet and BlockDrop re-implementations.

Every dynamic model in dynexec exposes the small *routed-model interface* that the
runtime reads (see ``RoutedModel``): its stem, its blocks (``BlockView``, with the
convolution/BatchNorm pairs the runtime folds), its head, its router and the decision rule.
The runtime never looks inside a model beyond this interface. The eager ``forward`` of
each model is the official masked semantics and serves as the reference for the engine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def official_init_(model: nn.Module, zero_linear_bias: bool = False) -> None:
    """The initialisation both official code bases use (only matters before training)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            n = m.weight.size(0) * m.weight.size(1)
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if zero_linear_bias and m.bias is not None:
                nn.init.zeros_(m.bias)


ConvBN = tuple[nn.Conv2d, nn.BatchNorm2d]

SHORTCUT_KINDS = ("identity", "projection", "downsample_b")


@dataclass(frozen=True)
class BlockView:
    """One residual block as the runtime sees it.

    branch:   the residual function F(x) without the add (a callable module).
    shortcut: None for identity, else a module mapping the block input to the residual.
    shortcut_kind: 'identity' | 'projection' | 'downsample_b' (DownsampleB: 2x2 average
              pooling, then zero channels appended up to ``out_channels``).
    out_channels: channels of the block output.
    branch_layers: the branch as (conv, eval-mode BatchNorm) pairs, a ReLU after each but
              the last — what the runtime folds into its convolutions; None when the
              branch is not such a chain (the runtime then calls ``branch`` as is).
    shortcut_layers: a projection shortcut as (conv, BatchNorm) pairs, or None.
    """

    branch: nn.Module
    shortcut: Optional[nn.Module]
    shortcut_kind: str
    out_channels: int
    branch_layers: Optional[tuple[ConvBN, ...]] = None
    shortcut_layers: Optional[tuple[ConvBN, ...]] = None

    def __post_init__(self):
        if self.shortcut_kind not in SHORTCUT_KINDS:
            raise ValueError(f"shortcut_kind must be one of {SHORTCUT_KINDS}, got {self.shortcut_kind!r}")
        if (self.shortcut is None) != (self.shortcut_kind == "identity"):
            raise ValueError(f"a {self.shortcut_kind} shortcut needs "
                             f"{'no' if self.shortcut_kind == 'identity' else 'a'} shortcut module")


@dataclass(frozen=True)
class StemView:
    """The stem as the engine sees it: pre -> conv -> BN -> ReLU -> post, so lowering can
    fold the BatchNorm. pre/post are optional callables (e.g. an input pool, a max-pool)."""

    conv: nn.Conv2d
    bn: nn.BatchNorm2d
    pre: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    post: Optional[Callable[[torch.Tensor], torch.Tensor]] = None


@dataclass(frozen=True)
class RecurrentGateView:
    """SkipNet's recurrent gate as the runtime sees it: after block k, the block output's
    spatial mean goes through ``embeddings[k]`` (a 1x1 convolution), one step of ``lstm``
    (one layer; its state carried from gate to gate), ``proj`` (a Linear or 1x1
    convolution to one output) and a sigmoid: the probability that block k + 1 runs."""

    embeddings: tuple[nn.Conv2d, ...]
    lstm: nn.LSTM
    proj: nn.Module


@dataclass(frozen=True)
class HeadView:
    """The head as the engine sees it: ``pool`` (an AvgPool2d whose window is the whole
    last feature map at the model's input size) -> flatten -> ``linear`` -> sigmoid when
    ``sigmoid`` (a policy's block probabilities), so lowering can run it as one kernel."""

    pool: nn.AvgPool2d
    linear: nn.Linear
    sigmoid: bool = False


def check_input(x, *, model_name: str, in_channels: int, size: int,
                param: torch.Tensor) -> None:
    """Raise a clear error unless ``x`` is an [N, C, size, size] floating tensor on the
    model's device with the model's dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{model_name}: expected a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{model_name}: expected a floating-point input of dtype {param.dtype}, "
                        f"got dtype {x.dtype}")
    if x.dtype != param.dtype:
        raise TypeError(f"{model_name}: expected input dtype {param.dtype} (the model's dtype), "
                        f"got {x.dtype}; convert the input or the model with .to(dtype)")
    if x.device != param.device:
        raise ValueError(f"{model_name}: expected input on device {param.device} (the model's "
                         f"device), got {x.device}")
    if x.dim() != 4:
        raise ValueError(f"{model_name}: expected a 4-D input [N, {in_channels}, {size}, {size}], "
                         f"got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{model_name}: expected {in_channels} input channels, got "
                         f"{x.shape[1]} (shape {tuple(x.shape)})")
    if x.shape[2] != size or x.shape[3] != size:
        raise ValueError(f"{model_name}: expected spatial size {size}x{size} (the architecture's "
                         f"pooling is fixed to it), got {x.shape[2]}x{x.shape[3]}")


class RoutedModel(nn.Module):
    """Base class of every model dynexec can compile.

    Subclasses set ``router`` to 'none', 'online' (SkipNet: a gate after each block
    decides the next) or 'planned' (BlockDrop: a policy network decides every block from
    the input) and implement the methods below. The decision rule is declared, not
    coded: block k runs for a sample iff its probability p >= ``threshold`` (when
    ``runs_at_threshold``) or p > ``threshold``; NaN never runs it. ``decide`` applies
    it; every executor, the C++ one included, reads the declaration. The eager
    ``forward`` is the official semantics.
    """

    router: str = "none"
    threshold: float = 0.5
    runs_at_threshold: bool = False
    input_size: int = 32
    in_channels: int = 3
    model_name: str = "model"

    # -- interface read by dynexec.runtime -------------------------------------------
    def stem(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def block_views(self) -> list[BlockView]:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, h: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def stem_view(self) -> Optional[StemView]:
        """The stem's parts when it is conv -> BN -> ReLU (lets lowering fold it); None
        makes the engine call ``stem`` as is."""
        return None

    def head_view(self) -> Optional[HeadView]:
        """The head's parts when it is global average pooling -> linear (lets lowering run
        it as one kernel); None makes the engine call ``head`` as is."""
        return None

    def decide(self, p: torch.Tensor) -> torch.Tensor:
        """The routing (bool) from probabilities p, by the declared rule."""
        return p >= self.threshold if self.runs_at_threshold else p > self.threshold

    # planned routers ('planned'):
    def policy_probs(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """The policy network's probabilities [N, num_blocks] for input x."""
        raise NotImplementedError

    def policy_network(self) -> "RoutedModel":  # pragma: no cover - abstract
        """The policy network as a model of its own (router 'none', stem/blocks/head),
        whose head gives ``policy_probs``, so the runtime can lower it too."""
        raise NotImplementedError

    # online routers ('online'):
    def gates(self) -> list[nn.Module]:  # pragma: no cover - abstract
        """The gate after each block (the last one's output is not used)."""
        raise NotImplementedError

    def gate_init_state(self, batch: int, like: torch.Tensor):
        """The gates' state before the first gate (None for stateless gates)."""
        return None

    def gate_step(self, gate: nn.Module, h: torch.Tensor, state):  # pragma: no cover - abstract
        """(p [N], new state) of ``gate`` on the block output h."""
        raise NotImplementedError

    def recurrent_gate_view(self) -> Optional[RecurrentGateView]:
        """The gates' parts when they are SkipNet's recurrent gate (lets the runtime run
        one fused kernel per step); None makes it call ``gate_step``."""
        return None

    @property
    def num_blocks(self) -> int:
        return len(self.block_views())

    @property
    def num_classes(self) -> int:
        return self.fc.out_features

    def check_input(self, x: torch.Tensor) -> None:
        check_input(x, model_name=self.model_name, in_channels=self.in_channels,
                    size=self.input_size, param=next(self.parameters()))

    # -- public API ------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_routing(x)[0]

    def forward_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Official masked execution: every block runs on every sample, then the 0/1
        decision selects block output or shortcut. Returns (logits, routing[N, K] bool)."""
        self.check_input(x)
        n = x.shape[0]
        if n == 0:
            return self.empty_result(x)
        return self._masked_forward(x)

    def empty_result(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [0, classes], routing [0, num_blocks]) of an empty batch x."""
        logits = x.new_zeros((0, self.num_classes))
        return logits, torch.zeros((0, self.num_blocks), dtype=torch.bool, device=x.device)

    def _masked_forward(self, x: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError


def run_block_dense(view: BlockView, h: torch.Tensor) -> torch.Tensor:
    """relu(F(h) + shortcut(h)) for the whole batch (the executed-block formula)."""
    residual = h if view.shortcut is None else view.shortcut(h)
    return torch.relu(residual + view.branch(h))
