"""Data-parallel training: gptext.train in every process of a torch.distributed group (Gloo
on the CPU here; NCCL on GPUs takes the same path), and `torchrun ... -m gptext train`.

Each case launches real processes. A run shared by two processes must take the very steps
one process takes alone: with two processes and two micro-batches a step, each gradient is
the same two halves added once, so the weights come out equal bit for bit."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gptext import GPT, GPTConfig, train

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="this torch has no torch.distributed with Gloo")

# One process of a run: rank, world size, a rendezvous file and the case's settings as JSON.
# It trains a small GPT-2 (or resumes one) and rank 0 saves what the test compares.
WORKER = textwrap.dedent("""
    import json, sys
    import torch
    import torch.distributed as dist
    from gptext import GPT, GPTConfig, train

    rank, world, rendezvous, case = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    torch.set_num_threads(1)  # the same products, summed in the same order, in every launch
    if world > 1:
        dist.init_process_group("gloo", init_method="file://" + rendezvous, rank=rank, world_size=world)
    torch.manual_seed(case.get("model_seed", 0) + 7 * rank)  # rank 0's weights must win the broadcast
    model = GPT(GPTConfig(vocab_size=97, context_length=16, n_embd=32, n_layer=2, n_head=2,
                          dropout=case.get("dropout", 0.0)))
    g = torch.Generator().manual_seed(1 + (rank if case.get("other_data") else 0))
    ids = torch.randint(0, 97, (23,), generator=g).repeat(60)
    data = train.TokenData(ids, context=16, val_fraction=0.1)
    config = train.TrainConfig(**case["config"])
    resume = None
    if "resume" in case:
        model.load_state_dict(torch.load(case["resume"] + ".weights", weights_only=True))
        resume = train.TrainState.load(case["resume"] + ".state")
    saved = []

    def checkpoint(state):
        assert rank == 0, "only rank 0 checkpoints"
        saved.append(state.step)
        if state.step == case.get("save_at"):
            torch.save(model.state_dict(), case["out"] + ".weights")
            state.save(case["out"] + ".state")

    try:
        history = train.train(model, data, config, log=print, checkpoint=checkpoint,
                              save_every=case.get("save_every", 0), resume=resume)
    except ValueError as e:
        print("ValueError:", e, flush=True)
        sys.exit(3)
    finally:
        # A process that leaves with its Gloo group still up may abort in the group's
        # destructor ("terminate called without an active exception") instead of exiting.
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        torch.save({"history": history, "weights": model.state_dict(), "saved": saved}, case["out"] + ".result")
""")


def launch(tmp_path, world, case, name):
    """Runs the case in `world` processes; returns (their completed processes, rank 0's result)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    case = {**case, "out": str(tmp_path / name)}
    rendezvous = tmp_path / f"{name}.rendezvous"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), str(world), str(rendezvous), json.dumps(case)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(world)]
    done = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    result = tmp_path / f"{name}.result"
    return done, torch.load(result, weights_only=True) if result.exists() else None


CONFIG = dict(steps=4, batch_size=2, accumulate=2, lr=1e-2, warmup=1, eval_every=2, eval_batches=3, log_every=1,
              seed=5)


def test_two_processes_take_the_steps_of_one(tmp_path):
    [alone], one = launch(tmp_path, 1, {"config": CONFIG}, "one")
    assert alone.returncode == 0, alone.stderr
    ranks, two = launch(tmp_path, 2, {"config": CONFIG}, "two")
    assert all(p.returncode == 0 for p in ranks), [p.stderr for p in ranks]
    assert [r.get("loss") for r in two["history"]] == [r.get("loss") for r in one["history"]]
    assert [r.get("grad_norm") for r in two["history"]] == [r.get("grad_norm") for r in one["history"]]
    # The held-out batches were shared out: their mean is summed in another order.
    held = {r["step"]: r["val_loss"] for r in one["history"] if "val_loss" in r}
    assert list(held) == [0, 2, 4]
    assert {r["step"]: r["val_loss"] for r in two["history"] if "val_loss" in r} == pytest.approx(held, rel=1e-12)
    for (name, a), b in zip(one["weights"].items(), two["weights"].values()):
        assert torch.equal(a, b), name
    assert two["saved"] == [4] and one["saved"] == [4]
    # Only rank 0 logs.
    assert "step      4" in ranks[0].stdout and ranks[1].stdout == ""


