"""python -m dynexec.eval on tiny checkpoints (written here with a few training steps)."""
from __future__ import annotations

import json

import pytest
import torch

from dynexec import eval as eval_mod
from dynexec.tools import data as data_mod
from dynexec.tools import train as train_mod

DATA = "fashion-mnist" if data_mod.fashion_mnist_available() else "synthetic"


def _train(run_dir, *args):
    return train_mod.run(["--run-dir", str(run_dir), "--data", DATA, "--layers", "1", "2", "1",
                          "--train-size", "64", "--val-size", "200", "--val-eval-size", "32",
                          "--batch-size", "32", "--epochs", "1", "--no-progress", *args])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    sp = _train(root / "sp", "--stage", "sp", "--arch", "cifar10_rnn_gate_38")
    base = _train(root / "bdb", "--stage", "base", "--arch", "R32_C10")
    ft = _train(root / "ft", "--stage", "finetune", "--arch", "R32_C10", "--backbone",
                base["checkpoint"], "--agent-init-bias", "0.0")
    return {"sp": sp["checkpoint"], "bd_base": base["checkpoint"], "ft": ft["checkpoint"], "root": root}


def test_eval_skipnet_cli(ckpts, capsys):
    out = ckpts["root"] / "m.json"
    png = ckpts["root"] / "rates.png"
    rc = eval_mod.main(["--checkpoint", ckpts["sp"], "--data", DATA, "--limit", "40",
                        "--json", str(out), "--plot", str(png)])
    text = capsys.readouterr().out
    assert rc == 0
    assert "SkipNet computation percentage" in text and "routing decisions identical: yes" in text
    m = json.loads(out.read_text())
    assert m["num_images"] == 40 and m["num_blocks"] == 4
    assert m["accuracy_eager"] == m["accuracy_engine"]
    assert m["routing_mismatch_samples"] == 0
    assert len(m["block_execution_rates"]) == 4 and m["block_execution_rates"][0] == 1.0
    assert 25.0 <= m["computation_percentage"] <= 100.0
    assert png.exists() and png.stat().st_size > 1000


def test_eval_blockdrop_cli(ckpts, capsys):
    out = ckpts["root"] / "bd.json"
    rc = eval_mod.main(["--checkpoint", ckpts["ft"], "--data", DATA, "--limit", "30",
                        "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and "Block Usage" in text and "FLOPs/img" in text and "Unique" in text.title()
    m = json.loads(out.read_text())
    assert m["routing_mismatch_samples"] == 0
    assert 0 <= m["block_usage_mean"] <= 4 and m["unique_policies"] >= 1
    assert m["theoretical_speedup"] > 0


def test_eval_backbone_only_keeps_all_blocks(ckpts, capsys):
    out = ckpts["root"] / "base.json"
    assert eval_mod.main(["--checkpoint", ckpts["bd_base"], "--data", DATA, "--limit", "20",
                          "--json", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["block_usage_mean"] == 4 and m["executed_fraction"] == 1.0


def test_eval_subprocess_entry_point(ckpts):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "dynexec.eval", "--checkpoint", ckpts["sp"], "--data",
                        DATA, "--limit", "8"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "accuracy eager" in r.stdout
