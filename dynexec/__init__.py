"""dynexec: an inference engine for dynamic-depth residual networks (SkipNet, BlockDrop).

    engine = dynexec.compile(dynexec.load_checkpoint(path))
    logits, routing = engine(x, return_routing=True)
"""
from __future__ import annotations

import warnings

from . import models
from .models import build
from .models.checkpoints import CheckpointError, load_checkpoint
from .runtime.engine import Engine, compile
from .runtime.ops import extension as _extension

# Load the native extension now, so its ops are registered; without it the engine still
# works on the pure-PyTorch backend. A CUDA-version mismatch raises a clear RuntimeError.
_native_module, _native_reason = _extension.load()
if _native_module is None:
    warnings.warn(f"dynexec: native extension unavailable, using the 'torch' backend: "
                  f"{_native_reason}", RuntimeWarning, stacklevel=2)

__version__ = "0.1.0"

__all__ = ["models", "build", "compile", "Engine", "load_checkpoint", "CheckpointError",
           "__version__"]
