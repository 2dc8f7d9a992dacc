"""The `keras-diffusion` command line.

The only module that parses arguments, prints for humans and exits. Keras is
imported after the arguments are read, so `--backend` can set
`KERAS_BACKEND` first. Every error is one line on stderr and exit code 2.
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path

BACKENDS = ("tensorflow", "jax", "torch")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


class CommandError(Exception):
    """A problem with the command line the user typed."""


def _common(parser):
    parser.add_argument("--backend", choices=BACKENDS, help="Keras backend (sets KERAS_BACKEND)")


def _build_parser():
    parser = _Parser(prog="keras-diffusion", description="Train and sample diffusion models with Keras 3.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model from a YAML config")
    _common(train)
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("--data-dir", help="directory holding <dataset>.npz (offline use)")
    train.add_argument("--output", help="output directory (default: runs/<config name>)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set training.epochs=3")

    sample = commands.add_parser("sample", help="generate images from a trained model")
    _common(sample)
    sample.add_argument("--model", required=True, help=".keras file")
    sample.add_argument("--num", type=int, default=16, help="number of images")
    sample.add_argument("--steps", type=int, default=50)
    sample.add_argument("--sampler", default="ddim")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--batch-size", type=int, default=None)
    sample.add_argument("--label", action="append", default=None,
                        help="class label or name (repeatable; cycled over the images)")
    sample.add_argument("--labels", choices=("all",), help="'all': one row per class")
    sample.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale")
    sample.add_argument("--out", required=True, help="PNG grid to write")
    sample.add_argument("--npz", help="also write the images, in [0, 1], to this .npz")
    return parser


# ---------------------------------------------------------------- commands
def _train(args):
    from keras_diffusion import config as config_lib

    overrides = list(args.set)
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    config = config_lib.load_config(args.config, overrides)
    output = Path(args.output or Path("runs") / Path(args.config).stem)
    _check_writable(output / "model.keras")

    from keras_diffusion.training import train

    train(config, output, verbose=2)
    print(f"wrote {output / 'model.keras'}, {output / 'samples'}/, {output / 'history.csv'}, {output / 'loss.png'}")


def _sample(args):
    _check_suffix(args.out, (".png",), "--out")
    if args.npz:
        _check_suffix(args.npz, (".npz",), "--npz")
    for path in filter(None, (args.out, args.npz)):
        _check_writable(path)
    if args.num < 1:
        raise CommandError(f"--num must be a positive integer; got {args.num}")

    from keras_diffusion.images import save_image_grid
    from keras_diffusion.images import write_images
    from keras_diffusion.model import load_model

    model = load_model(args.model)
    labels, nrow = _labels(args, model)
    num = len(labels) if args.labels == "all" else args.num
    images = model.generate(
        num, steps=args.steps, sampler=args.sampler, seed=args.seed, labels=labels,
        guidance_scale=args.guidance, eta=args.eta, batch_size=args.batch_size,
    )
    save_image_grid(images, args.out, nrow=nrow)
    if args.npz:
        write_images(args.npz, images)
    print(f"wrote {num} images to {args.out}" + (f" and {args.npz}" if args.npz else ""))


def _labels(args, model):
    """Labels for `generate` and the grid's row length."""
    if args.labels == "all":
        if not model.conditional:
            raise CommandError("--labels all needs a class-conditional model; this one is unconditional")
        per_class = max(1, args.num // model.num_classes)
        return [c for c in range(model.num_classes) for _ in range(per_class)], per_class
    if args.label is None:
        return None, None
    return [args.label[i % len(args.label)] for i in range(args.num)], None


COMMANDS = {"train": _train, "sample": _sample}


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


@contextlib.contextmanager
def _quiet_stderr():
    """TensorFlow's C++ logging writes to file descriptor 2 while it loads;
    keep that off the user's terminal so errors stay one line."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _one_line(error):
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv=None):
    args = _build_parser().parse_args(argv)
    if args.backend:
        if "keras" in sys.modules and sys.modules["keras"].backend.backend() != args.backend:
            print(f"keras-diffusion {args.command}: error: Keras is already loaded with another "
                  f"backend; cannot switch to {args.backend}", file=sys.stderr)
            return 2
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        with _quiet_stderr():
            import keras_diffusion

            keras_diffusion._import_all()
        COMMANDS[args.command](args)
    except KeyboardInterrupt:
        print(f"keras-diffusion {args.command}: interrupted", file=sys.stderr)
        return 130
    except (CommandError, ValueError, TypeError, OSError, RuntimeError) as error:
        print(f"keras-diffusion {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
