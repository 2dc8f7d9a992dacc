"""The `keras-diffusion` command line.

The only module that parses arguments, prints for humans and exits. Keras is
imported after the arguments are read, so `--backend` can set
`KERAS_BACKEND` first. Every error is one line on stderr and exit code 2.
"""

import argparse
import inspect
import os
import sys
from pathlib import Path

from keras_diffusion import _with_xla_flag
from keras_diffusion.data import DATASETS  # numpy only: Keras still loads after --backend
from keras_diffusion.precision import DTYPES
from keras_diffusion.precision import PRECISIONS
from keras_diffusion.quiet import quiet_stderr

BACKENDS = ("tensorflow", "jax", "torch")
MODEL_HELP = (".keras file, preset name (keras-diffusion presets), hf://OWNER/NAME, or a Stable "
              "Diffusion 1.x/2.x or SDXL checkpoint: a diffusers folder or one .safetensors file")
CONFIG_HELP = ("for a single-file checkpoint: a diffusers folder of the same model (configs and "
               "tokenizer; no weights needed); default: the shipped SD 1.5 / 2.1 / SDXL configuration")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class CommandError(Exception):
    """A problem with the command line the user typed."""


def _common(parser):
    parser.add_argument("--backend", choices=BACKENDS, help="Keras backend (sets KERAS_BACKEND)")


def _dtype_argument(parser):
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="keep a Stable Diffusion checkpoint's weights in this dtype (half "
                             "the memory in bfloat16 or float16; default float32)")


def _precision_argument(parser):
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the network's precision; auto: bfloat16 on a GPU that computes it "
                             "natively, float32 elsewhere")


