"""Train the classifier whose features `keras_diffusion.metrics` scores samples with.

    python benchmarks/train_feature_net.py --dataset mnist --data-dir DATA
    python benchmarks/train_feature_net.py --dataset cifar10 --data-dir DATA --epochs 40

writes `keras_diffusion/feature_nets/<dataset>.weights.h5` and its record
`<dataset>.json` (architecture, test accuracy, how it was made). Pass
`--out-dir` to train one for another dataset without touching the package,
then give `feature_net=<that .weights.h5>` to the metrics.

The weights load under every Keras backend; the script may run on any.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import keras
import numpy as np

import keras_diffusion as kd
from keras_diffusion.images import atomic_write
from keras_diffusion.metrics import FEATURE_NET_DIR
from keras_diffusion.metrics import FEATURE_NETS
from keras_diffusion.metrics import build_feature_net


def augment(images, rng, flip, shift):
    """Random translations by up to `shift` pixels (edge padding) and, when
    `flip`, horizontal flips: numpy, once per epoch."""
    n, height, width, _ = images.shape
    padded = np.pad(images, ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="edge")
    rows = rng.integers(0, 2 * shift + 1, n)
    cols = rng.integers(0, 2 * shift + 1, n)
    out = np.empty_like(images)
    for i in range(n):
        out[i] = padded[i, rows[i]:rows[i] + height, cols[i]:cols[i] + width]
    if flip:
        flipped = rng.random(n) < 0.5
        out[flipped] = out[flipped, :, ::-1]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(FEATURE_NETS), required=True)
    parser.add_argument("--data-dir", help="directory holding <dataset>.npz (default: keras.datasets)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 4 (28x28), 40 (CIFAR-10)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=str(FEATURE_NET_DIR))
    args = parser.parse_args(argv)

    image_shape, num_classes, widths = FEATURE_NETS[args.dataset]
    colour = image_shape[-1] == 3
    epochs = args.epochs or (40 if colour else 4)
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    x_train, y_train = kd.load_dataset(args.dataset, args.data_dir, split="train")
    x_test, y_test = kd.load_dataset(args.dataset, args.data_dir, split="test")

    net = build_feature_net(image_shape, num_classes, widths)
    classifier = keras.Model(net.input, net.outputs[1])
    steps = epochs * -(-len(x_train) // args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(0.0, steps, warmup_target=args.learning_rate,
                                                      warmup_steps=min(200, steps // 10))
    classifier.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=5e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    started = time.perf_counter()
    for epoch in range(epochs):
        images = augment(x_train, rng, flip=colour, shift=4 if colour else 2)
        history = classifier.fit(images, y_train, batch_size=args.batch_size, epochs=1, verbose=0)
        print(f"epoch {epoch + 1}/{epochs}: loss {history.history['loss'][-1]:.4f}, "
              f"train accuracy {history.history['accuracy'][-1]:.4f}", flush=True)
    _, accuracy = classifier.evaluate(x_test, y_test, batch_size=500, verbose=0)
    minutes = (time.perf_counter() - started) / 60
    print(f"test accuracy {accuracy:.4f} ({len(x_test)} images), {minutes:.1f} min")

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{args.dataset}.weights.h5"
    atomic_write(weights, net.save_weights)
    record = {
        "dataset": args.dataset,
        "image_shape": list(image_shape),
        "num_classes": num_classes,
        "widths": list(widths),
        "feature_dim": widths[-1],
        "parameters": int(net.count_params()),
        "test_accuracy": round(float(accuracy), 4),
        "test_images": len(x_test),
        "train_images": len(x_train),
        "epochs": epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "keras_backend": keras.backend.backend(),
        "command": "python benchmarks/train_feature_net.py " + " ".join(
            arg for arg in (argv if argv is not None else sys.argv[1:])
            if not arg.startswith("--data-dir") and arg != args.data_dir
        ) + (" --data-dir DATA" if args.data_dir else ""),
    }
    atomic_write(weights.with_name(f"{args.dataset}.json"),
                 lambda temp: Path(temp).write_text(json.dumps(record, indent=2) + "\n"))
    print(f"wrote {weights} and {args.dataset}.json")


if __name__ == "__main__":
    main()
