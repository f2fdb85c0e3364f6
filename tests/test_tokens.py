"""Training data on disk: text encoded in chunks (the tokens of the whole), token files
(train.write_tokens, read_tokens, TokenData.from_file) and python -m gptext tokenize."""

import json
import os
import random

import numpy as np
import pytest
import tiktoken
import torch

import gptext
from gptext import GPT, GPTConfig, tokenizer, train


def _encoding(pattern, special=None, name="test"):
    gpt2 = gptext.get_tokenizer("gpt2")
    return tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=gpt2._mergeable_ranks,
                             special_tokens=special if special is not None else {"<|endoftext|>": 50256})


def _awkward_text(lines=400, seed=0):
    """Lines that start and end in every way a cut has to get right: spaces before a newline,
    CRLF, blank lines, digits, punctuation, slashes after newlines (o200k), contractions,
    non-ASCII letters, tabs, a long line."""
    rng = random.Random(seed)
    starts = ["Hello", "world", "42", "7x", " indented", "\tTab", "'s", "  ", "", "/path", "-- dash", "日本語", "Éclair",
              "über", "x" * 300, "...", "I'll", "CamelCase", "ALLCAPS", "1234567"]
    ends = ["", " ", "  ", ".", "!", "\r", " \r", "?!", "/", "123", "é", "'", "\t"]
    return "\n".join(rng.choice(starts) + rng.choice([" and ", "", ", ", "\u00a0"]) + rng.choice(starts)
                     + rng.choice(ends) for _ in range(lines)) + "\n\n  \n"


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k", "o200k"])
@pytest.mark.parametrize("chunk", [1, 9, 100])
def test_chunked_encoding_gives_the_tokens_of_the_whole_file(tmp_path, pattern, chunk):
    tok = _encoding({"gpt2": tokenizer.GPT2_PATTERN, "cl100k": tokenizer.CL100K_PATTERN,
                     "o200k": tokenizer.O200K_PATTERN}[pattern])
    assert tokenizer.splits_at_line_starts(tok)
    text = _awkward_text()
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8", newline="")  # CRLF kept on disk; text mode reads it as "\n"
    read = path.read_text(encoding="utf-8")
    pieces = list(train._text_pieces(path, True, chunk))
    assert "".join(pieces) == read and len(pieces) > 20  # really cut, many times
    ids = np.concatenate(list(train.encode_files([path, path], tok, chunk_chars=chunk, threads=3)))
    whole = tok.encode_ordinary(read)
    assert ids.tolist() == whole + [50256] + whole


def test_another_pattern_encodes_each_file_whole(tmp_path):
    # A pattern whose pieces run across lines: cutting at a line start would change them.
    tok = _encoding(r"""[^\n]*\n[A-Za-z]?|[^\n]+""")
    assert not tokenizer.splits_at_line_starts(tok)
    text = _awkward_text(100)
    path = tmp_path / "a.txt"
    path.write_text(text, encoding="utf-8")
    assert len(list(train._text_pieces(path, False, 10))) == 1
    ids = np.concatenate(list(train.encode_files([path], tok, chunk_chars=10)))
    assert ids.tolist() == tok.encode_ordinary(path.read_text(encoding="utf-8"))


