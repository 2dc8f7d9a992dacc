"""Training callbacks: sample grids and sample quality during training,
crash-safe backups and history, and a guard that stops on a non-finite loss."""

import csv
import io
import json
import math
import os
import sys
import time

import keras
import numpy as np

from keras_diffusion.checks import check_integer
from keras_diffusion.images import atomic_write
from keras_diffusion.images import save_image_grid
from keras_diffusion.images import save_loss_curve
from keras_diffusion.text import check_texts


class SampleGrid(keras.callbacks.Callback):
    """Write a PNG grid of fixed-seed samples every `every_n_epochs` epochs,
    and a loss-curve PNG when training ends.

    Samples come from the model's EMA weights (`DiffusionModel.generate`), with
    the same noise every time, so successive grids show one set of samples
    improving. Files: `<directory>/epoch_0001.png`, ..., and `loss.png` in
    `loss_curve_dir` (default: the parent of `directory`).

    Args:
        directory: where the grids go (created if missing).
        every_n_epochs: write a grid after every N-th epoch (and the last).
        num_images: images per grid.
        steps, sampler, seed: passed to `generate`.
        labels, guidance_scale: for class-conditional models; by default a
            conditional model is sampled with labels 0, 1, 2, ... cycling.
        prompts: for prompted models, a list of prompts, one row of the grid
            each (`num_images // len(prompts)` images per prompt, at least
            one); None samples the empty prompt.
        loss_curve_dir: directory for `loss.png`, or None for the parent of
            `directory`.
        tensorboard_dir: if set, each grid's images are also logged there
            as a TensorBoard image summary (needs TensorFlow installed; works
            on every backend).
        image_size: `(H, W)` of the samples, for a model that takes any size
            it divides (Stable Diffusion trained at another size); None: the
            model's own.
    """

    def __init__(
        self,
        directory,
        every_n_epochs=1,
        num_images=16,
        steps=50,
        sampler="ddim",
        seed=0,
        labels=None,
        guidance_scale=1.0,
        loss_curve_dir=None,
        tensorboard_dir=None,
        prompts=None,
        image_size=None,
    ):
        super().__init__()
        _check_every(every_n_epochs)
        self.directory = os.fspath(directory)
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.steps = steps
        self.sampler = sampler
        self.seed = seed
        self.labels = labels
        self.prompts = None if prompts is None else check_texts(prompts)
        self.guidance_scale = guidance_scale
        self.image_size = None if image_size is None else tuple(image_size)
        self.loss_curve_dir = loss_curve_dir or os.path.dirname(os.path.abspath(self.directory))
        self.tensorboard_dir = None if tensorboard_dir is None else os.fspath(tensorboard_dir)
        self._writer = None
        self.losses = {}
        self._last_written = None
        self._last_epoch = 0

    def on_train_begin(self, logs=None):
        self.losses = {}
        self._last_written = None
        self._last_epoch = 0

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            if key.endswith("loss"):
                self.losses.setdefault(key, []).append(float(value))
        # The epoch index, not the number of epochs seen: a resumed fit starts late.
        self._last_epoch = epoch + 1
        if (epoch + 1) % self.every_n_epochs == 0:
            self.write_grid(epoch + 1)

    def on_train_end(self, logs=None):
        if self._last_epoch and self._last_written != self._last_epoch:
            self.write_grid(self._last_epoch)
        if self.losses:
            save_loss_curve(self.losses, os.path.join(self.loss_curve_dir, "loss.png"))

    def write_grid(self, epoch):
        """Sample and write `epoch_<epoch>.png`; returns its path."""
        labels, prompts, nrow, num = self.labels, None, None, self.num_images
        if labels is None and self.model.conditional:
            labels = [i % self.model.num_classes for i in range(num)]
        if self.prompts is not None:
            nrow = max(1, num // len(self.prompts))
            prompts = [prompt for prompt in self.prompts for _ in range(nrow)]
            num = len(prompts)
        guided = self.model.guided
        images = self.model.generate(
            num,
            steps=self.steps,
            sampler=self.sampler,
            seed=self.seed,
            labels=labels,
            prompts=prompts,
            guidance_scale=self.guidance_scale if guided else 1.0,
            **({} if self.image_size is None else {"image_size": self.image_size}),
        )
        path = os.path.join(self.directory, f"epoch_{epoch:04d}.png")
        save_image_grid(images, path, nrow=nrow, title=f"epoch {epoch}")
        if self.tensorboard_dir is not None:
            self._log_images(images, epoch)
        self._last_written = epoch
        return path

    def _log_images(self, images, step):
        from keras_diffusion.quiet import import_tensorflow

        tf = import_tensorflow()
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.tensorboard_dir)
        with self._writer.as_default():
            tf.summary.image("samples", np.asarray(images), step=step, max_outputs=len(images))
        self._writer.flush()


