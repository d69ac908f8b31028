"""Linear probe: a frozen, eval-mode backbone and one trainable linear layer on pooled features.

The backbone runs in eval mode under no_grad, so BN running statistics (the quantity SC-DD
matches during recovery) are never touched. ``mode=finetune`` instead trains backbone and layer
together (train mode: BN running statistics follow the labelled views; the backbone's lr is the
layer's times ``backbone_lr_scale``), so the teacher recovery matches is the fine-tuned one. Two
ways to feed the layer (``views``; finetune needs augmented, as fixed features cannot move the backbone):
  augmented: every epoch, random-resized-crop + flip views of the training images (MoCo's lincls, which
    SC-DD's probe follows) go through the frozen backbone; the crops come from the squeeze stage's
    batched view code (engine.squeeze.augment), so they are cut as the pretraining views are.
  features: no augmentation, so features are computed once for the train split and the linear layer
    trains on those tensors: 100 probe epochs cost about one forward pass (small built-in data).
Optionally features are standardized with train-split mean/std (MAE's probe does the same with
an affine-free BatchNorm); that affine map is folded into ``model.fc`` afterwards, so the saved
classifier works on raw features and ``model(x)`` gives the reported accuracy.
"""
from __future__ import annotations

import time
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm import tqdm

from engine.models import ClassifierNet
from engine.data.views import at_epoch
from engine.squeeze.augment import AugmentSpec, augment_batch
from engine.squeeze.pretrain import batch_views, crop_source
from engine.training.batches import batches_of, load_batches
from engine.training.metrics import evaluate_accuracy
from engine.training.precision import autocast, optimizer_options, to_device
from engine.training.schedule import cosine_lr
from engine.training.tb_logger import NULL_LOGGER, MetricsLogger


