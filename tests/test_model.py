"""The GPT model against Hugging Face transformers' GPT-2 (random weights, no downloads) as
an independent oracle, on both backends; configs; training through the ops."""

import dataclasses

import pytest
import torch

import gptext
from gptext import GPT, GPTConfig

transformers = pytest.importorskip("transformers")

# (n_embd, n_head, n_layer, vocab, context): odd widths, odd head counts and head sizes.
HF_CONFIGS = [(48, 3, 2, 101, 64), (40, 5, 3, 257, 32), (64, 4, 1, 50, 128), (36, 6, 2, 77, 40)]


def hf_model(n_embd, n_head, n_layer, vocab, context, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=n_embd, n_head=n_head, n_layer=n_layer, vocab_size=vocab,
                                  n_positions=context, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # HF zero-initialises biases and unit norms; randomise them so they are tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="module", params=HF_CONFIGS, ids=lambda c: "x".join(map(str, c)))
def hf_pair(request, tmp_path_factory):
    """(HF model, gptext model loaded from HF's save_pretrained directory, the directory)."""
    hf = hf_model(*request.param)
    directory = tmp_path_factory.mktemp("hf")
    hf.save_pretrained(directory)
    return hf, GPT.from_pretrained(directory), directory


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_logits_match_hf(hf_pair, backend):
    hf, model, _ = hf_pair
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.context_length))
    with torch.no_grad(), gptext.backend(backend):
        ours = model(idx)
        theirs = hf(idx).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_loss_matches_hf(hf_pair):
    hf, model, _ = hf_pair
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        _, loss = model(idx[:, :-1], idx[:, 1:])
        hf_loss = hf(idx, labels=idx).loss  # HF shifts the labels itself
    torch.testing.assert_close(loss, hf_loss, rtol=1e-4, atol=1e-4)


def test_greedy_generate_matches_hf(hf_pair):
    hf, model, _ = hf_pair
    prompt = torch.randint(0, model.config.vocab_size, (2, 7))
    new = model.config.context_length - 7
    ours = model.generate(prompt, max_new_tokens=new, temperature=0)
    theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_saved_model_loads_in_hf(hf_pair, tmp_path):
    _, model, _ = hf_pair
    model.save_pretrained(tmp_path)
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, model(idx), rtol=1e-5, atol=1e-5)


def test_pytorch_model_bin(tmp_path):
    """The older format: a pickled state dict (read with weights_only=True), including the
    causal-mask buffers early GPT-2 checkpoints carry."""
    hf = hf_model(32, 2, 1, 60, 16)
    hf.config.to_json_file(tmp_path / "config.json")
    state = dict(hf.state_dict())
    state["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, 60, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, rtol=1e-4, atol=1e-4)


def test_presets_and_config_validation():
    sizes = {"gpt2-124m": 124_439_808, "gpt2-355m": 354_823_168, "gpt2-774m": 774_030_080,
             "gpt2-1558m": 1_557_611_200}
    for name, params in sizes.items():
        cfg = GPTConfig.preset(name)
        assert cfg.vocab_size == 50257 and cfg.context_length == 1024
        assert cfg.num_parameters() == params
    small = GPTConfig.preset("gpt2-124m", n_layer=2)
    assert small.n_layer == 2 and small.n_embd == 768
    assert dataclasses.replace(small, n_head=4).head_dim == 192
    assert GPT(GPTConfig(n_embd=48, n_head=3, n_layer=2, vocab_size=101, context_length=64)).num_parameters() == \
        GPTConfig(n_embd=48, n_head=3, n_layer=2, vocab_size=101, context_length=64).num_parameters()
    for bad, match in [(dict(n_embd=50, n_head=3), "divisible"), (dict(n_layer=0), "n_layer"),
                       (dict(dropout=1.0), "dropout"), (dict(vocab_size=2.5), "vocab_size"),
                       (dict(layer_norm_eps=0), "layer_norm_eps")]:
        with pytest.raises(ValueError, match=match):
            GPTConfig(**bad)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.preset("gpt5")


def test_initialisation():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=256, n_head=4, n_layer=8, vocab_size=1000, context_length=128))
    assert model.lm_head.weight is model.transformer.wte.weight
    block = model.transformer.h[0]
    assert abs(block.attn.c_attn.weight.std().item() - 0.02) < 0.002
    assert abs(block.mlp.c_proj.weight.std().item() - 0.02 / 4) < 0.0005  # 1/sqrt(2 * 8)
    assert torch.all(block.ln_1.weight == 1) and torch.all(block.attn.c_attn.bias == 0)


