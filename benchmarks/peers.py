"""Dense peers: a routed model's backbone with every block executed and no router, run by
the runtimes a user would otherwise deploy it with.

benchmarks/latency.py times them as methods next to dynexec, which answers "is the routed
model faster than the dense model in the runtime I would use instead?". Each peer is built
once per model (export and compilation happen here, outside the timed region), run once
on every batch size of the benchmark (torch.compile compiles per batch size) and checked
against the dense reference; ``build_peers`` returns the peers that passed and, for every
other requested peer, the reason it is left out.

Peers (method ``peer:<name>``):
  torch-eager     PyTorch eager, NCHW
  torch-eager-cl  PyTorch eager, channels_last (weights and input)
  torch-compile   torch.compile (Inductor, dynamic=False; on CPU with freezing)
  onnxruntime     ONNX Runtime on the ONNX export (dynamic batch axis); CPUExecutionProvider
                  on CPU, CUDAExecutionProvider on CUDA
  openvino        OpenVINO on the ONNX export, compiled for CPU (float32, latency hint)
"""
from __future__ import annotations

import copy
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from dynexec.models.blockdrop import BlockDrop
from dynexec.models.common import RoutedModel, run_block_dense

PEERS = ("torch-eager", "torch-eager-cl", "torch-compile", "onnxruntime", "openvino")
# What --quick times: torch.compile compiles every model at every batch size, which alone
# takes longer than --quick's whole budget on a 2-core machine.
QUICK_PEERS = ("torch-eager", "torch-eager-cl", "onnxruntime", "openvino")
# A peer whose logits differ from the reference by more than this fraction of the largest
# |logit| is reported as failed, not timed.
TOLERANCE = 1e-3
ONNX_OPSET = 17


# --------------------------------------------------------------------------------------
# The dense backbone
# --------------------------------------------------------------------------------------
class _DenseBlock(nn.Module):
    """One block executed for the whole batch: relu(F(h) + shortcut(h))."""

    def __init__(self, view):
        super().__init__()
        self.view = view
        # registered so that .to(), deepcopy and the exporters see the block's modules
        self.branch = view.branch
        self.shortcut = view.shortcut

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return run_block_dense(self.view, h)


class DenseBackbone(nn.Module):
    """A routed model's network with every block executed and no router: stem, every block
    of ``block_views()`` with its shortcut, head (SkipNet: its ResNet without the gates)."""

    def __init__(self, model: RoutedModel):
        super().__init__()
        self.model = model
        self.blocks = nn.ModuleList(_DenseBlock(v) for v in model.block_views())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.model.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.model.head(h)


class FlatResNetBackbone(nn.Module):
    """BlockDrop's backbone without the agent: ``FlatResNet.forward_full``."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.resnet = resnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet.forward_full(x)


def dense_backbone(model: RoutedModel) -> nn.Module:
    """The dense backbone (eval mode) sharing ``model``'s weights."""
    if isinstance(model, BlockDrop):
        return FlatResNetBackbone(model.resnet).eval()
    return DenseBackbone(model).eval()


# --------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------
@dataclass
class Peer:
    name: str
    version: str                      # the runtime's version (the benchmark's backend column)
    fn: Callable[[torch.Tensor], object]   # x on the benchmark's device -> logits
    build_s: float = 0.0              # export/compile, and the first run at every batch size
    max_rel_error: dict = field(default_factory=dict)   # batch size -> error vs reference


@dataclass
class _Context:
    model: RoutedModel
    device: torch.device
    threads: int
    example: torch.Tensor
    workdir: str
    onnx_path: Optional[str] = None
    onnx_error: Optional[BaseException] = None

    def onnx(self) -> str:
        """The ONNX export of the dense backbone (made once, shared by the ONNX peers)."""
        if self.onnx_path is None and self.onnx_error is None:
            path = os.path.join(self.workdir, "dense.onnx")
            try:
                export_onnx(dense_backbone(self.model), self.example, path)
                self.onnx_path = path
            except Exception as e:  # reported by every peer that needs it
                self.onnx_error = e
        if self.onnx_error is not None:
            raise RuntimeError(f"ONNX export failed: {describe(self.onnx_error)}") from self.onnx_error
        return self.onnx_path


