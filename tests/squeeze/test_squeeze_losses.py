"""SSL losses as pure functions: known values, permutation behaviour, gradients, momentum update."""
import math

import pytest
import torch
import torch.nn.functional as F

from engine.squeeze.losses import infonce_moco, momentum_update, nt_xent


def _nt_xent_loop(z1, z2, t):
    """Row-by-row NT-Xent, written the way the SimCLR paper states it."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        partner = (i + n) % (2 * n)
        denom = sum(torch.exp(z[i] @ z[j] / t) for j in range(2 * n) if j != i)
        total = total - torch.log(torch.exp(z[i] @ z[partner] / t) / denom)
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_known_value_for_orthogonal_identical_views(t):
    n = 4
    z = torch.eye(n, 8)
    # each row: positive similarity 1, the 2n - 2 other rows are orthogonal (similarity 0)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2 * n - 2))
    assert nt_xent(z, z.clone(), t).item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_nt_xent_matches_loop_and_is_scale_invariant():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    assert nt_xent(z1, z2, 0.3).item() == pytest.approx(_nt_xent_loop(z1, z2, 0.3).item(), rel=1e-5)
    assert nt_xent(3 * z1, 0.5 * z2, 0.3).item() == pytest.approx(nt_xent(z1, z2, 0.3).item(), rel=1e-5)


def test_nt_xent_identical_views_beat_perturbed_and_pairing_matters():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 16, generator=g)
    same = nt_xent(z, z.clone(), 0.2)
    assert same < nt_xent(z, z + 0.5 * torch.randn(8, 16, generator=g), 0.2)
    perm = torch.randperm(8, generator=g)
    # the same permutation of both views relabels the batch: loss unchanged
    assert nt_xent(z[perm], z[perm], 0.2).item() == pytest.approx(same.item(), rel=1e-6)
    # permuting one view breaks the pairs: loss rises
    assert nt_xent(z, z[torch.roll(torch.arange(8), 1)], 0.2) > same + 1.0


@pytest.mark.parametrize("t", [0.2, 1.0])
def test_infonce_known_value(t):
    n, k = 3, 5
    q = torch.eye(n, n + k)
    queue = torch.eye(n + k)[n:]  # orthogonal to every query
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + k))
    assert infonce_moco(q, q.clone(), queue, t).item() == pytest.approx(expected, rel=1e-4, abs=1e-7)


def test_infonce_matches_explicit_formula_and_permutation():
    g = torch.Generator().manual_seed(2)
    q, k, queue = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g), torch.randn(10, 4, generator=g)
    qn, kn, un = F.normalize(q, dim=1), F.normalize(k, dim=1), F.normalize(queue, dim=1)
    pos = (qn * kn).sum(1) / 0.2
    neg = qn @ un.t() / 0.2
    expected = (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()
    assert infonce_moco(q, k, queue, 0.2).item() == pytest.approx(expected.item(), rel=1e-5)
    perm = torch.randperm(6, generator=g)
    assert infonce_moco(q[perm], k[perm], queue, 0.2).item() == pytest.approx(expected.item(), rel=1e-5)
    assert infonce_moco(q, k[torch.roll(torch.arange(6), 1)], queue, 0.2).item() != pytest.approx(expected.item())
    # identical views minimize the positive term: loss with k = q is below loss with random keys
    assert infonce_moco(q, q, queue, 0.2) < infonce_moco(q, k, queue, 0.2)


def test_infonce_gradient_reaches_queries_only():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(4, 8, generator=g, requires_grad=True)
    k = torch.randn(4, 8, generator=g, requires_grad=True)
    queue = torch.randn(16, 8, generator=g, requires_grad=True)
    infonce_moco(q, k, queue, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_momentum_update():
    key = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    query = [torch.tensor([3.0, 4.0]), torch.tensor([[10.0]])]
    momentum_update(key, query, 0.9)
    assert torch.allclose(key[0], torch.tensor([1.2, 2.2]))
    assert torch.allclose(key[1], torch.tensor([[1.0]]))
    assert torch.equal(query[0], torch.tensor([3.0, 4.0]))  # the query side is untouched
    momentum_update(key, query, 0.0)
    assert torch.equal(key[0], query[0])
    with pytest.raises(ValueError):
        momentum_update(key, query[:1], 0.9)
