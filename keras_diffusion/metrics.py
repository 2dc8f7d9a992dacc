"""Sample quality: Fréchet and kernel distances over a small classifier's features.

FID (Heusel et al. 2017) and KID (Bińkowski et al. 2018) are usually measured
with Inception-v3 features. Those weights are a download and a 90 MB network
trained on photographs, a poor judge of 28x28 digits; this module instead uses
a small convolutional classifier per dataset, trained by
`benchmarks/train_feature_net.py` and shipped inside the package (MNIST and
CIFAR-10). The numbers are comparable with each other, not with published
Inception FIDs.

>>> import keras_diffusion as kd
>>> real, _ = kd.load_dataset("mnist", split="test")
>>> fake = model.generate(1000, steps=20, sampler="dpmpp_2m", seed=0)
>>> kd.metrics.fid(real, fake, feature_net="mnist")
>>> kd.metrics.kid(real, fake, feature_net="mnist")       # (mean, std)

The streaming classes `FID` and `KID` follow the `update_state` / `result` /
`reset_state` protocol of `keras.metrics.Metric`, but keep their statistics
on the host in float64: a covariance summed over 10,000 samples and its
matrix square root lose too much in float32.
"""

import json
import math
import os
import time
from pathlib import Path

import keras
import numpy as np

from keras_diffusion import backend
from keras_diffusion.checks import check_integer
from keras_diffusion.data import check_images

FEATURE_NET_DIR = Path(__file__).parent / "feature_nets"

# name -> (image shape, class count, convolution widths)
FEATURE_NETS = {
    "mnist": ((28, 28, 1), 10, (32, 64, 128)),
    "fashion_mnist": ((28, 28, 1), 10, (32, 64, 128)),
    "cifar10": ((32, 32, 3), 10, (32, 64, 128)),
}


# ------------------------------------------------------------ feature network
def build_feature_net(image_shape, num_classes, widths=(32, 64, 128), name="feature_net",
                      to_load=False):
    """The classifier whose pooled activations are the features.

    Two 3x3 convolutions (batch norm, ReLU) per width, max pooling between
    widths, global average pooling (the features, `widths[-1]` of them),
    dropout and a linear classifier. Inputs are images in [0, 1].

    With `to_load`, the weights start as constants, for trained weights to
    replace; otherwise as Keras initialises them, for training.

    Returns a `keras.Model` with two outputs: `(features, logits)`.
    """
    # To load: constant initial values made by NumPy, which the weights replace;
    # under JAX each of Keras' initializers compiles a kernel per weight shape,
    # about 7 s for this net on a CPU, paid by every process that loads a
    # feature net to score; and no random draw, so loading one leaves every
    # generator, NumPy's global one included, where it was.
    ones, zeros = (_host_constant(1.0), _host_constant(0.0)) if to_load else ("ones", "zeros")
    kernels = zeros if to_load else "glorot_uniform"
    inputs = keras.Input(tuple(image_shape), name="images")
    x = keras.layers.Rescaling(2.0, offset=-1.0, name="to_signed")(inputs)
    for level, width in enumerate(widths):
        if level:
            x = keras.layers.MaxPooling2D(name=f"pool_{level}")(x)
        for index in range(2):
            prefix = f"level_{level}_conv_{index}"
            x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=prefix,
                                    kernel_initializer=kernels)(x)
            x = keras.layers.BatchNormalization(
                name=f"{prefix}_norm", gamma_initializer=ones, beta_initializer=zeros,
                moving_mean_initializer=zeros, moving_variance_initializer=ones)(x)
            x = keras.layers.ReLU(name=f"{prefix}_relu")(x)
    features = keras.layers.GlobalAveragePooling2D(name="features")(x)
    dropped = keras.layers.Dropout(0.3, name="dropout")(features)
    logits = keras.layers.Dense(num_classes, name="logits", kernel_initializer=kernels,
                                bias_initializer=zeros)(dropped)
    return keras.Model(inputs, [features, logits], name=name)


