"""Official-compatible SkipNet and BlockDrop models.

``build(name, **kw)`` builds any model by its official name: the SkipNet constructors of
ucbdrive/skipnet (``cifar10_rnn_gate_110``, ``imagenet_rnn_gate_rl_101``, ``resnet50``,
the misspelled aliases such as ``cifar100_feeforward_38``) and the BlockDrop model ids of
Tushar-N/blockdrop (``R110_C10``, ``R101_ImgNet``, ...). Other depths: pass
``layers=[...]``.
"""
from __future__ import annotations

from .blockdrop import (
    BLOCKDROP_MODELS,
    BlockDrop,
    DownsampleB,
    FlatResNet,
    FlatResNet32,
    FlatResNet224,
    Policy32,
    Policy224,
    build_blockdrop,
)
from .common import BlockView, RoutedModel
from .skipnet import PlainResNet, SkipNet, skipnet_constructors

_SKIPNET = skipnet_constructors()


def available() -> list[str]:
    """Every name ``build`` accepts."""
    return sorted(_SKIPNET) + sorted(BLOCKDROP_MODELS)


def build(name: str, **kwargs) -> RoutedModel:
    """Build a model by official name; keyword arguments: ``num_classes``, ``layers``."""
    if name in _SKIPNET:
        return _SKIPNET[name](**kwargs)
    if name in BLOCKDROP_MODELS:
        return build_blockdrop(name, **kwargs)
    raise ValueError(f"unknown model name {name!r}; expected one of: {', '.join(available())}")


__all__ = ["build", "available", "RoutedModel", "BlockView", "SkipNet", "PlainResNet",
           "BlockDrop", "FlatResNet", "FlatResNet32", "FlatResNet224", "Policy32", "Policy224",
           "DownsampleB", "build_blockdrop", "BLOCKDROP_MODELS"]
