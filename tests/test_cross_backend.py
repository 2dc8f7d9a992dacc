"""Saved files do not care which backend wrote them: a `.keras` file and a
`.weights.h5` file saved under this run's backend load under the other two,
and the network's output (raw and EMA weights) agrees within 1e-4, as does
a latent model's encoding and decoded sampling. One
`keras.utils.set_random_seed` builds the same starting network on each.

Each backend's run of the suite checks the files its own backend writes, in
one subprocess per other backend (each sets its own `KERAS_BACKEND`), so
the three runs together cover the 3x3 matrix in six subprocesses.
`keras-diffusion sample --backend X` on a model trained under Y is
`test_cli.py::test_sample_under_another_backend_matches`.
"""

import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
from keras import ops

import keras_diffusion as kd
from conftest import BACKEND
from conftest import child_env
from conftest import latent_outputs
from conftest import plumbing_optimizer
from conftest import tiny_model

# Each backend runs its own float32 kernels (oneDNN, Eigen, XLA), which sum in
# other orders: one evaluation of this network differs by ~1e-6 of its
# output's scale (about 1) between them. ATOL leaves 100x that; a weight
# loaded into the wrong place changes the output by ~1e-1.
ATOL = 1e-4
BACKENDS = ("tensorflow", "jax", "torch")

# A network built after keras.utils.set_random_seed(0): the same on every backend.
SEEDED = dict(image_shape=(8, 8, 1), widths=(8,), blocks_per_level=1, attention_levels=(),
              groups=4, num_classes=2)


# Loads the files from the folder in argv[1] and writes <backend>.npz there.
_LOAD_AND_EVALUATE = f"""
SEEDED = {SEEDED!r}
import sys
import keras
import numpy as np
import keras_diffusion as kd
from keras_diffusion import backend

folder = sys.argv[1]
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from conftest import latent_outputs
from conftest import plumbing_optimizer
data = np.load(folder + "/inputs.npz")
inputs = [data["x_t"], data["t"], data["labels"]]

def outputs(model):
    # One compiled network call for both sets of weights: op by op, JAX
    # would compile each of the network's operations on its own (~9 s).
    network = model.network
    state = [v.value for v in network.non_trainable_variables]
    call = backend.current().compile_function(
        lambda weights: network.stateless_call(weights, state, inputs)[0])
    return tuple(keras.ops.convert_to_numpy(call([v.value for v in weights]))
                 for weights in (network.trainable_variables, model.sampling_weights))

loaded = kd.load_model(folder + "/model.keras")
rebuilt = kd.DiffusionModel.from_config(loaded.get_config())
rebuilt.load_weights(folder + "/model.weights.h5")
keras_raw, keras_ema = outputs(loaded)
h5_raw, h5_ema = outputs(rebuilt)
iterations = keras.ops.convert_to_numpy(loaded.optimizer.iterations)
keras.utils.set_random_seed(0)
seeded = [keras.ops.convert_to_numpy(w) for w in kd.UNet(**SEEDED).weights]
latent_encoded, latent_decoded = latent_outputs(kd.load_model(folder + "/latent.keras"), data)
np.savez(folder + "/" + keras.backend.backend() + ".npz", keras_raw=keras_raw,
         keras_ema=keras_ema, h5_raw=h5_raw, h5_ema=h5_ema, iterations=iterations,
         jit_compile=loaded.jit_compile, seeded=np.concatenate([w.ravel() for w in seeded]),
         latent_encoded=latent_encoded, latent_decoded=latent_decoded)
"""


def _evaluate(model, inputs):
    ema = [v.value for v in model.sampling_weights]
    state = [v.value for v in model.network.non_trainable_variables]
    raw = ops.convert_to_numpy(model.network(inputs))
    smoothed = ops.convert_to_numpy(model.network.stateless_call(ema, state, inputs)[0])
    return raw, smoothed


