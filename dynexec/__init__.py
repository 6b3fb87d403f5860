"""dynexec: an inference engine for dynamic-depth residual networks (SkipNet, BlockDrop).

    engine = dynexec.compile(dynexec.load_checkpoint(path))
    logits, routing = engine(x, return_routing=True)
"""
from __future__ import annotations

from . import models
from .engine import Engine, compile
from .models import build

__version__ = "0.1.0"

__all__ = ["models", "build", "compile", "Engine", "__version__"]