def _host_constant(value):
    """An initializer filling a float32 NumPy array with `value`."""
    return lambda shape, dtype=None: np.full(tuple(shape), value, dtype="float32")


class FeatureNet:
    """A trained feature network: `features(images)` and `classify(images)`.

    Args:
        name_or_path: a built-in name (`"mnist"`, `"cifar10"`), or the
            `.weights.h5` file written by `benchmarks/train_feature_net.py`
            (its `.json` record must lie beside it).
        batch_size: images per forward pass.

    Attributes:
        name, image_shape, num_classes, test_accuracy (as recorded when it
        was trained).
    """

    def __init__(self, name_or_path="mnist", batch_size=500):
        weights, record = _locate_feature_net(name_or_path)
        self.record = record
        self.name = record["dataset"]
        self.image_shape = tuple(record["image_shape"])
        self.num_classes = int(record["num_classes"])
        self.test_accuracy = float(record["test_accuracy"])
        self.batch_size = batch_size
        self.network = build_feature_net(self.image_shape, self.num_classes,
                                         tuple(record["widths"]), to_load=True)
        self.network.load_weights(weights)
        network = self.network
        self._forward = backend.current().compile_function(
            lambda weights, state, x: network.stateless_call(weights, state, x, training=False)[0])

    def __repr__(self):
        return (f"FeatureNet({self.name!r}: {self.image_shape}, {self.num_classes} classes, "
                f"test accuracy {self.test_accuracy:.2%})")

    def outputs(self, images):
        """`(features, logits)` as float64 numpy arrays for images in [0, 1]."""
        images = check_images(images, self.image_shape, name="images to score")
        weights = [v.value for v in self.network.trainable_variables]
        state = [v.value for v in self.network.non_trainable_variables]
        features, logits = [], []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            # Compiled once per padded size: the batch size, or a power of two below it.
            size = min(self.batch_size, max(16, 1 << (len(batch) - 1).bit_length()))
            padded = np.concatenate([batch, np.zeros((size - len(batch),) + batch.shape[1:],
                                                     batch.dtype)])
            batch_features, batch_logits = self._forward(weights, state, padded)
            features.append(keras.ops.convert_to_numpy(batch_features)[:len(batch)])
            logits.append(keras.ops.convert_to_numpy(batch_logits)[:len(batch)])
        return np.concatenate(features).astype(np.float64), np.concatenate(logits).astype(np.float64)

    def features(self, images):
        """`(N, D)` float64 features of images in [0, 1]."""
        return self.outputs(images)[0]

    def classify(self, images):
        """Predicted class of each image, int `(N,)`."""
        return np.argmax(self.outputs(images)[1], axis=-1)


def _locate_feature_net(name_or_path):
    path = Path(os.fspath(name_or_path))
    if str(name_or_path) in FEATURE_NETS:
        path = FEATURE_NET_DIR / f"{name_or_path}.weights.h5"
        if not path.is_file():
            raise ValueError(
                f"no trained feature net ships for {name_or_path!r} (built in: "
                f"{', '.join(available_feature_nets())}); train one with "
                f"python benchmarks/train_feature_net.py --dataset {name_or_path} and pass its "
                ".weights.h5 file."
            )
    elif not str(path).endswith(".weights.h5"):
        raise ValueError(
            f"feature_net must be one of {', '.join(available_feature_nets())} or a .weights.h5 "
            f"file from benchmarks/train_feature_net.py; got {name_or_path!r}."
        )
    record_path = path.with_name(path.name[: -len(".weights.h5")] + ".json")
    if not path.is_file() or not record_path.is_file():
        raise ValueError(
            f"feature net weights {path} and their record {record_path.name} must both exist; "
            "benchmarks/train_feature_net.py writes the pair."
        )
    return path, json.loads(record_path.read_text())


