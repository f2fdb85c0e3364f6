"""train.perplexity and python -m gptext eval: a model's loss over a token stream, every
token predicted once, against transformers' GPT-2 computing each prediction on its own."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import gptext
from gptext import GPT, GPTConfig, train

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tokens,context,stride", [(2, 4, 1), (5, 4, 1), (10, 4, 2), (33, 8, 8), (34, 8, 8),
                                                   (100, 16, 5), (100, 16, 16), (7, 16, 3)])
def test_windows_score_every_token_once(tokens, context, stride):
    spans = train.windows(tokens, context, stride)
    scored = [i for b, e, first in spans for i in range(first, e + 1)]
    assert scored == list(range(1, tokens))  # each target once, in order
    assert spans[0][0] == 0 and {e - b for b, e, _ in spans} == {min(context, tokens - 1)}
    for b, e, first in spans:
        assert b < first <= e <= tokens - 1
        # each scored token is predicted from at least context - stride + 1 tokens (all there are, near the start)
        assert all(i - b >= min(i, context - stride + 1) for i in range(first, e + 1))


def test_windows_errors():
    for context, stride in ((0, 1), (4, 0), (4, 5)):
        with pytest.raises(ValueError, match="stride"):
            train.windows(10, context, stride)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_head=2, n_layer=2, vocab_size=101, n_positions=16)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    return hf, GPT.from_pretrained(directory), directory


def _one_by_one(hf, ids, context, start_of):
    """The mean loss of predicting each ids[i] from ids[start_of(i):i], one HF call a token."""
    losses = []
    with torch.no_grad():
        for i in range(1, len(ids)):
            logits = hf(torch.tensor([ids[start_of(i):i]])).logits[0, -1]
            losses.append(float(F.cross_entropy(logits[None].double(), torch.tensor([ids[i]]))))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_perplexity_matches_transformers_token_by_token(hf_pair, backend):
    hf, model, _ = hf_pair
    ids = torch.randint(0, 101, (41,), generator=torch.Generator().manual_seed(1))
    # Stride 1: each token after the first 8 is predicted from exactly the 8 before it.
    with gptext.backend(backend):
        result = train.perplexity(model, ids, context=8, stride=1, batch_size=3)
    expected = _one_by_one(hf, ids.tolist(), 8, lambda i: max(0, i - 8))
    assert result["loss"] == pytest.approx(expected, rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(expected), rel=1e-5)
    assert (result["tokens"], result["windows"], result["context"], result["stride"]) == (40, 33, 8, 1)
    # Stride = context over 4 whole windows: each token predicted from the start of its window.
    with gptext.backend(backend):
        result = train.perplexity(model, ids[:33], context=8, stride=8)
    expected = _one_by_one(hf, ids[:33].tolist(), 8, lambda i: (i - 1) // 8 * 8)
    assert result["loss"] == pytest.approx(expected, rel=1e-5) and result["windows"] == 4


def test_perplexity_of_gpt_oss_with_windows_and_sinks():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt-oss-20b", vocab_size=97, context_length=32, n_embd=32, n_layer=2, n_head=4,
                                 n_kv_head=2, head_width=8, n_experts=4, experts_per_token=2, expert_width=16,
                                 sliding_window=4)).eval()
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(2))
    result = train.perplexity(model, ids, context=12, stride=5, batch_size=2)
    # Each scored token from the window that scored it, by the model itself one window at a time.
    total = 0.0
    with torch.no_grad():
        for b, e, first in train.windows(30, 12, 5):
            logits = model(ids[None, b:e])[0].double()
            total += float(F.cross_entropy(logits[first - b - 1:], ids[first:e + 1], reduction="sum"))
    assert result["loss"] == pytest.approx(total / 29, rel=1e-6) and result["tokens"] == 29


def test_perplexity_errors(hf_pair):
    _, model, _ = hf_pair
    with pytest.raises(ValueError, match="at least two"):
        train.perplexity(model, torch.tensor([3]))
    with pytest.raises(ValueError, match="longer than the model's context_length 16"):
        train.perplexity(model, torch.arange(40), context=17)
    with pytest.raises(ValueError, match="stride"):
        train.perplexity(model, torch.arange(40), context=8, stride=9)
    with pytest.raises(ValueError, match="id 101, outside the model's vocabulary of 101"):
        train.perplexity(model, torch.arange(102), context=8)
    with pytest.raises(ValueError, match="1-d"):
        train.perplexity(model, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        train.perplexity(model, torch.arange(40), batch_size=0)
    model.train()
    train.perplexity(model, torch.arange(40), context=8)
    assert model.training  # its mode given back


def test_cli_eval(tmp_path, capsys):
    from gptext.__main__ import main
    from gptext.demo import corpus

    torch.manual_seed(0)
    GPT(GPTConfig(n_embd=32, n_head=2, n_layer=1, context_length=32)).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "zen.txt").write_text(corpus(), encoding="utf-8")
    assert main(["tokenize", str(tmp_path / "zen.txt"), "--out", str(tmp_path / "zen.tokens")]) == 0
    capsys.readouterr()
    results = []
    for data in ("zen.txt", "zen.tokens"):
        assert main(["eval", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / data), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    ids = train.tokenize([tmp_path / "zen.txt"], gptext.get_tokenizer("gpt2"))
    expected = train.perplexity(GPT.from_pretrained(tmp_path / "ckpt"), ids)
    for result in results:
        assert result["loss"] == pytest.approx(expected["loss"], rel=1e-6) and result["tokens"] == ids.numel() - 1
        assert (result["context"], result["stride"]) == (32, 16)
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "zen.txt"), "--json",
                 "--autocast", "bf16"]) == 0
    mixed = json.loads(capsys.readouterr().out)
    assert mixed["autocast"] == "bfloat16" and mixed["loss"] != expected["loss"]
    assert mixed["loss"] == pytest.approx(expected["loss"], rel=1e-2)  # bf16 products, float32 weights
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "zen.txt"), "--context", "8",
                 "--stride", "8"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and f"over {ids.numel() - 1:,} predicted tokens" in out and "windows of 8" in out
    assert main(["eval", "--model", str(tmp_path / "ckpt"), "--data", str(tmp_path / "zen.txt"), "--context",
                 "64"]) == 2
    assert "longer than the model's context_length 32" in capsys.readouterr().err
