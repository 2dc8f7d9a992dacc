import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from keras_diffusion.config import (
    ConfigError,
    apply_override,
    default_config,
    load_config,
    save_config,
    validate,
)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def _write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_defaults():
    config = default_config()
    assert config["seed"] == 0
    assert config["network"]["widths"] == [32, 64, 128]
    assert config["training"]["learning_rate"] == 0.0002
    assert config["sampling"]["sampler"] == "ddim"
    assert config["distribute"] is None and config["tensorboard"] is False
    assert validate(config) == config


def test_object_sections_default_to_the_constructors_defaults():
    """One place for each default: the signature of the object it builds."""
    import inspect

    import keras_diffusion as kd

    def default(target, name):
        value = inspect.signature(target).parameters[name].default
        return list(value) if isinstance(value, tuple) else value

    config = default_config()
    for section, target in (("network", kd.UNet), ("model", kd.DiffusionModel)):
        assert config[section] == {name: default(target, name) for name in config[section]}
    # The schedule's keys: each schedule's own (timesteps, shared, the same in both).
    assert config["schedule"].pop("type") == "ddpm"
    for name, value in config["schedule"].items():
        owner = (kd.DiffusionSchedule if name in inspect.signature(kd.DiffusionSchedule).parameters
                 else kd.FlowMatchSchedule)
        assert value == default(owner, name), name
    assert default(kd.DiffusionSchedule, "timesteps") == default(kd.FlowMatchSchedule, "timesteps")
    for name in ("sampler", "steps", "guidance_scale"):
        assert config["sampling"][name] == default(kd.DiffusionModel.generate, name)


def test_default_config_is_a_fresh_copy():
    default_config()["network"]["widths"].append(256)
    assert default_config()["network"]["widths"] == [32, 64, 128]


def test_validate_fills_missing_keys_and_does_not_mutate():
    partial = {"training": {"epochs": 3}}
    config = validate(partial)
    assert config["training"]["epochs"] == 3 and config["training"]["batch_size"] == 128
    assert partial == {"training": {"epochs": 3}}


