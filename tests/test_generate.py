"""Generation with the KV cache: cached decoding equals recomputing, batching and padding
change nothing, sampling options, EOS, errors; on CUDA, the graph-replayed decode step."""

import pytest
import torch

import gptext
from gptext import GPT, GPTConfig
from gptext.generate import sample_next, stream

from conftest import HAS_CUDA


def make_model(device="cpu", dtype=torch.float32, vocab=97, context=48, seed=0, n_embd=64, n_head=4):
    torch.manual_seed(seed)
    cfg = GPTConfig(n_embd=n_embd, n_head=n_head, n_layer=3, vocab_size=vocab, context_length=context)
    return GPT(cfg).to(device=device, dtype=dtype).eval()


def greedy_by_recomputing(model, prompt, steps):
    """The slow oracle: the whole sequence through the model for every new token."""
    idx = prompt
    with torch.no_grad():
        for _ in range(steps):
            idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], 1)
    return idx


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_cached_decoding_equals_recomputing(backend):
    model = make_model()
    prompt = torch.randint(0, 97, (3, 11))
    with gptext.backend(backend):
        assert torch.equal(model.generate(prompt, max_new_tokens=30, temperature=0),
                           greedy_by_recomputing(model, prompt, 30))
        # one new token comes from the prefill alone, without a cache
        assert torch.equal(model.generate(prompt, max_new_tokens=1, temperature=0),
                           greedy_by_recomputing(model, prompt, 1))


def test_ragged_batch_equals_each_prompt_alone():
    model = make_model()
    prompts = [[5, 6, 7], list(range(20, 39)), [1], [9, 9, 9, 9, 9]]
    batched = model.generate(prompts, max_new_tokens=12, temperature=0)
    assert isinstance(batched, list) and len(batched) == 4
    for prompt, got in zip(prompts, batched):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=12, temperature=0)[0]
        assert torch.equal(got, alone)
        assert got[: len(prompt)].tolist() == prompt


def test_left_padded_tensor_with_attention_mask():
    model = make_model()
    prompts = [[3, 4, 5, 6, 7, 8], [10, 11]]
    idx = torch.tensor([prompts[0], [0, 0, 0, 0] + prompts[1]])
    mask = torch.tensor([[1] * 6, [0] * 4 + [1] * 2])
    out = model.generate(idx, max_new_tokens=8, temperature=0, attention_mask=mask)
    assert out.shape == (2, 14)
    alone = model.generate(torch.tensor([prompts[1]]), max_new_tokens=8, temperature=0)
    assert torch.equal(out[1, 4:], alone[0])
    with pytest.raises(ValueError, match="left padding"):
        model.generate(idx, max_new_tokens=2, attention_mask=torch.tensor([[1] * 6, [1, 0, 1, 1, 1, 1]]))


def test_eos_stops_each_sequence():
    model = make_model()
    prompts = torch.randint(0, 97, (2, 5))
    free = model.generate(prompts, max_new_tokens=10, temperature=0)
    eos = int(free[0, 5 + 2])  # the third token sequence 0 generates
    stopped = model.generate(prompts, max_new_tokens=10, temperature=0, eos_token_id=eos)
    first_hit = [next((i for i, t in enumerate(free[r, 5:].tolist()) if t == eos), None) for r in range(2)]
    for row in range(2):
        hit = first_hit[row]
        if hit is None:
            assert torch.equal(stopped[row, 5:], free[row, 5:stopped.shape[1]])
        else:
            assert torch.equal(stopped[row, 5:5 + hit + 1], free[row, 5:5 + hit + 1])
            assert (stopped[row, 5 + hit:] == eos).all()
    listed = model.generate([prompts[0].tolist()], max_new_tokens=10, temperature=0, eos_token_id=eos)[0]
    assert listed[-1].item() == eos and len(listed) == 5 + first_hit[0] + 1


def test_any_of_several_eos_ids_stops_a_sequence():
    # gpt-oss's generation_config.json lists several end tokens: the first hit of any ends a
    # sequence; finished rows of a tensor repeat the first id of the list.
    model = make_model()
    prompts = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    free = model.generate(prompts, max_new_tokens=10, temperature=0)
    ends = [int(free[0, 5 + 6]), int(free[1, 5 + 1])]  # sequence 0's 7th token, sequence 1's 2nd
    stopped = model.generate(prompts, max_new_tokens=10, temperature=0, eos_token_id=ends)
    listed = model.generate([p.tolist() for p in prompts], max_new_tokens=10, temperature=0, eos_token_id=ends)
    for row in range(2):
        hit = next(i for i, t in enumerate(free[row, 5:].tolist()) if t in ends)
        assert torch.equal(stopped[row, 5:5 + hit + 1], free[row, 5:5 + hit + 1])
        assert (stopped[row, 5 + hit + 1:] == ends[0]).all()
        assert torch.equal(listed[row], free[row, :5 + hit + 1])
    assert stopped.shape[1] < 15  # both stopped before max_new_tokens
    with pytest.raises(ValueError, match="empty list"):
        model.generate(prompts, max_new_tokens=1, eos_token_id=[])
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(prompts, max_new_tokens=1, eos_token_id=[1, 500])


