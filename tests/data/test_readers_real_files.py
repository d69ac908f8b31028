"""Image-folder and CIFAR readers on real images (foolbox's CIFAR/ImageNet samples)."""
import numpy as np
import pytest
import torch
from PIL import Image

from engine.data import DataConfig, build_data
from engine.errors import ConfigError
from realdata import foolbox_samples, make_imagefolder_tree, write_cifar_batches


def test_imagefolder_imagenet_layout(tmp_path):
    per_class = make_imagefolder_tree(tmp_path, "cifar10")
    bundle = build_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=32, channels=3,
                                   eval_crop_ratio=1.0))
    assert bundle.num_classes == len(per_class)
    assert bundle.class_names == sorted(per_class)
    assert len(bundle.train) == 20 and len(bundle.test) == 10
    x, y = bundle.train[0]
    assert x.shape == (3, 32, 32)
    # ratio 1 at the native size: the file's pixels (no resize); the default 0.875 is covered in
    # tests/data/test_full_resolution.py
    first = sorted(per_class)[0]
    expected = np.asarray(Image.open(per_class[first][0]).convert("RGB"), dtype=np.float32) / 255
    assert torch.allclose(x, torch.from_numpy(expected).permute(2, 0, 1), atol=1e-6)
    assert y == 0
    assert len(bundle.mean) == 3 and all(0 < s < 1 for s in bundle.std)


def test_imagefolder_tiny_layout_gray_and_resize(tmp_path):
    make_imagefolder_tree(tmp_path, "imagenet", layout="tiny")
    bundle = build_data(DataConfig(name="imagefolder", root=str(tmp_path), image_size=24, channels=1))
    assert len(bundle.test) == 10
    x, y = bundle.test[0]
    assert x.shape == (1, 24, 24)
    assert 0 <= y < bundle.num_classes
    # val labels come from val_annotations.txt and match the train class of the same image
    train_names = bundle.class_names
    assert all(0 <= label < len(train_names) for label in bundle.test.labels)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickle_batches(tmp_path, name):
    images, labels = write_cifar_batches(tmp_path, name)
    bundle = build_data(DataConfig(name=name, root=str(tmp_path)))
    assert bundle.num_classes == (10 if name == "cifar10" else 100)
    assert len(bundle.train) == 20 and len(bundle.test) == 6
    x, y = bundle.train[3]
    assert torch.allclose(x, torch.from_numpy(images[3]).permute(2, 0, 1).float() / 255)
    assert y == labels[3]


def test_imagefolder_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="needs data.root"):
        build_data(DataConfig(name="imagefolder"))
    with pytest.raises(ConfigError, match="does not exist"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "missing")))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no class folders"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path / "empty")))


def test_imagefolder_empty_class_folder(tmp_path):
    make_imagefolder_tree(tmp_path, "cifar10")
    (tmp_path / "train" / "c999").mkdir()
    with pytest.raises(ConfigError, match=r"c999.*hold no images"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_corrupt_image(tmp_path):
    per_class = make_imagefolder_tree(tmp_path, "cifar10")
    bad = per_class[sorted(per_class)[0]][0]
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ConfigError, match=f"{bad.name}.*corrupt"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_imagefolder_truncated_image_caught_by_full_verify(tmp_path):
    per_class = make_imagefolder_tree(tmp_path, "imagenet")
    bad = per_class[sorted(per_class)[0]][0]
    bad.write_bytes(bad.read_bytes()[:2000])
    with pytest.raises(ConfigError, match="corrupt"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path), verify="full"))


def test_imagefolder_val_class_absent_from_train(tmp_path):
    make_imagefolder_tree(tmp_path, "cifar10")
    src = foolbox_samples("cifar10")[0][0]
    (tmp_path / "val" / "zzz").mkdir()
    (tmp_path / "val" / "zzz" / "x.png").write_bytes(src.read_bytes())
    with pytest.raises(ConfigError, match=r"zzz.*no train folder"):
        build_data(DataConfig(name="imagefolder", root=str(tmp_path)))


def test_cifar_missing_and_corrupt(tmp_path):
    with pytest.raises(ConfigError, match="holds no cifar10"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path)))
    write_cifar_batches(tmp_path, "cifar10")
    (tmp_path / "data_batch_2").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="data_batch_2 is corrupt"):
        build_data(DataConfig(name="cifar10", root=str(tmp_path)))