def test_bad_tokens_and_context():
    model = GPT(GPTConfig(n_embd=32, n_head=2, n_layer=1, vocab_size=50, context_length=8))
    with pytest.raises(ValueError, match="token id 50 is out of range"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="longer than the model's context_length"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="batch, tokens"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets has shape"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long))


def test_bfloat16_on_cpu():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=64, n_head=4, n_layer=2, vocab_size=97, context_length=32)).eval()
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        full = model(idx)
        half = model.to(torch.bfloat16)(idx)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), full, rtol=0.05, atol=0.05)


def test_training_step_matches_reference_and_learns():
    torch.manual_seed(0)
    cfg = GPTConfig(n_embd=32, n_head=4, n_layer=2, vocab_size=31, context_length=16)
    model = GPT(cfg)
    reference_model = GPT(cfg)
    reference_model.load_state_dict(model.state_dict())
    idx = torch.randint(0, 31, (4, 16))
    _, loss = model(idx[:, :-1], idx[:, 1:])
    loss.backward()
    with gptext.backend("reference"):
        _, ref_loss = reference_model(idx[:, :-1], idx[:, 1:])
        ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):  # memorise one batch
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_gradients_match_hf(backend, tmp_path):
    """A training step's loss and every weight's gradient against transformers' GPT-2 on the
    same weights (the MLP keeps its pre-activation in training: no fused-ffn recompute)."""
    hf = hf_model(40, 5, 2, 77, 40)
    hf.save_pretrained(tmp_path)
    model = GPT.from_pretrained(tmp_path)
    idx = torch.randint(0, 77, (3, 40), generator=torch.Generator().manual_seed(4))
    with gptext.backend(backend):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
    hf_loss = torch.nn.functional.cross_entropy(hf(idx[:, :-1]).logits.flatten(0, 1), idx[:, 1:].flatten())
    hf_loss.backward()
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-5)
    theirs = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        q = theirs[name if name in theirs else name.replace("lm_head", "transformer.wte")]
        conv1d = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))  # HF's Conv1D stores W.T
        grad = q.grad.t() if conv1d else q.grad
        torch.testing.assert_close(p.grad, grad, rtol=1e-4, atol=1e-5, msg=name)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=32, n_head=2, n_layer=2, vocab_size=40, context_length=16, dropout=0.5))
    idx = torch.randint(0, 40, (2, 16))
    model.train()
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


def test_model_compiles_whole():
    """torch.compile traces the model in one graph (fake implementations of every op),
    forward and training step, with the eager result."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=64, n_head=4, n_layer=2, vocab_size=100, context_length=32)).eval()
    idx = torch.randint(0, 100, (2, 16))
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(idx), model(idx))
    model.train()
    _, loss = compiled(idx[:, :-1], idx[:, 1:])
    loss.backward()
    assert model.transformer.wte.weight.grad is not None and torch.isfinite(loss)


def _saved_activation_bytes(model, idx) -> tuple[int, torch.Tensor]:
    """Bytes of the non-parameter tensors a training forward pass keeps for its backward
    pass, as torch's saved-tensor hooks see them from outside the model, and the loss."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx)
    return sum(kept.values()), loss


@pytest.mark.parametrize("arch", ["gpt2", "gpt-oss"])
def test_activation_checkpointing(arch):
    """Recomputing the blocks in the backward pass keeps a fraction of the activations and
    gives the gradients bit for bit, dropout's masks included, leaving the random state as
    it would have been."""
    if arch == "gpt2":
        cfg = GPTConfig(n_embd=64, n_head=4, n_layer=4, vocab_size=50, context_length=64, dropout=0.1)
    else:
        cfg = GPTConfig.preset("gpt-oss-20b", vocab_size=50, context_length=64, n_embd=64, n_layer=4, n_head=4,
                               n_kv_head=2, head_width=16, n_experts=4, experts_per_token=2, expert_width=32,
                               sliding_window=8)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    idx = torch.randint(0, 50, (2, 48))
    runs = []
    for recompute in (False, True):
        model.activation_checkpointing = recompute
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        kept, loss = _saved_activation_bytes(model, idx)
        loss.backward()
        runs.append((kept, loss.detach(), {n: p.grad for n, p in model.named_parameters()}, torch.rand(4)))
    (kept, loss, grads, after), (kept_ck, loss_ck, grads_ck, after_ck) = runs
    assert kept_ck < 0.3 * kept, (kept_ck, kept)
    assert torch.equal(loss, loss_ck) and torch.equal(after, after_ck)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ck[name]), name
    # Generation (a KV cache, no gradients) runs the blocks once, as without it.
    model.eval()
    prompt = idx[:, :8]
    with_flag = model.generate(prompt, max_new_tokens=6, temperature=0)
    model.activation_checkpointing = False
    assert torch.equal(with_flag, model.generate(prompt, max_new_tokens=6, temperature=0))