def _build_parser():
    parser = _Parser(prog="keras-diffusion", description="Train and sample diffusion models with Keras 3.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (help, add_arguments, _) in COMMANDS.items():
        command = commands.add_parser(name, help=help)
        _common(command)
        add_arguments(command)
    return parser


def _train_arguments(train, resumed="OUTPUT/backup"):
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("--data-dir", help="directory holding <dataset>.npz (offline use)")
    train.add_argument("--output", help="output directory (default: runs/<config name>)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set training.epochs=3")
    train.add_argument("--resume", action="store_true",
                       help=f"continue from {resumed} after a crash, or past the epochs set "
                            "(starts afresh when there is no backup)")


def _train_autoencoder_arguments(train):
    _train_arguments(train, resumed="OUTPUT/autoencoder_backup")


def _sample_arguments(sample):
    sample.add_argument("--model", required=True, help=MODEL_HELP)
    _dtype_argument(sample)
    sample.add_argument("--config", help=CONFIG_HELP)
    sample.add_argument("--lora", action="append",
                        help="a LoRA to apply: a .safetensors file or a folder holding "
                             "pytorch_lora_weights.safetensors, as diffusers, peft, kohya or "
                             "A1111 write it; repeat it to apply several")
    sample.add_argument("--lora-scale", type=float, action="append",
                        help="each LoRA's strength, in the order of --lora (default 1)")
    _precision_argument(sample)
    sample.add_argument("--num", type=int, default=None,
                        help="number of images (default: 16; 1 for models of images over 64 "
                             "pixels, such as Stable Diffusion)")
    sample.add_argument("--size", type=_image_size, default=None,
                        help="HxW of the images, for a model that takes any size it divides "
                             "(Stable Diffusion; default: the model's own)")
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--sampler", default="ddim")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=None)
    sample.add_argument("--label", action="append", default=None,
                        help="class label or name (repeatable; cycled over the images)")
    sample.add_argument("--labels", choices=("all",),
                        help="'all': every class, a column each, left to right, in --num // "
                             "classes rows (at least one: a single row when --num < 2 x classes)")
    _prompt_arguments(sample, "one row of the grid per prompt")
    sample.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    sample.add_argument("--out", required=True, help="PNG grid to write")
    sample.add_argument("--npz", help="also write the images, in [0, 1], to this .npz")


def _image_size(text):
    """`HxW` (or one number for a square) as `(H, W)`."""
    height, _, width = text.lower().partition("x")
    try:
        size = (int(height), int(width or height))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 512x768; got {text!r}") from None
    if min(size) < 1:
        raise argparse.ArgumentTypeError(f"expected positive sides; got {text!r}")
    return size


def _finetune_arguments(finetune):
    finetune.add_argument("--model", required=True, help=MODEL_HELP)
    _dtype_argument(finetune)
    finetune.add_argument("--config", help=CONFIG_HELP)
    finetune.add_argument("--data-dir", required=True,
                          help="folder of training images: with a metadata.jsonl of captions, or "
                               "any images with --instance-prompt (DreamBooth); cropped to the "
                               "aspect of --size and resized to it")
    finetune.add_argument("--output", required=True, help="folder for the LoRA file (or model), "
                                                          "sample grids, history and backup")
    finetune.add_argument("--instance-prompt", help="DreamBooth: the caption of every image, "
                                                    "e.g. 'a photo of sks dog'")
    finetune.add_argument("--class-prompt", help="DreamBooth prior preservation: the class, e.g. "
                                                 "'a photo of a dog'; the model makes its images")
    finetune.add_argument("--num-class-images", type=int, default=100)
    finetune.add_argument("--prior-loss-weight", type=float, default=1.0)
    finetune.add_argument("--lora-rank", type=int, default=8, help="0: fine-tune the whole UNet")
    finetune.add_argument("--lora-alpha", type=float, default=None, help="default: the rank")
    finetune.add_argument("--lora", help="continue training this LoRA (any layout sample --lora "
                                         "reads) instead of a new one of --lora-rank")
    finetune.add_argument("--size", type=_image_size, default=None,
                          help="HxW the images are cropped and resized to and trained at, any "
                               "size the model divides (diffusers' scripts' --resolution; "
                               "default: the model's own)")
    finetune.add_argument("--train-text-encoder", action="store_true",
                          help="LoRA on the text encoders' attention too (both CLIPs of SDXL "
                               "and SD 3)")
    options = finetune.add_argument_group(
        "training options, as diffusers' scripts name them (SD 1.x, 2.x and SDXL: --snr-gamma, "
        "--noise-offset; SD 3: --weighting-scheme and its settings, --precondition-outputs; "
        "all: --proportion-empty-prompts)")
    options.add_argument("--snr-gamma", dest="min_snr_gamma", type=float, default=None,
                         help="min-SNR loss weighting (5 is usual)")
    options.add_argument("--noise-offset", dest="noise_offset", type=float, default=None)
    options.add_argument("--proportion-empty-prompts", dest="prompt_dropout", type=float,
                         default=None, help="share of captions replaced by the empty prompt")
    options.add_argument("--weighting-scheme", dest="weighting_scheme", default=None,
                         choices=("logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"),
                         help="how the training sigmas are drawn and weighted (default "
                              "logit_normal)")
    options.add_argument("--logit-mean", dest="logit_mean", type=float, default=None)
    options.add_argument("--logit-std", dest="logit_std", type=float, default=None)
    options.add_argument("--mode-scale", dest="mode_scale", type=float, default=None)
    options.add_argument("--precondition-outputs", dest="precondition_outputs", type=int,
                         choices=(0, 1), default=None,
                         help="1 (the default): regress x0 = x_t - sigma v; 0: the velocity")
    finetune.add_argument("--learning-rate", type=float, default=1e-4)
    finetune.add_argument("--batch-size", type=int, default=1)
    finetune.add_argument("--epochs", type=int, default=10)
    finetune.add_argument("--sample-prompt", action="append", default=None,
                          help="prompt of the sample grids (repeatable; default: the instance "
                               "prompt or the first caption)")
    finetune.add_argument("--sample-every", type=int, default=1, help="epochs between grids")
    finetune.add_argument("--sample-steps", type=int, default=20)
    finetune.add_argument("--guidance", type=float, default=7.5)
    finetune.add_argument("--gradient-checkpointing", action="store_true",
                          help="recompute activations in the backward pass: less memory")
    finetune.add_argument("--cache-latents", action="store_true",
                          help="encode the images once with the frozen VAE, not in every step "
                               "(faster; one posterior sample per image)")
    finetune.add_argument("--resume", action="store_true",
                          help="continue an interrupted run in --output from its backup")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--distribute", default=None,
                          help="data_parallel: split each batch over the devices; fsdp (JAX): "
                               "shard the weights over them too")


def _finetune(args):
    _check_writable(Path(args.output) / "history.csv")
    from keras_diffusion.distribute import distribution_scope
    from keras_diffusion.loading import load_model

    with distribution_scope(args.distribute) as devices:  # the weights are made sharded there
        written = _finetune_in_scope(args, load_model(args.model, config=args.config,
                                                        dtype=args.dtype), devices)
    print("wrote " + ", ".join(map(str, written)) + f" and {Path(args.output) / 'samples'}/")


def _finetune_in_scope(args, model, devices):
    from keras_diffusion.stable_diffusion.finetuning import finetune

    if not hasattr(model, "enable_lora"):
        raise CommandError(f"finetune takes a Stable Diffusion checkpoint; {args.model} holds a "
                           f"{type(model).__name__} (train it with keras-diffusion train)")
    options = _fine_tuning_options(args, model)
    return finetune(
        model, args.data_dir, args.output, instance_prompt=args.instance_prompt,
        class_prompt=args.class_prompt, num_class_images=args.num_class_images,
        prior_loss_weight=args.prior_loss_weight, lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, init_lora=args.lora, learning_rate=args.learning_rate,
        batch_size=args.batch_size, epochs=args.epochs, sample_prompts=args.sample_prompt,
        sample_every=args.sample_every, sample_steps=args.sample_steps,
        guidance_scale=args.guidance, gradient_checkpointing=args.gradient_checkpointing,
        resume=args.resume, cache_latents=args.cache_latents, seed=args.seed, devices=devices,
        image_size=args.size, train_text_encoder=args.train_text_encoder,
        fine_tuning=options, **_progress_output())


