"""Presets shipped with the package, `hf://` models and the model card.

The Hub is never reached: `huggingface_hub`'s upload and download are
replaced by copies into and out of a local folder, which is what the Hub
stores and returns (an unzipped Keras model, the record, the card)."""

import json
import shutil

import huggingface_hub
import keras
import numpy as np
import pytest

import keras_diffusion as kd
from conftest import BACKEND
from conftest import cli_main
from conftest import once
from conftest import one_level_model
from conftest import squares
from keras_diffusion import hub
from keras_diffusion import presets
from keras_diffusion.config import dataset_of_run

# Trained by benchmarks/presets.py from configs/*.yaml.
SHIPPED = ("cifar10", "mnist", "mnist_conditional", "mnist_prompts")


@pytest.fixture(scope="module")
def trained_tiny():
    """A tiny model a few steps into training, so its EMA weights differ from
    its weights."""
    model = one_level_model(ema_decay=0.5)
    model.fit(squares(16), batch_size=8, epochs=1, verbose=0)
    return model


def _stored_values(path):
    """How many numbers the weights file inside a `.keras` archive holds."""
    import io
    import zipfile

    import h5py

    with zipfile.ZipFile(path) as archive, h5py.File(
            io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
        sizes = []
        weights.visititems(lambda name, item: sizes.append(item.size)
                           if isinstance(item, h5py.Dataset) else None)
    return sum(sizes)


def _same_samples(a, b):
    first, second = (model.generate(2, steps=3, seed=1) for model in (a, b))
    np.testing.assert_allclose(first, second, atol=1e-5)


# ------------------------------------------------------------ making presets
def test_a_sampling_copy_keeps_only_the_ema_weights(trained_tiny, tmp_path):
    copy = presets.sampling_copy(trained_tiny)
    assert copy.ema_decay is None and not copy.compiled
    for ema, weight in zip(trained_tiny.sampling_weights, copy.network.trainable_variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(ema),
                                      keras.ops.convert_to_numpy(weight))
    assert not np.allclose(keras.ops.convert_to_numpy(trained_tiny.network.trainable_variables[0]),
                           keras.ops.convert_to_numpy(copy.network.trainable_variables[0]))
    _same_samples(trained_tiny, copy)
    trained_tiny.save(tmp_path / "full.keras")
    copy.save(tmp_path / "copy.keras")
    # the network's weights alone, against them plus the EMA and the momentum
    parameters = trained_tiny.network.count_params()
    assert parameters <= _stored_values(tmp_path / "copy.keras") <= parameters + 8
    assert _stored_values(tmp_path / "full.keras") >= 3 * parameters


def test_a_saved_preset_loads_by_name(trained_tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    record = {"dataset": "mnist", "training_minutes": 1.5, "backend": BACKEND,
              "hardware": "a test", "parameters": 123,
              "config": {"network": {"num_classes": None}},
              "evaluation": [{"fid": 12.5, "kid": 0.01, "num_images": 100}]}
    model_path, record_path = presets.save_preset(trained_tiny, "tiny", record)
    assert presets.is_preset("tiny") and not presets.is_preset("tiny.keras")
    assert json.loads(record_path.read_text())["file_mb"] > 0
    assert list(presets.presets()) == ["tiny"]
    _same_samples(trained_tiny, kd.load_model("tiny"))
    assert isinstance(kd.DiffusionModel.from_preset("tiny"), kd.DiffusionModel)
    with pytest.raises(ValueError, match="tiny holds a DiffusionModel, not a LatentDiffusionModel"):
        kd.LatentDiffusionModel.from_preset("tiny")
    with pytest.raises(FileNotFoundError, match=r"model file not found: tinny \(nor a preset: tiny\)"):
        kd.load_model("tinny")
    assert dataset_of_run("tiny") == "mnist"

    assert cli_main("presets") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "dataset", "kind"]
    assert out[1].split()[:3] == ["tiny", "mnist", "unconditional"] and "12.50" in out[1]


# ---------------------------------------------------------------- the Hub
@pytest.fixture
def local_hub(tmp_path, monkeypatch):
    """`huggingface_hub` with uploads and downloads going to `tmp_path/hub`."""
    root = tmp_path / "hub"

    class Api:
        def __init__(self, **kwargs):
            pass

        def create_repo(self, repo_id, exist_ok=False):
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message):
            shutil.copytree(folder_path, root / repo_id, dirs_exist_ok=True)

    def snapshot_download(repo_id, **kwargs):
        if not (root / repo_id).is_dir():
            raise huggingface_hub.errors.LocalEntryNotFoundError(
                "Cannot find the requested files in the disk cache and outgoing traffic has "
                "been disabled.")
        return str(root / repo_id)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return root


