"""Embedded default models for benchmarks and demos.

Until trained checkpoints exist for a model, it is built with random weights whose router
bias is calibrated to the published routing, and labelled ``calibrated`` everywhere:

- ``skipnet110``: CIFAR SkipNet-110, recurrent gate; HRL executes 49.526 % of the blocks
  (the ucbdrive/skipnet README's CIFAR-10 table, computation percentage);
- ``blockdrop110``: BlockDrop R110_C10; 16.933 of 54 blocks (the Tushar-N/blockdrop Readme);
- ``skipnet101``: ImageNet SkipNet-101 HRL; 70.058 % of the blocks;
- ``blockdrop101``: BlockDrop R101_ImgNet; 24.770 of 33 blocks;
- ``skipnet110-allon``, ``blockdrop110-allon``: every block routed (the engine's overhead).

Shipped checkpoints trained on Fashion-MNIST (``checkpoints/*.pth.tar`` / ``*.t7``) are
``trained`` presets when present.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from .. import models
from ..models.checkpoints import load_checkpoint
from ..models.common import RoutedModel
from .calibrate import calibrate, randomize_batchnorm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHECKPOINT_DIR = os.environ.get("DYNEXEC_CHECKPOINTS", os.path.join(REPO_ROOT, "checkpoints"))


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str
    target_fraction: Optional[float] = None   # calibrated presets
    checkpoint: Optional[str] = None          # trained presets (file name in CHECKPOINT_DIR)
    description: str = ""

    @property
    def input_size(self) -> int:
        return 224 if ("imagenet" in self.arch or "ImgNet" in self.arch) else 32


CALIBRATED = {
    "skipnet110": Preset("skipnet110", "cifar10_rnn_gate_rl_110", 0.49526,
                         description="SkipNet-110 (recurrent gate), routing calibrated to HRL's "
                                     "49.5 % of blocks"),
    "blockdrop110": Preset("blockdrop110", "R110_C10", 16.933 / 54,
                           description="BlockDrop R110, routing calibrated to 16.9 of 54 blocks"),
    "skipnet101": Preset("skipnet101", "imagenet_rnn_gate_rl_101", 0.70058,
                         description="ImageNet SkipNet-101 (recurrent gate), calibrated to HRL's "
                                     "70.1 % of blocks"),
    "blockdrop101": Preset("blockdrop101", "R101_ImgNet", 24.770 / 33,
                           description="BlockDrop R101, calibrated to 24.8 of 33 blocks"),
}
# Every block routed: the engine's overhead over the dense engine (router included).
CALIBRATED.update({
    f"{name}-allon": Preset(f"{name}-allon", CALIBRATED[name].arch, 1.0,
                            description=f"{CALIBRATED[name].description.split(',')[0]}, every block routed")
    for name in ("skipnet110", "blockdrop110")
})
TRAINED = {
    "skipnet38-fmnist": Preset("skipnet38-fmnist", "cifar10_rnn_gate_rl_38",
                               checkpoint="skipnet38_rnn_hrl_fmnist.pth.tar",
                               description="SkipNet-38 (recurrent gate, HRL) trained on Fashion-MNIST"),
    "blockdrop32-fmnist": Preset("blockdrop32-fmnist", "R32_C10",
                                 checkpoint="blockdrop_r32_ft_fmnist.t7",
                                 description="BlockDrop R32 (finetuned) trained on Fashion-MNIST"),
}
PRESETS = {**CALIBRATED, **TRAINED}


def trained_available(preset: Preset) -> bool:
    return preset.checkpoint is not None and os.path.isfile(os.path.join(CHECKPOINT_DIR, preset.checkpoint))


def default_presets() -> list[str]:
    """The embedded defaults: shipped trained checkpoints when present, and the
    calibrated 110-layer CIFAR models."""
    return [n for n, p in TRAINED.items() if trained_available(p)] + ["skipnet110", "blockdrop110"]


def build_preset(name: str, calibration_images: torch.Tensor, seed: int = 0) -> tuple[RoutedModel, str]:
    """(eval model, routing_source) where routing_source is 'trained' or 'calibrated'."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(PRESETS)}")
    preset = PRESETS[name]
    if preset.checkpoint is not None:
        if not trained_available(preset):
            raise FileNotFoundError(f"{name}: checkpoint {preset.checkpoint} not found in {CHECKPOINT_DIR}")
        return load_checkpoint(os.path.join(CHECKPOINT_DIR, preset.checkpoint)), "trained"
    torch.manual_seed(seed)
    model = models.build(preset.arch).eval()
    randomize_batchnorm(model, torch.Generator().manual_seed(seed))
    calibrate(model, calibration_images, preset.target_fraction)
    return model, "calibrated"
