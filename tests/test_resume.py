"""Resuming: a killed `keras-diffusion train` continues where it stopped, and
the backup callback restores the whole training state."""

import csv
import importlib.util
import json
import os
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from keras import ops

import keras_diffusion as kd
from keras_diffusion import cli
from conftest import BACKEND
from conftest import DATA_DIR
from conftest import SMOKE
from conftest import TINY
from conftest import kill_after_first_backup
from conftest import one_level_model
from conftest import plumbing_optimizer
from conftest import squares
from keras_diffusion.callbacks import read_backup_record

HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def history_rows(output):
    with open(output / "history.csv") as f:
        return list(csv.DictReader(f))


def temporaries(output):
    return [p for p in output.rglob(".*") if p.is_file()]


def _values(variables):
    return [ops.convert_to_numpy(v).copy() for v in variables]


class _Crash(Exception):
    pass


class _CrashAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise _Crash()


def test_backup_restores_the_whole_training_state(tmp_path, monkeypatch):
    # One model throughout: on TensorFlow and JAX each new model costs a compile.
    # Compiled, unlike the other plumbing models: the restore must reach the
    # state a compiled train step holds.
    model = one_level_model()
    model.compile(optimizer=plumbing_optimizer())
    x = squares()
    backup = kd.AtomicBackupAndRestore(tmp_path / "backup", delete_checkpoint=False)
    with pytest.raises(_Crash):
        model.fit(x, batch_size=8, epochs=3, verbose=0, callbacks=[backup, _CrashAtEpoch(2)])
    record = read_backup_record(tmp_path / "backup")
    assert record["epoch"] == 2 and record["iterations"] == 8
    state = [v for v in model.optimizer.variables if v.name != "learning_rate"]
    saved = {
        "weights": _values(model.weights),
        "optimizer": _values(state),
        "rng": _values([model.seed_generator.state]),
    }
    # A new process would build the model afresh: scramble everything, and
    # compile with a lower learning rate, which the restore must keep.
    for variable in model.weights + state + [model.seed_generator.state]:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    model.optimizer.learning_rate = 5e-4

    class Check(keras.callbacks.Callback):
        # After the backup's on_train_begin; JAX hides the variables once the
        # first step starts.
        def on_train_begin(self, logs=None):
            for key, variables in (("weights", self.model.weights),
                                   ("optimizer", state),
                                   ("rng", [self.model.seed_generator.state])):
                assert len(saved[key]) == len(variables)
                for want, got in zip(saved[key], _values(variables)):
                    np.testing.assert_array_equal(want, got, err_msg=key)
            assert np.isclose(float(ops.convert_to_numpy(self.model.optimizer.learning_rate)), 5e-4)

        def on_epoch_begin(self, epoch, logs=None):
            self.first_epoch = getattr(self, "first_epoch", epoch)

    check = Check()
    history = model.fit(x, batch_size=8, epochs=3, verbose=0, callbacks=[backup, check])
    assert check.first_epoch == 2 and len(history.history["loss"]) == 1
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 12
    assert float(ops.convert_to_numpy(model.ema_updates)) == 12.0

    # A kill while the next backup is written leaves the last one usable.
    before = read_backup_record(tmp_path / "backup")
    assert before["epoch"] == 3

    def dies_half_way(filepath, overwrite=True):
        Path(filepath).write_bytes(b"\x89HDF half a file")
        raise KeyboardInterrupt  # as close to a kill as a test gets

    monkeypatch.setattr(model, "save_weights", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, batch_size=8, epochs=4, verbose=0, callbacks=[backup])
    assert read_backup_record(tmp_path / "backup") == before
    assert sorted(os.listdir(tmp_path / "backup")) == ["backup.json", before["weights"]]


def _train_command(output, *extra):
    # No sampling or scoring: the run is about its backup (the smoke run scores).
    sets = [arg for key in TINY + ["training.epochs=2", "sampling.every_n_epochs=0",
                                   "evaluation.every_n_epochs=0"]
            for arg in ("--set", key)]
    return [sys.executable, "-m", "keras_diffusion.cli", "train", "--config", str(SMOKE),
            "--data-dir", str(DATA_DIR), "--output", str(output), *sets, *extra]


# A real kill of a real run, under PyTorch only: what it checks (files a kill
# cannot corrupt, the refusal without --resume, the continued history) is
# the same code on every backend, and test_backup_restores_the_whole_training_state
# checks each backend's restored training state.
@pytest.mark.skipif(not (DATA_DIR / "mnist.npz").exists(), reason="needs the shared MNIST file")
@pytest.mark.skipif(BACKEND != "torch", reason="backend-independent; run under PyTorch")
def test_cli_killed_mid_epoch_resumes(tmp_path, capsys):
    output = tmp_path / "run"
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="2")
    # The backup is the last thing an epoch does: 0.05 s after it the run is
    # starting the second epoch (4 steps), and the kill lands in it.
    kill_after_first_backup(_train_command(output), output / "backup", env, settle=0.05)

    record = read_backup_record(output / "backup")
    assert record["epoch"] == 1 and record["iterations"] == 4
    assert not (output / "model.keras").exists()
    rows = history_rows(output)
    # The history is written before the backup: it may be one epoch ahead.
    assert [row["epoch"] for row in rows][:record["epoch"]] == [str(e) for e in range(record["epoch"])]
    before = [float(row["loss"]) for row in rows[:record["epoch"]]]

    assert cli.main(_train_command(output)[3:]) == 2  # without --resume: refused, in-process
    assert "continue it with resume=True (--resume" in capsys.readouterr().err

    # The resumed run is a new `keras-diffusion train --resume`, in-process too:
    # it starts from the files the killed process left.
    logging = ["--set", "tensorboard=true"] if HAVE_TENSORBOARD else []
    code = cli.main(_train_command(output, "--resume", *logging)[3:])
    resumed = capsys.readouterr()
    assert code == 0, resumed.err[-3000:]
    assert "Epoch 1/2" not in resumed.out and "Epoch 2/2" in resumed.out

    rows = history_rows(output)
    assert [row["epoch"] for row in rows] == ["0", "1"]
    losses = [float(row["loss"]) for row in rows]
    assert losses[:len(before)] == before, "rows of finished epochs are kept as they were"
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    model = kd.load_model(output / "model.keras")
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == 8
    assert float(ops.convert_to_numpy(model.ema_updates)) == 8.0
    assert read_backup_record(output / "backup")["epoch"] == 2
    assert json.loads(json.dumps(record))  # the record is plain JSON
    assert not temporaries(output), temporaries(output)
    if HAVE_TENSORBOARD:
        assert "epoch_loss" in _summary_tags(output / "tensorboard" / "train")


@pytest.mark.skipif(not HAVE_TENSORBOARD, reason="needs the tensorboard package")
def test_sample_grid_logs_images_for_tensorboard(tmp_path):
    grid = kd.SampleGrid(tmp_path / "samples", num_images=2, steps=1, tensorboard_dir=tmp_path / "tb")
    grid.set_model(one_level_model())
    grid.write_grid(3)
    assert (tmp_path / "samples" / "epoch_0003.png").exists()
    assert _summary_tags(tmp_path / "tb") == {"samples"}


def _summary_tags(directory):
    import tensorflow as tf

    tags = set()
    for path in Path(directory).glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            tags.update(value.tag for value in event.summary.value)
    return tags
