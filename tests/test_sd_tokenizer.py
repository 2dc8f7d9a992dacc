"""CLIP's BPE tokenizer against transformers' `CLIPTokenizer`, on a small
vocabulary written here in both folder layouts (`vocab.json` + `merges.txt`,
and `tokenizer.json`) and both pad conventions (SD 1.x `<|endoftext|>`,
SD 2.x `!`). Pure Python: the backend does not matter."""

import collections
import json
import shutil
import warnings

import keras
import numpy as np
import pytest
from transformers import CLIPTokenizer as ReferenceTokenizer

from conftest import once
from keras_diffusion.stable_diffusion.tokenizer import CLIPTokenizer
from keras_diffusion.stable_diffusion.tokenizer import byte_alphabet

pytestmark = once  # pure Python: the same on every backend

WORDS = ("a photo of an astronaut riding a horse on the moon, lower lowest newer wider "
         "don't it's we're café naïve 2024 hello world jackfruit tree").split()
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(100))
TRICKY = [
    "A Photo of an ASTRONAUT",
    "hello, world!! what?!",
    "don't, it's, we're, YOU'LL, i'M, they'd, ''quoted''",
    "3.14159 and 2024-01-01, x2, 1st",
    "café naïve Ångström e\u0301 ΟΔΟΣ",
    "emoji 🔥🚀 and 👩‍💻 and 👍🏽",
    "  extra   spaces\tand\ttabs\n\nnewlines  ",
    "non\u00a0breaking\u2028separators\x1cinfo",
    "中文字符 日本語 한국어",
    "a <|endoftext|> b <|ENDOFTEXT|> <|startoftext|>c",
    "wow!<|endoftext|>!",
    "ﬁ ligature ⅷ ½ ² İstanbul",
    "",
    "lowest newer wider jackfruit",
    LONG,
]


def train_merges(words, count):
    """`count` BPE merges learned from `words`, the most frequent pair first."""
    alphabet = byte_alphabet()
    sequences = collections.Counter()
    for word in words:
        symbols = [alphabet[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        sequences[tuple(symbols)] += 1
    merges = []
    for _ in range(count):
        pairs = collections.Counter()
        for symbols, n in sequences.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        merged = collections.Counter()
        for symbols, n in sequences.items():
            out, i = [], 0
            while i < len(symbols):
                if symbols[i:i + 2] == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] += n
        sequences = merged
    return merges


def added_token(content):
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True,
            "rstrip": False, "single_word": False}


def write_folder(folder, pad_token, merges):
    """A tokenizer folder as SD 1.x / 2.x ship it: byte alphabet, its `</w>`
    forms, the merged symbols, then the two special tokens."""
    alphabet = [byte_alphabet()[b] for b in range(256)]
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges)
                                       + "\n")
    special = {"bos_token": added_token("<|startoftext|>"),
               "eos_token": added_token("<|endoftext|>"),
               "unk_token": added_token("<|endoftext|>"), "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(
        special, model_max_length=77, do_lower_case=True, tokenizer_class="CLIPTokenizer")))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    merges = train_merges(WORDS * 3, 80)
    found = {}
    for name, pad in (("sd1", "<|endoftext|>"), ("sd2", "!")):
        found[name] = write_folder(root / name, pad, merges)
        # The tokenizer.json layout, written by transformers from the same files.
        found[f"{name}-json"] = root / f"{name}-json"
        ReferenceTokenizer.from_pretrained(found[name]).save_pretrained(found[f"{name}-json"])
        assert (found[f"{name}-json"] / "tokenizer.json").is_file()
        assert not (found[f"{name}-json"] / "vocab.json").exists()
    # An older folder with a token of its own (textual inversion) in added_tokens.json.
    found["added"] = root / "added"
    shutil.copytree(found["sd1"], found["added"])
    size = len(json.loads((found["sd1"] / "vocab.json").read_text()))
    (found["added"] / "added_tokens.json").write_text(json.dumps({"<cat-toy>": size}))
    return found


def reference_ids(folder, texts):
    reference = ReferenceTokenizer.from_pretrained(folder)
    return np.array(reference(texts, padding="max_length", max_length=77,
                              truncation=True)["input_ids"])