# finetune's training options: `configure_fine_tuning`'s keyword -> the flag.
FINE_TUNING_FLAGS = {"min_snr_gamma": "--snr-gamma", "noise_offset": "--noise-offset",
                     "prompt_dropout": "--proportion-empty-prompts",
                     "weighting_scheme": "--weighting-scheme", "logit_mean": "--logit-mean",
                     "logit_std": "--logit-std", "mode_scale": "--mode-scale",
                     "precondition_outputs": "--precondition-outputs"}


def _fine_tuning_options(args, model):
    """The training options given on the command line, as the model's
    `configure_fine_tuning` keywords; one a family does not have (SD 3's
    weighting scheme on SD 1.5, min-SNR on SD 3's flow) is refused naming
    the flags it takes."""
    given = {key: getattr(args, key) for key in FINE_TUNING_FLAGS
             if getattr(args, key) is not None}
    accepted = inspect.signature(model.configure_fine_tuning).parameters
    refused = [FINE_TUNING_FLAGS[key] for key in given if key not in accepted]
    if refused:
        takes = ", ".join(flag for key, flag in FINE_TUNING_FLAGS.items() if key in accepted)
        raise CommandError(f"{', '.join(refused)} is not a training option of a "
                           f"{type(model).__name__}; it takes {takes}")
    if "precondition_outputs" in given:
        given["precondition_outputs"] = bool(given["precondition_outputs"])
    return given


def _convert_arguments(convert):
    convert.add_argument("--model", required=True, help=MODEL_HELP)
    _dtype_argument(convert)
    convert.add_argument("--config", help=CONFIG_HELP)
    convert.add_argument("--out", required=True, help=".keras file to write")


def _export_arguments(export):
    export.add_argument("--model", required=True, help=MODEL_HELP)
    _dtype_argument(export)
    export.add_argument("--out", required=True,
                        help="SavedModel directory to write (a .onnx file with --format onnx)")
    export.add_argument("--format", choices=("tf_saved_model", "onnx"), default="tf_saved_model",
                        help="tf_saved_model: generate/denoise/predict_noise endpoints; "
                             "onnx: predict_noise only")
    export.add_argument("--steps", type=int, default=50, help="sampler steps fixed in the export")
    export.add_argument("--sampler", default="ddim")
    export.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
    export.add_argument("--denoise-steps", type=int, default=10,
                        help="denoiser evaluations of the denoise endpoint")


def _evaluate_arguments(evaluate):
    evaluate.add_argument("--model", required=True, help=MODEL_HELP)
    _dtype_argument(evaluate)
    _precision_argument(evaluate)
    evaluate.add_argument("--num", type=int, default=10000, help="samples to generate and score")
    evaluate.add_argument("--sampler", default="dpmpp_2m")
    evaluate.add_argument("--steps", type=int, default=20)
    evaluate.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--guidance", type=float, default=1.0,
                          help="classifier-free guidance scale (conditional models)")
    evaluate.add_argument("--batch-size", type=int, default=None)
    evaluate.add_argument("--dataset", choices=DATASETS,
                          help="the model's dataset (default: from config.yaml beside the model)")
    evaluate.add_argument("--data-dir", help="directory holding <dataset>.npz (offline use)")
    evaluate.add_argument("--feature-net", help="a .weights.h5 from benchmarks/train_feature_net.py "
                                                "(default: the built-in one for the dataset)")
    evaluate.add_argument("--json", help="also write the scores to this .json file")


# ---------------------------------------------------------------- commands
def _train_config(args):
    """The config and output directory of `train` and `train-autoencoder`."""
    from keras_diffusion import config as config_lib

    overrides = list(args.set)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    config = config_lib.load_config(args.config, overrides)
    return config, Path(args.output or Path("runs") / Path(args.config).stem)


def _train(args):
    config, output = _train_config(args)
    _check_writable(output / "model.keras")

    from keras_diffusion.training import train

    train(config, output, resume=args.resume, **_progress_output())
    written = [output / "model.keras", f"{output / 'samples'}/", output / "history.csv",
               output / "loss.png"]
    if config["autoencoder"]["enabled"] and config["autoencoder"]["path"] is None:
        written[1:1] = [output / "autoencoder.keras", output / "autoencoder_reconstructions.png"]
    print("wrote " + ", ".join(map(str, written)))