def export_onnx(module: nn.Module, example: torch.Tensor, path: str) -> None:
    """TorchScript-based export (no onnxscript needed), batch axis dynamic."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation and tracer warnings
        torch.onnx.export(module, (example,), path, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})


# Each builder returns (version, fn) or (version, fn, first_run), where first_run (default
# fn) is what runs first at every batch size, outside the timed region.
def _torch_eager(ctx: _Context, channels_last: bool = False) -> tuple[str, Callable]:
    if channels_last:
        module = dense_backbone(copy.deepcopy(ctx.model)).to(memory_format=torch.channels_last)

        def fn(x):
            with torch.inference_mode():
                return module(x.contiguous(memory_format=torch.channels_last))
    else:
        module = dense_backbone(ctx.model)

        def fn(x):
            with torch.inference_mode():
                return module(x)
    return torch.__version__, fn


def _torch_compile(ctx: _Context) -> tuple[str, Callable, Callable]:
    import torch._dynamo
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()  # the previous model's graphs
    module = dense_backbone(copy.deepcopy(ctx.model))
    compiled = torch.compile(module, dynamic=False)

    def fn(x):
        with torch.no_grad():
            return compiled(x)

    def first_run(x):
        """Compiles batch size x.shape[0] (build_peers runs every one before timing): with
        freezing on CPU, and room for one graph per batch size."""
        with torch.no_grad(), inductor_config.patch(freezing=ctx.device.type == "cpu"), \
                torch._dynamo.config.patch(recompile_limit=64):
            return compiled(x)
    return torch.__version__, fn, first_run


def _onnxruntime(ctx: _Context) -> tuple[str, Callable]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = ctx.threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if ctx.device.type == "cuda":
        available = ort.get_available_providers()
        if "CUDAExecutionProvider" not in available:
            raise RuntimeError(f"CUDAExecutionProvider is not available (providers: "
                               f"{', '.join(available)}; it needs onnxruntime-gpu)")
        session = ort.InferenceSession(ctx.onnx(), options, providers=[
            ("CUDAExecutionProvider", {"device_id": ctx.device.index or 0})])
        binding = session.io_binding()

        def fn(x):  # input and output stay on the GPU
            x = x.contiguous()
            binding.bind_input("x", "cuda", ctx.device.index or 0, np.float32, tuple(x.shape),
                               x.data_ptr())
            binding.bind_output("logits", "cuda", ctx.device.index or 0)
            session.run_with_iobinding(binding)
            return binding.get_outputs()[0]
    else:
        session = ort.InferenceSession(ctx.onnx(), options, providers=["CPUExecutionProvider"])

        def fn(x):
            return session.run(None, {"x": x.numpy()})[0]
    return ort.__version__, fn


def _openvino(ctx: _Context) -> tuple[str, Callable]:
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints

    if ctx.device.type != "cpu":
        raise RuntimeError(f"timed on the CPU only; the benchmark's device is {ctx.device.type}")
    try:
        source = ov.convert_model(ctx.onnx())
    except RuntimeError:
        if ctx.onnx_error is None:
            raise
        # no ONNX export: OpenVINO's own PyTorch front end
        source = ov.convert_model(dense_backbone(ctx.model), example_input=ctx.example)
    compiled = ov.Core().compile_model(source, "CPU", {
        props.inference_num_threads: ctx.threads,
        hints.inference_precision: ov.Type.f32,   # not bf16 on CPUs that have it
        hints.performance_mode: hints.PerformanceMode.LATENCY})
    request = compiled.create_infer_request()

    def fn(x):
        request.infer({0: x.numpy()}, share_inputs=True, share_outputs=True)
        return request.get_output_tensor(0).data
    return ov.get_version().split("-")[0], fn


BUILDERS = {
    "torch-eager": _torch_eager,
    "torch-eager-cl": lambda ctx: _torch_eager(ctx, channels_last=True),
    "torch-compile": _torch_compile,
    "onnxruntime": _onnxruntime,
    "openvino": _openvino,
}
# The modules each peer imports: a peer whose module is missing is reported before any
# model is built.
REQUIRES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}


def describe(e: BaseException) -> str:
    """'ExceptionType: first line of the message' (at most 300 characters)."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300].rstrip(": ")


