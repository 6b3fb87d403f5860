"""Reading (and writing) the checkpoint files of the official SkipNet and BlockDrop code.

Recognised (the official training scripts' formats; see docs/official-models.md):
- SkipNet training-script files ``{'iter'|'epoch', 'arch', 'state_dict', 'best_prec1'}``
  with ``module.``-prefixed keys, duplicated downsample keys, no ``num_batches_tracked``;
- BlockDrop finetune files ``{'agent', 'resnet', 'epoch', 'reward', 'acc'}``;
- BlockDrop curriculum files with only ``'agent'`` (or legacy ``'net'``, maybe with
  ``features.fc.*`` keys): these need ``backbone=``, a finetune file, a bare FlatResNet
  state_dict, or a pretrained-backbone file ``{'state_dict': ...}`` in ``layerN`` naming
  (translated as the official ``load_weights_to_flatresnet``);
- a bare state_dict of any of the above.

Files are read with ``torch.load(weights_only=True)``; one that needs full unpickling
(which can execute code) loads only with ``trust=True``. Every failure is a ValueError
naming the file; a model is returned only after a complete strict load.
"""
from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from collections import OrderedDict
from typing import Any, Optional

import torch
from torch import nn

from .. import models
from .blockdrop import BasicBlock as BDBasic
from .blockdrop import BlockDrop, FlatResNet, FlatResNet32, FlatResNet224, Policy32, Policy224
from .blockdrop import Bottleneck as BDBottleneck
from .common import RoutedModel
from .skipnet import BasicBlock as SNBasic
from .skipnet import Bottleneck as SNBottleneck
from .skipnet import PlainResNet, SkipNet

_SKIPNET_NAMES = set(models.skipnet_constructors())


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded; the message names the file and the fix."""


# --------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------
def read_file(path: str | os.PathLike, map_location: Any = "cpu", trust: bool = False) -> Any:
    """torch.load with weights_only=True; full unpickling only when ``trust``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file; pass the path "
                              f"of the .pth/.t7/.pth.tar file inside it")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path}: the file is empty, not a PyTorch checkpoint")
    _check_zip_integrity(path)
    try:
        return _load(path, map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        broken = _pickle_stream_error(path)
        if broken is not None:  # not a pickle at all: corrupt, never suggest trust=True
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (corrupt, "
                                  f"truncated or another format: {broken}); re-download or "
                                  f"re-save the file") from None
        if not trust:
            raise CheckpointError(
                f"{path}: this file cannot be read with torch.load(weights_only=True) and "
                f"needs full unpickling, which can execute code stored in the file. If you "
                f"trust its origin, call load_checkpoint(..., trust=True). "
                f"(torch said: {_first_line(exc)})") from None
    except Exception as exc:  # truncated, random bytes, wrong format
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint "
                              f"({type(exc).__name__}: {_first_line(exc)})") from None
    try:
        return _load(path, map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"{path}: full unpickling failed ({type(exc).__name__}: "
                              f"{_first_line(exc)})") from None


def _check_zip_integrity(path: str) -> None:
    """torch.load does not verify the CRC-32 of zip records, so bytes corrupted inside a
    tensor record would load as silently wrong weights. Check every record first."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except Exception as exc:  # broken central directory, bad local headers, ...
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (damaged zip "
                              f"archive: {type(exc).__name__}: {_first_line(exc)}); "
                              f"re-download or re-save the file") from None
    if bad is not None:
        raise CheckpointError(f"{path}: the file is corrupted (CRC-32 mismatch in record "
                              f"{bad!r}); re-download or re-save the file")


def _pickle_stream_error(path: str) -> Optional[str]:
    """None if the file's pickle (data.pkl for zip files) is a well-formed opcode stream,
    else why not. Only parses opcodes (pickletools.genops); nothing is imported or run."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl")]
                if not names:
                    return "a zip archive without data.pkl"
                data = zf.read(names[0])
        else:
            with open(path, "rb") as f:
                data = f.read(64 << 20)
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except Exception as exc:
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None


