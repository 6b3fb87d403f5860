"""Training SkipNet and BlockDrop models (and their base ResNets) on small CPU budgets.

    python -m dynexec.train --stage base --arch cifar10_resnet_38 --run-dir RUN ...
    python -m dynexec.train --stage sp   --arch cifar10_rnn_gate_38 --init BASE.pth.tar ...
    python -m dynexec.train --stage hrl  --arch cifar10_rnn_gate_rl_38 --init SP.pth.tar ...
    python -m dynexec.train --stage base --arch R32_C10 ...            (FlatResNet32, all blocks)
    python -m dynexec.train --stage curriculum --arch R32_C10 --backbone BASE.t7 ...
    python -m dynexec.train --stage finetune --arch R32_C10 --init CL.t7 --backbone BASE.t7 ...

Stages (ucbdrive/skipnet ``train_sp.py`` / ``train_rl.py``; Tushar-N/blockdrop
``cl_training.py`` / ``finetune.py``):
- ``base``: a plain ResNet (SkipNet ``cifar*_resnet_*`` or a BlockDrop backbone run with
  every block), cross-entropy, SGD + one-cycle LR.
- ``sp``: SkipNet supervised pre-training: hard gates (p > 0.5) with a straight-through
  gradient ``hard - p.detach() + p``; mixing ``mask * block(h) + (1 - mask) * shortcut(h)``;
  CE only. Blocks can be initialised from the base ResNet (``layer{g}.{i}.*`` ->
  ``group{g}_layer{i}.*``).
- ``hrl``: SkipNet hybrid RL: actions a ~ Bernoulli(p) per gate; per-gate reward
  ``(1 - a) * alpha / num_gates``, terminal reward ``-CE`` per sample, return with discount
  gamma (1), REINFORCE ``-log pi(a) * R * rl_weight`` (optionally minus a batch-mean
  baseline per gate) plus the CE of the sampled execution.
- ``curriculum``: BlockDrop agent on a frozen backbone: u ~ Bernoulli(alpha p + (1-alpha)
  (1-p)), reward ``1 - (|u|/K)^2`` if correct else ``penalty``, greedy-policy baseline,
  entropy bonus beta, only the last ``cl_step`` blocks learnable (the others forced to 1),
  unlocking one more block every ``--cl-step-iters`` iterations; Adam.
- ``finetune``: agent + backbone jointly: CE of the backbone under the sampled policy plus
  the policy gradient (summed over the batch, as finetune.py); Adam.

Outputs in ``--run-dir``: official-format checkpoints (``checkpoint_latest.pth.tar`` /
``model_best.pth.tar`` for SkipNet-family stages; ``ckpt_E_..._#_....t7``, ``latest.t7``,
``best.t7`` for BlockDrop stages; the BlockDrop base backbone as ``base_latest.t7`` /
``base_best.t7`` in the pretrained ``{'state_dict': module.layerN...}`` layout), a resume
file ``resume.pt`` (weights, optimiser, scheduler, RNG, position; written every epoch and
every ``--save-every`` iterations; ``--resume`` continues from it), ``log.jsonl`` and
``log.csv`` with one row per epoch, and ``args.json``. "best" = best accuracy on the
validation split held out from the training set (never the test set).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F

from ..models import build
from ..models import checkpoints as ckpt_mod
from ..models.blockdrop import BlockDrop, FlatResNet
from ..models.skipnet import PlainResNet, SkipNet
from . import data as data_mod

STAGES = ("base", "sp", "hrl", "curriculum", "finetune")


# --------------------------------------------------------------------------------------
# Differentiable / sampled forward passes (training only; eval uses model.forward_routing)
# --------------------------------------------------------------------------------------
def _skipnet_start(model: SkipNet, x: torch.Tensor):
    """The part every SkipNet forward shares: stem, fresh gate state, block 0 (always
    executed). Returns (block views, gate modules, h after block 0, gate state)."""
    h = model.stem(x)
    state = model.gate_init_state(x.shape[0], h)
    return model.block_views(), model.gates(), model.group1_layer0(h), state


def skipnet_sp_forward(model: SkipNet, x: torch.Tensor):
    """Straight-through hard gates. Returns (logits, routing bool [N, K], probs [N, K-1])."""
    views, gates, h, state = _skipnet_start(model, x)
    n = x.shape[0]
    masks, probs = [torch.ones(n, dtype=torch.bool, device=x.device)], []
    for k in range(1, len(views)):
        p, state = model.gate_step(gates[k - 1], h, state)
        hard = (p > 0.5).to(p.dtype)
        mask = (hard - p.detach() + p).view(n, 1, 1, 1)
        view = views[k]
        prev = h if view.shortcut is None else view.shortcut(h)
        out = view.branch.block(h)
        h = mask * out + (1 - mask) * prev
        masks.append(hard.bool())
        probs.append(p)
    return model.head(h), torch.stack(masks, 1), torch.stack(probs, 1)


def skipnet_rl_forward(model: SkipNet, x: torch.Tensor, sample: bool = True):
    """Sampled gate actions (a ~ Bernoulli(p)); blocks run only on the samples that
    execute them. Returns (logits, actions float [N, K-1], log pi(a) [N, K-1])."""
    views, gates, h, state = _skipnet_start(model, x)
    n = x.shape[0]
    actions, logps = [], []
    for k in range(1, len(views)):
        p, state = model.gate_step(gates[k - 1], h, state)
        pc = p.clamp(1e-6, 1 - 1e-6)
        a = torch.bernoulli(pc.detach()) if sample else (p > 0.5).to(p.dtype)
        logps.append(a * torch.log(pc) + (1 - a) * torch.log1p(-pc))
        actions.append(a)
        view = views[k]
        prev = h if view.shortcut is None else view.shortcut(h)
        idx = a.detach().nonzero().view(-1)
        if idx.numel() == n:
            h = view.branch.block(h)
        elif idx.numel() == 0:
            h = prev
        else:
            out = view.branch.block(h.index_select(0, idx))
            h = prev.index_copy(0, idx, out)
    return model.head(h), torch.stack(actions, 1), torch.stack(logps, 1)


def blockdrop_policy_forward(resnet: FlatResNet, x: torch.Tensor, policy: torch.Tensor):
    """Differentiable (w.r.t. the backbone) version of the official batched forward with
    a 0/1 float policy [N, K]."""
    h = resnet.seed(x)
    n = x.shape[0]
    for t, (s, b, block) in enumerate(resnet._flat()):
        residual = resnet.ds[s](h) if b == 0 else h
        keep = policy[:, t]
        if not bool((keep > 0).any()):
            h = residual
            continue
        fx = F.relu(residual + block(h))
        m = keep.view(n, 1, 1, 1)
        h = fx * m + residual * (1 - m)
    return resnet.head(h)


def blockdrop_reward(pred_correct: torch.Tensor, policy: torch.Tensor, penalty: float) -> torch.Tensor:
    k = policy.shape[1]
    sparse = 1.0 - (policy.sum(1) / k) ** 2
    return torch.where(pred_correct, sparse, torch.full_like(sparse, penalty))


# --------------------------------------------------------------------------------------
# Key mapping and checkpoint helpers
# --------------------------------------------------------------------------------------
def base_to_skipnet_state(base_sd: dict) -> "OrderedDict[str, torch.Tensor]":
    """PlainResNet ``layer{g}.{i}.*`` keys -> SkipNet ``group{g}_layer{i}.*`` (plus the
    twin ``group{g}_ds{i}.*`` of each downsample); stem and fc keep their names."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in base_sd.items():
        parts = k.split(".")
        if parts[0].startswith("layer") and len(parts) > 2 and parts[1].isdigit():
            g, i, rest = parts[0][5:], parts[1], ".".join(parts[2:])
            out[f"group{g}_layer{i}.{rest}"] = v
            if rest.startswith("downsample."):
                out[f"group{g}_ds{i}.{rest[len('downsample.'):]}"] = v
        else:
            out[k] = v
    return out


