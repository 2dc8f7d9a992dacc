"""Keeping native libraries' start-up lines off the user's terminal.

TensorFlow's C++ side writes to file descriptor 2 while it loads (absl's
"log messages before InitializeLog", oneDNN, CUDA stubs), whatever
`TF_CPP_MIN_LOG_LEVEL` says. Keras imports TensorFlow under every backend
for a few utilities (`keras.utils.set_random_seed` seeds it), so under JAX
or PyTorch those lines would surround a command's own output, or its
one-line error. Free of Keras, so the command line can use it before Keras
loads.
"""

import contextlib
import importlib
import os
import sys


@contextlib.contextmanager
def quiet_stderr():
    """Send file descriptor 2 to /dev/null for the block: native code's
    writes vanish, Python exceptions still propagate."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow():
    """`tensorflow`, imported (the first time) without its start-up lines."""
    if "tensorflow" not in sys.modules:
        with quiet_stderr():
            importlib.import_module("tensorflow")
    return sys.modules["tensorflow"]
