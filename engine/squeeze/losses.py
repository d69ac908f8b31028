"""Self-supervised objectives as pure functions (no module state, no config)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def infonce_moco(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo's InfoNCE: each query's positive is its own key, negatives are the queue.

    Args:
        q: queries [N, D] from the query encoder (gradient flows here).
        k: keys [N, D] from the momentum encoder (treated as constants).
        queue: negatives [K, D] (keys of earlier batches).
        temperature: softmax temperature (MoCo v2: 0.2).

    Rows of q, k and queue are L2-normalized here, so callers may pass raw projections.
    Returns the mean cross-entropy over the batch with the positive at logit index 0.
    """
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    queue = F.normalize(queue.detach(), dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # [N, 1]
    negative = q @ queue.t()  # [N, K]
    logits = torch.cat([positive, negative], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, target)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent over two views of a batch.

    Args:
        z1, z2: projections [N, D] of view 1 and view 2; row i of z1 and of z2 is a positive pair.
        temperature: softmax temperature (SimCLR on CIFAR: 0.5).

    Each of the 2N rows is classified against the other 2N - 1 rows (itself excluded), the
    positive being its partner view. Rows are L2-normalized here. Returns the mean over 2N rows.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2], dim=0), dim=1)  # [2N, D]
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    # Built on the device: a host tensor moved each step would be a pageable copy, which waits for the stream.
    target = torch.arange(2 * n, device=z.device).roll(n)
    return F.cross_entropy(sim, target)


@torch.no_grad()
def momentum_update(key_params, query_params, momentum: float) -> None:
    """key <- m * key + (1 - m) * query (MoCo's slow encoder), as two foreach launches for all parameters
    rather than two per parameter (ResNet-18: 124 launches a step otherwise)."""
    keys, queries = list(key_params), [q.detach() for q in query_params]
    if len(keys) != len(queries):
        raise ValueError(f"momentum_update: {len(keys)} key parameters, {len(queries)} query parameters")
    torch._foreach_mul_(keys, momentum)
    torch._foreach_add_(keys, queries, alpha=1.0 - momentum)
