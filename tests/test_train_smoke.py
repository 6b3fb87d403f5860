"""Smoke test of every training stage (base, sp, hrl, curriculum, finetune).

Each stage runs a few steps on one small fixed batch of real Fashion-MNIST images (a
generated dataset when the Debian package is not installed; only the data-specific
assertions are skipped then) with 1-block-per-group models, checks that its loss goes
down, and that the checkpoint it wrote loads with ``dynexec.load_checkpoint`` and routes
identically through ``dynexec.compile`` and the eager model.
"""
from __future__ import annotations

import json

import pytest
import torch

import dynexec
from dynexec.models.checkpoints import load_checkpoint
from dynexec.tools import data as data_mod
from dynexec.tools import train as train_mod
from dynexec.tools.eval import load_model

HAVE_FMNIST = data_mod.fashion_mnist_available()
DATA = "fashion-mnist" if HAVE_FMNIST else "synthetic"
STEPS = 16


def _common(run_dir, *extra):
    return ["--run-dir", str(run_dir), "--data", DATA, "--layers", "1", "1", "1",
            "--train-size", "256", "--val-size", "200", "--val-eval-size", "64",
            "--batch-size", "32", "--overfit", "--epochs", "1", "--max-iters", str(STEPS),
            "--no-progress", "--seed", "0", *extra]


def _mean(xs):
    return sum(xs) / len(xs)


def _assert_decreases(history, key="loss", k=4):
    vals = [h[key] for h in history]
    assert len(vals) == STEPS
    first, last = _mean(vals[:k]), _mean(vals[-k:])
    assert last < first, f"{key} did not decrease: first {vals[:k]} last {vals[-k:]}"


def _assert_engine_parity(model, x):
    model.eval()
    with torch.no_grad():
        logits_e, routing_e = model.forward_routing(x)
    logits_c, routing_c = dynexec.compile(model)(x, return_routing=True)
    assert torch.equal(routing_e, routing_c)
    assert torch.allclose(logits_e, logits_c, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("train")
    out = {}
    out["base"] = train_mod.run(_common(root / "base", "--stage", "base", "--arch",
                                        "cifar10_resnet_38", "--lr", "0.05", "--schedule", "constant"))
    out["sp"] = train_mod.run(_common(root / "sp", "--stage", "sp", "--arch", "cifar10_rnn_gate_38",
                                      "--init", out["base"]["checkpoint"], "--lr", "0.05",
                                      "--schedule", "constant"))
    out["hrl"] = train_mod.run(_common(root / "hrl", "--stage", "hrl", "--arch",
                                       "cifar10_rnn_gate_rl_38", "--init", out["sp"]["checkpoint"],
                                       "--lr", "2e-3", "--gate-lr", "1e-2", "--alpha", "0.5"))
    out["bd_base"] = train_mod.run(_common(root / "bd_base", "--stage", "base", "--arch", "R32_C10",
                                           "--lr", "0.05", "--schedule", "constant"))
    backbone = out["bd_base"]["checkpoint"]
    out["curriculum"] = train_mod.run(_common(root / "cl", "--stage", "curriculum", "--arch", "R32_C10",
                                              "--backbone", backbone, "--cl-step-iters", "1",
                                              "--lr", "1e-2", "--agent-init-bias", "0.5",
                                              "--penalty", "0"))
    out["finetune"] = train_mod.run(_common(root / "ft", "--stage", "finetune", "--arch", "R32_C10",
                                            "--backbone", backbone, "--init",
                                            out["curriculum"]["checkpoint"], "--lr", "2e-3"))
    out["root"] = root
    out["x"], _ = data_mod.load_dataset(DATA, "test", limit=48) if HAVE_FMNIST else \
        data_mod.synthetic_dataset("test", 48)
    return out


@pytest.mark.slow
def test_base_loss_decreases_and_checkpoint_loads(runs):
    _assert_decreases(runs["base"]["history"])
    obj = torch.load(runs["base"]["checkpoint"], weights_only=True)
    assert set(obj) == {"iter", "arch", "state_dict", "best_prec1"}
    assert all(k.startswith("module.") for k in obj["state_dict"])
    model = load_checkpoint(runs["base"]["checkpoint"])
    assert model.router == "none"
    _assert_engine_parity(model, runs["x"])


@pytest.mark.slow
def test_sp_loss_decreases_and_routing_parity(runs):
    _assert_decreases(runs["sp"]["history"])
    model = load_checkpoint(runs["sp"]["checkpoint"])
    assert model.router == "online" and model.checkpoint_meta["arch"] == "cifar10_rnn_gate_38"
    _assert_engine_parity(model, runs["x"])


@pytest.mark.slow
def test_hrl_loss_decreases_and_routing_parity(runs):
    _assert_decreases(runs["hrl"]["history"], key="ce")
    model = load_checkpoint(runs["hrl"]["checkpoint"])
    assert model.checkpoint_meta["arch"] == "cifar10_rnn_gate_rl_38"
    _assert_engine_parity(model, runs["x"])


@pytest.mark.slow
def test_blockdrop_base_backbone_file(runs):
    _assert_decreases(runs["bd_base"]["history"])
    obj = torch.load(runs["bd_base"]["checkpoint"], weights_only=True)
    assert all(k.startswith("module.") for k in obj["state_dict"])  # pretrained-file layout
    model, fmt = load_model(runs["bd_base"]["checkpoint"])
    assert "backbone" in fmt
    _assert_engine_parity(model, runs["x"])


@pytest.mark.slow
def test_curriculum_improves_reward_and_loads(runs):
    # The policy-gradient surrogate is not a loss that must fall; what must improve is
    # the reward of the agent's (greedy) policy on the batch. With penalty 0 the reward
    # 1 - (|u|/K)^2 of correct samples rewards dropping blocks.
    hist = runs["curriculum"]["history"]
    rewards = [h["reward_greedy"] for h in hist]
    assert _mean(rewards[-4:]) > _mean(rewards[:4]), rewards
    assert hist[-1]["exec_frac"] < hist[0]["exec_frac"]
    assert hist[-1]["cl_step"] == 3  # every block unlocked
    path = runs["curriculum"]["checkpoint"]
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"agent", "epoch", "reward", "acc"}
    with pytest.raises(ValueError, match="backbone"):
        load_checkpoint(path)
    model = load_checkpoint(path, backbone=runs["bd_base"]["checkpoint"])
    _assert_engine_parity(model, runs["x"])