@torch.no_grad()
def extract_features(model: ClassifierNet, dataset: Dataset, normalize: Callable[[torch.Tensor], torch.Tensor],
                     device: torch.device, batch_size: int = 512, workers: int = 0,
                     head: bool = False, loader=None, precision: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (or logits with ``head``) [N, D] and labels [N], in dataset order, eval mode.

    ``loader``: an engine.loaders BatchLoader (eval transform, no shuffle, normalized) read
    instead of ``dataset`` (loader=ffcv|dali); ``normalize`` is then the loader's. ``precision`` bf16:
    the forward under autocast; features come back fp32.
    """
    was_training = model.training
    model.eval()
    feats, labels = [], []
    if loader is None:
        batches = load_batches(dataset, batches_of(range(len(dataset)), batch_size), workers)
    else:
        batches = loader
    for images, y in batches:
        images = to_device(images, device)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if loader is None:
            x = normalize(x)
        with autocast(precision, device):
            out = model(x) if head else model.features(x)
        feats.append(out.float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels).long()


def step_or_cosine_lr(epoch: int, epochs: int, base_lr: float, schedule: str,
                      milestones: tuple[float, ...]) -> float:
    if schedule == "cosine":
        return cosine_lr(epoch, epochs, base_lr)
    return base_lr * 0.1 ** sum(epoch >= round(m * epochs) for m in milestones)


PROBE_VIEWS = ("augmented", "features")
PROBE_MODES = ("linear", "finetune")


def linear_probe(model: ClassifierNet, train: Dataset, test: Dataset,
                 normalize: Callable[[torch.Tensor], torch.Tensor], *, epochs: int, batch_size: int,
                 lr: float, momentum: float, weight_decay: float, schedule: str,
                 milestones: tuple[float, ...], standardize: bool, device: torch.device,
                 generator: torch.Generator, workers: int = 0, progress: bool = True,
                 loaders=None, views: str = "features", augment: Optional[AugmentSpec] = None,
                 precision: str = "fp32", logger: MetricsLogger = NULL_LOGGER, mode: str = "linear",
                 backbone_lr_scale: float = 0.01) -> tuple[list[dict], dict]:
    """Fit ``model.fc`` on frozen features; returns (per-epoch rows, final metrics).

    ``mode`` linear: the backbone is left in eval mode with requires_grad unchanged; only ``model.fc``
    is written. finetune (needs views=augmented): the backbone trains too, in train mode (its BN
    running statistics update), by SGD at ``lr * backbone_lr_scale`` on the same schedule; it is left
    in eval mode with requires_grad as it was.
    ``views``: augmented (``augment``'s crop + flip views of ``train`` each epoch; standardize must be
    off) | features (precomputed, unaugmented). ``loaders``: optional {"train": BatchLoader, "test":
    BatchLoader} (normalized eval batches) that replace ``train``/``test`` for feature extraction
    (loader=ffcv|dali; augmented views read ``train`` itself). ``precision`` bf16 runs the frozen
    backbone under autocast; the linear layer, its SGD and loss stay fp32. ``logger`` gets each epoch's
    loss, lr, train top-1 and images/s, and the test top-1 at the end.
    """
    if views not in PROBE_VIEWS or (views == "augmented" and (augment is None or standardize)):
        raise ValueError(f"probe views={views!r} must be one of {PROBE_VIEWS}; augmented needs an AugmentSpec "
                         f"and no standardization")
    if mode not in PROBE_MODES or (mode == "finetune" and views != "augmented") or backbone_lr_scale < 0:
        raise ValueError(f"probe mode={mode!r} must be one of {PROBE_MODES}; finetune needs views=augmented; "
                         f"backbone_lr_scale={backbone_lr_scale} must be >= 0")
    finetune = mode == "finetune"
    loaders = loaders or {}
    started = time.perf_counter()
    model.to(device).eval()
    num_classes = model.fc.out_features
    if views == "features":
        train_x, train_y = extract_features(model, train, normalize, device, workers=workers,
                                            loader=loaders.get("train"), precision=precision)
        dim, where = train_x.shape[1], torch.device("cpu")
    else:
        dim, where = model.feature_dim, device
    feature_seconds = time.perf_counter() - started if views == "features" else 0.0
    mean = train_x.mean(0) if standardize else torch.zeros(dim)
    std = train_x.std(0).clamp_min(1e-6) if standardize else torch.ones(dim)
    # MoCo's lincls init: weights N(0, 0.01), bias 0.
    weight = (torch.randn(num_classes, dim, generator=generator) * 0.01).to(where).requires_grad_(True)
    bias = torch.zeros(num_classes, device=where, requires_grad=True)
    groups = [{"params": [weight, bias], "scale": 1.0}]
    backbone = [q for name, q in model.named_parameters() if not name.startswith("fc.")]
    requires_grad = [q.requires_grad for q in backbone]
    if finetune:
        for q in backbone:
            q.requires_grad_(True)
        groups.append({"params": backbone, "scale": backbone_lr_scale})
    optimizer = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay,
                                **optimizer_options(where))
    rows = []
    bar = tqdm(range(epochs), desc="probe", disable=not progress, leave=False)
    for epoch in bar:
        epoch_lr = step_or_cosine_lr(epoch, epochs, lr, schedule, milestones)
        for group in optimizer.param_groups:
            group["lr"] = epoch_lr * group["scale"]
        if views == "features":
            batches = _feature_batches((train_x - mean) / std, train_y, batch_size, generator)
        else:
            batches = _view_batches(train, normalize, augment, batch_size, device, generator, workers, epoch)
        model.train(finetune)
        total, correct, count = 0.0, 0, 0
        epoch_started = time.perf_counter()
        for z, y in batches:
            if views == "augmented":
                with torch.set_grad_enabled(finetune), autocast(precision, device):
                    z = model.features(z)
                z = z.float()
            logits = F.linear(z, weight, bias)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            count += len(y)
        rows.append({"epoch": epoch + 1, "loss": total / count, "lr": epoch_lr, "train_top1": correct / count})
        logger.scalars({"train/loss": rows[-1]["loss"], "train/lr": epoch_lr, "train/top1": rows[-1]["train_top1"],
                        "train/images_per_s": count / max(time.perf_counter() - epoch_started, 1e-9)}, epoch + 1)
        bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", lr=f"{epoch_lr:.4g}")
    model.eval()
    for q, flag in zip(backbone, requires_grad):
        q.requires_grad_(flag)
    with torch.no_grad():
        folded = weight.cpu() / std  # fc(x) = W ((x - mean) / std) + b
        model.fc.weight.copy_(folded.to(model.fc.weight))
        model.fc.bias.copy_((bias.cpu() - folded @ mean).to(model.fc.bias))
    test_top1 = evaluate_top1(model, test, normalize, device, workers=workers, loader=loaders.get("test"))
    logger.scalars({"test/top1": test_top1}, epochs)
    logger.flush()
    final = {"probe_top1": test_top1, "probe_train_top1": rows[-1]["train_top1"] if rows else None,
             "probe_seconds": time.perf_counter() - started, "probe_feature_seconds": feature_seconds,
             "probe_views": views, "probe_mode": mode}
    return rows, final


def _feature_batches(z: torch.Tensor, labels: torch.Tensor, batch_size: int,
                     generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = torch.randperm(len(z), generator=generator)
    for start in range(0, len(z), batch_size):
        index = order[start:start + batch_size]
        yield z[index], labels[index]


def _view_batches(train: Dataset, normalize: Callable[[torch.Tensor], torch.Tensor],
                  spec: AugmentSpec, batch_size: int, device: torch.device, generator: torch.Generator,
                  workers: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (fresh normalized augmented views, labels), on ``device``; the caller runs the
    backbone. An image-folder tree is cropped from its full-resolution files, as pretraining's views are."""
    order = torch.randperm(len(train), generator=generator)
    crops = crop_source(train, spec, 1, generator.initial_seed())
    source = train if crops is None else at_epoch(crops, epoch)
    for images, labels in load_batches(source, batches_of(order, batch_size), workers):
        if crops is None:
            views = normalize(augment_batch(to_device(images, device), spec, generator))
        else:
            views = batch_views(images, 1, spec, generator, normalize, device)[0]
        yield views, to_device(labels.long(), device)


def evaluate_top1(model: ClassifierNet, dataset: Dataset, normalize: Callable[[torch.Tensor], torch.Tensor],
                  device: torch.device, workers: int = 0, loader=None) -> float:
    """Top-1 of ``model`` (eval mode, no augmentation) on a split, as a fraction: the same measure
    the evaluate stage reports for students, so teacher and student rows are comparable."""
    return evaluate_accuracy(model, dataset, normalize, device, workers=workers, loader=loader)[0]