def test_saved_files_load_under_the_other_backends(tmp_path):
    model = tiny_model(num_classes=3)
    model.compile(optimizer=plumbing_optimizer())  # as users compile: not eagerly
    # Optimizer state, and EMA weights unlike the raw ones, as in a trained model.
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(7)
    for i, ema in enumerate(model.ema_weights):
        ema.assign(ops.convert_to_numpy(ema) * 0.9 + 0.01 * (i % 3))
    rng = np.random.default_rng(0)
    inputs = [rng.normal(size=(3, 16, 16, 1)).astype("float32"),
              np.array([0, 42, 99], "int32"), np.array([0, 2, 3], "int32")]
    latent = _latent_model()
    images = rng.uniform(size=(2, 8, 8, 1)).astype("float32")
    latent_noise = rng.normal(size=(2, 4, 4, 2)).astype("float32")
    np.savez(tmp_path / "inputs.npz", x_t=inputs[0], t=inputs[1], labels=inputs[2],
             images=images, latent_noise=latent_noise)
    latent.save(tmp_path / "latent.keras")
    encoded, decoded = latent_outputs(latent, dict(images=images, latent_noise=latent_noise))
    model.save(tmp_path / "model.keras")
    model.save_weights(tmp_path / "model.weights.h5")
    raw, smoothed = _evaluate(model, inputs)
    assert np.abs(raw - smoothed).max() > 1e-3  # the check below tells them apart
    keras.utils.set_random_seed(0)
    seeded = np.concatenate([ops.convert_to_numpy(w).ravel() for w in kd.UNet(**SEEDED).weights])

    others = [b for b in BACKENDS if b != BACKEND]
    processes = {
        backend: subprocess.Popen(
            [sys.executable, "-c", _LOAD_AND_EVALUATE, str(tmp_path)],
            env=child_env(backend),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for backend in others
    }
    for backend, process in processes.items():
        _, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, f"under {backend}:\n{stderr[-3000:]}"
    for backend in others:
        result = np.load(tmp_path / f"{backend}.npz")
        assert int(result["iterations"]) == 7, backend
        # Compiled as the loading backend decides on a CPU (XLA only under JAX),
        # not as the saving one did.
        assert bool(result["jit_compile"]) == (backend == "jax"), backend
        for name, expected in (("keras_raw", raw), ("keras_ema", smoothed),
                               ("h5_raw", raw), ("h5_ema", smoothed)):
            difference = np.abs(result[name] - expected).max()
            assert difference <= ATOL, f"{BACKEND} -> {backend}, {name}: {difference:.2e}"
        for name, expected in (("latent_encoded", encoded), ("latent_decoded", decoded)):
            difference = np.abs(result[name] - expected).max()
            assert difference <= ATOL, f"{BACKEND} -> {backend}, {name}: {difference:.2e}"
        # One seed, one starting network, whichever backend builds it.
        np.testing.assert_array_equal(result["seeded"], seeded, err_msg=backend)


def _latent_model():
    """A tiny latent model (8x8x1 images, 4x4x2 latents) whose autoencoder
    counts as trained."""
    autoencoder = kd.Autoencoder((8, 8, 1), widths=(8,), latent_channels=2, groups=4)
    autoencoder.scaling_factor.assign(0.7)
    network = kd.UNet((4, 4, 2), widths=(8,), blocks_per_level=1, attention_levels=(), groups=4)
    return kd.LatentDiffusionModel(autoencoder, network, kd.DiffusionSchedule("cosine", timesteps=100),
                                   prediction="v")


def test_weights_file_loads_into_a_rebuilt_model(tmp_path):
    """The same round trip within this backend: what the subprocesses do."""
    model = tiny_model(num_classes=3)
    model.save_weights(tmp_path / "model.weights.h5")
    rebuilt = kd.DiffusionModel.from_config(model.get_config())
    rebuilt.load_weights(tmp_path / "model.weights.h5")
    # The shapes of the test above: under JAX, whose operations run one by
    # one here, each compiled once per shape.
    inputs = [np.zeros((3, 16, 16, 1), "float32"), np.array([5, 42, 99], "int32"),
              np.array([1, 0, 3], "int32")]
    for a, b in zip(_evaluate(model, inputs), _evaluate(rebuilt, inputs)):
        np.testing.assert_array_equal(a, b)