@pytest.mark.parametrize("config_path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(config_path):
    config = load_config(config_path)
    assert config == validate(config)


def test_shipped_configs_exist():
    names = {path.stem for path in CONFIG_DIR.glob("*.yaml")}
    assert {"smoke", "mnist", "fashion_mnist", "cifar10"} <= names


def test_file_merged_over_defaults_then_overrides(tmp_path):
    path = _write(tmp_path, "training:\n  epochs: 4\n  learning_rate: 1e-4\nnetwork:\n  widths: [16, 32]\n  attention_levels: []\n")
    config = load_config(
        path,
        [
            "training.batch_size=64",
            "schedule.beta_end=2e-2",
            "network.widths=[8, 16]",
            "network.num_classes=10",
            "sampling.guidance_scale=3",
            "data.limit=null",
            "tensorboard=true",
            "training.jit_compile=false",
            "network={dropout: 0.1}",
        ],
    )
    assert config["training"]["epochs"] == 4
    # YAML 1.1 reads 1e-4 as a string; float fields convert it.
    assert config["training"]["learning_rate"] == pytest.approx(1e-4)
    assert config["training"]["batch_size"] == 64
    assert config["schedule"]["beta_end"] == pytest.approx(0.02)
    assert config["network"]["widths"] == [8, 16] and config["network"]["dropout"] == 0.1
    assert config["network"]["blocks_per_level"] == 2
    assert config["sampling"]["guidance_scale"] == 3.0 and isinstance(config["sampling"]["guidance_scale"], float)
    assert config["data"]["limit"] is None
    assert config["tensorboard"] is True and config["training"]["jit_compile"] is False


def test_later_overrides_win():
    config = apply_override(default_config(), "seed=1")
    config = apply_override(config, "seed = 2")
    assert config["seed"] == 2


def test_apply_override_returns_a_copy():
    config = default_config()
    apply_override(config, "training.epochs=99")
    assert config["training"]["epochs"] == 10


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(_write(tmp_path, "")) == default_config()


def test_save_config_round_trip(tmp_path):
    config = apply_override(default_config(), "training.learning_rate=3e-4")
    path = save_config(config, tmp_path / "out" / "config.yaml")
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
    assert load_config(path) == validate(config)
    assert yaml.safe_load(path.read_text())["training"]["learning_rate"] == pytest.approx(3e-4)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "override, message",
    [
        ("trainig.epochs=3", r"^unknown config key 'trainig.epochs'; did you mean 'training.epochs'\?$"),
        ("training.epoch=3", r"did you mean 'training.epochs'\?"),
        ("sede=1", r"did you mean 'seed'\?"),
        ("seed.value=1", r"unknown config key 'seed.value'"),
        ("training.zzz=1", r"unknown config key 'training.zzz'; valid keys in 'training': batch_size, epochs"),
        ("epochs", r"^--set expects key=value, got 'epochs'$"),
        ("=3", r"--set expects key=value, got '=3'"),
        ("network.widths=[1, 2", r"--set network.widths: '\[1, 2' is not valid YAML"),
    ],
)
def test_override_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_override(default_config(), override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.epochs=ten", r"^training.epochs must be an integer >= 1; got 'ten'$"),
        ("training.epochs=2.5", r"training.epochs must be an integer"),
        ("training.epochs=true", r"training.epochs must be an integer"),
        ("training.epochs=0", r"training.epochs must be an integer >= 1; got 0"),
        ("training.learning_rate=fast", r"training.learning_rate must be a number > 0; got 'fast'"),
        ("training.learning_rate=-1e-4", r"training.learning_rate must be a number > 0"),
        ("training.learning_rate=.nan", r"training.learning_rate must be a number > 0"),
        # The object sections are checked by the objects' own rules, named by section.
        ("model.ema_decay=1.0", r"^model: ema_decay must be in \[0, 1\) or None; got 1.0\.$"),
        ("model.ema_decay=high", r"^model.ema_decay must be a number or null; got 'high'$"),
        ("training.lr_decay=cosin", r"training.lr_decay must be one of constant, cosine; got 'cosin'; did you mean 'cosine'\?"),
        ("training.precision=fp16", r"training.precision must be one of auto, float32, mixed_float16, mixed_bfloat16"),
        ("training.jit_compile=maybe", r"training.jit_compile must be true, false or auto; got 'maybe'"),
        ("schedule.beta_schedule=quadratic", r"schedule.beta_schedule must be one of linear, scaled_linear, cosine, sigmoid"),
        ("model.prediction=eps", r"model.prediction must be one of epsilon, v, x0"),
        ("sampling.sampler=plms", r"sampling.sampler must be one of ddpm, ddim, euler"),
        ("distribute=mirrored", r"distribute must be one of data_parallel, fsdp or null; got 'mirrored'"),
        ("tensorboard=1", r"tensorboard must be true or false; got 1"),
        ("network.widths=[]", r"network: widths must be a non-empty sequence of positive integers"),
        ("network.widths=[8, x]", r"^network.widths must be a list of integers; got \[8, 'x'\]$"),
        ("data.dataset=svhn", r"data.dataset must be one of mnist, fashion_mnist, cifar10; got 'svhn'"),
        ("data.image_size=[1, 2, 3]", r"data.image_size must be an integer >= 1, \[height, width\] or null"),
        ("data.data_dir=3", r"data.data_dir must be a path or null; got 3"),
        ("training=5", r"training must be a mapping with keys batch_size, epochs"),
        ("network.attention_levels=[3]", r"network: attention_levels must be level indices from 0 to 2"),
        ("network.groups=5", r"network: every entry of widths must be divisible by groups=5"),
        ("network.groups=0", r"^network: groups must be a positive integer; got 0\.$"),
        ("schedule.beta_start=0.05", r"schedule: beta_start and beta_end must satisfy 0 < beta_start < beta_end"),
        ("schedule.timesteps=1", r"^schedule: timesteps must be an integer >= 2; got 1\.$"),
        ("sampling.steps=2000", r"sampling.steps: steps must be an integer from 1 to the schedule's timesteps \(1000\); got 2000"),
        ("sampling.guidance_scale=2", r"sampling.guidance_scale other than 1.0 needs .*network.num_classes"),
        ("data.image_folder=photos", r"data.image_size must be set when data.image_folder is set"),
        ("evaluation.reference_images=1", r"evaluation.reference_images must be an integer >= 2 or null; got 1"),
    ],
)
def test_value_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(apply_override(default_config(), override))


def test_errors_are_one_line_value_errors():
    with pytest.raises(ValueError) as info:
        validate({"training": {"epochs": "ten"}})
    assert "\n" not in str(info.value)


def test_unknown_key_in_file(tmp_path):
    path = _write(tmp_path, "trainig:\n  epochs: 3\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'trainig.epochs'; did you mean 'training.epochs'\?"):
        load_config(path)


def test_override_error_in_load_config(tmp_path):
    with pytest.raises(ConfigError, match="training.epochs must be an integer"):
        load_config(_write(tmp_path, "seed: 1\n"), ["training.epochs=ten"])


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"invalid YAML in .*run.yaml: .*\(line \d+, column \d+\)$") as info:
        load_config(_write(tmp_path, "training:\n  epochs: [1, 2\n"))
    assert "\n" not in str(info.value)


def test_file_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="must hold a mapping of config keys; got"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))


def test_cli_import_leaves_backend_choice_open():
    # Started as the `keras-diffusion` command, the package defers its imports so
    # that --backend can set KERAS_BACKEND after the arguments are read.
    code = (
        "import sys; sys.argv = ['keras-diffusion']; "
        "import keras_diffusion.cli, keras_diffusion.config, keras_diffusion.images; "
        "print('keras' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
