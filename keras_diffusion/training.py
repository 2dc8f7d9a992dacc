"""Build and train a model from a config dict (see `keras_diffusion.config`).

This is what `keras-diffusion train` runs; Python users can call `train`
directly with a config from `load_config`.
"""

import os
from pathlib import Path

import keras

from keras_diffusion.callbacks import SampleGrid
from keras_diffusion.config import save_config
from keras_diffusion.config import validate
from keras_diffusion.data import CLASS_NAMES
from keras_diffusion.data import load_dataset
from keras_diffusion.data import load_image_folder
from keras_diffusion.images import atomic_write
from keras_diffusion.model import DiffusionModel
from keras_diffusion.network import UNet
from keras_diffusion.schedule import DiffusionSchedule


def load_training_data(config):
    """`(x, y, image_shape, class_names)` for `fit`: arrays for the built-in
    datasets, a `tf.data.Dataset` (with `y=None`) for an image folder."""
    data, network = config["data"], config["network"]
    conditional = network["num_classes"] is not None
    if data["image_folder"]:
        size = data["image_size"]
        if size is None:
            raise ValueError("data.image_size is required with data.image_folder (e.g. 64 or [64, 64]).")
        dataset = load_image_folder(
            data["image_folder"], size, batch_size=config["training"]["batch_size"],
            labels="inferred" if conditional else None, seed=config["seed"],
        )
        if data["limit"]:
            dataset = dataset.take(-(-data["limit"] // config["training"]["batch_size"]))
        element = dataset.element_spec[0] if conditional else dataset.element_spec
        return dataset, None, tuple(element.shape[1:]), None
    images, labels = load_dataset(data["dataset"], data["data_dir"], limit=data["limit"])
    names = CLASS_NAMES[data["dataset"]]
    if conditional and network["num_classes"] != len(names):
        raise ValueError(
            f"network.num_classes is {network['num_classes']}, but {data['dataset']} has "
            f"{len(names)} classes; set it to {len(names)} or null."
        )
    return images, (labels if conditional else None), images.shape[1:], (names if conditional else None)


def build_model(config, image_shape, class_names=None):
    """The `DiffusionModel` a config describes, for images of `image_shape`."""
    net, model = config["network"], config["model"]
    network = UNet(
        image_shape=tuple(image_shape),
        widths=tuple(net["widths"]),
        blocks_per_level=net["blocks_per_level"],
        attention_levels=tuple(net["attention_levels"]),
        dropout=net["dropout"],
        groups=net["groups"],
        num_classes=net["num_classes"],
    )
    return DiffusionModel(
        network,
        DiffusionSchedule(**config["schedule"]),
        prediction=model["prediction"],
        ema_decay=model["ema_decay"],
        min_snr_gamma=model["min_snr_gamma"],
        label_dropout=model["label_dropout"],
        class_names=class_names,
        seed=config["seed"],
    )


def build_optimizer(config, total_steps):
    """AdamW with optional linear warm-up and cosine decay over `total_steps`."""
    training = config["training"]
    lr, warmup = training["learning_rate"], training["warmup_steps"]
    if warmup or training["lr_decay"] == "cosine":
        # CosineDecay with alpha=1 stays at the warm-up target: "constant".
        lr = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else lr,
            decay_steps=max(total_steps - warmup, 1),
            alpha=1.0 if training["lr_decay"] == "constant" else 0.0,
            warmup_target=lr if warmup else None,
            warmup_steps=warmup,
        )
    return keras.optimizers.AdamW(learning_rate=lr, weight_decay=training["weight_decay"])


def train(config, output_dir, verbose="auto"):
    """Train the model `config` describes and write, under `output_dir`:
    `model.keras`, `config.yaml`, `history.csv`, `loss.png` and
    `samples/epoch_NNNN.png`. Returns the trained model."""
    config = validate(config)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    training, sampling = config["training"], config["sampling"]
    keras.utils.set_random_seed(config["seed"])
    keras.mixed_precision.set_dtype_policy(training["precision"])
    try:
        x, y, image_shape, class_names = load_training_data(config)
        model = build_model(config, image_shape, class_names)
        steps = training["steps_per_epoch"] or _steps_per_epoch(x, training["batch_size"])
        model.compile(
            optimizer=build_optimizer(config, steps * training["epochs"]),
            jit_compile=training["jit_compile"],
        )
        save_config(config, output / "config.yaml")
        callbacks = [keras.callbacks.CSVLogger(str(output / "history.csv"), append=True)]
        if sampling["every_n_epochs"]:
            callbacks.append(SampleGrid(
                output / "samples", every_n_epochs=sampling["every_n_epochs"],
                num_images=sampling["num_images"], steps=sampling["steps"],
                sampler=sampling["sampler"], seed=sampling["seed"],
                guidance_scale=sampling["guidance_scale"], loss_curve_dir=output,
            ))
        model.fit(
            x, y, batch_size=None if y is None and not hasattr(x, "shape") else training["batch_size"],
            epochs=training["epochs"], steps_per_epoch=training["steps_per_epoch"],
            shuffle=True, callbacks=callbacks, verbose=verbose,
        )
        save_model(model, output / "model.keras")
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    return model


def save_model(model, path):
    """`model.save` through a temporary file, so `path` is never half-written."""
    return atomic_write(path, lambda temp: model.save(temp))


def _steps_per_epoch(x, batch_size):
    if hasattr(x, "shape"):
        return -(-len(x) // batch_size)
    cardinality = int(x.cardinality())
    return max(cardinality, 1)
