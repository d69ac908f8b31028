"""Triton BN-matching loss: one read of ``x`` forward, one read of ``x`` backward.

Semantics are those of ``kernels.bn_matching_reference`` (the tests hold this file to it).

Layout. A BN input [N, C, H, W] is addressed as a 3-D view [N, HW, C] with strides
(stride_n, stride_hw, stride_c): NCHW-contiguous gives (C*HW, 1, HW); channels_last gives
(HW*C, C, 1) and is then flattened to one "image" of N*HW rows [1, N*HW, C]. Any other strides
are made contiguous first. Kernels only ever see that view, so both memory formats share code.

Groups. With ``groups`` = G the N images are G independent class-batches of N/G: every statistic,
norm and loss is per (group, channel) / per group, in the same launches (tickets, merge and loss
are per group). In the view a group is
``grp_imgs`` consecutive view-images: N/G for NCHW, and for channels_last the view folds each
group's images into one view-image [G, (N/G)*HW, C]. Pivots are per group (its first pixel).

Forward: one launch, ``_bn_matching_fwd_kernel``, grid (row groups, channel blocks).
  A program walks ``tiles_per_group`` tiles [BLOCK_HW, BLOCK_C] of one image, computes each tile's
  corrected two-pass (mean, M2) in registers and folds it into its running (n, mean, M2) with Chan's
  pairwise formula. Everything is computed on x - x[first image of the group, c, 0, 0] (a per-channel
  pivot) and deviations are taken from tile means before squaring: this is what keeps a 1e3-mean,
  1e-2-std channel's variance accurate in fp32 (E[x^2]-E[x]^2 would lose it entirely). With
  ``WRITE_Y`` it also writes the eval-mode BN output from the same loaded tile (the BN scale
  w / sqrt(rv + eps) is computed in the kernel, not by host-side ops).
  The program then draws a ticket for its (group, channel block); the one with the last ticket merges
  that block's partials (multi-way Chan within a chunk of BLOCK_T, pairwise across chunks) into the
  group's mean and variance, then draws a ticket for its group: the last merger of a group reduces
  over C into the two norms and the loss. On a GPU a step pays a fixed cost per launch, so this
  replaces the separate merge and loss launches of a layer (tickets: ``_tickets``).
Backward: one launch.
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
def _chan_rows(acc_n, acc_mean, acc_m2):
    """Multi-way Chan merge over axis 0 of per-slot (n, mean, M2) [R, BLOCK_C] -> (n, mean, M2) [BLOCK_C].

    Deviations are taken from the merged mean and corrected by their own weighted sum (as in the
    corrected two-pass formula), so nothing is squared at the magnitude of the data."""
    tot_n = tl.sum(acc_n, axis=0)
    inv_n = 1.0 / tl.maximum(tot_n, 1.0)
    tot_mean = tl.sum(acc_n * acc_mean, axis=0) * inv_n
    dev = tl.where(acc_n > 0.0, acc_mean - tot_mean[None, :], 0.0)
    wdev_sum = tl.sum(acc_n * dev, axis=0)
    tot_mean = tot_mean + wdev_sum * inv_n
    tot_m2 = tl.sum(acc_m2, axis=0) + tl.maximum(tl.sum(acc_n * dev * dev, axis=0) - wdev_sum * wdev_sum * inv_n, 0.0)
    return tot_n, tot_mean, tot_m2


@triton.jit
def _merge_partials(
    PMEAN_ptr,  # [P, C] fp32 partial means of x - pivot of one batch group (already offset to it)
    PM2_ptr,  # [P, C] fp32 partial sums of squared deviations
    c_offs,
    c_mask,
    C,
    P,  # partials of the batch group
    HW,
    row_groups,
    group_hw,  # rows covered by one full row group (tiles_per_group * BLOCK_HW)
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """(n, mean, M2) [BLOCK_C] of a batch group's channels from its P row-group partials.

    BLOCK_T slots per channel each fold every BLOCK_T-th partial in (pairwise Chan, elementwise: no
    reduction inside the loop, which one program runs serially); one multi-way merge at the end."""
    acc_n = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    acc_mean = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    acc_m2 = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for t0 in range(0, P, BLOCK_T):
        t_offs = t0 + tl.arange(0, BLOCK_T)
        t_mask = t_offs < P
        # Row count of a partial follows from its index, so it is not stored.
        rows_left = HW - (t_offs % row_groups) * group_hw
        cnt = tl.minimum(tl.maximum(rows_left, 0), group_hw).to(tl.float32)
        cnt = tl.where(t_mask, cnt, 0.0)[:, None]
        mask = t_mask[:, None] & c_mask[None, :]
        p_offs = t_offs[:, None].to(tl.int64) * C + c_offs[None, :]
        # .cg: read from L2, where the other programs' partials are (they are never in this SM's L1).
        pmean = tl.load(PMEAN_ptr + p_offs, mask=mask, other=0.0, cache_modifier=".cg")
        pm2 = tl.load(PM2_ptr + p_offs, mask=mask, other=0.0, cache_modifier=".cg")
        new_n = acc_n + cnt
        delta = pmean - acc_mean
        frac = cnt / tl.maximum(new_n, 1.0)
        acc_mean = acc_mean + delta * frac
        acc_m2 = acc_m2 + pm2 + delta * delta * acc_n * frac
        acc_n = new_n
    return _chan_rows(acc_n, acc_mean, acc_m2)


@triton.jit
def _group_loss(
    MEAN_ptr,  # [C] fp32 batch mean of one group
    VAR_ptr,  # [C] fp32 batch variance of one group
    RM_ptr,
    RV_ptr,
    C,
    BLOCK_L: tl.constexpr,
):
    """(||rm - mean||, ||rv - var||) of one group."""
    sq_m = tl.zeros([BLOCK_L], dtype=tl.float32)
    sq_v = tl.zeros([BLOCK_L], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_L):
        c_offs = c0 + tl.arange(0, BLOCK_L)
        c_mask = c_offs < C
        mean = tl.load(MEAN_ptr + c_offs, mask=c_mask, other=0.0, cache_modifier=".cg")
        var = tl.load(VAR_ptr + c_offs, mask=c_mask, other=0.0, cache_modifier=".cg")
        dm = tl.load(RM_ptr + c_offs, mask=c_mask, other=0.0) - mean
        dv = tl.load(RV_ptr + c_offs, mask=c_mask, other=0.0) - var
        sq_m += dm * dm
        sq_v += dv * dv
    return tl.sqrt(tl.sum(sq_m, axis=0)), tl.sqrt(tl.sum(sq_v, axis=0))


@triton.jit
def _bn_matching_fwd_kernel(
    X_ptr,  # [N, HW, C] view of the input via (stride_xn, stride_xhw, stride_xc); fp32/fp16/bf16
    Y_ptr,  # [N, HW, C] view of the BN output, same strides as X (only written when WRITE_Y)
    RM_ptr,  # [C] fp32 running mean
    RV_ptr,  # [C] fp32 running variance
    W_ptr,  # [C] BN weight (only read when WRITE_Y and HAS_W)
    B_ptr,  # [C] BN bias (only read when WRITE_Y and HAS_B)
    PMEAN_ptr,  # [T, C] fp32 scratch: mean of x - pivot over each row group, T = N * row_groups
    PM2_ptr,  # [T, C] fp32 scratch: sum of squared deviations of each row group
    MEAN_ptr,  # [G, C] fp32 out: batch mean of each group
    VAR_ptr,  # [G, C] fp32 out: biased batch variance of each group
    NORMS_ptr,  # [G, 2] fp32 out: (||rm - mean||, ||rv - var||) of each group
    LOSS_ptr,  # [G] fp32 out: the sum of the two norms
    CNT_ptr,  # int32 tickets, zero on entry and left zero: [G, c_blocks] then [G]
    C,
    HW,
    stride_xn,
    stride_xhw,
    stride_xc,
    row_groups,  # row groups per image
    tiles_per_group,  # BLOCK_HW tiles walked by one program
    grp_imgs,  # view-images per batch group
    n_groups,
    eps,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_L: tl.constexpr,
    WRITE_Y: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    c_blocks = tl.num_programs(1)
    n = pid_t // row_groups
    g = pid_t % row_groups
    grp = n // grp_imgs

    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    base = n.to(tl.int64) * stride_xn
    c_part = c_offs[None, :].to(tl.int64) * stride_xc
    if WRITE_Y:
        # Eval-mode BN folded to y = (x - rm) * scale + bias, scale = w / sqrt(rv + eps); computed here so
        # that a layer's forward is this one launch.
        rm = tl.load(RM_ptr + c_offs, mask=c_mask, other=0.0)
        scale = 1.0 / tl.sqrt(tl.load(RV_ptr + c_offs, mask=c_mask, other=1.0) + eps)
        if HAS_W:
            scale = scale * tl.load(W_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
        if HAS_B:
            bias = tl.load(B_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
        else:
            bias = tl.zeros([BLOCK_C], dtype=tl.float32)

    # Statistics are of x - pivot_c, pivot_c = x[first image of the group, c, 0, 0]: partial means
    # near 0 keep full fp32 relative precision even when the channel mean is large (1e3 + 1e-2 noise).
    pivot_base = grp.to(tl.int64) * grp_imgs * stride_xn
    pivot = tl.load(X_ptr + pivot_base + c_offs.to(tl.int64) * stride_xc, mask=c_mask, other=0.0).to(tl.float32)
    # Welford per [row, channel] slot across this program's tiles (elementwise: no reduction inside
    # the loop), then one multi-way Chan merge of the slots.
    acc_n = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    acc_mean = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    acc_m2 = tl.zeros([BLOCK_HW, BLOCK_C], dtype=tl.float32)
    hw_first = g * tiles_per_group * BLOCK_HW
    for i in range(0, tiles_per_group):
        hw_offs = hw_first + i * BLOCK_HW + tl.arange(0, BLOCK_HW)
        hw_mask = hw_offs < HW
        mask = hw_mask[:, None] & c_mask[None, :]
        offs = base + hw_offs[:, None].to(tl.int64) * stride_xhw + c_part
        # bf16/fp16 are only loaded in their dtype; every arithmetic op runs in fp32.
        x = tl.load(X_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xs = x - pivot[None, :]
        new_n = acc_n + mask.to(tl.float32)
        delta = tl.where(mask, xs - acc_mean, 0.0)
        acc_mean = acc_mean + delta / tl.maximum(new_n, 1.0)
        acc_m2 = acc_m2 + delta * tl.where(mask, xs - acc_mean, 0.0)
        acc_n = new_n

        if WRITE_Y:
            y = (x - rm[None, :]) * scale[None, :] + bias[None, :]
            tl.store(Y_ptr + offs, y.to(Y_ptr.dtype.element_ty), mask=mask)
    _, acc_mean, acc_m2 = _chan_rows(acc_n, acc_mean, acc_m2)

    tl.store(PMEAN_ptr + pid_t.to(tl.int64) * C + c_offs, acc_mean, mask=c_mask)
    tl.store(PM2_ptr + pid_t.to(tl.int64) * C + c_offs, acc_m2, mask=c_mask)

    # The last program of a (group, channel block) to finish merges its partials; the last merger of a
    # group computes the group's loss. Tickets replace the merge and loss launches (the "last block"
    # reduction): the barrier puts every thread's stores before the ticket, whose acq_rel atomic makes
    # them visible to the program that draws the last ticket.
    partials = grp_imgs * row_groups
    tl.debug_barrier()
    ticket = tl.atomic_add(CNT_ptr + grp * c_blocks + pid_c, 1, sem="acq_rel")
    if ticket == partials - 1:
        tot_n, tot_mean, tot_m2 = _merge_partials(
            PMEAN_ptr + grp.to(tl.int64) * partials * C, PM2_ptr + grp.to(tl.int64) * partials * C,
            c_offs, c_mask, C, partials, HW, row_groups, tiles_per_group * BLOCK_HW, BLOCK_T, BLOCK_C)
        tl.store(MEAN_ptr + grp * C + c_offs, pivot + tot_mean, mask=c_mask)
        tl.store(VAR_ptr + grp * C + c_offs, tot_m2 / tl.maximum(tot_n, 1.0), mask=c_mask)
        tl.atomic_xchg(CNT_ptr + grp * c_blocks + pid_c, 0)  # ready for the next launch
        tl.debug_barrier()
        done = tl.atomic_add(CNT_ptr + n_groups * c_blocks + grp, 1, sem="acq_rel")
        if done == c_blocks - 1:
            norm_m, norm_v = _group_loss(MEAN_ptr + grp * C, VAR_ptr + grp * C, RM_ptr, RV_ptr, C, BLOCK_L)
            tl.store(NORMS_ptr + grp * 2, norm_m)
            tl.store(NORMS_ptr + grp * 2 + 1, norm_v)
            tl.store(LOSS_ptr + grp, norm_v + norm_m)
            tl.atomic_xchg(CNT_ptr + n_groups * c_blocks + grp, 0)


@triton.jit
def _bn_matching_bwd_kernel(
    X_ptr,  # [N, HW, C] view of the input via (stride_n, stride_hw, stride_c)
    DX_ptr,  # [N, HW, C] out: dL/dx, same strides as X, x's dtype
    DY_ptr,  # [N, HW, C] upstream grad of the BN output, same strides (only read when HAS_DY)
    W_ptr,  # [C] BN weight (only read when HAS_DY and HAS_W)
    MEAN_ptr,  # [G, C] fp32 batch mean of each group
    VAR_ptr,  # [G, C] fp32 batch variance of each group
    RM_ptr,  # [C] fp32 running mean
    RV_ptr,  # [C] fp32 running variance
    NORMS_ptr,  # [G, 2] fp32 (||rm - mean||, ||rv - var||) from the forward
    GLOSS_ptr,  # [G] upstream grad of each group's loss, element stride gloss_stride (0: broadcast)
    C,
    HW,
    stride_n,
    stride_hw,
    stride_c,
    hw_blocks,
    inv_count,  # 1 / (images per group * H*W)
    grp_imgs,  # view-images per batch group
    gloss_stride,
    eps,
    BLOCK_HW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    HAS_DY: tl.constexpr,
    HAS_W: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = pid_t // hw_blocks
    b = pid_t % hw_blocks
    grp = n // grp_imgs
    MEAN_ptr += grp * C
    VAR_ptr += grp * C
    NORMS_ptr += grp * 2
    GLOSS_ptr += grp * gloss_stride

    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    mean = tl.load(MEAN_ptr + c_offs, mask=c_mask, other=0.0)
    var = tl.load(VAR_ptr + c_offs, mask=c_mask, other=0.0)
    rm = tl.load(RM_ptr + c_offs, mask=c_mask, other=0.0)
    rv = tl.load(RV_ptr + c_offs, mask=c_mask, other=0.0)
    norm_m = tl.load(NORMS_ptr)
    norm_v = tl.load(NORMS_ptr + 1)
    g = tl.load(GLOSS_ptr).to(tl.float32)
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
        scale = 1.0 / tl.sqrt(rv + eps)  # as in the forward kernel
        if HAS_W:
            scale = scale * tl.load(W_ptr + c_offs, mask=c_mask, other=0.0).to(tl.float32)
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
_MERGE_BLOCK_T = 64  # slots of the last program's merge: row-group partials folded in per loop step


def _np2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


@functools.lru_cache(maxsize=None)
def _target_programs(device_type: str, device_index: int | None) -> int:
    """Programs worth launching for the stats pass: 4 per SM on a GPU (more programs mean more partials for the
    last program of a channel block to merge alone), few under the interpreter."""
    if device_type == "cuda":
        return 4 * torch.cuda.get_device_properties(device_index).multi_processor_count
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


_TICKETS: dict[tuple[str, int | None], Tensor] = {}


def _tickets(device: torch.device, count: int) -> Tensor:
    """Zeroed int32 ticket counters for the forward kernel on ``device`` (at least ``count``).

    Kept per device, not per call: every launch leaves its tickets at zero again, so no launch has to
    clear them (which would be a second launch per layer). Launches sharing them run in stream order,
    as recover's do; two BN-matching forwards running concurrently on two streams of one device would
    need buffers of their own.
    """
    key = (device.type, device.index)
    buf = _TICKETS.get(key)
    if buf is None or buf.numel() < count:
        buf = torch.zeros(max(count, 4096), device=device, dtype=torch.int32)
        _TICKETS[key] = buf
    return buf


def _stats_forward(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    bn_affine: tuple[Tensor | None, Tensor | None, float] | None = None,
    n_groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The forward: one kernel launch. Returns (x_view_tensor, mean [G, C], var [G, C], norms [G, 2],
    loss ([G], or 0-d for one group), y or None).

    ``bn_affine`` = (weight, bias, eps) also writes the eval-mode BN output y.
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
    row_groups = triton.cdiv(hw_blocks, tiles_per_group)
    t = n * row_groups
    partials = t // n_groups

    pmean = torch.empty((t, c), device=dev, dtype=torch.float32)
    pm2 = torch.empty((t, c), device=dev, dtype=torch.float32)
    mean = torch.empty((n_groups, c), device=dev, dtype=torch.float32)
    var = torch.empty((n_groups, c), device=dev, dtype=torch.float32)
    norms = torch.empty((n_groups, 2), device=dev, dtype=torch.float32)
    loss = torch.empty((n_groups,) if n_groups > 1 else (), device=dev, dtype=torch.float32)
    tickets = _tickets(dev, n_groups * (c_blocks + 1))

    weight = bias = None
    eps = 0.0
    y = None
    if bn_affine is not None:
        weight, bias, eps = bn_affine
        y = torch.empty_like(xv)  # dense input: empty_like keeps its strides
    _bn_matching_fwd_kernel[(t, c_blocks)](
        xv,
        y if y is not None else xv,
        running_mean,
        running_var,
        weight if weight is not None else running_mean,  # placeholders are never dereferenced
        bias if bias is not None else running_mean,
        pmean,
        pm2,
        mean,
        var,
        norms,
        loss,
        tickets,
        c,
        hw,
        s_n,
        s_hw,
        s_c,
        row_groups,
        tiles_per_group,
        grp_imgs,
        n_groups,
        float(eps),
        BLOCK_HW=block_hw,
        BLOCK_C=block_c,
        BLOCK_T=max(min(_MERGE_BLOCK_T, _np2(partials), max(_TILE_ELEMS // block_c, 1)), 2),
        BLOCK_L=max(min(_np2(c), 1024), 2),
        WRITE_Y=y is not None,
        HAS_W=weight is not None,
        HAS_B=bias is not None,
        num_warps=_num_warps(block_hw, block_c),
    )
    return xv, mean, var, norms, loss, y


def _matching_backward(
    xv: Tensor,
    mean: Tensor,
    var: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    norms: Tensor,
    grad_loss: Tensor | None,
    grad_y: Tensor | None = None,
    bn_weight: tuple[Tensor | None, float] | None = None,
    n_groups: int = 1,
) -> Tensor:
    """The backward: one kernel launch; returns dL/dx with xv's strides and dtype.

    ``bn_weight`` = (weight, eps) of the BN whose output gradient ``grad_y`` is added."""
    _, n, hw, c, s_n, s_hw, s_c, grp_imgs = _rows_view(xv, n_groups)
    dev = xv.device
    if grad_loss is None:
        g, g_stride = torch.zeros(n_groups, device=dev, dtype=torch.float32), 1
    else:
        # Read in place: the expanded (stride-0) gradient of a sum is not copied.
        g = grad_loss.detach().reshape(n_groups)
        g_stride = g.stride(0)
    if grad_y is not None and grad_y.stride() != xv.stride():
        # e.g. the expanded (stride-0) grad of y.sum(), or another memory format.
        fmt = torch.contiguous_format if xv.is_contiguous() else torch.channels_last
        grad_y = grad_y.contiguous(memory_format=fmt)
        if grad_y.stride() != xv.stride():
            grad_y = torch.empty_like(xv).copy_(grad_y)
    weight, eps = bn_weight if bn_weight is not None else (None, 0.0)
    dx = torch.empty_like(xv)
    block_hw, block_c = _tile_shape(hw, c, s_c)
    hw_blocks = triton.cdiv(hw, block_hw)
    grid = (n * hw_blocks, triton.cdiv(c, block_c))
    _bn_matching_bwd_kernel[grid](
        xv,
        dx,
        grad_y if grad_y is not None else xv,
        weight if weight is not None else mean,
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
        g_stride,
        float(eps),
        BLOCK_HW=block_hw,
        BLOCK_C=block_c,
        HAS_DY=grad_y is not None,
        HAS_W=weight is not None,
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
        xv, mean, var, norms, loss, _ = _stats_forward(x, rm, rv, n_groups=groups)
        ctx.save_for_backward(xv, mean, var, rm, rv, norms)
        ctx.groups = groups
        if groups == 1:
            mean, var = mean[0], var[0]
        ctx.mark_non_differentiable(mean, var)
        return loss, mean, var

    @staticmethod
    def backward(ctx, grad_loss, _grad_mean, _grad_var):
        xv, mean, var, rm, rv, norms = ctx.saved_tensors
        dx = _matching_backward(xv, mean, var, rm, rv, norms, grad_loss, n_groups=ctx.groups)
        return dx, None, None, None


class FusedBNMatchingFunction(torch.autograd.Function):
    """(x, running_mean, running_var, weight, bias, eps) -> (y, loss) from one read of x, in one launch.

    ``y = (x - running_mean) * weight / sqrt(running_var + eps) + bias`` is eval-mode BatchNorm
    (weight/bias None: 1/0); ``loss`` is the BN-matching loss of x. The backward writes
    ``dy * weight / sqrt(running_var + eps) + dL/dx`` in one launch. BN parameters get no gradient.
    """

    @staticmethod
    def forward(ctx, x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None,
                bias: Tensor | None, eps: float, groups: int = 1):
        rm, rv = _prep_stats(x, running_mean, running_var)
        weight = _prep_affine(weight, x)
        bias = _prep_affine(bias, x)
        xv, mean, var, norms, loss, y = _stats_forward(x, rm, rv, bn_affine=(weight, bias, eps), n_groups=groups)
        ctx.save_for_backward(xv, mean, var, rm, rv, norms, weight)
        ctx.groups = groups
        ctx.eps = eps
        return y, loss

    @staticmethod
    def backward(ctx, grad_y, grad_loss):
        xv, mean, var, rm, rv, norms, weight = ctx.saved_tensors
        dx = _matching_backward(xv, mean, var, rm, rv, norms, grad_loss, grad_y=grad_y,
                                bn_weight=(weight, ctx.eps), n_groups=ctx.groups)
        return dx, None, None, None, None, None, None


def _prep_affine(param: Tensor | None, x: Tensor) -> Tensor | None:
    """A BN weight or bias as the kernels read it: detached, contiguous, on x's device (no copy when it is)."""
    return None if param is None else param.detach().to(device=x.device).contiguous()


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
    """Eval-mode BatchNorm output and BN-matching loss of x: (y, loss), the loss [G] with groups > 1.
    One kernel launch forward and one backward; nothing else runs on the device."""
    return FusedBNMatchingFunction.apply(x, running_mean, running_var, weight, bias, float(eps), groups)
