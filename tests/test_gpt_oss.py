"""The gpt-oss family: the model against Hugging Face transformers' GptOssForCausalLM (random
weights, no download) as the independent oracle, its checkpoints in and out (bf16/fp32 and
MXFP4 experts), generation with the KV cache, training, and the config's checks."""

import dataclasses
import json

import pytest
import torch

import gptext
from gptext import GPT, GPTConfig
from gptext.model import yarn_frequencies
from gptext.weights import CheckpointError, dequantize_mxfp4

from conftest import DEVICES

transformers = pytest.importorskip("transformers")
GptOssConfig, GptOssForCausalLM = transformers.GptOssConfig, transformers.GptOssForCausalLM

VOCAB = 300


def _hf_model(layers=3, heads=8, kv_heads=2, experts=6, top_k=2, window=5, seed=0, **overrides):
    """A small random GptOssForCausalLM with YaRN scaling, whose sinks and biases are far
    from their zero start (so that a model ignoring them differs)."""
    torch.manual_seed(seed)
    rope = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
            "original_max_position_embeddings": 32, "rope_theta": 1000.0}
    # Widths are multiples of 32, MXFP4's block.
    cfg = GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16, num_local_experts=experts,
                       num_experts_per_tok=top_k, sliding_window=window, max_position_embeddings=256,
                       rope_parameters=rope, **overrides)
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "sinks" in name or "bias" in name:
                p.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    model = _hf_model()
    directory = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(directory)
    return model, directory


def _tokens(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kv_heads", [8, 2, 1])  # GQA ratios 1, 4, 8
def test_logits_match_transformers(kernels, tmp_path, kv_heads):
    hf = _hf_model(kv_heads=kv_heads)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    assert model.config.arch == "gpt-oss" and model.config.kv_heads == kv_heads
    idx = _tokens(2, 23)  # longer than the window of 5: the even layers' window matters
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=2e-5)


