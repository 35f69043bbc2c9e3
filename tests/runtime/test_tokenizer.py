"""The runtime tokenizer gives exactly transformers' CLIPTokenizer ids, without torch or transformers."""

import json
import logging
import shutil
import subprocess
import sys

import numpy as np
import pytest

from meissonic_edge.errors import ModelDirError
from meissonic_edge.model.clip_vocab import write_clip_tokenizer
from meissonic_edge.runtime.tokenizer import MAX_LENGTH, ClipTokenizer

transformers = pytest.importorskip("transformers")

LONG = " ".join(["a", "red", "circle", "and", "blue", "square"][i % 6] for i in range(200))
PROMPTS = [
    "",
    " ",
    "a red circle at the top left",
    "A Red Circle At The Top Left",
    "A RED CIRCLE AT THE TOP LEFT",
    "a red circle, a blue square; a green triangle.",
    "what is this?! a yellow star...",
    "purple (hexagon) [center] {background}",
    "orange/white/black - gray",
    "100% red, 3 circles & 2 squares",
    "the year 2024, 12:30 pm, 3.14159",
    "1234567890",
    "it's a cat, don't stop, they're here, we've gone, I'm fine, you'll see, he'd go",
    "IT'S LOUD, DON'T SHOUT",
    "rock 'n' roll 'quoted' \"double quoted\"",
    "café au lait",
    "naïve résumé",
    "Ångström unit",
    "Cafe\u0301 with a combining accent",
    "ﬁne ligature and ½ fraction",
    "straße in münchen",
    "东京的一只红色的猫",
    "日本語のテキスト",
    "한국어 문장",
    "Привет мир",
    "γεια σου κόσμε",
    "مرحبا بالعالم",
    "emoji 🐱🐶 cat dog",
    "🎨🖼️ art 👩‍👩‍👧",
    "flags 🇫🇷🇯🇵",
    "   leading spaces",
    "trailing spaces   ",
    "  both  ends  ",
    "multiple     inner     spaces",
    "tabs\tbetween\twords",
    "new\nlines\nhere",
    "mixed \t\n\r whitespace",
    "\u00a0non-breaking\u00a0space",
    "zero\u200bwidth",
    "<b>bold</b> and <i>italic</i>",
    "&amp; &lt;tag&gt; &quot;",
    "<|startoftext|> a red circle <|endoftext|>",
    "<|endoftext|>",
    "<|ENDOFTEXT|> shouted",
    "<|startoftext|><|endoftext|><|startoftext|>",
    "user@example.com https://example.com/a?b=c#d",
    "snake_case and camelCase and kebab-case",
    "C++ and C# and F#",
    "$100 €50 £20 ¥1000",
    "math: x^2 + y^2 = z^2, a<b>c",
    "ellipsis… and em—dash and “smart quotes”",
    "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./",
    "a" * 100,
    "circlecirclecircle squaresquare",
    "triangle triangle triangle",
    "unknownwordzzz qqq xyzzy",
    "a photograph of a fluffy cat sleeping in a sunny garden, oil painting",
    "bottom right corner with a gray background",
    "a sketch of an old wooden chair, 3d render, 4k, hd",
    LONG,
    LONG.upper(),
    " ".join(["supercalifragilistic"] * 40),
    "word " * 74 + "end",
    "word " * 75 + "end",
    "word " * 76 + "end",
]


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    """Two copies of one test tokenizer: with tokenizer.json, and with vocab.json + merges.txt only."""
    root = tmp_path_factory.mktemp("tokenizers")
    write_clip_tokenizer(root / "with_json", vocab_size=1000)
    shutil.copytree(root / "with_json", root / "without_json")
    (root / "without_json" / "tokenizer.json").unlink()
    return {"with_json": root / "with_json", "without_json": root / "without_json"}


def reference_ids(directory, texts):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(directory)
    return np.array(tokenizer(texts, padding="max_length", truncation=True, max_length=77).input_ids)


@pytest.mark.parametrize("layout", ["with_json", "without_json"])
def test_ids_equal_transformers(tokenizer_dirs, layout):
    assert len(PROMPTS) >= 60
    ids = ClipTokenizer.from_dir(tokenizer_dirs[layout]).encode(PROMPTS)
    assert ids.dtype == np.int64 and ids.shape == (len(PROMPTS), MAX_LENGTH)
    expected = reference_ids(tokenizer_dirs[layout], PROMPTS)
    for prompt, row, expected_row in zip(PROMPTS, ids, expected, strict=True):
        assert row.tolist() == expected_row.tolist(), f"prompt {prompt[:60]!r}"


