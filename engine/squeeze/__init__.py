"""Squeeze: pretrain the teachers SC-DD recovers images from, and measure their BN statistics.

Modules: losses (pure SSL losses), augment (batched two-view augmentation + AugmentSpec),
ssl (MoCo v2 / SimCLR / supervised objectives, registry METHODS), pretrain (epoch loop, resume),
probe (frozen eval-mode linear probe), bn_stats (BN running-variance summaries and plot),
stage (`scdd stage=squeeze`: config -> dataclasses -> calls).

Choices worth knowing:
- Flip is off for 1-channel data by default (squeeze.flip=null): a mirrored digit is another glyph.
- The probe needs no augmentation, so features of the frozen eval-mode backbone are computed once;
  standardization of those features is folded into the saved fc.
- One device has no cross-GPU shuffle-BN, so MoCo forwards keys in shuffled sub-batches.
- Training runs channels_last (faster oneDNN/cuDNN kernels); weights are saved in the default layout.
- Several processes (torchrun/srun) train with trainer=ddp|deepspeed: each rank takes its share of
  every global batch; BN buffers are averaged into the teacher; rank 0 probes and writes files.
- loader=ffcv|dali (the loader= group) decode pretraining views (crop+flip) and the probe's splits;
  the photometric steps stay in augment.augment_color. loader=torch keeps in-process batches.
"""
