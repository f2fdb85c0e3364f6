"""The offline GPT-2 tokenizer, and tokenizers read from a checkpoint's tokenizer.json."""

import pytest

import gptext
from gptext import tokenizer


def test_known_ids():
    tok = gptext.get_tokenizer("gpt2")
    assert tok.encode("Hello, I am") == [15496, 11, 314, 716]
    assert tok.encode("Every effort moves you") == [6109, 3626, 6100, 345]
    assert tok.n_vocab == 50257 and tok.eot_token == 50256
    assert tok.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_roundtrip():
    tok = gptext.get_tokenizer()
    for text in ["", "  spaces  and\nnewlines\t", "héllo wörld ✓ 日本語", "I'll've we're 12345"]:
        assert tok.decode(tok.encode(text)) == text


def test_unknown_and_damaged(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown tokenizer"):
        gptext.get_tokenizer("cl100k_base")
    damaged = tmp_path / "gpt2.tiktoken"
    damaged.write_bytes((tokenizer.DATA / "gpt2.tiktoken").read_bytes()[:-10])
    with pytest.raises(ValueError, match="damaged"):
        tokenizer._load_ranks(damaged, tokenizer.GPT2_SHA256)


# ---- a checkpoint's own tokenizer.json --------------------------------------------------
# The independent oracle: transformers' converter from a tiktoken vocabulary (the way
# gpt-oss's tokenizer.json was made) and the `tokenizers` library that runs it.

TEXTS = ["Hello, I am", "", "  spaces  and\nnewlines\t\r\n", "héllo wörld ✓ 日本語 🙂", "I'll've we're 12345 6789012",
         "def f(x):\n    return x**2  # comment", "ALLCAPS mixedCase dont't"]
CL100K_PATTERN = tokenizer.CL100K_PATTERN


def _converted(pattern):
    from transformers.convert_slow_tokenizer import TikTokenConverter

    return TikTokenConverter(vocab_file=str(tokenizer.DATA / "gpt2.tiktoken"), pattern=pattern,
                             extra_special_tokens=["<|endoftext|>", "<|return|>"]).converted()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """{pattern name: (tokenizer.json path, the tokenizers.Tokenizer)} for GPT-2's split
    pattern and cl100k's (which no shipped encoding uses: the file's own pattern must rule)."""
    out = {}
    for name, pattern in (("gpt2", tokenizer.GPT2_PATTERN), ("cl100k", CL100K_PATTERN)):
        hf = _converted(pattern)
        path = tmp_path_factory.mktemp(name) / "tokenizer.json"
        hf.save(str(path))
        out[name] = (path, hf)
    return out


@pytest.mark.parametrize("name", ["gpt2", "cl100k"])
def test_tokenizer_json_matches_the_tokenizers_library(tokenizer_json, name):
    path, hf = tokenizer_json[name]
    tok = gptext.get_tokenizer(path.parent)  # a directory, as from_pretrained takes
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf.encode(text).ids, text
        assert tok.decode(ids) == text
    assert tok.encode("<|return|>", allowed_special="all") == [hf.token_to_id("<|return|>")]
    if name == "gpt2":  # the same vocabulary and pattern as the shipped encoding
        shipped = gptext.get_tokenizer("gpt2")
        assert all(tok.encode(t) == shipped.encode(t) for t in TEXTS)
        assert tok.encode_single_token("<|endoftext|>") == shipped.eot_token == 50256
    else:  # cl100k's pattern splits digits in threes, GPT-2's does not
        assert tok.encode("1234567") == [10163, 29228, 22] != gptext.get_tokenizer("gpt2").encode("1234567")


def test_tokenizer_json_with_gpt2s_byte_level_pre_tokenizer(tokenizer_json, tmp_path):
    # GPT2TokenizerFast's form: one ByteLevel pre-tokenizer carrying GPT-2's regex itself.
    import json

    spec = json.loads(tokenizer_json["gpt2"][0].read_text())
    spec["pre_tokenizer"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    tok = gptext.get_tokenizer(tmp_path / "tokenizer.json")
    assert [tok.encode(t) for t in TEXTS] == [gptext.get_tokenizer("gpt2").encode(t) for t in TEXTS]


def test_tokenizer_json_errors(tokenizer_json, tmp_path):
    import json

    good = json.loads(tokenizer_json["gpt2"][0].read_text())

    def load(change):
        spec = json.loads(json.dumps(good))
        change(spec)
        path = tmp_path / "tokenizer.json"
        path.write_text(json.dumps(spec))
        return gptext.get_tokenizer(path)

    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        gptext.get_tokenizer(tmp_path / "nowhere")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        gptext.get_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="not a BPE"):
        load(lambda s: s["model"].update(type="WordPiece"))
    with pytest.raises(ValueError, match="normalizer"):
        load(lambda s: s.update(normalizer={"type": "NFC"}))
    with pytest.raises(ValueError, match="pre_tokenizer"):
        load(lambda s: s["pre_tokenizer"]["pretokenizers"][1].update(add_prefix_space=True))
    with pytest.raises(ValueError, match="id order"):
        load(lambda s: s["model"]["merges"].insert(0, s["model"]["merges"].pop(100)))
    with pytest.raises(ValueError, match="makes no token"):
        load(lambda s: s["model"]["merges"].append(["Ġ", "zzzzqqq"]))
    with pytest.raises(ValueError, match="single bytes"):
        load(lambda s: s["model"]["vocab"].pop("!"))
    with pytest.raises(ValueError, match="reuses id"):
        load(lambda s: s["added_tokens"].append({"id": 100, "content": "<|x|>", "special": True}))
    with pytest.raises(ValueError, match="alphabet"):
        load(lambda s: s["model"]["vocab"].update({"a b": 60000}))
