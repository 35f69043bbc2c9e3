"""Write a small CLIP tokenizer for the random test models (the real one cannot be downloaded).

The files have the layout and format of OpenAI's CLIP tokenizer, so transformers' `CLIPTokenizer` and our
runtime `ClipTokenizer` both load them:

    vocab.json               the 256 byte characters, the same 256 + "</w>", one entry per merge, then
                             <|startoftext|> and <|endoftext|> last
    merges.txt               "#version: 0.2", then one merge per line in rank order
    tokenizer_config.json    special tokens, model_max_length 77, tokenizer_class CLIPTokenizer
    special_tokens_map.json  bos, eos, unk and pad
    tokenizer.json           byte for byte what `CLIPTokenizer.save_pretrained` writes for these files

The merges are learnt by the `tokenizers` BpeTrainer on lowercased, CLIP-pre-tokenized text: by default a
built-in corpus of a few hundred generated English lines about shapes, colours, animals and places. A
small corpus runs out of pairs to merge: then the vocab holds fewer than `vocab_size` entries (it is
logged), which is fine, since a text encoder's embedding may have more rows than its tokenizer has ids.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, trainers
from tokenizers.models import BPE

from meissonic_edge.errors import ConfigError
from meissonic_edge.runtime.tokenizer import (
    DEFAULT_SPECIAL_TOKENS,
    END_OF_WORD,
    MAX_LENGTH,
    build_clip_tokenizer,
    clip_normalizer,
    clip_pre_tokenizer,
)

logger = logging.getLogger(__name__)

BOS, EOS = DEFAULT_SPECIAL_TOKENS["bos_token"], DEFAULT_SPECIAL_TOKENS["eos_token"]
MIN_VOCAB_SIZE = 2 * 256 + 2  # every byte, every byte ending a word, bos and eos


def byte_alphabet() -> list[str]:
    """The 256 characters that stand for the bytes 0..255, in CLIP's vocab order.

    Printable Latin-1 bytes stand for themselves; the other 68 (control codes, space, ...) are shifted to
    the unused code points from 256 on, so that no token contains whitespace or a control character.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return [chr(byte) for byte in printable] + [chr(256 + i) for i in range(len(others))]


