"""`keras-diffusion finetune`: DreamBooth with prior preservation through the
command line, killed after its first epoch and resumed; the LoRA it writes
loads back with `sample --lora`."""

import csv
import os
import sys

import numpy as np
import pytest

import keras_diffusion as kd
from conftest import BACKEND
from conftest import cli_main
from conftest import kill_after_first_backup
from conftest import once
from keras_diffusion.callbacks import read_backup_record
from sd_pipelines import write_pipeline

INSTANCE = "a photo of sks dog"


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1") / "pipeline"
    write_pipeline(folder, "sd1")
    return folder


@pytest.fixture(scope="module")
def instance_folder(tmp_path_factory):
    """Three 20x24 photos of one red object, which the run crops and resizes
    to the model's 16x16."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("instance")
    rng = np.random.default_rng(0)
    for index in range(3):
        pixels = (rng.uniform(0, 0.3, (20, 24, 3)) * 255).astype("uint8")
        pixels[6:14, 8:16, 0] = 230
        Image.fromarray(pixels).save(folder / f"{index}.png")
    return folder


def _command(pipeline_folder, instance_folder, output, *extra):
    return ["finetune", "--model", str(pipeline_folder), "--data-dir", str(instance_folder),
            "--output", str(output), "--instance-prompt", INSTANCE, "--class-prompt",
            "a photo of a dog", "--num-class-images", "2", "--lora-rank", "4", "--epochs", "2",
            "--batch-size", "2", "--learning-rate", "1e-2", "--sample-steps", "2", "--cache-latents",
            *extra]


@pytest.mark.skipif(BACKEND != "torch", reason="the command is the same code on every backend "
                    "(test_sd_lora.py trains LoRA on each); a real kill runs under PyTorch")
def test_dreambooth_runs_end_to_end_and_resumes_after_a_kill(pipeline_folder, instance_folder,
                                                            tmp_path, capsys):
    output = tmp_path / "run"
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "keras_diffusion.cli",
               *_command(pipeline_folder, instance_folder, output)]
    kill_after_first_backup(command, output / "backup", env)
    assert read_backup_record(output / "backup")["epoch"] == 1
    assert sorted(p.name for p in (output / "class_images").iterdir()) == ["0000.png", "0001.png"]
    assert not (output / "pytorch_lora_weights.safetensors").exists()

    assert cli_main(*_command(pipeline_folder, instance_folder, output)) == 2
    assert "holds an interrupted fine-tuning run; pass resume" in capsys.readouterr().err
    assert cli_main(*_command(pipeline_folder, instance_folder, output, "--resume")) == 0
    resumed = capsys.readouterr()
    assert "pytorch_lora_weights.safetensors" in resumed.out
    with open(output / "history.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["0", "1"]
    assert (output / "samples" / "epoch_0002.png").is_file()
    assert not (output / "backup").exists()

    # The LoRA moves the model's images, and sample --lora applies it.
    base = kd.load_model(pipeline_folder)
    latents = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype("float32")
    before = base.generate(1, prompts=INSTANCE, steps=2, noise=latents)
    base.load_lora_weights(output)
    after = base.generate(1, prompts=INSTANCE, steps=2, noise=latents)
    assert np.abs(after - before).max() > 1e-4
    assert cli_main("sample", "--model", pipeline_folder, "--lora", output, "--prompt", INSTANCE,
                    "--num", "1", "--steps", "2", "--out", tmp_path / "dog.png") == 0
    assert (tmp_path / "dog.png").is_file()


@once
def test_finetune_errors_are_one_line(pipeline_folder, instance_folder, tmp_path, capsys):
    capsys.readouterr()
    assert cli_main("finetune", "--model", pipeline_folder, "--data-dir", instance_folder,
                    "--output", tmp_path / "a", "--class-prompt", "a dog") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "class_prompt (prior preservation) is DreamBooth's" in err[0]
    assert cli_main("finetune", "--model", pipeline_folder, "--data-dir", instance_folder,
                    "--output", tmp_path / "b") == 2  # no metadata.jsonl, no instance prompt
    assert "has no metadata.jsonl" in capsys.readouterr().err
    assert cli_main("sample", "--model", pipeline_folder, "--lora", tmp_path / "missing.safetensors",
                    "--prompt", "a cat", "--num", "1", "--out", tmp_path / "x.png") == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


@pytest.mark.skipif(BACKEND != "torch", reason="the command's size handling is backend-"
                    "independent; test_sd_finetune.py trains at another size on each backend")
def test_finetune_trains_at_the_size_and_with_the_options_asked_for(
        pipeline_folder, instance_folder, tmp_path, capsys, monkeypatch):
    """`--size` (diffusers' `--resolution`): the images are cut to it, the
    class images made at it; the training options (`--snr-gamma`,
    `--noise-offset`) reach the model and `--train-text-encoder` puts LoRA
    on the text encoder; a size the UNet cannot divide, SD 3's options and
    a text-encoder LoRA with a whole-UNet run are refused in one line
    before anything is written."""
    from PIL import Image
    from safetensors.numpy import load_file

    from keras_diffusion.stable_diffusion import finetuning

    output = tmp_path / "run"
    for extra, message in (
            (("--size", "18x16"), "image_size 18x16 does not divide: both sides must be "
                                  "multiples of 4"),
            (("--weighting-scheme", "mode"), "--weighting-scheme is not a training option of a "
                                             "StableDiffusion; it takes --snr-gamma, "
                                             "--noise-offset, --proportion-empty-prompts"),
            (("--train-text-encoder", "--lora-rank", "0"), "train_text_encoder "
                                                           "(--train-text-encoder) adds a new "
                                                           "LoRA to the text encoders")):
        assert cli_main(*_command(pipeline_folder, instance_folder, output, *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (output / "backup").exists() and not (output / "class_images").exists()
    trained = []
    real = finetuning.finetune
    monkeypatch.setattr(finetuning, "finetune",
                        lambda model, *args, **kwargs: trained.append(model) or real(
                            model, *args, **kwargs))
    assert cli_main(*_command(pipeline_folder, instance_folder, output, "--size", "24x32",
                              "--epochs", "1", "--snr-gamma", "5", "--noise-offset", "0.05",
                              "--train-text-encoder")) == 0
    assert "pytorch_lora_weights.safetensors" in capsys.readouterr().out
    for path in sorted((output / "class_images").iterdir()):
        assert Image.open(path).size == (32, 24)  # (width, height)
    assert (output / "samples" / "epoch_0001.png").is_file()
    assert (trained[0].min_snr_gamma, trained[0].noise_offset) == (5.0, 0.05)
    parts = {key.split(".")[0] for key in load_file(output / "pytorch_lora_weights.safetensors")}
    assert parts == {"unet", "text_encoder"}


@once
def test_training_images_are_cropped_to_the_aspect_and_resized(instance_folder):
    from keras_diffusion.stable_diffusion.finetuning import read_training_images

    images, captions = read_training_images(instance_folder, (16, 16), INSTANCE)
    assert images.shape == (3, 16, 16, 3) and captions == [INSTANCE] * 3
    assert 0 <= images.min() and images.max() <= 1
    # The red square (columns 8-15 of 24, rows 6-13 of 20) lands in the
    # center after the crop to 20x20 (columns 2-21) and the resize to 16x16.
    assert images[0, 8, 8, 0] > 0.8 and images[0, 8, 0, 0] < 0.35
