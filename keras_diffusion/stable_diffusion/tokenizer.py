"""`CLIPTokenizer`: CLIP's byte-level BPE (Radford et al. 2021; Sennrich et
al. 2016), the tokenizer of Stable Diffusion 1.x / 2.x, in pure Python.

A text becomes ids as transformers' `CLIPTokenizer` makes them with
`padding="max_length", truncation=True`:

1. added tokens (the special tokens, and any a folder adds) are split out,
   matched in the raw text or, when marked `normalized`, in the normalized
   text, the longest first;
2. the rest is normalized: NFC, every run of whitespace one space, lower
   case (character by character, as the `tokenizers` library does);
3. it is cut into words: `<|startoftext|>` / `<|endoftext|>`, the
   contractions `'s 't 're 've 'm 'll 'd`, runs of letters, single digits,
   runs of anything else but whitespace; whitespace goes;
4. each word's UTF-8 bytes, as the printable characters of the byte-level
   alphabet, with `</w>` on the last, are merged pair by pair, the pair
   earliest in `merges.txt` first;
5. the ids are framed by `<|startoftext|>` and `<|endoftext|>`, cut to
   `max_length` (one warning per call when a text loses tokens) and padded
   with the pad token the folder names (`<|endoftext|>` for SD 1.x, `!` for
   SD 2.x).

Letters, digits and case follow Python's `unicodedata`, which may predate
the Unicode version of `tokenizers` for characters assigned since.
"""

import json
import unicodedata
import warnings
from pathlib import Path

import keras
import numpy as np

from keras_diffusion.checks import check_integer
from keras_diffusion.text import check_texts

SUFFIX = "</w>"
START, END = "<|startoftext|>", "<|endoftext|>"
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")
DEFAULT_MAX_LENGTH = 77  # CLIP's context; a folder's own `model_max_length` wins
# Not whitespace to `tokenizers` (Unicode's White_Space), though `str.isspace` says so.
_NOT_SPACE = frozenset("\x1c\x1d\x1e\x1f")
_LAYOUTS = ("tokenizer.json", "vocab.json + merges.txt")


