"""Checkpoint files in every official format, written from our own models the way the
official scripts wrote them (legacy: no num_batches_tracked; module. prefixes)."""
from __future__ import annotations

import os
import pickle
from collections import OrderedDict

import pytest
import torch

import dynexec
from dynexec.models.checkpoints import (
    CheckpointError,
    legacy_state_dict,
    load_checkpoint,
    save_blockdrop_checkpoint,
    save_skipnet_checkpoint,
)

from conftest import make_model, rel_err


def _same_function(a, b, size=32, n=4):
    x = torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(7))
    la, ra = a.forward_routing(x)
    lb, rb = b.forward_routing(x)
    assert torch.equal(ra, rb)
    assert rel_err(lb, la) <= 1e-6
    ea, eb = dynexec.compile(b)(x, return_routing=True)
    assert torch.equal(eb, ra)
    assert rel_err(ea, la) <= 1e-5


@pytest.mark.parametrize("arch,kwargs", [
    ("cifar10_rnn_gate_38", {}),
    ("cifar10_rnn_gate_rl_38", {}),
    ("cifar100_feeforward_38", {}),
    ("cifar10_feedforward_110", {"layers": [3, 3, 3]}),
    ("cifar10_resnet_38", {}),
])
def test_skipnet_training_file_roundtrip(tmp_path, arch, kwargs):
    torch.manual_seed(0)
    model = dynexec.build(arch, **kwargs).eval()
    path = tmp_path / "checkpoint_latest.pth.tar"
    save_skipnet_checkpoint(model, path, arch=arch, best_prec1=91.5, iteration=64000)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"iter", "arch", "state_dict", "best_prec1"}
    assert all(k.startswith("module.") for k in raw["state_dict"])
    assert not any("num_batches_tracked" in k for k in raw["state_dict"])
    if "layers" not in kwargs and "resnet" not in arch:
        assert any(k.startswith("module.group2_ds0.") for k in raw["state_dict"])
        assert any(k.startswith("module.group2_layer0.downsample.") for k in raw["state_dict"])
    loaded = load_checkpoint(path)
    assert not loaded.training
    assert loaded.checkpoint_meta["iter"] == 64000 and loaded.checkpoint_meta["best_prec1"] == 91.5
    _same_function(model, loaded)


def test_skipnet_imagenet_epoch_file_and_inference_without_arch(tmp_path):
    torch.manual_seed(0)
    model = dynexec.build("imagenet_rnn_gate_50", layers=[1, 1, 2, 1]).eval()
    path = tmp_path / "model_best.pth.tar"
    # An arch name whose default depth disagrees with the keys: the keys win.
    save_skipnet_checkpoint(model, path, arch="imagenet_rnn_gate_rl_50", best_prec1=70.0, epoch=3)
    loaded = load_checkpoint(path)
    assert loaded.num_layers == [1, 1, 2, 1] and loaded.control.conv_proj
    assert loaded.variant == "rl"
    _same_function(model, loaded, size=224, n=2)


def test_bare_state_dicts_and_single_downsample_copy(tmp_path):
    torch.manual_seed(1)
    model = dynexec.build("cifar10_rnn_gate_38").eval()
    sd = legacy_state_dict(model)
    torch.save(sd, tmp_path / "bare.pth")
    _same_function(model, load_checkpoint(tmp_path / "bare.pth"))
    only_layer = OrderedDict((k, v) for k, v in sd.items() if "_ds" not in k)
    torch.save(only_layer, tmp_path / "one_copy.pth")
    _same_function(model, load_checkpoint(tmp_path / "one_copy.pth"))
    # A modern state_dict (with num_batches_tracked and metadata) loads as well.
    torch.save(model.state_dict(), tmp_path / "modern.pth")
    _same_function(model, load_checkpoint(tmp_path / "modern.pth"))


