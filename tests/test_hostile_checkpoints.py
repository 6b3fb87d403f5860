"""Broken and hostile checkpoint files (README, "Robustness"). Complements
tests/test_checkpoints.py (missing/empty/random/truncated files, wrong keys and shapes,
a raw pickle with code, trust=True): every case here raises one CheckpointError naming
the file and what to do, or loads with the documented result; nothing runs code from a
file and nothing allocates what a crafted header declares."""
from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
import zipfile
from collections import OrderedDict

import pytest
import torch
from torch._utils import _rebuild_tensor_v2

import dynexec
from dynexec.models.checkpoints import CheckpointError, legacy_state_dict, load_checkpoint, read_file

from conftest import make_model

MARKER = "PWNED_BY_CHECKPOINT"


@pytest.fixture(scope="module")
def small():
    return dynexec.build("cifar10_rnn_gate_38", layers=[1, 1, 1]).eval()


def _sd(model):
    return legacy_state_dict(model)


def _raises(path, pattern, **kw):
    """One CheckpointError (a ValueError) naming the file and matching `pattern`."""
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, **kw)
    msg = str(info.value)
    assert str(path) in msg, msg
    assert isinstance(info.value, ValueError)
    assert re.search(pattern, msg), msg
    return msg


# ---------------------------------------------------------------- code execution
class _System:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


class _Exec:
    def __reduce__(self):
        return (exec, (f"open({MARKER!r}, 'w').close()",))


class _Import:
    def __reduce__(self):
        return (__import__, ("antigravity",))


@pytest.mark.parametrize("payload", [_System, _Exec, _Import])
@pytest.mark.parametrize("container", ["torch.save", "legacy", "pickle-proto2", "nested"])
def test_code_in_file_never_runs_without_trust(tmp_path, monkeypatch, small, payload, container):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    obj = {"state_dict": _sd(small), "args": payload()}
    if container == "torch.save":
        torch.save(obj, path)
    elif container == "legacy":
        torch.save(obj, path, _use_new_zipfile_serialization=False)
    elif container == "pickle-proto2":
        with open(path, "wb") as f:
            pickle.dump({"a": payload()}, f, protocol=2)
    else:  # hidden inside a tensor-looking entry of the state_dict
        sd = _sd(small)
        sd["fc.bias"] = payload()
        torch.save({"state_dict": sd}, path)
    msg = _raises(path, r"trust=True")
    assert "execute code" in msg
    assert not os.path.exists(MARKER)
    # the backbone= path is read with the same rules
    agent = make_model("blockdrop-cifar", fraction=None).agent
    torch.save({"agent": legacy_state_dict(agent)}, tmp_path / "cl.t7")
    with pytest.raises(CheckpointError, match="trust=True"):
        load_checkpoint(tmp_path / "cl.t7", backbone=path)
    assert not os.path.exists(MARKER)


def test_read_file_default_is_weights_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"x": _System()}, tmp_path / "e.pth")
    with pytest.raises(CheckpointError, match="trust=True"):
        read_file(tmp_path / "e.pth")
    assert not os.path.exists(MARKER)


# ---------------------------------------------------------------- broken files
def test_directory_path(tmp_path):
    _raises(tmp_path, r"is a directory")


def test_zip_with_corrupted_bytes_in_the_middle(tmp_path, small):
    good = tmp_path / "good.pth"
    torch.save(_sd(small), good)
    data = bytearray(good.read_bytes())
    with zipfile.ZipFile(good) as zf:  # corrupt the middle of the largest tensor record
        info = max(zf.infolist(), key=lambda i: i.file_size)
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    mid = start + info.file_size // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(bytes(data))
    _raises(bad, r"corrupted \(CRC-32 mismatch.*re-download or re-save")


@pytest.mark.parametrize("where", [0.02, 0.5, 0.98])
def test_zip_with_corrupted_structure(tmp_path, small, where):
    good = tmp_path / "good.pth"
    torch.save(_sd(small), good)
    data = bytearray(good.read_bytes())
    i = int(len(data) * where)
    data[i:i + 64] = os.urandom(64)
    bad = tmp_path / "broken.pth"
    bad.write_bytes(bytes(data))
    _raises(bad, r"not a readable PyTorch checkpoint|corrupt")


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9, 0.999])
def test_truncated_at_many_points(tmp_path, small, fraction):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": _sd(small), "iter": 1}, good)
    data = good.read_bytes()
    bad = tmp_path / "cut.pth"
    bad.write_bytes(data[: int(len(data) * fraction)])
    _raises(bad, r"not a readable PyTorch checkpoint|corrupt")


