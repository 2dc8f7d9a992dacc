"""Trained models that ship with the package, and the records that describe them.

A preset is a model trained by one of the repository's configs and saved
with its sampling (EMA) weights only: no optimizer state and no second copy
of the weights, so a few MB. Load one by name, on any backend, with no
training and no download:

>>> import keras_diffusion as kd
>>> model = kd.load_model("mnist_conditional")      # or kd.DiffusionModel.from_preset(...)
>>> digits = model.generate(10, labels=range(10), steps=20, sampler="dpmpp_2m", seed=0)

Each preset has a JSON record beside it: the config it was trained with, the
command that trained it, the minutes it took and on what hardware, and its
`keras-diffusion evaluate` scores with the command that reproduces them.
`keras-diffusion presets` prints them. `benchmarks/presets.py` trains a
preset from its config and writes both files.

The same record, for any model (a preset, a training run's `model.keras`
with the `config.yaml` beside it, or a downloaded Hub folder), is what
`model_card` turns into the README of a Hugging Face Hub repository
(`keras_diffusion.hub`).
"""

import json
import os
from pathlib import Path

PRESET_DIR = Path(__file__).parent / "preset_files"
RECORD_FILE = "keras_diffusion.json"  # a pushed Hub folder's record


# ------------------------------------------------------------- the presets
def presets():
    """The shipped presets: name -> record, in name order."""
    records = {}
    for path in sorted(PRESET_DIR.glob("*.json")):
        if (PRESET_DIR / f"{path.stem}.keras").is_file():
            records[path.stem] = json.loads(path.read_text())
    return records


def is_preset(source):
    """Whether `source` names a shipped preset (a bare name, not a path)."""
    source = os.fspath(source)
    return (os.sep not in source and "/" not in source and not Path(source).suffix
            and (PRESET_DIR / f"{source}.keras").is_file())


def preset_file(name):
    """The `.keras` file of preset `name`; `ValueError` lists the presets
    when there is no such preset."""
    if not is_preset(name):
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(presets()) or 'none'}.")
    return PRESET_DIR / f"{name}.keras"


def sampling_copy(model):
    """A copy of `model` that keeps only what sampling needs: EMA off, and
    the network (and a trained text encoder) holding the EMA weights. Not
    compiled, so saving it writes no optimizer state. An autoencoder and a
    frozen text encoder are copied as they are."""
    import keras

    copy = type(model).from_config(dict(model.get_config(), ema_decay=None))
    for name in ("network", "text_encoder", "autoencoder"):
        if getattr(model, name, None) is not None:
            getattr(copy, name).set_weights(getattr(model, name).get_weights())
    pairs = list(zip(copy.network.trainable_variables, model.sampling_weights))
    if getattr(model, "prompted", False) and model.train_text_encoder:
        pairs += zip(copy.text_encoder.trainable_variables, model.text_sampling_weights)
    for target, source in pairs:
        target.assign(keras.ops.convert_to_numpy(source))
    return copy


def save_preset(model, name, record, directory=None):
    """Write `model`'s sampling copy to `directory/name.keras` and `record`
    to `directory/name.json` (by default in the package's presets), each
    atomically. Returns the two paths."""
    from keras_diffusion.images import atomic_write

    directory = Path(PRESET_DIR if directory is None else directory)
    model_path = atomic_write(directory / f"{name}.keras", sampling_copy(model).save)
    record = dict(record, name=name, file_mb=round(model_path.stat().st_size / 2**20, 2))
    record_path = atomic_write(directory / f"{name}.json",
                               lambda temp: Path(temp).write_text(json.dumps(record, indent=2) + "\n"))
    return model_path, record_path


# ----------------------------------------------------------------- records
def record_of(source):
    """What is known about the model at `source` (a local path or a preset
    name; `hub.record_of` takes `hf://` paths too): a preset's record, the
    record in a downloaded Hub folder, or for a training run's
    `model.keras` its `config.yaml` and last evaluation in `history.csv`.
    An empty dict when there is nothing beside the model."""
    source = os.fspath(source)
    if is_preset(source):
        return json.loads((PRESET_DIR / f"{source}.json").read_text())
    path = Path(source)
    folder = path if path.is_dir() else path.parent
    if (folder / RECORD_FILE).is_file():
        return json.loads((folder / RECORD_FILE).read_text())
    record = {}
    config_path = folder / "config.yaml"
    if config_path.is_file():
        import yaml

        try:
            config = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError:
            config = None
        if isinstance(config, dict):
            record["config"] = config
            dataset = (config.get("data") or {}).get("dataset")
            if dataset and not (config.get("data") or {}).get("image_folder"):
                record["dataset"] = dataset
    scores = _last_evaluation(folder / "history.csv")
    if scores:
        record["evaluation"] = [scores]
    return record


