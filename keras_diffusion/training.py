"""Build and train a model from a config dict (see `keras_diffusion.config`).

This is what `keras-diffusion train` runs; Python users can call `train`
directly with a config from `load_config`.
"""

import contextlib
import importlib.util
import re
import shutil
from pathlib import Path

import keras
import numpy as np

from keras_diffusion import precision
from keras_diffusion.autoencoder import Autoencoder
from keras_diffusion.callbacks import AtomicBackupAndRestore
from keras_diffusion.callbacks import AtomicCSVLogger
from keras_diffusion.callbacks import ProgressLog
from keras_diffusion.callbacks import SampleGrid
from keras_diffusion.callbacks import SampleQuality
from keras_diffusion.callbacks import TerminateOnNonFiniteLoss
from keras_diffusion.callbacks import read_backup_record
from keras_diffusion.captions import class_prompts
from keras_diffusion.captions import load_captioned_folder
from keras_diffusion.config import AUTOENCODER_ARGUMENTS
from keras_diffusion.config import ConfigError
from keras_diffusion.config import autoencoder_arguments
from keras_diffusion.config import load_config
from keras_diffusion.config import save_config
from keras_diffusion.config import schedule_from_config
from keras_diffusion.config import validate
from keras_diffusion.data import CLASS_NAMES
from keras_diffusion.data import check_images
from keras_diffusion.data import load_dataset
from keras_diffusion.data import load_image_folder
from keras_diffusion.distribute import distribution_scope
from keras_diffusion.images import atomic_write
from keras_diffusion.images import save_image_grid
from keras_diffusion.images import save_loss_curve
from keras_diffusion.latent import LatentDiffusionModel
from keras_diffusion.model import DiffusionModel
from keras_diffusion.network import UNet
from keras_diffusion.quiet import import_tensorflow
from keras_diffusion.text import TextEncoder
from keras_diffusion.text import WordTokenizer


def load_training_data(config):
    """`(x, y, image_shape, class_names)` for `fit`: arrays for the built-in
    datasets, a `tf.data.Dataset` (with `y=None`) for an image folder.
    A prompted run (`text.enabled`) gets captions as `y`: for a built-in
    dataset, each image's class in every training template (`fit` draws
    one per step); for a folder, the images in memory and the captions of
    its `metadata.jsonl`."""
    data, network = config["data"], config["network"]
    conditional = network["num_classes"] is not None
    if config["text"]["enabled"]:
        return _captioned_data(config)
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


def _captioned_data(config):
    data = config["data"]
    if data["image_folder"]:
        images, captions = load_captioned_folder(data["image_folder"], data["image_size"],
                                                 limit=data["limit"])
        return images, captions, images.shape[1:], None
    images, labels = load_dataset(data["dataset"], data["data_dir"], limit=data["limit"])
    prompts = class_prompts(data["dataset"], "train")
    return images, [prompts[label] for label in labels], images.shape[1:], None


def build_text_encoder(config, captions):
    """The `TextEncoder` of a prompted run, over a `WordTokenizer` whose
    vocabulary is the words of `captions` (strings, or lists of them)."""
    text = config["text"]
    flat = [caption for item in captions
            for caption in ([item] if isinstance(item, str) else item)]
    tokenizer = WordTokenizer.from_texts(flat, max_length=text["max_length"])
    return TextEncoder(tokenizer, dim=text["dim"], depth=text["depth"], heads=text["heads"])