def _progress_output():
    """A progress bar on a terminal; into a log (a file, a pipe, CI), a line
    per epoch and one a minute in between, instead of a bar's redraws."""
    if sys.stdout.isatty():
        return dict(verbose=1)
    return dict(verbose=2, log_every=60)


def _train_autoencoder(args):
    config, output = _train_config(args)
    _check_writable(output / "autoencoder.keras")

    import keras

    from keras_diffusion.data import load_dataset
    from keras_diffusion.training import train_autoencoder_stage

    autoencoder = train_autoencoder_stage(config, output, resume=args.resume, **_progress_output())
    print(f"wrote {output / 'autoencoder.keras'}, {output / 'autoencoder_history.csv'}, "
          f"{output / 'autoencoder_reconstructions.png'}, {output / 'config.yaml'}")
    line = (f"autoencoder: {'x'.join(map(str, autoencoder.image_shape))} -> "
            f"{'x'.join(map(str, autoencoder.latent_shape))}, scaling factor "
            f"{float(keras.ops.convert_to_numpy(autoencoder.scaling_factor)):.4f}")
    data = config["data"]
    if data["image_folder"] is None:
        test, _ = load_dataset(data["dataset"], data["data_dir"], split="test", limit=1000)
        line += f", reconstruction PSNR {autoencoder.psnr(test):.2f} dB on {len(test):,} test images"
    print(line)
    print(f"use it in a latent run with --set autoencoder.path={output / 'autoencoder.keras'}")


def _lora_scales(args):
    """`(path, scale)` of each --lora: one --lora-scale for all, or one each."""
    scales = args.lora_scale or [1.0]
    if len(scales) == 1:
        scales = scales * len(args.lora)
    if len(scales) != len(args.lora):
        raise CommandError(f"give one --lora-scale for every --lora, or one for all; got "
                           f"{len(args.lora)} --lora and {len(args.lora_scale)} --lora-scale")
    return list(zip(args.lora, scales))


