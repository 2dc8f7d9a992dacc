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