def build_model(config, image_shape, class_names=None, autoencoder=None, captions=None):
    """The `DiffusionModel` a config describes, for images of `image_shape`;
    with a trained `autoencoder`, the `LatentDiffusionModel` over its latents;
    with `text.enabled`, prompted, its vocabulary built from `captions`."""
    net, model = config["network"], config["model"]
    text_encoder = None
    if config["text"]["enabled"]:
        if captions is None:
            raise ValueError("a prompted model (text.enabled) is built from its training captions; "
                             "pass captions.")
        text_encoder = build_text_encoder(config, captions)
    network = UNet(
        image_shape=tuple(image_shape if autoencoder is None else autoencoder.latent_shape),
        widths=tuple(net["widths"]),
        blocks_per_level=net["blocks_per_level"],
        attention_levels=tuple(net["attention_levels"]),
        dropout=net["dropout"],
        groups=net["groups"],
        num_classes=net["num_classes"],
        context_dim=None if text_encoder is None else text_encoder.output_dim,
    )
    parts = (network,) if autoencoder is None else (autoencoder, network)
    return (DiffusionModel if autoencoder is None else LatentDiffusionModel)(
        *parts,
        schedule_from_config(config["schedule"]),
        prediction=model["prediction"],
        ema_decay=model["ema_decay"],
        min_snr_gamma=model["min_snr_gamma"],
        label_dropout=model["label_dropout"],
        class_names=class_names,
        seed=config["seed"],
        text_encoder=text_encoder,
        train_text_encoder=model["train_text_encoder"],
        prompt_dropout=model["prompt_dropout"],
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


def train(config, output_dir, verbose="auto", resume=False, log_every=None):
    """Train the model `config` describes and write, under `output_dir`:
    `model.keras`, `config.yaml`, `history.csv`, `loss.png`,
    `samples/epoch_NNNN.png`, `backup/` (the training state after the last
    completed epoch) and, with `tensorboard: true`, `tensorboard/`. Every
    file is written atomically. Returns the trained model.

    With `resume=True` training continues from `backup/` when there is one
    (after a crash, or to train a finished run further: raise
    `training.epochs`), and starts afresh when there is none. Without it, an
    `output_dir` holding a backup is refused rather than overwritten.

    With `log_every` (seconds), a line of progress is printed at most that
    often (`ProgressLog`), for output that goes to a log, not a terminal.

    Raises:
        NonFiniteLossError: the loss became NaN or infinite; the message
            names the last good backup, and nothing after it was saved.
        ConfigError: `distribute` cannot be used on this backend, or a
            resumed run's network, schedule or model settings changed.
    """
    config = validate(config)
    output = Path(output_dir)
    record = _check_resume(config, output, resume)
    if config["tensorboard"] and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            "tensorboard: true needs the tensorboard package; install it with "
            "pip install 'keras-diffusion[tensorboard]' or set tensorboard to false"
        )
    training, sampling = config["training"], config["sampling"]
    with _training_data(config, training["batch_size"]) as (x, y, image_shape, class_names):
        autoencoder = None
        if config["autoencoder"]["enabled"]:
            autoencoder = train_autoencoder(config, x, image_shape, output, verbose=verbose,
                                            resume=resume, log_every=log_every)
        model = build_model(config, image_shape, class_names, autoencoder, captions=y)
        grid_prompts = None
        if model.prompted:
            grid_prompts = _grid_prompts(config, y)
            y = model.tokenize_captions(y, len(x))
        steps = training["steps_per_epoch"] or _steps_per_epoch(x, training["batch_size"])
        model.compile(
            optimizer=build_optimizer(config, steps * training["epochs"]),
            jit_compile=training["jit_compile"],
        )
        _remove_stale_temporaries(output)
        save_config(config, output / "config.yaml")
        history, callbacks = _training_callbacks(config, output, grid_prompts)
        callbacks += _progress(log_every)
        model.fit(
            x, y, batch_size=None if y is None and not hasattr(x, "shape") else training["batch_size"],
            epochs=training["epochs"], steps_per_epoch=training["steps_per_epoch"],
            shuffle=True, callbacks=callbacks, verbose=verbose,
        )
        save_model(model, output / "model.keras")
        if record is not None and sampling["every_n_epochs"] and history.rows:
            # SampleGrid saw only the resumed epochs; draw the whole run.
            save_loss_curve(history.history, output / "loss.png")
    return model


# Where the autoencoder stage of a run keeps its backup until
# autoencoder.keras is written.
AUTOENCODER_BACKUP = "autoencoder_backup"


