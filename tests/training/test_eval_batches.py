"""The test pass and the batch paths a student trains on: evaluate_accuracy counts what a plain forward of
the whole split counts (top-1, and top-5 past 10 classes), in fp32 exactly and under bf16 within a few
images; a set held on the device (DeviceImages) hands out the batches the host set hands out, and only
small in-memory sets go to a CUDA device."""
import numpy as np
import pytest
import torch

from engine.data import DataConfig, build_data
from engine.training.batches import DeviceImages, batches_of, load_batches, on_device, to_unit_float
from engine.training.metrics import evaluate_accuracy
from engine.models import build_model
from teachers import SMALL_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def _plain_counts(model, dataset, normalize, classes_for_top5):
    x = normalize(to_unit_float(dataset.images))
    labels = torch.as_tensor(dataset.labels)
    with torch.no_grad():
        logits = model.eval()(x)[:, :classes_for_top5]
    top1 = int((logits.argmax(1) == labels).sum()) / len(labels)
    top5 = int((logits.topk(5, dim=1).indices == labels[:, None]).any(1).sum()) / len(labels)
    return top1, top5


def test_top1_is_a_plain_forward_of_the_split_in_any_batching():
    bundle = build_data(DataConfig(name="digits"))
    torch.manual_seed(0)
    model = build_model(SMALL_MODEL, 10, 1, 8)
    expected, _ = _plain_counts(model, bundle.test, bundle.normalize, 10)
    for batch in (7, 32, 1000):
        top1, top5 = evaluate_accuracy(model, bundle.test, bundle.normalize, CPU, batch_size=batch)
        assert top1 == pytest.approx(expected, abs=1e-12) and top5 is None
    # bf16 autocast and NHWC (a student's own precision and layout): argmax flips only near ties
    model.to(memory_format=torch.channels_last)
    top1, _ = evaluate_accuracy(model, bundle.test, bundle.normalize, CPU, precision="bf16", channels_last=True)
    assert abs(top1 - expected) * len(bundle.test) <= 10


def test_top5_counts_past_ten_classes():
    bundle = build_data(DataConfig(name="digits"))
    torch.manual_seed(1)
    model = build_model(SMALL_MODEL, 12, 1, 8)  # 12 logits: top-5 is reported
    top1, top5 = evaluate_accuracy(model, bundle.test, bundle.normalize, CPU, batch_size=50)
    expected = _plain_counts(model, bundle.test, bundle.normalize, 12)
    assert (top1, top5) == pytest.approx(expected, abs=1e-12)
    assert top5 > top1


def test_a_set_held_on_a_device_gives_the_host_sets_batches():
    train = build_data(DataConfig(name="digits")).train
    held = DeviceImages(train.images, train.labels, CPU)  # the CUDA placement is checked in tests/gpu
    order = np.random.default_rng(0).permutation(len(train))
    for (x, y), (hx, hy) in zip(load_batches(train, batches_of(order, 33)), load_batches(held, batches_of(order, 33))):
        assert torch.equal(x, hx) and torch.equal(torch.as_tensor(y), hy)
    image, label = held[5]
    assert torch.equal(image, train[5][0]) and label == train[5][1]
    # only a CUDA device holds sets; too large a set, or one that crops itself, stays where it is
    assert on_device(train, CPU) is train
    assert on_device(train, torch.device("meta")) is train
    assert on_device(None, CPU) is None
