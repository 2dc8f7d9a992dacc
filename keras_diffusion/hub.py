"""Models on the Hugging Face Hub: `hf://OWNER/NAME` wherever a model is loaded.

>>> model = kd.load_model("hf://OWNER/NAME")          # any command's --model too
>>> kd.hub.push(model, "hf://OWNER/NAME")             # keras-diffusion push --model M --to ...

A pushed repository holds the model as Keras writes an unzipped model
(`config.json`, `model.weights.h5`, `metadata.json`), the record that
`keras_diffusion.presets` keeps for it (`keras_diffusion.json`: config,
training command, scores) and a model card (`README.md`) written from that
record. Downloads go through `huggingface_hub.snapshot_download`, so they
are cached and a repository already fetched loads offline; pushing needs a
token (`huggingface-cli login` or `HF_TOKEN`). `huggingface_hub` is the
optional `hf` extra. Any failure to reach the Hub is one `OSError` line.
"""

import json
import re
import tempfile
from pathlib import Path

from keras_diffusion import presets

PREFIX = "hf://"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def is_hub_path(source):
    return str(source).startswith(PREFIX)


def repo_id(path):
    """`OWNER/NAME` of an `hf://OWNER/NAME` path; `ValueError` otherwise."""
    path = str(path)
    name = path[len(PREFIX):] if is_hub_path(path) else None
    if name is None or not _REPO_ID.fullmatch(name):
        raise ValueError(f"a Hugging Face Hub model is named hf://OWNER/NAME; got {path!r}.")
    return name


def _huggingface_hub():
    try:
        import huggingface_hub
    except ImportError:
        raise RuntimeError("hf:// models need the huggingface_hub package: "
                           "pip install 'keras-diffusion[hf]'") from None
    return huggingface_hub


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def download(path):
    """The local folder holding the repository at `path` (`hf://OWNER/NAME`),
    downloaded or taken from the cache."""
    from keras_diffusion import __version__

    name = repo_id(path)
    hub = _huggingface_hub()

    def snapshot(patterns):
        try:
            return hub.snapshot_download(repo_id=name, allow_patterns=patterns,
                                         library_name="keras-diffusion",
                                         library_version=__version__)
        except Exception as error:  # offline, unknown repository, no access: many types
            raise OSError(f"could not download {path} from the Hugging Face Hub "
                          f"({_first_line(error)}); without a network connection only a local "
                          "file, a preset or a repository downloaded before can be "
                          "loaded") from error

    # The index files first, then what the kind of repository needs: a
    # Stable Diffusion repository also holds fp16 copies, PyTorch .bin files
    # and single-file checkpoints, gigabytes that nothing here reads.
    folder = Path(snapshot(["config.json", "model_index.json"]))
    if (folder / "model_index.json").is_file():
        return snapshot(PIPELINE_FILES)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{path} holds no Keras model (no config.json) and no diffusers pipeline "
                         "(no model_index.json).")
    return snapshot(None)


# What a diffusers Stable Diffusion repository needs downloaded: configs,
# tokenizer, scheduler and the float32 safetensors (whole or sharded).
PIPELINE_FILES = [
    "model_index.json", "*/config.json", "scheduler/*", "tokenizer/*",
    "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors", "*/*.safetensors.index.json",
    "unet/diffusion_pytorch_model-*-of-*.safetensors", "text_encoder/model-*-of-*.safetensors",
]


def record_of(source):
    """`presets.record_of`, for `hf://` paths as well (downloading them)."""
    return presets.record_of(download(source) if is_hub_path(source) else source)


def push(model, path, record=None, token=None):
    """Upload `model` to the Hub repository `path` (`hf://OWNER/NAME`,
    created if needed) with its record and a model card; returns the
    repository's URL. `record` is what `presets.record_of` gives for the
    model's source (the dataset, config, training command and scores)."""
    import keras

    from keras_diffusion import __version__

    name = repo_id(path)
    hub = _huggingface_hub()
    record = dict(record or {})
    with tempfile.TemporaryDirectory() as folder:
        keras.saving.save_model(model, folder, zipped=False)
        Path(folder, presets.RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
        Path(folder, "README.md").write_text(presets.model_card(record, repo_id=name))
        try:
            api = hub.HfApi(library_name="keras-diffusion", library_version=__version__,
                            token=token)
            url = api.create_repo(name, exist_ok=True)
            api.upload_folder(repo_id=name, folder_path=folder,
                              commit_message="Upload a keras_diffusion model")
        except Exception as error:
            raise OSError(f"could not push to {path} ({_first_line(error)}); pushing needs a "
                          "network connection and a Hub token (huggingface-cli login or "
                          "HF_TOKEN)") from error
    return str(url)