def test_a_long_line_is_carried_until_a_cut(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("a" * 5000 + "\nNext line\n" + "b" * 50, encoding="utf-8")
    pieces = list(train._text_pieces(path, True, 100))
    assert pieces == ["a" * 5000 + "\nNext line\n", "b" * 50]  # the last cut of the read that found one


def test_token_file_round_trip(tmp_path):
    tok = gptext.get_tokenizer("gpt2")
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(_awkward_text(300), encoding="utf-8")
    b.write_text("Second file.\nWith <|endoftext|> as text.\n", encoding="utf-8")
    header = train.write_tokens([a, b], tok, tmp_path / "ab.tokens", chunk_chars=50)
    expected = train.tokenize([a, b], tok)
    assert header["count"] == expected.numel() and header["max_id"] == int(expected.max())
    assert header["dtype"] == "uint16" and header["tokenizer"]["name"] == "gpt2"
    assert header["tokenizer"]["sha256"] == tokenizer.digest(tok) and header["sources"] == [str(a), str(b)]
    assert train.is_token_file(tmp_path / "ab.tokens") and not train.is_token_file(a)
    read, ids = train.read_tokens(tmp_path / "ab.tokens")
    assert read == header and isinstance(ids, np.memmap) and ids.dtype == np.uint16
    assert torch.equal(torch.from_numpy(ids.astype(np.int64)), expected)
    mode = os.stat(tmp_path / "ab.tokens").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask  # not the temporary file's 0600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "ab.tokens", "b.txt"]  # no temporary left
    # Read in place, the file's data are the tensor's: the same windows, fingerprint and largest id.
    memory = train.TokenData(expected, context=16, val_fraction=0.1)
    mapped = train.TokenData.from_file(tmp_path / "ab.tokens", context=16, val_fraction=0.1, tokenizer=tok)
    assert len(mapped) == len(memory) == expected.numel()
    assert mapped.fingerprint() == memory.fingerprint() and mapped.max_id() == memory.max_id()
    assert mapped.fingerprint() != train.TokenData.from_file(tmp_path / "ab.tokens", 16, 0.2).fingerprint()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for (x1, y1), (x2, y2) in zip([memory.sample(8, g1)] + memory.held_out(2, 4),
                                  [mapped.sample(8, g2)] + mapped.held_out(2, 4)):
        assert x2.dtype == torch.long and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_a_vocabulary_beyond_65536_ids_stores_uint32(tmp_path):
    tok = _encoding(tokenizer.GPT2_PATTERN, {"<|endoftext|>": 70000})
    path = tmp_path / "a.txt"
    path.write_text("Hello there.\n", encoding="utf-8")
    header = train.write_tokens((p for p in [path, path]), tok, tmp_path / "a.tokens")  # any iterable
    _, ids = train.read_tokens(tmp_path / "a.tokens")
    assert header["dtype"] == "uint32" and ids.dtype == np.uint32 and header["max_id"] == 70000
    assert ids.tolist() == train.tokenize([path, path], tok).tolist() and 70000 in ids.tolist()
    # Tokens written as uint32 and as uint16 have one digest: the fingerprint is of the ids.
    assert header["sha256"] == train._stream_digest(np.array(ids, dtype=np.int64))


def test_an_empty_text_makes_an_empty_token_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    header = train.write_tokens([tmp_path / "empty.txt"], gptext.get_tokenizer("gpt2"), tmp_path / "e.tokens")
    _, ids = train.read_tokens(tmp_path / "e.tokens")
    assert header["count"] == 0 and ids.size == 0
    with pytest.raises(ValueError, match="e.tokens: 0 tokens are too few"):
        train.TokenData.from_file(tmp_path / "e.tokens", context=4)


def test_token_file_errors(tmp_path):
    tok = gptext.get_tokenizer("gpt2")
    text = tmp_path / "a.txt"
    text.write_text(_awkward_text(50), encoding="utf-8")
    good = tmp_path / "a.tokens"
    train.write_tokens([text], tok, good)
    raw = good.read_bytes()

    def broken(data):
        path = tmp_path / "broken.tokens"
        path.write_bytes(data)
        return path

    with pytest.raises(FileNotFoundError, match="none.tokens: no such file"):
        train.read_tokens(tmp_path / "none.tokens")
    with pytest.raises(ValueError, match="a.txt: not a gptext token file"):
        train.read_tokens(text)
    with pytest.raises(ValueError, match="cut short"):
        train.read_tokens(broken(raw[:-3]))
    with pytest.raises(ValueError, match="longer than its header says"):
        train.read_tokens(broken(raw + b"\0\0"))
    with pytest.raises(ValueError, match="malformed header"):
        train.read_tokens(broken(raw[:20] + b"\xff{" + raw[22:]))
    with pytest.raises(ValueError, match="malformed header"):
        train.read_tokens(broken(raw[:8] + (1 << 40).to_bytes(8, "little") + raw[16:]))
    header = json.loads(raw[16:16 + int.from_bytes(raw[8:16], "little")])
    for change in ({"dtype": "int8"}, {"format": "other/1"}, {"count": "many"}):
        text_header = json.dumps({**header, **change}).encode()
        with pytest.raises(ValueError, match="header|format"):
            train.read_tokens(broken(raw[:8] + len(text_header).to_bytes(8, "little") + text_header))
    other = _encoding(tokenizer.CL100K_PATTERN, name="cl100k-like")
    with pytest.raises(ValueError, match="written with tokenizer 'gpt2'.*this model's is 'cl100k-like'"):
        train.TokenData.from_file(good, context=8, tokenizer=other)
    # Failing sources write nothing: a missing file before any work, a bad one part way through.
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe not UTF-8")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(FileNotFoundError, match="missing.txt: no such file"):
        train.write_tokens([text, tmp_path / "missing.txt"], tok, tmp_path / "new.tokens")
    with pytest.raises(ValueError, match="bad.txt: not UTF-8 text"):
        train.write_tokens([text, tmp_path / "bad.txt"], tok, tmp_path / "new.tokens")
    with pytest.raises(ValueError, match="a directory, not a text file"):
        train.write_tokens([tmp_path], tok, tmp_path / "new.tokens")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_training_from_a_token_file_takes_the_steps_of_the_tensor(tmp_path):
    tok = gptext.get_tokenizer("gpt2")
    (tmp_path / "a.txt").write_text(_awkward_text(200), encoding="utf-8")
    train.write_tokens([tmp_path / "a.txt"], tok, tmp_path / "a.tokens")
    config = train.TrainConfig(steps=3, batch_size=2, eval_every=2, eval_batches=2, log_every=0)
    histories = []
    for data in (train.TokenData(train.tokenize([tmp_path / "a.txt"], tok), 16, 0.1),
                 train.TokenData.from_file(tmp_path / "a.tokens", 16, 0.1, tokenizer=tok)):
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_embd=32, n_head=2, n_layer=1, context_length=16))
        histories.append([{k: v for k, v in r.items() if k != "tokens_per_s"}
                          for r in train.train(model, data, config, log=None)])
    assert histories[0] == histories[1] and len(histories[0]) == 4


