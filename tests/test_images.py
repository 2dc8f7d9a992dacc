import os

import matplotlib.image
import numpy as np
import pytest

from keras_diffusion.images import (
    atomic_write,
    read_images,
    save_image_grid,
    save_loss_curve,
    write_images,
)


def _files(directory):
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_written_and_readable(tmp_path, channels):
    images = np.random.default_rng(0).random((5, 8, 8, channels)).astype(np.float32)
    path = save_image_grid(images, tmp_path / "nested" / "grid.png", nrow=3, title="epoch 1")
    assert path.stat().st_size > 0
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4)
    assert pixels.shape[0] > 8 and pixels.shape[1] > 3 * 8
    assert _files(tmp_path / "nested") == ["grid.png"]


@pytest.mark.parametrize("columns,lines", [(3, 2), (8, 1)])
def test_grid_title_is_wrapped_inside_the_figure(columns, lines):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from keras_diffusion.images import _grid_figure

    title = "random:0.5 mask | inpainted | original"
    # 8 rows, as the examples write: a 3-column grid is then 184 pixels wide.
    figure = _grid_figure(np.zeros((8 * columns, 28, 28, 1), np.float32), columns, title)
    FigureCanvasAgg(figure).draw()
    text = figure.get_suptitle()
    assert text.replace("\n", " ") == title and text.count("\n") == lines - 1
    extent = figure._suptitle.get_window_extent()
    assert extent.x0 >= 0 and extent.x1 <= figure.bbox.width
    assert extent.y0 >= figure.axes[0].get_window_extent().y1 and extent.y1 <= figure.bbox.height


def test_small_grids_are_enlarged_to_about_512_pixels(tmp_path):
    # 8 rows of 32x32 images with 2-pixel borders: 274 pixels tall, drawn at 2x.
    path = save_image_grid(np.zeros((24, 32, 32, 3), np.float32), tmp_path / "grid.png", nrow=3)
    assert matplotlib.image.imread(path).shape[:2] == (548, 208)


def test_image_grid_accepts_uint8_and_keeps_pixels(tmp_path):
    # One white image on a white border should come out white.
    save_image_grid(np.full((1, 4, 4, 1), 255, np.uint8), tmp_path / "grid.png")
    pixels = matplotlib.image.imread(tmp_path / "grid.png")
    assert np.allclose(pixels[..., :3], 1.0)


def test_image_grid_rejects_bad_images(tmp_path):
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        save_image_grid(np.full((2, 4, 4, 3), -1.0), tmp_path / "grid.png")
    with pytest.raises(ValueError, match="nrow must be a positive integer"):
        save_image_grid(np.zeros((2, 4, 4, 3)), tmp_path / "grid.png", nrow=0)
    assert _files(tmp_path) == []


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")

    def fail(temp):
        with open(temp, "w") as handle:
            handle.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, fail)
    assert target.read_text() == "old" and _files(tmp_path) == ["out.txt"]

    atomic_write(target, lambda temp: open(temp, "w").close() or None)
    assert target.read_text() == "" and _files(tmp_path) == ["out.txt"]
    assert target.stat().st_mode & 0o644 == 0o644


def test_atomic_write_keeps_extension(tmp_path):
    seen = []
    atomic_write(tmp_path / "a.npz", lambda temp: seen.append(temp) or open(temp, "w").close())
    assert seen[0].endswith(".npz") and os.path.dirname(seen[0]) == str(tmp_path)


def test_loss_curve(tmp_path):
    path = save_loss_curve({"loss": [0.3, 0.2, 0.1], "val_loss": [0.35, 0.25, 0.2]}, tmp_path / "loss.png")
    assert matplotlib.image.imread(path).ndim == 3
    assert _files(tmp_path) == ["loss.png"]


def test_loss_curve_needs_loss(tmp_path):
    with pytest.raises(ValueError, match="non-empty 'loss'"):
        save_loss_curve({"val_loss": [1.0]}, tmp_path / "loss.png")


def test_npz_round_trip(tmp_path):
    images = np.random.default_rng(1).random((3, 5, 6, 3)).astype(np.float32)
    write_images(tmp_path / "x.npz", images)
    assert _files(tmp_path) == ["x.npz"]
    np.testing.assert_array_equal(read_images(tmp_path / "x.npz"), images)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip(tmp_path, channels):
    images = np.random.default_rng(2).integers(0, 256, (1, 5, 6, channels), dtype=np.uint8)
    write_images(tmp_path / "x.png", images)
    back = read_images(tmp_path / "x.png")
    assert back.shape == (1, 5, 6, channels) and back.dtype == np.float32
    np.testing.assert_allclose(back, images / 255.0, atol=1e-6)


def test_read_rgba_png_drops_alpha(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((3, 3, 4), 255, np.uint8)).save(tmp_path / "a.png")
    assert read_images(tmp_path / "a.png").shape == (1, 3, 3, 3)


def test_image_file_errors(tmp_path):
    with pytest.raises(ValueError, match=r"must be one of .png, .jpg, .jpeg, .npz; got '.gif'"):
        read_images(tmp_path / "x.gif")
    with pytest.raises(ValueError, match=r"must be one of .png, .npz; got '.jpg'"):
        write_images(tmp_path / "x.jpg", np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match="a PNG holds one grayscale or RGB image"):
        write_images(tmp_path / "x.png", np.zeros((2, 2, 2, 3)))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_images(tmp_path / "missing.png")
    np.savez(tmp_path / "other.npz", pixels=np.zeros((1, 2, 2, 1)))
    with pytest.raises(ValueError, match="no 'images' array; found pixels"):
        read_images(tmp_path / "other.npz")