def available_feature_nets():
    """Names of the feature nets shipped with the package."""
    return sorted(name for name in FEATURE_NETS if (FEATURE_NET_DIR / f"{name}.weights.h5").is_file())


_LOADED = {}


def get_feature_net(feature_net):
    """A `FeatureNet` from a name, a weights path or an instance; built-in
    ones are loaded once per process."""
    if isinstance(feature_net, FeatureNet):
        return feature_net
    key = os.fspath(feature_net)
    if key not in _LOADED:
        _LOADED[key] = FeatureNet(key)
    return _LOADED[key]


# ------------------------------------------------------------- the distances
def feature_statistics(features):
    """Mean and covariance (float64, unbiased) of `(N, D)` features."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be (N, D) with N >= 2; got shape {features.shape}.")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mean_a, cov_a, mean_b, cov_b):
    """Fréchet distance between N(mean_a, cov_a) and N(mean_b, cov_b):
    ``|mean_a - mean_b|^2 + tr(cov_a + cov_b - 2 (cov_a cov_b)^(1/2))``.

    The trace of the matrix square root is computed as the sum of square
    roots of the eigenvalues of the symmetric ``cov_a^(1/2) cov_b cov_a^(1/2)``,
    which has the same spectrum as ``cov_a cov_b`` and, unlike a general
    `sqrtm`, never turns complex through round-off.
    """
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root_a @ cov_b @ root_a
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    difference = mean_a - mean_b
    return float(difference @ difference + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_root)


def kernel_distance(features_a, features_b, subsets=100, subset_size=1000, seed=0):
    """KID: the unbiased squared MMD with the cubic polynomial kernel
    ``k(x, y) = (x.y / D + 1)^3``, averaged over `subsets` random subsets of
    `min(subset_size, N_a, N_b)` rows of each set.

    Returns `(mean, std)` over the subsets.
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples in each set; got {len(a)} and {len(b)}.")
    dim = a.shape[1]
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), size, replace=False)]
        y = b[rng.choice(len(b), size, replace=False)]
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        off_diagonal = size * (size - 1)
        estimates.append(
            (k_xx.sum() - np.trace(k_xx)) / off_diagonal
            + (k_yy.sum() - np.trace(k_yy)) / off_diagonal
            - 2 * k_xy.mean()
        )
    return float(np.mean(estimates)), float(np.std(estimates))


# ------------------------------------------------------------ image metrics
def fid(real_images, generated_images, feature_net="mnist"):
    """FID between two sets of images in [0, 1] (uint8 accepted)."""
    net = get_feature_net(feature_net)
    return frechet_distance(*feature_statistics(net.features(real_images)),
                            *feature_statistics(net.features(generated_images)))


def kid(real_images, generated_images, feature_net="mnist", subsets=100, subset_size=1000, seed=0):
    """KID `(mean, std)` between two sets of images in [0, 1]."""
    net = get_feature_net(feature_net)
    return kernel_distance(net.features(real_images), net.features(generated_images),
                           subsets=subsets, subset_size=subset_size, seed=seed)


