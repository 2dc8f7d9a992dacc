"""Captions for prompted models: templates over the built-in datasets' class
names, and the `metadata.jsonl` of a folder of your own images.

The built-in datasets have labels, not captions. `class_captions` writes one
caption per label from templates ("a photo of a {name}", "a handwritten
{word}"), a template drawn per example. Each dataset's templates come in two
sets: `"train"`, drawn in training, and `"held_out"`, never seen in training,
on which prompt adherence is measured (as CLIP's zero-shot evaluation uses
prompts a model was not fitted to).

A folder of your own images is captioned the way Hugging Face `imagefolder`
datasets are, and diffusers' `train_text_to_image.py` reads them: a
`metadata.jsonl` beside the images, one JSON object per line with the
image's `file_name` (relative to the folder) and its `text`.
"""

import json
from pathlib import Path

import numpy as np

from keras_diffusion.data import CLASS_NAMES

# How each dataset's class names read in a sentence.
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_NAMES = {
    "mnist": [{"name": f"digit {digit}", "word": word, "digit": str(digit)}
              for digit, word in enumerate(_NUMBER_WORDS)],
    "fashion_mnist": [{"name": name.lower().replace("/", " or "), "word": name.lower().split("/")[0]}
                      for name in CLASS_NAMES["fashion_mnist"]],
    "cifar10": [{"name": name, "word": name} for name in CLASS_NAMES["cifar10"]],
}

TEMPLATES = {
    "mnist": {
        "train": ("a handwritten {word}", "the digit {digit}", "a handwritten digit {digit}",
                  "the number {word}", "a photo of the number {word}",
                  "a white {word} on black", "a scanned handwritten {digit}"),
        "held_out": ("a drawing of the number {word}", "an image of a handwritten {digit}"),
    },
    "fashion_mnist": {
        "train": ("a photo of a {name}", "a grayscale photo of a {name}", "a small photo of a {word}",
                  "a product photo of a {name}", "a {word}"),
        "held_out": ("a picture of a {name}", "a low resolution photo of a {word}"),
    },
    "cifar10": {
        "train": ("a photo of a {name}", "a blurry photo of a {name}", "a small photo of a {name}",
                  "a low resolution photo of a {name}", "a photo of the {name}",
                  "a cropped photo of a {name}", "a {name}"),
        "held_out": ("a close-up photo of a {name}", "a pixelated photo of the {name}"),
    },
}
TEMPLATE_SPLITS = ("train", "held_out")


def caption_templates(dataset, split="train"):
    """The templates of a built-in dataset: `"train"` or `"held_out"`."""
    if dataset not in TEMPLATES:
        raise ValueError(f"no caption templates for dataset {dataset!r}; accepted: "
                         f"{', '.join(TEMPLATES)}.")
    if split not in TEMPLATE_SPLITS:
        raise ValueError(f"split must be one of {', '.join(TEMPLATE_SPLITS)}; got {split!r}.")
    return TEMPLATES[dataset][split]


def class_captions(labels, dataset, split="train", seed=None):
    """One caption per label of a built-in dataset, each from a template of
    `split` drawn at random (`seed` fixes the draws).

    Example:

    >>> class_captions([7, 7], "mnist", seed=0)
    ['a white seven on black', 'a photo of the number seven']
    """
    templates = caption_templates(dataset, split)
    names = _NAMES[dataset]
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D array of integers; got shape {labels.shape}, "
                         f"dtype {labels.dtype}.")
    if labels.size and (labels.min() < 0 or labels.max() >= len(names)):
        bad = labels[(labels < 0) | (labels >= len(names))][0]
        raise ValueError(f"label {bad} is out of range for {dataset}; accepted: 0 to {len(names) - 1}.")
    choices = np.random.default_rng(seed).integers(0, len(templates), size=len(labels))
    return [templates[choice].format(**names[label]) for choice, label in zip(choices, labels)]


def class_prompts(dataset, split="held_out"):
    """Every caption of each class of a built-in dataset from the templates
    of `split`: a list, indexed by class, of lists of captions. With
    `"train"`, the captions a prompted model trains on (one drawn per
    example and step); with `"held_out"`, prompts for measuring adherence.

    Example:

    >>> class_prompts("mnist")[7]
    ['a drawing of the number seven', 'an image of a handwritten 7']
    """
    templates = caption_templates(dataset, split)
    return [[template.format(**names) for template in templates] for names in _NAMES[dataset]]


def read_metadata(folder):
    """`(paths, texts)` from the `metadata.jsonl` of an image folder: the
    image files it names (checked to exist) and their captions, in file order.

    Raises:
        FileNotFoundError: no `metadata.jsonl`, or an image it names is missing.
        ValueError: a line that is not a JSON object with a string
            `file_name` and a string `text` (the message gives its number).
    """
    folder = Path(folder)
    metadata = folder / "metadata.jsonl"
    if not metadata.is_file():
        raise FileNotFoundError(
            f"{folder} has no metadata.jsonl; captioned images need one, a JSON object per line "
            'such as {"file_name": "0001.png", "text": "a photo of a cat"}.')
    paths, texts = [], []
    for number, line in enumerate(metadata.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{metadata}, line {number}: not JSON ({error.msg})") from None
        if not (isinstance(record, dict) and isinstance(record.get("file_name"), str)
                and isinstance(record.get("text"), str)):
            raise ValueError(f"{metadata}, line {number}: expected an object with string "
                             f'"file_name" and "text"; got {line.strip()[:80]}')
        path = folder / record["file_name"]
        if not path.is_file():
            raise FileNotFoundError(f"{metadata}, line {number}: image {record['file_name']!r} "
                                    f"is not in {folder}")
        paths.append(path)
        texts.append(record["text"])
    if not paths:
        raise ValueError(f"{metadata} names no images.")
    return paths, texts


def load_captioned_folder(folder, image_size, limit=None):
    """`(images, captions)` of a folder with a `metadata.jsonl`: float32
    RGB images `(N, H, W, 3)` in [0, 1], resized to `image_size` (an int or
    `(height, width)`), and their captions, in the metadata's order (the
    first `limit` when given)."""
    from PIL import Image

    paths, texts = read_metadata(folder)
    if limit:
        paths, texts = paths[:limit], texts[:limit]
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    images = np.empty((len(paths), height, width, 3), np.float32)
    for index, path in enumerate(paths):
        with Image.open(path) as image:
            image = image.convert("RGB").resize((width, height), Image.BILINEAR)
            images[index] = np.asarray(image, np.float32) / 255.0
    return images, texts
