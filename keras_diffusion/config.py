"""The run configuration: the one place that knows its schema.

A config is a nested dict with the sections below; the YAML files in
`configs/` are the same dicts, merged over the defaults, and a command-line
`--set a.b=value` overrides one key (the value is read as YAML, so `3`,
`1e-4`, `[1, 2]`, `null` and `true` mean what they say).

Every mistake raises `ConfigError` with a one-line message that names the
key, what it accepts and what it got, e.g.
`unknown config key 'trainig.epochs'; did you mean 'training.epochs'?`.

The sections that describe objects (`network`, `schedule`, `model`,
`autoencoder`) hold the objects' own arguments: their defaults are read from
the constructors' signatures, and their values are checked by the objects'
own rules (`check_unet_arguments`, `DiffusionSchedule`,
`check_model_arguments`, `check_autoencoder_arguments`), so no rule is
written twice. Here only types are checked (YAML reads `1e-4` as
a string) and the settings that span sections.

Importing this module does not import Keras; `default_config` and `validate`
do (the defaults and rules live in modules that use Keras), so a caller that
chooses `KERAS_BACKEND` must do so before calling them.
"""

import copy
import difflib
import importlib
import inspect
import math
import os
from pathlib import Path

import yaml

from keras_diffusion.data import DATASETS


class ConfigError(ValueError):
    """A config file, key or value is not valid."""


# ------------------------------------------------------------------ checks
# Each check takes (key, value) and returns the normalised value or raises.
def _fail(key, expected, value, hint=""):
    raise ConfigError(f"{key} must be {expected}; got {value!r}{hint}")


def _or_null(expected, nullable):
    return f"{expected} or null" if nullable else expected


def _is_integer(value, low):
    return isinstance(value, int) and not isinstance(value, bool) and (low is None or value >= low)


def _integer(low=None, nullable=False):
    expected = _or_null("an integer" + (f" >= {low}" if low is not None else ""), nullable)

    def check(key, value):
        if not (value is None and nullable or _is_integer(value, low)):
            _fail(key, expected, value)
        return value

    return check


def _number(low=None, high=None, low_open=False, high_open=False, nullable=False):
    """A float; numeric strings are converted, because YAML 1.1 reads `1e-4`
    as a string."""
    bounds = []
    if low is not None:
        bounds.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        bounds.append(f"{'<' if high_open else '<='} {high}")
    expected = _or_null("a number" + (" " + " and ".join(bounds) if bounds else ""), nullable)

    def check(key, value):
        if value is None and nullable:
            return None
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                _fail(key, expected, value)
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            _fail(key, expected, value)
        number = float(number)
        if (
            not math.isfinite(number)
            or (low is not None and (number <= low if low_open else number < low))
            or (high is not None and (number >= high if high_open else number > high))
        ):
            _fail(key, expected, value)
        return number

    return check


def _choice(options, nullable=False):
    """One of `options`: a tuple, or a callable returning it for options owned
    by a module that imports Keras."""

    def check(key, value):
        if value is None and nullable:
            return None
        accepted = options() if callable(options) else options
        if not isinstance(value, str) or value not in accepted:
            close = difflib.get_close_matches(str(value), accepted, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            _fail(key, _or_null(f"one of {', '.join(accepted)}", nullable), value, hint)
        return value

    return check


def _owned_by(module, name):
    return lambda: getattr(importlib.import_module(f"keras_diffusion.{module}"), name)


def _flag(key, value):
    if not isinstance(value, bool):
        _fail(key, "true or false", value)
    return value


def _jit_compile(key, value):
    if not isinstance(value, bool) and value != "auto":
        _fail(key, "true, false or auto", value)
    return value


def _path(key, value):
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        _fail(key, "a path or null", value)
    return str(value)


def _integer_list(low=None, allow_empty=True):
    expected = (f"a {'' if allow_empty else 'non-empty '}list of integers"
                + (f" >= {low}" if low is not None else ""))

    def check(key, value):
        if (
            not isinstance(value, (list, tuple))
            or not (value or allow_empty)
            or not all(_is_integer(item, low) for item in value)
        ):
            _fail(key, expected, value)
        return list(value)

    return check


def _text_list(key, value):
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(item, str) for item in value):
        _fail(key, "a string, a non-empty list of strings or null", value)
    return list(value)