def _check_every(every_n_epochs):
    check_integer("every_n_epochs", every_n_epochs)


class SampleQuality(keras.callbacks.Callback):
    """Score EMA samples with FID and KID every `every_n_epochs` epochs (and
    after the last), adding `fid`, `kid` and, for a class-conditional model,
    `label_accuracy` (for a prompted one, `prompt_adherence`) to the epoch's
    logs, so that the progress bar,
    `history.csv`, `History` and TensorBoard show quality next to the loss.
    Put it before the loggers in the callback list.

    The samples use a fixed seed, so successive scores differ only through
    the weights. A few hundred samples make a noisy, biased FID (it falls as
    the sample count grows); compare scores made with the same count.

    Args:
        reference_images: real images in [0, 1], e.g. the test split.
        feature_net: a built-in feature net name, a `.weights.h5` path or a
            `keras_diffusion.metrics.FeatureNet`.
        every_n_epochs: how often to score.
        num_images, steps, sampler, seed, guidance_scale: how to sample.
        prompts: for a prompted model, the prompts of each class of the
            feature net, as `keras_diffusion.metrics.score_model` takes them.
    """

    def __init__(self, reference_images, feature_net="mnist", every_n_epochs=5, num_images=500,
                 steps=20, sampler="dpmpp_2m", seed=0, guidance_scale=1.0, prompts=None):
        super().__init__()
        from keras_diffusion import metrics

        _check_every(every_n_epochs)
        self.every_n_epochs = every_n_epochs
        self.num_images, self.steps, self.sampler = num_images, steps, sampler
        self.seed, self.guidance_scale = seed, guidance_scale
        self.prompts = prompts
        self.feature_net = metrics.get_feature_net(feature_net)
        self.reference_features = self.feature_net.features(reference_images)
        self.scores = {}

    def on_epoch_end(self, epoch, logs=None):
        last = self.params and epoch + 1 == self.params.get("epochs")
        if (epoch + 1) % self.every_n_epochs and not last:
            return
        from keras_diffusion.metrics import score_model

        scores = score_model(
            self.model, feature_net=self.feature_net, reference_features=self.reference_features,
            num_images=self.num_images, steps=self.steps, sampler=self.sampler, seed=self.seed,
            guidance_scale=self.guidance_scale if self.model.guided else 1.0,
            kid_subset_size=self.num_images, prompts=self.prompts,
        )
        self.scores[epoch] = scores
        if logs is not None:
            logs.update({key: scores[key] for key in ("fid", "kid", "label_accuracy",
                                                      "prompt_adherence") if key in scores})


class AtomicCSVLogger(keras.callbacks.Callback):
    """Per-epoch logs as CSV, like `keras.callbacks.CSVLogger(append=True)`,
    but safe to kill and resume.

    The whole file is rewritten through `atomic_write` after each epoch (it
    holds one short row per epoch), so it is never half-written. When `fit`
    starts at epoch `k` (a run resumed by a backup callback), rows for epochs
    `k` and later, left by the interrupted run, are dropped: every epoch
    appears once. Columns: `epoch` (0-based, as Keras counts) and the logs,
    sorted by name.

    Args:
        filename: the CSV file; rows already in it are kept.
    """

    def __init__(self, filename):
        super().__init__()
        self.filename = os.fspath(filename)
        self.rows = []
        self._first_epoch = True

    def on_train_begin(self, logs=None):
        self.rows = _read_csv_rows(self.filename)
        self._first_epoch = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._first_epoch:
            self.rows = [row for row in self.rows if int(row["epoch"]) < epoch]
            self._first_epoch = False

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch}
        for key, value in sorted((logs or {}).items()):
            row[key] = float(np.asarray(value))
        self.rows.append(row)
        keys = ["epoch"] + sorted({key for row in self.rows for key in row} - {"epoch"})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=keys, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write(self.filename, lambda temp: _write_text(temp, text.getvalue()))

    @property
    def history(self):
        """`{key: [value per epoch]}` over every epoch in the file."""
        keys = sorted({key for row in self.rows for key in row} - {"epoch"})
        return {key: [float(row[key]) for row in self.rows if row.get(key) not in (None, "")]
                for key in keys}


