"""FID/KID: the distances against closed forms, the shipped feature nets
against their recorded accuracy, and scoring a model end to end."""

import json

import numpy as np
import pytest

import keras_diffusion as kd
from keras_diffusion import cli
from keras_diffusion import metrics
from conftest import DATA_DIR


def _sqrtm_psd(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def _random_covariance(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T / dim + 0.1 * np.eye(dim)


# ------------------------------------------------------------ the distances
def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
    mean_a, mean_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
    got = metrics.frechet_distance(mean_a, np.diag(var_a), mean_b, np.diag(var_b))
    assert got == pytest.approx(expected, abs=1e-9)  # 5 + 1 + 1 + 4 = 11


def test_frechet_distance_with_non_commuting_covariances():
    # tr((A B)^1/2) = tr((A^1/2 B A^1/2)^1/2), computed here the long way.
    rng = np.random.default_rng(0)
    cov_a, cov_b = _random_covariance(rng, 6), _random_covariance(rng, 6)
    mean_a, mean_b = rng.normal(size=6), rng.normal(size=6)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    expected = np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2 * cross)
    assert metrics.frechet_distance(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-9)
    assert metrics.frechet_distance(mean_a, cov_a, mean_a, cov_a) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_samples_approaches_the_population_value():
    rng = np.random.default_rng(1)
    a = rng.normal(0.0, 1.0, size=(200_000, 2))
    b = rng.normal(0.5, 2.0, size=(200_000, 2))
    # |0.5|^2 * 2 + (1 - 2)^2 * 2 = 2.5
    got = metrics.frechet_distance(*metrics.feature_statistics(a), *metrics.feature_statistics(b))
    assert got == pytest.approx(2.5, abs=0.03)


def _naive_mmd(x, y):
    dim = x.shape[1]

    def k(u, v):
        return (u @ v / dim + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_psnr_is_closed_form_per_image_and_over_a_mask():
    clean = np.full((2, 4, 4, 1), 0.5)
    noisy = clean.copy()
    noisy[0] += 0.1                  # MSE 0.01: 20 dB
    noisy[1, :2] += 0.2              # MSE 0.04 on half the pixels, 0.02 overall
    np.testing.assert_allclose(metrics.psnr(noisy, clean), [20.0, 10 * np.log10(50)])
    top = np.zeros((4, 4, 1), bool)
    top[:2] = True                   # broadcast to every image
    np.testing.assert_allclose(metrics.psnr(noisy, clean, top), [20.0, 10 * np.log10(25)])
    assert metrics.psnr(clean + 0.8, clean)[0] == pytest.approx(10 * np.log10(4))  # clipped to 1
    assert metrics.psnr(clean, clean)[0] == pytest.approx(120.0)
    with pytest.raises(ValueError, match=r"equal shape .*\(2, 4, 4, 1\) and \(1, 4, 4, 1\)"):
        metrics.psnr(noisy, clean[:1])
    with pytest.raises(ValueError, match="selects no pixel"):
        metrics.psnr(noisy, clean, np.zeros((4, 4, 1), bool))


def test_kernel_distance_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(12, 3)), rng.normal(0.7, 1.0, size=(12, 3))
    # One subset of all rows: a permutation, which the MMD does not see.
    mean, std = metrics.kernel_distance(x, y, subsets=1, subset_size=12)
    assert mean == pytest.approx(_naive_mmd(x, y), rel=1e-10) and std == 0.0


def test_kernel_distance_is_unbiased_for_equal_distributions():
    rng = np.random.default_rng(3)
    same = metrics.kernel_distance(rng.normal(size=(2000, 4)), rng.normal(size=(2000, 4)),
                                   subsets=50, subset_size=200)
    shifted = metrics.kernel_distance(rng.normal(size=(2000, 4)), rng.normal(0.5, 1, size=(2000, 4)),
                                      subsets=50, subset_size=200)
    assert abs(same[0]) < 3 * same[1] / np.sqrt(50) + 1e-3
    assert shifted[0] > 10 * abs(same[0]) and shifted[0] > 0.05


def test_distance_inputs_are_checked():
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.feature_statistics(np.zeros((1, 3)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.kernel_distance(np.zeros((1, 3)), np.zeros((5, 3)))


# -------------------------------------------------------- the feature nets
@pytest.fixture(scope="module")
def mnist_test():
    if not (DATA_DIR / "mnist.npz").exists():
        pytest.skip(f"the shared MNIST file is not at {DATA_DIR}")
    return kd.load_dataset("mnist", DATA_DIR, split="test")


def test_shipped_feature_nets_load_with_their_records():
    assert set(metrics.available_feature_nets()) >= {"mnist", "cifar10"}
    net = metrics.get_feature_net("cifar10")
    assert net.image_shape == (32, 32, 3) and net.num_classes == 10
    assert net.features(np.zeros((3, 32, 32, 3), np.float32)).shape == (3, net.record["feature_dim"])
    assert net.test_accuracy > 0.6


def test_mnist_feature_net_classifies_digits(mnist_test):
    images, labels = mnist_test
    net = metrics.get_feature_net("mnist")
    assert net.test_accuracy >= 0.99
    # The recorded accuracy holds under this backend too (weights are portable).
    assert metrics.label_accuracy(images[:1000], labels[:1000], "mnist") >= 0.985


def test_fid_and_kid_rank_real_above_corrupted_digits(mnist_test):
    images, _ = mnist_test
    real_a, real_b = images[:800], images[800:1600]
    rng = np.random.default_rng(0)
    noisy = np.clip(real_b + rng.normal(0, 0.3, real_b.shape), 0, 1).astype(np.float32)
    net = metrics.get_feature_net("mnist")
    features = {name: net.features(x) for name, x in (("a", real_a), ("b", real_b), ("noisy", noisy))}
    stats = {name: metrics.feature_statistics(f) for name, f in features.items()}
    fid_real = metrics.frechet_distance(*stats["a"], *stats["b"])
    fid_noisy = metrics.frechet_distance(*stats["a"], *stats["noisy"])
    assert metrics.frechet_distance(*stats["a"], *stats["a"]) == pytest.approx(0.0, abs=1e-6)
    assert fid_noisy > 5 * fid_real
    kid_real = metrics.kernel_distance(features["a"], features["b"], subsets=10)
    kid_noisy = metrics.kernel_distance(features["a"], features["noisy"], subsets=10)
    assert kid_noisy[0] > kid_real[0] + 5 * kid_noisy[1]

    # The image-level functions and the streaming class agree with the above.
    assert metrics.fid(real_a, noisy) == pytest.approx(fid_noisy, rel=1e-6)
    assert metrics.kid(real_a, noisy, subsets=10)[0] == pytest.approx(kid_noisy[0], rel=1e-6)
    streaming = metrics.FID(real_a, "mnist")
    streaming.update_state(noisy[:500])
    streaming.update_state(noisy[500:])
    assert streaming.result() == pytest.approx(fid_noisy, rel=1e-6)
    streaming.reset_state()
    with pytest.raises(ValueError, match="update_state"):
        streaming.result()


def test_feature_net_errors_name_what_is_accepted(tmp_path):
    with pytest.raises(ValueError, match="no trained feature net ships for 'fashion_mnist'.*train_feature_net"):
        metrics.FeatureNet("fashion_mnist")
    with pytest.raises(ValueError, match="must be one of .*mnist.*weights.h5"):
        metrics.FeatureNet("imagenet")
    with pytest.raises(ValueError, match="must both exist"):
        metrics.FeatureNet(tmp_path / "mine.weights.h5")
    with pytest.raises(ValueError, match=r"\(28, 28, 1\) is expected"):
        metrics.get_feature_net("mnist").features(np.zeros((2, 32, 32, 3), np.float32))


# ------------------------------------------------------------ whole models
def test_score_model_and_its_errors(smoke_run, mnist_test):
    model = kd.load_model(smoke_run / "model.keras")
    scores = metrics.score_model(model, mnist_test[0][:200], num_images=8, steps=2, sampler="ddim")
    assert set(scores) == {"fid", "kid", "kid_std", "num_images", "seconds"}
    assert np.isfinite(scores["fid"]) and scores["fid"] > 0 and scores["num_images"] == 8
    with pytest.raises(ValueError, match=r"makes \(28, 28, 1\) images but feature net 'cifar10'"):
        metrics.score_model(model, mnist_test[0][:20], feature_net="cifar10", num_images=4)
    with pytest.raises(ValueError, match="guidance_scale needs a class-conditional model"):
        metrics.score_model(model, mnist_test[0][:20], num_images=4, guidance_scale=2.0)
    with pytest.raises(ValueError, match="exactly one of reference_images and reference_features"):
        metrics.score_model(model, num_images=4)


def test_training_logs_scores_in_history(smoke_run):
    # configs/smoke.yaml scores its samples every epoch.
    import csv

    with open(smoke_run / "history.csv") as f:
        row = next(csv.DictReader(f))
    assert float(row["fid"]) > 0 and np.isfinite(float(row["kid"]))


# The evaluate command runs in-process through `cli.main`, what the console
# script calls; test_cli.py runs the command line in subprocesses.
def _evaluate(capsys, *args):
    code = cli.main(["evaluate", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def test_evaluate_command(smoke_run, data_dir, tmp_path, capsys):
    out = tmp_path / "scores.json"
    code, stdout, stderr = _evaluate(capsys, "--model", smoke_run / "model.keras", "--num", 8,
                                     "--steps", 2, "--sampler", "ddim", "--data-dir", data_dir,
                                     "--json", out)
    assert code == 0, stderr[-2000:]
    assert stdout.startswith("FID ") and "KID" in stdout and "8 samples" in stdout
    record = json.loads(out.read_text())
    assert record["dataset"] == "mnist" and record["num_images"] == 8 and record["fid"] > 0


def test_evaluate_command_errors(smoke_run, tmp_path, capsys):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.keras").write_bytes((smoke_run / "model.keras").read_bytes())
    code, _, stderr = _evaluate(capsys, "--model", lone / "model.keras", "--num", 8)
    assert code == 2 and "pass --dataset" in stderr
    assert len(stderr.strip().splitlines()) == 1
    code, _, stderr = _evaluate(capsys, "--model", smoke_run / "model.keras", "--num", 1)
    assert code == 2 and "--num must be at least 2" in stderr


def test_score_model_reports_nan_for_diverged_samples():
    from types import SimpleNamespace

    diverged = SimpleNamespace(
        image_shape=(28, 28, 1), conditional=True, num_classes=10,
        generate=lambda num, **kwargs: np.full((num, 28, 28, 1), np.nan, np.float32),
    )
    scores = metrics.score_model(diverged, reference_features=np.zeros((4, 128)), num_images=4)
    assert all(np.isnan(scores[key]) for key in ("fid", "kid", "kid_std", "label_accuracy"))


@pytest.mark.skipif(not (DATA_DIR / "mnist.npz").exists(), reason="needs the shared MNIST file")
def test_config_scores_against_the_reference_images_it_names(tmp_path):
    from keras_diffusion.config import apply_override
    from keras_diffusion.config import load_config
    from keras_diffusion.training import _training_callbacks
    from conftest import SMOKE

    def reference_count(config):
        _, callbacks = _training_callbacks(config, tmp_path)
        (quality,) = [c for c in callbacks if isinstance(c, kd.SampleQuality)]
        return len(quality.reference_features)

    config = load_config(SMOKE, [f"data.data_dir={DATA_DIR}"])
    assert config["evaluation"]["reference_images"] == 500
    assert reference_count(config) == 500
    assert reference_count(apply_override(config, "evaluation.reference_images=300")) == 300
