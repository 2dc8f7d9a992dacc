import atexit
import os
import shutil
import tempfile
from pathlib import Path

# One JAX compilation cache for the run, set before JAX starts and inherited by
# the subprocesses the tests start: models of the same shapes compile the same
# XLA programs, in this process and in each CLI subprocess. tests/run.sh gives
# its three runs one folder; a session started alone makes its own. Either is
# fresh and removed at exit, so nothing carries over from one run to the next.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="keras-diffusion-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # cache every program
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

# First, as in a user's program: it turns on TensorFlow's oneDNN kernels,
# which TensorFlow decides once, when it loads.
import keras_diffusion as kd  # noqa: I001

import keras
import numpy as np
import pytest
from keras import ops

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT.parent / "shared" / "data"
BACKEND = keras.backend.backend()
SMOKE = ROOT / "configs" / "smoke.yaml"
# What is the same code on every backend (file tables, loaders, checks of
# arguments, the command line, the sampling loop around the network) runs
# under PyTorch only, the backend whose tests take least time; each model
# family keeps its parity tests (numbers against diffusers, a training step)
# on all three, as those are what each backend computes.
once = pytest.mark.skipif(BACKEND != "torch", reason="the same code on every backend; run "
                                                     "under PyTorch")
# The smallest network that trains: one level, no attention. 32 MNIST images
# in batches of 8 are 4 steps an epoch. float32, not `auto`: the runs that
# use it compare numbers, which must not depend on the CPU's bfloat16 support.
SMALLEST_NETWORK = ["network.widths=[8]", "network.attention_levels=[]"]
TINY = SMALLEST_NETWORK + ["data.limit=32", "training.batch_size=8", "training.learning_rate=0.003",
                           "training.precision=float32"]


# ------------------------------------------------------- small models, data
def tiny_unet(shape=(16, 16, 1), num_classes=None):
    """Two levels with attention: every kind of block the UNet has."""
    return kd.UNet(shape, widths=(8, 16), blocks_per_level=1, attention_levels=(1,), groups=4,
                   num_classes=num_classes)


def plumbing_optimizer():
    """SGD with momentum for the models that check plumbing, not learning:
    TensorFlow traces a train step with AdamW in twice the time (6,040 graph
    operations for the one-level UNet against 3,660), and each new model is
    traced anew. The configs, and the tests that train for real, use AdamW."""
    return keras.optimizers.SGD(0.01, momentum=0.9)


# Under TensorFlow the plumbing models below train eagerly: they take a few
# steps each, and tracing a train step costs ~5-9 s per new model, far more
# than those steps. Not under JAX, where eager execution compiles each
# operation of the step on its own (3x slower than one jit). The same step runs
# compiled in the tests that train for real or check a claim about compiled
# training: test_model's MNIST loss, determinism, the backup's restore, the
# CLI and latent runs, distribution.


EAGER = BACKEND == "tensorflow"


def tiny_model(shape=(16, 16, 1), num_classes=None, **kwargs):
    kwargs.setdefault("schedule", kd.DiffusionSchedule("cosine", timesteps=100))
    model = kd.DiffusionModel(tiny_unet(shape, num_classes), seed=0, **kwargs)
    model.compile(optimizer=plumbing_optimizer(), run_eagerly=EAGER)
    return model


def one_level_unet(shape=(8, 8, 1), num_classes=None):
    """The smallest UNet: one level, no attention."""
    return kd.UNet(shape, widths=(8,), blocks_per_level=1, attention_levels=(), groups=4,
                   num_classes=num_classes)


def one_level_model(shape=(8, 8, 1), num_classes=None, **kwargs):
    model = kd.DiffusionModel(one_level_unet(shape, num_classes),
                              kd.DiffusionSchedule("cosine", timesteps=100), seed=0, **kwargs)
    model.compile(optimizer=plumbing_optimizer(), run_eagerly=EAGER)
    return model


def blobs(n=64, size=16, channels=1, seed=0):
    """Images with real structure: one bright square per image."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size, channels), "float32")
    for i, (r, c) in enumerate(rng.integers(0, size - 6, (n, 2))):
        x[i, r:r + 6, c:c + 6] = 1.0
    return x


def squares(n=32, size=8, seed=0):
    """Like `blobs`, 3x3 squares on 8x8 images."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, size, size, 1), "float32")
    for i, (r, c) in enumerate(rng.integers(0, size - 3, (n, 2))):
        x[i, r:r + 3, c:c + 3] = 1.0
    return x


