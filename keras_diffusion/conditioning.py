"""What a `DiffusionModel` is conditioned on in training: class labels or
captions.

A class-conditional model's network takes labels as its third input (label
`num_classes` is the null label); a prompted model's network cross-attends
to the features its text encoder makes of the captions' token ids. This
module holds the rules of both for the model: its text parts (text encoder
and tokenizer) and how they are saved, the checks of what `fit` is given,
tokenising captions, and the condition the network sees in a training step,
with the label or prompt dropout that classifier-free guidance (Ho &
Salimans 2022) needs. Sampling conditions (labels and prompts of a request,
guidance) belong to `keras_diffusion.pipeline`.

Each function takes the model, anything with the attributes it reads
(`num_classes`, `text_encoder`, `tokenizer`, `seed_generator`, ...); none
imports a model class.
"""

import keras
import numpy as np
from keras import ops

from keras_diffusion import pipeline
from keras_diffusion import text
from keras_diffusion.data import check_training_labels
from keras_diffusion.text import check_texts


# ------------------------------------------------------------ the parts
def check_class_names(class_names, num_classes):
    """`class_names` as a list (or None), once checked to name every class
    of a network with `num_classes` classes (None: unconditional)."""
    if class_names is None:
        return None
    if num_classes is None or len(class_names) != num_classes:
        raise ValueError(
            f"class_names must list one name per class of the network "
            f"(num_classes={num_classes}); got {len(class_names)} names."
        )
    return list(class_names)


def attach_text_parts(model, text_encoder, tokenizer):
    """Set `model.text_encoder` and `model.tokenizer` (the given one, else
    the encoder's own) once they are checked to fit `model.network`; for a
    prompted model also the ids of the empty prompt, and whether the
    tokenizer must be saved apart from the encoder. The encoder trains with
    the network when `model.train_text_encoder` is True."""
    model.text_encoder = text_encoder
    model.tokenizer = text.check_prompted_parts(model.network, text_encoder, tokenizer,
                                                model.num_classes)
    if text_encoder is not None:
        model._own_tokenizer = model.tokenizer is not getattr(text_encoder, "tokenizer", None)
        text_encoder.trainable = model.train_text_encoder
        model.empty_prompt_ids = text.tokenize(model.tokenizer, [""])[0]


def trained_text_variables(model):
    """The text encoder's variables that train with the network (and so
    have EMA copies after the network's): none unless it trains."""
    if model.text_encoder is None or not model.train_text_encoder:
        return []
    return list(model.text_encoder.trainable_variables)


def text_sampling_weights(model):
    """The text encoder's weights that sampling uses: their EMA copies when
    the encoder trains and the model keeps an EMA, else the weights."""
    if not model.ema_decay or not model.train_text_encoder:
        return model.text_encoder.trainable_variables
    return model.ema_weights[len(model.network.trainable_variables):]


# ---------------------------------------------------- what fit is given
def tokenize_captions(model, captions, num_images=None):
    """Captions as the int32 token ids a prompted `model` trains on.

    One string per image gives `(N, L)`; a list of strings per image gives
    `(N, K, L)`, and each training step draws one of an image's K captions
    (shorter lists are cycled to the longest). Integer ids `(N, L)` or
    `(N, K, L)` pass through. With `num_images`, the captions must be one
    per image. Run it in an input pipeline to feed `fit` a dataset."""
    if isinstance(captions, np.ndarray) and np.issubdtype(captions.dtype, np.integer):
        if captions.ndim not in (2, 3):
            raise TypeError(
                f"captions must be strings, one per image, or (N, length) token ids; got "
                f"integers of shape {captions.shape}. A prompted model takes captions, not "
                "labels: e.g. keras_diffusion.class_captions(labels, 'mnist')."
            )
        ids = captions
    elif (isinstance(captions, (list, tuple)) and captions
          and isinstance(captions[0], (list, tuple, np.ndarray))):
        # Several captions per image: cycle the shorter lists to the longest.
        sets = [check_texts(texts, f"captions[{index}]") for index, texts in enumerate(captions)]
        most = max(len(texts) for texts in sets)
        flat = [texts[k % len(texts)] for texts in sets for k in range(most)]
        ids = pipeline.tokenize(model, flat).reshape(len(sets), most, -1)
    else:
        if isinstance(captions, (list, tuple, np.ndarray)) and len(captions) == 0:
            raise ValueError("captions are empty; expected one caption (a string) per image.")
        ids = pipeline.tokenize(model, check_texts(captions, "captions"))
    if num_images is not None and len(ids) != num_images:
        raise ValueError(
            f"captions must be one per image: got {len(ids)} captions for {num_images} images."
        )
    return ids


def check_condition_given(model, labels):
    """Raise unless a training batch's `labels` (its `y`: labels, or token
    ids for a prompted model) are present exactly when the model needs them."""
    if model.prompted:
        if labels is None:
            raise ValueError(
                "The model is prompted (it has a text encoder), so fit needs captions: pass "
                "one string per image as y, or (images, token_ids) batches."
            )
    elif model.conditional and labels is None:
        raise ValueError(
            f"The network is class-conditional (num_classes={model.num_classes}), "
            "so fit needs labels: pass them as y, or as (images, labels) batches."
        )
    elif not model.conditional and labels is not None:
        raise ValueError(
            "Labels were passed, but the network is unconditional (num_classes=None); "
            "build the UNet with num_classes to train a class-conditional model."
        )


