"""The test-model CLIP tokenizer writer: CLIP's file format, loadable by transformers, deterministic."""

import json
import shutil
import subprocess
import sys

import pytest
from tokenizers import pre_tokenizers

from meissonic_edge.errors import ConfigError
from meissonic_edge.model.clip_vocab import MIN_VOCAB_SIZE, byte_alphabet, default_corpus, write_clip_tokenizer

transformers = pytest.importorskip("transformers")

FILES = ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
REQUIRED_WORDS = (
    "circle square triangle red green blue yellow purple orange white black gray "
    "top bottom left right center background"
).split()


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip") / "tokenizer"
    write_clip_tokenizer(out, vocab_size=1000)
    return out


def test_files_have_clips_layout(clip_dir):
    assert sorted(p.name for p in clip_dir.iterdir()) == FILES
    vocab = json.loads((clip_dir / "vocab.json").read_text(encoding="utf-8"))
    tokens = sorted(vocab, key=vocab.get)
    assert len(vocab) == 1000 and sorted(vocab.values()) == list(range(1000))
    alphabet = byte_alphabet()
    assert tokens[:512] == alphabet + [char + "</w>" for char in alphabet]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]

    lines = (clip_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2"
    assert len(lines) - 1 == 1000 - 514  # one merge per learnt entry
    assert all(left + right in vocab for left, right in (line.split(" ") for line in lines[1:]))

    config = json.loads((clip_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "CLIPTokenizer" and config["model_max_length"] == 77
    special = json.loads((clip_dir / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert special == {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
    }


def test_byte_alphabet_is_the_byte_level_one():
    alphabet = byte_alphabet()
    assert len(set(alphabet)) == 256
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    assert alphabet[0] == "!" and alphabet[-1] == chr(256 + 67)


def test_default_corpus_is_varied_english():
    corpus = default_corpus()
    assert len(corpus) >= 300 and len(set(corpus)) > 0.9 * len(corpus)
    words = set(" ".join(corpus).lower().replace(",", " ").replace(".", " ").split())
    assert set(REQUIRED_WORDS) <= words
    assert corpus == default_corpus()


def test_transformers_loads_it(clip_dir):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(clip_dir)
    vocab_size = len(json.loads((clip_dir / "vocab.json").read_text(encoding="utf-8")))
    ids = tokenizer("a red circle at the top left", padding="max_length", truncation=True, max_length=77).input_ids
    text = tokenizer("a red circle at the top left", add_special_tokens=False).input_ids
    bos, eos = vocab_size - 2, vocab_size - 1
    assert len(ids) == 77 and max(ids) < vocab_size
    assert ids[: len(text) + 2] == [bos, *text, eos]
    assert ids[len(text) + 2 :] == [eos] * (75 - len(text))  # the pad token is <|endoftext|>
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle at the top left"
    # The words the test prompts use are single tokens.
    assert all(len(tokenizer(word, add_special_tokens=False).input_ids) == 1 for word in REQUIRED_WORDS)


@pytest.mark.parametrize("with_tokenizer_json", [True, False])
def test_tokenizer_json_is_what_transformers_saves(clip_dir, tmp_path, with_tokenizer_json):
    source = tmp_path / "source"
    shutil.copytree(clip_dir, source)
    if not with_tokenizer_json:
        (source / "tokenizer.json").unlink()
    transformers.CLIPTokenizer.from_pretrained(source).save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").read_bytes() == (clip_dir / "tokenizer.json").read_bytes()


def test_same_arguments_same_bytes(clip_dir, tmp_path):
    write_clip_tokenizer(tmp_path / "again", vocab_size=1000)
    for name in FILES:
        assert (tmp_path / "again" / name).read_bytes() == (clip_dir / name).read_bytes(), name


def test_same_bytes_in_a_fresh_process(clip_dir, tmp_path):
    # The trainer's hash maps are seeded per process, so determinism must hold across processes too.
    code = "import sys; from meissonic_edge.model.clip_vocab import write_clip_tokenizer as w; w(sys.argv[1], 1000)"
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "fresh")], check=True)
    for name in FILES:
        assert (tmp_path / "fresh" / name).read_bytes() == (clip_dir / name).read_bytes(), name


def test_small_corpus_gives_what_it_can(tmp_path):
    write_clip_tokenizer(tmp_path, vocab_size=5000, corpus=["a red circle", "a blue square on the left"])
    vocab = json.loads((tmp_path / "vocab.json").read_text(encoding="utf-8"))
    assert 514 < len(vocab) < 5000
    assert sorted(vocab, key=vocab.get)[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert tokenizer("a blue square").input_ids[0] == len(vocab) - 2


def test_vocab_too_small_for_clip(tmp_path):
    with pytest.raises(ConfigError, match="vocab_size"):
        write_clip_tokenizer(tmp_path, vocab_size=MIN_VOCAB_SIZE - 1)
