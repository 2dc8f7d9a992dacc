"""Latent against pixel diffusion: what the autoencoder costs and what it buys.

    KERAS_BACKEND=torch python benchmarks/latent.py --dataset cifar10 --write docs/latent.md

For one dataset and the backend this process runs on, it measures:

1. the autoencoder of `configs/<dataset>_latent.yaml`: training time for
   `--ae-epochs` epochs over `--ae-images` training images, and the PSNR of
   its reconstructions of the first `--test-images` test images;
2. training and sampling images/s of the latent model of that config against
   the pixel model of `configs/<dataset>.yaml`, with the same sampler and
   steps (DPM-Solver++(2M), 20 steps), one after the other in this process;
3. encoding inside the train step (what `LatentDiffusionModel.fit` does)
   against a `DiffusionModel` trained on latents encoded once beforehand, the
   other way to feed a latent model.

With `--equal-minutes M` it instead trains both recipes for M minutes of
wall clock each, the latent one spending `--ae-share` of them on its
autoencoder, and scores 1,000 DPM-Solver++ 20-step samples of each (FID and
KID against the test split, with the shipped feature net):

    KERAS_BACKEND=torch python benchmarks/latent.py --dataset cifar10 --equal-minutes 20

With `--conditional` both recipes are class-conditional (the pixel one is
`configs/<dataset>_conditional.yaml`, the latent one gets its label settings),
are sampled with that config's guidance scale, and the table adds the label
accuracy of the samples. `--grids DIR` saves a grid of each recipe's samples.

It needs the dataset's `.npz` (`--data-dir`, as `keras-diffusion train`).
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import keras

import keras_diffusion as kd
from keras_diffusion.config import autoencoder_arguments
from keras_diffusion.config import load_config
from keras_diffusion.training import build_model
from keras_diffusion.training import build_optimizer
from keras_diffusion.training import train_autoencoder

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import write_between_markers  # noqa: E402
from keras_diffusion.precision import hardware  # noqa: E402


class OnLatents(kd.DiffusionModel):
    """A DiffusionModel trained on latents encoded beforehand: its inputs
    are the diffusion inputs, not images in [0, 1]."""

    def diffusion_inputs(self, latents):
        return keras.ops.cast(latents, "float32")

    def fit(self, *args, **kwargs):  # no image checks: these are latents
        return keras.Model.fit(self, *args, **kwargs)


class TimeLimit(keras.callbacks.Callback):
    """Stop `fit` once `seconds` have passed."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if time.perf_counter() - self.start > self.seconds:
            self.model.stop_training = True


