"""Student losses: soft-label KL with temperature, and CutMix-mixed hard-label cross-entropy."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_label_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(t/T) || softmax(s/T)), mean over the batch.

    Shapes: both [B, K]. Teacher logits are the teacher's (online) or the stored labels' reconstruction
    (engine.artifacts.soft_labels: same target at this T); a -inf logit is a class of zero probability
    and contributes nothing. No T^2 factor, as in SRe2L/SC-DD's ImageNet scripts.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    target = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_student, target, reduction="batchmean")


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, partner_labels: torch.Tensor,
                        lam, rest=None) -> torch.Tensor:
    """CutMix/MixUp hard-label loss: lam * CE(y) + (1 - lam) * CE(y of the mixed-in image). ``lam`` a float or
    a 0-d tensor on the device; ``rest``: 1 - lam as given (``param_tensors`` rounds both from float64), else
    computed. With lam 1 and the image itself as partner it is exactly CE(y)."""
    rest = 1 - lam if rest is None else rest
    return lam * F.cross_entropy(logits, labels) + rest * F.cross_entropy(logits, partner_labels)