def psnr(images, reference, mask=None):
    """Peak signal-to-noise ratio of each image against its reference, in dB
    (peak 1.0: images in [0, 1], `images` clipped to it first), over the
    pixels where `mask` (broadcast to the images) is true if given. An exact
    match scores 120 dB (a mean squared error floored at 1e-12).

    Returns a float64 array of shape `(N,)`; `.mean()` is the usual figure.

    >>> clean = np.full((1, 2, 2, 1), 0.5)
    >>> float(psnr(clean + 0.1, clean)[0])  # 10 log10(1 / 0.1**2)
    20.0
    """
    images = np.asarray(images, np.float64)
    reference = np.asarray(reference, np.float64)
    if images.shape != reference.shape or images.ndim < 2:
        raise ValueError(f"psnr compares batches of equal shape (N, ...); got {images.shape} "
                         f"and {reference.shape}.")
    error = ((np.clip(images, 0, 1) - reference) ** 2).reshape(len(images), -1)
    if mask is None:
        mse = error.mean(axis=1)
    else:
        mask = np.broadcast_to(np.asarray(mask, bool), reference.shape).reshape(len(images), -1)
        if not mask.any(axis=1).all():
            raise ValueError("psnr's mask selects no pixel of some image; it must select at least one.")
        mse = (error * mask).sum(axis=1) / mask.sum(axis=1)
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def label_accuracy(images, labels, feature_net="mnist"):
    """Fraction of `images` the feature net classifies as their `labels`
    ("does a generated 7 look like a 7")."""
    labels = np.asarray(labels).reshape(-1)
    net = get_feature_net(feature_net)
    if len(labels) != len(np.asarray(images)):
        raise ValueError(f"labels must give one label per image; got {len(labels)} labels for "
                         f"{len(np.asarray(images))} images.")
    return float(np.mean(net.classify(images) == labels))


class _StreamingDistance:
    """Reference features fixed at construction; generated ones accumulated."""

    def __init__(self, reference_images, feature_net="mnist"):
        self.feature_net = get_feature_net(feature_net)
        self.reference = self.feature_net.features(reference_images)
        self.reset_state()

    def reset_state(self):
        self._generated = []

    def update_state(self, images):
        self._generated.append(self.feature_net.features(images))

    def _features(self):
        if not self._generated:
            raise ValueError(f"{type(self).__name__}.result() needs update_state(images) first.")
        return np.concatenate(self._generated)


class FID(_StreamingDistance):
    """Streaming FID against fixed reference images.

    >>> metric = FID(x_test, feature_net="mnist")
    >>> metric.update_state(model.generate(500, seed=0))
    >>> metric.result()
    """

    def __init__(self, reference_images, feature_net="mnist"):
        super().__init__(reference_images, feature_net)
        self._reference_statistics = feature_statistics(self.reference)

    def result(self):
        return frechet_distance(*self._reference_statistics, *feature_statistics(self._features()))


class KID(_StreamingDistance):
    """Streaming KID against fixed reference images; `result()` is `(mean, std)`."""

    def __init__(self, reference_images, feature_net="mnist", subsets=100, subset_size=1000, seed=0):
        super().__init__(reference_images, feature_net)
        self.subsets, self.subset_size, self.seed = subsets, subset_size, seed

    def result(self):
        return kernel_distance(self.reference, self._features(), self.subsets, self.subset_size, self.seed)


