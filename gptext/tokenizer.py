"""Offline tokenizers: tiktoken encodings built from vocabularies shipped in gptext/data.

``get_tokenizer("gpt2")`` needs no network: tiktoken's own ``get_encoding("gpt2")`` would
download the same vocabulary on first use.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from pathlib import Path

import tiktoken

__all__ = ["get_tokenizer"]

DATA = Path(__file__).parent / "data"
# GPT-2's pre-tokenisation pattern (contractions, letters, numbers, other symbols, spaces).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
ENDOFTEXT = "<|endoftext|>"


def _load_ranks(path: Path, sha256: str) -> dict[bytes, int]:
    """Reads a tiktoken rank file (``base64(token) rank`` per line), checking its hash."""
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise ValueError(f"{path}: sha256 {digest} does not match the shipped vocabulary ({sha256}); "
                         "the file is damaged, reinstall gptext")
    ranks = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=None)
def get_tokenizer(name: str = "gpt2") -> tiktoken.Encoding:
    """The tiktoken Encoding `name` (available: "gpt2"), built offline."""
    if name != "gpt2":
        raise ValueError(f"unknown tokenizer {name!r}; available: 'gpt2'")
    ranks = _load_ranks(DATA / "gpt2.tiktoken", GPT2_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)})