@pytest.mark.slow
def test_finetune_loss_decreases_and_loads(runs):
    _assert_decreases(runs["finetune"]["history"], key="ce")
    obj = torch.load(runs["finetune"]["checkpoint"], weights_only=True)
    assert set(obj) == {"agent", "resnet", "epoch", "reward", "acc"}
    model = load_checkpoint(runs["finetune"]["checkpoint"])
    assert model.router == "planned"
    _assert_engine_parity(model, runs["x"])


@pytest.mark.slow
def test_logs_and_resume_file(runs):
    run_dir = runs["root"] / "hrl"
    rows = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    assert rows and {"train_loss", "train_acc", "val_acc", "train_skip_rate"} <= set(rows[0])
    assert (run_dir / "log.csv").exists() and (run_dir / "resume.pt").exists()


@pytest.mark.slow
def test_resume_continues_where_it_stopped(tmp_path):
    """Interrupting after 3 of 6 iterations and resuming gives the same weights as an
    uninterrupted run."""
    args = ["--stage", "base", "--arch", "R32_C10", "--data", DATA, "--layers", "1", "1", "1",
            "--train-size", "96", "--val-size", "200", "--val-eval-size", "16",
            "--batch-size", "16", "--epochs", "1", "--no-progress", "--save-every", "3",
            "--schedule", "constant"]
    full = train_mod.run(args + ["--run-dir", str(tmp_path / "full")])
    part_dir = tmp_path / "part"
    train_mod.run(args + ["--run-dir", str(part_dir), "--max-iters", "3"])
    resumed = train_mod.run(args + ["--run-dir", str(part_dir), "--resume"])
    assert [h["iteration"] for h in resumed["history"]] == [4, 5, 6]
    sd_full = full["stage"].model.state_dict()
    sd_res = resumed["stage"].model.state_dict()
    for k in sd_full:
        assert torch.allclose(sd_full[k].float(), sd_res[k].float(), atol=1e-6), k


@pytest.mark.skipif(not HAVE_FMNIST, reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed")
def test_real_data_used():
    x, y = data_mod.load_fashion_mnist("train", limit=64)
    assert x.shape == (64, 3, 32, 32) and int(y.max()) < 10


def test_soften_gates_keeps_decisions(tmp_path):
    """--soften-gates divides the gate logits: same hard decisions, probabilities nearer 0.5."""
    def stage(t):
        torch.manual_seed(0)
        args = train_mod.parse_args(["--stage", "hrl", "--arch", "cifar10_rnn_gate_rl_38", "--layers",
                                     "2", "2", "2", "--run-dir", str(tmp_path), "--soften-gates", str(t)])
        return train_mod.SkipNetStage(args, 10)
    plain, soft = stage(1.0), stage(4.0)
    with torch.no_grad():
        plain.model.control.proj.bias.fill_(0.3)   # some blocks on, some off
        soft.model.control.proj.bias.fill_(0.3 / 4)
    x = torch.randn(16, 3, 32, 32)
    plain.model.eval(), soft.model.eval()
    with torch.no_grad():
        assert torch.equal(plain.model.forward_routing(x)[1], soft.model.forward_routing(x)[1])
        _, _, p_plain = train_mod.skipnet_sp_forward(plain.model, x)
        _, _, p_soft = train_mod.skipnet_sp_forward(soft.model, x)
    assert (p_soft - 0.5).abs().max() < (p_plain - 0.5).abs().max()


def test_finetune_agent_lr_param_groups(tmp_path):
    args = train_mod.parse_args(["--stage", "finetune", "--arch", "R32_C10", "--layers", "1", "1", "1",
                                 "--run-dir", str(tmp_path), "--lr", "1e-3", "--agent-lr", "1e-5"])
    st = train_mod.BlockDropStage(args, 10)
    lrs = sorted(g["lr"] for g in st.optimizer.param_groups)
    assert lrs == [1e-5, 1e-3]