def _image_size(key, value):
    """null, an int, or [height, width]."""
    if not (
        value is None
        or _is_integer(value, 1)
        or isinstance(value, (list, tuple))
        and len(value) == 2
        and all(_is_integer(side, 1) for side in value)
    ):
        _fail(key, "an integer >= 1, [height, width] or null", value)
    return list(value) if isinstance(value, tuple) else value


class _Signature:
    """A default that lives in a signature: the argument of the config key's
    name in `owner` ("module:Class" or "module:Class.method")."""

    def __init__(self, owner):
        self.owner = owner

    def value(self, argument):
        module, _, path = self.owner.partition(":")
        target = importlib.import_module(f"keras_diffusion.{module}")
        for name in path.split("."):
            target = getattr(target, name)
        default = inspect.signature(target).parameters[argument].default
        return list(default) if isinstance(default, tuple) else default


_UNET = _Signature("network:UNet")
SCHEDULE_TYPES = ("ddpm", "flow")
_SCHEDULE = _Signature("schedule:DiffusionSchedule")
_FLOW = _Signature("schedule:FlowMatchSchedule")
_MODEL = _Signature("model:DiffusionModel")
_GENERATE = _Signature("model:DiffusionModel.generate")
_AUTOENCODER = _Signature("autoencoder:Autoencoder")
_TEXT_ENCODER = _Signature("text:TextEncoder")
_TOKENIZER = _Signature("text:WordTokenizer")

