"""Prompts against labels: how well a text-to-image model follows its prompts.

    KERAS_BACKEND=torch python benchmarks/prompts.py --data-dir DATA --write docs/prompts.md

It trains, one after the other in this process and for the same number of
steps, the class-conditional model of `configs/mnist_conditional.yaml` and the
prompted model of `configs/mnist_prompts.yaml` (same network, budget and
guidance; captions from the digit names and the training templates), then:

1. **prompt adherence**: the share of samples that the shipped MNIST feature
   net reads as the digit their prompt names, for prompts from the
   *held-out* templates (never seen in training) and from the training ones,
   against the label accuracy of the class-conditional model; at
   DPM-Solver++(2M) `--sampling-steps` (default 20 and 10);
2. **FID/KID** of the same samples against the test split;
3. **cost per sampling step**: seconds per image and step of guided sampling,
   prompts against labels, measured side by side;
4. with `--grid PATH`, a grid of the prompted model's samples for a handful
   of prompts, one row each.

With `--cifar10-latent-minutes M` it instead trains the latent recipe of
`configs/cifar10_latent.yaml`, prompted (captions from the CIFAR-10 class names
and templates), for M minutes of wall clock with 30% of them on its autoencoder:
the protocol of the class-conditional latent row of docs/latent.md
(`benchmarks/latent.py --equal-minutes 10 --conditional`), whose label accuracy
is the bar, at that row's guidance (3) and sampler (DPM++(2M), 20 steps):

    KERAS_BACKEND=torch python benchmarks/prompts.py --data-dir DATA --cifar10-latent-minutes 10

`--train-steps` sets the budget (default 1,875: one epoch of 32). With
`--models prompts` only the prompted model is trained (the label model's
scores at this budget are in docs/quality.md); the cost per step is still
measured for both, side by side (it does not depend on the weights).
"""

import argparse
import sys
import time
from pathlib import Path

import keras

import keras_diffusion as kd
from keras_diffusion.captions import class_prompts
from keras_diffusion.config import load_config
from keras_diffusion.data import CLASS_NAMES
from keras_diffusion.training import build_model
from keras_diffusion.training import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _markdown import write_between_markers  # noqa: E402
from keras_diffusion.precision import hardware  # noqa: E402

GRID_PROMPTS = ("a drawing of the number zero", "an image of a handwritten 3",
                "a drawing of the number five", "an image of a handwritten 7",
                "a drawing of the number nine")