def train_autoencoder(config, x, image_shape, output, verbose="auto", resume=False,
                      log_every=None):
    """The autoencoder of a latent run: the one `autoencoder.path` names, or
    the one this run saved before it was interrupted (`resume`), or one
    trained on `x` now, saved as `output/autoencoder.keras` with its history
    in `output/autoencoder_history.csv` and, in
    `output/autoencoder_reconstructions.png`, eight training images above
    their reconstructions. Training is backed up after every
    epoch in `output/autoencoder_backup/`, which `resume` continues from and
    which is removed once `autoencoder.keras` is written."""
    settings = config["autoencoder"]
    saved = output / "autoencoder.keras"
    if settings["path"] is not None or (resume and saved.exists()):
        return load_autoencoder(settings["path"] or saved, image_shape)
    if not resume:
        shutil.rmtree(output / AUTOENCODER_BACKUP, ignore_errors=True)
    autoencoder = Autoencoder(tuple(image_shape), seed=config["seed"], **autoencoder_arguments(config))
    autoencoder.compile(optimizer=keras.optimizers.AdamW(settings["learning_rate"]),
                        jit_compile=config["training"]["jit_compile"])
    save_config(config, output / "config.yaml")  # what a resumed run is checked against
    backup = AtomicBackupAndRestore(output / AUTOENCODER_BACKUP, delete_checkpoint=False)
    if not hasattr(x, "shape"):  # a dataset of the diffusion model's batches
        x = x.unbatch().batch(settings["batch_size"])
    autoencoder.fit(
        x, batch_size=settings["batch_size"] if hasattr(x, "shape") else None,
        epochs=settings["epochs"], shuffle=True, verbose=verbose,
        callbacks=[TerminateOnNonFiniteLoss(backup),
                   AtomicCSVLogger(output / "autoencoder_history.csv"), backup,
                   *_progress(log_every)],
    )
    if not hasattr(x, "shape"):  # a dataset: fit measured nothing
        x = _first_images(x, 4096)
        autoencoder.measure_scaling_factor(x)
    first = check_images(x[:8])  # float32 in [0, 1], as reconstruct gives
    save_image_grid(np.concatenate([first, autoencoder.reconstruct(first)]),
                    output / "autoencoder_reconstructions.png", nrow=len(first),
                    title="training images (top) and their reconstructions")
    save_model(autoencoder, saved)
    shutil.rmtree(output / AUTOENCODER_BACKUP, ignore_errors=True)
    return autoencoder


def train_autoencoder_stage(config, output_dir, verbose="auto", resume=False, log_every=None):
    """Train only the autoencoder a config describes (its `autoencoder`
    section, on its data), as `keras-diffusion train-autoencoder` does:
    writes `autoencoder.keras`, `autoencoder_history.csv` and `config.yaml`
    under `output_dir` and returns the autoencoder. A latent run reuses it
    with `autoencoder.path`. `resume` continues an interrupted run from its
    backup; without it, an `output_dir` holding one is refused."""
    config = validate(config)
    if config["autoencoder"]["path"] is not None:
        raise ConfigError(
            f"autoencoder.path names a trained autoencoder ({config['autoencoder']['path']}); "
            "this trains a new one: set autoencoder.path to null"
        )
    output = Path(output_dir)
    _check_resume(config, output, resume, stage="autoencoder")
    with _training_data(config, config["autoencoder"]["batch_size"]) as (x, _, image_shape, _):
        return train_autoencoder(config, x, image_shape, output, verbose=verbose, resume=resume,
                                 log_every=log_every)