def write_clip_tokenizer(out_dir: Path, vocab_size: int, corpus: Iterable[str] | None = None) -> None:
    """Train a byte-level BPE of at most `vocab_size` entries on `corpus` and write it in CLIP's format.

    Deterministic: the same arguments give the same files, byte for byte.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            f"a CLIP tokenizer needs vocab_size >= {MIN_VOCAB_SIZE} (bytes and specials), got {vocab_size}"
        )
    alphabet = byte_alphabet()
    base = alphabet + [char + END_OF_WORD for char in alphabet]
    merges = _train_merges(default_corpus() if corpus is None else corpus, alphabet, vocab_size - MIN_VOCAB_SIZE)

    vocab = {token: i for i, token in enumerate(base)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))  # two merges can make the same token: one id
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    if len(vocab) < vocab_size:
        logger.info("the corpus yields %d tokenizer entries of the %d asked for", len(vocab), vocab_size)

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text(out_dir / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    _write_text(out_dir / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    special_tokens = dict(DEFAULT_SPECIAL_TOKENS)  # bos, eos, unk, pad
    config = {**special_tokens, "model_max_length": MAX_LENGTH, "tokenizer_class": "CLIPTokenizer"}
    _write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    _write_text(out_dir / "special_tokens_map.json", json.dumps(special_tokens, indent=2, sort_keys=True) + "\n")

    # transformers builds this same pipeline and saves it with `Tokenizer.save`, so the bytes match.
    added = {name: AddedToken(token, special=True, normalized=False) for name, token in special_tokens.items()}
    build_clip_tokenizer(vocab, merges, added).save(str(out_dir / "tokenizer.json"))


def _train_merges(corpus: Iterable[str], alphabet: list[str], max_merges: int) -> list[tuple[str, str]]:
    """The first `max_merges` BPE merges (fewer if the corpus runs out), in rank order."""
    tokenizer = Tokenizer(BPE(continuing_subword_prefix="", end_of_word_suffix=END_OF_WORD))
    tokenizer.normalizer = clip_normalizer()
    tokenizer.pre_tokenizer = clip_pre_tokenizer()
    # Passing the word-final characters as "special tokens" puts them in the trainer's vocab first, in a
    # fixed order. Otherwise it numbers them in hash-map order, which changes how ties between equally
    # frequent pairs are broken from one process to the next, and with it the merges.
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + max_merges,
        show_progress=False,
        special_tokens=[char + END_OF_WORD for char in alphabet],
        initial_alphabet=alphabet,
        end_of_word_suffix=END_OF_WORD,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    # tokenizers >= 0.20 stores a merge as a pair, older versions as "left right".
    return [tuple(merge) if isinstance(merge, list) else tuple(merge.split(" ")) for merge in merges]


def _write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8", newline="\n")


# The built-in corpus: short captions filled in from word lists, in the style of text-to-image prompts.
COLOURS = [
    "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray", "pink",
    "brown", "teal", "gold", "silver", "cyan", "magenta", "beige", "navy", "crimson", "turquoise",
]  # fmt: skip
SHAPES = [
    "circle", "square", "triangle", "rectangle", "star", "hexagon", "oval", "diamond", "heart",
    "ring", "spiral", "cube", "sphere", "pyramid", "cylinder", "crescent",
]  # fmt: skip
POSITIONS = [
    "top", "bottom", "left", "right", "center", "top left", "top right", "bottom left",
    "bottom right", "middle", "upper half", "lower half",
]  # fmt: skip
ADJECTIVES = [
    "small", "large", "tiny", "huge", "bright", "dark", "shiny", "soft", "old", "new", "tall",
    "round", "smooth", "rough", "wooden", "glass", "metal", "fluffy", "glowing", "ancient",
    "modern", "quiet", "happy", "sleepy", "striped", "spotted", "elegant", "broken",
]  # fmt: skip
OBJECTS = [
    "apple", "chair", "table", "lamp", "book", "cup", "bottle", "clock", "window", "door",
    "bicycle", "car", "boat", "kite", "umbrella", "guitar", "piano", "flower", "tree", "candle",
    "hat", "shoe", "vase", "mirror", "teapot", "balloon", "lantern", "bench", "basket", "train",
]  # fmt: skip
ANIMALS = [
    "cat", "dog", "horse", "bird", "fox", "rabbit", "owl", "bear", "lion", "tiger", "elephant",
    "fish", "turtle", "deer", "wolf", "frog", "penguin", "squirrel", "giraffe", "monkey",
]  # fmt: skip
PLACES = [
    "forest", "city", "beach", "desert", "garden", "kitchen", "library", "river", "village",
    "castle", "meadow", "harbor", "street", "museum", "valley", "island", "mountain", "studio",
]  # fmt: skip
STYLES = [
    "photograph", "oil painting", "watercolor", "sketch", "pixel art", "3d render", "illustration",
    "digital art", "pencil drawing", "poster", "cartoon", "mosaic", "studio photo", "minimalist design",
]  # fmt: skip
VERBS = [
    "sitting", "running", "sleeping", "jumping", "flying", "swimming", "standing", "reading",
    "dancing", "walking", "eating", "looking", "resting", "playing",
]  # fmt: skip
TIMES = ["morning", "sunset", "night", "winter", "summer", "rain", "fog", "spring", "autumn", "noon"]
COUNTS = ["two", "three", "four", "five", "several", "many", "2", "3", "7", "10"]
TEMPLATES = [
    "{a_adjective} {colour} {shape} at the {position} of the image",
    "{a_colour} {shape} on {a_colour2} background",
    "{count} {colour} {shape}s in the {position}, {style}",
    "{a_style} of {a_adjective} {animal} {verb} in the {place}",
    "the {animal} is {verb} next to {a_colour} {object}.",
    "{a_adjective} {object} on a table, {style}, {time} light",
    "{colour} and {colour2} stripes behind {a_adjective} {object}",
    "{a_place} at {time}, {style} with {a_colour} sky",
    "it's {a_adjective} day in the {place}; don't forget the {object}!",
    "{style}: {colour} {shape}, {colour2} {shape2} and {a_colour} background",
    "{a_shape} to the {position} of {a_colour} {shape2}",
    "close-up of {a_colour} {animal} holding {a_object}",
    "there are {count} {object}s near the {position} edge of the {place}",
    "Simple {style} of {a_colour} {shape} centered on {colour2}.",
    "{a_adjective} {animal} and {a_adjective2} {animal2} {verb} together at {time}",
    "we're looking at {a_place} where the {object} is {colour}",
]


def default_corpus(lines: int = 400, seed: int = 0) -> list[str]:
    """A deterministic English corpus: `lines` captions from TEMPLATES filled in with a seeded RNG."""
    rng = random.Random(seed)  # seeded choices are the same on every Python since 3.2
    corpus = []
    for i in range(lines):
        words = {
            "colour": rng.choice(COLOURS),
            "colour2": rng.choice(COLOURS),
            "shape": rng.choice(SHAPES),
            "shape2": rng.choice(SHAPES),
            "position": rng.choice(POSITIONS),
            "adjective": rng.choice(ADJECTIVES),
            "adjective2": rng.choice(ADJECTIVES),
            "object": rng.choice(OBJECTS),
            "animal": rng.choice(ANIMALS),
            "animal2": rng.choice(ANIMALS),
            "place": rng.choice(PLACES),
            "style": rng.choice(STYLES),
            "verb": rng.choice(VERBS),
            "time": rng.choice(TIMES),
            "count": rng.choice(COUNTS),
        }
        # "{a_colour}" is the word with its article: "an orange", "a red".
        for name in list(words):
            word = words[name]
            words["a_" + name] = ("an " if word[0] in "aeiou" else "a ") + word
        corpus.append(TEMPLATES[i % len(TEMPLATES)].format(**words))
    return corpus
