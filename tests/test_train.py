"""gptext.train (AdamW with warmup and cosine decay, clipping, accumulation, held-out loss)
and python -m gptext train, which fine-tunes a checkpoint or trains a preset from scratch."""

import functools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import gptext
from gptext import GPT, GPTConfig, train

from conftest import assert_close


def _gpt2(**overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{"vocab_size": 97, "context_length": 32, "n_embd": 32, "n_layer": 2, "n_head": 2,
                            **overrides}))


def _oss():
    torch.manual_seed(0)
    return GPT(GPTConfig.preset("gpt-oss-20b", vocab_size=97, context_length=32, n_embd=32, n_layer=2, n_head=4,
                                n_kv_head=2, head_width=8, n_experts=4, experts_per_token=2, expert_width=16,
                                sliding_window=8))


def _pattern(tokens=2000, period=23, vocab=97):
    """A stream that repeats a random sequence: learnable far below its initial loss."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (period,), generator=g).repeat(tokens // period + 1)[:tokens]


def test_learning_rate_warms_up_then_decays_on_a_cosine():
    cfg = train.TrainConfig(steps=101, lr=1e-3, min_lr=1e-4, warmup=10)
    assert cfg.learning_rate(0) == pytest.approx(1e-4) and cfg.learning_rate(9) == pytest.approx(1e-3)
    assert cfg.learning_rate(10) == pytest.approx(1e-3) and cfg.learning_rate(100) == pytest.approx(1e-4)
    assert cfg.learning_rate(55) == pytest.approx(5.5e-4)  # half way down the cosine
    decay = [cfg.learning_rate(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    # Defaults: a tenth of the steps warm up (at most 100), the decay ends at lr / 10.
    assert train.TrainConfig(steps=50).warmup_steps == 5 and train.TrainConfig(steps=5000).warmup_steps == 100
    assert train.TrainConfig(steps=20, lr=1.0).learning_rate(19) == pytest.approx(0.1)
    assert train.TrainConfig(steps=1, lr=1.0).learning_rate(0) == 1.0  # one step: no warmup, no decay


@pytest.mark.parametrize("field, value, match", [
    ("steps", 0, "steps"), ("batch_size", 0, "batch_size"), ("accumulate", 0, "accumulate"), ("lr", 0.0, "lr"),
    ("lr", math.nan, "lr"), ("min_lr", 1.0, "min_lr"), ("warmup", 11, "warmup"), ("weight_decay", -1.0, "weight_decay"),
    ("eval_every", -1, "eval_every")])
def test_config_rejects_bad_values(field, value, match):
    with pytest.raises(ValueError, match=match):
        train.TrainConfig(**{"steps": 10, field: value})


def test_token_data_windows():
    data = train.TokenData(torch.arange(1000), context=16, val_fraction=0.1)
    assert data.train.size == 900 and data.val.size == 100 and len(data) == 1000
    x, y = data.sample(64, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 16) and torch.equal(y, x + 1)  # targets: the next token
    assert int(y.max()) < 900  # training windows never reach the held-out tokens
    held = data.held_out(2, 4)
    assert [b[0].shape for b in held] == [(4, 16), (4, 16)]
    starts = torch.cat([b[0][:, 0] for b in held])
    assert int(starts.min()) == 900 and int(held[-1][1].max()) == 999  # evenly over all of the held-out part
    assert all(torch.equal(a[0], b[0]) for a, b in zip(held, data.held_out(2, 4)))  # the same windows every time
    assert train.TokenData(torch.arange(100), context=16, val_fraction=0.0).held_out(2, 4) == []
    assert train.TokenData(torch.arange(100), context=16, val_fraction=0.01).val.size == 17  # one whole window
    with pytest.raises(ValueError, match="too few"):
        train.TokenData(torch.arange(30), context=16, val_fraction=0.1)
    with pytest.raises(ValueError, match="1-d"):
        train.TokenData(torch.zeros(4, 4, dtype=torch.long), context=2)
    with pytest.raises(ValueError, match="negative"):
        train.TokenData(torch.tensor([1, -2, 3, 4]), context=2, val_fraction=0.0)
    with pytest.raises(ValueError, match="below 2\\*\\*32"):
        train.TokenData(torch.tensor([1, 2 ** 32, 3, 4]), context=2, val_fraction=0.0)
    with pytest.raises(ValueError, match="1-d tensor or numpy array"):
        train.TokenData(np.arange(10.0), context=2)
    # A numpy array is read in place, with the tensor's windows.
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a, b = train.TokenData(torch.arange(1000), 16).sample(8, g1), train.TokenData(np.arange(1000), 16).sample(8, g2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_tokenize_joins_files_with_endoftext(tmp_path):
    tok = gptext.get_tokenizer("gpt2")
    (tmp_path / "a.txt").write_text("Hello there.", encoding="utf-8")
    (tmp_path / "b.txt").write_text("Literal <|endoftext|> is text.", encoding="utf-8")
    ids = train.tokenize([tmp_path / "a.txt", tmp_path / "b.txt"], tok).tolist()
    eot = tok.encode_single_token("<|endoftext|>")
    assert ids.count(eot) == 1 and tok.decode(ids) == "Hello there.<|endoftext|>Literal <|endoftext|> is text."
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train.tokenize([tmp_path / "missing.txt"], tok)
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ValueError, match="bad.txt: not UTF-8"):
        train.tokenize([tmp_path / "bad.txt"], tok)


@pytest.mark.parametrize("make", [_gpt2, _oss])
def test_parameter_groups(make):
    model = make()
    decayed, plain = train.parameter_groups(model, 0.1)
    ids = [id(p) for p in decayed["params"] + plain["params"]]
    assert sorted(ids) == sorted({id(p) for p in model.parameters()})  # each once (a tied head too)
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    if model.config.arch != "gpt2":
        attn = model.model.layers[0].self_attn
        assert any(p is attn.sinks for p in plain["params"])
        assert any(p is model.model.layers[0].mlp.experts.gate_up_proj for p in decayed["params"])


@pytest.mark.parametrize("batch, accumulate", [(2, 2), (1, 4)])
def test_accumulation_takes_the_same_step(batch, accumulate):
    data = train.TokenData(_pattern(), context=16, val_fraction=0.0)
    whole, split = _gpt2(), _gpt2()
    common = dict(steps=2, lr=1e-2, warmup=0, log_every=0, eval_every=0)
    train.train(whole, data, train.TrainConfig(batch_size=4, **common), log=None)
    train.train(split, data, train.TrainConfig(batch_size=batch, accumulate=accumulate, **common), log=None)
    for a, b in zip(whole.parameters(), split.parameters()):
        assert_close(b, a, scale=20)


@pytest.mark.parametrize("make", [_gpt2, _oss])
def test_training_lowers_the_loss(kernels, make):
    model = make()
    data = train.TokenData(_pattern(), context=32, val_fraction=0.1)
    saved, lines = [], []
    history = train.train(model, data, train.TrainConfig(steps=60, batch_size=8, lr=1e-2, eval_every=20,
                                                         eval_batches=2, log_every=20),
                          log=lines.append, checkpoint=lambda state: saved.append((state.step, len(state.history))),
                          save_every=25)
    assert history[0]["step"] == 0 and set(history[0]) == {"step", "val_loss"}
    steps = history[1:]
    assert [r["step"] for r in steps] == list(range(1, 61))
    assert set(steps[0]) == {"step", "loss", "lr", "grad_norm", "tokens_per_s"}
    assert [r["step"] for r in steps if "val_loss" in r] == [20, 40, 60]
    assert steps[-1]["loss"] < 0.3 * steps[0]["loss"] and steps[-1]["val_loss"] < 0.3 * history[0]["val_loss"]
    assert all(math.isfinite(r["grad_norm"]) and r["tokens_per_s"] > 0 for r in steps)
    assert saved == [(25, 26), (50, 51), (60, 61)]  # every save_every steps, then the last
    assert lines[0].startswith("step      0  val loss") and "val loss" in lines[-1] and len(lines) == 5
    assert not model.training  # handed back in eval mode


def test_training_is_reproducible():
    data = train.TokenData(_pattern(), context=16, val_fraction=0.0)
    cfg = train.TrainConfig(steps=5, batch_size=4, lr=1e-2, log_every=0, seed=7)
    first = [r["loss"] for r in train.train(_gpt2(), data, cfg, log=None)]
    assert first == [r["loss"] for r in train.train(_gpt2(), data, cfg, log=None)]
    other = train.TrainConfig(steps=5, batch_size=4, lr=1e-2, log_every=0, seed=8)
    assert first != [r["loss"] for r in train.train(_gpt2(), data, other, log=None)]


@pytest.mark.parametrize("make", [functools.partial(_gpt2, dropout=0.1), _oss])
def test_activation_checkpointing_takes_the_same_steps(make):
    data = train.TokenData(_pattern(), context=16, val_fraction=0.1)
    common = dict(steps=3, batch_size=4, lr=1e-2, eval_every=2, eval_batches=1, log_every=0)
    plain, recomputed = make(), make()
    torch.manual_seed(3)
    expected = train.train(plain, data, train.TrainConfig(**common), log=None)
    torch.manual_seed(3)
    history = train.train(recomputed, data, train.TrainConfig(activation_checkpointing=True, **common), log=None)
    strip = lambda h: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in h]  # noqa: E731
    assert strip(history) == strip(expected)
    for (name, a), b in zip(plain.state_dict().items(), recomputed.state_dict().values()):
        assert torch.equal(a, b), name
    assert recomputed.activation_checkpointing is False  # the model's own setting, handed back


def test_training_errors():
    model = _gpt2()
    data = train.TokenData(_pattern(), context=16, val_fraction=0.0)
    with pytest.raises(ValueError, match="context 64 is longer than the model's context_length 32"):
        train.train(model, train.TokenData(_pattern(), context=64), train.TrainConfig(steps=1), log=None)
    with pytest.raises(ValueError, match="token id 200, beyond the model's vocabulary of 97"):
        train.train(model, train.TokenData(torch.tensor([200] * 40), context=16, val_fraction=0.0),
                    train.TrainConfig(steps=1), log=None)
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="training loss is nan at step 1"):
        train.train(model, data, train.TrainConfig(steps=3, batch_size=2), log=None)


class _Stop(Exception):
    pass


def _stopped_at(model, data, cfg, step, directory):
    """Trains until `step`, saves the weights and the state there as a run that stops would,
    and returns the state's path."""
    def checkpoint(state):
        if state.step == step:
            model.save_pretrained(directory)
            state.save(directory / "state.pt")
            raise _Stop
    with pytest.raises(_Stop):
        train.train(model, data, cfg, log=None, checkpoint=checkpoint, save_every=1)
    return directory / "state.pt"