@contextlib.contextmanager
def _training_data(config, batch_size):
    """The seed, precision policy and distribution of a run, for as long as
    it trains, and its data `(x, y, image_shape, class_names)` shared evenly
    over the devices in batches of `batch_size`."""
    import_tensorflow()  # which set_random_seed seeds under every backend
    keras.utils.set_random_seed(config["seed"])
    keras.mixed_precision.set_dtype_policy(precision.resolve(config["training"]["precision"]))
    try:
        with distribution_scope(config["distribute"]) as replicas:
            x, y, image_shape, class_names = load_training_data(config)
            x, y = _share_evenly(x, y, replicas, batch_size)
            yield x, y, image_shape, class_names
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def load_autoencoder(path, image_shape):
    """A trained `Autoencoder` from `path`, for images of `image_shape`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"autoencoder.path: file not found: {path}")
    try:
        autoencoder = keras.saving.load_model(path)
    except Exception as error:  # a truncated or foreign archive fails in many ways
        raise ConfigError(f"autoencoder.path: could not load {path} as a Keras model "
                          f"({str(error).strip().splitlines()[0] if str(error).strip() else error!r})") from None
    if not isinstance(autoencoder, Autoencoder):
        raise ConfigError(f"autoencoder.path: {path} holds a {type(autoencoder).__name__}, not an "
                          "Autoencoder")
    if tuple(autoencoder.image_shape) != tuple(image_shape):
        raise ConfigError(f"autoencoder.path: the autoencoder in {path} takes "
                          f"{tuple(autoencoder.image_shape)} images, but the data are "
                          f"{tuple(image_shape)}")
    if not autoencoder.measured:
        raise ConfigError(f"autoencoder.path: the autoencoder in {path} is untrained (its latent "
                          "scaling factor was never measured); train it first")
    return autoencoder


def _first_images(dataset, limit):
    """Up to `limit` images of a dataset of image batches (or of (images,
    labels) batches), as one numpy array."""
    images, count = [], 0
    for batch in dataset:
        batch = batch[0] if isinstance(batch, tuple) else batch
        images.append(keras.ops.convert_to_numpy(batch))
        count += len(images[-1])
        if count >= limit:
            break
    return np.concatenate(images)[:limit]


def _grid_prompts(config, captions):
    """The prompts of a prompted run's sample grids: `sampling.prompts`, or
    one per class from a built-in dataset's held-out templates, or the first
    four distinct captions of a folder."""
    if config["sampling"]["prompts"] is not None:
        return config["sampling"]["prompts"]
    if not config["data"]["image_folder"]:
        return [texts[0] for texts in class_prompts(config["data"]["dataset"], "held_out")]
    return list(dict.fromkeys(captions))[:4]


def _progress(log_every):
    """A `ProgressLog` in a list when `log_every` is set, else no callback."""
    return [] if log_every is None else [ProgressLog(log_every)]


def _training_callbacks(config, output, grid_prompts=None):
    """The CSV history and the callbacks `train` passes to `fit`. The guard
    comes first, so that a NaN stops the step before anything is written,
    then the sample scores, so that the history records them;
    the backup comes last, so that an epoch is recorded as done only after
    its row and grid are written."""
    sampling = config["sampling"]
    backup = AtomicBackupAndRestore(output / "backup", delete_checkpoint=False)
    history = AtomicCSVLogger(output / "history.csv")
    callbacks = [TerminateOnNonFiniteLoss(backup)]
    evaluation = config["evaluation"]
    if evaluation["every_n_epochs"]:
        reference, _ = load_dataset(config["data"]["dataset"], config["data"]["data_dir"],
                                    split="test", limit=evaluation["reference_images"])
        callbacks.append(SampleQuality(
            reference, feature_net=evaluation["feature_net"] or config["data"]["dataset"],
            every_n_epochs=evaluation["every_n_epochs"], num_images=evaluation["num_images"],
            steps=evaluation["steps"], sampler=evaluation["sampler"], seed=sampling["seed"],
            guidance_scale=sampling["guidance_scale"],
            prompts=class_prompts(config["data"]["dataset"]) if grid_prompts else None,
        ))
    callbacks.append(history)  # after the scores, which it records
    if sampling["every_n_epochs"]:
        callbacks.append(SampleGrid(
            output / "samples", every_n_epochs=sampling["every_n_epochs"],
            num_images=sampling["num_images"], steps=sampling["steps"],
            sampler=sampling["sampler"], seed=sampling["seed"],
            guidance_scale=sampling["guidance_scale"], loss_curve_dir=output, prompts=grid_prompts,
            tensorboard_dir=output / "tensorboard" / "samples" if config["tensorboard"] else None,
        ))
    if config["tensorboard"]:
        callbacks.append(keras.callbacks.TensorBoard(
            log_dir=str(output / "tensorboard"), write_graph=False, update_freq="epoch",
        ))
    return history, callbacks + [backup]


# Settings a resumed run must share with the run it continues: they fix the
# variables in the backup, or what the model learns.
# The autoencoder's training settings (epochs, batch size, learning rate) may
# change, as training.epochs may.
_RESUME_KEYS = ("network", "schedule", "model", "text", "autoencoder.enabled", "autoencoder.path",
                *(f"autoencoder.{key}" for key in AUTOENCODER_ARGUMENTS), "training.precision",
                "data.dataset", "data.image_size")


def _check_resume(config, output, resume, stage="model"):
    """The record of the model's backup to resume from, or None to start
    afresh; raises before any work if `output` cannot be used as asked.
    `stage` is what is about to be trained: "model" (a whole run) or
    "autoencoder" (the autoencoder alone)."""
    record = read_backup_record(output / "backup") if stage == "model" else None
    interrupted = record or read_backup_record(output / AUTOENCODER_BACKUP)
    if interrupted is None:
        finished = output / ("model.keras" if stage == "model" else "autoencoder.keras")
        if resume and stage == "model" and finished.exists():
            raise ValueError(
                f"cannot resume {output}: it holds model.keras but no backup/ to resume from; "
                "train without resume (--resume) to start over, which overwrites model.keras, "
                "or choose another output directory."
            )
        return None
    if not resume:
        what = "a run" if record else "an autoencoder"
        raise ValueError(
            f"{output} holds {what} backed up after epoch {interrupted['epoch']}: continue it with "
            "resume=True (--resume on the command line), or choose another output directory."
        )
    saved_path = output / "config.yaml"
    if saved_path.exists():
        saved = load_config(saved_path)
        keys = _RESUME_KEYS if stage == "model" else [
            key for key in _RESUME_KEYS
            if key.split(".")[0] not in ("network", "schedule", "model", "text")]
        for key in keys:
            before, now = _lookup(saved, key), _lookup(config, key)
            if before != now:
                changed = _first_difference(key, before, now)
                raise ConfigError(
                    f"cannot resume {output}: {changed[0]} is {changed[2]!r} now but was "
                    f"{changed[1]!r} in the interrupted run ({saved_path}); keep the network, "
                    "schedule, model, precision and dataset settings when resuming."
                )
    return record


def _lookup(config, dotted):
    for part in dotted.split("."):
        config = config[part]
    return config


def _first_difference(key, before, now):
    if isinstance(before, dict):
        for name in before:
            if before[name] != now.get(name):
                return f"{key}.{name}", before[name], now.get(name)
    return key, before, now


def _share_evenly(x, y, replicas, batch_size):
    """With several devices, each takes an equal share of every batch: the
    batch size must divide evenly, and arrays are cut to a multiple of the
    device count so that the last, smaller batch divides too."""
    if replicas == 1:
        return x, y
    if batch_size % replicas:
        raise ConfigError(
            f"training.batch_size must be a multiple of the number of devices ({replicas}) "
            f"with distribute (data_parallel, fsdp); got {batch_size}"
        )
    if hasattr(x, "shape") and len(x) % replicas:
        keep = len(x) - len(x) % replicas
        x, y = x[:keep], (None if y is None else y[:keep])
    return x, y


# atomic_write's temporaries: ".<name>.<8 random characters><name's suffixes>".
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}(?P<suffix>(\.[^.]+)*)$")


def _remove_stale_temporaries(output):
    """Delete temporaries a killed run left in `output` and `output/samples`."""
    for directory in (output, output / "samples"):
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            match = _TEMPORARY.match(path.name)
            if match and path.is_file() and match["name"].endswith(match["suffix"]):
                path.unlink()


def save_model(model, path):
    """`model.save` through a temporary file, so `path` is never half-written."""
    return atomic_write(path, lambda temp: model.save(temp))


def _steps_per_epoch(x, batch_size):
    if hasattr(x, "shape"):
        return -(-len(x) // batch_size)
    cardinality = int(x.cardinality())
    return max(cardinality, 1)
