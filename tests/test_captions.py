"""Captions from class names and templates, and from a folder's metadata.jsonl."""

import json
import re

import numpy as np
import pytest

from keras_diffusion.captions import TEMPLATES
from keras_diffusion.captions import caption_templates
from keras_diffusion.captions import class_captions
from keras_diffusion.captions import read_metadata
from keras_diffusion.text import WordTokenizer
from keras_diffusion.text import split_words


def test_captions_name_the_class_with_a_drawn_template():
    captions = class_captions(np.arange(10), "mnist", seed=0)
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    for digit, caption in enumerate(captions):
        assert str(digit) in caption.split() or words[digit] in caption.split(), caption
    assert class_captions([3, 8], "cifar10", seed=1) == class_captions([3, 8], "cifar10", seed=1)
    drawn = set(class_captions([3] * 200, "cifar10", seed=2))
    assert drawn == {t.format(name="cat") for t in caption_templates("cifar10")}  # all of them
    assert class_captions(np.array([], "int64"), "mnist") == []


@pytest.mark.parametrize("dataset", sorted(TEMPLATES))
def test_held_out_templates_are_not_trained_on(dataset):
    train, held_out = caption_templates(dataset), caption_templates(dataset, "held_out")
    assert train and held_out and not set(train) & set(held_out)
    # A tokenizer built from the training captions knows every class word of
    # the held-out ones: only the held-out templates' own words are new.
    labels = np.repeat(np.arange(10), 50)
    tokenizer = WordTokenizer.from_texts(class_captions(labels, dataset, seed=0))
    unknown = set(tokenizer.unknown_words(class_captions(labels, dataset, "held_out", seed=0)))
    template_words = {word for template in held_out
                      for word in split_words(re.sub(r"\{\w+\}", "", template))}
    assert unknown <= template_words, unknown - template_words


def test_bad_caption_requests():
    with pytest.raises(ValueError, match=r"no caption templates for dataset 'svhn'; accepted: mnist"):
        caption_templates("svhn")
    with pytest.raises(ValueError, match=r"split must be one of train, held_out; got 'test'"):
        caption_templates("mnist", "test")
    with pytest.raises(ValueError, match=r"label 10 is out of range for mnist; accepted: 0 to 9"):
        class_captions([1, 10], "mnist")
    with pytest.raises(ValueError, match=r"labels must be a 1-D array of integers"):
        class_captions([[1]], "mnist")


def _folder(tmp_path, lines, files=("a.png", "b.png")):
    for name in files:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_metadata_jsonl_gives_paths_and_texts(tmp_path):
    folder = _folder(tmp_path, [json.dumps({"file_name": "b.png", "text": "a red truck"}), "",
                                json.dumps({"file_name": "a.png", "text": "a cat", "extra": 1})])
    paths, texts = read_metadata(folder)
    assert paths == [folder / "b.png", folder / "a.png"] and texts == ["a red truck", "a cat"]


@pytest.mark.parametrize("lines, error, match", [
    (['{"file_name": "a.png"'], ValueError, r"metadata.jsonl, line 1: not JSON"),
    (['{"file_name": "a.png", "text": 3}'], ValueError,
     r'line 1: expected an object with string "file_name" and "text"'),
    (['{"file_name": "a.png", "text": "x"}', '{"file_name": "c.png", "text": "y"}'],
     FileNotFoundError, r"line 2: image 'c.png' is not in"),
    ([""], ValueError, r"metadata.jsonl names no images"),
])
def test_bad_metadata(tmp_path, lines, error, match):
    with pytest.raises(error, match=match):
        read_metadata(_folder(tmp_path, lines))


def test_a_folder_without_metadata(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"has no metadata.jsonl; captioned images need one"):
        read_metadata(tmp_path)