def test_a_pushed_model_loads_from_its_hf_path(trained_tiny, local_hub):
    record = {"dataset": "mnist", "command": "keras-diffusion train --config configs/smoke.yaml",
              "config": {"network": {"num_classes": None}, "data": {"dataset": "mnist"}},
              "evaluation": [{"fid": 3.25, "kid": 0.002, "num_images": 1000, "steps": 20,
                              "command": "keras-diffusion evaluate --model M"}]}
    url = hub.push(trained_tiny, "hf://someone/tiny", record=record)
    assert url == "https://huggingface.co/someone/tiny"
    folder = local_hub / "someone" / "tiny"
    assert {"config.json", "model.weights.h5", "README.md", "keras_diffusion.json"} <= {
        path.name for path in folder.iterdir()}
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: keras\npipeline_tag: unconditional-image-generation")
    assert 'kd.load_model("hf://someone/tiny")' in card
    assert "keras-diffusion train --config configs/smoke.yaml" in card and "| 3.250 |" in card
    _same_samples(trained_tiny, kd.load_model("hf://someone/tiny"))
    assert dataset_of_run("hf://someone/tiny") == "mnist"


def test_the_push_command_and_hub_errors(smoke_run, local_hub, capsys):
    assert cli_main("push", "--model", smoke_run / "model.keras", "--to", "hf://someone/smoke") == 0
    assert "pushed" in capsys.readouterr().out
    folder = local_hub / "someone" / "smoke"
    pushed = json.loads((folder / "keras_diffusion.json").read_text())
    assert pushed["dataset"] == "mnist" and pushed["config"]["data"]["dataset"] == "mnist"
    assert "history.csv" in (folder / "README.md").read_text()  # its scores' source

    with pytest.raises(OSError, match="could not download hf://someone/missing from the Hugging "
                                      "Face Hub .*Cannot find the requested files"):
        kd.load_model("hf://someone/missing")
    with pytest.raises(ValueError, match="a Hugging Face Hub model is named hf://OWNER/NAME; "
                                         "got 'hf://no-owner'"):
        kd.load_model("hf://no-owner")
    for argv in (["sample", "--model", "hf://someone/missing", "--out", "x.png"],
                 ["push", "--model", smoke_run / "model.keras", "--to", "someone/smoke"]):
        assert cli_main(*argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("could not download" in err[0] or "hf://OWNER/NAME" in err[0])


# ------------------------------------------------------- the shipped presets
def test_the_presets_ship_small_with_their_records():
    shipped = presets.presets()
    assert tuple(shipped) == SHIPPED
    for name, record in shipped.items():
        assert (presets.PRESET_DIR / f"{name}.keras").stat().st_size < 12 * 2**20
        assert record["command"].startswith(f"keras-diffusion train --config configs/{name}.yaml")
        assert record["training_minutes"] > 0 and record["hardware"]
        assert record["config"]["data"]["dataset"] == record["dataset"]
        backends = {row["backend"] for row in record["evaluation"]}
        assert backends == {"tensorflow", "jax", "torch"}, name


def test_the_first_command_draws_recognisable_digits(tmp_path):
    """The README's first command: a preset's digits, with no training."""
    out, npz = tmp_path / "digits.png", tmp_path / "digits.npz"
    assert cli_main("sample", "--model", "mnist_conditional", "--labels", "all", "--out", out,
                    "--npz", npz) == 0
    assert out.stat().st_size > 0
    images = np.load(npz)["images"]
    assert images.shape == (10, 28, 28, 1)  # one per class
    assert kd.metrics.label_accuracy(images, np.arange(10), "mnist") >= 0.9


@once
def test_the_prompted_preset_draws_the_digit_a_held_out_prompt_names(tmp_path):
    """A prompt from a template never seen in training, for each digit."""
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    npz = tmp_path / "prompts.npz"
    prompts = [arg for word in words for arg in ("--prompt", f"a drawing of the number {word}")]
    assert cli_main("sample", "--model", "mnist_prompts", *prompts, "--num", 20, "--guidance", 3,
                    "--steps", 20, "--out", tmp_path / "prompts.png", "--npz", npz) == 0
    images = np.load(npz)["images"]
    assert images.shape == (20, 28, 28, 1)  # one row of two per prompt
    assert kd.metrics.label_accuracy(images, np.repeat(np.arange(10), 2), "mnist") >= 0.85


def test_a_preset_scores_as_its_record_says(data_dir, tmp_path):
    """The record's small evaluation on this backend, repeated: same seed,
    same numbers (within what one thread against two changes in float32)."""
    record = presets.presets()["mnist_conditional"]
    row = next(row for row in record["evaluation"]
               if row["backend"] == BACKEND and row["num_images"] == 100)
    scores = tmp_path / "scores.json"
    assert cli_main("evaluate", "--model", "mnist_conditional", "--num", 100, "--steps",
                    row["steps"], "--guidance", row["guidance"], "--data-dir", data_dir,
                    "--json", scores) == 0
    measured = json.loads(scores.read_text())
    assert measured["fid"] == pytest.approx(row["fid"], rel=1e-2)
    assert measured["kid"] == pytest.approx(row["kid"], rel=5e-2, abs=1e-4)
    assert measured["label_accuracy"] == pytest.approx(row["label_accuracy"], abs=0.021)
