"""What every example shares: its command line and a quickly trained model.

Not part of the library; the examples import it from their own folder.
"""

import argparse
from pathlib import Path

import keras_diffusion as kd

ROOT = Path(__file__).resolve().parents[1]


def parser(doc, out, train_steps):
    """An argument parser with the options every example takes."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="directory holding mnist.npz / cifar10.npz (offline use)")
    p.add_argument("--model", help="a trained .keras model; without it a small one is trained first")
    p.add_argument("--train-steps", type=int, default=train_steps,
                   help="training steps of the quick model (more: better images, longer wait)")
    p.add_argument("--out", default=out, help="PNG to write")
    return p


def model_for(args, config, overrides=()):
    """`--model` loaded, or a model trained for `--train-steps` steps with
    `configs/<config>.yaml`, kept in runs/examples/ and reused next time."""
    if args.model:
        return kd.load_model(args.model)
    output = Path("runs") / "examples" / f"{config}-{args.train_steps}-steps"
    if (output / "model.keras").is_file():
        print(f"reusing {output / 'model.keras'}")
        return kd.load_model(output / "model.keras")
    settings = [
        f"data.data_dir={args.data_dir or 'null'}", "training.epochs=1",
        f"training.steps_per_epoch={args.train_steps}", "sampling.every_n_epochs=0",
        "training.warmup_steps=0", "evaluation.every_n_epochs=0", *overrides,
    ]
    print(f"training a small model for {args.train_steps} steps with configs/{config}.yaml "
          f"into {output}/ (pass --model to use a trained one)")
    config = kd.load_config(ROOT / "configs" / f"{config}.yaml", settings)
    return kd.train(config, output, verbose=2, resume=True)


def side_by_side(columns):
    """Interleave equal-length image arrays so a grid with one row per
    image shows column 0 | column 1 | ... side by side."""
    return [image for row in zip(*columns) for image in row]
