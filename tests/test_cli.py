"""The command line: python -m gptext info | generate (with the shipped GPT-2 vocabulary or a
checkpoint's tokenizer.json)."""

import subprocess
import sys

import pytest
import torch

import gptext
from gptext import GPT, GPTConfig


def run(*args):
    return subprocess.run([sys.executable, "-m", "gptext", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt")
    GPT(GPTConfig(n_embd=32, n_head=2, n_layer=2, context_length=64)).save_pretrained(path)
    return path


def test_info():
    out = run("info")
    assert out.returncode == 0, out.stderr
    assert f"gptext {gptext.__version__}" in out.stdout and "cpu: compiled kernels" in out.stdout


def test_generate_greedy_matches_the_api(checkpoint):
    out = run("generate", "--model", str(checkpoint), "--prompt", "Hello, I am", "--max-new-tokens", "12",
              "--temperature", "0", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    model = GPT.from_pretrained(checkpoint)
    tok = gptext.get_tokenizer()
    ids = model.generate(torch.tensor([tok.encode("Hello, I am")]), max_new_tokens=12, temperature=0)[0]
    assert out.stdout == tok.decode(ids.tolist()) + "\n"
    assert "12 tokens in" in out.stderr and "tokens/s" in out.stderr


def test_generate_seeded_sampling_is_reproducible(checkpoint):
    args = ("generate", "--model", str(checkpoint), "--prompt", "The", "--max-new-tokens", "8", "--seed", "3",
            "--top-k", "50", "--top-p", "0.9", "--ignore-eos")
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout


def test_generate_errors(checkpoint, tmp_path):
    out = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x")
    assert out.returncode == 2 and "neither a checkpoint directory nor a preset" in out.stderr
    out = run("generate", "--model", "gpt-oss-120b", "--prompt", "x")  # 467 GB of fp32 weights
    assert out.returncode == 2 and "116.8B parameters need 467 GB" in out.stderr
    out = run("generate", "--model", str(checkpoint), "--prompt", "x", "--max-new-tokens", "100")
    assert out.returncode == 2 and "context_length" in out.stderr and out.stdout == ""
    (tmp_path / "config.json").write_text("{}")
    out = run("generate", "--model", str(tmp_path), "--prompt", "x")
    assert out.returncode == 2 and "model_type" in out.stderr and "Traceback" not in out.stderr


def test_generate_reads_the_checkpoints_tokenizer_json(tmp_path):
    # A gpt-oss checkpoint: generate refuses it without a tokenizer.json (gptext ships GPT-2's
    # vocabulary only), and with one (here GPT-2's, converted by transformers) reads it.
    from transformers.convert_slow_tokenizer import TikTokenConverter

    from gptext import tokenizer

    torch.manual_seed(0)
    cfg = GPTConfig.preset("gpt-oss-20b", vocab_size=50304, context_length=64, n_embd=32, n_layer=2, n_head=4,
                           n_kv_head=2, head_width=8, n_experts=4, experts_per_token=2, expert_width=16)
    GPT(cfg).save_pretrained(tmp_path)
    out = run("generate", "--model", str(tmp_path), "--prompt", "x")
    assert out.returncode == 2 and "no tokenizer.json" in out.stderr and "Traceback" not in out.stderr
    TikTokenConverter(vocab_file=str(tokenizer.DATA / "gpt2.tiktoken"), pattern=tokenizer.GPT2_PATTERN,
                      extra_special_tokens=["<|endoftext|>"]).converted().save(str(tmp_path / "tokenizer.json"))
    out = run("generate", "--model", str(tmp_path), "--prompt", "Hello, I am", "--max-new-tokens", "6",
              "--temperature", "0", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    tok = gptext.get_tokenizer(tmp_path)
    ids = GPT.from_pretrained(tmp_path).generate(torch.tensor([tok.encode("Hello, I am")]), max_new_tokens=6,
                                                 temperature=0)[0]
    assert out.stdout == tok.decode(ids.tolist()) + "\n"
    # generation_config.json's end tokens (a list, as gpt-oss's): the third token ends it.
    prompt_len = len(tok.encode("Hello, I am"))
    (tmp_path / "generation_config.json").write_text(f'{{"eos_token_id": [50300, {int(ids[prompt_len + 2])}]}}')
    out = run("generate", "--model", str(tmp_path), "--prompt", "Hello, I am", "--max-new-tokens", "6",
              "--temperature", "0")
    assert out.returncode == 0, out.stderr
    assert out.stdout == tok.decode(ids[:prompt_len + 2].tolist()) + "\n" and "3 tokens in" in out.stderr


def test_help():
    out = run("generate", "--help")
    assert out.returncode == 0 and "--max-new-tokens" in out.stdout and "--top-p" in out.stdout