def _load(path: str, map_location: Any, weights_only: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except UnicodeDecodeError:
        # Python 2 pickles (BlockDrop was written for Python 2.7). The weights-only
        # unpickler honours the encoding too, although torch warns that it might not.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="pickle_load_args only works")
            return torch.load(path, map_location=map_location, weights_only=weights_only,
                              encoding="latin1")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# --------------------------------------------------------------------------------------
# State-dict helpers
# --------------------------------------------------------------------------------------
def _as_state_dict(obj: Any, path: str, what: str) -> "OrderedDict[str, torch.Tensor]":
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path}: expected {what} to be a non-empty state_dict "
                              f"(a dict of tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: {what} is not a state_dict; entries that are not "
                              f"str -> Tensor: {_short(bad)}")
    for k, v in obj.items():
        if v.layout != torch.strided:
            raise CheckpointError(f"{path}: {what} entry {k!r} is a {v.layout} tensor; "
                                  f"checkpoints hold dense (strided) tensors only")
        # A crafted file can declare a huge shape over a tiny storage (stride 0); building
        # a model from such shapes would try to allocate that much memory.
        if v.numel() > 0 and v.untyped_storage().nbytes() < v.numel() * v.element_size():
            raise CheckpointError(f"{path}: {what} entry {k!r} declares shape "
                                  f"{tuple(v.shape)} ({v.numel()} elements) but the file "
                                  f"stores only {v.untyped_storage().nbytes()} bytes for it; "
                                  f"the file is corrupt or crafted")
    # A plain dict without _metadata: BatchNorm then accepts a missing num_batches_tracked.
    return OrderedDict(obj.items())


def strip_prefix(sd: dict, prefix: str = "module.") -> "OrderedDict[str, torch.Tensor]":
    if sd and all(k.startswith(prefix) for k in sd):
        return OrderedDict((k[len(prefix):], v) for k, v in sd.items())
    return OrderedDict(sd.items())


def legacy_state_dict(module: nn.Module, prefix: str = "") -> "OrderedDict[str, torch.Tensor]":
    """The state_dict as PyTorch 0.2/0.3 wrote it: no num_batches_tracked, plain dict,
    optional key prefix (``module.`` for the SkipNet scripts' DataParallel)."""
    return OrderedDict((prefix + k, v.detach().clone()) for k, v in module.state_dict().items()
                       if not k.endswith("num_batches_tracked"))


def _short(keys, limit: int = 8) -> str:
    keys = list(keys)
    shown = ", ".join(map(str, keys[:limit]))
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def _fill_downsample_twins(sd: dict, model: nn.Module) -> None:
    """SkipNet registers each downsample twice (group{g}_ds{i} and the block's
    .downsample). Accept files that kept only one of the two copies."""
    expected = model.state_dict()
    for key in list(expected):
        if key in sd:
            continue
        m = re.match(r"group(\d+)_ds(\d+)\.(.*)$", key)
        twin = f"group{m.group(1)}_layer{m.group(2)}.downsample.{m.group(3)}" if m else None
        m2 = re.match(r"group(\d+)_layer(\d+)\.downsample\.(.*)$", key)
        if m2:
            twin = f"group{m2.group(1)}_ds{m2.group(2)}.{m2.group(3)}"
        if twin and twin in sd:
            sd[key] = sd[twin]