@pytest.mark.parametrize("name", ["sd1", "sd2", "sd1-json", "sd2-json"])
def test_ids_match_transformers(folders, name):
    tokenizer = CLIPTokenizer.from_folder(folders[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = tokenizer(TRICKY)
    assert ids.shape == (len(TRICKY), 77) and ids.dtype == np.int32
    expected = reference_ids(folders[name], TRICKY)
    for text, ours, theirs in zip(TRICKY, ids, expected):
        np.testing.assert_array_equal(ours, theirs, err_msg=repr(text))
    assert tokenizer.pad_token == ("!" if name.startswith("sd2") else "<|endoftext|>")
    assert ids[-2, -1] == tokenizer.pad_id and ids[-1, -1] == tokenizer.eos_id  # LONG fills 77


def test_added_tokens_match_transformers(folders):
    texts = ["a <cat-toy> on the moon", "a <CAT-TOY>!", "<cat-toy><cat-toy>"]
    tokenizer = CLIPTokenizer.from_folder(folders["added"])
    ids = tokenizer(texts)
    np.testing.assert_array_equal(ids, reference_ids(folders["added"], texts))
    assert (ids == len(tokenizer.vocabulary)).sum() == 4
    assert tokenizer.vocabulary_size == len(tokenizer.vocabulary) + 1


def test_truncation_warns_once_per_call(folders):
    tokenizer = CLIPTokenizer.from_folder(folders["sd1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer(["a photo", LONG, LONG + " again"])
    assert len(caught) == 1
    assert "2 of 3 prompts were cut to CLIP's 75 tokens" in str(caught[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenizer(TRICKY[:-1])
    assert not caught


def test_decode(folders):
    tokenizer = CLIPTokenizer.from_folder(folders["sd2"])
    texts = ["a photo of an astronaut, don't!", "Café 2024"]
    assert tokenizer.decode(tokenizer(texts)) == ["a photo of an astronaut , don 't !",
                                                  "café 2 0 2 4"]


def test_config_round_trip(folders):
    tokenizer = CLIPTokenizer.from_folder(folders["sd2-json"])
    config = json.loads(json.dumps(tokenizer.get_config()))  # as a .keras file keeps it
    assert config["pad_token"] == "!" and config["max_length"] == 77
    restored = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(tokenizer))))
    assert isinstance(restored, CLIPTokenizer)
    assert restored.get_config() == tokenizer.get_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        np.testing.assert_array_equal(restored(TRICKY), tokenizer(TRICKY))
    assert restored.vocabulary_size == len(tokenizer.vocabulary)


def test_bad_folders(folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder; expected a tokenizer folder"):
        CLIPTokenizer.from_folder(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"expected tokenizer.json or vocab.json \+ "
                                                r"merges.txt; vocab.json, merges.txt missing "
                                                r"\(found: tokenizer_config.json\)"):
        CLIPTokenizer.from_folder(empty)
    half = shutil.copytree(folders["sd1"], tmp_path / "half")
    (half / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"merges.txt missing"):
        CLIPTokenizer.from_folder(half)
    other = shutil.copytree(folders["sd1-json"], tmp_path / "other")
    data = json.loads((other / "tokenizer.json").read_text())
    data["model"]["type"] = "WordPiece"
    (other / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="not a CLIP tokenizer: its model is 'WordPiece'"):
        CLIPTokenizer.from_folder(other)
    stripped = shutil.copytree(folders["sd1-json"], tmp_path / "stripped")
    data = json.loads((stripped / "tokenizer.json").read_text())
    data["added_tokens"][0]["lstrip"] = True
    (stripped / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sets lstrip=true for the added token"):
        CLIPTokenizer.from_folder(stripped)
    broken = shutil.copytree(folders["sd1"], tmp_path / "broken")
    (broken / "vocab.json").write_text("{not json")
    with pytest.raises(ValueError, match="vocab.json is not valid JSON"):
        CLIPTokenizer.from_folder(broken)


def test_bad_arguments(folders):
    config = CLIPTokenizer.from_folder(folders["sd1"]).get_config()
    with pytest.raises(ValueError, match=r"pad_token '<pad>' is not in the vocabulary"):
        CLIPTokenizer(**dict(config, pad_token="<pad>"))
    with pytest.raises(ValueError, match="merge 0 is 'ab'; each merge must be two symbols"):
        CLIPTokenizer(**dict(config, merges=["ab"]))
    taken = [{"content": "<new>", "id": 5, "normalized": False}]
    with pytest.raises(ValueError, match="'<new>' has id 5, which the vocabulary gives"):
        CLIPTokenizer(**dict(config, added_tokens=taken))
    with pytest.raises(ValueError, match="ids must be 0, 1, ..., len - 1"):
        CLIPTokenizer({"a": 0, "b": 2}, [])
    with pytest.raises(TypeError, match="prompts must be strings; item 1 is 3"):
        CLIPTokenizer.from_folder(folders["sd1"])(["a", 3])
