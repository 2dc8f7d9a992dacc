"""Training callbacks."""

import os

import keras

from keras_diffusion.images import save_image_grid
from keras_diffusion.images import save_loss_curve


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
        loss_curve_dir: directory for `loss.png`, or None for the parent of
            `directory`.
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
    ):
        super().__init__()
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be a positive integer; got {every_n_epochs!r}.")
        self.directory = os.fspath(directory)
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.steps = steps
        self.sampler = sampler
        self.seed = seed
        self.labels = labels
        self.guidance_scale = guidance_scale
        self.loss_curve_dir = loss_curve_dir or os.path.dirname(os.path.abspath(self.directory))
        self.losses = {}
        self._last_written = None

    def on_train_begin(self, logs=None):
        self.losses = {}
        self._last_written = None

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            if key.endswith("loss"):
                self.losses.setdefault(key, []).append(float(value))
        if (epoch + 1) % self.every_n_epochs == 0:
            self.write_grid(epoch + 1)

    def on_train_end(self, logs=None):
        last_epoch = len(self.losses.get("loss", []))
        if last_epoch and self._last_written != last_epoch:
            self.write_grid(last_epoch)
        if self.losses:
            save_loss_curve(self.losses, os.path.join(self.loss_curve_dir, "loss.png"))

    def write_grid(self, epoch):
        """Sample and write `epoch_<epoch>.png`; returns its path."""
        labels = self.labels
        if labels is None and self.model.conditional:
            labels = [i % self.model.num_classes for i in range(self.num_images)]
        images = self.model.generate(
            self.num_images,
            steps=self.steps,
            sampler=self.sampler,
            seed=self.seed,
            labels=labels,
            guidance_scale=self.guidance_scale if self.model.conditional else 1.0,
        )
        path = os.path.join(self.directory, f"epoch_{epoch:04d}.png")
        save_image_grid(images, path, title=f"epoch {epoch}")
        self._last_written = epoch
        return path