def strict_load(model: nn.Module, sd: dict, path: str, what: str) -> None:
    """Strict load with a clear error listing missing, unexpected and mis-shaped keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in expected]
    shapes = [f"{k}: expected {tuple(expected[k].shape)}, file has {tuple(sd[k].shape)}"
              for k in sd if k in expected and tuple(sd[k].shape) != tuple(expected[k].shape)]
    # Floating weights may come in another float dtype (cast, like load_state_dict does);
    # integer/bool/complex values for floating parameters are refused, not cast silently.
    dtypes = [f"{k}: expected a floating-point tensor, file has {sd[k].dtype}"
              for k in sd if k in expected and expected[k].is_floating_point()
              and not sd[k].is_floating_point()]
    if missing or unexpected or shapes or dtypes:
        name = getattr(model, "model_name", "")
        parts = [f"{path}: the {what} does not match {model.__class__.__name__}"
                 + (f" ({name})" if name else "")]
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches: {_short(shapes, 5)}")
        if dtypes:
            parts.append(f"dtype mismatches: {_short(dtypes, 5)}")
        raise CheckpointError("; ".join(parts))
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: loading the {what} failed: {_first_line(exc)}") from None


# --------------------------------------------------------------------------------------
# Architecture inference
# --------------------------------------------------------------------------------------
# Far above every official model (the deepest, SkipNet-152 CIFAR, has 25 per group);
# guards against a crafted key like 'blocks.0.999999999.conv1.weight' building a huge model.
MAX_BLOCKS_PER_GROUP = 1000


def _group_counts(sd: dict, pattern: str, path: str) -> list[int]:
    counts: dict[int, int] = {}
    for k in sd:
        m = re.match(pattern, k)
        if m:
            g, i = int(m.group(1)), int(m.group(2))
            counts[g] = max(counts.get(g, 0), i + 1)
    if not counts:
        return []
    if max(counts) - min(counts) >= 16 or max(counts.values()) > MAX_BLOCKS_PER_GROUP:
        raise CheckpointError(f"{path}: implausible block numbering in the keys (groups "
                              f"{min(counts)}..{max(counts)}, up to {max(counts.values())} "
                              f"blocks per group; at most {MAX_BLOCKS_PER_GROUP} are accepted)")
    first = min(counts)
    return [counts.get(g, 0) for g in range(first, max(counts) + 1)]


def _require(sd: dict, key: str, path: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise CheckpointError(f"{path}: cannot infer the {what} architecture: key {key!r} is missing")
    return sd[key]


def infer_skipnet(sd: dict, path: str, arch: Optional[str] = None) -> RoutedModel:
    """Build the SkipNet (gated or plain) that the keys describe."""
    conv1 = _require(sd, "conv1.weight", path, "SkipNet")
    fc = _require(sd, "fc.weight", path, "SkipNet")
    imagenet = conv1.shape[-1] == 7
    dataset = "imagenet" if imagenet else "cifar"
    classes = fc.shape[0]
    gated = any(re.match(r"group\d+_layer\d+\.", k) for k in sd)
    if gated:
        layers = _group_counts(sd, r"group(\d+)_layer(\d+)\.", path)
        bottleneck = "group1_layer0.conv3.weight" in sd
    else:
        layers = _group_counts(sd, r"layer(\d+)\.(\d+)\.", path)
        bottleneck = "layer1.0.conv3.weight" in sd
    if not layers or min(layers) < 1 or len(layers) != (4 if imagenet else 3):
        raise CheckpointError(f"{path}: cannot infer the block counts per group from the keys "
                              f"(found {layers or 'none'})")
    block = SNBottleneck if bottleneck else SNBasic
    variant = "rl" if arch and "_rl_" in arch else "sp"
    name = arch if arch in _SKIPNET_NAMES else None
    if not gated:
        return PlainResNet(block, layers, classes, dataset=dataset,
                           name=name or f"{dataset}_resnet_{_depth(layers, bottleneck, imagenet)}")
    if "control.rnn.weight_ih_l0" in sd:
        gate_type = "rnn"
        embed = _require(sd, "group1_gate0.1.weight", path, "recurrent gate").shape[0]
        hidden = sd["control.rnn.weight_hh_l0"].shape[1]
    elif "group1_gate0.conv2.weight" in sd:
        gate_type, embed, hidden = "ffgate1", 10, 10
    elif "group1_gate0.linear_layer.weight" in sd:
        gate_type, embed, hidden = "ffgate2", 10, 10
    else:
        raise CheckpointError(f"{path}: SkipNet keys without a recognisable gate "
                              f"(expected control.rnn.*, group1_gate0.conv2.* or "
                              f"group1_gate0.linear_layer.*)")
    default = f"{'imagenet' if imagenet else f'cifar{classes}'}_" \
              f"{'rnn_gate' if gate_type == 'rnn' else 'feedforward'}_" \
              f"{_depth(layers, bottleneck, imagenet)}"
    return SkipNet(block, layers, classes, dataset=dataset, gate_type=gate_type,
                   embed_dim=embed, hidden_dim=hidden, variant=variant, name=name or default)


def _depth(layers: list[int], bottleneck: bool, imagenet: bool) -> int:
    return sum(layers) * (3 if bottleneck else 2) + 2


def infer_flatresnet(sd: dict, path: str) -> FlatResNet:
    conv1 = _require(sd, "conv1.weight", path, "BlockDrop backbone")
    fc = _require(sd, "fc.weight", path, "BlockDrop backbone")
    layers = _group_counts(sd, r"blocks\.(\d+)\.(\d+)\.", path)
    imagenet = conv1.shape[-1] == 7
    if not layers or min(layers) < 1 or len(layers) != (4 if imagenet else 3):
        raise CheckpointError(f"{path}: cannot infer the BlockDrop backbone's blocks per stage "
                              f"from the keys (found {layers or 'none'})")
    block = BDBottleneck if "blocks.0.0.conv3.weight" in sd else BDBasic
    cls = FlatResNet224 if imagenet else FlatResNet32
    return cls(block, layers, fc.shape[0])


def infer_policy(sd: dict, path: str):
    conv1 = _require(sd, "features.conv1.weight", path, "BlockDrop agent")
    logit = _require(sd, "logit.weight", path, "BlockDrop agent")
    layers = _group_counts(sd, r"features\.blocks\.(\d+)\.(\d+)\.", path)
    if conv1.shape[-1] == 7:
        return Policy224(layers or [1, 1, 1, 1], num_blocks=logit.shape[0])
    return Policy32(layers or [1, 1, 1], num_blocks=logit.shape[0])


def translate_layer_naming(sd: dict) -> "OrderedDict[str, torch.Tensor]":
    """A pretrained ResNet state_dict in ``layerN.B.*`` naming -> FlatResNet keys, as the
    official ``load_weights_to_flatresnet`` maps them (blockdrop.md §4.2)."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in strip_prefix(sd).items():
        if key.startswith(("conv1.", "bn1.", "fc.")):
            out[key] = value
        elif "downsample" in key:
            m = re.match(r"layer(\d+).*\.(\d+)\.(.*)", key)  # greedy: last .digit. = seq index
            if m:
                out[f"ds.{int(m.group(1)) - 1}.{m.group(2)}.{m.group(3)}"] = value
        else:
            m = re.match(r"layer(\d+)\.(.*)", key)
            if m:
                out[f"blocks.{int(m.group(1)) - 1}.{m.group(2)}"] = value
    return out


