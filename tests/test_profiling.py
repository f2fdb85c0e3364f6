"""gptext.profiling (the timing harness, device limits, per-op records) and the profile and
demo commands."""

import collections
import subprocess
import sys

import pytest
import torch

import gptext
from gptext import GPT, GPTConfig, profiling


def test_measurement_summary():
    m = profiling.Measurement.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert m.median == 3.0 and m.p10 == pytest.approx(1.4) and m.p90 == pytest.approx(4.6)
    with pytest.raises(ValueError):
        profiling.Measurement.of([])


def test_measure_counts_calls():
    calls = []
    m = profiling.measure(lambda: calls.append(1), "cpu", warmup=2, repeats=7, max_seconds=10)
    assert len(m.samples) == 7 and len(calls) == 9
    assert 0 <= m.p10 <= m.median <= m.p90
    few = profiling.measure(lambda: None, "cpu", warmup=0, repeats=100, max_seconds=0.0)
    assert len(few.samples) == 3  # the time budget stops it, but never below three repeats


def test_measure_interleaved_alternates_and_times_outside_contexts():
    log = []

    class Mark:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            log.append(f"enter {self.name}")

        def __exit__(self, *exc):
            log.append(f"exit {self.name}")

    fns = [lambda: log.append("a"), lambda: log.append("b")]
    a, b = profiling.measure_interleaved(fns, "cpu", warmup=1, repeats=4, max_seconds=10,
                                         contexts=[lambda: Mark("A"), None])
    assert len(a.samples) == len(b.samples) == 4
    calls = [entry for entry in log if entry in ("a", "b")]
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 2  # a warm-up each, then rounds in alternating order
    assert log[:3] == ["enter A", "a", "exit A"]  # a's calls run inside its context, b's in none
    assert log.count("enter A") == 5 and log.count("exit A") == 5
    with pytest.raises(ValueError, match="contexts"):
        profiling.measure_interleaved(fns, "cpu", contexts=[None])


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6])
def test_round_orders_let_each_follow_each_other_equally_often(n):
    orders = profiling.round_orders(n)
    assert all(sorted(order) == list(range(n)) for order in orders)
    follows = collections.Counter((order[i], order[i + 1]) for order in orders for i in range(n - 1))
    assert set(follows) == {(a, b) for a in range(n) for b in range(n) if a != b}
    assert len(set(follows.values())) <= 1  # every ordered pair equally often


def test_measure_interleaved_rounds_follow_the_balanced_orders():
    log = []
    fns = [lambda name=name: log.append(name) for name in "abc"]
    profiling.measure_interleaved(fns, "cpu", warmup=1, repeats=6, max_seconds=10)
    rounds = [log[3 + 3 * r:6 + 3 * r] for r in range(6)]
    predecessors = collections.Counter((r[i], r[i + 1]) for r in rounds for i in range(2))
    assert len(predecessors) == 6 and set(predecessors.values()) == {2}  # a after b as often as after c, ...


def test_device_limits_on_cpu():
    limits = profiling.device_limits("cpu")
    assert limits.copy_gbps > 0 and limits.matmul_tflops["float32"] > 0
    assert limits.as_dict()["device"] == "cpu"


def test_record_ops_costs():
    x, w, b = torch.randn(5, 16), torch.randn(24, 16), torch.randn(24)
    with profiling.record_ops("cpu") as records:
        gptext.ops.linear(x, w, b, "gelu")
        gptext.ops.softmax(torch.randn(3, 7))
        with gptext.backend("reference"):
            gptext.ops.layernorm_residual(x, x, torch.ones(16), None)
    assert [r.op for r in records] == ["linear", "softmax", "layernorm_residual"]
    assert [r.implementation for r in records] == ["cpu", "cpu", "reference"]
    assert records[0].shape == "5x24x16" and records[0].flops == 2 * 5 * 24 * 16
    assert records[0].bytes == 4 * (5 * 16 + 24 * 16 + 24 + 5 * 24)
    assert all(r.seconds > 0 for r in records)
    assert gptext.ops._observer is None  # restored after the block


def test_profile_forward_sees_every_op():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_embd=32, n_head=2, n_layer=3, vocab_size=50, context_length=16)).eval()
    records, total = profiling.profile_forward(model, torch.randint(0, 50, (1, 10)))
    ops_seen = [r.op for r in records]
    per_block = ["linear", "attention", "linear", "layernorm_residual", "ffn", "layernorm_residual"]
    assert ops_seen == ["layernorm"] + per_block * 3 + ["linear"]
    table = profiling.format_profile(records, total, profiling.device_limits("cpu"), "float32")
    assert "total forward pass" in table and table.count("\n") == len(records) + 5


def test_profile_of_a_gpt_oss_step():
    # A decode-sized step of gpt-oss: its MoE runs on expert_linear, which the profile costs.
    torch.manual_seed(0)
    cfg = GPTConfig.preset("gpt-oss-20b", vocab_size=97, context_length=64, n_embd=32, n_layer=2, n_head=4,
                           n_kv_head=2, head_width=8, n_experts=6, experts_per_token=2, expert_width=24)
    records, _ = profiling.profile_forward(GPT(cfg).eval(), torch.randint(0, 97, (1, 3)))
    experts = [r for r in records if r.op == "expert_linear"]
    assert [r.shape for r in experts] == ["6x48x32/6", "6x32x24/6"] * 2  # 3 tokens x 2 routes
    first = experts[0]
    assert first.flops == 2.0 * 6 * 48 * 32
    assert first.bytes == 4 * (3 * 32 + 6 * 48 + 6 * 24 + 6 * 48 * 32)  # x, bias, out, six experts' matrices
    assert [r.op for r in records].count("rmsnorm_residual") == 4
    assert [r.op for r in records].count("rope") == 4  # q and k in each layer


def test_profile_command(tmp_path):
    torch.manual_seed(0)
    GPT(GPTConfig(n_embd=32, n_head=2, n_layer=2, context_length=32)).save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "gptext", "profile", "--model", str(tmp_path), "--tokens", "6",
                          "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "6 tokens, batch 1, float32" in out.stdout and "ffn" in out.stdout and "% limit" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "gptext", "profile", "--model", str(tmp_path), "--tokens", "0"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--tokens" in bad.stderr


def test_demo_learns(capsys):
    from gptext import demo

    assert demo.run("cpu", steps=60) == 0
    out = capsys.readouterr().out
    losses = [float(line.split("loss")[1].split()[0]) for line in out.splitlines() if " loss " in line]
    assert losses[-1] < 0.5 * losses[0]
    assert "Beautiful is" in out