def test_more_micro_batches_are_shared_out(tmp_path):
    config = {**CONFIG, "accumulate": 4, "batch_size": 1, "eval_every": 0}
    [alone], one = launch(tmp_path, 1, {"config": config}, "one")
    ranks, two = launch(tmp_path, 2, {"config": config}, "two")
    assert alone.returncode == 0 and all(p.returncode == 0 for p in ranks), [p.stderr for p in ranks]
    # Each process sums its two micro-batches before the processes add theirs: the gradients
    # differ in their last bits, which AdamW magnifies where a gradient is 0 in exact
    # arithmetic (the key bias), so the steps are compared by their losses and norms.
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in two["history"]] == pytest.approx([r[key] for r in one["history"]], rel=1e-5), key


def test_a_shared_run_resumes_exactly(tmp_path):
    """With dropout on, each process's own random state comes back from the TrainState."""
    case = {"config": {**CONFIG, "eval_every": 0}, "dropout": 0.1}
    ranks, whole = launch(tmp_path, 2, case, "whole")
    assert all(p.returncode == 0 for p in ranks), [p.stderr for p in ranks]
    ranks, _ = launch(tmp_path, 2, {**case, "save_every": 2, "save_at": 2}, "half")
    assert all(p.returncode == 0 for p in ranks), [p.stderr for p in ranks]
    state = train.TrainState.load(tmp_path / "half.state")
    assert {"cpu", "cpu/1"} <= set(state.rng) and not torch.equal(state.rng["cpu"], state.rng["cpu/1"])
    ranks, resumed = launch(tmp_path, 2, {**case, "resume": str(tmp_path / "half")}, "resumed")
    assert all(p.returncode == 0 for p in ranks), [p.stderr for p in ranks]
    assert "resumed at step 2 of 4" in ranks[0].stdout
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in whole["history"]]
    for (name, a), b in zip(whole["weights"].items(), resumed["weights"].values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("case, message", [
    ({"config": {**CONFIG, "accumulate": 3}}, "accumulate=3 micro-batches a step cannot be shared equally among 2"),
    ({"config": CONFIG, "other_data": True}, "were given different data or training settings"),
])
def test_processes_that_cannot_share_a_run_refuse_it(tmp_path, case, message):
    ranks, result = launch(tmp_path, 2, case, "bad")
    assert result is None
    for p in ranks:  # every process stops with the reason, none hangs
        assert p.returncode == 3 and message in p.stdout, (p.stdout, p.stderr)


def test_torchrun_trains_with_the_command_line(tmp_path):
    from gptext.demo import corpus

    text = tmp_path / "zen.txt"
    text.write_text(corpus() * 3, encoding="utf-8")
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "gptext", "train", "--model", "gpt2-124m", "--set", "n_layer=1", "--set", "n_embd=32",
               "--set", "n_head=2", "--set", "context_length=16", "--data", str(text), "--out", str(out),
               "--steps", "3", "--batch-size", "2", "--accumulate", "2", "--eval-every", "0", "--log-every", "1",
               "--device", "cpu"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("train: gpt2-124m") == 1 and "and 1 more process like it" in result.stdout
    assert result.stdout.count(f"wrote {out} (step 3)") == 1 and "trained 3 steps" in result.stdout
    log = json.loads((out / "training.json").read_text())
    assert log["step"] == 3 and len(log["history"]) == 3
    assert GPT.from_pretrained(out).config.n_layer == 1
    state = train.TrainState.load(out / "training_state.pt")
    assert {"cpu", "cpu/1"} <= set(state.rng)


def test_a_lone_process_is_rank_0_of_1():
    """Without a process group, train runs in this process alone, and any accumulate shares."""
    assert train.Ranks.current() == train.Ranks(0, 1)
    data = train.TokenData(torch.arange(97).repeat(20), context=16, val_fraction=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, context_length=16, n_embd=32, n_layer=1, n_head=2))
    history = train.train(model, data, train.TrainConfig(steps=1, batch_size=1, accumulate=3, log_every=0), log=None)
    assert [r["step"] for r in history] == [1]


