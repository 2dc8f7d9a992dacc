"""Bad input, everywhere: each mistake gives one clear message and writes
nothing. Python: a ValueError/TypeError naming the argument, what was given
and what is accepted. Command line: one line on stderr, exit code 2, no
traceback."""

import csv
import functools
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest

import keras_diffusion as kd
from conftest import DATA_DIR
from keras_diffusion import cli
from keras_diffusion.callbacks import NonFiniteLossError
from keras_diffusion.callbacks import TerminateOnNonFiniteLoss
from keras_diffusion.config import ConfigError
from keras_diffusion.config import apply_override
from keras_diffusion.config import default_config
from keras_diffusion.config import validate

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml")


@functools.cache
def tiny_model(num_classes=None):
    """One model of each kind for the module: every case fails before it
    trains or samples, so the models never change."""
    network = kd.UNet((8, 8, 1), widths=(8,), blocks_per_level=1, attention_levels=(),
                      groups=4, num_classes=num_classes)
    model = kd.DiffusionModel(network, kd.DiffusionSchedule("cosine", timesteps=100), seed=0)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    return model


def images(n=4, channels=1, fill=0.5):
    return np.full((n, 8, 8, channels), fill, "float32")


def _with(value, index, *at):
    array = images()
    array[(index, *at)] = value
    return array


def _config(key, value):
    config = default_config()
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
    return config


def _offline_mnist(ctx):
    def no_internet():
        raise OSError("[Errno -3] Temporary failure in name resolution")

    ctx.monkeypatch.delenv("KERAS_DIFFUSION_DATA_DIR", raising=False)
    ctx.monkeypatch.setattr(keras.datasets.mnist, "load_data", no_internet)
    return kd.load_dataset("mnist")


def _inpaint_wrong_mask(ctx):
    model = tiny_model()
    if not hasattr(model, "inpaint"):
        pytest.skip("DiffusionModel.inpaint is not there yet")
    model.inpaint(images(2), np.ones((5, 5)), steps=2)


# (what is wrong, call, exception, message pattern)
PYTHON_CASES = [
    ("channels", lambda ctx: tiny_model().fit(images(channels=3), verbose=0), ValueError,
     r"x \(the training images\) have shape \(H, W, C\) = \(8, 8, 3\) but \(8, 8, 1\) is expected"),
    ("size", lambda ctx: tiny_model().fit(np.zeros((4, 9, 9, 1), "float32"), verbose=0), ValueError,
     r"\(9, 9, 1\) but \(8, 8, 1\) is expected"),
    ("0-255 floats", lambda ctx: tiny_model().fit(images(fill=200.0), verbose=0), ValueError,
     r"must be float in \[0, 1\] or uint8 in \[0, 255\]; got floats in \[200, 200\]: "
     r"they look like \[0, 255\] pixel values"),
    ("[-1, 1] floats", lambda ctx: tiny_model().fit(_with(-1.0, 0), verbose=0), ValueError,
     r"got floats in \[-1, 0.5\]: they look like \[-1, 1\] model-space values"),
    ("NaN", lambda ctx: tiny_model().fit(_with(np.nan, 1, 2, 3), verbose=0), ValueError,
     r"x \(the training images\) contain NaN or Inf values"),
    ("Inf", lambda ctx: tiny_model().fit(_with(np.inf, 0), verbose=0), ValueError, "NaN or Inf"),
    ("empty", lambda ctx: tiny_model().fit(np.zeros((0, 8, 8, 1), "uint8"), verbose=0), ValueError,
     r"x \(the training images\) is empty \(shape \(0, 8, 8, 1\)\); expected at least one image"),
    ("labels out of range", lambda ctx: tiny_model(3).fit(images(), np.array([0, 1, 2, 5]), verbose=0),
     ValueError, r"y \(the labels\) holds labels from 0 to 5; accepted: integers 0 to 2"),
    ("labels not integers", lambda ctx: tiny_model(3).fit(images(), np.array([0.5, 1, 2, 0])),
     TypeError, r"y \(the labels\) must be integers 0 to 2; got dtype float64"),
    ("one label short", lambda ctx: tiny_model(3).fit(images(), np.array([0, 1, 2])), ValueError,
     r"one integer label per image, shape \(4,\); got shape \(3,\)"),
    ("labels, unconditional", lambda ctx: tiny_model().fit(images(), np.array([0, 1, 2, 0])),
     ValueError, r"Labels were passed, but the network is unconditional \(num_classes=None\)"),
    ("no labels, conditional", lambda ctx: tiny_model(3).fit(images()), ValueError,
     r"class-conditional \(num_classes=3\), so fit needs labels"),
    ("unknown sampler", lambda ctx: tiny_model().generate(1, sampler="euler_a"), ValueError,
     r"sampler must be one of .*; got 'euler_a'"),
    ("steps < 1", lambda ctx: tiny_model().generate(1, steps=0), ValueError,
     r"steps must be an integer from 1 to the schedule's timesteps \(100\); got 0"),
    ("steps > timesteps", lambda ctx: tiny_model().generate(1, steps=101), ValueError, "got 101"),
    ("guidance, unconditional", lambda ctx: tiny_model().generate(1, guidance_scale=3.0), ValueError,
     r"guidance_scale=3.0 needs a class-conditional model"),
    ("label out of range", lambda ctx: tiny_model(3).generate(1, labels=[7]), ValueError,
     r"label 7 is out of range; accepted: 0 to 2"),
    ("mistyped key", lambda ctx: validate({"trainig": {"epochs": 3}}), ConfigError,
     r"unknown config key 'trainig.epochs'; did you mean 'training.epochs'\?"),
    ("wrong type", lambda ctx: validate(_config("training.epochs", "three")), ConfigError,
     r"training.epochs must be an integer >= 1; got 'three'"),
    ("--set syntax", lambda ctx: apply_override(default_config(), "training.epochs"), ConfigError,
     r"--set expects key=value, got 'training.epochs'"),
    ("offline", _offline_mnist, RuntimeError,
     r"could not load 'mnist' from keras.datasets \(OSError: .*\)\. Without internet, put "
     r"mnist.npz .* pass data_dir= \(--data-dir on the command line\)"),
    ("missing model", lambda ctx: kd.load_model(ctx.tmp / "nope.keras"), FileNotFoundError,
     "model file not found: .*nope.keras"),
    ("not a model", lambda ctx: kd.load_model(_file(ctx.tmp / "notes.keras", b"hello")), ValueError,
     r"is not a Keras model archive; expected a .keras file"),
    ("mask shape", _inpaint_wrong_mask, ValueError,
     r"mask shape \(5, 5\) does not match images shape \(2, 8, 8, 1\)"),
    ("bad distribute", lambda ctx: validate(_config("distribute", "model_parallel")), ConfigError,
     r"distribute must be one of data_parallel, fsdp or null; got 'model_parallel'"),
]