def test_blockdrop_finetune_file(tmp_path):
    model = make_model("blockdrop-cifar")
    path = tmp_path / "ckpt_E_10_A_0.900_R_1.00E-01_S_5.00_#_12.t7"
    save_blockdrop_checkpoint(model, path, epoch=10, reward=0.1, acc=0.9)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"agent", "resnet", "epoch", "reward", "acc"}
    assert not any(k.startswith("module.") for k in raw["resnet"])
    loaded = load_checkpoint(path)
    assert loaded.checkpoint_meta["format"] == "blockdrop-finetune"
    _same_function(model, loaded)


def _layer_naming(resnet_sd, prefix="module."):
    """A FlatResNet state_dict in the felixgwu/torchvision layerN naming."""
    out = OrderedDict()
    for k, v in resnet_sd.items():
        if k.startswith("blocks."):
            _, s, rest = k.split(".", 2)
            out[f"{prefix}layer{int(s) + 1}.{rest}"] = v
        elif k.startswith("ds."):
            _, s, rest = k.split(".", 2)
            out[f"{prefix}layer{int(s) + 1}.0.downsample.{rest}"] = v
        else:
            out[prefix + k] = v
    return out


@pytest.mark.parametrize("agent_key", ["agent", "net"])
def test_blockdrop_curriculum_file_with_pretrained_backbone(tmp_path, agent_key):
    model = make_model("blockdrop-cifar")
    agent_sd = legacy_state_dict(model.agent)
    if agent_key == "net":  # legacy agents may carry the features.fc head
        agent_sd["features.fc.weight"] = torch.zeros(10, 64)
        agent_sd["features.fc.bias"] = torch.zeros(10)
    torch.save({agent_key: agent_sd, "epoch": 5, "reward": 0.2, "acc": 0.7}, tmp_path / "cl.t7")
    torch.save({"state_dict": _layer_naming(legacy_state_dict(model.resnet)), "epoch": 164,
                "arch": "resnet32"}, tmp_path / "pk_E_164_A_0.923.t7")
    with pytest.raises(CheckpointError, match="backbone="):
        load_checkpoint(tmp_path / "cl.t7")
    loaded = load_checkpoint(tmp_path / "cl.t7", backbone=tmp_path / "pk_E_164_A_0.923.t7")
    assert loaded.checkpoint_meta["format"] == "blockdrop-curriculum"
    _same_function(model, loaded)
    # The backbone may also come from a finetune file or a bare FlatResNet state_dict.
    torch.save(legacy_state_dict(model.resnet), tmp_path / "flat.pth")
    _same_function(model, load_checkpoint(tmp_path / "cl.t7", backbone=tmp_path / "flat.pth"))


def test_blockdrop_imagenet_pretrained_translation(tmp_path):
    model = make_model("blockdrop-imagenet")
    torch.save({"agent": legacy_state_dict(model.agent)}, tmp_path / "cl.t7")
    # torchvision-style backbone, with a modern bn1.num_batches_tracked (the official
    # translation crashes on it; dynexec accepts it).
    sd = _layer_naming(model.resnet.state_dict(), prefix="")
    torch.save({"state_dict": sd}, tmp_path / "ImageNet_R101_224_76.464")
    loaded = load_checkpoint(tmp_path / "cl.t7", backbone=tmp_path / "ImageNet_R101_224_76.464")
    _same_function(model, loaded, size=224, n=2)


def test_blockdrop_bare_model_state_dict(tmp_path):
    model = make_model("blockdrop-cifar")
    torch.save(model.state_dict(), tmp_path / "model.pth")
    _same_function(model, load_checkpoint(tmp_path / "model.pth"))


def test_official_names_recognised_after_load(tmp_path):
    model = dynexec.build("R110_C10").eval()
    save_blockdrop_checkpoint(model, tmp_path / "f.t7", epoch=1, reward=0.0, acc=0.0)
    loaded = load_checkpoint(tmp_path / "f.t7")
    assert loaded.model_name == "R110_C10" and loaded.num_blocks == 54


