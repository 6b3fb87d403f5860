"""Evaluate a SkipNet / BlockDrop / base-ResNet checkpoint: eager reference vs engine.

    python -m dynexec.eval --checkpoint PATH [--backbone PATH] [--data fashion-mnist|cifar10|cifar100]
                           [--data-dir D] [--limit N] [--plot PNG] [--json PATH]

Reports the accuracy of the eager model (the official inference semantics) and of the
compiled regrouping engine (``dynexec.compile``), checks that both take identical
routing decisions (mismatching samples are reported and make the exit status 1),
and prints the official cost metrics: SkipNet computation percentage
(ucbdrive/skipnet ``train_rl.py``), BlockDrop block usage mean ± std, FLOPs/img mean ± std
and unique policies (Tushar-N/blockdrop ``test.py``), the theoretical speedup (dense
FLOPs / mean executed FLOPs, ``dynexec.models.flops``) and the per-block execution rates
(table; bar chart with ``--plot``).

A file holding only a BlockDrop backbone (the base model) is evaluated as test.py does
without an agent checkpoint: an agent with logit weights 0 and bias 10 keeps every block.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Optional

import numpy as np
import torch

from ..models import checkpoints as ckpt_mod
from ..models.blockdrop import BlockDrop, FlatResNet224, Policy32, Policy224
from ..models.flops import blockdrop_stats, count_flops, skipnet_computation_percentage
from ..runtime.engine import compile as compile_engine
from . import data as data_mod


def load_model(path: str, backbone: Optional[str] = None):
    """(model, description). Backbone-only BlockDrop files get an all-keep agent."""
    try:
        model = ckpt_mod.load_checkpoint(path, backbone=backbone)
        return model, model.checkpoint_meta.get("format", "?")
    except ckpt_mod.CheckpointError as exc:
        if "backbone" not in str(exc) and "without projection shortcuts" not in str(exc):
            raise
    resnet, _ = ckpt_mod._load_backbone(path, "cpu", False)
    k = sum(resnet.layer_config)
    agent = Policy224(num_blocks=k) if isinstance(resnet, FlatResNet224) else Policy32(num_blocks=k)
    with torch.no_grad():
        agent.logit.weight.zero_()
        agent.logit.bias.fill_(10.0)
    model = BlockDrop(resnet, agent, name=ckpt_mod._blockdrop_name(resnet)).eval()
    model.checkpoint_meta = {"path": path, "format": "blockdrop-backbone (all blocks kept)"}
    return model, model.checkpoint_meta["format"]


def _normalization(model, data: str, override: Optional[str]) -> str:
    if override:
        return override
    if isinstance(model, BlockDrop):
        return "blockdrop-r32" if (model.model_name == "R32_C10") else "none"
    return "skipnet"


def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 250,
             fold_bn: bool = True, backend: str = "auto") -> dict:
    """Eager vs engine on (x, y); returns the metrics dict (no printing)."""
    model.eval()
    t0 = time.time()
    eager_logits, eager_routing = [], []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            lg, r = model.forward_routing(x[i:i + batch_size])
            eager_logits.append(lg)
            eager_routing.append(r)
    t_eager = time.time() - t0
    engine = compile_engine(model, backend=backend, fold_bn=fold_bn)
    t0 = time.time()
    eng_logits, eng_routing = [], []
    for i in range(0, x.shape[0], batch_size):
        lg, r = engine(x[i:i + batch_size], return_routing=True)
        eng_logits.append(lg)
        eng_routing.append(r)
    t_engine = time.time() - t0
    le, re_ = torch.cat(eager_logits), torch.cat(eager_routing)
    lc, rc = torch.cat(eng_logits), torch.cat(eng_routing)
    pred_e, pred_c = le.argmax(1), lc.argmax(1)
    mismatch_rows = (re_ != rc).any(1).nonzero().view(-1)
    table = count_flops(model)
    executed = table.executed(re_).astype(np.float64)
    k = re_.shape[1]
    rates = re_.float().mean(0).tolist()
    out = {
        "model": model.model_name,
        "router": model.router,
        "num_images": int(x.shape[0]),
        "num_blocks": k,
        "accuracy_eager": 100.0 * float((pred_e == y).float().mean()),
        "accuracy_engine": 100.0 * float((pred_c == y).float().mean()),
        "routing_mismatch_samples": int(mismatch_rows.numel()),
        "routing_mismatch_indices": mismatch_rows[:20].tolist(),
        "prediction_mismatch_samples": int((pred_e != pred_c).sum()),
        "max_abs_logit_diff": float((le - lc).abs().max()) if le.numel() else 0.0,
        "executed_fraction": float(re_.float().mean()),
        "block_execution_rates": rates,
        "dense_flops": int(table.dense),
        "flops_mean": float(executed.mean()),
        "flops_std": float(executed.std()),
        "theoretical_speedup": float(table.theoretical_speedup(re_)),
        "unique_policies": len({row.numpy().tobytes() for row in re_}),
        "seconds_eager": t_eager,
        "seconds_engine": t_engine,
        "fold_bn": fold_bn,
        "backend": engine.backend_name,
    }
    if model.router == "online":
        out["computation_percentage"] = float(skipnet_computation_percentage(re_))
    if model.router == "planned":
        st = blockdrop_stats(re_, table)
        out["block_usage_mean"] = st["block_usage_mean"]
        out["block_usage_std"] = st["block_usage_std"]
        out["block_usage_fraction"] = st["block_usage_mean"] / k
    return out


def format_report(m: dict) -> str:
    lines = [f"model {m['model']} (router {m['router']}), {m['num_images']} images, {m['num_blocks']} blocks",
             f"accuracy eager  {m['accuracy_eager']:.2f} %",
             f"accuracy engine {m['accuracy_engine']:.2f} %  (backend {m['backend']}, "
             f"fold_bn {m['fold_bn']}, max |logit diff| {m['max_abs_logit_diff']:.2e})",
             "routing decisions identical: "
             + ("yes" if m["routing_mismatch_samples"] == 0 else
                f"NO: {m['routing_mismatch_samples']} samples differ "
                f"(first indices {m['routing_mismatch_indices']})")]
    if "computation_percentage" in m:
        lines.append(f"SkipNet computation percentage {m['computation_percentage']:.3f} % "
                     f"(FLOPs reduction {100 - m['computation_percentage']:.3f} %)")
    if "block_usage_mean" in m:
        lines.append(f"Block Usage {m['block_usage_mean']:.3f} ± {m['block_usage_std']:.3f} "
                     f"(out of {m['num_blocks']}; fraction {m['block_usage_fraction']:.3f})")
    lines += [f"FLOPs/img {m['flops_mean']:.2E} ± {m['flops_std']:.2E} "
              f"(dense backbone {m['dense_flops']:.2E})",
              f"theoretical speedup {m['theoretical_speedup']:.3f}x",
              f"unique policies {m['unique_policies']}",
              f"executed fraction of blocks {m['executed_fraction']:.4f}",
              "per-block execution rate:",
              "  block  rate"]
    lines += [f"  {i:5d}  {r:.4f}  {'#' * int(round(r * 40))}"
              for i, r in enumerate(m["block_execution_rates"])]
    return "\n".join(lines)


def plot_rates(m: dict, path: str, title: Optional[str] = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rates = m["block_execution_rates"]
    fig, ax = plt.subplots(figsize=(max(5, 0.35 * len(rates) + 2), 3.2))
    ax.bar(range(len(rates)), rates, color="tab:blue")
    ax.set_xlabel("block")
    ax.set_ylabel("execution rate")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(range(len(rates)))
    ax.set_title(title or f"{m['model']}: acc {m['accuracy_eager']:.2f} %, "
                 f"executed {100 * m['executed_fraction']:.1f} % of blocks")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m dynexec.eval", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--backbone", default=None, help="BlockDrop backbone for agent-only files")
    p.add_argument("--data", choices=data_mod.DATASETS, default="fashion-mnist")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--normalization", choices=("skipnet", "blockdrop-r32", "none"), default=None,
                   help="CIFAR only; default from the model (SkipNet constants, BlockDrop R32 "
                        "constants, or none for the other BlockDrop models)")
    p.add_argument("--limit", type=int, default=None, help="first N test images")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--no-fold-bn", action="store_true", help="compile without BN folding")
    p.add_argument("--backend", default="auto")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot", default=None, help="bar chart of per-block execution rates (PNG)")
    p.add_argument("--json", default=None, help="write the metrics here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    model, fmt = load_model(a.checkpoint, a.backbone)
    x, y = data_mod.load_dataset(a.data, "test", a.data_dir, limit=a.limit,
                                 normalization=_normalization(model, a.data, a.normalization))
    if model.num_classes != data_mod.NUM_CLASSES[a.data]:
        print(f"warning: the model has {model.num_classes} classes, {a.data} has "
              f"{data_mod.NUM_CLASSES[a.data]}", file=sys.stderr)
    m = evaluate(model, x, y, batch_size=a.batch_size, fold_bn=not a.no_fold_bn, backend=a.backend)
    m.update({"checkpoint": a.checkpoint, "backbone": a.backbone, "format": fmt, "data": a.data,
              "limit": a.limit})
    print(f"checkpoint {a.checkpoint} ({fmt}); data {a.data} test"
          + (f" (first {a.limit})" if a.limit else ""))
    print(format_report(m))
    if a.plot:
        plot_rates(m, a.plot)
        print(f"plot written to {a.plot}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(m, f, indent=1)
        print(f"metrics written to {a.json}")
    return 1 if m["routing_mismatch_samples"] else 0


if __name__ == "__main__":
    sys.exit(main())
