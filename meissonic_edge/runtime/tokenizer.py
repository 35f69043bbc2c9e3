"""The runtime CLIP tokenizer: prompts in, the (batch, 77) int64 token ids of the text encoder out.

transformers' `CLIPTokenizer` (5.x) is a thin layer over a `tokenizers` pipeline. We rebuild that same
pipeline here with the `tokenizers` library alone, so the runtime needs neither torch nor transformers and
gives exactly the same ids:

    normalize      NFC, every run of whitespace to one space, lowercase
    pre-tokenize   split into contractions, letter runs, single digits and symbol runs; then byte-level
    model          byte-level BPE whose word-final pieces end in `</w>`
    post-process   <|startoftext|> text <|endoftext|>
    truncate, pad  to 77: bos + at most 75 text tokens + eos, then the pad token
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from meissonic_edge.errors import ConfigError, ModelDirError
from meissonic_edge.runtime.config import read_json

logger = logging.getLogger(__name__)

MAX_LENGTH = 77  # CLIP's context: bos + 75 text tokens + eos
END_OF_WORD = "</w>"  # CLIP marks the last piece of each word instead of the first, as GPT-2 does
# CLIP's word split, applied to the normalized (lowercased) text.
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# CLIPTokenizer's defaults, used where the tokenizer config names no token.
DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}


def clip_normalizer() -> normalizers.Normalizer:
    return normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # invert=True: the regex matches are the words; what lies between them (whitespace) is dropped.
    split = pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True)
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])


def build_clip_tokenizer(
    vocab: dict[str, int], merges: list[tuple[str, str]], special_tokens: dict[str, AddedToken]
) -> Tokenizer:
    """The `tokenizers` pipeline of transformers' CLIPTokenizer, without truncation or padding.

    `special_tokens` maps "bos_token", "eos_token", "unk_token" and "pad_token" to their tokens.
    """
    model = BPE(
        vocab,
        merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD,
        fuse_unk=False,
        unk_token=special_tokens["unk_token"].content,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = clip_normalizer()
    tokenizer.pre_tokenizer = clip_pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    add_special_tokens(tokenizer, special_tokens.values())
    bos, eos = special_tokens["bos_token"].content, special_tokens["eos_token"].content
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, tokenizer.token_to_id(eos)), (bos, tokenizer.token_to_id(bos)), trim_offsets=False, add_prefix_space=False
    )
    return tokenizer


def add_special_tokens(tokenizer: Tokenizer, tokens: Iterable[AddedToken]) -> None:
    """Add the tokens, or update their flags where the tokenizer has them: ones in the vocab keep their ids."""
    unique = {}
    for token in tokens:
        unique.setdefault(token.content, token)  # eos, unk and pad are often one token
    tokenizer.add_special_tokens(list(unique.values()))


def read_special_tokens(directory: Path, known: Iterable[AddedToken] = ()) -> dict[str, AddedToken]:
    """bos/eos/unk/pad as transformers resolves them.

    The names: CLIP's defaults, then tokenizer_config.json, then special_tokens_map.json (which transformers
    reads only when the config has no added_tokens_decoder). The flags (lstrip, normalized, ...): from the
    config's added_tokens_decoder, else from `known` (tokenizer.json's added tokens), else the plain ones.
    """
    values = dict(DEFAULT_SPECIAL_TOKENS)
    config_file = directory / "tokenizer_config.json"
    config = read_json(config_file) if config_file.is_file() else {}
    values.update({name: config[name] for name in DEFAULT_SPECIAL_TOKENS if config.get(name)})
    map_file = directory / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and map_file.is_file():
        special_map = read_json(map_file)
        values.update({name: special_map[name] for name in DEFAULT_SPECIAL_TOKENS if special_map.get(name)})
    if "added_tokens_decoder" in config:
        known = [_added_token(entry, config_file) for entry in config["added_tokens_decoder"].values()]
    known_by_content = {token.content: token for token in known}
    tokens = {name: _added_token(value, config_file) for name, value in values.items()}
    return {name: known_by_content.get(token.content, token) for name, token in tokens.items()}


def _added_token(value, source: Path) -> AddedToken:
    """A special token written as a plain string or as a dict with its matching flags."""
    if isinstance(value, str):
        return AddedToken(value, special=True, normalized=False)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        flags = ("single_word", "lstrip", "rstrip", "normalized")
        return AddedToken(value["content"], special=True, **{k: bool(value[k]) for k in flags if k in value})
    raise ConfigError(f"{source}: a special token must be a string or have a 'content' string, got {value!r}")


class ClipTokenizer:
    """Turns prompts into CLIP token ids, exactly as
    `CLIPTokenizer(texts, padding="max_length", truncation=True, max_length=77)` does."""

    def __init__(self, tokenizer: Tokenizer, pad_token: str):
        """`tokenizer` is the CLIP pipeline (see `from_dir`); it is set here to truncate and pad to 77."""
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ConfigError(f"the tokenizer's pad token {pad_token!r} is not in its vocabulary")
        tokenizer.enable_truncation(MAX_LENGTH)  # keeps bos and eos: cuts the text to 75 tokens
        tokenizer.enable_padding(length=MAX_LENGTH, pad_id=pad_id, pad_token=pad_token)
        self.tokenizer = tokenizer

    @classmethod
    def from_dir(cls, path: str | Path) -> ClipTokenizer:
        """Load a tokenizer directory: tokenizer.json if there is one, else vocab.json + merges.txt."""
        directory = Path(path)
        if not directory.is_dir():
            raise ModelDirError(f"tokenizer directory not found: {directory}")
        json_file = directory / "tokenizer.json"
        if json_file.is_file():
            try:
                tokenizer = Tokenizer.from_file(str(json_file))
            except Exception as e:  # tokenizers raises a bare Exception for a malformed file
                raise ConfigError(f"{json_file} is not a valid tokenizers file: {e}") from None
            special_tokens = read_special_tokens(directory, tokenizer.get_added_tokens_decoder().values())
            add_special_tokens(tokenizer, special_tokens.values())
        else:
            vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
            for file in (vocab_file, merges_file):
                if not file.is_file():
                    raise ModelDirError(f"missing file: {file} (or a tokenizer.json instead)")
            try:
                vocab, merges = BPE.read_file(str(vocab_file), str(merges_file))
            except Exception as e:
                raise ConfigError(f"{directory}: cannot read vocab.json and merges.txt: {e}") from None
            special_tokens = read_special_tokens(directory)
            tokenizer = build_clip_tokenizer(vocab, merges, special_tokens)
        return cls(tokenizer, pad_token=special_tokens["pad_token"].content)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included; the text encoder's embedding needs this many rows."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: str | list[str]) -> np.ndarray:
        """Token ids (batch, 77) int64: bos, the text, eos, then padding. Longer text is cut, with a warning."""
        if isinstance(texts, str):
            texts = [texts]
        encodings = self.tokenizer.encode_batch(texts)
        for text, encoding in zip(texts, encodings, strict=True):
            # With stride 0 the cut-off text comes back as overflowing encodings, each wrapped in bos/eos.
            dropped = sum(_text_token_count(overflow) for overflow in encoding.overflowing)
            if dropped:
                logger.warning(
                    "prompt is longer than CLIP's %d tokens; dropped its last %d token(s): %.60r",
                    MAX_LENGTH,
                    dropped,
                    text,
                )
        ids = np.array([encoding.ids for encoding in encodings], dtype=np.int64)
        return ids.reshape(len(texts), MAX_LENGTH)


def _text_token_count(encoding) -> int:
    """Tokens of the prompt itself: attended to and not added by the post-processor or padding."""
    return sum(
        1
        for attend, special in zip(encoding.attention_mask, encoding.special_tokens_mask, strict=True)
        if attend and not special
    )
