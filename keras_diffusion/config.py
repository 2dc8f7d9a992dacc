"""The run configuration: the one place that knows its schema.

A config is a nested dict with the sections below; the YAML files in
`configs/` are the same dicts, merged over the defaults, and a command-line
`--set a.b=value` overrides one key (the value is read as YAML, so `3`,
`1e-4`, `[1, 2]`, `null` and `true` mean what they say).

Every mistake raises `ConfigError` with a one-line message that names the
key, what it accepts and what it got, e.g.
`unknown config key 'trainig.epochs'; did you mean 'training.epochs'?`.

Importing this module does not import Keras; `validate` does (the schedule
and sampler names it checks against live in modules that use Keras), so a
caller that chooses `KERAS_BACKEND` must do so before validating.
"""

import copy
import difflib
import importlib
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


def _integer_list(low, allow_empty):
    expected = f"a {'' if allow_empty else 'non-empty '}list of integers >= {low}"

    def check(key, value):
        if (
            not isinstance(value, (list, tuple))
            or not (value or allow_empty)
            or not all(_is_integer(item, low) for item in value)
        ):
            _fail(key, expected, value)
        return list(value)

    return check


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
        "widths": ([32, 64, 128], _integer_list(1, allow_empty=False)),
        "blocks_per_level": (2, _integer(1)),
        "attention_levels": ([2], _integer_list(0, allow_empty=True)),
        "dropout": (0.0, _number(0, 1, high_open=True)),
        "groups": (8, _integer(1)),
        "num_classes": (None, _integer(1, nullable=True)),
    },
    "schedule": {
        "beta_schedule": ("cosine", _choice(_owned_by("schedule", "BETA_SCHEDULES"))),
        "timesteps": (1000, _integer(2)),
        "beta_start": (0.0001, _number(0, 1, low_open=True, high_open=True)),
        "beta_end": (0.02, _number(0, 1, low_open=True, high_open=True)),
    },
    "model": {
        "prediction": ("epsilon", _choice(_owned_by("schedule", "PREDICTION_TYPES"))),
        "ema_decay": (0.999, _number(0, 1, high_open=True)),
        "min_snr_gamma": (None, _number(0, low_open=True, nullable=True)),
        "label_dropout": (0.1, _number(0, 1, high_open=True)),
    },
    "training": {
        "batch_size": (128, _integer(1)),
        "epochs": (10, _integer(1)),
        "learning_rate": (0.0002, _number(0, low_open=True)),
        "weight_decay": (0.0, _number(0)),
        "warmup_steps": (0, _integer(0)),
        "lr_decay": ("constant", _choice(("constant", "cosine"))),
        "precision": ("float32", _choice(("float32", "mixed_float16", "mixed_bfloat16"))),
        "jit_compile": ("auto", _jit_compile),
        "steps_per_epoch": (None, _integer(1, nullable=True)),
    },
    "sampling": {
        "sampler": ("ddim", _choice(_owned_by("samplers", "SAMPLERS"))),
        "steps": (50, _integer(1)),
        "num_images": (64, _integer(1)),
        "every_n_epochs": (1, _integer(0)),  # 0: no sample grids during training
        "seed": (0, _integer(0)),
        "guidance_scale": (1.0, _number(0)),
    },
    "evaluation": {  # FID/KID of EMA samples, logged with the loss
        "every_n_epochs": (0, _integer(0)),  # 0: off
        "num_images": (500, _integer(2)),
        "sampler": ("dpmpp_2m", _choice(_owned_by("samplers", "SAMPLERS"))),
        "steps": (20, _integer(1)),
        "feature_net": (None, _path),  # null: the built-in one for data.dataset
    },
    "distribute": (None, _choice(("data_parallel",), nullable=True)),
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

    def defaults(schema):
        return {
            key: defaults(entry) if isinstance(entry, dict) else copy.deepcopy(entry[0])
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


def dataset_of_run(model_path):
    """The built-in dataset a model was trained on, read from the
    `config.yaml` that `keras-diffusion train` wrote beside it."""
    config_path = Path(model_path).parent / "config.yaml"
    try:
        data = yaml.safe_load(config_path.read_text()).get("data", {})
    except (OSError, yaml.YAMLError, AttributeError):
        data = {}
    if data.get("image_folder") or data.get("dataset") not in DATASETS:
        raise ConfigError(
            f"cannot tell which dataset {model_path} was trained on (no usable {config_path}); "
            f"pass --dataset ({', '.join(DATASETS)})"
        )
    return data["dataset"]


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


def _check_consistency(config):
    network, schedule, sampling = config["network"], config["schedule"], config["sampling"]
    levels = len(network["widths"])
    if any(level >= levels for level in network["attention_levels"]):
        raise ConfigError(
            f"network.attention_levels must index network.widths (0 to {levels - 1}); "
            f"got {network['attention_levels']!r}"
        )
    if any(width % network["groups"] for width in network["widths"]):
        raise ConfigError(
            f"network.widths must be multiples of network.groups ({network['groups']}); "
            f"got {network['widths']!r}"
        )
    if schedule["beta_start"] >= schedule["beta_end"]:
        raise ConfigError(
            f"schedule.beta_start must be below schedule.beta_end; got "
            f"{schedule['beta_start']!r} and {schedule['beta_end']!r}"
        )
    if sampling["steps"] > schedule["timesteps"]:
        raise ConfigError(
            f"sampling.steps must be at most schedule.timesteps ({schedule['timesteps']}); "
            f"got {sampling['steps']!r}"
        )
    if sampling["guidance_scale"] != 1.0 and network["num_classes"] is None:
        raise ConfigError(
            "sampling.guidance_scale other than 1.0 needs a class-conditional network "
            f"(network.num_classes); got {sampling['guidance_scale']!r} with num_classes null"
        )
    evaluation = config["evaluation"]
    if evaluation["every_n_epochs"] and evaluation["steps"] > schedule["timesteps"]:
        raise ConfigError(
            f"evaluation.steps must be at most schedule.timesteps ({schedule['timesteps']}); "
            f"got {evaluation['steps']!r}"
        )
    if evaluation["every_n_epochs"] and config["data"]["image_folder"] is not None:
        raise ConfigError(
            "evaluation.every_n_epochs needs a built-in data.dataset to score against; with "
            "data.image_folder, set it to 0 and pass keras_diffusion.SampleQuality your own "
            "reference images and feature net from Python"
        )
    if config["data"]["image_folder"] is not None and config["data"]["image_size"] is None:
        raise ConfigError("data.image_size must be set when data.image_folder is set; got null")