# ------------------------------------------- the closed-form Gaussian denoiser
MU, S = 0.3, 0.2


def gaussian_denoiser(schedule, mu=MU, s=S):
    """E[eps | x_t] for x0 ~ N(mu, s^2): sqrt(1-a)(x_t - sqrt(a) mu) / (a s^2 + 1 - a)."""

    def denoiser(x_t, t):
        a = ops.reshape(schedule.alpha_bar(t), (-1, 1, 1, 1))
        return ops.sqrt(1 - a) * (x_t - ops.sqrt(a) * mu) / (a * s**2 + 1 - a)

    return denoiser


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


@pytest.fixture
def data_dir():
    if not (DATA_DIR / "mnist.npz").exists():
        pytest.skip(f"the shared MNIST/CIFAR-10 files are not at {DATA_DIR}")
    return DATA_DIR


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {BACKEND}, KERAS_BACKEND={os.environ.get('KERAS_BACKEND')}"


def child_env(backend=None, xla_flags=()):
    """The environment of a subprocess a test starts, under `backend` (this
    run's by default). Its XLA programs compile without the optimisation
    passes: the suite's programs are small and run a few steps, so compiling
    costs more than running (a tiny UNet's gradient: 7.3 s instead of
    12.5 s). Not in this process, where tests compare with arrays recorded
    within 1e-5, which those passes change by about that much."""
    flags = [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0", *xla_flags]
    return dict(os.environ, KERAS_BACKEND=backend or BACKEND, TF_CPP_MIN_LOG_LEVEL="2",
                XLA_FLAGS=" ".join(filter(None, flags)))


def cli_main(*args):
    """`keras-diffusion ARGS` in-process, through `cli.main` as the console
    script calls it; its exit code (argparse's errors included)."""
    from keras_diffusion import cli

    try:
        return cli.main([str(arg) for arg in args])
    except SystemExit as exit_info:
        return exit_info.code


def run_cli(*args, backend=None, cwd=None, timeout=600):
    """Run `keras-diffusion` in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    env = child_env(backend)
    command = [sys.executable, "-m", "keras_diffusion.cli", *map(str, args)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One `keras-diffusion train` on configs/smoke.yaml per test session,
    shared by every test that needs a trained model; its output directory.
    Every stage runs as configured (data, precision, fit, sampling, scoring,
    saving), with the smallest network: what the tests check of the run and
    its model is plumbing, and under JAX a two-level network with attention
    compiles each train step, sampler and command twice as long.
    It runs in-process, through `cli.main` (what the console script calls):
    a subprocess would load the backend again. test_resume.py trains in a
    subprocess."""
    import contextlib
    import io

    from keras_diffusion import cli

    if not (DATA_DIR / "mnist.npz").exists():
        pytest.skip(f"the shared MNIST file is not at {DATA_DIR}")
    output = tmp_path_factory.mktemp("smoke")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli.main(["train", "--config", str(SMOKE), "--data-dir", str(DATA_DIR),
                         "--output", str(output),
                         *[arg for key in SMALLEST_NETWORK for arg in ("--set", key)]])
    assert code == 0, stderr.getvalue()[-3000:]
    return output


def latent_outputs(model, data):
    """A latent model's encoding of `data["images"]`, and its DDIM run from
    `data["latent_noise"]`, decoded: the autoencoder, scaling factor and
    latent network all take part."""
    from keras_diffusion import pipeline
    from keras_diffusion import samplers

    encoded = keras.ops.convert_to_numpy(pipeline.encode(model, data["images"]))
    timesteps = samplers.plan_timesteps(model.schedule, "ddim", 2)
    x0 = pipeline.run_sampler(model, data["latent_noise"], timesteps=timesteps, sampler="ddim")
    return encoded, pipeline.decode(model, x0)


def kill_after_first_backup(command, backup_dir, env, settle=0.0, timeout=400):
    """Start `command`, wait until it has written its first backup to
    `backup_dir` (an `AtomicBackupAndRestore` folder), wait `settle` seconds
    more (so the kill lands in the next epoch), and kill it with SIGKILL."""
    import signal
    import subprocess
    import time

    from keras_diffusion.callbacks import read_backup_record

    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while read_backup_record(backup_dir) is None:
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, f"no backup within {timeout} s"
            time.sleep(0.01)
        time.sleep(settle)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
