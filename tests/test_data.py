from pathlib import Path

import keras
import numpy as np
import pytest

from keras_diffusion import data
from keras_diffusion.data import (
    CLASS_NAMES,
    DatasetUnavailableError,
    check_images,
    label_to_index,
    load_dataset,
    load_image_folder,
)

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(
    not (DATA_DIR / "mnist.npz").is_file(), reason=f"shared data not found at {DATA_DIR}"
)


@pytest.fixture(autouse=True)
def no_data_dir_env(monkeypatch):
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)


# ------------------------------------------------------------ load_dataset
@needs_data
def test_mnist_from_npz():
    images, labels = load_dataset("mnist", data_dir=DATA_DIR, limit=10)
    assert images.shape == (10, 28, 28, 1) and images.dtype == np.float32
    assert labels.shape == (10,) and labels.dtype == np.int32
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.max() > 0.9


@needs_data
def test_mnist_test_split():
    images, labels = load_dataset("mnist", data_dir=DATA_DIR, split="test", limit=3)
    assert images.shape == (3, 28, 28, 1) and labels.shape == (3,)


@needs_data
def test_cifar10_labels_flattened():
    images, labels = load_dataset("cifar10", data_dir=str(DATA_DIR), limit=4)
    assert images.shape == (4, 32, 32, 3) and images.dtype == np.float32
    assert labels.shape == (4,) and labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() <= 9


@needs_data
def test_env_var_points_at_data(monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, str(DATA_DIR))
    _, labels = load_dataset("mnist", limit=5)
    assert labels.tolist() == [5, 0, 4, 1, 9]


def test_missing_npz_names_both_ways(tmp_path):
    with pytest.raises(DatasetUnavailableError, match="mnist.npz") as info:
        load_dataset("mnist", data_dir=tmp_path)
    assert "--data-dir" in str(info.value) and data.DATA_DIR_ENV in str(info.value)


def test_npz_missing_keys(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DatasetUnavailableError, match="lacks y_train"):
        load_dataset("mnist", data_dir=tmp_path)


def test_download_failure_is_explained(monkeypatch):
    def offline():
        raise OSError("URL fetch failure: no network")

    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(DatasetUnavailableError, match="KERAS_DIFFUSION_DATA_DIR") as info:
        load_dataset("mnist")
    assert "--data-dir" in str(info.value) and "mnist.npz" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


