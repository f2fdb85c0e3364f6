"""The offline GPT-2 tokenizer."""

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
