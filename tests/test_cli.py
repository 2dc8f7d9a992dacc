"""The train and sample commands, end to end: `smoke_run` trains in a
subprocess; sampling and most error cases run in-process through `cli.main`,
what the console script calls, and a few in subprocesses, as a shell runs them."""

import csv
import io
import os
import re

import numpy as np
import pytest
from matplotlib import image as mpimg

import keras_diffusion as kd

from conftest import BACKEND
from conftest import ROOT
from conftest import cli_main
from conftest import once
from conftest import one_level_model
from conftest import squares
from conftest import run_cli


def test_train_writes_every_output(smoke_run):
    assert (smoke_run / "model.keras").stat().st_size > 0
    grid = mpimg.imread(smoke_run / "samples" / "epoch_0001.png")
    assert grid.ndim == 3 and grid.shape[0] > 28
    assert mpimg.imread(smoke_run / "loss.png").size > 0
    with open(smoke_run / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["0"] and np.isfinite(float(rows[0]["loss"]))
    assert "timesteps: 100" in (smoke_run / "config.yaml").read_text()
    assert not [p for p in smoke_run.rglob(".*") if p.is_file()], "temporary files left behind"


def test_sample_writes_grid_and_npz(smoke_run, tmp_path, capsys):
    out, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    code = cli_main("sample", "--model", smoke_run / "model.keras", "--num", 6, "--steps", 3,
                 "--sampler", "ddpm", "--seed", 1, "--out", out, "--npz", npz)
    assert code == 0, capsys.readouterr().err[-2000:]
    images = np.load(npz)["images"]
    assert images.shape == (6, 28, 28, 1) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 1.0
    assert mpimg.imread(out).ndim == 3


@pytest.mark.parametrize("num, rows", [(2, 1), (7, 2)])
def test_sample_labels_all_puts_a_class_in_each_column(tmp_path, capsys, num, rows):
    """`--labels all`: the classes side by side, class 0 on the left, and
    `--num // classes` rows of them (at least one): one image per class is a
    single row, as the default --num gives for MNIST's ten classes."""
    model = one_level_model(num_classes=3)
    path = tmp_path / "conditional.keras"
    model.save(path)
    out, npz = tmp_path / "grid.png", tmp_path / "grid.npz"
    code = cli_main("sample", "--model", path, "--labels", "all", "--num", num, "--steps", 2,
                    "--out", out, "--npz", npz)
    assert code == 0, capsys.readouterr().err[-2000:]
    # 8x8 images with 2-pixel borders: 3 columns make a grid 32 pixels wide,
    # which the PNG enlarges 16 times (to 512 pixels).
    assert mpimg.imread(out).shape[:2] == ((rows * 10 + 2) * 16, 32 * 16)
    expected = kd.load_model(path).generate(3 * rows, steps=2, seed=0, labels=[0, 1, 2] * rows)
    np.testing.assert_allclose(np.load(npz)["images"], expected, atol=1e-5)


# Under PyTorch only: test_cross_backend.py loads files of every backend under
# every other; this checks the command line's --backend on top, which does not
# depend on which backend trained the file.
@pytest.mark.skipif(BACKEND != "torch", reason="backend-independent; run under PyTorch")
def test_sample_under_another_backend_matches(smoke_run, tmp_path, capsys):
    other = "jax"
    paths = {}
    for backend in (BACKEND, other):
        paths[backend] = tmp_path / f"{backend}.npz"
        args = ["sample", "--model", smoke_run / "model.keras", "--num", 2, "--steps", 3,
                "--out", tmp_path / f"{backend}.png", "--npz", paths[backend], "--backend", backend]
        if backend == BACKEND:  # this process runs BACKEND already
            assert cli_main(*args) == 0, capsys.readouterr().err[-2000:]
        else:
            result = run_cli(*args)
            assert result.returncode == 0, result.stderr[-2000:]
    # Same weights, but each backend draws its own noise: only shapes and ranges compare.
    for path in paths.values():
        images = np.load(path)["images"]
        assert images.shape == (2, 28, 28, 1) and 0 <= images.min() <= images.max() <= 1


# A subprocess for one error argparse reports and one reported after Keras
# loads and training imports TensorFlow under JAX (whose start-up lines must
# not reach stderr); the others in-process.
@pytest.mark.parametrize(
    "args,message,subprocess",
    [
        (["train", "--config", "configs/nope.yaml"], "config file not found: configs/nope.yaml", False),
        (["train", "--config", "configs/smoke.yaml", "--set", "trainig.epochs=2"],
         "did you mean 'training.epochs'", False),
        (["sample", "--model", "missing.keras", "--out", "x.png"], "model file not found: missing.keras",
         False),
        (["train", "--config", "configs/smoke.yaml", "--data-dir", "no-such-dir", "--backend", "jax"],
         "no-such-dir/mnist.npz not found", True),
        (["sample", "--model", "m.keras", "--out", "x.jpg"], "--out must end in .png; got x.jpg", False),
        (["sample", "--model", "m.keras"], "the following arguments are required: --out", True),
        (["train", "--config", "configs/smoke.yaml", "--backend", "mxnet"], "invalid choice: 'mxnet'",
         False),
    ],
)
def test_errors_are_one_line_exit_2(args, message, subprocess, capsys, monkeypatch):
    if subprocess:
        result = run_cli(*args, cwd=ROOT)
        code, stderr = result.returncode, result.stderr
    else:
        monkeypatch.chdir(ROOT)
        code = cli_main(*args)
        stderr = capsys.readouterr().err
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert message in lines[0]
    assert "Traceback" not in stderr


def test_progress_lines_for_logs():
    """What `train` prints between epochs when its output is not a terminal."""
    model = one_level_model()
    stream = io.StringIO()
    model.fit(squares(24), batch_size=8, epochs=2, verbose=0,
              callbacks=[kd.ProgressLog(every_seconds=0, stream=stream)])
    lines = stream.getvalue().splitlines()
    assert [line.split("  ")[:2] for line in lines] == [
        [f"epoch {epoch}/2", f"step {step}/3"] for epoch in (1, 2) for step in (1, 2, 3)]
    assert re.fullmatch(r"epoch 2/2  step 3/3  loss \d+\.\d{4}  "
                        r"\(\d+\.\d min, ~0\.0 min left in the epoch\)", lines[-1])
    with pytest.raises(ValueError, match="every_seconds must be >= 0; got -1"):
        kd.ProgressLog(every_seconds=-1)


@pytest.mark.parametrize("flags, cores, expected", [
    ("", 2, "--xla_force_host_platform_device_count=2"),
    ("--xla_cpu_multi_thread_eigen=false", 6,
     "--xla_cpu_multi_thread_eigen=false --xla_force_host_platform_device_count=4"),
    ("--xla_force_host_platform_device_count=3", 8, "--xla_force_host_platform_device_count=3"),
    ("", 1, ""),
])
def test_xla_gets_a_cpu_device_per_core(flags, cores, expected):
    from keras_diffusion.cli import _xla_flags_with_a_device_per_core

    assert _xla_flags_with_a_device_per_core(flags, cores) == expected


@pytest.mark.parametrize("environ, expected", [
    ({"XDG_CACHE_HOME": "{tmp}"}, "{tmp}/keras_diffusion/jax"),
    ({"HOME": "{tmp}"}, "{tmp}/.cache/keras_diffusion/jax"),
    ({"XDG_CACHE_HOME": "{tmp}", "JAX_COMPILATION_CACHE_DIR": ""}, ""),
    ({"XDG_CACHE_HOME": "{tmp}", "JAX_COMPILATION_CACHE_DIR": "{tmp}/mine"}, "{tmp}/mine"),
    ({"XDG_CACHE_HOME": "{tmp}/file"}, None),
])
@once
def test_the_command_keeps_jax_programs_in_the_users_cache(tmp_path, monkeypatch, environ,
                                                            expected):
    """JAX's persistent compilation cache goes to the user's cache folder
    unless `JAX_COMPILATION_CACHE_DIR` says otherwise (empty: none); a
    folder that cannot be made leaves it unset."""
    from keras_diffusion.cli import _jax_compilation_cache

    (tmp_path / "file").write_text("not a folder")
    environ = {key: value.format(tmp=tmp_path) for key, value in environ.items()}
    if "HOME" in environ:
        monkeypatch.setenv("HOME", environ.pop("HOME"))
    _jax_compilation_cache(environ)
    if expected is None:
        assert "JAX_COMPILATION_CACHE_DIR" not in environ
    else:
        expected = expected.format(tmp=tmp_path)
        assert environ["JAX_COMPILATION_CACHE_DIR"] == expected
        assert os.path.isdir(expected) == expected.endswith("keras_diffusion/jax")


@pytest.mark.skipif(BACKEND != "jax", reason="how many CPU devices JAX sees; runs under JAX")
def test_the_command_trains_jax_on_every_core(tmp_path):
    """XLA runs a CPU convolution on one core; the command gives JAX a CPU
    device per core, which `distribute: data_parallel` shares each batch
    over. The child reports how many devices JAX saw once the command ran."""
    import os
    import subprocess
    import sys

    from conftest import child_env

    env = child_env()
    env["XLA_FLAGS"] = " ".join(f for f in env["XLA_FLAGS"].split()
                                if "device_count" not in f)
    code = ("import sys\nsys.argv[0] = 'keras-diffusion'  # as the console script starts\n"
            "from keras_diffusion import cli\ncode = cli.main(['presets'])\n"
            "import jax\nprint(code, jax.device_count())")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert out.stdout.split()[-2:] == ["0", str(1 << (cores.bit_length() - 1))]