def _throughput(model, images, labels, batch, steps):
    """(train images/s, sampling images/s) after a warm-up of each."""
    model.compile(optimizer=keras.optimizers.AdamW(1e-4))
    y = None if labels is None else labels[: batch * steps]

    def fit(n):
        model.fit(images[: batch * n], None if y is None else y[: batch * n], batch_size=batch,
                  epochs=1, shuffle=False, verbose=0)

    fit(2)
    start = time.perf_counter()
    fit(steps)
    train = batch * steps / (time.perf_counter() - start)
    options = dict(steps=20, sampler="dpmpp_2m", seed=0)
    model.generate(batch, **options)
    start = time.perf_counter()
    model.generate(batch, **options)
    return train, batch / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("mnist", "cifar10"), default="cifar10")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--ae-images", type=int, default=10000)
    parser.add_argument("--ae-epochs", type=int, default=None, help="default: the config's")
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--equal-minutes", type=float, default=None,
                        help="train each recipe this long, then score both")
    parser.add_argument("--ae-share", type=float, default=0.3,
                        help="with --equal-minutes: the latent recipe's share for its autoencoder")
    parser.add_argument("--score-images", type=int, default=1000)
    parser.add_argument("--conditional", action="store_true",
                        help="with --equal-minutes: class-conditional recipes, label accuracy too")
    parser.add_argument("--grids", help="with --equal-minutes: save sample grids in this folder")
    parser.add_argument("--write", help="put the table into this Markdown file")
    args = parser.parse_args(argv)
    if args.equal_minutes:
        return equal_minutes(args)


    keras.utils.set_random_seed(0)
    latent_config = load_config(ROOT / "configs" / f"{args.dataset}_latent.yaml",
                                [f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    pixel_config = load_config(ROOT / "configs" / f"{args.dataset}.yaml")
    if args.ae_epochs:
        latent_config["autoencoder"]["epochs"] = args.ae_epochs
    x, y = kd.load_dataset(args.dataset, args.data_dir, limit=args.ae_images)
    x_test, _ = kd.load_dataset(args.dataset, args.data_dir, split="test", limit=args.test_images)
    image_shape = x.shape[1:]

    # 1. The autoencoder.
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as temp:
        ae = train_autoencoder(latent_config, x, image_shape, Path(temp), verbose=0)
    ae_minutes = (time.perf_counter() - start) / 60
    psnr = ae.psnr(x_test, batch_size=256)

    # 2. Latent against pixel, the configs' networks.
    labels = y if latent_config["network"]["num_classes"] is not None else None
    latent = build_model(latent_config, image_shape, autoencoder=ae)
    latent_train, latent_sample = _throughput(latent, x, labels, args.batch, args.train_steps)
    pixel = build_model(pixel_config, image_shape)
    pixel_labels = y if pixel_config["network"]["num_classes"] is not None else None
    pixel_train, pixel_sample = _throughput(pixel, x, pixel_labels, args.batch, args.train_steps)

    # 3. Encoding in the step against latents encoded once.
    count = args.batch * args.train_steps
    start = time.perf_counter()
    cached = keras.ops.convert_to_numpy(kd.pipeline.encode(latent, x[:count], batch_size=256))
    encode_rate = count / (time.perf_counter() - start)
    on_latents = OnLatents(build_model(latent_config, ae.latent_shape).network,
                            kd.DiffusionSchedule(**latent_config["schedule"]), seed=0)
    on_latents.compile(optimizer=keras.optimizers.AdamW(1e-4))
    cached_labels = None if labels is None else labels[:count]

    def fit(n):
        on_latents.fit(cached[: args.batch * n],
                       None if cached_labels is None else cached_labels[: args.batch * n],
                       batch_size=args.batch, epochs=1, shuffle=False, verbose=0)

    fit(2)
    start = time.perf_counter()
    fit(args.train_steps)
    cached_train = count / (time.perf_counter() - start)

    rows = [
        f"Measured on {hardware()}, Keras {keras.__version__}, backend "
        f"{keras.backend.backend()}, batch {args.batch}, float32:",
        "",
        "| | value |",
        "|---|---|",
        f"| autoencoder | widths {list(ae.widths)}, {ae.latent_channels} latent channels, "
        f"{image_shape[0]}x{image_shape[1]}x{image_shape[2]} -> "
        f"{'x'.join(map(str, ae.latent_shape))}, {ae.count_params():,} parameters |",
        f"| autoencoder training | {latent_config['autoencoder']['epochs']} epochs over "
        f"{len(x):,} images: {ae_minutes:.1f} min |",
        f"| reconstruction PSNR, {len(x_test):,} test images | {psnr:.2f} dB |",
        f"| scaling factor | {float(keras.ops.convert_to_numpy(ae.scaling_factor)):.3f} |",
        f"| train images/s: pixel model (`{args.dataset}.yaml`) | {pixel_train:.1f} |",
        f"| train images/s: latent model (`{args.dataset}_latent.yaml`), encoding in the step "
        f"| {latent_train:.1f} |",
        f"| train images/s: the same network on latents encoded once | {cached_train:.1f} "
        f"(encoding: {encode_rate:.0f} images/s, once) |",
        f"| DPM++(2M) 20 steps images/s: pixel model | {pixel_sample:.2f} |",
        f"| DPM++(2M) 20 steps images/s: latent model, decoding included | {latent_sample:.2f} |",
        f"| sampling speed-up, latent over pixel | {latent_sample / pixel_sample:.1f}x |",
    ]
    text = "\n".join(rows)
    print(text)
    if args.write:
        write_between_markers(Path(args.write), f"latent-{args.dataset}-{keras.backend.backend()}",
                              text, "Latent diffusion")


def equal_minutes(args):
    """Both recipes trained for the same wall-clock minutes, then scored."""

    overrides = ["training.lr_decay=constant"] + (
        [f"data.data_dir={args.data_dir}"] if args.data_dir else [])
    pixel_name = f"{args.dataset}_conditional" if args.conditional else args.dataset
    pixel_config = load_config(ROOT / "configs" / f"{pixel_name}.yaml", overrides)
    if args.conditional:  # the latent recipe takes the pixel one's label settings
        overrides += [f"{section}.{key}={pixel_config[section][key]}" for section, key in (
            ("network", "num_classes"), ("model", "label_dropout"),
            ("model", "min_snr_gamma"), ("sampling", "guidance_scale"))]
    latent_config = load_config(ROOT / "configs" / f"{args.dataset}_latent.yaml",
                                [item.replace("=None", "=null") for item in overrides])
    x, y = kd.load_dataset(args.dataset, args.data_dir)
    x_test, _ = kd.load_dataset(args.dataset, args.data_dir, split="test")
    budget = args.equal_minutes * 60
    rows = []
    for name, config in (("pixel", pixel_config), ("latent", latent_config)):
        keras.utils.set_random_seed(0)
        start = time.perf_counter()
        autoencoder = None
        if name == "latent":
            settings = config["autoencoder"]
            autoencoder = kd.Autoencoder(x.shape[1:], seed=0, **autoencoder_arguments(config))
            autoencoder.compile(optimizer=keras.optimizers.AdamW(settings["learning_rate"]))
            autoencoder.fit(x, batch_size=settings["batch_size"], epochs=1000, verbose=0,
                            callbacks=[TimeLimit(budget * args.ae_share)])
        ae_seconds = time.perf_counter() - start
        model = build_model(config, x.shape[1:], autoencoder=autoencoder)
        model.compile(optimizer=build_optimizer(config, 10**6))
        batch = config["training"]["batch_size"]
        labels = y if config["network"]["num_classes"] is not None else None
        history = model.fit(x, labels, batch_size=batch, epochs=1000, verbose=0,
                            callbacks=[TimeLimit(budget - ae_seconds)])
        minutes = (time.perf_counter() - start) / 60
        steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
        guidance = config["sampling"]["guidance_scale"]
        scores = kd.metrics.score_model(model, x_test, feature_net=args.dataset,
                                        num_images=args.score_images, steps=20,
                                        sampler="dpmpp_2m", batch_size=250,
                                        guidance_scale=guidance)
        if args.grids:
            grid_labels = list(range(10)) * 4 if labels is not None else None
            kd.save_image_grid(
                model.generate(40, labels=grid_labels, guidance_scale=guidance, steps=20,
                               sampler="dpmpp_2m", seed=1),
                Path(args.grids) / f"latent_equal_minutes_{pixel_name}_{name}.png", nrow=10,
                title=f"{name}, {args.equal_minutes:g} min")
        accuracy = (f" {scores['label_accuracy']:.1%} |" if "label_accuracy" in scores else "")
        ae_part = f"autoencoder {ae_seconds / 60:.1f} min, then " if autoencoder else ""
        rows.append(
            f"| {name} | {ae_part}{steps:,} steps of {batch} ({minutes:.1f} min in all) | "
            f"{history.history['loss'][-1]:.3f} | {scores['fid']:.2f} | "
            f"{scores['kid']:.3f} ± {scores['kid_std']:.3f} | "
            f"{args.score_images / scores['seconds']:.1f} |{accuracy}")
        print(rows[-1], flush=True)
    text = "\n".join([
        f"Equal minutes on {hardware()}, Keras {keras.__version__}, backend "
        f"{keras.backend.backend()}: each recipe trained for {args.equal_minutes:g} minutes of wall "
        f"clock (the latent one spending {args.ae_share:.0%} on its autoencoder), constant learning "
        f"rate after warm-up; {args.score_images:,} DPM++(2M) 20-step samples of each scored against "
        f"the {len(x_test):,} test images with the `{args.dataset}` feature net"
        + (f"; class-conditional, guidance scale {pixel_config['sampling']['guidance_scale']:g}, "
           "labels cycling 0-9, label accuracy by the same net." if args.conditional else "."),
        "",
        "| recipe | training | last epoch's loss | FID | KID | sampling images/s |"
        + (" label accuracy |" if args.conditional else ""),
        "|---|---|---|---|---|---|" + ("---|" if args.conditional else ""),
        *rows,
    ])
    print(text)
    if args.write:
        write_between_markers(Path(args.write), f"latent-equal-minutes-{pixel_name}", text,
                              "Latent diffusion")


if __name__ == "__main__":
    main()