@pytest.mark.parametrize("layout", ["with_json", "without_json"])
def test_other_pad_token_is_honoured(tokenizer_dirs, tmp_path, layout):
    # Some CLIP variants (OpenCLIP ViT-H, used by SD 2 and Meissonic) pad with "!" rather than <|endoftext|>.
    directory = tmp_path / layout
    shutil.copytree(tokenizer_dirs[layout], directory)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((directory / name).read_text(encoding="utf-8"))
        config["pad_token"] = "!"
        (directory / name).write_text(json.dumps(config), encoding="utf-8")
    ids = ClipTokenizer.from_dir(directory).encode(PROMPTS[:10])
    assert ids[2, -1] == 0  # "!" is the first byte token
    np.testing.assert_array_equal(ids, reference_ids(directory, PROMPTS[:10]))


@pytest.mark.parametrize("layout", ["with_json", "without_json"])
def test_added_tokens_decoder_flags_are_honoured(tokenizer_dirs, tmp_path, layout):
    # OpenAI's CLIP config declares <|startoftext|> as normalized: it then also matches after lowercasing.
    directory = tmp_path / layout
    shutil.copytree(tokenizer_dirs[layout], directory)
    config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
    flags = {"lstrip": False, "rstrip": False, "single_word": False, "special": True}
    config["added_tokens_decoder"] = {
        "998": {"content": "<|startoftext|>", "normalized": True, **flags},
        "999": {"content": "<|endoftext|>", "normalized": False, **flags},
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    prompts = ["<|STARTOFTEXT|> a red circle", "<|ENDOFTEXT|> a", "a <|startoftext|>", "a <|endoftext|> b"]
    ids = ClipTokenizer.from_dir(directory).encode(prompts)
    assert ids[0, 1] == 998  # the upper-case bos matched as the special token
    np.testing.assert_array_equal(ids, reference_ids(directory, prompts))


def test_single_string_and_layout(tokenizer_dirs):
    tokenizer = ClipTokenizer.from_dir(tokenizer_dirs["with_json"])
    ids = tokenizer.encode("a red circle at the top left")
    assert ids.shape == (1, MAX_LENGTH)
    bos, eos = tokenizer.vocab_size - 2, tokenizer.vocab_size - 1
    assert ids[0, 0] == bos and ids[0, 8] == eos and (ids[0, 9:] == eos).all()  # 7 words, one token each
    assert ids.max() < tokenizer.vocab_size
    empty = tokenizer.encode("")
    assert empty[0, :2].tolist() == [bos, eos]
    assert tokenizer.encode([]).shape == (0, MAX_LENGTH)


def test_long_prompt_is_cut_with_a_warning(tokenizer_dirs, caplog):
    tokenizer = ClipTokenizer.from_dir(tokenizer_dirs["without_json"])
    with caplog.at_level(logging.WARNING, logger="meissonic_edge.runtime.tokenizer"):
        ids = tokenizer.encode(["a red circle", LONG])
    assert ids[1, -1] == tokenizer.vocab_size - 1  # eos kept at the end
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1  # only the long prompt
    assert "dropped its last 125 token(s)" in messages[0]  # 200 one-token words, 75 kept

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="meissonic_edge.runtime.tokenizer"):
        tokenizer.encode("red " * 75)  # exactly 75 text tokens fit
    assert caplog.records == []


def test_missing_directory_and_files(tokenizer_dirs, tmp_path):
    with pytest.raises(ModelDirError, match="not found"):
        ClipTokenizer.from_dir(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    shutil.copytree(tokenizer_dirs["without_json"], partial)
    (partial / "merges.txt").unlink()
    with pytest.raises(ModelDirError, match="merges.txt"):
        ClipTokenizer.from_dir(partial)
    (partial / "vocab.json").unlink()
    with pytest.raises(ModelDirError, match="vocab.json"):
        ClipTokenizer.from_dir(partial)


def test_runtime_imports_neither_torch_nor_transformers():
    code = (
        "import sys, meissonic_edge.runtime.tokenizer; "
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; sys.exit(bool(bad))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