def test_sampling_is_reproducible_with_a_generator():
    model = make_model()
    prompt = torch.randint(0, 97, (2, 4))
    run = lambda seed, **kw: model.generate(prompt, max_new_tokens=20, temperature=1.0,  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed), **kw)
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
    greedy = model.generate(prompt, max_new_tokens=20, temperature=0)
    assert torch.equal(run(3, top_k=1), greedy)
    assert torch.equal(run(4, top_p=1e-6), greedy)


def test_sample_next_restrictions():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 1.0, 0.0]])
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        token = sample_next(logits, temperature=1.0, top_k=2, generator=g)
        assert token[0] in (2, 3) and token[1] in (0, 1)
        # probabilities softmax([3, 2, ...]) = 0.64, 0.24, ...: top_p 0.6 keeps one token, 0.7 two
        assert sample_next(logits, temperature=1.0, top_p=0.6, generator=g).tolist() == [3, 0]
        assert sample_next(logits, temperature=1.0, top_p=0.7, generator=g)[0] in (2, 3)
    assert sample_next(logits, temperature=0).tolist() == [3, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_takes_the_first_of_tied_maxima(dtype):
    # As argmax does, in every row, wherever the ties sit in a long row.
    logits = torch.zeros(3, 50257, dtype=dtype)
    logits[0, [7, 70, 50000]] = 5.0
    logits[1, [49999, 50256]] = 1.0
    logits[2] = -1.0
    assert sample_next(logits, temperature=0).tolist() == [7, 49999, 0]
    assert torch.equal(sample_next(logits, temperature=0), logits.argmax(-1))


def test_stream_yields_the_generated_tokens():
    model = make_model()
    prompt = torch.randint(0, 97, (2, 6))
    steps = list(stream(model, prompt, max_new_tokens=9, temperature=0))
    assert len(steps) == 9 and steps[0].shape == (2,)
    assert torch.equal(torch.stack(steps, 1), model.generate(prompt, max_new_tokens=9, temperature=0)[:, 6:])


def test_other_input_forms_and_zero_tokens():
    model = make_model()
    out = model.generate(torch.tensor([4, 5, 6]), max_new_tokens=3, temperature=0)
    assert out.shape == (6,)
    assert torch.equal(model.generate(torch.tensor([[4, 5]]), max_new_tokens=0), torch.tensor([[4, 5]]))


def test_errors():
    model = make_model(context=16)
    prompt = torch.randint(0, 97, (1, 10))
    with pytest.raises(ValueError, match="exceeds the model's context_length"):
        model.generate(prompt, max_new_tokens=7)
    with pytest.raises(ValueError, match="token id 97"):
        model.generate(torch.tensor([[1, 97]]), max_new_tokens=1)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate([[1, 2], []], max_new_tokens=1)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt, max_new_tokens=1, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt, max_new_tokens=1, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt, max_new_tokens=1, top_p=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt, max_new_tokens=-2)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(prompt, max_new_tokens=1, eos_token_id=500)
    with pytest.raises(ValueError, match="cuda_graph=True"):
        model.generate(prompt, max_new_tokens=1, cuda_graph=True)
    with pytest.raises(ValueError, match="exceeds"):
        stream(model, prompt, max_new_tokens=7)  # checked when called, before any step


# head_dim 64, a size the fused CUDA attention is built for. In float32 the attention runs
# on the reference (the fused kernels take 16-bit types), so that case uses the 'auto'
# backend; bfloat16 runs every op on the kernels.
CUDA_MODEL = dict(n_embd=128, n_head=2)


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:gptext")
@pytest.mark.parametrize("dtype, backend", [(torch.float32, "auto"), (torch.bfloat16, "kernels")])
def test_cuda_graph_decode_matches_eager(dtype, backend):
    model = make_model("cuda", dtype, **CUDA_MODEL)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    with gptext.backend(backend):
        graphed = model.generate(prompts, max_new_tokens=20, temperature=0, cuda_graph=True)
        eager = model.generate(prompts, max_new_tokens=20, temperature=0, cuda_graph=False)
        again = model.generate(prompts, max_new_tokens=20, temperature=0, cuda_graph=True)  # reuses the graph
    for a, b, c in zip(graphed, eager, again):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.cuda
@pytest.mark.filterwarnings("ignore:gptext")
def test_cuda_matches_cpu_greedy():
    cpu = make_model(**CUDA_MODEL)
    gpu = make_model("cuda", **CUDA_MODEL)
    prompt = torch.randint(0, 97, (2, 6))
    with gptext.backend("auto"):
        assert torch.equal(gpu.generate(prompt.cuda(), max_new_tokens=15, temperature=0).cpu(),
                           cpu.generate(prompt, max_new_tokens=15, temperature=0))


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-only default")
def test_no_graph_on_cpu_by_default():
    model = make_model()
    assert model.generate(torch.tensor([[1, 2]]), max_new_tokens=2).shape == (1, 4)