def _last_evaluation(history_path):
    """The scores of the last evaluated epoch in a run's history.csv."""
    import csv

    if not history_path.is_file():
        return None
    with open(history_path, newline="") as file:
        rows = list(csv.DictReader(file))
    names = ("fid", "kid", "label_accuracy", "prompt_adherence")
    for row in reversed(rows):
        scores = {key: float(row[key]) for key in names if row.get(key) not in (None, "", "nan")}
        if "fid" in scores:
            return dict(scores, epoch=int(row.get("epoch", len(rows) - 1)) + 1,
                        source="evaluation during training (history.csv)")
    return None


def model_kind(config):
    """"prompted", "class-conditional" or "unconditional", from a config."""
    if (config.get("text") or {}).get("enabled"):
        return "prompted"
    return "class-conditional" if (config.get("network") or {}).get("num_classes") else "unconditional"


def model_card(record, repo_id=None):
    """The README.md of a Hub repository holding a model with `record`:
    metadata for the Hub, how to load and sample it, and how it was
    trained and scored, as far as the record knows."""
    dataset = record.get("dataset")
    config = record.get("config") or {}
    kind = model_kind(config)
    prompted, conditional = kind == "prompted", kind == "class-conditional"
    tags = ["keras-diffusion", "keras", "diffusion", "image-generation"] + ([dataset] if dataset else [])
    pipeline_tag = "text-to-image" if prompted else "unconditional-image-generation"
    name = repo_id or record.get("name", "model")
    lines = ["---", "library_name: keras", f"pipeline_tag: {pipeline_tag}", "tags:"]
    lines += [f"- {tag}" for tag in tags]
    lines += ["---", "", f"# {name}", ""]
    about = f"A {kind} denoising diffusion model"
    if dataset:
        about += f" of {dataset} images"
    about += (", trained with keras_diffusion and `model.fit`. It runs on the TensorFlow, JAX "
              "and PyTorch backends of Keras 3.")
    lines += [about, ""]
    where = f"hf://{repo_id}" if repo_id else record.get("name", "MODEL")
    classes = (config.get("network") or {}).get("num_classes")
    example = (f"labels=list(range({min(classes, 10)})), guidance_scale=2.0, " if conditional else
               'prompts="a handwritten seven", guidance_scale=3.0, ' if prompted else "")
    lines += ["## Use", "", "```python", "import keras_diffusion as kd", "",
              f'model = kd.load_model("{where}")',
              f"images = model.generate({min(classes or 10, 10)}, {example}steps=20, "
              'sampler="dpmpp_2m", seed=0)',
              "```", "", "or from the command line:", "", "```",
              f"keras-diffusion sample --model {where} --num 16 --out samples.png", "```", ""]
    training = [f"- {label}: {record[key]}" for key, label in (
        ("command", "command"), ("backend", "backend"), ("training_minutes", "minutes"),
        ("hardware", "hardware"), ("parameters", "parameters"), ("date", "date"))
        if record.get(key) is not None]
    if training:
        lines += ["## Training", ""] + training + [""]
    evaluations = record.get("evaluation") or []
    if evaluations:
        lines += ["## Evaluation", "",
                  "FID and KID over the features of keras_diffusion's small classifier for the "
                  "dataset (comparable with each other, not with Inception FIDs).", "",
                  "| images | sampler | steps | guidance | FID | KID | label accuracy | command |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in evaluations:
            accuracy = row.get("label_accuracy", row.get("prompt_adherence"))
            lines.append("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                row.get("num_images", "-"), row.get("sampler", "-"), row.get("steps", "-"),
                row.get("guidance", "-"), format_number(row.get("fid"), ".3f"),
                format_number(row.get("kid"), ".5f"), format_number(accuracy, ".2%"),
                f"`{row['command']}`" if row.get("command") else row.get("source", "-")))
        lines.append("")
    if config:
        import yaml

        lines += ["## Config", "", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(),
                  "```", ""]
    return "\n".join(lines)


def format_number(value, spec):
    """`value` formatted by `spec`, or "-" for a score that is missing."""
    return "-" if value is None else format(value, spec)