def _read_csv_rows(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "epoch" not in rows[0]:
        raise ValueError(f"{path} is not a training history: it has no 'epoch' column.")
    return rows


def _write_text(path, text):
    with open(path, "w", newline="") as f:
        f.write(text)


class AtomicBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`keras.callbacks.BackupAndRestore` whose backups survive a kill at any
    moment, and which also brings back the model's random-number state.

    Keras overwrites `latest.weights.h5` and then its metadata in place: a
    kill during the write leaves a corrupt file, and a kill between the two
    leaves weights one epoch ahead of the epoch counter. Here each backup is
    a new weights file written through `atomic_write`; `backup.json`,
    replaced atomically after it, names that file, and older weights files
    are deleted only then. Whenever the process dies, `backup.json` names a
    complete weights file of the epoch it records.

    Restored: the model's weights (network and EMA weights with their update
    count), the optimizer's state (moments and iteration count, so learning
    rate schedules continue), the epoch counter, and the state of every
    `keras.random.SeedGenerator` in the model (the timesteps and noise drawn
    in training), which `save_weights` leaves out. Kept as compiled: a
    constant learning rate, so that a run can go on with a lower one. Not
    restored: the order in which `fit` shuffles the data, which comes from
    the global seed.

    Args:
        backup_dir: a directory used only by this callback.
        save_freq: `"epoch"`, or an integer to also back up every that many
            batches; as with Keras, a run resumed from such a backup starts
            the interrupted epoch again from its first batch.
        delete_checkpoint: delete `backup_dir` when `fit` ends normally.

    Example:

    >>> backup = AtomicBackupAndRestore("runs/mnist/backup")
    >>> model.fit(x, epochs=10, callbacks=[backup])  # killed during epoch 6
    >>> model.fit(x, epochs=10, callbacks=[backup])  # runs epochs 6 to 10
    """

    RECORD = "backup.json"

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        super().__init__(os.fspath(backup_dir), save_freq=save_freq,
                         delete_checkpoint=delete_checkpoint)
        self.last_backup = None

    def on_train_begin(self, logs=None):
        self._load_model()

    def _load_model(self):
        record = read_backup_record(self.backup_dir)
        self.last_backup = record
        if record is None:
            return
        weights = os.path.join(self.backup_dir, record["weights"])
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        # A constant learning rate is an optimizer variable, but a setting, not
        # state: keep the compiled one, so a run can resume with a lower rate.
        rates = [(v, keras.ops.convert_to_numpy(v)) for v in getattr(optimizer, "variables", [])
                 if v.name == "learning_rate"]
        try:
            self.model.load_weights(weights)
        except Exception as error:
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ValueError(
                f"the backup in {self.backup_dir} does not fit this model ({first_line}); "
                "it was written by a run with another network, precision or optimizer."
            ) from error
        for variable, value in rates:
            variable.assign(value)
        for variable, value in zip(_rng_variables(self.model), record.get("rng", [])):
            variable.assign(np.asarray(value, dtype=keras.backend.standardize_dtype(variable.dtype)))
        self.model._initial_epoch = record["epoch"]
        # Keras counts from 0 here, which would mislabel batch-level backups
        # taken before the first epoch of a resumed run ends.
        self._current_epoch = record["epoch"]

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        iterations = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        name = f"step_{iterations:09d}.weights.h5"
        atomic_write(os.path.join(self.backup_dir, name),
                     lambda temp: self.model.save_weights(temp, overwrite=True))
        record = {
            "epoch": self._current_epoch,
            "batch": self._last_batch_seen,
            "iterations": iterations,
            "weights": name,
            "rng": [keras.ops.convert_to_numpy(v).tolist() for v in _rng_variables(self.model)],
        }
        text = json.dumps(record, indent=1)
        atomic_write(os.path.join(self.backup_dir, self.RECORD),
                     lambda temp: _write_text(temp, text))
        self.last_backup = record
        for entry in os.listdir(self.backup_dir):
            # Older weights, and temporaries a kill left behind.
            if entry != name and (entry.endswith(".weights.h5") or entry.startswith(".")):
                os.remove(os.path.join(self.backup_dir, entry))


def read_backup_record(backup_dir):
    """The record of the last backup in `backup_dir` (a dict with `epoch`,
    the number of completed epochs, `iterations` and `weights`), or None."""
    path = os.path.join(os.fspath(backup_dir), AtomicBackupAndRestore.RECORD)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _rng_variables(model):
    """Seed-generator states: model variables that `save_weights` leaves out."""
    saved = {id(v) for v in model.weights}
    return [v for v in model.non_trainable_variables if id(v) not in saved]


class ProgressLog(keras.callbacks.Callback):
    """A line of progress at most every `every_seconds` of training, for
    output that goes to a log rather than a terminal: Keras' `verbose=2`
    prints only when an epoch ends, which on a CPU can be half an hour.

    Each line names the epoch, the step, the mean loss so far and the time
    the epoch still needs at its pace, e.g.
    ``epoch 1/2  step 400/1875  loss 0.0512  (2.1 min, ~7.9 min left in the epoch)``.
    `every_seconds=0` prints every step.
    """

    def __init__(self, every_seconds=60.0, stream=None):
        super().__init__()
        if every_seconds < 0:
            raise ValueError(f"every_seconds must be >= 0; got {every_seconds!r}.")
        self.every_seconds = float(every_seconds)
        self.stream = stream
        self._epoch = 0
        self._start = self._last = time.monotonic()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._start = self._last = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        now = time.monotonic()
        if now - self._last < self.every_seconds:
            return
        self._last = now
        done, steps, epochs = batch + 1, self.params.get("steps"), self.params.get("epochs")
        elapsed = now - self._start
        line = f"epoch {self._epoch + 1}/{epochs}  step {done}/{steps or '?'}"
        if logs and "loss" in logs:
            line += f"  loss {float(logs['loss']):.4f}"
        line += f"  ({elapsed / 60:.1f} min"
        if steps:
            line += f", ~{elapsed / done * (steps - done) / 60:.1f} min left in the epoch"
        print(line + ")", file=self.stream or sys.stdout, flush=True)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class TerminateOnNonFiniteLoss(keras.callbacks.Callback):
    """Stop `fit` at the first NaN or infinite loss by raising
    `NonFiniteLossError`, whose message names the epoch, the step and the
    last good backup.

    Raising, unlike `keras.callbacks.TerminateOnNaN`'s default, skips the
    `on_epoch_end` and `on_train_end` of every other callback, so nothing
    computed from the broken weights is written: backups, history, sample
    grids and the caller's final save all keep their last good versions.

    Args:
        backup: the `AtomicBackupAndRestore` used in the same `fit`, if any,
            whose last backup the message names.
    """

    def __init__(self, backup=None):
        super().__init__()
        self.backup = backup
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(np.asarray(loss))
        if math.isfinite(loss):
            return
        where = f"loss became {loss} in epoch {self._epoch + 1}, step {batch + 1}; training stopped"
        record = self.backup.last_backup if self.backup is not None else None
        if record is None:
            last = "there is no good checkpoint yet, so nothing was saved"
        else:
            weights = os.path.join(self.backup.backup_dir, record["weights"])
            last = (f"the last good checkpoint is {weights}, saved after epoch {record['epoch']}; "
                    "nothing was saved after it")
        raise NonFiniteLossError(
            f"{where}; {last}. Lower the learning rate (or check the data) and resume from it."
        )
