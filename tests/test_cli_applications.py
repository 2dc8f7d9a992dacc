"""`keras-diffusion denoise / inpaint / img2img / interpolate`, end to end on
the model `keras-diffusion train` wrote with configs/smoke.yaml (the
session's `smoke_run`).

The subcommands run in-process through `cli.main`, which is what the console
script calls, to keep the suite fast; one test runs a subprocess to check the
exit code and the one-line stderr a shell sees.
"""

from pathlib import Path

import numpy as np
import pytest
from conftest import DATA_DIR
from conftest import SMALLEST_NETWORK
from conftest import run_cli

import keras_diffusion as kd
from keras_diffusion import cli
from keras_diffusion.images import read_images
from keras_diffusion.images import write_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(smoke_run, tmp_path_factory):
    """The smoke model and input files: one MNIST digit as PNG, two as npz,
    and the same two with Gaussian noise of std 0.2 (not clipped)."""
    root = tmp_path_factory.mktemp("cli_applications")
    images, _ = kd.load_dataset("mnist", data_dir=DATA_DIR, split="test", limit=2)
    write_images(root / "digit.png", images[:1])
    write_images(root / "digit2.png", images[1:])
    write_images(root / "digits.npz", images)
    noisy = images + 0.2 * np.random.default_rng(0).normal(size=images.shape)
    np.savez(root / "noisy.npz", images=noisy.astype("float32"))
    return {"model": smoke_run / "model.keras", "root": root, "images": images}


def _main(args, capsys):
    code = cli.main([str(arg) for arg in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_denoise_npz_with_estimated_sigma(files, capsys):
    out = files["root"] / "denoised.npz"
    code, stdout, err = _main(
        ["denoise", "--model", files["model"], "--input", files["root"] / "noisy.npz",
         "--steps", 2, "--out", out], capsys,
    )
    assert code == 0, err
    assert "estimated from the images" in stdout
    denoised = read_images(out)
    assert denoised.shape == (2, 28, 28, 1)


def test_inpaint_keeps_the_known_pixels(files, capsys):
    write_images(files["root"] / "mask.png", kd.make_mask("left-half", (1, 28, 28, 1)))
    out = files["root"] / "inpainted.npz"
    code, stdout, err = _main(
        ["inpaint", "--model", files["model"], "--input", files["root"] / "digits.npz",
         "--mask", files["root"] / "mask.png", "--steps", 3, "--jump-length", 1,
         "--resamples", 2, "--out", out], capsys,
    )
    assert code == 0, err
    assert "wrote 2 images to" in stdout
    inpainted = read_images(out)
    np.testing.assert_array_equal(inpainted[:, :, 14:], files["images"][:, :, 14:])
    assert np.abs(inpainted[:, :, :14] - files["images"][:, :, :14]).max() > 0.1


def test_img2img_png(files, capsys):
    out = files["root"] / "edited.png"
    code, stdout, err = _main(
        ["img2img", "--model", files["model"], "--input", files["root"] / "digit.png",
         "--strength", 0.4, "--steps", 2, "--out", out], capsys,
    )
    assert code == 0, err
    assert "strength 0.4" in stdout and read_images(out).shape == (1, 28, 28, 1)


def test_interpolate_between_two_images(files, capsys):
    out = files["root"] / "path.png"
    code, stdout, err = _main(
        ["interpolate", "--model", files["model"], "--input", files["root"] / "digit.png",
         "--input", files["root"] / "digit2.png", "--num", 3, "--steps", 2, "--out", out],
        capsys,
    )
    assert code == 0, err
    assert "a grid of 3 images" in stdout and out.is_file()


def test_error_in_a_subprocess_is_one_line_and_exit_2(files):
    run = run_cli("denoise", "--model", files["model"], "--input", files["root"] / "digit.png",
                  "--sigma", 0, "--out", files["root"] / "x.png", timeout=900)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("keras-diffusion denoise: error: --sigma must be in (0, 1]")


@pytest.fixture(scope="module")
def conditional_model(files):
    """An untrained class-conditional model with MNIST's class names, the
    smoke run's network."""
    config = kd.load_config(ROOT / "configs" / "smoke.yaml",
                            SMALLEST_NETWORK + ["network.num_classes=10"])
    model = kd.build_model(config, (28, 28, 1), class_names=[str(i) for i in range(10)])
    path = files["root"] / "conditional.keras"
    model.save(path)
    return path


def test_sample_a_row_per_class_with_guidance(conditional_model, tmp_path, capsys):
    out = tmp_path / "grid.png"
    code, stdout, err = _main(
        ["sample", "--model", conditional_model, "--labels", "all", "--num", 10,
         "--guidance", 2.0, "--steps", 2, "--npz", tmp_path / "grid.npz", "--out", out], capsys,
    )
    assert code == 0, err
    assert "wrote 10 images" in stdout and out.is_file()
    assert read_images(tmp_path / "grid.npz").shape == (10, 28, 28, 1)


@pytest.mark.parametrize(
    "args,message",
    [
        (["denoise", "--sigma", "1.5"], "--sigma must be in (0, 1] (or omitted, to estimate it); got 1.5"),
        (["denoise", "--sigma", "-0.1"], "--sigma must be in (0, 1]"),
        (["img2img", "--strength", "0"], "--strength must be in (0, 1]; got 0.0"),
        (["img2img", "--strength", "1.5"], "--strength must be in (0, 1]; got 1.5"),
        (["img2img", "--label", "3"], "labels were given, but this model is unconditional"),
        (["inpaint", "--mask", "random:2"], "random:P needs a fraction P in [0, 1]"),
        (["inpaint", "--mask", "blob"], "unknown mask 'blob'"),
        (["inpaint", "--mask", "MASK10"],
         "mask shape (1, 10, 10, 1) does not match images shape (1, 28, 28, 1)"),
        (["denoise", "--input", "missing.png"], "--input file not found"),
        (["denoise", "--out", "out.jpg"], "--out must end in .png or .npz"),
        (["interpolate", "--seeds", "1", "2", "--num", "1"], "--num must be at least 2"),
        (["img2img", "--model", "CONDITIONAL", "--label", "cat"],
         "unknown class name 'cat'; accepted: 0, 1, 2"),
        (["sample", "--model", "CONDITIONAL", "--label", "cat"], "unknown class name 'cat'"),
        (["sample", "--label", "3"], "labels were given, but this model is unconditional"),
        (["sample", "--guidance", "2"], "needs a class-conditional model"),
    ],
)
def test_bad_input_gives_one_error_line(files, conditional_model, capsys, tmp_path, args, message):
    write_images(tmp_path / "mask10.png", np.ones((1, 10, 10, 1), "float32"))
    command, options = args[0], list(args[1:])
    defaults = {"--model": files["model"], "--out": tmp_path / "out.png"}
    if command not in ("interpolate", "sample"):
        defaults["--input"] = files["root"] / "digit.png"
    for flag, value in defaults.items():
        if flag not in options:
            options += [flag, value]
    replace = {"MASK10": tmp_path / "mask10.png", "CONDITIONAL": conditional_model,
               "missing.png": tmp_path / "missing.png", "out.jpg": tmp_path / "out.jpg"}
    options = [replace.get(option, option) for option in options]
    code, _, err = _main([command, *options], capsys)
    assert code == 2
    assert err.count("\n") == 1, err
    assert err.startswith(f"keras-diffusion {command}: error: ")
    assert message in err, err