# ------------------------------------------------------------------ schema
# Sections are dicts; leaves are (default, check).
_SCHEMA = {
    "seed": (0, _integer(0)),
    "data": {
        "dataset": ("mnist", _choice(DATASETS)),
        "data_dir": (None, _path),
        "limit": (None, _integer(1, nullable=True)),
        "image_folder": (None, _path),  # when set, used instead of `dataset`
        "image_size": (None, _image_size),
    },
    "network": {
        "widths": (_UNET, _integer_list()),
        "blocks_per_level": (_UNET, _integer()),
        "attention_levels": (_UNET, _integer_list()),
        "dropout": (_UNET, _number()),
        "groups": (_UNET, _integer()),
        "num_classes": (_UNET, _integer(nullable=True)),
    },
    # type ddpm: a DiffusionSchedule of the beta keys; type flow: flow matching,
    # a FlowMatchSchedule of the flow keys (shift and the training density and
    # weighting), which ignores the beta keys
    "schedule": {
        "type": ("ddpm", _choice(SCHEDULE_TYPES)),
        "beta_schedule": (_SCHEDULE, _choice(_owned_by("schedule", "BETA_SCHEDULES"))),
        "timesteps": (_SCHEDULE, _integer()),
        "beta_start": (_SCHEDULE, _number()),
        "beta_end": (_SCHEDULE, _number()),
        "shift": (_FLOW, _number()),
        "density": (_FLOW, _choice(_owned_by("schedule", "TIMESTEP_DENSITIES"))),
        "logit_mean": (_FLOW, _number()),
        "logit_std": (_FLOW, _number()),
        "mode_scale": (_FLOW, _number()),
        "weighting": (_FLOW, _choice(_owned_by("schedule", "FLOW_LOSS_WEIGHTINGS"))),
    },
    "model": {
        # null: the schedule's own (epsilon on ddpm, flow on flow)
        "prediction": (_MODEL, _choice(_owned_by("schedule", "ALL_PREDICTIONS"), nullable=True)),
        "ema_decay": (_MODEL, _number(nullable=True)),
        "min_snr_gamma": (_MODEL, _number(nullable=True)),
        "label_dropout": (_MODEL, _number()),
        "prompt_dropout": (_MODEL, _number()),
        "train_text_encoder": (_MODEL, _flag),
    },
    # enabled: a prompted model, its captions from the dataset's class names and
    # templates (built-in datasets) or the folder's metadata.jsonl; the network
    # cross-attends to a TextEncoder of these arguments
    "text": {
        "enabled": (False, _flag),
        "dim": (_TEXT_ENCODER, _integer()),
        "depth": (_TEXT_ENCODER, _integer()),
        "heads": (_TEXT_ENCODER, _integer()),
        "max_length": (_TOKENIZER, _integer()),
    },
    "autoencoder": {  # enabled: a latent diffusion model over this autoencoder's latents
        "enabled": (False, _flag),
        "path": (None, _path),  # a trained autoencoder to reuse; null: train one first
        "widths": (_AUTOENCODER, _integer_list()),
        "latent_channels": (_AUTOENCODER, _integer()),
        "blocks_per_level": (_AUTOENCODER, _integer()),
        "groups": (_AUTOENCODER, _integer()),
        "pad": (_AUTOENCODER, _integer()),
        "reconstruction": (_AUTOENCODER, _choice(_owned_by("autoencoder", "RECONSTRUCTION_LOSSES"))),
        "kl_weight": (_AUTOENCODER, _number()),
        "epochs": (5, _integer(1)),
        "batch_size": (64, _integer(1)),
        "learning_rate": (0.001, _number(0, low_open=True)),
    },
    "training": {
        "batch_size": (128, _integer(1)),
        "epochs": (10, _integer(1)),
        "learning_rate": (0.0002, _number(0, low_open=True)),
        "weight_decay": (0.0, _number(0)),
        "warmup_steps": (0, _integer(0)),
        "lr_decay": ("constant", _choice(("constant", "cosine"))),
        "precision": ("auto", _choice(_owned_by("precision", "PRECISIONS"))),
        "jit_compile": ("auto", _jit_compile),
        "steps_per_epoch": (None, _integer(1, nullable=True)),
    },
    "sampling": {
        "sampler": (_GENERATE, _choice(_owned_by("samplers", "SAMPLERS"))),
        "steps": (_GENERATE, _integer(1)),
        "num_images": (64, _integer(1)),
        "every_n_epochs": (1, _integer(0)),  # 0: no sample grids during training
        "seed": (0, _integer(0)),
        "guidance_scale": (_GENERATE, _number(0)),
        # prompted models: the grid's prompts, one row each; null: one per class
        # of a built-in dataset, from its held-out templates
        "prompts": (None, _text_list),
    },
    "evaluation": {  # FID/KID of EMA samples, logged with the loss
        "every_n_epochs": (0, _integer(0)),  # 0: off
        "num_images": (500, _integer(2)),
        "sampler": ("dpmpp_2m", _choice(_owned_by("samplers", "SAMPLERS"))),
        "steps": (20, _integer(1)),
        "feature_net": (None, _path),  # null: the built-in one for data.dataset
        "reference_images": (None, _integer(2, nullable=True)),  # null: the whole test split
    },
    "distribute": (None, _choice(_owned_by("distribute", "DISTRIBUTE_OPTIONS"), nullable=True)),
    "tensorboard": (False, _flag),
}


def _dotted_keys(schema, prefix=""):
    for key, entry in schema.items():
        yield prefix + key
        if isinstance(entry, dict):
            yield from _dotted_keys(entry, f"{prefix}{key}.")


_KEYS = tuple(_dotted_keys(_SCHEMA))


# -------------------------------------------------------------- public API
def default_config():
    """A fresh nested dict holding every key at its default."""

    def default(key, value):
        return value.value(key) if isinstance(value, _Signature) else copy.deepcopy(value)

    def defaults(schema):
        return {
            key: defaults(entry) if isinstance(entry, dict) else default(key, entry[0])
            for key, entry in schema.items()
        }

    return defaults(_SCHEMA)