# ---- inference of the architecture from keys -----------------------------------------
@pytest.mark.parametrize("arch,kwargs,expect", [
    ("cifar10_rnn_gate_110", {}, dict(gate_type="rnn", num_layers=[18, 18, 18], dataset="cifar")),
    ("cifar100_feedforward_74", {}, dict(gate_type="ffgate1", num_layers=[12, 12, 12])),
    ("cifar10_feedforward_110", {}, dict(gate_type="ffgate2", num_layers=[18, 18, 18])),
    ("imagenet_rnn_gate_18", {}, dict(gate_type="rnn", dataset="imagenet", num_layers=[2, 2, 2, 2])),
    ("cifar10_rnn_gate_38", {"layers": [2, 5, 3]}, dict(num_layers=[2, 5, 3])),
])
def test_architecture_inference(tmp_path, arch, kwargs, expect):
    model = dynexec.build(arch, **kwargs).eval()
    torch.save(legacy_state_dict(model, "module."), tmp_path / "sd.pth")
    loaded = load_checkpoint(tmp_path / "sd.pth")
    for attr, value in expect.items():
        assert getattr(loaded, attr) == value, attr
    assert loaded.num_classes == model.num_classes
    assert type(loaded.block_type) is type(model.block_type)


def test_blockdrop_inference_of_depth_and_classes(tmp_path):
    model = dynexec.build("R110_C100").eval()
    torch.save({"agent": legacy_state_dict(model.agent), "resnet": legacy_state_dict(model.resnet)},
               tmp_path / "f.t7")
    loaded = load_checkpoint(tmp_path / "f.t7")
    assert loaded.model_name == "R110_C100"
    assert loaded.resnet.layer_config == [18, 18, 18] and loaded.num_classes == 100


# ---- errors --------------------------------------------------------------------------
def test_error_cases(tmp_path):
    model = dynexec.build("cifar10_rnn_gate_38").eval()
    good = tmp_path / "good.pth"
    save_skipnet_checkpoint(model, good, arch="cifar10_rnn_gate_38", best_prec1=1.0, iteration=1)

    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointError, match="random.pth"):
        load_checkpoint(tmp_path / "random.pth")
    data = good.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated.pth"):
        load_checkpoint(tmp_path / "truncated.pth")

    sd = legacy_state_dict(model, "module.")
    del sd["module.fc.bias"]
    sd["module.extra.weight"] = torch.zeros(1)
    torch.save({"iter": 1, "arch": "cifar10_rnn_gate_38", "state_dict": sd, "best_prec1": 0.0},
               tmp_path / "keys.pth")
    with pytest.raises(CheckpointError, match=r"missing keys: fc.bias.*unexpected keys: extra.weight"):
        load_checkpoint(tmp_path / "keys.pth")

    sd = legacy_state_dict(model, "module.")
    sd["module.fc.weight"] = torch.zeros(10, 65)
    torch.save({"iter": 1, "arch": "cifar10_rnn_gate_38", "state_dict": sd, "best_prec1": 0.0},
               tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"fc.weight: expected \(10, 64\), file has \(10, 65\)"):
        load_checkpoint(tmp_path / "shape.pth")

    torch.save({"weights": [1, 2, 3]}, tmp_path / "unknown.pth")
    with pytest.raises(CheckpointError, match="not a state_dict|unrecognised"):
        load_checkpoint(tmp_path / "unknown.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(tmp_path / "list.pth")


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED_BY_CHECKPOINT",))


def test_code_in_pickle_never_runs_without_trust(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pth", "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f)
    with pytest.raises(CheckpointError, match="trust=True"):
        load_checkpoint("evil.pth")
    assert not os.path.exists("PWNED_BY_CHECKPOINT")


class Holder:  # an arbitrary class instance forces full unpickling
    pass


def test_trusted_full_pickle(tmp_path):
    model = dynexec.build("cifar10_rnn_gate_38").eval()
    holder = Holder()
    holder.sd = legacy_state_dict(model)
    torch.save({"state_dict": legacy_state_dict(model, "module."), "arch": "cifar10_rnn_gate_38",
                "iter": 3, "best_prec1": 1.0, "args": holder}, tmp_path / "full.pth")
    with pytest.raises(CheckpointError, match="trust=True"):
        load_checkpoint(tmp_path / "full.pth")
    loaded = load_checkpoint(tmp_path / "full.pth", trust=True)
    _same_function(model, loaded)