def unpack_batch(model, data):
    """`(images, labels, sample_weight)` of a training batch `data` (`labels`
    None for an unconditional model, `sample_weight` None unless `fit` was
    given one), once checked by `check_condition_given`."""
    images, labels, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    check_condition_given(model, labels)
    return images, labels, sample_weight


def check_fit_condition(model, y, num_images):
    """The `y` that `fit` was given with `num_images` numpy images, checked
    as a whole: for a class-conditional network, integer labels 0 to
    `num_classes - 1`, one per image; for a prompted model, captions (see
    `tokenize_captions`), returned as token ids, or a dict of the captions
    (`"prompts"`) and the per-image conditions the model names in its
    `image_conditions` (SDXL's original sizes and crops); None for neither."""
    if isinstance(y, dict):
        return _check_condition_dict(model, y, num_images)
    if model.prompted and y is not None:
        y = tokenize_captions(model, y, num_images)
    y = None if y is None else np.asarray(y)
    check_condition_given(model, y)
    if y is None or model.prompted:
        return y
    return check_training_labels(y, num_images, model.num_classes)


def _check_condition_dict(model, y, num_images):
    """`y` given as a dict: captions under `"prompts"`, as token ids, and
    the model's `image_conditions` given beside them as float32 arrays of
    one row per image (their values are the model's to check)."""
    accepted = tuple(getattr(model, "image_conditions", ()))
    unknown = sorted(set(y) - {"prompts", *accepted})
    keys = ", ".join(map(repr, sorted(y)))
    if not accepted or not model.prompted:
        raise ValueError(f"this model takes its captions or labels as y, not a dict (given, "
                         f"of the keys {keys}); a dict gives SDXL's per-image conditions.")
    if "prompts" not in y or unknown:
        raise ValueError(f"y as a dict takes 'prompts' (the captions) and any of "
                         f"{', '.join(map(repr, accepted))}; got the keys {keys}.")
    checked = {"prompts": tokenize_captions(model, y["prompts"], num_images)}
    for name in accepted:
        if name in y:
            value = np.asarray(y[name], "float32")
            if value.ndim < 1 or len(value) != num_images or not np.isfinite(value).all():
                raise ValueError(f"y[{name!r}] must hold finite numbers, one row per image "
                                 f"({num_images}); got shape {value.shape}.")
            checked[name] = value
    return checked


# --------------------------------------------- the condition in training
def encode_prompts(model, token_ids, training=True, pooled=False):
    """Text features `(B, L, D)` of a batch of token ids, by the model's
    text encoder. Ids `(B, K, L)` hold K captions per image, of which one
    is drawn; in training a caption is replaced by the empty prompt with
    probability `model.prompt_dropout`. With `pooled`, `(features, pooled
    output)`, the pooled output None for an encoder without one."""
    ids = ops.cast(token_ids, "int32")
    if len(ids.shape) == 3:
        choice = keras.random.randint((ops.shape(ids)[0], 1, 1), 0, ids.shape[1],
                                      dtype="int32", seed=model.seed_generator)
        ids = ops.take_along_axis(ids, choice, axis=1)[:, 0]
    if training and model.prompt_dropout > 0:
        drop = keras.random.uniform((ops.shape(ids)[0], 1), seed=model.seed_generator)
        ids = ops.where(drop < model.prompt_dropout,
                        ops.convert_to_tensor(model.empty_prompt_ids[np.newaxis]), ids)
    encoder = model.text_encoder
    output = encoder(text.encoder_inputs(encoder, ids),
                     training=training and model.train_text_encoder)
    if pooled:
        return text.encoder_features(output), text.encoder_pooled(output)
    return text.encoder_features(output)


def network_condition(model, labels, batch, training=True):
    """The network's third input for a training batch of `batch` images:
    the text features of its token ids (prompted), its labels with label
    dropout to the null label in training (class-conditional), or None."""
    if model.prompted:
        return encode_prompts(model, labels, training=training)
    if not model.conditional:
        return None
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    if training and model.label_dropout > 0:
        drop = keras.random.uniform((batch,), seed=model.seed_generator) < model.label_dropout
        labels = ops.where(drop, model.num_classes, labels)
    return labels


# ---------------------------------------------------------- serialisation
def text_config(model):
    """The config keys of a prompted model's text parts ({} for others):
    the encoder, whether it trains, the prompt dropout and, when it is not
    the encoder's own, the tokenizer, which must then be Keras-serialisable."""
    if not model.prompted:
        return {}
    config = {
        "text_encoder": keras.saving.serialize_keras_object(model.text_encoder),
        "train_text_encoder": model.train_text_encoder,
        "prompt_dropout": model.prompt_dropout,
    }
    if model._own_tokenizer:
        if not hasattr(model.tokenizer, "get_config"):
            raise ValueError(
                f"the model's tokenizer ({type(model.tokenizer).__name__}) cannot be saved: it "
                "is not Keras-serialisable. Save the weights with save_weights and rebuild the "
                "model with the same tokenizer to load them, or use a WordTokenizer."
            )
        config["tokenizer"] = keras.saving.serialize_keras_object(model.tokenizer)
    return config


def text_parts_from_config(config):
    """`config` (a model's) with its text parts, if any, deserialised."""
    config = dict(config)
    for name in ("text_encoder", "tokenizer"):
        if config.get(name) is not None:
            config[name] = keras.saving.deserialize_keras_object(config[name])
    return config
