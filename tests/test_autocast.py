"""gptext's ops and models under torch.autocast: products in the region's dtype, norms in
the widest of their arguments' (float32 weights keep the stream in float32), gradients
reaching float32 weights; mixed-precision training (TrainConfig.autocast)."""

import functools

import pytest
import torch

import gptext
from gptext import GPT, GPTConfig, ops, train

from conftest import DEVICES, assert_close

BF16 = torch.bfloat16


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def _autocast(device="cpu"):
    return torch.autocast(device, dtype=BF16)


def _randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


@pytest.fixture(params=["kernels", "reference"])
def backend(request):
    with gptext.backend(request.param):
        yield request.param


def test_products_run_in_the_regions_dtype(backend, device):
    randn = functools.partial(_randn, device=device)
    x, w, b, r = randn(5, 24), randn(40, 24, seed=1), randn(40, seed=2), randn(5, 40, seed=3)
    with _autocast(device):
        out = ops.linear(x, w, b, "gelu")
        added = ops.linear(x, w, b, "gelu", residual=r)
        mlp = ops.ffn(x, randn(96, 24, seed=4), randn(96, seed=5), randn(24, 96, seed=6), randn(24, seed=7),
                      residual=x)
    expected = ops.linear(x.to(BF16), w.to(BF16), b.to(BF16), "gelu")
    assert out.dtype == BF16 and torch.equal(out, expected)
    # A float32 residual is added to the bf16 product in float32, as F.linear(...) + r would be.
    assert added.dtype == torch.float32 and torch.equal(added, expected + r)
    ref_mlp = ops.ffn(x.to(BF16), *(t.to(BF16) for t in (randn(96, 24, seed=4), randn(96, seed=5),
                                                         randn(24, 96, seed=6), randn(24, seed=7))))
    assert mlp.dtype == torch.float32 and torch.equal(mlp, ref_mlp + x)
    q, k, v, sinks = randn(1, 4, 6, 64), randn(1, 2, 6, 64, seed=1), randn(1, 2, 6, 64, seed=2), randn(4, seed=3)
    with _autocast(device):
        att = ops.attention(q, k, v, window=3, sinks=sinks)
    assert att.dtype == BF16 and torch.equal(att, ops.attention(q.to(BF16), k.to(BF16), v.to(BF16), window=3,
                                                                sinks=sinks))
    xe, we, be = randn(3, 16), randn(4, 8, 16, seed=1), randn(4, 8, seed=2)
    experts = torch.tensor([[0, 3], [1, 1], [2, 0]], device=device)
    with _autocast(device):
        moe = ops.expert_linear(xe, we, be, experts, "swiglu")
    assert moe.dtype == BF16 and torch.equal(moe, ops.expert_linear(xe.to(BF16), we.to(BF16), be.to(BF16), experts,
                                                                    "swiglu"))


def test_norms_run_in_the_widest_dtype(backend, device):
    randn = functools.partial(_randn, device=device)
    x, r, w, b = randn(4, 32, dtype=BF16), randn(4, 32, seed=1), randn(32, seed=2), randn(32, seed=3)
    with _autocast(device):
        normed, stream = ops.layernorm_residual(x, r, w, b)
        rms, rms_stream = ops.rmsnorm_residual(x, r, w)
        alone = ops.layernorm(x, w, b)
        same = ops.rmsnorm(x, w.to(BF16))  # all bf16: stays bf16
    expected = ops.layernorm_residual(x.float(), r, w, b)
    assert normed.dtype == stream.dtype == torch.float32
    assert torch.equal(normed, expected[0]) and torch.equal(stream, expected[1])
    assert all(torch.equal(a, e) for a, e in zip((rms, rms_stream), ops.rmsnorm_residual(x.float(), r, w)))
    assert alone.dtype == torch.float32 and torch.equal(alone, ops.layernorm(x.float(), w, b))
    assert same.dtype == BF16 and torch.equal(same, ops.rmsnorm(x, w.to(BF16)))


def test_softmax_and_rope_keep_their_dtype(backend, device):
    randn = functools.partial(_randn, device=device)
    s, x, cos, sin = randn(2, 5, 5), randn(1, 2, 5, 8, dtype=BF16), randn(1, 5, 4, seed=1), randn(1, 5, 4, seed=2)
    with _autocast(device):
        p, rotated = ops.softmax(s, causal=True), ops.rope(x, cos, sin)
    assert p.dtype == torch.float32 and torch.equal(p, ops.softmax(s, causal=True))
    assert rotated.dtype == BF16 and torch.equal(rotated, ops.rope(x, cos, sin))


def test_outside_a_region_nothing_is_cast(backend):
    x, w = _randn(3, 8), _randn(4, 8, seed=1)
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        assert ops.linear(x, w).dtype == torch.float32
    with _autocast():
        pass
    assert ops.linear(x, w).dtype == torch.float32  # the region is over


def test_a_region_of_another_device_type_casts_nothing(device):
    # A CPU region leaves CUDA tensors alone, and the ops on CPU tensors see only CPU regions.
    other = "cuda" if device == "cpu" else "cpu"
    x, w = _randn(3, 8, device=device), _randn(4, 8, seed=1, device=device)
    if other == "cuda" and not torch.cuda.is_available():
        pytest.skip("a CUDA autocast region needs CUDA")
    with torch.autocast(other, dtype=BF16):
        assert ops.linear(x, w).dtype == torch.float32


