"""Same seed, same backend: the same first-epoch losses and the same samples,
bit for bit (the settings this needs are in the README, "Determinism")."""

import keras
import numpy as np

from conftest import one_level_model
from conftest import plumbing_optimizer
from conftest import squares


class _StepLosses(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(np.asarray(logs["loss"])))


def _run(seed):
    keras.utils.set_random_seed(seed)  # weights, and fit's shuffling
    model = one_level_model()
    model.compile(optimizer=plumbing_optimizer())  # compiled, as users train: the claim is theirs
    steps = _StepLosses()
    model.fit(squares(24), batch_size=8, epochs=1, shuffle=True, verbose=0, callbacks=[steps])
    return steps.losses, model.generate(2, steps=2, sampler="ddpm", seed=seed)


def test_same_seed_gives_identical_losses_and_samples():
    losses, samples = _run(seed=3)
    again_losses, again_samples = _run(seed=3)
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    assert losses == again_losses
    np.testing.assert_array_equal(samples, again_samples)
