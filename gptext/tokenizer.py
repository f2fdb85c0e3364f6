"""Offline tokenizers: tiktoken encodings built from vocabularies shipped in gptext/data, or
from a checkpoint's own ``tokenizer.json``.

``get_tokenizer("gpt2")`` needs no network: tiktoken's own ``get_encoding("gpt2")`` would
download the same vocabulary on first use. ``get_tokenizer("path/to/checkpoint")`` reads
the directory's Hugging Face ``tokenizer.json`` when it is a byte-level BPE (GPT-2's, and
gpt-oss's o200k_harmony, which gptext does not ship) into the same kind of Encoding.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
from pathlib import Path

import tiktoken

__all__ = ["get_tokenizer", "load_tokenizer", "digest", "splits_at_line_starts"]

DATA = Path(__file__).parent / "data"
# GPT-2's pre-tokenisation pattern (contractions, letters, numbers, other symbols, spaces).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# cl100k's and o200k's (o200k_harmony's, gpt-oss's) patterns, as tiktoken writes them and as
# tokenizer.json files made from those vocabularies carry them in a Split pre-tokenizer.
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
# Patterns under which a line start is always a split (see split_at_line_starts).
LINE_SPLIT_PATTERNS = frozenset({GPT2_PATTERN, CL100K_PATTERN, O200K_PATTERN})
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


def get_tokenizer(name: str | os.PathLike = "gpt2") -> tiktoken.Encoding:
    """The tiktoken Encoding `name`, built offline: "gpt2" (shipped with gptext), or a
    checkpoint directory (or tokenizer.json file) whose tokenizer.json load_tokenizer reads."""
    if name == "gpt2":
        return _gpt2()
    if isinstance(name, os.PathLike) or os.sep in str(name) or Path(name).exists():
        return load_tokenizer(name)
    raise ValueError(f"unknown tokenizer {name!r}; available: 'gpt2', or a checkpoint directory with a "
                     f"tokenizer.json")


@functools.lru_cache(maxsize=None)
def _gpt2() -> tiktoken.Encoding:
    ranks = _load_ranks(DATA / "gpt2.tiktoken", GPT2_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: len(ranks)})


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's alphabet, inverted: the printable character that stands for each byte
    in a tokenizer.json vocabulary (bytes that print as themselves keep their code point; the
    others, in order, take 256, 257, ...) -> the byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    alphabet, shifted = {}, 256
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(shifted)] = byte
            shifted += 1
    return alphabet


def _pre_tokenizer_pattern(spec, file: Path) -> str:
    """The split pattern of a byte-level BPE's pre-tokenizer: ByteLevel's own regex (GPT-2's),
    or a Split regex followed by a ByteLevel that only maps bytes."""
    kind = (spec or {}).get("type")
    if kind == "ByteLevel" and spec.get("use_regex", True) and not spec.get("add_prefix_space", False):
        return GPT2_PATTERN
    if kind == "Sequence":
        steps = spec.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split" and "Regex" in (steps[0].get("pattern") or {})
                and str(steps[0].get("behavior", "")).lower() == "isolated" and not steps[0].get("invert", False)
                and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)
                and not steps[1].get("add_prefix_space", False)):
            return steps[0]["pattern"]["Regex"]
    raise ValueError(f"{file}: pre_tokenizer {json.dumps(spec)[:200]} is not one gptext reads (ByteLevel with its "
                     f"regex, or Split(regex, isolated) then ByteLevel without one, neither adding a prefix space)")


def splits_at_line_starts(tok: tiktoken.Encoding) -> bool:
    """Whether `tok`'s pre-tokenisation always splits a text where a line that starts with an
    ASCII letter or digit follows a line that ends in a printable, non-space ASCII character
    (a newline between the two): true of GPT-2's, cl100k's and o200k's patterns, where no
    piece holds a newline followed by a letter or digit and a lone newline is a piece of its
    own whatever follows it. Text cut at such places encodes, piece by piece, to the tokens
    of the whole."""
    return tok._pat_str in LINE_SPLIT_PATTERNS


def digest(tok: tiktoken.Encoding) -> str:
    """A sha256 of what decides `tok`'s tokens (its split pattern, its ranks, its special
    tokens): equal for two encodings that tokenize alike, whatever their names."""
    h = hashlib.sha256(tok._pat_str.encode("utf-8"))
    for token, rank in sorted(tok._mergeable_ranks.items(), key=lambda item: item[1]):
        h.update(b"%d %d:" % (rank, len(token)) + token)
    for token, rank in sorted(tok._special_tokens.items(), key=lambda item: item[1]):
        h.update(b"special %d " % rank + token.encode("utf-8") + b"\n")
    return h.hexdigest()


def load_tokenizer(path: str | os.PathLike) -> tiktoken.Encoding:
    """A tiktoken Encoding from a Hugging Face tokenizer.json (or a directory holding one):
    a byte-level BPE whose merges come in the order of their tokens' ids, as those of
    vocabularies made from tiktoken's (GPT-2's, o200k_harmony) do, so that the ids are the
    ranks tiktoken merges by. Its added tokens become special tokens. Raises
    FileNotFoundError without the file and ValueError, naming it, for anything else."""
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such tokenizer.json")
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable tokenizer.json ({e})") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        kind = model.get("type") if isinstance(model, dict) else None
        raise ValueError(f"{file}: not a BPE tokenizer.json (model.type {kind!r})")
    if spec.get("normalizer") is not None:
        raise ValueError(f"{file}: has a normalizer ({spec['normalizer'].get('type')}), which byte-level BPE "
                         f"vocabularies made from tiktoken's do not; gptext does not apply one")
    pattern = _pre_tokenizer_pattern(spec.get("pre_tokenizer"), file)
    alphabet = _byte_alphabet()
    vocab = model["vocab"]
    ranks = {}
    for token, rank in vocab.items():
        try:
            ranks[bytes(alphabet[c] for c in token)] = int(rank)
        except KeyError:
            raise ValueError(f"{file}: vocabulary entry {token!r} is not written in byte-level BPE's "
                             f"alphabet") from None
    ids = set(ranks.values())
    if len(ids) != len(ranks):
        raise ValueError(f"{file}: two vocabulary entries share an id")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{file}: the vocabulary lacks {len(missing)} of the 256 single bytes (byte {missing[0]}), "
                         f"so some text could not be encoded")
    last = -1
    for i, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = vocab.get(left + right)
        if merged is None or merged < last:
            raise ValueError(f"{file}: merge {i} ({left!r} + {right!r}) "
                             + ("makes no token of the vocabulary" if merged is None else
                                "comes after a merge into a later id: merge priority is not id order, which "
                                "tiktoken's ranks need"))
        last = merged
    special = {}
    for added in spec.get("added_tokens") or []:
        content, token_id = added.get("content"), added.get("id")
        if isinstance(content, str) and ranks.get(content.encode("utf-8")) == token_id:
            continue  # an ordinary token also listed as added
        if not isinstance(content, str) or not isinstance(token_id, int):
            raise ValueError(f"{file}: added token {added!r} lacks a content string or an integer id")
        if token_id in ids or token_id in special.values():
            raise ValueError(f"{file}: added token {content!r} reuses id {token_id}")
        special[content] = int(token_id)
    return tiktoken.Encoding(name=f"{file.parent.name or 'tokenizer'}", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=special)