def train(config, x, y, steps):
    """The model of `config` trained for `steps` steps on `(x, y)`; returns
    `(model, minutes, last loss)`."""
    keras.utils.set_random_seed(0)
    captions = y if config["text"]["enabled"] else None
    model = build_model(config, x.shape[1:], captions=captions,
                        class_names=None if captions else CLASS_NAMES["mnist"])
    model.compile(optimizer=build_optimizer(config, steps))
    targets = model.tokenize_captions(y, len(x)) if captions else y
    batch = config["training"]["batch_size"]
    per_epoch = len(x) // batch
    start = time.perf_counter()
    history = model.fit(x, targets, batch_size=batch, epochs=-(-steps // per_epoch),
                        steps_per_epoch=min(steps, per_epoch), verbose=0)
    return model, (time.perf_counter() - start) / 60, history.history["loss"][-1]


def seconds_per_step(model, guidance, **condition):
    """Seconds per image and sampler step of guided DPM++(2M) sampling, after a warm-up."""
    options = dict(steps=20, sampler="dpmpp_2m", seed=0, guidance_scale=guidance, **condition)
    model.generate(100, **options)
    start = time.perf_counter()
    model.generate(100, **options)
    return (time.perf_counter() - start) / (100 * 20)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="directory holding mnist.npz")
    parser.add_argument("--train-steps", type=int, default=1875)
    parser.add_argument("--score-images", type=int, default=500)
    parser.add_argument("--sampling-steps", type=int, nargs="+", default=[20, 10])
    parser.add_argument("--grid", help="PNG of the prompted model's samples")
    parser.add_argument("--write", help="Markdown file to put the table in")
    parser.add_argument("--cifar10-latent-minutes", type=float, default=None,
                        help="train and score a prompted latent CIFAR-10 model instead")
    parser.add_argument("--models", nargs="*", choices=("labels", "prompts"),
                        default=["labels", "prompts"],
                        help="which models to train and score (none: the cost per step only)")
    args = parser.parse_args(argv)
    if args.cifar10_latent_minutes:
        return cifar10_latent(args)

    overrides = [f"data.data_dir={args.data_dir}"] if args.data_dir else []
    labelled = load_config(ROOT / "configs" / "mnist_conditional.yaml", overrides)
    prompted = load_config(ROOT / "configs" / "mnist_prompts.yaml", overrides)
    x, labels = kd.load_dataset("mnist", args.data_dir)
    x_test, _ = kd.load_dataset("mnist", args.data_dir, split="test")
    net = kd.metrics.get_feature_net("mnist")
    reference = net.features(x_test)
    train_captions = class_prompts("mnist", "train")
    guidance = labelled["sampling"]["guidance_scale"]

    rows = []
    label_model, minutes, loss = train(labelled, x, labels,
                                       args.train_steps if "labels" in args.models else 1)
    for steps in args.sampling_steps if "labels" in args.models else ():
        scores = kd.metrics.score_model(label_model, feature_net=net, reference_features=reference,
                                        num_images=args.score_images, steps=steps,
                                        sampler="dpmpp_2m", guidance_scale=guidance,
                                        batch_size=250)
        rows.append(f"| labels (`mnist_conditional.yaml`) | {minutes:.1f} | {loss:.3f} | {steps} | "
                    f"{scores['label_accuracy']:.1%} (label) | – | {scores['fid']:.2f} | "
                    f"{scores['kid']:.3f} ± {scores['kid_std']:.3f} |")
        print(rows[-1], flush=True)
    captions = [train_captions[label] for label in labels]
    text_model, minutes, loss = train(prompted, x, captions,
                                      args.train_steps if "prompts" in args.models else 1)
    # Side by side: each model timed twice, alternately, after a warm-up.
    label_costs, text_costs = [], []
    for _ in range(2):
        label_costs.append(seconds_per_step(label_model, guidance, labels=list(range(10)) * 10))
        text_costs.append(seconds_per_step(
            text_model, guidance, prompts=[class_prompts("mnist")[d][0] for d in range(10)] * 10))
    label_cost, text_cost = min(label_costs), min(text_costs)
    for steps in args.sampling_steps if "prompts" in args.models else ():
        held_out = kd.metrics.score_model(text_model, feature_net=net, reference_features=reference,
                                          num_images=args.score_images, steps=steps,
                                          sampler="dpmpp_2m", guidance_scale=guidance,
                                          batch_size=250, prompts=class_prompts("mnist"))
        seen = "–"
        if steps == args.sampling_steps[0]:
            seen = kd.metrics.score_model(
                text_model, feature_net=net, reference_features=reference,
                num_images=args.score_images, steps=steps, sampler="dpmpp_2m",
                guidance_scale=guidance, batch_size=250, prompts=train_captions)
            seen = f"{seen['prompt_adherence']:.1%}"
        rows.append(f"| prompts (`mnist_prompts.yaml`) | {minutes:.1f} | {loss:.3f} | {steps} | "
                    f"**{held_out['prompt_adherence']:.1%}** | {seen} | "
                    f"{held_out['fid']:.2f} | {held_out['kid']:.3f} ± {held_out['kid_std']:.3f} |")
        print(rows[-1], flush=True)
    if args.grid:
        per_row = 8
        prompts = [prompt for prompt in GRID_PROMPTS for _ in range(per_row)]
        kd.save_image_grid(
            text_model.generate(len(prompts), prompts=prompts, guidance_scale=guidance,
                                steps=20, sampler="dpmpp_2m", seed=1),
            args.grid, nrow=per_row, title="; ".join(f'"{p}"' for p in GRID_PROMPTS[:2]) + " ...")

    tokens = text_model.tokenizer.max_length
    text = "\n".join([
        f"Measured on {hardware()}, Keras {keras.__version__}, backend "
        f"{keras.backend.backend()}: both models trained for {args.train_steps:,} steps of "
        f"{labelled['training']['batch_size']} on the 60,000 MNIST training images, one after the "
        f"other in one process (trained and scored here: {' and '.join(args.models)}); "
        f"{args.score_images:,} DPM++(2M) samples of each at guidance "
        f"{guidance:g}, scored with the shipped `mnist` feature net against the 10,000 test images. "
        "Prompts cycle over the ten digits and over each digit's templates: held-out templates "
        "(never in training) for the adherence and the scores, training templates for the "
        "column beside it.",
        "",
        "| model | training minutes | last loss | sampler steps | adherence, held-out prompts | "
        "adherence, training prompts | FID | KID |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Cost of guided sampling, per image and step (batches of 100, DPM++(2M) 20 steps, the "
        f"faster of two alternate timings of each): labels "
        f"{label_cost * 1e3:.2f} ms, prompts {text_cost * 1e3:.2f} ms "
        f"(**{text_cost / label_cost:.2f}x**; the prompt's {tokens} tokens are encoded once per "
        "batch, and every attention block also cross-attends to them).",
    ])
    print(text)
    if args.write:
        write_between_markers(Path(args.write), "prompts-mnist", text, "Prompts")


