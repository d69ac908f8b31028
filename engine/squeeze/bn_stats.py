"""The paper's observation as an output: how spread out are a teacher's BN running variances?

SC-DD argues SSL teachers keep larger, more varied BN variances than supervised ones, which gives
recovery more information to match. For every BN layer we summarize the running variances over
channels; the histogram entropy (nats, ``bins`` equal bins over [0, max]) is log(bins) for an even
spread and 0 when every channel sits in one bin.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from engine.io import save_figure


def bn_variance_summary(model: nn.Module, bins: int = 20) -> list[dict]:
    """One row per BatchNorm2d layer, in forward order."""
    rows = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.BatchNorm2d):
            continue
        var = module.running_var.detach().double().cpu()
        hist = torch.histc(var, bins=bins, min=0.0, max=float(var.max()) or 1.0)
        p = hist / hist.sum()
        entropy = float(-(p[p > 0] * p[p > 0].log()).sum())
        rows.append({"layer": name, "channels": var.numel(), "var_mean": float(var.mean()),
                     "var_std": float(var.std()) if var.numel() > 1 else 0.0,
                     "var_min": float(var.min()), "var_max": float(var.max()),
                     "var_entropy": entropy, "var_entropy_max": math.log(bins),
                     "mean_abs_mean": float(module.running_mean.detach().abs().mean())})
    return rows


def plot_bn_variance(summaries: dict[str, list[dict]], path: str | Path) -> Path:
    """Per-layer mean (with std bars) and entropy of BN running variance, one line per teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_var, ax_ent) = plt.subplots(1, 2, figsize=(9, 3.4))
    for offset, (kind, rows) in enumerate(sorted(summaries.items())):
        x = [i + 0.08 * (offset - 0.5) for i in range(len(rows))]
        ax_var.errorbar(x, [r["var_mean"] for r in rows], yerr=[r["var_std"] for r in rows], marker="o",
                        capsize=3, label=kind)
        ax_ent.plot(range(len(rows)), [r["var_entropy"] for r in rows], marker="o", label=kind)
    ax_var.set(title="BN running variance (mean +- std over channels)", xlabel="BN layer", ylabel="variance")
    ax_var.set_yscale("log")
    ax_ent.set(title="entropy of running-variance histogram", xlabel="BN layer", ylabel="nats")
    layers = max((len(rows) for rows in summaries.values()), default=0)
    for ax in (ax_var, ax_ent):
        ax.set_xticks(range(layers))
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out