# --------------------------------------------------------------------------------------
# Kinds of files
# --------------------------------------------------------------------------------------
def _kind_of_state_dict(sd: dict) -> str:
    keys = list(sd)
    if any(k.startswith("resnet.") for k in keys) and any(k.startswith("agent.") for k in keys):
        return "blockdrop-model"
    if any(k.startswith("features.") for k in keys) and "logit.weight" in sd:
        return "blockdrop-agent"
    if any(k.startswith("blocks.") for k in keys):
        return "blockdrop-backbone"
    if any(re.match(r"group\d+_layer\d+\.", k) for k in keys):
        return "skipnet"
    if any(re.match(r"layer\d+\.\d+\.", k) for k in keys):
        return "layer-resnet"
    return "unknown"


def _load_backbone(backbone: Any, map_location: Any, trust: bool) -> tuple[FlatResNet, str]:
    """A BlockDrop backbone from a path (finetune file, pretrained {'state_dict'} file in
    layerN naming, or bare FlatResNet state_dict) or an already built FlatResNet."""
    if isinstance(backbone, FlatResNet):
        return backbone, "<module>"
    path = os.fspath(backbone)
    obj = read_file(path, map_location, trust)
    if isinstance(obj, dict) and "resnet" in obj:
        sd = strip_prefix(_as_state_dict(obj["resnet"], path, "'resnet' entry"))
    elif isinstance(obj, dict) and "state_dict" in obj:
        sd = strip_prefix(_as_state_dict(obj["state_dict"], path, "'state_dict' entry"))
    else:
        sd = strip_prefix(_as_state_dict(obj, path, "backbone"))
    if _kind_of_state_dict(sd) == "layer-resnet":
        sd = translate_layer_naming(sd)
        net = infer_flatresnet(sd, path)
        expected = net.state_dict()
        dropped = [k for k in sd if k not in expected]
        if dropped:  # the official loader prints "block missing" and skips these
            warnings.warn(f"{path}: pretrained keys with no place in the backbone were "
                          f"skipped: {_short(dropped)}")
            for k in dropped:
                del sd[k]
    elif _kind_of_state_dict(sd) == "blockdrop-backbone":
        net = infer_flatresnet(sd, path)
    else:
        raise CheckpointError(f"{path}: expected a BlockDrop backbone (a finetune file with "
                              f"'resnet', a pretrained file {{'state_dict': layerN...}}, or a "
                              f"FlatResNet state_dict with blocks.* keys); found none of these")
    strict_load(net, sd, path, "backbone")
    return net, path