def test_gradients_reach_float32_weights(backend, device):
    x, w, b = _randn(6, 16, device=device), _randn(12, 16, seed=1, device=device), _randn(12, seed=2, device=device)
    grads = []
    for cast in (False, True):
        wp, bp = w.clone().requires_grad_(), b.clone().requires_grad_()
        if cast:  # by hand: the same bf16 products, then back
            out = ops.linear(x.to(BF16), wp.to(BF16), bp.to(BF16), "gelu")
        else:
            with _autocast(device):
                out = ops.linear(x, wp, bp, "gelu")
        out.float().square().sum().backward()
        grads.append((wp.grad, bp.grad))
    for auto, hand in zip(*grads):
        assert auto.dtype == torch.float32 and torch.equal(auto, hand)


def _gpt2(device="cpu"):
    torch.manual_seed(0)  # head_dim 64, which CUDA's fused attention takes
    return GPT(GPTConfig(vocab_size=97, context_length=32, n_embd=128, n_layer=2, n_head=2)).to(device).eval()


def _relative_error(a, b):
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def test_gpt2_under_autocast_matches_transformers_under_autocast(backend, device, tmp_path):
    transformers = pytest.importorskip("transformers")
    model = _gpt2(device)
    model.save_pretrained(tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).to(device).eval()
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        full = model(idx)
        with _autocast(device):
            ours, theirs = model(idx), hf(idx).logits
    assert ours.dtype == BF16 and all(p.dtype == torch.float32 for p in model.parameters())
    # Both round the products to bf16; each is as far from the float32 logits as the other.
    assert _relative_error(ours, full) < 2e-2 and _relative_error(theirs, full) < 2e-2
    assert _relative_error(ours, theirs) < 2e-2


def test_gpt_oss_under_autocast(device):
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt-oss-20b", vocab_size=97, context_length=32, n_embd=128, n_layer=2, n_head=4,
                                 n_kv_head=2, head_width=64, n_experts=4, experts_per_token=2, expert_width=32,
                                 sliding_window=8)).to(device).eval()
    idx = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        full = model(idx)
        with _autocast(device):
            mixed = model(idx)
    assert mixed.dtype == BF16 and _relative_error(mixed, full) < 3e-2


def test_generation_under_autocast(device):
    model = _gpt2(device)
    idx = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(1)).to(device)
    with _autocast(device):
        out = model.generate(idx, max_new_tokens=6, temperature=0)  # on CUDA, through the captured decode graph
        logits = model(out[:, :-1])
    # Each greedy token is the argmax of the autocast logits before it, up to bf16 near-ties.
    agree = (logits[:, 7:].argmax(-1) == out[:, 8:]).float().mean()
    assert out.shape == (2, 14) and torch.equal(out[:, :8], idx) and agree >= 0.8


def test_mixed_precision_training(device):
    g = torch.Generator().manual_seed(1)
    data = train.TokenData(torch.randint(0, 97, (23,), generator=g).repeat(90), context=16, val_fraction=0.1)
    model = _gpt2(device)
    config = train.TrainConfig(steps=30, batch_size=4, lr=3e-3, eval_every=10, log_every=0, autocast="bfloat16")
    history = train.train(model, data, config, log=None)
    losses = [r["loss"] for r in history if "loss" in r]
    held = [r["val_loss"] for r in history if "val_loss" in r]
    assert losses[-1] < 0.5 * losses[0] and held[-1] < 0.5 * held[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    with pytest.raises(ValueError, match="autocast must be None or 'bfloat16'"):
        train.TrainConfig(autocast="float16")
    with pytest.raises(ValueError, match="keeps float32 weights.*torch.bfloat16: load it in float32"):
        train.train(_gpt2(device).to(BF16), data, train.TrainConfig(steps=1, autocast="bfloat16"), log=None)


def test_cli_trains_under_autocast(tmp_path, capsys):
    import json

    from gptext.__main__ import main
    from gptext.demo import corpus

    (tmp_path / "zen.txt").write_text(corpus(), encoding="utf-8")
    args = ["train", "--model", "gpt2-124m", "--set", "n_layer=1", "--set", "n_embd=32", "--set", "n_head=2",
            "--set", "context_length=16", "--data", str(tmp_path / "zen.txt"), "--steps", "2", "--eval-every", "0"]
    assert main([*args, "--out", str(tmp_path / "run"), "--autocast", "bf16"]) == 0
    assert "float32 under bfloat16 autocast" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "training.json").read_text())["config"]["autocast"] == "bfloat16"
    with pytest.raises(SystemExit):
        main([*args, "--out", str(tmp_path / "other"), "--autocast", "fp16"])
    assert "give bf16 or none" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "other"), "--autocast", "bf16", "--dtype", "bf16"]) == 2
    assert "load it in float32" in capsys.readouterr().err


def test_autocast_under_torch_compile():
    x, w, b = _randn(4, 16), _randn(8, 16, seed=1), _randn(8, seed=2)

    @torch.compile(backend="eager", fullgraph=True)
    def f(x, w, b):
        with _autocast():
            return ops.linear(x, w, b, "gelu")

    out = f(x, w, b)
    assert out.dtype == BF16
    assert_close(out, ops.linear(x.to(BF16), w.to(BF16), b.to(BF16), "gelu"))