def flat_to_layer_state(resnet: FlatResNet) -> "OrderedDict[str, torch.Tensor]":
    """FlatResNet32 keys -> the pretrained-backbone layout the official
    ``load_weights_to_flatresnet`` reads: ``module.layer{s+1}.{b}.*``, stem and fc as is."""
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in ckpt_mod.legacy_state_dict(resnet).items():
        if k.startswith("blocks."):
            _, s, rest = k.split(".", 2)
            out[f"module.layer{int(s) + 1}.{rest}"] = v
        elif k.startswith("ds."):
            _, s, rest = k.split(".", 2)  # conv shortcuts (ImageNet) -> layerN.0.downsample
            out[f"module.layer{int(s) + 1}.0.downsample.{rest}"] = v
        else:
            out[f"module.{k}"] = v
    return out


def save_blockdrop_backbone(resnet: FlatResNet, path: str, epoch: int, acc: float) -> None:
    ckpt_mod._atomic_save({"state_dict": flat_to_layer_state(resnet), "epoch": int(epoch),
                           "acc": float(acc)}, path)


def load_backbone_file(path: str) -> FlatResNet:
    net, _ = ckpt_mod._load_backbone(path, "cpu", False)
    return net


# --------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------
def _one_cycle(total: int, warmup_frac: float = 0.15):
    warm = max(1, int(total * warmup_frac))

    def f(it: int) -> float:
        if it < warm:
            return 0.1 + 0.9 * it / warm
        t = min(1.0, (it - warm) / max(1, total - warm))
        return 0.5 * (1 + math.cos(math.pi * t)) * 0.99 + 0.01
    return f


