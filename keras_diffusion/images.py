"""Writing and reading images, grids and plots.

Every file this package writes goes through `atomic_write`: a reader (or a
crashed run) sees either the old file or the new one, never half of one.
Figures are drawn on `matplotlib.figure.Figure` directly, without pyplot, so
no GUI backend is ever touched.
"""

import functools
import math
import os
import tempfile
import textwrap
from pathlib import Path

import numpy as np

from keras_diffusion.checks import check_integer
from keras_diffusion.data import check_images

READ_EXTENSIONS = (".png", ".jpg", ".jpeg", ".npz")
WRITE_EXTENSIONS = (".png", ".npz")


# ------------------------------------------------------------ atomic writes
def atomic_write(path, write_fn):
    """Create `path` by calling `write_fn(temp_path)` on a temporary file in
    the same directory, then moving it into place with `os.replace`.

    The temporary file keeps `path`'s extensions, all of them (matplotlib
    and numpy pick a format from the last; Keras wants `.weights.h5`). Parent
    directories are created; on failure the temporary file is removed and the
    error re-raised.

    Returns:
        `path` as a `pathlib.Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        write_fn(temp)
        # mkstemp makes the file 0600; give it the mode a plain open() would.
        os.chmod(temp, 0o666 & ~_umask())
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise
    return path


@functools.cache
def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -------------------------------------------------------------------- plots
def save_image_grid(images, path, nrow=None, title=None):
    """Write images as one PNG grid.

    Args:
        images: `(N, H, W, C)` (or `(N, H, W)`) floats in [0, 1] or uint8;
            anything `np.asarray` converts, such as a CPU tensor.
        path: the PNG to write.
        nrow: images per row; defaults to a near-square grid.
        title: optional title above the grid, wrapped to the grid's width.
    """
    figure = _grid_figure(check_images(images), nrow, title)
    return atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=figure.dpi))


_TITLE_POINTS = 10


def _grid_figure(images, nrow, title):
    from matplotlib.figure import Figure

    grid = tile_images(images, nrow)
    height, width = grid.shape[:2]
    scale = max(1, round(512 / max(height, width)))  # whole-pixel enlargement of small grids
    dpi = 100
    width_inches, height_inches = width * scale / dpi, height * scale / dpi
    # A title wider than a narrow grid is wrapped at spaces, not clipped; 0.6 em
    # is a generous mean character width for matplotlib's default font.
    lines = textwrap.wrap(title or "", max(8, int(width_inches * 72 / (0.6 * _TITLE_POINTS))))
    title_inches = 0.2 + 0.2 * len(lines) if lines else 0.0
    figure = Figure(figsize=(width_inches, height_inches + title_inches), dpi=dpi)
    axes = figure.add_axes((0, 0, 1, height_inches / figure.get_figheight()))
    axes.set_axis_off()
    if grid.shape[-1] == 1:
        axes.imshow(grid[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        axes.imshow(grid, interpolation="nearest")
    if lines:
        figure.suptitle("\n".join(lines), y=1 - 0.5 * title_inches / figure.get_figheight(),
                        va="center", fontsize=_TITLE_POINTS)
    return figure


def tile_images(images, nrow=None, padding=2):
    """Arrange `(N, H, W, C)` images `nrow` to a row, with a white border."""
    count, height, width, channels = images.shape
    columns = math.ceil(math.sqrt(count)) if nrow is None else nrow
    check_integer("nrow", columns)
    columns = min(int(columns), count)
    rows = math.ceil(count / columns)
    grid = np.ones(
        (rows * (height + padding) + padding, columns * (width + padding) + padding, channels),
        dtype=np.float32,
    )
    for index, image in enumerate(images):
        top = padding + (index // columns) * (height + padding)
        left = padding + (index % columns) * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


def save_loss_curve(history, path):
    """Write a PNG of `loss` (and `val_loss`, if present) per epoch.

    `history` is a dict of per-epoch lists, such as `model.fit(...).history`
    (a `keras.callbacks.History` is accepted too).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    history = getattr(history, "history", history)
    if not history.get("loss"):
        raise ValueError(
            f"history must hold a non-empty 'loss' list; got keys {sorted(history)}."
        )
    figure = Figure(figsize=(6, 4), dpi=100)
    axes = figure.add_subplot()
    for key in ("loss", "val_loss"):
        values = history.get(key)
        if values:
            axes.plot(range(1, len(values) + 1), values, marker="o", label=key)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return atomic_write(path, lambda temp: figure.savefig(temp, format="png"))


# ------------------------------------------------------------- image files
def read_images(path, noisy=False):
    """Read images as float32 `(N, H, W, C)` in [0, 1].

    A `.png`/`.jpg` gives one image (`N = 1`; grayscale keeps one channel,
    an alpha channel is dropped); an `.npz` gives its `images` array. With
    `noisy=True` an `.npz` of floats is returned as it is, values outside
    [0, 1] included, for `DiffusionModel.denoise` (which checks it).
    """
    from PIL import Image

    path = Path(path)
    suffix = _check_extension(path, READ_EXTENSIONS, "read")
    if not path.is_file():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist.")
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            if "images" not in archive.files:
                raise ValueError(
                    f"{path} has no 'images' array; found {', '.join(archive.files) or 'none'}."
                )
            images = archive["images"]
            if noisy and np.issubdtype(images.dtype, np.floating):
                return images.astype(np.float32)
            return check_images(images, name=f"images in {path}")
    with Image.open(path) as image:
        if image.mode not in ("L", "RGB"):
            image = image.convert("L" if image.mode in ("1", "I", "I;16", "F") else "RGB")
        array = np.asarray(image)
    return check_images(array[np.newaxis], name=f"image in {path}")


def write_images(path, images):
    """Write images in [0, 1] (or uint8): one image to a `.png` (8-bit,
    grayscale or RGB), any number to an `.npz` (float32 under `images`)."""
    from PIL import Image

    path = Path(path)
    suffix = _check_extension(path, WRITE_EXTENSIONS, "write")
    images = check_images(images)
    if suffix == ".npz":
        return atomic_write(path, lambda temp: np.savez(temp, images=images))
    if len(images) != 1 or images.shape[-1] not in (1, 3):
        raise ValueError(
            f"a PNG holds one grayscale or RGB image; got shape {images.shape}. "
            "Use .npz for several images, or save_image_grid."
        )
    pixels = np.round(images[0] * 255).astype(np.uint8)
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    return atomic_write(path, lambda temp: picture.save(temp, format="PNG"))


def _check_extension(path, accepted, verb):
    suffix = path.suffix.lower()
    if suffix not in accepted:
        raise ValueError(
            f"cannot {verb} {str(path)!r}: the extension must be one of "
            f"{', '.join(accepted)}; got {suffix or 'none'!r}."
        )
    return suffix