def test_bf16_logits_match_transformers(kernels, hf_checkpoint):
    hf, directory = hf_checkpoint
    model = GPT.from_pretrained(directory, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    idx = _tokens(2, 17)
    with torch.no_grad():
        ours, want = model(idx).float(), hf(idx).logits
    # bf16 keeps 8 bits through three layers; a wrong sink, window or rotation moves the
    # logits by about their whole size (max |logit| here is about 0.5).
    assert (ours - want).abs().max() < 0.05
    assert (ours.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_window_sinks_and_rotation_matter(kernels, hf_checkpoint):
    """The oracle test above is only as strong as the features the small model exercises:
    each of them changes its logits."""
    hf, directory = hf_checkpoint
    model = GPT.from_pretrained(directory)
    idx = _tokens(1, 23)
    with torch.no_grad():
        base = model(idx)
        variants = {}
        for layer in model.model.layers:
            layer.self_attn.window = None
        variants["window"] = model(idx)
        model = GPT.from_pretrained(directory)
        for layer in model.model.layers:
            layer.self_attn.sinks.zero_()
        variants["sinks"] = model(idx)
        model = GPT.from_pretrained(directory)
        model.rotary.concentration = 1.0
        variants["yarn concentration"] = model(idx)
    for name, logits in variants.items():
        assert (logits - base).abs().max() > 1e-3, name


def test_yarn_frequencies_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = _hf_model(layers=1).config
    inv_freq, concentration = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    cfg = GPTConfig(arch="gpt-oss", vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=8, n_kv_head=2, head_width=16,
                    n_experts=6, experts_per_token=2, expert_width=48, rope_theta=1000.0, rope_scaling_factor=8.0,
                    rope_initial_context=32)
    ours, ours_concentration = yarn_frequencies(cfg)
    torch.testing.assert_close(ours, inv_freq.float(), rtol=1e-6, atol=0)
    assert ours_concentration == pytest.approx(concentration)
    plain, one = yarn_frequencies(dataclasses.replace(cfg, rope_scaling_factor=1.0))
    assert one == 1.0 and torch.allclose(plain, 1.0 / 1000.0 ** (torch.arange(0, 16, 2) / 16))


def test_generate_matches_transformers_and_full_forward(kernels, hf_checkpoint):
    hf, directory = hf_checkpoint
    model = GPT.from_pretrained(directory)
    prompt = _tokens(2, 7)
    out = model.generate(prompt, max_new_tokens=12, temperature=0)
    want = hf.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, want)
    # The cached decode agrees with a full forward pass over each generated sequence.
    with torch.no_grad():
        assert torch.equal(model(out[:, :-1]).argmax(-1)[:, 6:], out[:, 7:])


def test_batched_left_padded_prompts(kernels, hf_checkpoint):
    _, directory = hf_checkpoint
    model = GPT.from_pretrained(directory)
    prompts = [_tokens(1, 3, seed=2)[0], _tokens(1, 9, seed=3)[0]]
    together = model.generate(prompts, max_new_tokens=8, temperature=0)
    for prompt, got in zip(prompts, together):
        alone = model.generate(prompt, max_new_tokens=8, temperature=0)
        assert torch.equal(got, alone)


def test_save_and_load_round_trip(kernels, tmp_path):
    cfg = GPTConfig.preset("gpt-oss-20b", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_kv_head=2,
                           head_width=8, n_experts=4, experts_per_token=2, expert_width=24, context_length=64,
                           qkv_bias=False)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    idx = _tokens(1, 11)
    hf = GptOssForCausalLM.from_pretrained(tmp_path).eval()
    loaded = GPT.from_pretrained(tmp_path)
    assert loaded.config == dataclasses.replace(cfg, qkv_bias=True)  # saved with zero q/k/v biases
    with torch.no_grad():
        want = model(idx)
        torch.testing.assert_close(loaded(idx), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hf(idx).logits, want, rtol=1e-4, atol=2e-5)


def test_dequantize_mxfp4():
    blocks = torch.tensor([[[0x21] + [0x00] * 15, [0xF8] + [0x77] * 15]], dtype=torch.uint8)  # (1, 2 blocks, 16)
    scales = torch.tensor([[128, 126]], dtype=torch.uint8)  # x2 and x1/2
    values = dequantize_mxfp4(blocks, scales, torch.float32)
    assert values.shape == (1, 64)
    assert values[0, :2].tolist() == [1.0, 2.0]  # codes 1 (0.5) and 2 (1.0), low nibble first, times 2
    assert values[0, 32:34].tolist() == [-0.0, -3.0]  # codes 8 (-0) and 15 (-6), times 1/2
    assert values[0, 34:].eq(3.0).all()  # code 7 (6.0) times 1/2
    with pytest.raises(CheckpointError, match="uint8"):
        dequantize_mxfp4(blocks.int(), scales)


def test_mxfp4_checkpoint_matches_transformers(kernels, hf_checkpoint, tmp_path):
    """A checkpoint whose experts are MXFP4 blocks and scales (as OpenAI's release stores them,
    [expert, out, in]) loads to the weights Hugging Face's dequantiser gives."""
    from safetensors.torch import load_file, save_file

    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    hf, directory = hf_checkpoint
    tensors = load_file(directory / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    state = {}
    for name in list(tensors):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, rows, cols = tensors.pop(name).transpose(1, 2).shape  # [expert, out, in]
            blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
            scales = torch.randint(118, 124, (experts, rows, cols // 32), dtype=torch.uint8, generator=g)
            tensors[name + "_blocks"], tensors[name + "_scales"] = blocks, scales
            state[name] = mxfp4.convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [expert, in, out]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = GPT.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        hf.load_state_dict(state, strict=False)
        idx = _tokens(1, 13)
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=2e-5)
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj, state["model.layers.0.mlp.experts.down_proj"]
                       .transpose(1, 2))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(tie_word_embeddings=True), "tie_word_embeddings"),
    (lambda c: c["rope_parameters"].update(truncate=True), "truncated"),
    (lambda c: c.update(layer_types=["full_attention"] * 3), "layer_types"),
    (lambda c: c.update(quantization_config={"quant_method": "gptq"}), "gptq"),
    (lambda c: c.update(num_key_value_heads=3), "multiple of n_kv_head"),
    (lambda c: c.update(intermediate_size=40), "has shape"),
    (lambda c: c.update(num_hidden_layers=4, layer_types=None), "missing tensors: model.layers.3"),
    (lambda c: c.update(num_local_experts=5), r"experts\.down_proj has shape \(6, 64, 64\); the config implies "
                                              r"\(5, 64, 64\)"),
    (lambda c: c.update(model_type="llama"), "model_type is 'llama'"),
])
def test_bad_checkpoints(hf_checkpoint, tmp_path, edit, match):
    _, directory = hf_checkpoint
    config = json.loads((directory / "config.json").read_text())
    edit(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=match):
        GPT.from_pretrained(tmp_path)


# ---- OpenAI's original layout ------------------------------------------------------------