# ------------------------------------------------------------- whole models
def score_model(
    model,
    reference_images=None,
    feature_net="mnist",
    num_images=1000,
    steps=20,
    sampler="dpmpp_2m",
    seed=0,
    guidance_scale=1.0,
    eta=0.0,
    batch_size=None,
    kid_subset_size=1000,
    reference_features=None,
    prompts=None,
):
    """Generate `num_images` samples from `model` and score them against
    `reference_images` (in [0, 1], e.g. the test split), or against
    `reference_features` from `FeatureNet.features`.

    A class-conditional model is sampled with labels 0, 1, 2, ... cycling, so
    every class is equally represented, and its samples are also classified.
    A prompted model is sampled with `prompts`, a list indexed by class of
    the feature net of lists of prompts naming that class (e.g.
    `keras_diffusion.captions.class_prompts("mnist", "held_out")`): classes
    cycle, and each class's prompts take turns; the share of samples that
    the feature net reads as the class their prompt names is the prompt
    adherence.

    Returns:
        dict with `fid`, `kid`, `kid_std`, `num_images`, `seconds` (sampling
        time) and, for a conditional model, `label_accuracy` (a prompted
        one: `prompt_adherence`); the scores are NaN when the samples are
        not finite (diverged weights).
    """
    if (reference_images is None) == (reference_features is None):
        raise ValueError("pass exactly one of reference_images and reference_features.")
    net = get_feature_net(feature_net)
    if tuple(model.image_shape) != net.image_shape:
        raise ValueError(
            f"the model makes {tuple(model.image_shape)} images but feature net {net.name!r} "
            f"scores {net.image_shape} images; pass the feature net of the model's dataset."
        )
    check_integer("num_images", num_images, low=2)
    labels, texts = None, None
    if getattr(model, "prompted", False):
        labels, texts = _class_prompts(prompts, net, num_images)
    elif prompts is not None:
        raise ValueError("prompts were given, but the model has no text encoder; leave them out.")
    elif model.conditional:
        if model.num_classes != net.num_classes:
            raise ValueError(
                f"the model has {model.num_classes} classes but feature net {net.name!r} "
                f"knows {net.num_classes}; pass the feature net of the model's dataset."
            )
        labels = [index % model.num_classes for index in range(num_images)]
    elif guidance_scale != 1.0:
        raise ValueError(
            f"guidance_scale needs a class-conditional model; got {guidance_scale} for an "
            "unconditional one (leave it at 1.0)."
        )
    started = time.perf_counter()
    images = model.generate(num_images, steps=steps, sampler=sampler, seed=seed,
                            labels=None if texts is not None else labels, prompts=texts,
                            guidance_scale=guidance_scale, eta=eta, batch_size=batch_size)
    seconds = time.perf_counter() - started
    if not np.all(np.isfinite(images)):
        # Diverged weights: the scores are undefined, which is what training logs should show.
        undefined = {"fid": math.nan, "kid": math.nan, "kid_std": math.nan}
        if labels is not None:
            undefined["label_accuracy"] = math.nan
        scores = undefined
    else:
        scores = score_images(images, reference_images, net, labels=labels,
                              reference_features=reference_features,
                              kid_subset_size=kid_subset_size, seed=seed)
    if texts is not None:
        scores["prompt_adherence"] = scores.pop("label_accuracy")
    return dict(scores, num_images=int(num_images), seconds=seconds)


def _class_prompts(prompts, net, num_images):
    """`(labels, texts)` for scoring a prompted model: classes cycling, and
    each class's prompts in turn."""
    if prompts is None:
        raise ValueError(
            "a prompted model is scored with prompts naming each class: pass prompts=, e.g. "
            "keras_diffusion.captions.class_prompts('mnist', 'held_out').")
    if len(prompts) != net.num_classes or not all(
            isinstance(texts, (list, tuple)) and texts for texts in prompts):
        raise ValueError(
            f"prompts must be a list of {net.num_classes} non-empty lists of prompts, one per "
            f"class of feature net {net.name!r}; got {len(prompts)} entries.")
    labels = [index % net.num_classes for index in range(num_images)]
    texts = [prompts[label][(index // net.num_classes) % len(prompts[label])]
             for index, label in enumerate(labels)]
    return labels, texts


def score_images(images, reference_images, feature_net="mnist", labels=None, reference_features=None,
                 kid_subset_size=1000, seed=0):
    """FID, KID (and, given `labels`, label accuracy) of `images` against
    `reference_images`, or against `reference_features` computed before
    with the same feature net (to score many sets against one reference).

    Returns:
        dict with `fid`, `kid`, `kid_std` and, with labels, `label_accuracy`.
    """
    net = get_feature_net(feature_net)
    if reference_features is None:
        reference_features = net.features(reference_images)
    features, logits = net.outputs(images)
    kid_mean, kid_std = kernel_distance(reference_features, features, subset_size=kid_subset_size, seed=seed)
    scores = {
        "fid": frechet_distance(*feature_statistics(reference_features), *feature_statistics(features)),
        "kid": kid_mean,
        "kid_std": kid_std,
    }
    if labels is not None:
        scores["label_accuracy"] = float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))
    return scores