def test_a_shared_run_resumes_in_one_process(tmp_path):
    """A step's windows do not depend on the process count: a state saved by two processes
    continues in one, the same steps (bit for bit at two micro-batches a step)."""
    case = {"config": {**CONFIG, "eval_every": 0}}
    [alone], whole = launch(tmp_path, 1, case, "whole")
    ranks, _ = launch(tmp_path, 2, {**case, "save_every": 2, "save_at": 2}, "half")
    assert alone.returncode == 0 and all(p.returncode == 0 for p in ranks), [p.stderr for p in ranks]
    [resumed], result = launch(tmp_path, 1, {**case, "resume": str(tmp_path / "half")}, "resumed")
    assert resumed.returncode == 0, resumed.stderr
    assert [r["loss"] for r in result["history"]] == [r["loss"] for r in whole["history"]]
    for (name, a), b in zip(whole["weights"].items(), result["weights"].values()):
        assert torch.equal(a, b), name


class _FakeSum:
    """Stands in for torch.distributed.all_reduce in this process: the sum over two processes
    that both hold this process's gradients (times 2, exact in binary), done at once, with a
    record of when each bucket started and was waited for."""

    def __init__(self, events):
        self.events = events

    def __call__(self, tensor, async_op=False):
        assert async_op, "the gradients' sums run in the background"
        self.events.append(("start", tensor.numel()))
        tensor.mul_(2)
        events = self.events

        class Work:
            def wait(self):
                events.append(("wait", tensor.numel()))
        return Work()


@pytest.mark.parametrize("recompute", [False, True], ids=["stored", "activation-checkpointing"])
def test_gradient_sums_start_while_the_backward_pass_runs(monkeypatch, recompute):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, context_length=16, n_embd=32, n_layer=2, n_head=2))
    model.activation_checkpointing = recompute  # the blocks' forward runs again inside backward
    batches = [(torch.randint(0, 97, (2, 16)), torch.randint(0, 97, (2, 16))) for _ in range(2)]
    for x, y in batches:  # two micro-batches accumulated in one process: the expected sum's halves
        model.loss(x, y).backward()
    plain = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    events = []
    monkeypatch.setattr(torch.distributed, "all_reduce", _FakeSum(events))
    overlap = train._OverlappedSum(model.parameters(), bucket_bytes=8 << 10)
    names = {id(p): name for name, p in model.named_parameters()}
    assert len(overlap.buckets) >= 4
    assert sum(len(b) for b in overlap.buckets) == len(plain)  # the tied embedding once
    for p in model.parameters():  # registered after overlap's own hooks: runs after them
        p.register_post_accumulate_grad_hook(lambda p: events.append(("grad", names[id(p)])))
    try:
        model.loss(*batches[0]).backward()  # unarmed: accumulates locally
        assert not any(kind == "start" for kind, _ in events)
        events.clear()
        overlap.arm()
        model.loss(*batches[1]).backward()
        grads = [i for i, (kind, _) in enumerate(events) if kind == "grad"]
        starts = [i for i, (kind, _) in enumerate(events) if kind == "start"]
        # Every bucket started inside the backward pass, in bucket order, the first before
        # half the gradients were in; none waited for.
        assert len(starts) == len(overlap.buckets) and starts[0] < grads[len(grads) // 2]
        assert [events[i][1] for i in starts] == [sum(p.numel() for p in b) for b in overlap.buckets]
        assert all(kind != "wait" for kind, _ in events)
        overlap.finish()
        assert [n for kind, n in events if kind == "wait"] == [sum(p.numel() for p in b) for b in overlap.buckets]
    finally:
        overlap.close()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, 2 * plain[name]), name


def test_a_parameter_without_a_gradient_keeps_none(monkeypatch):
    monkeypatch.setattr(torch.distributed, "all_reduce", _FakeSum([]))
    used, unused = torch.nn.Linear(3, 4), torch.nn.Linear(3, 4)
    overlap = train._OverlappedSum([*used.parameters(), *unused.parameters()])
    try:
        overlap.arm()
        used(torch.ones(2, 3)).sum().backward()
        overlap.finish()
        assert torch.equal(used.bias.grad, torch.full((4,), 4.0))
        assert unused.weight.grad is None and unused.bias.grad is None
        with pytest.raises(RuntimeError, match="without arm"):
            overlap.finish()
    finally:
        overlap.close()