def _write_original(hf, directory, mxfp4=False, seed=7):
    """hf's weights in OpenAI's own layout (gpt_oss/torch/model.py's parameter names and
    ModelConfig's config.json): q, k, v fused into attn.qkv, experts [expert, out, in],
    norms' `scale` in fp32. With mxfp4, random MXFP4 experts replace hf's, which are loaded
    into hf as the dequantised values (returned) so that both hold the same weights."""
    from safetensors.torch import save_file

    c = hf.config
    rope = c.rope_parameters
    config = dict(num_hidden_layers=c.num_hidden_layers, num_experts=c.num_local_experts,
                  experts_per_token=c.num_experts_per_tok, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                  intermediate_size=c.intermediate_size, swiglu_limit=c.swiglu_limit, head_dim=c.head_dim,
                  num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                  sliding_window=c.sliding_window, initial_context_length=rope["original_max_position_embeddings"],
                  rope_theta=rope["rope_theta"], rope_scaling_factor=rope["factor"], rope_ntk_alpha=rope["beta_slow"],
                  rope_ntk_beta=rope["beta_fast"])
    w = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    t = {"embedding.weight": w["model.embed_tokens.weight"], "norm.scale": w["model.norm.weight"].float(),
         "unembedding.weight": w["lm_head.weight"]}
    g, replaced = torch.Generator().manual_seed(seed), {}
    for i in range(c.num_hidden_layers):
        hf_layer, ours = f"model.layers.{i}", f"block.{i}"
        a = f"{hf_layer}.self_attn"
        t |= {f"{ours}.attn.norm.scale": w[f"{hf_layer}.input_layernorm.weight"].float(),
              f"{ours}.attn.qkv.weight": torch.cat([w[f"{a}.{p}_proj.weight"] for p in "qkv"]),
              f"{ours}.attn.qkv.bias": torch.cat([w[f"{a}.{p}_proj.bias"] for p in "qkv"]),
              f"{ours}.attn.sinks": w[f"{a}.sinks"],
              f"{ours}.attn.out.weight": w[f"{a}.o_proj.weight"], f"{ours}.attn.out.bias": w[f"{a}.o_proj.bias"],
              f"{ours}.mlp.norm.scale": w[f"{hf_layer}.post_attention_layernorm.weight"].float(),
              f"{ours}.mlp.gate.weight": w[f"{hf_layer}.mlp.router.weight"],
              f"{ours}.mlp.gate.bias": w[f"{hf_layer}.mlp.router.bias"],
              f"{ours}.mlp.mlp1_bias": w[f"{hf_layer}.mlp.experts.gate_up_proj_bias"],
              f"{ours}.mlp.mlp2_bias": w[f"{hf_layer}.mlp.experts.down_proj_bias"]}
        for mine, theirs in (("mlp1_weight", "gate_up_proj"), ("mlp2_weight", "down_proj")):
            matrix = w[f"{hf_layer}.mlp.experts.{theirs}"].transpose(1, 2)  # HF's [expert, in, out] -> [expert, out, in]
            if mxfp4:
                experts, rows, cols = matrix.shape
                blocks = torch.randint(0, 256, (experts, rows, cols // 32, 16), dtype=torch.uint8, generator=g)
                scales = torch.randint(118, 124, (experts, rows, cols // 32), dtype=torch.uint8, generator=g)
                t[f"{ours}.mlp.{mine}.blocks"], t[f"{ours}.mlp.{mine}.scales"] = blocks, scales
                replaced[f"{hf_layer}.mlp.experts.{theirs}"] = dequantize_mxfp4(blocks, scales, torch.float32) \
                    .transpose(1, 2)
            else:
                t[f"{ours}.mlp.{mine}"] = matrix.contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in t.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return replaced


@pytest.mark.parametrize("mxfp4", [False, True])
def test_original_layout_matches_transformers(kernels, tmp_path, mxfp4):
    hf = _hf_model()
    replaced = _write_original(hf, tmp_path / "original", mxfp4=mxfp4)
    with torch.no_grad():
        hf.load_state_dict(replaced, strict=False)
    model = GPT.from_pretrained(tmp_path / "original", dtype=torch.float32)
    assert model.config.context_length == 32 * 8 and model.config.rope_scaling_factor == 8.0
    assert model.config.n_experts == 6 and model.config.kv_heads == 2
    idx = _tokens(2, 13)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=2e-5)
    assert GPT.from_pretrained(tmp_path / "original").lm_head.weight.dtype == torch.float32  # the checkpoint's


def test_bad_original_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _hf_model(layers=2)
    good = tmp_path / "good"
    _write_original(hf, good)
    tensors, config = load_file(good / "model.safetensors"), json.loads((good / "config.json").read_text())

    def attempt(name, tensors=tensors, config=config):
        directory = tmp_path / name
        directory.mkdir()
        save_file(tensors, str(directory / "model.safetensors"))
        (directory / "config.json").write_text(json.dumps(config))
        return lambda: GPT.from_pretrained(directory)

    with pytest.raises(CheckpointError, match="unknown fields for OpenAI's gpt-oss config: rope_type"):
        attempt("field", config={**config, "rope_type": "yarn"})()
    with pytest.raises(CheckpointError, match=r"missing tensors: block\.1\.attn\.qkv\.weight$"):
        attempt("missing", tensors={k: v for k, v in tensors.items() if k != "block.1.attn.qkv.weight"})()
    with pytest.raises(CheckpointError, match=r"block\.0\.attn\.qkv\.weight has shape \(190, 64\)"):
        attempt("shape", tensors={**tensors, "block.0.attn.qkv.weight": tensors["block.0.attn.qkv.weight"][2:]})()
    with pytest.raises(CheckpointError, match=r"unknown tensors: block\.0\.mlp\.extra"):
        attempt("unknown", tensors={**tensors, "block.0.mlp.extra": torch.zeros(2)})()
    with pytest.raises(CheckpointError, match="multiple of n_kv_head"):
        attempt("heads", config={**config, "num_key_value_heads": 3})()


def test_presets_and_parameter_count():
    cfg = GPTConfig.preset("gpt-oss-20b")
    assert (cfg.arch, cfg.n_layer, cfg.n_experts, cfg.n_embd, cfg.n_head, cfg.kv_heads, cfg.head_dim) == \
        ("gpt-oss", 24, 32, 2880, 64, 8, 64)
    assert (cfg.vocab_size, cfg.experts_per_token, cfg.expert_width, cfg.sliding_window, cfg.swiglu_limit) == \
        (201088, 4, 2880, 128, 7.0)
    assert not cfg.tied_head
    big = GPTConfig.preset("gpt-oss-120b")
    assert (big.n_layer, big.n_experts) == (36, 128)
    # OpenAI's model card: 20.9B and 116.8B parameters.
    assert cfg.num_parameters() / 1e9 == pytest.approx(20.9, abs=0.05)
    assert big.num_parameters() / 1e9 == pytest.approx(116.8, abs=0.1)
    small = GPTConfig.preset("gpt-oss-20b", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, head_width=8,
                             n_experts=5, expert_width=24)
    with torch.device("meta"):
        assert GPT(small).num_parameters() == small.num_parameters()
        assert GPT(dataclasses.replace(small, qkv_bias=False)).num_parameters() == \
            dataclasses.replace(small, qkv_bias=False).num_parameters()


@pytest.mark.parametrize("overrides, match", [
    (dict(n_kv_head=3), "multiple of n_kv_head"),
    (dict(head_width=7), "even head width"),
    (dict(experts_per_token=40), "exceeds n_experts"),
    (dict(dropout=0.1), "no dropout"),
    (dict(n_experts=0), "n_experts must be a positive integer"),
    (dict(rope_theta=float("inf")), "rope_theta"),
    (dict(arch="llama"), "arch must be one of"),
])
def test_config_checks(overrides, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig.preset("gpt-oss-20b", **overrides)


def test_gpt2_config_refuses_grouped_heads():
    with pytest.raises(ValueError, match="for arch='gpt-oss'"):
        GPTConfig(n_kv_head=4)


@pytest.mark.parametrize("device", DEVICES)
def test_training_step(kernels, device):
    cfg = GPTConfig.preset("gpt-oss-20b", vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, head_width=8,
                           n_experts=4, experts_per_token=2, expert_width=24, context_length=64, sliding_window=4)
    torch.manual_seed(0)
    model = GPT(cfg).to(device).train()
    idx = _tokens(2, 16).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        losses.append(loss.item())
        opt.step()
    layer = model.model.layers[0]
    for p in (layer.self_attn.sinks, layer.mlp.router.weight, layer.mlp.experts.gate_up_proj,
              layer.input_layernorm.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert losses[-1] < losses[0] - 0.5


def test_command_line(hf_checkpoint):
    """`profile` runs a gpt-oss checkpoint; `generate` refuses it by name (its vocabulary is
    not GPT-2's, the only one gptext ships) instead of decoding garbage."""
    import subprocess
    import sys

    _, directory = hf_checkpoint
    run = lambda *args: subprocess.run([sys.executable, "-m", "gptext", *args], capture_output=True,  # noqa: E731
                                       text=True, timeout=300)
    out = run("profile", "--model", str(directory), "--tokens", "6", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    assert "rmsnorm_residual" in out.stdout and "attention" in out.stdout
    out = run("generate", "--model", str(directory), "--prompt", "x", "--device", "cpu")
    assert out.returncode == 2 and "another vocabulary" in out.stderr