def load_config(path, overrides=()):
    """Read a YAML config, merge it over the defaults, apply `--set`-style
    `overrides` (`"a.b=value"`) in order, and return it validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid YAML in {path}: {_yaml_problem(error)}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys; got {loaded!r}")
    config = _merge(default_config(), loaded, _SCHEMA)
    for override in overrides:
        config = apply_override(config, override)
    return validate(config)


def apply_override(config, override):
    """Return a copy of `config` with one `"a.b=value"` override applied; the
    value is parsed with `yaml.safe_load` (types are checked by `validate`)."""
    key, equals, text = override.partition("=")
    key = key.strip()
    if not equals or not key:
        raise ConfigError(f"--set expects key=value, got {override!r}")
    if key not in _KEYS:
        raise _unknown_key(key)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        problem = _yaml_problem(error)
        raise ConfigError(f"--set {key}: {text!r} is not valid YAML ({problem})") from None
    for part in reversed(key.split(".")):
        value = {part: value}
    return _merge(config, value, _SCHEMA)


def validate(config):
    """Check every key and value of `config` (missing keys take their
    defaults) and return a normalised copy: floats are floats, paths strings.

    Raises:
        ConfigError: for an unknown key, a value of the wrong type or out of
            range, or settings that contradict each other.
    """
    if not isinstance(config, dict):
        raise ConfigError(f"a config must be a mapping of config keys; got {config!r}")
    config = _merge(default_config(), config, _SCHEMA)

    def check(values, schema, prefix=""):
        for key, entry in schema.items():
            if isinstance(entry, dict):
                check(values[key], entry, f"{prefix}{key}.")
            else:
                values[key] = entry[1](prefix + key, values[key])

    check(config, _SCHEMA)
    _check_consistency(config)
    return config


def save_config(config, path):
    """Validate `config` and write it as YAML, atomically."""
    from keras_diffusion.images import atomic_write

    text = yaml.safe_dump(validate(config), sort_keys=False, default_flow_style=None)
    return atomic_write(path, lambda temp: Path(temp).write_text(text))


_SCHEDULE_ARGUMENTS = {
    "ddpm": ("beta_schedule", "timesteps", "beta_start", "beta_end"),
    "flow": ("timesteps", "shift", "density", "logit_mean", "logit_std", "mode_scale", "weighting"),
}


def schedule_from_config(section):
    """The schedule a config's `schedule` section describes: a
    `DiffusionSchedule` (`type: ddpm`) or a `FlowMatchSchedule` (`type: flow`),
    each from its own keys."""
    from keras_diffusion import schedule

    kind = {"ddpm": schedule.DiffusionSchedule, "flow": schedule.FlowMatchSchedule}
    return kind[section["type"]](**{key: section[key]
                                    for key in _SCHEDULE_ARGUMENTS[section["type"]]})


# The keys of the `autoencoder` section that are `Autoencoder`'s arguments;
# the others say whether and how to train it.
AUTOENCODER_ARGUMENTS = ("widths", "latent_channels", "blocks_per_level", "groups", "pad",
                         "reconstruction", "kl_weight")


def autoencoder_arguments(config):
    """`Autoencoder`'s keyword arguments from a config's `autoencoder` section."""
    return {key: config["autoencoder"][key] for key in AUTOENCODER_ARGUMENTS}


def dataset_of_run(source):
    """The built-in dataset a model was trained on: from a preset's or a Hub
    repository's record, or from the `config.yaml` that `keras-diffusion
    train` wrote beside the model file."""
    from keras_diffusion.hub import record_of

    dataset = record_of(source).get("dataset")
    if dataset not in DATASETS:
        raise ConfigError(
            f"cannot tell which dataset {source} was trained on (no usable "
            f"{Path(source).parent / 'config.yaml'} or record); pass --dataset ({', '.join(DATASETS)})"
        )
    return dataset


# ---------------------------------------------------------------- helpers
def _merge(config, update, schema, prefix=""):
    """`update` merged over a deep copy of `config`, section by section."""
    merged = copy.deepcopy(config)
    for key, value in update.items():
        dotted = f"{prefix}{key}"
        if key not in schema:
            raise _unknown_key(dotted, value)
        if isinstance(schema[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{dotted} must be a mapping with keys {', '.join(schema[key])}; got {value!r}"
                )
            merged[key] = _merge(merged.get(key, {}), value, schema[key], dotted + ".")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _unknown_key(dotted, value=None):
    # A mistyped section (`trainig: {epochs: 3}`) is reported by its first leaf,
    # so that the suggestion is a whole key.
    while isinstance(value, dict) and value:
        first = next(iter(value))
        dotted, value = f"{dotted}.{first}", value[first]
    section, _, name = dotted.rpartition(".")
    if section == "" or isinstance(_SCHEMA.get(section), dict):
        # A known section: compare names within it, not whole keys, which
        # would all look alike through the shared prefix.
        names = list(_SCHEMA[section]) if section else list(_SCHEMA)
        matches = difflib.get_close_matches(name, names, n=1)
        close = [f"{section}.{match}" if section else match for match in matches]
    else:
        names = list(_SCHEMA)
        same_depth = [key for key in _KEYS if key.count(".") == dotted.count(".")]
        close = difflib.get_close_matches(dotted, same_depth, n=1)
    if close:
        return ConfigError(f"unknown config key {dotted!r}; did you mean {close[0]!r}?")
    where = f"in {section!r}" if isinstance(_SCHEMA.get(section), dict) else "at the top level"
    return ConfigError(f"unknown config key {dotted!r}; valid keys {where}: {', '.join(names)}")


def _yaml_problem(error):
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _check_objects(config):
    """The object sections, by the rules of the objects they build; the
    message names the section, then the argument as the object does."""
    from keras_diffusion.checks import check_guidance
    from keras_diffusion.model import check_model_arguments
    from keras_diffusion.network import check_unet_arguments
    from keras_diffusion.schedule import check_steps

    network, schedule, sampling = config["network"], config["schedule"], config["sampling"]
    evaluation = config["evaluation"]

    def check_model():
        model = dict(config["model"])
        flow = schedule["type"] == "flow"
        model["prediction"] = model["prediction"] or ("flow" if flow else "epsilon")
        check_model_arguments(**model, flow=flow)

    checks = [
        ("network", lambda: check_unet_arguments(image_shape=None, **network)),
        ("schedule", lambda: schedule_from_config(schedule)),
        ("model", check_model),
        ("sampling.steps", lambda: check_steps(sampling["steps"], schedule["timesteps"])),
    ]
    if evaluation["every_n_epochs"]:
        checks.append(
            ("evaluation.steps", lambda: check_steps(evaluation["steps"], schedule["timesteps"]))
        )
    autoencoder = config["autoencoder"]
    text = config["text"]
    if text["enabled"]:
        from keras_diffusion.text import check_text_encoder_arguments
        from keras_diffusion.text import check_tokenizer_arguments

        checks.append(("text", lambda: check_text_encoder_arguments(
            dim=text["dim"], depth=text["depth"], heads=text["heads"])))
        checks.append(("text", lambda: check_tokenizer_arguments(max_length=text["max_length"])))
    if autoencoder["enabled"] and autoencoder["path"] is None:
        from keras_diffusion.autoencoder import check_autoencoder_arguments

        arguments = autoencoder_arguments(config)
        checks.append(("autoencoder", lambda: check_autoencoder_arguments(image_shape=None,
                                                                          **arguments)))
    for section, check in checks:
        try:
            check()
        except ValueError as error:
            raise ConfigError(f"{section}: {error}") from None
    if text["enabled"] and network["num_classes"] is not None:
        raise ConfigError(
            "text.enabled makes a prompted model, which takes captions, not labels: set "
            f"network.num_classes to null (got {network['num_classes']}); the captions name the "
            "classes"
        )
    if sampling["prompts"] is not None and not text["enabled"]:
        raise ConfigError("sampling.prompts needs a prompted model (text.enabled: true); "
                          "set it to null")
    try:
        check_guidance(sampling["guidance_scale"], network["num_classes"] is not None
                       or text["enabled"])
    except ValueError:
        raise ConfigError(
            "sampling.guidance_scale other than 1.0 needs a class-conditional network "
            f"(network.num_classes) or prompts (text.enabled); got "
            f"{sampling['guidance_scale']!r} with num_classes null"
        ) from None


def _check_consistency(config):
    _check_objects(config)
    evaluation = config["evaluation"]
    if evaluation["every_n_epochs"] and config["data"]["image_folder"] is not None:
        raise ConfigError(
            "evaluation.every_n_epochs needs a built-in data.dataset to score against; with "
            "data.image_folder, set it to 0 and pass keras_diffusion.SampleQuality your own "
            "reference images and feature net from Python"
        )
    if config["data"]["image_folder"] is not None and config["data"]["image_size"] is None:
        raise ConfigError("data.image_size must be set when data.image_folder is set; got null")