def _file(path, data):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case,call,error,pattern", PYTHON_CASES, ids=[c[0] for c in PYTHON_CASES])
def test_python_errors_say_what_is_wrong(case, call, error, pattern, tmp_path, monkeypatch):
    with pytest.raises(error, match=pattern):
        call(SimpleNamespace(tmp=tmp_path, monkeypatch=monkeypatch))
    assert not [p for p in tmp_path.rglob("*") if p.name != "notes.keras"], "wrote something"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    tiny_model().save(directory / "unconditional.keras")
    tiny_model(3).save(directory / "conditional.keras")
    good = (directory / "unconditional.keras").read_bytes()
    (directory / "truncated.keras").write_bytes(good[: len(good) // 2])
    (directory / "notes.keras").write_text("not a zip")
    return directory


def _sample(model, *extra):
    return ["sample", "--model", str(model), "--num", "1", "--steps", "2", *extra]


# (what is wrong, argv given the model directory and an output directory, message)
CLI_CASES = [
    ("mistyped key", lambda m, out: ["train", "--config", SMOKE, "--output", out,
                                     "--set", "trainig.epochs=3"],
     "unknown config key 'trainig.epochs'; did you mean 'training.epochs'?"),
    ("wrong type", lambda m, out: ["train", "--config", SMOKE, "--output", out,
                                   "--set", "training.epochs=abc"],
     "training.epochs must be an integer >= 1; got 'abc'"),
    ("--set syntax", lambda m, out: ["train", "--config", SMOKE, "--output", out,
                                     "--set", "training.epochs"],
     "--set expects key=value, got 'training.epochs'"),
    ("dataset missing", lambda m, out: ["train", "--config", SMOKE, "--output", out,
                                        "--data-dir", str(m / "empty")],
     "mnist.npz not found: data_dir (--data-dir or KERAS_DIFFUSION_DATA_DIR) must be a directory"),
    ("guidance in config", lambda m, out: ["train", "--config", SMOKE, "--output", out,
                                           "--set", "sampling.guidance_scale=3"],
     "sampling.guidance_scale other than 1.0 needs a class-conditional network"),
    ("missing model", lambda m, out: _sample(m / "nope.keras", "--out", out / "x.png"),
     "model file not found: "),
    ("truncated model", lambda m, out: _sample(m / "truncated.keras", "--out", out / "x.png"),
     "truncated.keras"),
    ("not a model", lambda m, out: _sample(m / "notes.keras", "--out", out / "x.png"),
     "is not a Keras model archive"),
    ("unknown sampler", lambda m, out: _sample(m / "unconditional.keras", "--sampler", "euler_a",
                                               "--out", out / "x.png"),
     "sampler must be one of"),
    ("steps < 1", lambda m, out: ["sample", "--model", str(m / "unconditional.keras"),
                                  "--steps", "0", "--out", str(out / "x.png")],
     "steps must be an integer from 1 to the schedule's timesteps (100); got 0"),
    ("steps > timesteps", lambda m, out: ["sample", "--model", str(m / "unconditional.keras"),
                                          "--steps", "500", "--out", str(out / "x.png")],
     "got 500"),
    ("guidance, unconditional", lambda m, out: _sample(m / "unconditional.keras", "--guidance", "3",
                                                       "--out", out / "x.png"),
     "guidance_scale=3.0 needs a class-conditional model"),
    ("label, unconditional", lambda m, out: _sample(m / "unconditional.keras", "--label", "1",
                                                    "--out", out / "x.png"),
     "this model is unconditional"),
    ("label out of range", lambda m, out: _sample(m / "conditional.keras", "--label", "7",
                                                  "--out", out / "x.png"),
     "label '7' is out of range; accepted: 0 to 2"),
    ("output not writable", lambda m, out: _sample(m / "unconditional.keras",
                                                   "--out", m / "notes.keras" / "x.png"),
     "is not a writable directory"),
]


@pytest.mark.parametrize("case,argv,message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_errors_are_one_line_exit_2(case, argv, message, model_files, tmp_path, capsys):
    (model_files / "empty").mkdir(exist_ok=True)
    out = tmp_path / "out"
    assert cli.main([str(arg) for arg in argv(model_files, out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err, err
    assert err.startswith("keras-diffusion ")
    assert not out.exists(), f"wrote {list(out.rglob('*'))}"


def test_unknown_backend_name(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--config", SMOKE, "--backend", "mxnet"])
    assert exit_info.value.code == 2
    assert "argument --backend: invalid choice: 'mxnet'" in capsys.readouterr().err

    monkeypatch.setenv("KERAS_BACKEND", "foo")
    assert cli.main(["train", "--config", SMOKE, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == ("keras-diffusion train: error: KERAS_BACKEND is 'foo'; accepted: "
                   "tensorflow, jax, torch (or pass --backend)\n")
    assert not (tmp_path / "out").exists()

    python = subprocess.run([sys.executable, "-c", "import keras_diffusion"],
                            env=dict(os.environ, KERAS_BACKEND="foo"), capture_output=True, text=True)
    assert python.returncode == 1
    assert ("ValueError: KERAS_BACKEND is 'foo'; keras_diffusion runs on tensorflow, jax or torch."
            in python.stderr.strip().splitlines()[-1])


# ---------------------------------------------------------------- NaN guard
def test_nan_guard_names_epoch_step_and_last_good_backup(tmp_path):
    backup = kd.AtomicBackupAndRestore(tmp_path / "backup")
    backup.last_backup = {"epoch": 3, "iterations": 12, "weights": "step_000000012.weights.h5"}
    guard = TerminateOnNonFiniteLoss(backup)
    guard.on_epoch_begin(3)
    guard.on_train_batch_end(0, {"loss": 0.5})
    with pytest.raises(NonFiniteLossError) as error:
        guard.on_train_batch_end(1, {"loss": np.float32("nan")})
    weights = os.path.join(str(tmp_path / "backup"), "step_000000012.weights.h5")
    assert str(error.value) == (
        f"loss became nan in epoch 4, step 2; training stopped; the last good checkpoint is "
        f"{weights}, saved after epoch 3; nothing was saved after it. Lower the learning rate "
        "(or check the data) and resume from it."
    )
    with pytest.raises(NonFiniteLossError, match="loss became inf in epoch 1, step 1; .* there is "
                                                 "no good checkpoint yet, so nothing was saved"):
        fresh = TerminateOnNonFiniteLoss()
        fresh.on_epoch_begin(0)
        fresh.on_train_batch_end(0, {"loss": math.inf})


@pytest.mark.skipif(not (DATA_DIR / "mnist.npz").exists(), reason="needs the shared MNIST file")
def test_cli_stops_at_the_first_nan_and_keeps_good_files(tmp_path, capsys):
    """A learning rate of 1e30 trains one finite step (epoch 1, backed up),
    then the weights overflow: the loss of epoch 2 is not finite."""
    output = tmp_path / "run"
    argv = ["train", "--config", SMOKE, "--data-dir", str(DATA_DIR), "--output", str(output)]
    for key in ("network.widths=[8]", "network.attention_levels=[]", "data.limit=16",
                "training.batch_size=8", "training.epochs=3", "training.steps_per_epoch=1",
                "training.learning_rate=1e30", "sampling.every_n_epochs=0",
                "evaluation.every_n_epochs=0"):
        argv += ["--set", key]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    found = re.search(r"error: loss became (nan|inf|-inf) in epoch (\d+), step 1; training stopped; "
                      r"the last good checkpoint is (\S+), saved after epoch (\d+); nothing was "
                      r"saved after it\.", err)
    assert found, err
    epoch, weights, good_epochs = int(found[2]), Path(found[3]), int(found[4])
    assert epoch >= 2 and good_epochs == epoch - 1
    assert weights == output / "backup" / f"step_{good_epochs:09d}.weights.h5" and weights.exists()
    assert kd.callbacks.read_backup_record(output / "backup")["epoch"] == good_epochs
    assert not (output / "model.keras").exists()
    with open(output / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == good_epochs and all(math.isfinite(float(row["loss"])) for row in rows)