def _sample(args):
    _check_suffix(args.out, (".png",), "--out")
    if args.npz:
        _check_suffix(args.npz, (".npz",), "--npz")
    for path in filter(None, (args.out, args.npz)):
        _check_writable(path)
    if args.num is not None and args.num < 1:
        raise CommandError(f"--num must be a positive integer; got {args.num}")

    from keras_diffusion.images import save_image_grid
    from keras_diffusion.images import write_images
    from keras_diffusion.loading import load_model

    model = load_model(args.model, precision=args.precision, config=args.config,
                       dtype=args.dtype)
    if args.lora:
        if not hasattr(model, "load_lora_weights"):
            raise CommandError(f"--lora needs a Stable Diffusion model; {args.model} holds a "
                               f"{type(model).__name__}")
        for index, (path, scale) in enumerate(_lora_scales(args)):
            model.load_lora_weights(path, scale=scale, adapter_name=f"lora{index}")
    if args.num is None:
        args.num = 16 if max(model.image_shape[:2]) <= 64 else 1
    labels, nrow = _labels(args, model)
    num = len(labels) if args.labels == "all" else args.num
    prompts = None
    if args.prompt:  # grouped: one row per prompt
        nrow = max(1, args.num // len(args.prompt))
        prompts = [prompt for prompt in args.prompt for _ in range(nrow)]
        num = len(prompts)
    images = model.generate(
        num, steps=args.steps, sampler=args.sampler, seed=args.seed, labels=labels,
        prompts=prompts, negative_prompts=args.negative_prompt,
        guidance_scale=args.guidance, eta=args.eta, batch_size=args.batch_size,
        image_size=args.size,
    )
    save_image_grid(images, args.out, nrow=nrow)
    if args.npz:
        write_images(args.npz, images)
    print(f"wrote {num} images to {args.out}" + (f" and {args.npz}" if args.npz else ""))


def _labels(args, model):
    """Labels for `generate` and the grid's row length. `--labels all` puts
    each class in a column, so one image per class reads as a single row
    (class 0 on the left) and more per class add rows below."""
    if args.labels == "all":
        if model.prompted:
            raise CommandError("--labels all needs a class-conditional model; this one is "
                               "prompted: pass --prompt (repeatable, one row each)")
        if not model.conditional:
            raise CommandError("--labels all needs a class-conditional model; this one is unconditional")
        rows = max(1, args.num // model.num_classes)
        return [c for _ in range(rows) for c in range(model.num_classes)], model.num_classes
    if args.label is None:
        return None, None
    return [args.label[i % len(args.label)] for i in range(args.num)], None


def _convert(args):
    _check_suffix(args.out, (".keras",), "--out")
    _check_writable(args.out)

    from keras_diffusion.images import atomic_write
    from keras_diffusion.loading import load_model

    model = load_model(args.model, config=args.config, dtype=args.dtype)
    atomic_write(args.out, model.save)
    size = os.path.getsize(args.out) / 2**20
    print(f"wrote {args.out} ({type(model).__name__}, {size:.0f} MB); "
          f"load it with keras_diffusion.load_model or --model")


def _export(args):
    if args.format == "onnx":
        _check_suffix(args.out, (".onnx",), "--out")
    _check_writable(args.out)

    from keras_diffusion import backend
    from keras_diffusion.loading import load_model

    model = load_model(args.model, dtype=args.dtype)
    if args.format == "onnx":
        model.export(args.out, format="onnx", verbose=False)
        print(f"wrote predict_noise to {args.out}")
        return
    if not backend.traces_saved_models():
        print("PyTorch cannot trace SavedModel endpoints: exporting under the TensorFlow backend")
    model.export(args.out, steps=args.steps, sampler=args.sampler, eta=args.eta,
                 denoise_steps=args.denoise_steps)
    endpoints = ("generate, generate_conditional" if model.conditional
                 else "generate, generate_from_tokens" if model.prompted else "generate")
    others = "predict_noise" if getattr(model, "autoencoder", None) else "denoise; predict_noise"
    print(f"wrote SavedModel {args.out} ({endpoints}: {args.sampler}, {args.steps} steps; {others})")


def _evaluate(args):
    if args.json:
        _check_suffix(args.json, (".json",), "--json")
        _check_writable(args.json)
    if args.num < 2:
        raise CommandError(f"--num must be at least 2; got {args.num}")
    import json

    from keras_diffusion.captions import class_prompts
    from keras_diffusion.config import dataset_of_run
    from keras_diffusion.data import load_dataset
    from keras_diffusion.images import atomic_write
    from keras_diffusion.metrics import get_feature_net
    from keras_diffusion.metrics import score_model
    from keras_diffusion.loading import load_model

    dataset = args.dataset or dataset_of_run(args.model)
    feature_net = get_feature_net(args.feature_net or dataset)
    reference, _ = load_dataset(dataset, args.data_dir, split="test")
    model = load_model(args.model, precision=args.precision, dtype=args.dtype)
    # A prompted model is scored on prompts from templates it never saw in training.
    prompts = class_prompts(dataset, "held_out") if model.prompted else None
    scores = score_model(
        model, reference, feature_net=feature_net, num_images=args.num, steps=args.steps,
        sampler=args.sampler, seed=args.seed, guidance_scale=args.guidance, eta=args.eta,
        batch_size=args.batch_size, prompts=prompts,
    )
    line = f"FID {scores['fid']:.3f}  KID {scores['kid']:.5f} ± {scores['kid_std']:.5f}"
    if "label_accuracy" in scores:
        line += f"  label accuracy {scores['label_accuracy']:.2%}"
    if "prompt_adherence" in scores:
        line += f"  prompt adherence {scores['prompt_adherence']:.2%} (held-out templates)"
    print(f"{line}  ({args.num} samples, {args.sampler} {args.steps} steps, "
          f"{scores['seconds']:.0f} s; vs {len(reference)} {dataset} test images; "
          f"feature net {feature_net.name}, test accuracy {feature_net.test_accuracy:.2%})")
    if args.json:
        record = dict(scores, dataset=dataset, sampler=args.sampler, steps=args.steps,
                      guidance=args.guidance, seed=args.seed, model=str(args.model))
        atomic_write(args.json, lambda temp: Path(temp).write_text(json.dumps(record, indent=2) + "\n"))




def _no_arguments(parser):
    """A command with no options but --backend."""


def _presets(args):
    from keras_diffusion.presets import format_number
    from keras_diffusion.presets import model_kind
    from keras_diffusion.presets import presets

    rows = [("name", "dataset", "kind", "params", "MB", "FID", "KID", "accuracy", "trained")]
    for name, record in presets().items():
        kind = model_kind(record.get("config") or {}).replace("class-", "")
        scores = (record.get("evaluation") or [{}])[0]
        accuracy = scores.get("label_accuracy", scores.get("prompt_adherence"))
        rows.append((
            name, record.get("dataset", "-"), kind, f"{record.get('parameters', 0) / 1e6:.1f}M",
            f"{record.get('file_mb', 0):.1f}", format_number(scores.get("fid"), ".2f"),
            format_number(scores.get("kid"), ".4f"), format_number(accuracy, ".1%"),
            f"{record.get('training_minutes', 0):.0f} min, {record.get('backend', '?')}, "
            f"{record.get('hardware', '?')}"))
    if len(rows) == 1:
        print("no presets are installed")
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("scores: keras-diffusion evaluate --model NAME (the record's command reproduces them; "
          "see each preset's .json)")


def _push_arguments(push):
    push.add_argument("--model", required=True, help=MODEL_HELP)
    push.add_argument("--to", required=True, help="hf://OWNER/NAME, created if it does not exist")
    push.add_argument("--token", help="Hugging Face token (default: huggingface-cli login or "
                                      "HF_TOKEN)")


def _push(args):
    from keras_diffusion import hub
    from keras_diffusion.loading import load_model

    hub.repo_id(args.to)  # a malformed destination fails before loading anything
    model = load_model(args.model)
    url = hub.push(model, args.to, record=hub.record_of(args.model), token=args.token)
    print(f"pushed {args.model} to {url}; load it with kd.load_model({args.to!r})")


def _demo_arguments(demo):
    demo.add_argument("--model", required=True, help=MODEL_HELP)
    _dtype_argument(demo)
    _precision_argument(demo)
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--host", default="127.0.0.1",
                      help="address to serve on (0.0.0.0 opens the page to the network)")
    demo.add_argument("--data-dir", help="directory holding <dataset>.npz: test images to pick "
                                         "in the page (offline use)")


def _demo(args):
    if not 1 <= args.port <= 65535:
        raise CommandError(f"--port must be from 1 to 65535; got {args.port}")
    from keras_diffusion import demo
    from keras_diffusion.loading import load_model

    model = load_model(args.model, precision=args.precision, dtype=args.dtype)
    examples = demo.test_images(args.model, args.data_dir)
    print(f"serving {args.model} on http://{args.host}:{args.port} "
          f"({'no test images: pass --data-dir' if examples is None else 'with test images'}; "
          "Ctrl-C stops it)", flush=True)
    demo.launch(model, examples=examples, title=f"keras_diffusion: {args.model}", host=args.host,
                port=args.port)


# ------------------------------------------------- restoration and editing
def _denoise_arguments(denoise):
    _application_arguments(denoise)
    denoise.add_argument("--sigma", type=float, default=None,
                         help="noise std on the [0, 1] scale, in (0, 1]; estimated when omitted")
    denoise.add_argument("--steps", type=int, default=10, help="denoiser evaluations")


def _inpaint_arguments(inpaint):
    _application_arguments(inpaint)
    inpaint.add_argument("--mask", required=True,
                         help="mask image or .npz (white/1 = known pixel), or a built-in shape: "
                              "center, left-half, random:P (P = fraction missing)")
    inpaint.add_argument("--steps", type=int, default=50)
    inpaint.add_argument("--jump-length", type=int, default=5, help="RePaint jump length")
    inpaint.add_argument("--resamples", type=int, default=4, help="RePaint resamplings (1: none)")
    inpaint.add_argument("--eta", type=float, default=1.0, help="DDIM stochasticity (1: DDPM)")
    inpaint.add_argument("--seed", type=int, default=0)
    _label_arguments(inpaint)


def _img2img_arguments(img2img):
    _application_arguments(img2img)
    img2img.add_argument("--strength", type=float, default=0.5,
                         help="in (0, 1]: how much of the input is noised away")
    img2img.add_argument("--steps", type=int, default=50)
    img2img.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
    img2img.add_argument("--seed", type=int, default=0)
    _label_arguments(img2img)


def _interpolate_arguments(interpolate):
    _application_arguments(interpolate, inputs=False)
    ends = interpolate.add_mutually_exclusive_group(required=True)
    ends.add_argument("--input", action="append", help="an end image (give two)")
    ends.add_argument("--seeds", type=int, nargs=2, metavar=("A", "B"), help="two noise seeds")
    interpolate.add_argument("--num", type=int, default=8, help="images, both ends included")
    interpolate.add_argument("--steps", type=int, default=50, help="DDIM steps (inversion too)")
    _label_arguments(interpolate)


def _application_arguments(parser, inputs=True):
    parser.add_argument("--model", required=True, help=MODEL_HELP)
    _dtype_argument(parser)
    _precision_argument(parser)
    if inputs:
        parser.add_argument("--input", required=True, help="a .png/.jpg image or an .npz of images")
    parser.add_argument("--out", required=True,
                        help=".npz of the images, or .png (one image, or a grid of several)")
    parser.add_argument("--batch-size", type=int, default=None)


def _label_arguments(parser):
    parser.add_argument("--label", action="append", default=None,
                        help="class label or name (repeatable; cycled over the images)")
    _prompt_arguments(parser, "cycled over the images")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")


def _prompt_arguments(parser, repeated):
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"text prompt, for a prompted model (repeatable; {repeated})")
    parser.add_argument("--negative-prompt", default=None,
                        help="what guidance steers away from (default: the empty prompt)")


