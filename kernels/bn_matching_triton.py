"""Triton BN-matching loss: one read of ``x`` forward, one read of ``x`` backward.

Semantics are those of ``kernels.bn_matching_reference`` (the tests hold this file to it).

Layout. A BN input [N, C, H, W] is addressed as a 3-D view [N, HW, C] with strides
(stride_n, stride_hw, stride_c): NCHW-contiguous gives (C*HW, 1, HW); channels_last gives
(HW*C, C, 1) and is then flattened to one "image" of N*HW rows [1, N*HW, C]. Any other strides
are made contiguous first. Kernels only ever see that view, so both memory formats share code.

Groups. With ``groups`` = G the N images are G independent class-batches of N/G: every statistic,
norm and loss is per (group, channel) / per group, in the same launches (the merge kernel's grid
gains a group axis, the loss kernel runs one program per group). In the view a group is
``grp_imgs`` consecutive view-images: N/G for NCHW, and for channels_last the view folds each
group's images into one view-image [G, (N/G)*HW, C]. Pivots are per group (its first pixel).

Forward.
  1. ``_bn_stats_partial_kernel``: grid (row groups, channel blocks). A program walks
     ``tiles_per_group`` tiles [BLOCK_HW, BLOCK_C] of one image, computes each tile's corrected
     two-pass (mean, M2) in registers and folds it into its running (n, mean, M2) with Chan's
     pairwise formula. Everything is computed on x - x[0, c, 0, 0] (a per-channel pivot) and
     deviations are taken from tile means before squaring: this is what keeps a 1e3-mean,
     1e-2-std channel's variance accurate in fp32 (E[x^2]-E[x]^2 would lose it entirely).
     With ``WRITE_Y`` it also writes the eval-mode BN output from the same loaded tile.
  2. ``_bn_stats_merge_kernel``: grid (channel blocks,). Merges the row-group partials,
     BLOCK_T at a time (multi-way Chan within a chunk, pairwise Chan across chunks).
  3. ``_bn_matching_loss_kernel``: one program, reduces over C into the two norms and the loss.
Backward.
  ``_bn_matching_bwd_kernel``: elementwise over x,
     dL/dx = g * [ (mean_c - rm_c)/||mean - rm|| + 2 (var_c - rv_c)(x - mean_c)/||var - rv|| ] / (N*H*W)
  (a zero norm contributes zero), plus ``dy * scale_c`` when fused with the BN output.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from .bn_matching_reference import _check_stats_shape, check_groups

__all__ = [
    "BNMatchingLossFunction",
    "FusedBNMatchingFunction",
    "bn_matching_triton",
    "bn_matching_loss_triton",
    "fused_bn_matching_triton",
]


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@triton.jit
def _bn_stats_partial_kernel(
    X_ptr,  # [N, HW, C] view of the input via (stride_xn, stride_xhw, stride_xc); fp32/fp16/bf16
    Y_ptr,  # [N, HW, C] view of the BN output, same strides as X (only written when WRITE_Y)
    RM_ptr,  # [C] fp32 running mean (only read when WRITE_Y)
    SCALE_ptr,  # [C] fp32 weight * rsqrt(running_var + eps) (only read when WRITE_Y)
    BIAS_ptr,  # [C] fp32 bias (only read when WRITE_Y)
    PMEAN_ptr,  # [T, C] fp32 out: mean of x - pivot over each row group, T = N * groups
    PM2_ptr,  # [T, C] fp32 out: sum of squared deviations of each row group
    C,
    HW,
    stride_xn,
    stride_xhw,
    stride_xc,
    groups,  # row groups per image
    tiles_per_group,  # BLOCK_HW tiles walked by one program
    grp_imgs,  # view-images per batch group
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WRITE_Y: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = pid_t // groups
    g = pid_t % groups

    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    base = n.to(tl.int64) * stride_xn
    c_part = c_offs[None, :].to(tl.int64) * stride_xc
    if WRITE_Y:
        rm = tl.load(RM_ptr + c_offs, mask=c_mask, other=0.0)
        scale = tl.load(SCALE_ptr + c_offs, mask=c_mask, other=0.0)
        bias = tl.load(BIAS_ptr + c_offs, mask=c_mask, other=0.0)

    # Statistics are of x - pivot_c, pivot_c = x[first image of the group, c, 0, 0]: partial means
    # near 0 keep full fp32 relative precision even when the channel mean is large (1e3 + 1e-2 noise).
    pivot_base = (n // grp_imgs).to(tl.int64) * grp_imgs * stride_xn
    pivot = tl.load(X_ptr + pivot_base + c_offs.to(tl.int64) * stride_xc, mask=c_mask, other=0.0).to(tl.float32)
    acc_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    hw_first = g * tiles_per_group * BLOCK_HW
    for i in range(0, tiles_per_group):
        hw_offs = hw_first + i * BLOCK_HW + tl.arange(0, BLOCK_HW)
        hw_mask = hw_offs < HW
        mask = hw_mask[:, None] & c_mask[None, :]
        offs = base + hw_offs[:, None].to(tl.int64) * stride_xhw + c_part
        # bf16/fp16 are only loaded in their dtype; every arithmetic op runs in fp32.
        x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xs = tl.where(mask, x - pivot[None, :], 0.0)

        cnt = tl.sum(hw_mask.to(tl.float32), axis=0)
        inv_cnt = 1.0 / tl.maximum(cnt, 1.0)
        tile_mean = tl.sum(xs, axis=0) * inv_cnt
        # Corrected two-pass (Chan, Golub & LeVeque): the deviations' own sum removes the
        # rounding error of the first-pass mean (whose sum ran at the magnitude of x * cnt).
        dev = tl.where(mask, xs - tile_mean[None, :], 0.0)
        dev_sum = tl.sum(dev, axis=0)
        tile_mean = tile_mean + dev_sum * inv_cnt
        tile_m2 = tl.maximum(tl.sum(dev * dev, axis=0) - dev_sum * dev_sum * inv_cnt, 0.0)

        # Chan et al. pairwise merge of (acc_n, acc_mean, acc_m2) with (cnt, tile_mean, tile_m2).
        new_n = acc_n + cnt
        delta = tile_mean - acc_mean
        frac = cnt / tl.maximum(new_n, 1.0)
        acc_mean = acc_mean + delta * frac
        acc_m2 = acc_m2 + tile_m2 + delta * delta * acc_n * frac
        acc_n = new_n

        if WRITE_Y:
            y = (x - rm[None, :]) * scale[None, :] + bias[None, :]
            tl.store(Y_ptr + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)

    tl.store(PMEAN_ptr + pid_t * C + c_offs, acc_mean, mask=c_mask)
    tl.store(PM2_ptr + pid_t * C + c_offs, acc_m2, mask=c_mask)


@triton.jit
def _bn_stats_merge_kernel(
    X_ptr,  # input; only the pivots x[0, c, 0, 0] = X_ptr[c * stride_xc] are read
    PMEAN_ptr,  # [T, C] fp32 row-group means of x - pivot
    PM2_ptr,  # [T, C] fp32 row-group sums of squared deviations
    MEAN_ptr,  # [G, C] fp32 out: batch mean of each group
    VAR_ptr,  # [G, C] fp32 out: biased batch variance of each group
    C,
    T,  # partials per batch group (a group's are consecutive)
    HW,
    stride_xn,
    stride_xc,
    groups,
    group_hw,  # rows covered by one full row group (tiles_per_group * BLOCK_HW)
    grp_imgs,  # view-images per batch group
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_g = tl.program_id(1)
    PMEAN_ptr += pid_g.to(tl.int64) * T * C
    PM2_ptr += pid_g.to(tl.int64) * T * C
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C

    acc_n = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t_offs = t0 + tl.arange(0, BLOCK_T)
        t_mask = t_offs < T
        # Row count of a group follows from its index, so it is not stored.
        rows_left = HW - (t_offs % groups) * group_hw
        cnt = tl.minimum(tl.maximum(rows_left, 0), group_hw).to(tl.float32)
        cnt = tl.where(t_mask, cnt, 0.0)
        mask = t_mask[:, None] & c_mask[None, :]
        p_offs = t_offs[:, None] * C + c_offs[None, :]
        pmean = tl.load(PMEAN_ptr + p_offs, mask=mask, other=0.0)
        pm2 = tl.load(PM2_ptr + p_offs, mask=mask, other=0.0)

        # Multi-way Chan inside the chunk: deviations are taken from the chunk mean.
        blk_n = tl.sum(cnt, axis=0)
        inv_n = 1.0 / tl.maximum(blk_n, 1.0)
        blk_mean = tl.sum(cnt[:, None] * pmean, axis=0) * inv_n
        dev = tl.where(mask, pmean - blk_mean[None, :], 0.0)
        wdev_sum = tl.sum(cnt[:, None] * dev, axis=0)
        blk_mean = blk_mean + wdev_sum * inv_n  # same correction as in the partial kernel
        blk_m2 = tl.sum(pm2, axis=0) + tl.maximum(
            tl.sum(cnt[:, None] * dev * dev, axis=0) - wdev_sum * wdev_sum * inv_n, 0.0
        )

        new_n = acc_n + blk_n
        delta = blk_mean - acc_mean
        frac = blk_n / tl.maximum(new_n, 1.0)
        acc_mean = acc_mean + delta * frac
        acc_m2 = acc_m2 + blk_m2 + delta * delta * acc_n * frac
        acc_n = new_n

    pivot_base = pid_g.to(tl.int64) * grp_imgs * stride_xn
    pivot = tl.load(X_ptr + pivot_base + c_offs.to(tl.int64) * stride_xc, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(MEAN_ptr + pid_g * C + c_offs, pivot + acc_mean, mask=c_mask)
    tl.store(VAR_ptr + pid_g * C + c_offs, acc_m2 / tl.maximum(acc_n, 1.0), mask=c_mask)


@triton.jit
def _bn_matching_loss_kernel(
    MEAN_ptr,  # [G, C] fp32 batch mean of each group
    VAR_ptr,  # [G, C] fp32 batch variance of each group
    RM_ptr,  # [C] fp32 running mean
    RV_ptr,  # [C] fp32 running variance
    OUT_ptr,  # [G, 3] fp32 out: (loss, ||rm - mean||, ||rv - var||) of each group
    C,
    BLOCK_C: tl.constexpr,
):
    pid_g = tl.program_id(0)
    MEAN_ptr += pid_g * C
    VAR_ptr += pid_g * C
    OUT_ptr += pid_g * 3
    sq_m = tl.zeros([BLOCK_C], dtype=tl.float32)
    sq_v = tl.zeros([BLOCK_C], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_offs = c0 + tl.arange(0, BLOCK_C)
        c_mask = c_offs < C
        dm = tl.load(RM_ptr + c_offs, mask=c_mask, other=0.0) - tl.load(MEAN_ptr + c_offs, mask=c_mask, other=0.0)
        dv = tl.load(RV_ptr + c_offs, mask=c_mask, other=0.0) - tl.load(VAR_ptr + c_offs, mask=c_mask, other=0.0)
        sq_m += dm * dm
        sq_v += dv * dv
    norm_m = tl.sqrt(tl.sum(sq_m, axis=0))
    norm_v = tl.sqrt(tl.sum(sq_v, axis=0))
    tl.store(OUT_ptr, norm_v + norm_m)
    tl.store(OUT_ptr + 1, norm_m)
    tl.store(OUT_ptr + 2, norm_v)


@triton.jit
def _bn_matching_bwd_kernel(
    X_ptr,  # [N, HW, C] view of the input via (stride_n, stride_hw, stride_c)
    DX_ptr,  # [N, HW, C] out: dL/dx, same strides as X, x's dtype
    DY_ptr,  # [N, HW, C] upstream grad of the BN output, same strides (only read when HAS_DY)
    SCALE_ptr,  # [C] fp32 weight * rsqrt(running_var + eps) (only read when HAS_DY)
    MEAN_ptr,  # [G, C] fp32 batch mean of each group
    VAR_ptr,  # [G, C] fp32 batch variance of each group
    RM_ptr,  # [C] fp32 running mean
    RV_ptr,  # [C] fp32 running variance
    NORMS_ptr,  # [G, 3] fp32 (loss, ||rm - mean||, ||rv - var||) from the forward
    GLOSS_ptr,  # [G] fp32 upstream grad of each group's loss
    C,
    HW,
    stride_n,
    stride_hw,
    stride_c,
    hw_blocks,
    inv_count,  # 1 / (images per group * H*W)
    grp_imgs,  # view-images per batch group
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_DY: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = pid_t // hw_blocks
    b = pid_t % hw_blocks
    grp = n // grp_imgs
    MEAN_ptr += grp * C
    VAR_ptr += grp * C
    NORMS_ptr += grp * 3
    GLOSS_ptr += grp

    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    mean = tl.load(MEAN_ptr + c_offs, mask=c_mask, other=0.0)
    var = tl.load(VAR_ptr + c_offs, mask=c_mask, other=0.0)
    rm = tl.load(RM_ptr + c_offs, mask=c_mask, other=0.0)
    rv = tl.load(RV_ptr + c_offs, mask=c_mask, other=0.0)
    norm_m = tl.load(NORMS_ptr + 1)
    norm_v = tl.load(NORMS_ptr + 2)
    g = tl.load(GLOSS_ptr)
    # Subgradient 0 where a norm's argument is exactly zero, as torch.linalg.vector_norm gives.
    s_m = tl.where(norm_m > 0.0, g / tl.where(norm_m > 0.0, norm_m, 1.0), 0.0) * inv_count
    s_v = tl.where(norm_v > 0.0, g / tl.where(norm_v > 0.0, norm_v, 1.0), 0.0) * (2.0 * inv_count)
    coef_m = s_m * (mean - rm)
    coef_v = s_v * (var - rv)

    hw_offs = b * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask = (hw_offs < HW)[:, None] & c_mask[None, :]
    offs = (
        n.to(tl.int64) * stride_n
        + hw_offs[:, None].to(tl.int64) * stride_hw
        + c_offs[None, :].to(tl.int64) * stride_c
    )
    x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # (x - mean) rather than a*x + b: the latter cancels catastrophically for large-mean inputs.
    dx = coef_m[None, :] + coef_v[None, :] * (x - mean[None, :])
    if HAS_DY:
        scale = tl.load(SCALE_ptr + c_offs, mask=c_mask, other=0.0)
        dy = tl.load(DY_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx += dy * scale[None, :]
    tl.store(DX_ptr + offs, dx.to(DX_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Host launchers
# --------------------------------------------------------------------------------------------

# One launch config, no autotune (multi-config autotune cannot run under the interpreter).
# Module-level so tests can shrink them to exercise multi-tile and multi-chunk merges.
_TILE_ELEMS = 4096  # elements per [BLOCK_HW, BLOCK_C] tile
_MAX_BLOCK_HW = 1024  # NCHW: rows (contiguous H*W) per tile
_MAX_BLOCK_C = 128  # channels_last: channels (contiguous) per tile
_MERGE_BLOCK_T = 64  # row-group partials merged per step


def _np2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


@functools.lru_cache(maxsize=None)
def _target_programs(device_type: str, device_index: int | None) -> int:
    """Programs worth launching for the stats pass: a few waves on GPU, few under the interpreter."""
    if device_type == "cuda":
        return 8 * torch.cuda.get_device_properties(device_index).multi_processor_count
    return 4


def _rows_view(x: Tensor, groups: int = 1) -> tuple[Tensor, int, int, int, int, int, int, int]:
    """Return (x', N, HW, C, stride_n, stride_hw, stride_c, grp_imgs) describing x as an [N, HW, C]
    view whose batch groups are ``grp_imgs`` consecutive view-images each.

    x' is x itself for NCHW-contiguous and channels_last inputs, else a contiguous copy.
    """
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    per_group = check_groups(x, groups)
    n, c, h, w = x.shape
    hw = h * w
    if x.is_contiguous():
        pass
    elif x.is_contiguous(memory_format=torch.channels_last):
        # Rows of C contiguous channels; images are back to back, so fold each group's images into
        # the rows of one view-image.
        return x, groups, per_group * hw, c, per_group * hw * c, c, 1, 1
    else:
        x = x.contiguous()
    # stride(1) of a size-1 dim may be arbitrary; it is then never multiplied by a nonzero index.
    return x, n, hw, c, c * hw, 1, hw, per_group


def _tile_shape(hw: int, c: int, stride_c: int) -> tuple[int, int]:
    # Keep the contiguous axis long: channels for channels_last, rows (H*W) for NCHW.
    if stride_c == 1:
        block_c = min(_np2(c), _MAX_BLOCK_C)
        block_hw = min(_np2(hw), max(_TILE_ELEMS // block_c, 1))
    else:
        block_hw = min(_np2(hw), _MAX_BLOCK_HW)
        block_c = min(_np2(c), max(_TILE_ELEMS // block_hw, 1))
    # Size-1 aranges are avoided; masked lanes cost nothing but a little register space.
    return max(block_hw, 2), max(block_c, 2)


def _num_warps(block_hw: int, block_c: int) -> int:
    return 8 if block_hw * block_c >= 4096 else 4


def _stats_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    bn_affine: tuple[Tensor, Tensor] | None = None,
    n_groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Launch the forward kernels. Returns (x_view_tensor, mean [G, C], var [G, C], norms [G, 3], y or None).

    ``bn_affine`` = (scale, bias) [C] fp32 also writes y = (x - running_mean) * scale + bias.
    ``running_mean``/``running_var`` must already be fp32 contiguous [C] on x's device.
    """
    xv, n, hw, c, s_n, s_hw, s_c, grp_imgs = _rows_view(x, n_groups)
    dev = xv.device
    block_hw, block_c = _tile_shape(hw, c, s_c)
    hw_blocks = triton.cdiv(hw, block_hw)
    c_blocks = triton.cdiv(c, block_c)
    target = _target_programs(dev.type, dev.index if dev.type == "cuda" else None)
    # Walk several tiles per program only when there are far more tiles than useful programs;
    # fewer partials means less merge work and a smaller [T, C] scratch buffer.
    tiles_per_group = max(1, min(hw_blocks, (n * hw_blocks * c_blocks) // max(target, 1)))
    groups = triton.cdiv(hw_blocks, tiles_per_group)
    t = n * groups

    pmean = torch.empty((t, c), device=dev, dtype=torch.float32)
    pm2 = torch.empty((t, c), device=dev, dtype=torch.float32)
    mean = torch.empty((n_groups, c), device=dev, dtype=torch.float32)
    var = torch.empty((n_groups, c), device=dev, dtype=torch.float32)
    norms = torch.empty((n_groups, 3), device=dev, dtype=torch.float32)

    if bn_affine is not None:
        y = torch.empty_like(xv)  # dense input: empty_like keeps its strides
        scale, bias = bn_affine
        rm_arg = running_mean
    else:
        y = None
        scale = bias = rm_arg = mean  # placeholders; never dereferenced when WRITE_Y is False
    _bn_stats_partial_kernel[(t, c_blocks)](
        xv,
        y if y is not None else xv,
        rm_arg,
        scale,
        bias,
        pmean,
        pm2,
        c,
        hw,
        s_n,
        s_hw,
        s_c,
        groups,
        tiles_per_group,
        grp_imgs,
        BLOCK_HW=block_hw,
        BLOCK_C=block_c,
        WRITE_Y=y is not None,
        num_warps=_num_warps(block_hw, block_c),
    )
    merge_block_c = min(_np2(c), 64)
    _bn_stats_merge_kernel[(triton.cdiv(c, merge_block_c), n_groups)](
        xv,
        pmean,
        pm2,
        mean,
        var,
        c,
        t // n_groups,
        hw,
        s_n,
        s_c,
        groups,
        tiles_per_group * block_hw,
        grp_imgs,
        BLOCK_T=_MERGE_BLOCK_T,
        BLOCK_C=max(merge_block_c, 2),
        num_warps=4,
    )
    _bn_matching_loss_kernel[(n_groups,)](
        mean,
        var,
        running_mean,
        running_var,
        norms,
        c,
        BLOCK_C=max(min(_np2(c), 1024), 2),
        num_warps=4,
    )
    return xv, mean, var, norms, y


def _matching_backward(
    xv: Tensor,
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    norms: Tensor,
    grad_loss: Tensor | None,
    grad_y: Tensor | None = None,
    scale: Tensor | None = None,
    n_groups: int = 1,
) -> Tensor:
    """Launch the backward kernel; returns dL/dx with xv's strides and dtype."""
    _, n, hw, c, s_n, s_hw, s_c, grp_imgs = _rows_view(xv, n_groups)
    dev = xv.device
    if grad_loss is None:
        g = torch.zeros(n_groups, device=dev, dtype=torch.float32)
    else:
        g = grad_loss.detach().reshape(n_groups).to(device=dev, dtype=torch.float32).contiguous()
    if grad_y is not None and grad_y.stride() != xv.stride():
        # e.g. the expanded (stride-0) grad of y.sum(), or another memory format.
        fmt = torch.contiguous_format if xv.is_contiguous() else torch.channels_last
        grad_y = grad_y.contiguous(memory_format=fmt)
        if grad_y.stride() != xv.stride():
            grad_y = torch.empty_like(xv).copy_(grad_y)
    dx = torch.empty_like(xv)
    block_hw, block_c = _tile_shape(hw, c, s_c)
    hw_blocks = triton.cdiv(hw, block_hw)
    grid = (n * hw_blocks, triton.cdiv(c, block_c))
    _bn_matching_bwd_kernel[grid](
        xv,
        dx,
        grad_y if grad_y is not None else xv,
        scale if scale is not None else mean,
        mean,
        var,
        running_mean,
        running_var,
        norms,
        g,
        c,
        hw,
        s_n,
        s_hw,
        s_c,
        hw_blocks,
        1.0 / float(grp_imgs * hw),
        grp_imgs,
        BLOCK_HW=block_hw,
        BLOCK_C=block_c,
        HAS_DY=grad_y is not None,
        num_warps=_num_warps(block_hw, block_c),
    )
    return dx


def _prep_stats(x: Tensor, running_mean: Tensor, running_var: Tensor) -> tuple[Tensor, Tensor]:
    if x.dim() != 4:
        raise ValueError(f"expected a 4-D [N, C, H, W] tensor, got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"triton BN-matching supports fp32/fp16/bf16 inputs, got {x.dtype}")
    _check_stats_shape(running_mean, running_var, x.shape[1])
    rm = running_mean.detach().to(device=x.device, dtype=torch.float32).contiguous()
    rv = running_var.detach().to(device=x.device, dtype=torch.float32).contiguous()
    return rm, rv


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------


class BNMatchingLossFunction(torch.autograd.Function):
    """(x, running_mean, running_var, groups) -> (loss, mean, var).

    ``loss`` is the differentiable fp32 scalar ([G] with groups > 1); ``mean``/``var`` ([C] fp32,
    [G, C] with groups > 1, saved for backward) are returned too and marked non-differentiable.
    Running statistics get no gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, running_mean: Tensor, running_var: Tensor, groups: int = 1):
        rm, rv = _prep_stats(x, running_mean, running_var)
        xv, mean, var, norms, _ = _stats_forward(x, rm, rv, n_groups=groups)
        ctx.save_for_backward(xv, mean, var, rm, rv, norms)
        ctx.groups = groups
        if groups == 1:
            mean, var = mean[0], var[0]
        ctx.mark_non_differentiable(mean, var)
        return _group_losses(norms), mean, var

    @staticmethod
    def backward(ctx, grad_loss, _grad_mean, _grad_var):
        xv, mean, var, rm, rv, norms = ctx.saved_tensors
        dx = _matching_backward(xv, mean, var, rm, rv, norms, grad_loss, n_groups=ctx.groups)
        return dx, None, None, None


def _group_losses(norms: Tensor) -> Tensor:
    """The loss column of norms [G, 3]: 0-d for one group (the ungrouped API), else [G]."""
    return norms[0, 0].clone() if norms.shape[0] == 1 else norms[:, 0].clone()


class FusedBNMatchingFunction(torch.autograd.Function):
    """(x, running_mean, running_var, scale, bias) -> (y, loss) from one read of x.

    ``y = (x - running_mean) * scale + bias`` is eval-mode BatchNorm with
    ``scale = weight * rsqrt(running_var + eps)``; ``loss`` is the BN-matching loss of x.
    The backward writes ``dy * scale + dL/dx`` in one pass. BN parameters get no gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, running_mean: Tensor, running_var: Tensor, scale: Tensor, bias: Tensor,
                groups: int = 1):
        rm, rv = _prep_stats(x, running_mean, running_var)
        scale = scale.detach().to(device=x.device, dtype=torch.float32).contiguous()
        bias = bias.detach().to(device=x.device, dtype=torch.float32).contiguous()
        xv, mean, var, norms, y = _stats_forward(x, rm, rv, bn_affine=(scale, bias), n_groups=groups)
        ctx.save_for_backward(xv, mean, var, rm, rv, norms, scale)
        ctx.groups = groups
        return y, _group_losses(norms)

    @staticmethod
    def backward(ctx, grad_y, grad_loss):
        xv, mean, var, rm, rv, norms, scale = ctx.saved_tensors
        dx = _matching_backward(xv, mean, var, rm, rv, norms, grad_loss, grad_y=grad_y, scale=scale,
                                n_groups=ctx.groups)
        return dx, None, None, None, None, None


def bn_matching_triton(x: Tensor, running_mean: Tensor, running_var: Tensor,
                       groups: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    """Triton BN-matching: returns (loss, mean, var); only ``loss`` carries a gradient."""
    return BNMatchingLossFunction.apply(x, running_mean, running_var, groups)


def bn_matching_loss_triton(x: Tensor, running_mean: Tensor, running_var: Tensor, groups: int = 1) -> Tensor:
    """Triton BN-matching loss (fp32 scalar, [G] with groups > 1), differentiable w.r.t. x."""
    return BNMatchingLossFunction.apply(x, running_mean, running_var, groups)[0]


def fused_bn_matching_triton(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm output and BN-matching loss of x from one Triton pass: (y, loss), the loss
    [G] with groups > 1."""
    with torch.no_grad():
        scale = torch.rsqrt(running_var.detach().float() + eps)
        if weight is not None:
            scale = scale * weight.detach().float()
        shift = bias.detach().float() if bias is not None else torch.zeros_like(scale)
    return FusedBNMatchingFunction.apply(x, running_mean, running_var, scale, shift, groups)