def _blockdrop_name(net: FlatResNet) -> str:
    for name, (cls, block, cfg, classes) in models.BLOCKDROP_MODELS.items():
        if isinstance(net, cls) and net.layer_config == cfg and net.fc.out_features == classes \
                and isinstance(net.blocks[0][0], block):
            return name
    return f"blockdrop_{'imagenet' if isinstance(net, FlatResNet224) else 'cifar'}_{net.layer_config}"


def _build_blockdrop(agent_sd: dict, resnet: FlatResNet, path: str) -> BlockDrop:
    agent_sd = OrderedDict((k, v) for k, v in strip_prefix(agent_sd).items()
                           if not k.startswith("features.fc."))
    agent = infer_policy(agent_sd, path)
    strict_load(agent, agent_sd, path, "agent")
    if agent.num_blocks != sum(resnet.layer_config):
        raise CheckpointError(f"{path}: the agent decides {agent.num_blocks} blocks but the "
                              f"backbone has {sum(resnet.layer_config)} "
                              f"(layer_config {resnet.layer_config})")
    return BlockDrop(resnet, agent, name=_blockdrop_name(resnet))


def load_checkpoint(path: str | os.PathLike, backbone: Any = None, map_location: Any = "cpu",
                    trust: bool = False) -> RoutedModel:
    """Load an official (or dynexec-written) SkipNet or BlockDrop checkpoint into an
    eval-mode dynexec model. See the module docstring for the formats."""
    path = os.fspath(path)
    obj = read_file(path, map_location, trust)
    meta: dict[str, Any] = {"path": path}
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict (a training checkpoint or a state_dict), "
                              f"got {type(obj).__name__}")

    if "agent" in obj or "net" in obj:
        agent_sd = _as_state_dict(obj.get("agent", obj.get("net")), path, "agent")
        if "resnet" in obj:
            resnet_sd = strip_prefix(_as_state_dict(obj["resnet"], path, "'resnet' entry"))
            resnet = infer_flatresnet(resnet_sd, path)
            strict_load(resnet, resnet_sd, path, "backbone ('resnet')")
            meta["format"] = "blockdrop-finetune"
        elif backbone is None:
            raise CheckpointError(
                f"{path}: a BlockDrop curriculum checkpoint holds only the agent; pass the "
                f"backbone too: load_checkpoint(path, backbone='<pretrained backbone or "
                f"finetune file>')")
        else:
            resnet, bpath = _load_backbone(backbone, map_location, trust)
            meta["format"] = "blockdrop-curriculum"
            meta["backbone"] = bpath
        model: RoutedModel = _build_blockdrop(agent_sd, resnet, path)
        meta.update({k: obj[k] for k in ("epoch", "reward", "acc") if k in obj})
    elif "state_dict" in obj:
        sd = strip_prefix(_as_state_dict(obj["state_dict"], path, "'state_dict' entry"))
        arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
        model = _from_bare(sd, path, arch, backbone, map_location, trust)
        meta["format"] = "skipnet-training" if ("iter" in obj or "epoch" in obj) else "state_dict"
        meta.update({k: obj[k] for k in ("iter", "epoch", "arch", "best_prec1") if k in obj})
    else:
        sd = strip_prefix(_as_state_dict(obj, path, "checkpoint"))
        model = _from_bare(sd, path, None, backbone, map_location, trust)
        meta["format"] = "state_dict"
    model.eval()
    model.checkpoint_meta = meta
    return model