def _prompts(args, num):
    """`prompts` and `negative_prompts` for `num` images, cycled."""
    return dict(prompts=_cycled(args.prompt, num), negative_prompts=args.negative_prompt)


def _denoise(args):
    _check_application_paths(args)
    if args.sigma is not None and not 0 < args.sigma <= 1:
        raise CommandError(f"--sigma must be in (0, 1] (or omitted, to estimate it); got {args.sigma}")
    model, images = _load_model_and_input(args, noisy=True)
    result = model.denoise(images, sigma=args.sigma, steps=args.steps, batch_size=args.batch_size)
    how = "estimated from the images" if result.sigma_estimated else "given"
    _write_output(args.out, result.images, f"(sigma {result.sigma:.3g}, {how})")


def _inpaint(args):
    _check_application_paths(args)
    from keras_diffusion.applications import make_mask
    from keras_diffusion.images import READ_EXTENSIONS
    from keras_diffusion.images import read_images

    builtin = Path(args.mask).suffix.lower() not in READ_EXTENSIONS  # "random:0.5" included
    if not builtin:
        _check_input(args.mask, "--mask")

    if builtin:
        make_mask(args.mask, (1, 3, 3, 1))  # a bad name fails before the model loads
    model, images = _load_model_and_input(args)
    mask = make_mask(args.mask, images.shape, seed=args.seed) if builtin else read_images(args.mask)
    out = model.inpaint(
        images, mask, steps=args.steps, jump_length=args.jump_length, resamples=args.resamples,
        eta=args.eta, seed=args.seed, labels=_cycled(args.label, len(images)),
        **_prompts(args, len(images)), guidance_scale=args.guidance, batch_size=args.batch_size,
    )
    _write_output(args.out, out, f"(mask {args.mask})")