def to_tensor(out) -> torch.Tensor:
    """A peer's output (tensor, NumPy array or ONNX Runtime OrtValue) as a CPU tensor."""
    if isinstance(out, torch.Tensor):
        return out.detach().cpu()
    if hasattr(out, "numpy") and not hasattr(out, "__array_interface__"):
        out = out.numpy()  # OrtValue
    return torch.from_numpy(out.copy())


def unavailable_peers(names: list[str]) -> dict[str, str]:
    """{name: reason} for requested peers that are unknown or whose runtime is missing."""
    import importlib

    out = {}
    for name in names:
        if name not in BUILDERS:
            out[name] = f"unknown peer (known: {', '.join(PEERS)})"
            continue
        for module in REQUIRES.get(name, ()):
            try:
                importlib.import_module(module)
            except Exception as e:  # ImportError, or a broken install
                out[name] = describe(e)
                break
    return out


def build_peers(model: RoutedModel, names: list[str], batch_sizes: list[int], images: torch.Tensor,
                reference: Callable[[torch.Tensor], torch.Tensor], *, threads: Optional[int] = None,
                tolerance: float = TOLERANCE) -> tuple[dict[str, Peer], dict[str, str]]:
    """(peers by name, {name: reason} for every requested peer left out).

    ``images`` (on the benchmark's device, at least max(batch_sizes) of them) give the
    check's inputs: the first b images for every batch size b; ``reference(x)`` gives the
    dense logits the peer's must match (max abs error <= tolerance * max |logit|)."""
    device = images.device
    peers: dict[str, Peer] = {}
    unavailable = unavailable_peers(names)
    wanted = [n for n in dict.fromkeys(names) if n not in unavailable]
    if not wanted:
        return peers, unavailable
    inputs = {b: images[:b].contiguous() for b in batch_sizes}
    with torch.inference_mode():
        references = {b: to_tensor(reference(x)).float() for b, x in inputs.items()}
    with tempfile.TemporaryDirectory(prefix="dynexec-peers-") as workdir:
        ctx = _Context(model.eval(), device, threads or torch.get_num_threads(),
                       inputs[min(batch_sizes)], workdir)
        for name in wanted:
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    # the runtimes' own deprecation notices (on torch.jit, ...): not actionable here
                    warnings.simplefilter("ignore", DeprecationWarning)
                    version, fn, errors = _build_and_check(name, ctx, inputs, references, tolerance)
            except Exception as e:
                unavailable[name] = describe(e)
                continue
            peers[name] = Peer(name, version, fn, time.perf_counter() - t0, errors)
    return peers, unavailable


def _build_and_check(name: str, ctx: _Context, inputs: dict, references: dict,
                     tolerance: float) -> tuple[str, Callable, dict]:
    """(version, fn, {batch: max relative error}); raises where the peer fails."""
    version, fn, *first_run = BUILDERS[name](ctx)
    first_run = first_run[0] if first_run else fn
    errors = {}
    for b, x in inputs.items():  # compiles/warms every batch size
        out = to_tensor(first_run(x)).float()
        ref = references[b]
        if out.shape != ref.shape:
            raise RuntimeError(f"output shape {tuple(out.shape)} at batch {b}, expected {tuple(ref.shape)}")
        errors[b] = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
        if not errors[b] <= tolerance:
            raise RuntimeError(f"output does not match the dense reference at batch {b}: max abs "
                               f"error {errors[b]:.2e} of max |logit| (tolerance {tolerance:g})")
    return version, fn, errors
