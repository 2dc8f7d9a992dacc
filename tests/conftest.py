import os
from pathlib import Path

import keras
import pytest

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BACKEND = keras.backend.backend()


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


def run_cli(*args, backend=None, cwd=None, timeout=600):
    """Run `keras-diffusion` in a subprocess; returns the CompletedProcess."""
    import subprocess
    import sys

    env = dict(os.environ, KERAS_BACKEND=backend or BACKEND, TF_CPP_MIN_LOG_LEVEL="2")
    command = [sys.executable, "-m", "keras_diffusion.cli", *map(str, args)]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One `keras-diffusion train` on configs/smoke.yaml per test session,
    shared by every test that needs a trained model; its output directory."""
    if not (DATA_DIR / "mnist.npz").exists():
        pytest.skip(f"the shared MNIST file is not at {DATA_DIR}")
    output = tmp_path_factory.mktemp("smoke")
    config = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
    result = run_cli("train", "--config", config, "--data-dir", DATA_DIR, "--output", output)
    assert result.returncode == 0, result.stderr[-3000:]
    return output