# ---- the command line -------------------------------------------------------------------

def test_cli_tokenizes_then_trains_from_the_token_file(tmp_path, capsys):
    from gptext.__main__ import main

    (tmp_path / "a.txt").write_text(_awkward_text(200), encoding="utf-8")
    assert main(["tokenize", str(tmp_path / "a.txt"), "--out", str(tmp_path / "a.tokens")]) == 0
    out = capsys.readouterr().out
    count = train.read_tokens(tmp_path / "a.tokens")[0]["count"]
    assert f"wrote {tmp_path / 'a.tokens'}: {count:,} tokens (uint16" in out and "'gpt2'" in out
    preset = ["--model", "gpt2-124m", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2",
              "--set", "context_length=16", "--steps", "3", "--batch-size", "2", "--eval-every", "2",
              "--log-every", "0"]
    assert main(["train", *preset, "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "text")]) == 0
    assert main(["train", *preset, "--data", str(tmp_path / "a.tokens"), "--out", str(tmp_path / "file")]) == 0
    text, file = (json.loads((tmp_path / name / "training.json").read_text()) for name in ("text", "file"))
    assert [r.get("loss") for r in text["history"]] == [r.get("loss") for r in file["history"]]
    assert file["data"] == [str(tmp_path / "a.tokens")]
    capsys.readouterr()
    # Resuming finds the token file again, and takes the steps it would have.
    assert main(["train", "--out", str(tmp_path / "file"), "--resume", "--steps", "4"]) == 0
    assert "resumed at step 3" in capsys.readouterr().out

    def fails(*args):
        code = main(list(args))
        return code, capsys.readouterr().err

    code, err = fails("train", *preset, "--data", str(tmp_path / "a.tokens"), str(tmp_path / "a.txt"),
                      "--out", str(tmp_path / "mixed"))
    assert code == 2 and "not a token file among other files" in err
    code, err = fails("tokenize", str(tmp_path / "a.txt"), "--out", str(tmp_path))
    assert code == 2 and "is a directory" in err
    code, err = fails("tokenize", str(tmp_path / "a.txt"), "--out", str(tmp_path / "no" / "a.tokens"))
    assert code == 2 and "no directory" in err
    code, err = fails("tokenize", str(tmp_path / "a.txt"), "--out", str(tmp_path / "b.tokens"),
                      "--tokenizer", str(tmp_path / "text"))
    assert code == 2 and "has no tokenizer.json" in err
    code, err = fails("tokenize", str(tmp_path / "none.txt"), "--out", str(tmp_path / "b.tokens"))
    assert code == 2 and "none.txt: no such file" in err
    assert not (tmp_path / "b.tokens").exists() and not (tmp_path / "mixed").exists()