@pytest.mark.parametrize("make", [functools.partial(_gpt2, dropout=0.1), _oss])
def test_a_resumed_run_takes_the_steps_of_an_uninterrupted_one(make, tmp_path):
    data = train.TokenData(_pattern(), context=16, val_fraction=0.1)
    cfg = train.TrainConfig(steps=8, batch_size=4, lr=1e-2, eval_every=3, eval_batches=2, log_every=0)
    whole = make()
    expected = train.train(whole, data, cfg, log=None)
    state = train.TrainState.load(_stopped_at(make(), data, cfg, 5, tmp_path))
    assert state.step == 5 and [r["step"] for r in state.history] == list(range(6))
    lines = []
    resumed = GPT.from_pretrained(tmp_path)
    history = train.train(resumed, data, cfg, log=lines.append, resume=state)
    assert lines[0] == "resumed at step 5 of 8"
    # Bit for bit: the same batches, dropout masks and AdamW moments as if it had not stopped.
    strip = [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in expected]
    assert [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in history] == strip
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_refuses_what_is_not_its_own(tmp_path):
    data = train.TokenData(_pattern(), context=16, val_fraction=0.1)
    cfg = train.TrainConfig(steps=6, batch_size=2, lr=1e-2, eval_every=0, log_every=0)
    state = train.TrainState.load(_stopped_at(_gpt2(), data, cfg, 3, tmp_path))

    def resume(model=None, data=data, cfg=cfg):
        train.train(model or GPT.from_pretrained(tmp_path), data, cfg, log=None, resume=state)

    with pytest.raises(ValueError, match="at step 3, and config.steps is 3: nothing is left"):
        resume(cfg=train.TrainConfig(steps=3, batch_size=2, eval_every=0))
    with pytest.raises(ValueError, match="the data differs"):
        resume(data=train.TokenData(_pattern(period=19), context=16, val_fraction=0.1))
    with pytest.raises(ValueError, match="the data differs"):  # the same tokens, split otherwise
        resume(data=train.TokenData(_pattern(), context=16, val_fraction=0.2))
    with pytest.raises(ValueError, match="not those the run to resume saved at step 3"):
        resume(model=_gpt2())  # the weights of step 0
    with pytest.raises(ValueError, match="not those the run to resume saved"):
        resume(model=GPT.from_pretrained(tmp_path, dtype=torch.bfloat16))
    resume(cfg=train.TrainConfig(steps=4, batch_size=2, lr=1e-3, weight_decay=0.0, eval_every=0, log_every=0))


