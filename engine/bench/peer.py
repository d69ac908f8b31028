"""The peer-style recover loop (SRe2L's scripts), kept only as a benchmark baseline.

A forward hook per BN layer copies its input (permute + contiguous + view), computes eager
mean/var and torch.norm; autograd does the rest. The engine never uses this loop.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F

from engine.models import bn_layers
from engine.recover.augment import augment_batch
from engine.recover.settings import StepAugment
from engine.recover.synthesize import Objective
from engine.training.schedule import cosine_lr, set_lr


class _PeerBNHook:
    def __init__(self, module):
        self.handle = module.register_forward_hook(self.hook)
        self.loss = None

    def hook(self, module, inputs, _output):
        x = inputs[0]
        nch = x.shape[1]
        mean = x.mean([0, 2, 3])
        var = x.permute(1, 0, 2, 3).contiguous().view([nch, -1]).var(1, unbiased=False)
        self.loss = torch.norm(module.running_var.data - var, 2) + torch.norm(module.running_mean.data - mean, 2)


def peer_recover(model, init, labels, objective: Objective, aug: StepAugment, bounds, generator):
    """The peer-style loop (baseline only; the engine never uses it)."""
    hooks = [_PeerBNHook(m) for m in bn_layers(model)]
    low, high = (b.to(init.device) for b in bounds)
    x = init.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=objective.lr, betas=(0.5, 0.9))
    for step in range(objective.iterations):
        set_lr(optimizer, cosine_lr(step, objective.iterations, objective.lr))
        out = model(augment_batch(x, aug, generator))
        ce = F.cross_entropy(out, labels)
        bn = objective.first_bn_multiplier * hooks[0].loss + sum(h.loss for h in hooks[1:])
        loss = ce + objective.r_bn * bn
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            x.copy_(torch.maximum(torch.minimum(x, high), low))
    for h in hooks:
        h.handle.remove()
    return x.detach()