def _cosine(total: int):
    def f(it: int) -> float:
        t = min(1.0, it / max(1, total))
        return 0.5 * (1 + math.cos(math.pi * t)) * 0.95 + 0.05
    return f


def _constant(total: int):
    return lambda it: 1.0


SCHEDULES = {"onecycle": _one_cycle, "cosine": _cosine, "constant": _constant}


def build_from_args(args: argparse.Namespace):
    """The model named by --arch, with --layers / --num-classes when given."""
    kw = {"layers": args.layers} if args.layers else {}
    if args.num_classes:
        kw["num_classes"] = args.num_classes
    return build(args.arch, **kw)


class Stage:
    """One training stage: model(s), optimiser, a train step and an evaluation."""

    family = "skipnet"

    def __init__(self, args: argparse.Namespace, total_iters: int):
        self.args = args
        self.total_iters = total_iters

    # subclasses: self.model, self.optimizer; train_step(x, y) -> dict; evaluate(x, y) -> dict
    def make_scheduler(self):
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, SCHEDULES[self.args.schedule](self.total_iters))

    def state(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state(self, st: dict) -> None:
        self.model.load_state_dict(st["model"])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> dict:
        """Official inference semantics (eager forward_routing, eval mode)."""
        self.model.eval()
        correct, routing = 0, []
        for i in range(0, x.shape[0], batch):
            logits, r = self.model.forward_routing(x[i:i + batch])
            correct += int((logits.argmax(1) == y[i:i + batch]).sum())
            routing.append(r)
        r = torch.cat(routing).float()
        out = {"acc": 100.0 * correct / max(1, x.shape[0]),
               "exec_frac": float(r.mean()) if r.numel() else float("nan")}
        if self.family == "skipnet" and r.numel():
            k = r.shape[1]
            out["computation_pct"] = 100.0 * (1.0 + float(r[:, 1:].mean(0).sum())) / k
        if self.family == "blockdrop" and r.numel():
            out["block_usage"] = float(r.sum(1).mean())
        return out

    def save_official(self, run_dir: str, tag: str, epoch: int, it: int, metrics: dict) -> str:
        raise NotImplementedError


class BaseStage(Stage):
    def __init__(self, args, total_iters):
        super().__init__(args, total_iters)
        m = build_from_args(args)
        if isinstance(m, BlockDrop):
            self.family = "blockdrop-base"
            self.model = m.resnet
        elif isinstance(m, PlainResNet):
            self.family = "skipnet-base"
            self.model = m
        else:
            raise SystemExit(f"--stage base needs a plain ResNet (cifar10_resnet_38, ...) or a "
                             f"BlockDrop id (R32_C10, ...), got {args.arch}")
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=0.9,
                                         weight_decay=args.wd, nesterov=True)
        self.make_scheduler()

    def _forward(self, x):
        return self.model.forward_full(x) if self.family == "blockdrop-base" else self.model(x)

    def train_step(self, x, y):
        self.model.train()
        logits = self._forward(x)
        loss = F.cross_entropy(logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": float(loss.detach()), "ce": float(loss.detach()),
                "correct": int((logits.argmax(1) == y).sum()), "exec_frac": 1.0}

    @torch.no_grad()
    def evaluate(self, x, y, batch: int = 250):
        self.model.eval()
        correct = 0
        for i in range(0, x.shape[0], batch):
            correct += int((self._forward(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
        return {"acc": 100.0 * correct / max(1, x.shape[0]), "exec_frac": 1.0}

    def save_official(self, run_dir, tag, epoch, it, metrics):
        if self.family == "blockdrop-base":
            path = os.path.join(run_dir, f"base_{tag}.t7")
            save_blockdrop_backbone(self.model, path, epoch, metrics.get("acc", 0.0) / 100.0)
        else:
            name = "model_best.pth.tar" if tag == "best" else "checkpoint_latest.pth.tar"
            path = os.path.join(run_dir, name)
            ckpt_mod.save_skipnet_checkpoint(self.model, path, arch=self.model.model_name,
                                             best_prec1=metrics.get("best_acc", 0.0), iteration=it)
        return path


class SkipNetStage(Stage):
    family = "skipnet"

    def __init__(self, args, total_iters):
        super().__init__(args, total_iters)
        self.model = build_from_args(args)
        if not isinstance(self.model, SkipNet):
            raise SystemExit(f"--stage {args.stage} needs a gated SkipNet arch "
                             f"(cifar10_rnn_gate_38, cifar10_rnn_gate_rl_38, ...), got {args.arch}")
        if args.init:
            self._init_from(args.init)
        if args.soften_gates != 1.0:
            self._soften(args.soften_gates)
        gate_params = [p for n, p in self.model.named_parameters() if _is_gate_param(n)]
        net_params = [p for n, p in self.model.named_parameters() if not _is_gate_param(n)]
        gate_lr = args.gate_lr if args.gate_lr is not None else args.lr
        groups = [{"params": net_params, "lr": args.lr}, {"params": gate_params, "lr": gate_lr}]
        if args.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.wd)
        else:
            self.optimizer = torch.optim.Adam(groups, lr=args.lr, weight_decay=args.wd)
        self.make_scheduler()

    def _init_from(self, path):
        obj = ckpt_mod.read_file(path)
        sd = ckpt_mod.strip_prefix(obj["state_dict"] if "state_dict" in obj else obj)
        if any(k.startswith("layer") for k in sd):  # a plain base ResNet
            sd = base_to_skipnet_state(sd)
            missing, unexpected = self.model.load_state_dict(sd, strict=False)
            bad = [k for k in missing if not (_is_gate_param(k) or k.endswith("num_batches_tracked"))]
            if bad or unexpected:
                raise SystemExit(f"{path}: base ResNet does not match {self.args.arch}: "
                                 f"missing {bad[:5]}, unexpected {list(unexpected)[:5]}")
            print(f"[init] blocks, stem and fc from base ResNet {path}; gates random")
        else:
            ckpt_mod._fill_downsample_twins(sd, self.model)
            ckpt_mod.strict_load(self.model, sd, path, "state_dict")
            print(f"[init] all weights from {path}")

    @torch.no_grad()
    def _soften(self, t: float) -> None:
        """Divide the gates' final logits by t (like the official ``hotter``): the hard
        decisions (sign of the logit) are unchanged, the sampling explores more."""
        if self.model.gate_type == "rnn":
            self.model.control.proj.weight.div_(t)
            self.model.control.proj.bias.div_(t)
        else:
            for g in self.model.gates():
                g.linear_layer.weight.div_(t)
                g.linear_layer.bias.div_(t)
        print(f"[init] gate logits divided by {t}")

    def train_step(self, x, y):
        self.model.train()
        a = self.args
        if a.stage == "sp":
            logits, routing, _ = skipnet_sp_forward(self.model, x)
            ce = F.cross_entropy(logits, y)
            loss = ce
            exec_frac = float(routing.float().mean())
        else:
            logits, actions, logp = skipnet_rl_forward(self.model, x, sample=True)
            ce_each = F.cross_entropy(logits, y, reduction="none")
            ce = ce_each.mean()
            g = actions.shape[1]
            with torch.no_grad():
                r = (1 - actions) * a.alpha / g                  # per-gate reward
                r[:, -1] += -ce_each.detach()                    # terminal reward
                ret = torch.zeros_like(r)                        # discounted return
                run = torch.zeros_like(r[:, 0])
                for t in range(g - 1, -1, -1):
                    run = r[:, t] + a.gamma * run
                    ret[:, t] = run
                if a.baseline == "batch-mean":
                    ret = ret - ret.mean(0, keepdim=True)
            rl = -(logp * ret).sum(1).mean() * a.rl_weight
            loss = ce + rl
            exec_frac = float(torch.cat([torch.ones_like(actions[:, :1]), actions], 1).mean())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return {"loss": float(loss.detach()), "ce": float(ce.detach()),
                "correct": int((logits.argmax(1) == y).sum()), "exec_frac": exec_frac}

    def save_official(self, run_dir, tag, epoch, it, metrics):
        name = "model_best.pth.tar" if tag == "best" else "checkpoint_latest.pth.tar"
        path = os.path.join(run_dir, name)
        ckpt_mod.save_skipnet_checkpoint(self.model, path, arch=self.args.arch,
                                         best_prec1=metrics.get("best_acc", 0.0), iteration=it)
        return path


def _is_gate_param(name: str) -> bool:
    return "_gate" in name or name.startswith("control.")


class BlockDropStage(Stage):
    family = "blockdrop"

    def __init__(self, args, total_iters):
        super().__init__(args, total_iters)
        model = build_from_args(args)
        if not isinstance(model, BlockDrop):
            raise SystemExit(f"--stage {args.stage} needs a BlockDrop id (R32_C10, ...), got {args.arch}")
        if args.backbone:
            net = load_backbone_file(args.backbone)
            ckpt_mod.strict_load(model.resnet, net.state_dict(), args.backbone, "backbone")
        elif args.stage == "curriculum" and not args.init:
            print("[warn] curriculum without --backbone: the backbone is untrained", file=sys.stderr)
        if args.init:
            obj = ckpt_mod.read_file(args.init)
            agent_sd = OrderedDict((k, v) for k, v in ckpt_mod.strip_prefix(
                obj.get("agent", obj.get("net"))).items() if not k.startswith("features.fc."))
            ckpt_mod.strict_load(model.agent, agent_sd, args.init, "agent")
            if "resnet" in obj and not args.backbone:
                ckpt_mod.strict_load(model.resnet, ckpt_mod.strip_prefix(obj["resnet"]),
                                     args.init, "backbone")
            print(f"[init] agent from {args.init}")
        else:
            # test.py's start: logits 0 weight, bias so that every block is kept at first
            with torch.no_grad():
                model.agent.logit.weight.zero_()
                model.agent.logit.bias.fill_(args.agent_init_bias)
        self.model = model
        self.K = model.num_blocks
        if args.stage == "curriculum":
            for p in model.resnet.parameters():
                p.requires_grad_(False)
            params = list(model.agent.parameters())
        else:
            agent_lr = args.agent_lr if args.agent_lr is not None else args.lr
            params = [{"params": list(model.resnet.parameters()), "lr": args.lr},
                      {"params": list(model.agent.parameters()), "lr": agent_lr}]
        self.optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.wd)
        self.make_scheduler()
        self.iteration = 0

    def cl_step(self) -> int:
        if self.args.stage != "curriculum":
            return self.K
        return min(self.K, 1 + self.iteration // max(1, self.args.cl_step_iters))

    def train_step(self, x, y):
        a = self.args
        agent, resnet = self.model.agent, self.model.resnet
        agent.train()
        if a.stage == "curriculum":
            resnet.eval()
        else:
            resnet.train()
        probs, _ = agent(x)
        probs_b = probs * a.bd_alpha + (1 - probs) * (1 - a.bd_alpha)
        with torch.no_grad():
            greedy = (probs >= 0.5).float()
            sampled = torch.bernoulli(probs_b)
        cl = self.cl_step()
        if cl < self.K:
            greedy[:, :-cl] = 1
            sampled[:, :-cl] = 1
            mask = torch.zeros_like(probs)
            mask[:, -cl:] = 1
        else:
            mask = torch.ones_like(probs)
        if a.stage == "curriculum":
            with torch.no_grad():
                logits_g = resnet.forward_masked(x, greedy.bool())
                logits_s = resnet.forward_masked(x, sampled.bool())
            ce = F.cross_entropy(logits_s, y)
        else:
            with torch.no_grad():
                logits_g = blockdrop_policy_forward(resnet, x, greedy)
            logits_s = blockdrop_policy_forward(resnet, x, sampled)
            ce = F.cross_entropy(logits_s, y)
        with torch.no_grad():
            r_s = blockdrop_reward(logits_s.argmax(1) == y, sampled, a.penalty)
            r_g = blockdrop_reward(logits_g.argmax(1) == y, greedy, a.penalty)
            adv = (r_s - r_g).unsqueeze(1)
        pb = probs_b.clamp(1e-15, 1 - 1e-15)
        logp = sampled * torch.log(pb) + (1 - sampled) * torch.log1p(-pb)
        pg = (-logp * adv * mask).sum()
        n = x.shape[0]
        if a.stage == "curriculum":
            pc = probs.clamp(1e-15, 1 - 1e-15)
            entropy = (-pc * torch.log(pc)).sum() * a.beta
            loss = (pg - entropy) / n
            monitor = loss
        else:
            loss = pg * a.pg_scale + ce
            monitor = loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        return {"loss": float(monitor.detach()), "ce": float(ce.detach()), "reward": float(r_s.mean()),
                "reward_greedy": float(r_g.mean()),
                "correct": int((logits_g.argmax(1) == y).sum()),
                "exec_frac": float(greedy.mean()), "cl_step": cl}

    def state(self):
        st = super().state()
        st["iteration"] = self.iteration
        return st

    def load_state(self, st):
        super().load_state(st)
        self.iteration = st["iteration"]

    @torch.no_grad()
    def evaluate(self, x, y, batch: int = 250):
        out = super().evaluate(x, y, batch)
        # reward of the greedy policy (what cl_training/finetune put in file names)
        self.model.eval()
        rewards, pols = [], []
        for i in range(0, x.shape[0], batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            logits, r = self.model.forward_routing(xb)
            rewards.append(blockdrop_reward(logits.argmax(1) == yb, r.float(), self.args.penalty))
            pols.append(r)
        out["reward"] = float(torch.cat(rewards).mean()) if rewards else float("nan")
        out["unique_policies"] = len({row.numpy().tobytes() for row in torch.cat(pols)}) if pols else 0
        return out

    def save_official(self, run_dir, tag, epoch, it, metrics):
        with_backbone = self.args.stage == "finetune"
        acc = metrics.get("acc", 0.0) / 100.0
        reward = metrics.get("reward", 0.0)
        path = os.path.join(run_dir, f"{tag}.t7")
        ckpt_mod.save_blockdrop_checkpoint(self.model, path, epoch=epoch, reward=reward, acc=acc,
                                           with_backbone=with_backbone)
        if tag == "latest":  # also the official file-name pattern, once per epoch
            name = (f"ckpt_E_{epoch}_A_{acc:.3f}_R_{reward:.2E}_S_"
                    f"{metrics.get('block_usage', float('nan')):.2f}_#_"
                    f"{metrics.get('unique_policies', 0)}.t7")
            ckpt_mod.save_blockdrop_checkpoint(self.model, os.path.join(run_dir, name), epoch=epoch,
                                               reward=reward, acc=acc, with_backbone=with_backbone)
        return path


def make_stage(args, total_iters) -> Stage:
    if args.stage == "base":
        return BaseStage(args, total_iters)
    if args.stage in ("sp", "hrl"):
        return SkipNetStage(args, total_iters)
    return BlockDropStage(args, total_iters)


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------
STAGE_DEFAULTS = {
    #            lr     optimizer schedule    epochs batch
    "base":       (0.1,  "sgd",  "onecycle", 3, 64),
    "sp":         (0.02, "sgd",  "cosine",   1, 64),
    "hrl":        (1e-4, "adam", "constant", 1, 64),
    "curriculum": (1e-3, "adam", "constant", 1, 64),
    "finetune":   (1e-4, "adam", "constant", 1, 64),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dynexec.train", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", choices=STAGES, required=True)
    p.add_argument("--arch", required=True, help="official model name (cifar10_resnet_38, "
                   "cifar10_rnn_gate_38, cifar10_rnn_gate_rl_38, R32_C10, ...)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="blocks per group (override)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--run-dir", required=True, help="outputs, logs and the resume file")
    p.add_argument("--init", default=None, help="previous stage's checkpoint")
    p.add_argument("--backbone", default=None, help="BlockDrop: pretrained backbone file")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/resume.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads; 1 is far faster than 2 on a busy 2-core machine "
                   "(OpenMP spin contention: 0.42 s vs 10 s per ResNet-38 batch measured)")
    # data
    p.add_argument("--data", choices=data_mod.DATASETS, default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cifar-normalization", default="skipnet", choices=("skipnet", "blockdrop-r32", "none"))
    p.add_argument("--val-size", type=int, default=5000, help="held out of the training set")
    p.add_argument("--val-eval-size", type=int, default=2000,
                   help="validation images evaluated each epoch (of --val-size)")
    p.add_argument("--train-size", type=int, default=None, help="use only this many training images")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--overfit", action="store_true", help="train on the first batch only (smoke tests)")
    # optimisation
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-iters", type=int, default=None, help="stop after this many iterations")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--gate-lr", type=float, default=None, help="SkipNet gates' lr (default --lr)")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default=None)
    p.add_argument("--schedule", choices=tuple(SCHEDULES), default=None)
    p.add_argument("--wd", type=float, default=None)
    p.add_argument("--save-every", type=int, default=50, help="resume file every N iterations")
    p.add_argument("--max-exec", type=float, default=None,
                   help="model selection: only epochs whose validation executed fraction "
                        "(SkipNet computation %%/100, BlockDrop block usage/K) is <= this can "
                        "become the 'best' checkpoint")
    # SkipNet HRL
    p.add_argument("--alpha", type=float, default=0.1, help="HRL skip reward (total per sample)")
    p.add_argument("--gamma", type=float, default=1.0)
    p.add_argument("--rl-weight", type=float, default=0.01)
    p.add_argument("--soften-gates", type=float, default=1.0,
                   help="HRL init: divide the gate logits by this (decisions unchanged, more "
                        "exploration when the SP gates are saturated)")
    p.add_argument("--baseline", choices=("none", "batch-mean"), default="batch-mean")
    # BlockDrop
    p.add_argument("--bd-alpha", type=float, default=0.8, help="bounded sampling alpha")
    p.add_argument("--penalty", type=float, default=None, help="reward if wrong (CL -1, FT -5)")
    p.add_argument("--beta", type=float, default=0.1, help="entropy bonus (curriculum)")
    p.add_argument("--cl-step-iters", type=int, default=20,
                   help="curriculum: unlock one more block every N iterations")
    p.add_argument("--agent-lr", type=float, default=None,
                   help="finetune: the agent's lr (default --lr, as finetune.py)")
    p.add_argument("--pg-scale", type=float, default=1.0,
                   help="finetune: scale of the summed policy-gradient term")
    p.add_argument("--agent-init-bias", type=float, default=2.0,
                   help="fresh agent: logit weight 0, bias this (keep every block)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    lr, opt, sched, epochs, bs = STAGE_DEFAULTS[a.stage]
    a.lr = lr if a.lr is None else a.lr
    a.optimizer = opt if a.optimizer is None else a.optimizer
    a.schedule = sched if a.schedule is None else a.schedule
    a.epochs = epochs if a.epochs is None else a.epochs
    a.batch_size = bs if a.batch_size is None else a.batch_size
    a.wd = (5e-4 if a.stage == "base" else 1e-4 if a.stage == "sp" else 0.0) if a.wd is None else a.wd
    a.penalty = (-1.0 if a.stage == "curriculum" else -5.0) if a.penalty is None else a.penalty
    return a


def load_data(a):
    x, y = data_mod.load_dataset(a.data, "train", a.data_dir, normalization=a.cifar_normalization)
    tr_idx, va_idx = data_mod.train_val_split(x.shape[0], a.val_size, seed=1234)
    if a.train_size is not None:
        g = torch.Generator().manual_seed(a.seed + 77)
        tr_idx = tr_idx[torch.randperm(tr_idx.numel(), generator=g)[:a.train_size]].sort().values
    va_idx = va_idx[:a.val_eval_size]
    return x[tr_idx], y[tr_idx], x[va_idx], y[va_idx]


def _pad_value(a):
    if a.data == "fashion-mnist":
        return float(-data_mod.FASHION_MNIST_MEAN / data_mod.FASHION_MNIST_STD)
    if a.cifar_normalization == "skipnet":
        return data_mod.black_value(data_mod.SKIPNET_CIFAR_MEAN, data_mod.SKIPNET_CIFAR_STD)
    if a.cifar_normalization == "blockdrop-r32":
        return data_mod.black_value(data_mod.BLOCKDROP_R32_MEAN, data_mod.BLOCKDROP_R32_STD)
    return 0.0


def run(argv=None) -> dict:
    """Train one stage; returns {'history': per-iteration dicts, 'epochs': per-epoch rows,
    'checkpoint': best official checkpoint path, 'latest': latest path}."""
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    os.makedirs(a.run_dir, exist_ok=True)
    resume_path = os.path.join(a.run_dir, "resume.pt")
    torch.manual_seed(a.seed)

    xtr, ytr, xva, yva = load_data(a)
    if a.overfit:  # the first batch, repeated: every iteration sees the same images
        reps = a.max_iters or 1
        xtr, ytr = xtr[:a.batch_size].repeat(reps, 1, 1, 1), ytr[:a.batch_size].repeat(reps)
    batches = data_mod.Batches(xtr, ytr, batch_size=a.batch_size, shuffle=not a.overfit,
                               train_augment=not (a.no_augment or a.overfit), drop_last=True,
                               seed=a.seed, pad_value=_pad_value(a))
    per_epoch = len(batches)
    if per_epoch == 0:
        raise SystemExit(f"not enough training images ({xtr.shape[0]}) for one batch of {a.batch_size}")
    total = per_epoch * a.epochs
    if a.max_iters is not None:
        total = min(total, a.max_iters)
    stage = make_stage(a, total)

    start_epoch, start_batch, it, best = 0, 0, 0, -1.0
    if a.resume and os.path.isfile(resume_path):
        st = torch.load(resume_path, map_location="cpu", weights_only=False)
        stage.load_state(st["stage"])
        torch.set_rng_state(st["rng"])
        start_epoch, start_batch, it, best = st["epoch"], st["batch"], st["iteration"], st["best"]
        print(f"[resume] {resume_path}: epoch {start_epoch}, batch {start_batch}, iteration {it}")
    elif a.resume:
        print(f"[resume] no {resume_path}; starting fresh")
    with open(os.path.join(a.run_dir, "args.json"), "w") as f:
        json.dump(vars(a), f, indent=1)

    def save_resume(epoch, batch):
        st = {"stage": stage.state(), "rng": torch.get_rng_state(), "epoch": epoch,
              "batch": batch, "iteration": it, "best": best, "args": vars(a)}
        ckpt_mod._atomic_save(st, resume_path)

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    history: list[dict] = []
    rows: list[dict] = []
    t_start = time.time()
    best_path = latest_path = None
    epoch = start_epoch
    while epoch < a.epochs and it < total:
        acc_sum = {"loss": 0.0, "ce": 0.0, "correct": 0, "n": 0, "exec": 0.0, "steps": 0, "reward": 0.0}
        n_batches = min(per_epoch - start_batch, total - it)
        bar = None
        if tqdm is not None and not a.no_progress:
            bar = tqdm(total=n_batches, desc=f"{a.stage} epoch {epoch + 1}/{a.epochs}", leave=False,
                       dynamic_ncols=True, mininterval=5.0, file=sys.stderr)
        t0 = time.time()
        b = start_batch
        for xb, yb in batches.batches(epoch, start_batch):
            if it >= total:
                break
            out = stage.train_step(xb, yb)
            it += 1
            b += 1
            out["iteration"] = it
            history.append(out)
            acc_sum["loss"] += out["loss"]
            acc_sum["ce"] += out["ce"]
            acc_sum["correct"] += out["correct"]
            acc_sum["n"] += yb.shape[0]
            acc_sum["exec"] += out["exec_frac"]
            acc_sum["reward"] += out.get("reward", 0.0)
            acc_sum["steps"] += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}", exec=f"{out['exec_frac']:.2f}")
            if a.save_every and it % a.save_every == 0 and b < per_epoch:
                save_resume(epoch, b)
        if bar is not None:
            bar.close()
        finished = b >= per_epoch
        steps = max(1, acc_sum["steps"])
        val = stage.evaluate(xva, yva) if xva.shape[0] else {"acc": float("nan")}
        cost = val.get("computation_pct", 100.0 * val.get("exec_frac", 1.0)) / 100.0
        eligible = a.max_exec is None or cost <= a.max_exec
        if eligible and val["acc"] > best:
            best = val["acc"]
            improved = True
        else:
            improved = False
        row = {"stage": a.stage, "epoch": epoch + 1, "iteration": it,
               "train_loss": acc_sum["loss"] / steps, "train_ce": acc_sum["ce"] / steps,
               "train_acc": 100.0 * acc_sum["correct"] / max(1, acc_sum["n"]),
               "train_exec_frac": acc_sum["exec"] / steps,
               "train_skip_rate": 1.0 - acc_sum["exec"] / steps,
               "lr": stage.optimizer.param_groups[0]["lr"],
               **{f"val_{k}": v for k, v in val.items()},
               "val_skip_rate": 1.0 - val.get("exec_frac", 1.0),
               "best_val_acc": best, "epoch_seconds": time.time() - t0,
               "elapsed_seconds": time.time() - t_start}
        if stage.family == "blockdrop":
            row["train_reward"] = acc_sum["reward"] / steps
        rows.append(row)
        val_for_save = dict(val, best_acc=best)
        latest_path = stage.save_official(a.run_dir, "latest", epoch + 1, it, val_for_save)
        if improved:
            best_path = stage.save_official(a.run_dir, "best", epoch + 1, it, val_for_save)
        _log_row(a.run_dir, row)
        print(" ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
        if finished:
            epoch += 1
            start_batch = 0
        else:
            start_batch = b
        save_resume(epoch, start_batch)
    if best_path is None:
        best_path = _existing_best(a.run_dir, stage)
    return {"history": history, "epochs": rows, "checkpoint": best_path, "latest": latest_path,
            "stage": stage}


def _existing_best(run_dir, stage):
    for name in ("model_best.pth.tar", "best.t7", "base_best.t7"):
        p = os.path.join(run_dir, name)
        if os.path.isfile(p):
            return p
    return None


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _log_row(run_dir: str, row: dict) -> None:
    with open(os.path.join(run_dir, "log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    path = os.path.join(run_dir, "log.csv")
    new = not os.path.isfile(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row), extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)


def main(argv=None) -> int:
    out = run(argv)
    print(f"[done] best checkpoint: {out['checkpoint']}; latest: {out['latest']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