def cifar10_latent(args):
    """The prompted latent CIFAR-10 recipe at equal minutes (see the module
    docstring)."""
    from latent import TimeLimit

    from keras_diffusion.config import autoencoder_arguments

    config = load_config(ROOT / "configs" / "cifar10_latent.yaml", [
        "training.lr_decay=constant", "text.enabled=true", "text.dim=64", "text.depth=2",
        "text.heads=4", "text.max_length=12", "model.min_snr_gamma=null",
        "sampling.guidance_scale=3.0"] + ([f"data.data_dir={args.data_dir}"] if args.data_dir else []))
    x, labels = kd.load_dataset("cifar10", args.data_dir)
    x_test, _ = kd.load_dataset("cifar10", args.data_dir, split="test")
    budget, share = args.cifar10_latent_minutes * 60, 0.3
    keras.utils.set_random_seed(0)
    start = time.perf_counter()
    settings = config["autoencoder"]
    autoencoder = kd.Autoencoder(x.shape[1:], seed=0, **autoencoder_arguments(config))
    autoencoder.compile(optimizer=keras.optimizers.AdamW(settings["learning_rate"]))
    autoencoder.fit(x, batch_size=settings["batch_size"], epochs=1000, verbose=0,
                    callbacks=[TimeLimit(budget * share)])
    ae_seconds = time.perf_counter() - start
    captions = [class_prompts("cifar10", "train")[label] for label in labels]
    model = build_model(config, x.shape[1:], autoencoder=autoencoder, captions=captions)
    model.compile(optimizer=build_optimizer(config, 10**6))
    batch = config["training"]["batch_size"]
    history = model.fit(x, model.tokenize_captions(captions, len(x)), batch_size=batch,
                        epochs=1000, verbose=0, callbacks=[TimeLimit(budget - ae_seconds)])
    minutes = (time.perf_counter() - start) / 60
    steps = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    guidance = config["sampling"]["guidance_scale"]
    options = dict(feature_net="cifar10", num_images=args.score_images, steps=20,
                   sampler="dpmpp_2m", batch_size=250, guidance_scale=guidance)
    held_out = kd.metrics.score_model(model, x_test, prompts=class_prompts("cifar10"), **options)
    seen = kd.metrics.score_model(model, x_test, prompts=class_prompts("cifar10", "train"),
                                  **options)
    if args.grid:
        names = CLASS_NAMES["cifar10"]
        prompts = [f"a close-up photo of a {name}" for name in names for _ in range(4)]
        kd.save_image_grid(model.generate(len(prompts), prompts=prompts, guidance_scale=guidance,
                                          steps=20, sampler="dpmpp_2m", seed=1),
                           args.grid, nrow=4, title="a close-up photo of a {class}, one row each")
    text = "\n".join([
        f"Measured on {hardware()}, Keras {keras.__version__}, backend "
        f"{keras.backend.backend()}: `configs/cifar10_latent.yaml` with a `text` section (a "
        f"2-layer, 64-wide TextEncoder), trained for {args.cifar10_latent_minutes:g} minutes of "
        f"wall clock (autoencoder {ae_seconds / 60:.1f} min, then {steps:,} steps of {batch}; "
        f"{minutes:.1f} min in all) on the 10,000-image CIFAR-10 subset, constant learning rate "
        f"after warm-up; {args.score_images:,} DPM++(2M) 20-step samples at guidance {guidance:g} "
        "scored with the shipped `cifar10` feature net (77.8% on real test images) against the "
        "10,000 test images.",
        "",
        f"| latent CIFAR-10, {args.cifar10_latent_minutes:g} minutes | conditioned on | adherence (label accuracy) | FID | KID |",
        "|---|---|---|---|---|",
        "| class-conditional (docs/latent.md) | labels | 23.3% | 23.18 | 0.450 ± 0.016 |",
        f"| prompted | held-out prompts | **{held_out['prompt_adherence']:.1%}** | "
        f"{held_out['fid']:.2f} | {held_out['kid']:.3f} ± {held_out['kid_std']:.3f} |",
        f"| prompted | training prompts | {seen['prompt_adherence']:.1%} | {seen['fid']:.2f} | "
        f"{seen['kid']:.3f} ± {seen['kid_std']:.3f} |",
        "",
        f"Last epoch's loss {history.history['loss'][-1]:.3f}.",
    ])
    print(text)
    if args.write:
        write_between_markers(Path(args.write), "prompts-cifar10-latent", text, "Prompts")


if __name__ == "__main__":
    main()