@pytest.mark.parametrize("content", [os.urandom(1), b"\x80\x02", b"PK\x03\x04" + os.urandom(300),
                                     b"\x80\x02}q\x00.", b"hello world\n" * 10,
                                     b"\x00" * 4096])
def test_random_and_tiny_files(tmp_path, content):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(content)
    msg = _raises(bad, r"not a readable PyTorch checkpoint|corrupt|expected|non-empty")
    # random bytes are not "a pickle that needs trust": never suggest trust=True for them
    if content != b"\x80\x02}q\x00.":
        assert "trust=True" not in msg


def test_random_bytes_do_not_suggest_trust(tmp_path):
    for seed in range(20):
        data = torch.randint(0, 256, (2048,), generator=torch.Generator().manual_seed(seed),
                             dtype=torch.uint8).numpy().tobytes()
        path = tmp_path / f"r{seed}.pth"
        path.write_bytes(data)
        msg = _raises(path, r"not a readable|corrupt")
        assert "trust=True" not in msg


# ---------------------------------------------------------------- wrong contents
def test_non_tensor_values_inside_state_dict(tmp_path, small):
    for value in (3, "weights", [1.0, 2.0], None, {"nested": torch.zeros(1)}):
        sd = _sd(small)
        sd["fc.weight"] = value
        torch.save({"state_dict": sd}, tmp_path / "nt.pth")
        _raises(tmp_path / "nt.pth", r"not a state_dict.*fc.weight")


def test_non_string_keys(tmp_path, small):
    sd = _sd(small)
    sd[7] = torch.zeros(1)
    torch.save(sd, tmp_path / "k.pth")
    _raises(tmp_path / "k.pth", r"not a state_dict.*7")


def test_sparse_tensor_rejected(tmp_path, small):
    sd = _sd(small)
    sd["fc.weight"] = sd["fc.weight"].to_sparse()
    torch.save(sd, tmp_path / "sp.pth")
    _raises(tmp_path / "sp.pth", r"fc.weight.*sparse|dense")


def test_nan_weights_load_and_propagate(tmp_path, small):
    """Documented: NaN weights are not rejected (they are valid floats); they load and the
    affected outputs are NaN in both the eager model and the engine."""
    sd = _sd(small)
    sd["fc.weight"] = torch.full_like(sd["fc.weight"], float("nan"))
    torch.save(sd, tmp_path / "nan.pth")
    model = load_checkpoint(tmp_path / "nan.pth")
    assert torch.isnan(model.fc.weight).all()
    x = torch.randn(2, 3, 32, 32)
    assert torch.isnan(model(x)).all()
    assert torch.isnan(dynexec.compile(model)(x)).all()


def test_integer_weights_rejected_float_weights_cast(tmp_path, small):
    """Documented: integer/bool/complex tensors for floating parameters are refused; other
    floating dtypes (float16, bfloat16, float64) are cast to the model's dtype."""
    for dtype in (torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64):
        sd = _sd(small)
        sd["fc.weight"] = torch.zeros(sd["fc.weight"].shape, dtype=dtype)
        torch.save(sd, tmp_path / "int.pth")
        _raises(tmp_path / "int.pth", rf"dtype mismatches: fc.weight: expected a floating-point "
                                      rf"tensor, file has {dtype}")
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        sd = _sd(small)
        sd["fc.weight"] = sd["fc.weight"].to(dtype)
        torch.save(sd, tmp_path / "half.pth")
        model = load_checkpoint(tmp_path / "half.pth")
        assert model.fc.weight.dtype == torch.float32
        assert torch.equal(model.fc.weight, sd["fc.weight"].float())


def test_wrong_and_missing_keys_return_no_model(tmp_path, small):
    sd = _sd(small)
    sd.pop("conv1.weight")
    torch.save(sd, tmp_path / "nokey.pth")
    _raises(tmp_path / "nokey.pth", r"conv1.weight.*missing")
    sd = _sd(small)
    sd["group1_layer0.conv1.weight"] = torch.zeros(16, 16, 3, 5)
    torch.save(sd, tmp_path / "shape.pth")
    _raises(tmp_path / "shape.pth", r"group1_layer0.conv1.weight: expected \(16, 16, 3, 3\), "
                                    r"file has \(16, 16, 3, 5\)")
    # a BlockDrop finetune file whose agent is broken: no half-loaded model comes back
    model = make_model("blockdrop-cifar", fraction=None)
    agent = legacy_state_dict(model.agent)
    agent["logit.weight"] = agent["logit.weight"][:3]
    torch.save({"agent": agent, "resnet": legacy_state_dict(model.resnet)}, tmp_path / "bd.t7")
    _raises(tmp_path / "bd.t7", r"agent|logit")