def _img2img(args):
    _check_application_paths(args)
    if not 0 < args.strength <= 1:
        raise CommandError(f"--strength must be in (0, 1]; got {args.strength}")
    model, images = _load_model_and_input(args)
    out = model.img2img(
        images, strength=args.strength, steps=args.steps, eta=args.eta, seed=args.seed,
        labels=_cycled(args.label, len(images)), **_prompts(args, len(images)),
        guidance_scale=args.guidance, batch_size=args.batch_size,
    )
    _write_output(args.out, out, f"(strength {args.strength:g})")


def _interpolate(args):
    if args.input is not None:
        if len(args.input) != 2:
            raise CommandError(f"--input must be given twice (the two ends); got {len(args.input)}")
        for path in args.input:
            _check_input(path, "--input")
    _check_output(args.out)
    if args.num < 2:
        raise CommandError(f"--num must be at least 2 (both ends included); got {args.num}")
    from keras_diffusion.images import read_images
    from keras_diffusion.loading import load_model

    model = load_model(args.model, precision=args.precision, dtype=args.dtype)
    ends = args.seeds if args.input is None else [_one_image(read_images(path), path) for path in args.input]
    frames = model.interpolate(
        ends[0], ends[1], num=args.num, steps=args.steps, labels=_cycled(args.label, args.num),
        **_prompts(args, args.num), guidance_scale=args.guidance, batch_size=args.batch_size,
    )
    _write_output(args.out, frames, "", nrow=args.num)


def _check_application_paths(args):
    _check_input(args.input, "--input")
    _check_output(args.out)


def _check_input(path, flag):
    from keras_diffusion.images import READ_EXTENSIONS

    _check_suffix(path, READ_EXTENSIONS, flag)
    if not Path(path).is_file():
        raise CommandError(f"{flag} file not found: {path}")


def _check_output(path):
    _check_suffix(path, (".png", ".npz"), "--out")
    _check_writable(path)


def _load_model_and_input(args, noisy=False):
    from keras_diffusion.images import read_images
    from keras_diffusion.loading import load_model

    images = read_images(args.input, noisy=noisy)
    return load_model(args.model, precision=args.precision, dtype=args.dtype), images


def _one_image(images, path):
    if len(images) != 1:
        raise CommandError(f"{path} holds {len(images)} images; an end of the path must be one image")
    return images[0]


def _cycled(values, num):
    """`num` values, `values` repeated in turn; None stays None."""
    if values is None:
        return None
    return [values[i % len(values)] for i in range(num)]


def _write_output(path, images, note, nrow=None):
    """An .npz keeps every image; a .png holds one image, or else a grid."""
    from keras_diffusion.images import save_image_grid
    from keras_diffusion.images import write_images

    if Path(path).suffix.lower() == ".png" and len(images) > 1:
        save_image_grid(images, path, nrow=nrow)
        what = f"a grid of {len(images)} images"
    else:
        write_images(path, images)
        what = f"{len(images)} image{'s' if len(images) > 1 else ''}"
    print(f"wrote {what} to {path}" + (f" {note}" if note else ""))