def _from_bare(sd: dict, path: str, arch: Optional[str], backbone: Any, map_location: Any,
               trust: bool) -> RoutedModel:
    kind = _kind_of_state_dict(sd)
    if kind == "blockdrop-model":
        agent_sd = OrderedDict((k[6:], v) for k, v in sd.items() if k.startswith("agent."))
        resnet_sd = OrderedDict((k[7:], v) for k, v in sd.items() if k.startswith("resnet."))
        resnet = infer_flatresnet(resnet_sd, path)
        strict_load(resnet, resnet_sd, path, "backbone")
        return _build_blockdrop(agent_sd, resnet, path)
    if kind == "blockdrop-agent":
        if backbone is None:
            raise CheckpointError(f"{path}: this is a BlockDrop agent without a backbone; pass "
                                  f"backbone=<pretrained backbone or finetune file>")
        resnet, _ = _load_backbone(backbone, map_location, trust)
        return _build_blockdrop(sd, resnet, path)
    if kind == "blockdrop-backbone":
        raise CheckpointError(f"{path}: this is a BlockDrop backbone without an agent; load the "
                              f"agent checkpoint with backbone='{path}'")
    if kind in ("skipnet", "layer-resnet"):
        if kind == "layer-resnet" and "layer2.0.downsample.0.weight" not in sd \
                and sd.get("conv1.weight", torch.empty(0)).shape[-1:] == (3,):
            raise CheckpointError(f"{path}: a CIFAR ResNet without projection shortcuts (a "
                                  f"BlockDrop pretrained backbone); load an agent checkpoint "
                                  f"with backbone='{path}'")
        model = None
        if arch in _SKIPNET_NAMES:
            model = models.build(arch)
        model = model if model is not None and _compatible(model, sd) else infer_skipnet(sd, path, arch)
        _fill_downsample_twins(sd, model)
        strict_load(model, sd, path, "state_dict")
        return model
    raise CheckpointError(f"{path}: unrecognised checkpoint format; expected a SkipNet file "
                          f"(group*_layer*/layer* keys), a BlockDrop file ('agent'/'resnet'/'net') "
                          f"or a state_dict of one of them; top-level keys: {_short(sd)}")


def _compatible(model: nn.Module, sd: dict) -> bool:
    expected = model.state_dict()
    return all(k in sd and tuple(sd[k].shape) == tuple(v.shape)
               for k, v in expected.items() if not k.endswith("num_batches_tracked")
               and not re.match(r"group\d+_(ds\d+|layer\d+\.downsample)\.", k))


# --------------------------------------------------------------------------------------
# Writing files in the official formats
# --------------------------------------------------------------------------------------
def save_skipnet_checkpoint(model: nn.Module, path: str | os.PathLike, *, arch: str,
                            best_prec1: float, iteration: Optional[int] = None,
                            epoch: Optional[int] = None) -> None:
    """As cifar/train_*.py ({'iter',...}) or imagenet/train_*.py ({'epoch',...}) write it:
    DataParallel's ``module.`` prefix, no num_batches_tracked."""
    if (iteration is None) == (epoch is None):
        raise ValueError("give exactly one of iteration= (CIFAR scripts) or epoch= (ImageNet)")
    ckpt: dict[str, Any] = {"iter": int(iteration)} if iteration is not None else {"epoch": int(epoch)}
    ckpt.update({"arch": arch, "state_dict": legacy_state_dict(model, "module."),
                 "best_prec1": float(best_prec1)})
    _atomic_save(ckpt, path)


def save_blockdrop_checkpoint(model: BlockDrop, path: str | os.PathLike, *, epoch: int,
                              reward: float, acc: float, with_backbone: bool = True) -> None:
    """As finetune.py ({'agent','resnet',...}) or cl_training.py (agent only) write it."""
    ckpt: dict[str, Any] = {"agent": legacy_state_dict(model.agent)}
    if with_backbone:
        ckpt["resnet"] = legacy_state_dict(model.resnet)
    ckpt.update({"epoch": int(epoch), "reward": float(reward), "acc": float(acc)})
    _atomic_save(ckpt, path)


def _atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write to a temporary file, then rename: an interrupted save never leaves a
    truncated checkpoint behind."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)