def test_train_state_files(tmp_path):
    data = train.TokenData(_pattern(), context=16, val_fraction=0.0)
    path = _stopped_at(_gpt2(), data, train.TrainConfig(steps=4, batch_size=2, log_every=0), 2, tmp_path)
    state = train.TrainState.load(path)
    assert state.data == data.fingerprint() and set(state.rng) == {"cpu"}
    assert state.optimizer["param_groups"][1]["weight_decay"] == 0.0
    with pytest.raises(FileNotFoundError, match="no such file"):
        train.TrainState.load(tmp_path / "missing.pt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="unreadable"):
        train.TrainState.load(path)
    torch.save({"step": 1}, path)
    with pytest.raises(ValueError, match="not a gptext training state"):
        train.TrainState.load(path)
    torch.save({"format": "gptext.TrainState/1", **{k: getattr(state, k) for k in state._FIELDS}}, path)
    with pytest.raises(ValueError, match="written by an earlier gptext"):
        train.TrainState.load(path)
    torch.save({"format": train.TRAIN_STATE_FORMAT, "step": 1, "history": []}, path)
    with pytest.raises(ValueError, match="missing optimizer, generator, data, weights, rng"):
        train.TrainState.load(path)
    torch.save({"format": train.TRAIN_STATE_FORMAT, **{k: getattr(state, k) for k in state._FIELDS}, "step": "2"},
               path)
    with pytest.raises(ValueError, match="wrong type"):
        train.TrainState.load(path)
    torch.save({"format": train.TRAIN_STATE_FORMAT, **{k: getattr(state, k) for k in state._FIELDS},
                "history": [_Stop()]}, path)  # an object to unpickle: refused, never run
    with pytest.raises(ValueError, match="unreadable"):
        train.TrainState.load(path)


# ---- the command line -------------------------------------------------------------------

def run(*args):
    return subprocess.run([sys.executable, "-m", "gptext", "train", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from gptext.demo import corpus as zen

    path = tmp_path_factory.mktemp("text") / "zen.txt"
    path.write_text(zen() * 3, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    GPT(GPTConfig(n_embd=32, n_head=2, n_layer=2, context_length=64)).save_pretrained(path)
    (path / "generation_config.json").write_text('{"eos_token_id": 50256}\n')
    return path


def test_cli_fine_tunes_a_checkpoint(checkpoint, corpus, tmp_path):
    out = tmp_path / "tuned"
    args = ["--model", str(checkpoint), "--data", str(corpus), "--out", str(out), "--steps", "12", "--batch-size", "4",
            "--context", "32", "--lr", "3e-3", "--eval-every", "6", "--log-every", "6", "--seed", "3"]
    result = run(*args)
    assert result.returncode == 0, result.stderr
    assert "held-out loss" in result.stdout and f"wrote {out} (step 12)" in result.stdout
    assert (out / "generation_config.json").read_text() == '{"eos_token_id": 50256}\n'  # copied beside the weights
    log = json.loads((out / "training.json").read_text())
    assert log["step"] == 12 and log["config"]["lr"] == 3e-3 and len(log["history"]) == 13
    # The same training through the API, in this process, ends at the same weights.
    model = GPT.from_pretrained(checkpoint)
    data = train.TokenData(train.tokenize([corpus], gptext.get_tokenizer("gpt2")), 32, 0.1)
    history = train.train(model, data, train.TrainConfig(steps=12, batch_size=4, lr=3e-3, eval_every=6, log_every=0,
                                                         seed=3), log=None)
    assert [r.get("loss") for r in history] == pytest.approx([r.get("loss") for r in log["history"]])
    tuned = GPT.from_pretrained(out)
    for (name, a), b in zip(model.state_dict().items(), tuned.state_dict().values()):
        assert_close(b, a, msg=name)
    generated = subprocess.run([sys.executable, "-m", "gptext", "generate", "--model", str(out),
                                "--prompt", "Beautiful", "--max-new-tokens", "4", "--temperature", "0"],
                               capture_output=True, text=True)
    assert generated.returncode == 0, generated.stderr


def test_cli_trains_a_preset_from_scratch(corpus, tmp_path):
    out = tmp_path / "scratch"
    result = run("--model", "gpt2-124m", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2",
                 "--set", "context_length=16", "--data", str(corpus), "--out", str(out), "--steps", "3",
                 "--eval-every", "0")
    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stdout and "held-out" not in result.stdout
    cfg = GPT.from_pretrained(out).config
    assert (cfg.n_layer, cfg.n_embd, cfg.context_length, cfg.vocab_size) == (1, 32, 16, 50257)


def test_cli_errors(checkpoint, corpus, tmp_path, capsys):
    from gptext.__main__ import main  # in this process: each case fails before any training

    def fails(*args):
        code = main(["train", *args])
        return code, capsys.readouterr().err

    base = ["--data", str(corpus), "--out", str(tmp_path / "out"), "--steps", "1"]
    cases = [
        (["--model", str(checkpoint), "--set", "n_layer=1"], "--set changes a preset"),
        (["--model", "gpt2-124m", "--set", "n_layers=1"], "KEY a GPTConfig field"),
        (["--model", "gpt2-124m", "--set", "n_layer=two"], "does not read as int"),
        (["--model", str(tmp_path / "missing")], "neither a checkpoint directory nor a preset"),
        (["--model", str(checkpoint), "--context", "65"], "longer than the model's context_length 64"),
        (["--model", "gpt-oss-20b", "--set", "n_layer=1", "--set", "n_experts=2", "--set", "experts_per_token=1",
          "--set", "n_embd=32", "--set", "expert_width=16", "--set", "n_head=4", "--set", "n_kv_head=2",
          "--set", "head_width=8", "--set", "vocab_size=1000"], "no tokenizer.json"),
        (["--model", str(checkpoint), "--steps", "0"], "steps must be at least 1"),
    ]
    for extra, message in cases:
        code, err = fails(*base, *extra)
        assert code == 2 and message in err, (extra, err)
    code, err = fails("--model", str(checkpoint), "--data", str(tmp_path / "none.txt"), "--out", str(tmp_path / "o"))
    assert code == 2 and "none.txt: no such file" in err
    (tmp_path / "short.txt").write_text("Too short.")
    code, err = fails("--model", str(checkpoint), "--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "o"))
    assert code == 2 and "too few" in err
    (tmp_path / "file").write_text("")
    code, err = fails("--model", str(checkpoint), "--data", str(corpus), "--out", str(tmp_path / "file"))
    assert code == 2 and "is not a directory" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()  # nothing written


def test_cli_resumes_a_run(corpus, tmp_path, capsys):
    from gptext.__main__ import main  # in this process: the runs are a few steps of a tiny model

    preset = ["--model", "gpt2-124m", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2",
              "--set", "context_length=16", "--data", str(corpus)]
    # A constant learning rate, so that a run of 4 steps is the first half of a run of 8.
    flags = ["--batch-size", "2", "--lr", "1e-3", "--min-lr", "1e-3", "--warmup", "0", "--eval-every", "3",
             "--log-every", "0"]
    assert main(["train", *preset, *flags, "--out", str(tmp_path / "whole"), "--steps", "8"]) == 0
    assert main(["train", *preset, *flags, "--out", str(tmp_path / "run"), "--steps", "4"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", str(tmp_path / "run"), "--resume", "--steps", "8"]) == 0
    out = capsys.readouterr().out
    assert "resumed at step 4" in out and f"wrote {tmp_path / 'run'} (step 8)" in out and "trained 4 steps" in out
    whole, run = (json.loads((tmp_path / name / "training.json").read_text()) for name in ("whole", "run"))
    assert run["step"] == 8 and run["config"] == whole["config"] and run["set"] == whole["set"]
    assert [r.get("loss") for r in run["history"]] == [r.get("loss") for r in whole["history"]]
    # The stopped run also measured the held-out loss at its last step, 4.
    held = {r["step"]: r["val_loss"] for r in run["history"] if "val_loss" in r}
    assert held == {4: held[4], **{r["step"]: r["val_loss"] for r in whole["history"] if "val_loss" in r}}
    a, b = GPT.from_pretrained(tmp_path / "whole"), GPT.from_pretrained(tmp_path / "run")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name

    def fails(*args):
        code = main(["train", *args])
        return code, capsys.readouterr().err

    again = ["--out", str(tmp_path / "run"), "--resume"]
    code, err = fails(*again)
    assert code == 2 and "at step 8, and config.steps is 8: nothing is left to train" in err
    code, err = fails(*again, "--steps", "9", "--model", "gpt2-124m", "--seed", "1", "--context", "8")
    assert code == 2 and "with its own --model, --context, --seed: leave them out" in err
    code, err = fails("--out", str(tmp_path / "none"), "--resume")
    assert code == 2 and "holds no run to resume" in err and not (tmp_path / "none").exists()
    code, err = fails("--out", str(tmp_path / "none"))
    assert code == 2 and "train needs --model and --data" in err
    (tmp_path / "other.txt").write_text(corpus.read_text()[::-1])
    code, err = fails(*again, "--steps", "9", "--data", str(tmp_path / "other.txt"))
    assert code == 2 and "the data differs" in err
    # A run written before TrainConfig had activation_checkpointing resumes with it off;
    # --activation-checkpointing turns it on from there.
    log = json.loads((tmp_path / "run" / "training.json").read_text())
    assert log["config"].pop("activation_checkpointing") is False
    (tmp_path / "run" / "training.json").write_text(json.dumps(log))
    assert main(["train", *again, "--steps", "9", "--activation-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "activation checkpointing" in out and "resumed at step 8" in out
    assert json.loads((tmp_path / "run" / "training.json").read_text())["config"]["activation_checkpointing"]
    (tmp_path / "whole" / "training.json").write_text('{"model": "gpt2-124m"}')
    code, err = fails("--out", str(tmp_path / "whole"), "--resume", "--steps", "9")
    assert code == 2 and "training.json is malformed (KeyError" in err
