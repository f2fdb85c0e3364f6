"""Checkpoint loading and saving: formats, options, and clear errors for bad directories."""

import json

import pytest
import torch

from gptext import GPT, GPTConfig
from gptext.weights import CheckpointError


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=32, n_head=2, n_layer=2, vocab_size=60, context_length=16)).eval()
    model.save_pretrained(tmp_path)
    return model, tmp_path


def test_roundtrip_and_options(saved):
    model, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]  # no temp files left
    loaded = GPT.from_pretrained(path)
    idx = torch.randint(0, 60, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx), rtol=0, atol=0)
    assert not loaded.training
    half = GPT.from_pretrained(path, dtype=torch.bfloat16)
    assert half.transformer.wte.weight.dtype == torch.bfloat16
    assert half.lm_head.weight is half.transformer.wte.weight
    model.save_pretrained(path)  # overwriting an existing checkpoint works
    assert GPT.from_pretrained(path).config == model.config


def test_sharded_safetensors(saved, tmp_path_factory):
    from safetensors.torch import load_file, save_file

    model, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    sharded = tmp_path_factory.mktemp("sharded")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / file), metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (sharded / "config.json").write_text((path / "config.json").read_text())
    idx = torch.randint(0, 60, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(GPT.from_pretrained(sharded)(idx), model(idx), rtol=0, atol=0)


def test_truncated_weights(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read the weights"):
        GPT.from_pretrained(path)


def test_garbage_pickle_is_refused(tmp_path_factory, saved):
    _, path = saved
    tmp_path = tmp_path_factory.mktemp("evil")
    (tmp_path / "config.json").write_text((path / "config.json").read_text())

    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"wte.weight": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: cannot read"):
        GPT.from_pretrained(tmp_path)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.update(model_type="llama"), "model_type is 'llama'"),
    (lambda c: c.update(activation_function="relu"), "activation_function"),
    (lambda c: c.update(n_inner=7), "n_inner"),
    (lambda c: c.update(n_head=5), "divisible"),
    (lambda c: c.update(n_embd=48), "has shape"),
    (lambda c: c.update(n_layer=3), "missing tensors: h.2.attn.c_attn.bias"),
    (lambda c: c.update(n_layer=1), "unknown tensors: h.1.attn.c_attn.bias"),
])
def test_mismatched_config(saved, edit, match):
    _, path = saved
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        GPT.from_pretrained(path)


def test_bad_directories(tmp_path_factory, saved):
    tmp_path = tmp_path_factory.mktemp("bad")
    with pytest.raises(CheckpointError, match="not a directory"):
        GPT.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="config.json: missing"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        GPT.from_pretrained(tmp_path)
    _, path = saved
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        GPT.from_pretrained(tmp_path)


def test_untied_head_is_refused(saved):
    from safetensors.torch import load_file, save_file

    _, path = saved
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = torch.randn_like(tensors["wte.weight"])
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="tied head"):
        GPT.from_pretrained(path)


def test_model_without_qkv_bias_saves_zero_bias(tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=32, n_head=2, n_layer=1, vocab_size=40, context_length=8, qkv_bias=False)).eval()
    model.save_pretrained(tmp_path)
    loaded = GPT.from_pretrained(tmp_path)
    assert torch.all(loaded.transformer.h[0].attn.c_attn.bias == 0)
    idx = torch.randint(0, 40, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx))