# The one command table: name -> (help, its arguments, what runs it).
COMMANDS = {
    "train": ("train a model from a YAML config", _train_arguments, _train),
    "train-autoencoder": ("train only the autoencoder of a latent config",
                          _train_autoencoder_arguments, _train_autoencoder),
    "sample": ("generate images from a trained model", _sample_arguments, _sample),
    "export": ("export a trained model as a TensorFlow SavedModel (or ONNX)", _export_arguments,
               _export),
    "finetune": ("fine-tune a Stable Diffusion checkpoint on a folder of images (LoRA, "
                 "DreamBooth, or the whole UNet)", _finetune_arguments, _finetune),
    "convert": ("save a Stable Diffusion checkpoint (diffusers folder or single file) as one "
                ".keras file", _convert_arguments, _convert),
    "evaluate": ("score a model's samples with FID and KID against the test split",
                 _evaluate_arguments, _evaluate),
    "presets": ("list the trained models shipped with the package, with their scores",
                _no_arguments, _presets),
    "push": ("upload a model to the Hugging Face Hub with a model card", _push_arguments, _push),
    "demo": ("serve a web page to generate, inpaint, denoise and img2img with a model",
             _demo_arguments, _demo),
    "denoise": ("remove Gaussian noise from images", _denoise_arguments, _denoise),
    "inpaint": ("fill in the masked part of images (RePaint)", _inpaint_arguments, _inpaint),
    "img2img": ("re-imagine images (SDEdit)", _img2img_arguments, _img2img),
    "interpolate": ("images along a path between two images or two seeds",
                    _interpolate_arguments, _interpolate),
}


# ----------------------------------------------------------------- helpers
def _check_suffix(path, accepted, flag):
    if Path(path).suffix.lower() not in accepted:
        raise CommandError(f"{flag} must end in {' or '.join(accepted)}; got {path}")


def _check_writable(path):
    """Fail before any work if `path` could not be written."""
    parent = Path(path).absolute().parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"cannot write {path}: {existing} is not a writable directory")


def _one_line(error):
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def _usable_cores():
    """The cores this process may run on (its CPU affinity where the OS
    says, which a container or `taskset` may limit), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def _xla_flags_with_a_device_per_core(flags, cores):
    """`flags` (the XLA_FLAGS variable) with XLA's CPU split into one device
    per core, rounded down to a power of two so that the usual batch sizes
    divide evenly, unless they set a device count already. With a device per
    core, `distribute: data_parallel` splits each batch over the cores, on
    top of the cores XLA's convolutions use within one device (1.08x on 2
    cores, docs/performance.md). Unused, the extra devices cost nothing
    measurable; on a GPU machine JAX trains on the GPUs, as before."""
    if cores < 2:
        return flags
    return _with_xla_flag(flags, "xla_force_host_platform_device_count", 1 << (cores.bit_length() - 1))


def _jax_compilation_cache(environ):
    """Point JAX's persistent compilation cache at the user's cache folder
    (`$XDG_CACHE_HOME`, else `~/.cache`, then `keras_diffusion/jax`), so that
    a program one run compiled (a sampling loop: seconds to minutes) is
    read back by the next. `JAX_COMPILATION_CACHE_DIR` (JAX's own variable)
    set, even empty (no cache), is left as it is; so is a folder that
    cannot be made (nothing is cached then)."""
    if "JAX_COMPILATION_CACHE_DIR" in environ:
        return
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "keras_diffusion", "jax")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:
        return
    environ["JAX_COMPILATION_CACHE_DIR"] = folder


def main(argv=None):
    args = _build_parser().parse_args(argv)
    if args.backend:
        if "keras" in sys.modules and sys.modules["keras"].backend.backend() != args.backend:
            print(f"keras-diffusion {args.command}: error: Keras is already loaded with another "
                  f"backend; cannot switch to {args.backend}", file=sys.stderr)
            return 2
        os.environ["KERAS_BACKEND"] = args.backend
    elif os.environ.get("KERAS_BACKEND", BACKENDS[0]) not in BACKENDS:
        print(f"keras-diffusion {args.command}: error: KERAS_BACKEND is "
              f"{os.environ['KERAS_BACKEND']!r}; accepted: {', '.join(BACKENDS)} "
              "(or pass --backend)", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Read by XLA when it starts (JAX's CPU devices; TensorFlow ignores it).
    os.environ["XLA_FLAGS"] = _xla_flags_with_a_device_per_core(
        os.environ.get("XLA_FLAGS", ""), _usable_cores())
    _jax_compilation_cache(os.environ)
    try:
        with quiet_stderr():
            import keras_diffusion

            keras_diffusion._import_all()
        _, _, run = COMMANDS[args.command]
        run(args)
    except KeyboardInterrupt:
        print(f"keras-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"keras-diffusion {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