def test_download_path_shapes(monkeypatch):
    fake = (np.full((3, 32, 32, 3), 255, np.uint8), np.array([[1], [2], [3]], np.uint8))
    monkeypatch.setattr(keras.datasets.cifar10, "load_data", lambda: (fake, fake))
    images, labels = load_dataset("cifar10", split="test")
    assert images.shape == (3, 32, 32, 3) and images.max() == 1.0
    assert labels.tolist() == [1, 2, 3] and labels.dtype == np.int32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "svhn"}, "mnist, fashion_mnist, cifar10"),
        ({"name": "mnist", "split": "val"}, "split must be one of train, test"),
        ({"name": "mnist", "limit": 0}, "limit must be a positive integer"),
    ],
)
def test_bad_arguments(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_dataset(data_dir=tmp_path, **kwargs)


# ------------------------------------------------------------------ labels
@pytest.mark.parametrize(
    "label, names, expected",
    [
        (3, "mnist", 3),
        (np.int64(7), "mnist", 7),
        ("3", "mnist", 3),
        ("dog", "cifar10", 5),
        ("Truck", "cifar10", 9),
        (" 9 ", "cifar10", 9),
        ("ankle boot", "fashion_mnist", 9),
        ("ANKLE_BOOT", "fashion_mnist", 9),
        ("t-shirt/top", "fashion_mnist", 0),
        ("b", ["a", "b"], 1),
    ],
)
def test_label_to_index(label, names, expected):
    assert label_to_index(label, names) == expected


@pytest.mark.parametrize("label", ["dgo", 10, -1, "10", True, 2.0])
def test_label_to_index_rejects(label):
    with pytest.raises(ValueError, match="airplane, automobile, bird"):
        label_to_index(label, "cifar10")


def test_label_to_index_suggests():
    with pytest.raises(ValueError, match="did you mean 'dog'"):
        label_to_index("dgo", "cifar10")


def test_label_to_index_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        label_to_index(1, "svhn")


def test_class_names():
    assert CLASS_NAMES["cifar10"][0] == "airplane" and CLASS_NAMES["cifar10"][9] == "truck"
    assert all(len(names) == 10 for names in CLASS_NAMES.values())


# ------------------------------------------------------------ check_images
def test_check_images_uint8_and_3d():
    images = check_images(np.full((2, 4, 4), 255, np.uint8))
    assert images.shape == (2, 4, 4, 1) and images.dtype == np.float32 and images.max() == 1.0


def test_check_images_float_passes_and_clips_rounding():
    images = check_images(np.array([[[[1.0000001]], [[-1e-7]]]], np.float64))
    assert images.dtype == np.float32 and images.min() == 0.0 and images.max() == 1.0


def test_check_images_shape_with_wildcard():
    assert check_images(np.zeros((1, 8, 8, 3)), image_shape=(None, None, 3)).shape == (1, 8, 8, 3)


@pytest.mark.parametrize(
    "images, kwargs, message",
    [
        (np.zeros((4, 4)), {}, r"4-D array \(N, H, W, C\).*got shape \(4, 4\)"),
        (np.zeros((0, 4, 4, 1)), {}, "empty"),
        (np.full((1, 4, 4, 1), 200.0), {}, r"\[0, 255\] pixel values; divide by 255"),
        (np.full((1, 4, 4, 1), -0.5), {}, r"\[-1, 1\] model-space values; rescale with \(x \+ 1\) / 2"),
        (np.full((1, 4, 4, 1), 1000.0), {}, r"float in \[0, 1\] or uint8"),
        (np.full((1, 4, 4, 1), np.nan), {}, "NaN or Inf"),
        (np.full((1, 4, 4, 1), np.inf), {}, "NaN or Inf"),
        (np.zeros((1, 4, 4, 1), np.int64), {}, "got dtype int64"),
        (np.zeros((2, 3, 32, 32)), {}, "channels-first"),
        (
            np.zeros((1, 28, 28, 3)),
            {"image_shape": (28, 28, 1), "name": "init_image"},
            r"init_image have shape .*\(28, 28, 3\) but \(28, 28, 1\) is expected",
        ),
        (np.zeros((1, 32, 32, 1)), {"image_shape": (28, 28, 1)}, r"\(32, 32, 1\) but \(28, 28, 1\)"),
    ],
)
def test_check_images_errors(images, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_images(images, **kwargs)


# ------------------------------------------------------------ image folder
def _write_pngs(directory, count, value):
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.fromarray(np.full((10, 12, 3), value, np.uint8)).save(directory / f"{index}.png")


def test_image_folder_with_labels(tmp_path):
    _write_pngs(tmp_path / "cats", 2, 255)
    _write_pngs(tmp_path / "dogs", 1, 0)
    dataset = load_image_folder(tmp_path, image_size=8, batch_size=4)
    images, labels = next(iter(dataset))
    images, labels = np.asarray(images), np.asarray(labels)
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.float32
    assert labels.dtype == np.int32 and sorted(labels.tolist()) == [0, 0, 1]
    for image, label in zip(images, labels):
        assert np.allclose(image, 1.0 if label == 0 else 0.0)


def test_image_folder_unlabelled_grayscale(tmp_path):
    _write_pngs(tmp_path, 2, 255)
    dataset = load_image_folder(tmp_path, (6, 5), color_mode="grayscale", labels=None)
    images = np.asarray(next(iter(dataset)))
    assert images.shape == (2, 6, 5, 1) and np.allclose(images, 1.0)


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_folder(tmp_path / "missing", 8)
    with pytest.raises(ValueError, match="holds no images"):
        load_image_folder(tmp_path, 8)
    _write_pngs(tmp_path / "flat", 1, 0)
    with pytest.raises(ValueError, match="no class subdirectories; .*labels=None"):
        load_image_folder(tmp_path / "flat", 8)