def test_blockdrop_curriculum_without_backbone(tmp_path):
    model = make_model("blockdrop-cifar", fraction=None)
    torch.save({"agent": legacy_state_dict(model.agent), "epoch": 1}, tmp_path / "cl.t7")
    _raises(tmp_path / "cl.t7", r"backbone='<pretrained backbone or finetune file>'")
    torch.save(legacy_state_dict(model.agent), tmp_path / "agent_only.pth")
    _raises(tmp_path / "agent_only.pth", r"pass backbone=")
    # a backbone path that is itself broken names that file
    (tmp_path / "bad_backbone.t7").write_bytes(b"")
    with pytest.raises(CheckpointError, match="bad_backbone.t7.*empty"):
        load_checkpoint(tmp_path / "cl.t7", backbone=tmp_path / "bad_backbone.t7")


# ---------------------------------------------------------------- crafted sizes
def test_stride0_huge_declared_shape(tmp_path, small):
    """A tensor declaring shape (10**8, 64) over a 1-element storage (stride 0) used to
    make the architecture inference build nn.Linear(64, 10**8) (25 GB)."""
    sd = _sd(small)
    sd["fc.weight"] = torch.zeros(1).expand(10 ** 8, 64)
    sd["fc.bias"] = torch.zeros(1).expand(10 ** 8)
    torch.save(sd, tmp_path / "huge.pth")
    assert os.path.getsize(tmp_path / "huge.pth") < 1 << 20
    _raises(tmp_path / "huge.pth", r"declares shape \(100000000, 64\).*stores only 4 bytes")


def test_huge_block_index_in_keys(tmp_path):
    model = make_model("blockdrop-cifar", fraction=None)
    resnet = legacy_state_dict(model.resnet)
    resnet["blocks.0.999999999.conv1.weight"] = torch.zeros(16, 16, 3, 3)
    torch.save({"agent": legacy_state_dict(model.agent), "resnet": resnet}, tmp_path / "deep.t7")
    _raises(tmp_path / "deep.t7", r"implausible block numbering")
    sd = _sd(dynexec.build("cifar10_rnn_gate_38", layers=[1, 1, 1]))
    sd["group999999999_layer0.conv1.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "groups.pth")
    _raises(tmp_path / "groups.pth", r"implausible block numbering")


def test_legacy_file_with_huge_declared_storage(tmp_path):
    sd = OrderedDict([("fc.weight", torch.randn(10, 64))])
    path = tmp_path / "legacy.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    data = bytearray(path.read_bytes())
    i = data.find(struct.pack("<q", 640))  # the storage's element count header
    assert i > 0
    for huge in (2 ** 62, 2 ** 40, 2 ** 31):
        data[i:i + 8] = struct.pack("<q", huge)
        path.write_bytes(bytes(data))
        _raises(path, r"not a readable PyTorch checkpoint")


def test_zip_pickle_declaring_huge_tensor(tmp_path):
    """data.pkl claims a 2**40-element tensor over a 16-byte record."""
    small_t = torch.randn(4)

    class Storage:
        def __reduce__(self):
            return (_rebuild_tensor_v2, (small_t.untyped_storage(), 0, (2 ** 40,), (1,), False,
                                         collections.OrderedDict()))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, (torch.UntypedStorage, torch.storage.TypedStorage)):
                return ("storage", torch.FloatStorage, "0", "cpu", 2 ** 40)
            return None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"fc.weight": Storage()})
    path = tmp_path / "zip_huge.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/byteorder", "little")
        zf.writestr("archive/data/0", small_t.numpy().tobytes())
        zf.writestr("archive/version", "3\n")
    _raises(path, r"not a readable PyTorch checkpoint")


# ---------------------------------------------------------------- legacy format
def test_legacy_non_zip_file_loads_weights_only(tmp_path, small, monkeypatch):
    path = tmp_path / "legacy.pth.tar"
    torch.save({"iter": 5, "arch": "cifar10_rnn_gate_38", "state_dict": legacy_state_dict(small, "module."),
                "best_prec1": 1.0}, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = load_checkpoint(path)
    assert calls == [True]
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), small(x))
