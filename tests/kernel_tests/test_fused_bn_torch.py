"""The closed-form-backward torch path of the fused BN module against autograd references."""
import torch
import torch.nn.functional as F

from kernels import bn_matching_loss_reference
from kernels.fused_bn_torch import fused_bn_matching_torch


def _stats(seed=0, c=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.5,
            torch.randn(c, generator=g, dtype=torch.float64), torch.randn(c, generator=g, dtype=torch.float64))


def test_gradcheck_fp64_loss_and_output():
    rm, rv, w, b = _stats()
    x = torch.randn(3, 5, 4, 2, dtype=torch.float64, requires_grad=True)

    def f(inp):
        y, loss = fused_bn_matching_torch(inp, rm, rv, w, b, 1e-5)
        return y, loss

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_matches_reference_and_batch_norm_in_fp32():
    rm, rv, w, b = (t.float() for t in _stats(1, 7))
    x = torch.randn(4, 7, 5, 3) * 2 + 1
    xa = x.clone().requires_grad_(True)
    xr = x.clone().requires_grad_(True)
    upstream = torch.randn(4, 7, 5, 3)
    y, loss = fused_bn_matching_torch(xa, rm, rv, w, b, 1e-3)
    ((y * upstream).sum() + 0.3 * loss).backward()
    y_ref = F.batch_norm(xr, rm, rv, w, b, False, 0.0, 1e-3)
    loss_ref = bn_matching_loss_reference(xr, rm, rv)
    ((y_ref * upstream).sum() + 0.3 * loss_ref).backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-4, atol=1e-5)


def test_zero_difference_gives_zero_matching_gradient():
    x = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).view(2, 3, 2, 2)
    var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
    xa = x.clone().requires_grad_(True)
    _, loss = fused_bn_matching_torch(xa, mean.clone(), var.clone(), None, None, 1e-5)
    loss.backward()
    assert float(loss) == 0.0
    assert torch.equal(xa.grad, torch.zeros_like(x))
