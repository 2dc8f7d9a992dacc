"""Datasets and image checks at the API boundary.

Images leave this module as NHWC float32 in [0, 1]; labels as int32 `(N,)`.
The built-in datasets come from `keras.datasets`, or, where there is no
internet, from a directory holding `<name>.npz` in the `keras.datasets` layout
(`x_train`, `y_train`, `x_test`, `y_test`).

Keras is imported inside the functions that need it, so that importing this
module (as `config.py` does) leaves the command line free to choose
`KERAS_BACKEND` first.
"""

import difflib
import os
from pathlib import Path

import numpy as np

from keras_diffusion.checks import check_integer
from keras_diffusion.checks import is_integer

DATA_DIR_ENV = "KERAS_DIFFUSION_DATA_DIR"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png")

CLASS_NAMES = {
    "mnist": [str(digit) for digit in range(10)],
    "fashion_mnist": [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ],
    "cifar10": [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ],
}
DATASETS = tuple(CLASS_NAMES)


class DatasetUnavailableError(RuntimeError):
    """A dataset could be neither downloaded nor read from a local `.npz`."""


# ------------------------------------------------------------ built-in data
def load_dataset(name, data_dir=None, split="train", limit=None):
    """Load MNIST, Fashion-MNIST or CIFAR-10 as arrays.

    Args:
        name: `"mnist"`, `"fashion_mnist"` or `"cifar10"`.
        data_dir: a directory holding `<name>.npz` (keys `x_train`,
            `y_train`, `x_test`, `y_test`). Defaults to the environment
            variable `KERAS_DIFFUSION_DATA_DIR`; when neither is set the data
            comes from `keras.datasets`, which downloads it once.
        split: `"train"` or `"test"`.
        limit: keep only the first `limit` examples.

    Returns:
        `(images, labels)`: float32 `(N, H, W, C)` in [0, 1] (MNIST and
        Fashion-MNIST get a channel axis) and int32 `(N,)`.

    Example:

    >>> images, labels = load_dataset("mnist", data_dir="../shared/data", limit=256)
    >>> images.shape, labels[:5]
    ((256, 28, 28, 1), array([5, 0, 4, 1, 9], dtype=int32))
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}.")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}; got {split!r}.")
    check_integer("limit", limit, allow_none=True)
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or None
    if data_dir is None:
        x, y = _download(name, split)
    else:
        x, y = _read_npz(name, Path(data_dir), split)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    images = check_images(x, name=f"{name} {split} images")
    return images, np.asarray(y).reshape(-1).astype(np.int32)


def _download(name, split):
    import keras

    try:
        (x_train, y_train), (x_test, y_test) = getattr(keras.datasets, name).load_data()
    except Exception as error:
        raise DatasetUnavailableError(
            f"could not load {name!r} from keras.datasets ({type(error).__name__}: {error}). "
            f"Without internet, put {name}.npz (keys {', '.join(NPZ_KEYS)}) in a directory "
            f"and pass data_dir= (--data-dir on the command line) or set {DATA_DIR_ENV}."
        ) from error
    return (x_train, y_train) if split == "train" else (x_test, y_test)


def _read_npz(name, data_dir, split):
    path = data_dir / f"{name}.npz"
    if not path.is_file():
        raise DatasetUnavailableError(
            f"{path} not found: data_dir (--data-dir or {DATA_DIR_ENV}) must be a directory "
            f"holding {name}.npz with keys {', '.join(NPZ_KEYS)}."
        )
    with np.load(path, allow_pickle=False) as archive:
        missing = [key for key in (f"x_{split}", f"y_{split}") if key not in archive.files]
        if missing:
            raise DatasetUnavailableError(
                f"{path} lacks {', '.join(missing)}; expected keys {', '.join(NPZ_KEYS)} "
                f"(the keras.datasets layout), found {', '.join(archive.files) or 'none'}."
            )
        x, y = archive[f"x_{split}"], archive[f"y_{split}"]
    if len(x) != len(y):
        raise DatasetUnavailableError(
            f"{path}: x_{split} holds {len(x)} images but y_{split} holds {len(y)} labels."
        )
    return x, y


# ------------------------------------------------------------------- labels
def label_to_index(label, dataset_or_names):
    """The integer class of `label`: an int, a digit string or a class name
    (case-insensitive; `_` may stand for a space, as in `ankle_boot`).

    `dataset_or_names` is a dataset name from `CLASS_NAMES` or a list of
    class names.

    >>> label_to_index("Dog", "cifar10")
    5
    """
    names = CLASS_NAMES.get(dataset_or_names) if isinstance(dataset_or_names, str) else None
    if names is None:
        if isinstance(dataset_or_names, str):
            raise ValueError(
                f"unknown dataset {dataset_or_names!r}; expected one of {', '.join(DATASETS)} "
                "or a list of class names."
            )
        names = list(dataset_or_names)
    index = None
    if is_integer(label):
        index = int(label)
    elif isinstance(label, str):
        text = label.strip()
        if text.isdigit():
            index = int(text)
        else:
            folded = [_fold(name) for name in names]
            if _fold(text) in folded:
                return folded.index(_fold(text))
    if index is not None and 0 <= index < len(names):
        return index
    hint = difflib.get_close_matches(str(label), names, n=1)
    raise ValueError(
        f"unknown label {label!r}; expected an index 0-{len(names) - 1} or one of: "
        f"{', '.join(names)}" + (f" (did you mean {hint[0]!r}?)" if hint else "") + "."
    )


def _fold(name):
    return name.strip().lower().replace("_", " ")


# ------------------------------------------------------------- image folders
def load_image_folder(
    directory, image_size, color_mode="rgb", batch_size=32, labels="inferred", seed=0
):
    """A shuffled `tf.data.Dataset` of the images in `directory`, resized to
    `image_size` and scaled to float32 [0, 1].

    Args:
        directory: with `labels="inferred"`, one subdirectory per class (class
            indices follow the sorted subdirectory names); with `labels=None`,
            images anywhere below it.
        image_size: an int or `(height, width)`.
        color_mode: `"rgb"`, `"grayscale"` or `"rgba"`.
        batch_size: images per batch, or None for unbatched elements.
        labels: `"inferred"` (elements are `(images, int32 labels)`) or None
            (elements are images).
        seed: shuffling seed.
    """
    import keras
    from keras_diffusion.quiet import import_tensorflow

    tf = import_tensorflow()

    if labels not in ("inferred", None):
        raise ValueError(f"labels must be 'inferred' or None; got {labels!r}.")
    root = Path(directory)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist.")
    files = [path for path in root.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS]
    if not files:
        raise ValueError(
            f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)})."
        )
    if labels == "inferred" and all(path.parent == root for path in files):
        raise ValueError(
            f"image folder {str(root)!r} has images but no class subdirectories; "
            "put each class in its own subdirectory or pass labels=None."
        )
    if isinstance(image_size, (int, np.integer)):
        image_size = (int(image_size), int(image_size))
    dataset = keras.utils.image_dataset_from_directory(
        str(root),
        labels=labels,
        label_mode="int" if labels == "inferred" else None,
        color_mode=color_mode,
        batch_size=batch_size,
        image_size=tuple(image_size),
        shuffle=True,
        seed=seed,
        verbose=False,
    )

    def scale(images):
        return tf.cast(images, tf.float32) / 255.0

    if labels is None:
        return dataset.map(scale)
    return dataset.map(lambda images, y: (scale(images), tf.cast(y, tf.int32)))


# ------------------------------------------------------------- image checks
def check_images(images, image_shape=None, name="images"):
    """Validate images at the API boundary and return them as float32 in [0, 1].

    Accepts `(N, H, W, C)`, or `(N, H, W)` for one channel; uint8 is divided
    by 255, floats must already lie in [0, 1]. `image_shape` (H, W, C), when
    given, must match; a `None` in it matches any size.

    Raises:
        ValueError: naming what is wrong and what is accepted.
    """
    array = np.asarray(images)
    if array.ndim == 3:
        array = array[..., np.newaxis]
    if array.ndim != 4:
        raise ValueError(
            f"{name} must be a 4-D array (N, H, W, C) or 3-D (N, H, W); got shape {array.shape}."
        )
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {array.shape}); expected at least one image.")
    if array.shape[-1] not in (1, 2, 3, 4) and array.shape[1] in (1, 3):
        raise ValueError(
            f"{name} have shape {array.shape}, which looks channels-first; expected NHWC "
            "(N, H, W, C). Transpose with np.transpose(images, (0, 2, 3, 1))."
        )
    if image_shape is not None:
        expected = tuple(image_shape)
        if len(expected) != 3 or any(
            want is not None and want != got for want, got in zip(expected, array.shape[1:])
        ):
            raise ValueError(
                f"{name} have shape (H, W, C) = {array.shape[1:]} but {expected} is expected."
            )
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(
            f"{name} must be uint8 in [0, 255] or float in [0, 1]; got dtype {array.dtype}."
        )
    array = array.astype(np.float32, copy=False)  # a large dataset is not copied to be checked
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contain NaN or Inf values.")
    low, high = float(array.min()), float(array.max())
    tolerance = 1e-3
    if low >= -tolerance and high <= 1 + tolerance:
        return array if low >= 0 and high <= 1 else np.clip(array, 0.0, 1.0)
    if low >= -tolerance and high <= 255 + tolerance:
        guess = "they look like [0, 255] pixel values; divide by 255 or pass uint8"
    elif low >= -1 - tolerance and high <= 1 + tolerance:
        guess = "they look like [-1, 1] model-space values; rescale with (x + 1) / 2"
    else:
        guess = "rescale them"
    raise ValueError(
        f"{name} must be float in [0, 1] or uint8 in [0, 255]; got floats in "
        f"[{low:.4g}, {high:.4g}]: {guess}."
    )


def check_training_images(x, image_shape):
    """Training images for `fit`: `x` checked as a whole (uint8 only for
    its shape, on one image, to keep the memory), with a channel axis added
    to `(N, H, W)` arrays."""
    name = "x (the training images)"
    if x.dtype == np.uint8:
        check_images(x[:1], image_shape, name=name)
        return x[..., np.newaxis] if x.ndim == 3 else x
    return check_images(x, image_shape, name=name)


def check_training_labels(y, num_images, num_classes):
    """`y` for `fit`: one integer label 0 to `num_classes - 1` per image,
    as a `(num_images,)` array (a `(num_images, 1)` column is accepted)."""
    labels = y.reshape(-1) if y.ndim == 2 and y.shape[1] == 1 else y
    if labels.ndim != 1 or len(labels) != num_images:
        raise ValueError(
            f"y (the labels) must hold one integer label per image, shape ({num_images},); "
            f"got shape {y.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"y (the labels) must be integers 0 to {num_classes - 1}; got dtype {labels.dtype}."
        )
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"y (the labels) holds labels from {low} to {high}; accepted: integers 0 to "
            f"{num_classes - 1} (num_classes={num_classes})."
        )
    return labels