def byte_alphabet():
    """The byte-level alphabet: byte -> a printable character. Printable
    Latin-1 bytes stand for themselves; the others (controls, space,
    soft hyphen) take the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, spare = {}, 0x100
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(spare)
            spare += 1
    return table


_BYTES = byte_alphabet()
_CHARACTERS = {character: byte for byte, character in _BYTES.items()}


def _is_space(character):
    return character.isspace() and character not in _NOT_SPACE


def _kind(character):
    """"L" for a letter, "N" for a number, " " for whitespace, else "P"."""
    if _is_space(character):
        return " "
    category = unicodedata.category(character)[0]
    return category if category in "LN" else "P"


def normalize(text):
    """NFC, whitespace runs as one space, lower case character by
    character (so a final sigma stays "σ", as in `tokenizers`)."""
    text = unicodedata.normalize("NFC", text)
    out, space = [], False
    for character in text:
        if _is_space(character):
            if not space:
                out.append(" ")
            space = True
        else:
            out.append(character.lower())
            space = False
    return "".join(out)


def split_words(text):
    """The words of normalized `text` (step 3 of the module docstring). A
    special-token string left in the text is three words, `<|`, its name
    and `|>`, as the byte-level split of `tokenizers` leaves it."""
    words, i = [], 0
    while i < len(text):
        special = next((s for s in (START, END) if text.startswith(s, i)), None)
        contraction = next((c for c in CONTRACTIONS if text.startswith(c, i)), None)
        kind = _kind(text[i])
        if special:
            words += ["<|", special[2:-2], "|>"]
            i += len(special)
        elif contraction:
            words.append(contraction)
            i += len(contraction)
        elif kind == " ":
            i += 1
        elif kind == "N":
            words.append(text[i])
            i += 1
        else:
            end = i + 1
            while end < len(text) and _kind(text[end]) == kind:
                end += 1
            words.append(text[i:end])
            i = end
    return words


def _split_added(text, patterns):
    """`text` cut at the leftmost, then longest, occurrences of `patterns`
    (`{string: id}`): a list of strings and ids."""
    pieces, start, i = [], 0, 0
    while i < len(text) and patterns:
        match = max((p for p in patterns if text.startswith(p, i)), key=len, default=None)
        if match is None:
            i += 1
            continue
        if i > start:
            pieces.append(text[start:i])
        pieces.append(patterns[match])
        i = start = i + len(match)
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _parse_merges(merges):
    pairs = []
    for index, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or not all(isinstance(p, str) and p for p in pair):
            raise ValueError(
                f"merge {index} is {merge!r}; each merge must be two symbols, as "
                "'a b' or ['a', 'b']."
            )
        pairs.append(tuple(pair))
    return pairs


@keras.saving.register_keras_serializable(package="keras_diffusion", name="CLIPTokenizer")
class CLIPTokenizer:
    """Texts to `(N, max_length)` int32 ids by CLIP's byte-level BPE, the
    same ids as transformers' `CLIPTokenizer` with `padding="max_length",
    truncation=True`. Saved with the model: its config holds the vocabulary
    and merges.

    Args:
        vocabulary: the tokens in id order (or a `{token: id}` dict with
            ids 0, 1, ...), as `vocab.json` holds them.
        merges: the merges, highest priority first: `"a b"` strings (the
            lines of `merges.txt`) or `[a, b]` pairs.
        max_length: ids per text, start and end tokens included (77).
        bos_token, eos_token, unk_token, pad_token: the special tokens;
            `pad_token` is `"<|endoftext|>"` for SD 1.x and `"!"` for SD 2.x.
        added_tokens: the tokens split out of a text before BPE, as dicts
            `{"content": str, "id": int, "normalized": bool}` (matched in
            the normalized text when `normalized`); by default the special
            tokens, matched in the raw text.

    Build one from a diffusers `tokenizer/` folder with `from_folder`.

    Example:

    >>> tokenizer = CLIPTokenizer.from_folder("stable-diffusion-v1-5/tokenizer")
    >>> tokenizer(["a photo of an astronaut"])[:, :8]
    array([[49406,   320,  1125,   539,   550, 18376, 49407, 49407]], dtype=int32)
    """

    def __init__(self, vocabulary, merges, max_length=DEFAULT_MAX_LENGTH, bos_token=START,
                 eos_token=END, unk_token=END, pad_token=END, added_tokens=None):
        self.vocabulary = self._check_vocabulary(vocabulary)
        pairs = _parse_merges(merges)
        self.merges = [" ".join(pair) for pair in pairs]
        self.max_length = check_integer("max_length", max_length, low=2,
                                        note=" (the start and end tokens)")
        self._ids = {token: index for index, token in enumerate(self.vocabulary)}
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token = unk_token, pad_token
        if added_tokens is None:
            added_tokens = [{"content": token, "id": self._ids[token], "normalized": False}
                            for token in dict.fromkeys((bos_token, eos_token, unk_token,
                                                        pad_token)) if token in self._ids]
        self.added_tokens = self._check_added_tokens(added_tokens)
        self._added = {token["content"]: token["id"] for token in self.added_tokens}
        names = dict(zip(SPECIAL_NAMES, (bos_token, eos_token, unk_token, pad_token)))
        for name, token in names.items():
            if token not in self._ids and token not in self._added:
                raise ValueError(f"{name} {token!r} is not in the vocabulary or added tokens.")
        self.bos_id, self.eos_id, self.unk_id, self.pad_id = (
            self._added.get(t, self._ids.get(t)) for t in names.values())
        self._raw = {t["content"]: t["id"] for t in self.added_tokens if not t["normalized"]}
        self._normalized = {normalize(t["content"]): t["id"] for t in self.added_tokens
                            if t["normalized"]}
        self._ranks = {pair: rank for rank, pair in enumerate(pairs)}
        self._cache = {}

    @staticmethod
    def _check_vocabulary(vocabulary):
        if isinstance(vocabulary, dict):
            order = sorted(vocabulary.items(), key=lambda item: item[1])
            if [index for _, index in order] != list(range(len(order))):
                raise ValueError(
                    "the vocabulary's ids must be 0, 1, ..., len - 1, each once; got "
                    f"{len(order)} tokens with ids from {order[0][1]} to {order[-1][1]}."
                    if order else "the vocabulary is empty."
                )
            vocabulary = [token for token, _ in order]
        vocabulary = list(vocabulary)
        if not vocabulary or not all(isinstance(token, str) and token for token in vocabulary):
            raise ValueError("the vocabulary must be a non-empty list of non-empty strings.")
        if len(set(vocabulary)) != len(vocabulary):
            raise ValueError("the vocabulary lists a token twice; each token needs one id.")
        return vocabulary

    def _check_added_tokens(self, added_tokens):
        checked = []
        for token in added_tokens:
            content, index = token.get("content"), token.get("id")
            if not isinstance(content, str) or not content or not isinstance(index, int):
                raise ValueError(
                    f"an added token must be {{'content': str, 'id': int, 'normalized': bool}}; "
                    f"got {token!r}."
                )
            if self._ids.get(content, index) != index:
                raise ValueError(
                    f"the added token {content!r} has id {index}, but the vocabulary gives "
                    f"it {self._ids[content]}."
                )
            if content not in self._ids and 0 <= index < len(self.vocabulary):
                raise ValueError(
                    f"the added token {content!r} has id {index}, which the vocabulary gives "
                    f"{self.vocabulary[index]!r}; added tokens take ids from "
                    f"{len(self.vocabulary)} on."
                )
            checked.append({"content": content, "id": index,
                            "normalized": bool(token.get("normalized", False))})
        return checked

    # ------------------------------------------------------------ encoding
    @property
    def vocabulary_size(self):
        """Ids in use, added tokens included: the text encoder's input range."""
        return max([len(self.vocabulary) - 1] + [t["id"] for t in self.added_tokens]) + 1

    def _bpe(self, word):
        """The ids of one word: its bytes as symbols, `</w>` on the last,
        merged by rank."""
        if word in self._cache:
            return self._cache[word]
        symbols = [_BYTES[byte] for byte in word.encode("utf-8")]
        symbols[-1] += SUFFIX
        while len(symbols) > 1:
            ranked = [(self._ranks.get(pair), i) for i, pair in enumerate(zip(symbols,
                                                                              symbols[1:]))]
            ranked = [(rank, i) for rank, i in ranked if rank is not None]
            if not ranked:
                break
            _, first = min(ranked)
            best = symbols[first], symbols[first + 1]
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        ids = [self._ids.get(symbol, self.unk_id) for symbol in symbols]
        self._cache[word] = ids
        return ids

    def encode(self, text):
        """The ids of one text, without start, end or padding."""
        ids = []
        for piece in _split_added(text, self._raw):
            if isinstance(piece, int):
                ids.append(piece)
                continue
            for part in _split_added(normalize(piece), self._normalized):
                if isinstance(part, int):
                    ids.append(part)
                else:
                    ids += [i for word in split_words(part) for i in self._bpe(word)]
        return ids

    def __call__(self, texts):
        """`(N, max_length)` int32 ids of `texts` (a string or a list): the
        start token, the text's tokens, the end token, then the pad token.
        Texts longer than `max_length - 2` tokens are cut, with one warning
        per call."""
        texts = check_texts(texts)
        room = self.max_length - 2
        ids = np.full((len(texts), self.max_length), self.pad_id, np.int32)
        cut = []
        for row, text in enumerate(texts):
            tokens = self.encode(text)
            if len(tokens) > room:
                cut.append(tokens[room:])
            ids[row, : min(len(tokens), room) + 2] = [self.bos_id, *tokens[:room], self.eos_id]
        if cut:
            warnings.warn(
                f"{len(cut)} of {len(texts)} prompts were cut to CLIP's {room} tokens "
                f"(max_length {self.max_length} with the start and end tokens); the first "
                f"lost: {self.decode([cut[0]])[0]!r}",
                stacklevel=2,
            )
        return ids

    def decode(self, ids):
        """The texts of id rows: the start token and everything from the
        first end token on left out, `</w>` read as a space."""
        names = {index: token for token, index in self._ids.items()}
        names.update({t["id"]: t["content"] for t in self.added_tokens})
        texts = []
        for row in ids:
            row = [int(i) for i in row]
            row = row[1:] if row[:1] == [self.bos_id] else row
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            text = "".join(names.get(i, "") for i in row).replace(SUFFIX, _BYTES[ord(" ")])
            raw = bytes(_CHARACTERS[c] for c in text if c in _CHARACTERS)
            texts.append(raw.decode("utf-8", errors="replace").strip())
        return texts

    # -------------------------------------------------------- serialisation
    def get_config(self):
        return {"vocabulary": list(self.vocabulary), "merges": list(self.merges),
                "max_length": self.max_length, "bos_token": self.bos_token,
                "eos_token": self.eos_token, "unk_token": self.unk_token,
                "pad_token": self.pad_token, "added_tokens": [dict(t) for t in self.added_tokens]}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    @classmethod
    def shipped(cls, family):
        """CLIP's own tokenizer (49,408 tokens), as Stable Diffusion 1.x
        (`family="sd1"`, padded with `<|endoftext|>`) and 2.x (`"sd2"`,
        padded with `!`) use it, from the BPE merges that ship with this
        package (OpenAI's CLIP, MIT licence). Its vocabulary is CLIP's
        construction: the byte alphabet, the same with `</w>`, one token per
        merge, then the start and end tokens."""
        import gzip

        if family not in ("sd1", "sd2"):
            raise ValueError(f"family must be 'sd1' or 'sd2'; got {family!r}.")
        path = Path(__file__).parent / "configs" / "clip" / "merges.txt.gz"
        with gzip.open(path, "rt", encoding="utf-8") as file:
            merges = [line for line in file.read().splitlines()
                      if line.strip() and not line.startswith("#version")]
        # CLIP lists the printable bytes first, then the rest, each in byte order.
        table = byte_alphabet()
        alphabet = sorted(table.values(), key=lambda char: (ord(char) >= 0x100, ord(char)))
        vocabulary = (alphabet + [char + SUFFIX for char in alphabet]
                      + [merge.replace(" ", "") for merge in merges] + [START, END])
        return cls(vocabulary, merges, pad_token=END if family == "sd1" else "!")

    def save_folder(self, path):
        """Write the tokenizer as a diffusers `tokenizer/` folder
        (`vocab.json`, `merges.txt`, `tokenizer_config.json`,
        `special_tokens_map.json`), which transformers' `CLIPTokenizer` and
        `from_folder` read."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        vocabulary = {token: index for index, token in enumerate(self.vocabulary)}
        (folder / "vocab.json").write_text(json.dumps(vocabulary, ensure_ascii=False),
                                           encoding="utf-8")
        (folder / "merges.txt").write_text(
            "#version: 0.2\n" + "".join(f"{merge}\n" for merge in self.merges), encoding="utf-8")
        special = dict(zip(SPECIAL_NAMES, (self.bos_token, self.eos_token, self.unk_token,
                                           self.pad_token)))
        (folder / "special_tokens_map.json").write_text(json.dumps(special))
        config = dict(special, tokenizer_class="CLIPTokenizer", model_max_length=self.max_length,
                      do_lower_case=True)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        return folder

    @classmethod
    def from_folder(cls, path):
        """The tokenizer of a diffusers `tokenizer/` folder: `tokenizer.json`,
        or `vocab.json` and `merges.txt`; `tokenizer_config.json` and
        `special_tokens_map.json`, when present, name the special tokens
        (the pad token among them) and `model_max_length`."""
        return _read_folder(Path(path))


# ---------------------------------------------------------------- reading
def _read_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}).") from error


def _content(value):
    """A special token's string and its `normalized` flag: a config gives
    a string (not normalized) or an `AddedToken` dict."""
    if isinstance(value, dict):
        return value.get("content"), bool(value.get("normalized", False))
    return value, False


def _check_flags(token, where):
    for flag in ("lstrip", "rstrip", "single_word"):
        if token.get(flag):
            raise ValueError(
                f"{where} sets {flag}=true for the added token {token.get('content')!r}; "
                "this CLIP tokenizer supports added tokens without lstrip, rstrip and "
                "single_word."
            )


def _read_folder(folder):
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; expected a tokenizer folder with "
                                f"{' or '.join(_LAYOUTS)}.")
    config = _read_json(folder / "tokenizer_config.json") if (
        folder / "tokenizer_config.json").is_file() else {}
    special_map = _read_json(folder / "special_tokens_map.json") if (
        folder / "special_tokens_map.json").is_file() else {}
    # Special tokens: the defaults, then tokenizer_config.json, then
    # special_tokens_map.json; a later name of the same string sets its flag.
    names = dict(zip(SPECIAL_NAMES, (START, END, END, END)))
    flags = {}
    for name in SPECIAL_NAMES:
        value = special_map.get(name, config.get(name, names[name]))
        names[name], flags[names[name]] = _content(value)
        if not isinstance(names[name], str) or not names[name]:
            raise ValueError(f"{folder}: {name} must be a string; got {value!r}.")
    if (folder / "tokenizer.json").is_file():
        vocabulary, merges, added = _read_tokenizer_json(folder / "tokenizer.json")
    else:
        vocabulary, merges, added = _read_vocab_and_merges(folder, config)
    for content, normalized in flags.items():
        if content not in added and content in vocabulary:
            added[content] = {"content": content, "id": vocabulary[content],
                              "normalized": normalized}
    max_length = config.get("model_max_length", DEFAULT_MAX_LENGTH)
    if not isinstance(max_length, int) or max_length > 4096:
        max_length = DEFAULT_MAX_LENGTH  # transformers writes 1e30 for "no limit"
    return CLIPTokenizer(vocabulary, merges, max_length=max_length, **names,
                         added_tokens=list(added.values()))


def _read_tokenizer_json(path):
    data = _read_json(path)
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("end_of_word_suffix") != SUFFIX:
        raise ValueError(
            f"{path} is not a CLIP tokenizer: its model is {model.get('type')!r} with "
            f"end_of_word_suffix {model.get('end_of_word_suffix')!r}; expected 'BPE' with "
            f"{SUFFIX!r}."
        )
    added = {}
    for token in data.get("added_tokens") or []:
        _check_flags(token, path)
        added[token["content"]] = {"content": token["content"], "id": token["id"],
                                   "normalized": bool(token.get("normalized", False))}
    return model.get("vocab") or {}, model.get("merges") or [], added


def _read_vocab_and_merges(folder, config):
    missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
    if missing:
        found = sorted(p.name for p in folder.iterdir())
        raise FileNotFoundError(
            f"{folder} holds no tokenizer: expected {' or '.join(_LAYOUTS)}; "
            f"{', '.join(missing)} missing (found: {', '.join(found) or 'nothing'})."
        )
    vocabulary = _read_json(folder / "vocab.json")
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line.strip() and not line.startswith("#version")]
    added = {}
    # Older folders list extra tokens in added_tokens.json, which transformers
    # matches in the normalized text; newer ones in added_tokens_decoder.
    if (folder / "added_tokens.json").is_file():
        for content, index in _read_json(folder / "added_tokens.json").items():
            added[content] = {"content": content, "id": index, "normalized": True}
    for index, token in (config.get("added_tokens_decoder") or {}).items():
        _check_flags(token, folder / "tokenizer_config.json")
        added[token["content"]] = {"content": token["content"], "id": int(index),
                                   "normalized": bool(token.get("normalized", False))}
    return vocabulary, merges, added
