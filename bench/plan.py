"""What the suite runs: the kernel cases and model cases for each device type and mode,
and how long it times each.

quick is what ``make bench`` runs (a few minutes on a 2-core CPU); full is the thorough
run, for a GPU within about four minutes. Families marked first_dtype_only (the row sweeps)
run in the first dtype of the run only: they chart a trend, not a dtype comparison.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gptext import profiling

OPS = ("softmax", "cross_entropy", "linear_cross_entropy", "layernorm_residual", "rmsnorm_residual", "linear", "ffn",
       "rope", "expert_linear", "expert_linear_bwd", "attention", "attention_bwd")
MODES = ("quick", "full")

# Linear epilogues as GPT-2 uses them: c_attn (bias), c_fc (bias + GELU), the projections
# into the residual stream (bias + residual), and the tied head (none).
EPILOGUES = {"": (False, None, False), "+b": (True, None, False), "+b+gelu": (True, "gelu", False),
             "+b+res": (True, None, True)}


@dataclass(frozen=True)
class Timing:
    """Arguments of gptext.profiling.measure(_interleaved) for a case's competitors."""

    warmup: int
    repeats: int
    max_seconds: float

    def measure(self, fn, device, flush_l2: bool = False) -> dict:
        """profiling.measure(fn) under this timing, as the results file stores it (seconds)."""
        return self.measure_together([fn], device, flush_l2)[0]

    def measure_together(self, fns, device, flush_l2: bool = False, contexts=None) -> list[dict]:
        """profiling.measure_interleaved(fns): the competitors of one case in alternating
        rounds, each as the results file stores it (seconds). "interleaved" marks samples
        taken round by round with the others', whose i-th samples are then a pair."""
        return [{"median": m.median, "p10": m.p10, "p90": m.p90, "samples": m.samples, "interleaved": len(fns) > 1}
                for m in profiling.measure_interleaved(fns, device, warmup=self.warmup, repeats=self.repeats,
                                                       max_seconds=self.max_seconds, flush_l2=flush_l2,
                                                       contexts=contexts)]


@dataclass(frozen=True)
class Case:
    """One op at one shape and dtype.

    shape: softmax, cross_entropy, layernorm_residual, rmsnorm_residual: (rows, cols); linear: (M, K, N),
    weight [N, K]; linear_cross_entropy: (rows, K, vocabulary);
    ffn: (M, width), hidden 4 x width; rope: (batch, heads, positions, head_dim); expert_linear(_bwd): (tokens, slots, experts, N, K), with
    epilogue "swiglu" or "routes" (one row of x per route); attention(_bwd): (batch, heads, kv_heads, q_len,
    k_len, head_dim), with epilogue "causal" or "".
    """

    op: str
    family: str
    shape: tuple[int, ...]
    dtype: str
    epilogue: str = ""

    @property
    def label(self) -> str:
        if self.op in ("linear", "linear_cross_entropy"):
            m, k, n = self.shape
            return f"{m}x{k}->{n}" + (f" {self.epilogue}" if self.epilogue else "")
        if self.op.startswith("expert_linear"):
            tokens, slots, experts, n, k = self.shape
            return f"{tokens}x{slots}/{experts}x{k}->{n} {self.epilogue}"
        if self.op.startswith("attention"):
            batch, heads, kv_heads, q_len, k_len, dim = self.shape
            return f"{batch}x{heads}/{kv_heads}x{q_len}x{k_len}x{dim}" + (f" {self.epilogue}" if self.epilogue else "")
        return "x".join(map(str, self.shape))


@dataclass(frozen=True)
class Family:
    op: str
    name: str
    shapes: tuple
    first_dtype_only: bool = False
    dtypes: tuple | None = None  # of the run's dtypes, those it runs in (None: all)


@dataclass(frozen=True)
class ModelCase:
    """prefill: a forward pass over batch x tokens; train: a training step's forward and
    backward pass predicting tokens - 1 positions of batch sequences; decode: generate
    new_tokens after a prompt of `tokens`, for `batch` sequences."""

    phase: str
    batch: int
    tokens: int
    new_tokens: int = 0

    @property
    def label(self) -> str:
        if self.phase == "decode":
            return f"{self.batch}x({self.tokens}+{self.new_tokens})"
        return f"{self.batch}x{self.tokens}"


@dataclass(frozen=True)
class ModelPlan:
    """One model section: a preset (with overrides: a smaller variant of its layout), the
    dtype, and the cases; name is the section's handle (python -m bench --models NAME,...)."""

    preset: str
    dtype: str
    cases: tuple[ModelCase, ...]
    timing: Timing
    decode_timing: Timing
    config_overrides: dict = field(default_factory=dict)
    name: str = ""

    @property
    def handle(self) -> str:
        return self.name or self.preset


def _linear(ms, shapes):
    """GPT-2's linear layers at each M: (M, K, N, epilogue)."""
    return tuple((m, k, n, epilogue) for m in ms for k, n, epilogue in shapes)


_GPT2_LINEARS = ((768, 2304, "+b"), (768, 3072, "+b+gelu"), (3072, 768, "+b+res"))


def _attention(shapes, causal=True):
    """Attention cases: (batch, heads, kv_heads, q_len, k_len, head_dim, "causal" | "")."""
    return tuple((*shape, "causal" if causal else "") for shape in shapes)


# Prefill: T = 1024 to 8192 at head_dim 64 and 128; decode: one query over an 8192-key cache,
# GPT-2-style (12 heads) and gpt-oss-style grouped (64 query heads on 8 KV heads).
_GPU_PREFILL = tuple((1, 16, 16, t, t, d) for d in (64, 128) for t in (1024, 4096, 8192))
_GPU_DECODE = ((1, 12, 12, 1, 8192, 64), (8, 12, 12, 1, 8192, 64), (1, 64, 8, 1, 8192, 64),
               (1, 32, 8, 1, 8192, 128))

# A gpt-oss MoE's two products in a decode step: (tokens, slots, experts, N, K, epilogue),
# the first with the SwiGLU fused, the second over each route's own row. On a GPU
# gpt-oss-20b's own sizes (batch 1 and 8); on a CPU the bench model's narrower experts.
_OSS_GPU_EXPERTS = ((1, 4, 32, 5760, 2880, "swiglu"), (1, 4, 32, 2880, 2880, "routes"), (8, 4, 32, 5760, 2880, "swiglu"))
_OSS_CPU_EXPERTS = ((1, 4, 32, 1536, 768, "swiglu"), (1, 4, 32, 768, 768, "routes"))
# And in a prefill, more routes than experts: the op groups them by expert.
_OSS_GPU_PREFILL_EXPERTS = ((1024, 4, 32, 5760, 2880, "swiglu"),)
_OSS_CPU_PREFILL_EXPERTS = ((64, 4, 32, 1536, 768, "swiglu"), (64, 4, 32, 768, 768, "routes"))
# The backward of a short prefill (256 routes, 8 an expert) on a GPU: the route-by-route
# reference differentiates a gather of a whole expert per route, so its cost grows with the
# routes times all the experts' weights, and a longer prefill would take seconds a call.
_OSS_GPU_BWD_EXPERTS = ((64, 4, 32, 5760, 2880, "swiglu"),)

FAMILIES = {
    ("cpu", "quick"): (
        Family("softmax", "rows", ((4096, 1024), (256, 50257), (16384, 128))),
        Family("cross_entropy", "classifier", ((256, 50257),)),
        Family("layernorm_residual", "rows", ((4096, 768), (1024, 2880), (8, 768))),
        Family("rmsnorm_residual", "rows", ((1024, 2880), (8, 2880))),
        Family("linear", "decode", ((1, 768, 2304, "+b"), (8, 768, 3072, "+b+gelu"), (1, 768, 50257, ""))),
        Family("linear", "prefill", ((512, 768, 2304, "+b"),)),
        Family("ffn", "gpt2", ((1, 768), (256, 768))),
        Family("rope", "gpt-oss", ((1, 64, 256, 64),)),
        Family("expert_linear", "decode", _OSS_CPU_EXPERTS[:1]),
        Family("attention", "prefill", _attention(((1, 12, 12, 128, 128, 64),))),
        Family("attention", "decode", _attention(((1, 12, 12, 1, 1024, 64),))),
        Family("attention_bwd", "prefill", _attention(((1, 4, 4, 128, 128, 64),))),
    ),
    ("cpu", "full"): (
        Family("softmax", "rows", ((4096, 1024), (256, 50257), (16384, 128))),
        Family("softmax", "sweep", ((1, 1024), (16, 1024), (256, 1024)), first_dtype_only=True),
        Family("cross_entropy", "classifier", ((256, 50257), (16, 201088))),
        # Not fp16: eager's fp16 GEMMs run at under a GFLOP/s on a CPU without AVX512_FP16.
        Family("linear_cross_entropy", "gpt2 head", ((1024, 768, 50257),), dtypes=("float32", "bfloat16")),
        Family("layernorm_residual", "rows", ((4096, 768), (1024, 2880), (8, 768))),
        Family("rmsnorm_residual", "rows", ((1024, 2880), (8, 2880))),
        Family("linear", "decode", _linear((1, 8), _GPT2_LINEARS + ((768, 50257, ""),))),
        Family("linear", "prefill", _linear((512,), _GPT2_LINEARS)),
        Family("ffn", "gpt2", ((1, 768), (8, 768), (256, 768))),
        Family("rope", "gpt-oss", ((1, 64, 256, 64), (1, 8, 256, 64))),
        Family("expert_linear", "decode", _OSS_CPU_EXPERTS),
        Family("expert_linear", "prefill", _OSS_CPU_PREFILL_EXPERTS),
        Family("expert_linear_bwd", "prefill", _OSS_CPU_PREFILL_EXPERTS[:1]),
        Family("attention", "prefill", _attention(((1, 12, 12, 128, 128, 64), (1, 12, 12, 512, 512, 64)))),
        Family("attention", "decode", _attention(((1, 12, 12, 1, 1024, 64), (1, 16, 2, 1, 2048, 64)))),
        Family("attention_bwd", "prefill", _attention(((1, 4, 4, 128, 128, 64),))),
    ),
    ("cuda", "quick"): (
        Family("softmax", "rows", ((16384, 1024), (8192, 50257))),
        Family("cross_entropy", "classifier", ((8192, 50257),)),
        Family("linear_cross_entropy", "gpt2 head", ((8192, 768, 50257),)),
        Family("layernorm_residual", "rows", ((16384, 768), (16384, 2880))),
        Family("rmsnorm_residual", "rows", ((16384, 2880),)),
        Family("linear", "square", ((4096, 4096, 4096, ""),)),
        Family("linear", "prefill", ((8192, 768, 2304, "+b"),)),
        Family("linear", "decode", ((1, 768, 2304, "+b"),)),
        Family("ffn", "gpt2", ((8192, 768),)),
        Family("rope", "gpt-oss", ((4, 64, 4096, 64),)),
        Family("expert_linear", "decode", _OSS_GPU_EXPERTS[:1]),
        Family("attention", "prefill", _attention(((1, 16, 16, 1024, 1024, 64), (1, 16, 16, 4096, 4096, 64)))),
        Family("attention", "decode", _attention(((1, 64, 8, 1, 8192, 64),))),
        Family("attention_bwd", "prefill", _attention(((1, 16, 16, 1024, 1024, 64),))),
    ),
    ("cuda", "full"): (
        Family("softmax", "rows", ((16384, 1024), (8192, 50257))),
        Family("softmax", "sweep", tuple((rows, 1024) for rows in (1, 4, 16, 64, 256, 1024, 4096)),
               first_dtype_only=True),
        Family("cross_entropy", "classifier", ((8192, 50257), (2048, 201088))),
        Family("linear_cross_entropy", "head", ((8192, 768, 50257), (2048, 2880, 201088))),
        Family("layernorm_residual", "rows", ((16384, 768), (16384, 1600), (16384, 2880))),
        Family("rmsnorm_residual", "rows", ((16384, 2880),)),
        Family("linear", "square", ((4096, 4096, 4096, ""),)),
        Family("linear", "prefill", _linear((8192,), _GPT2_LINEARS)),
        Family("linear", "decode", _linear((1, 8), _GPT2_LINEARS)),
        Family("ffn", "gpt2", ((8192, 768),)),
        Family("rope", "gpt-oss", ((4, 64, 4096, 64), (4, 8, 4096, 64))),
        Family("expert_linear", "decode", _OSS_GPU_EXPERTS),
        Family("expert_linear", "prefill", _OSS_GPU_PREFILL_EXPERTS),
        Family("expert_linear_bwd", "prefill", _OSS_GPU_BWD_EXPERTS, first_dtype_only=True),
        Family("attention", "prefill", _attention(_GPU_PREFILL), first_dtype_only=True),
        Family("attention", "decode", _attention(_GPU_DECODE), first_dtype_only=True),
        Family("attention_bwd", "prefill", _attention(((1, 16, 16, 4096, 4096, 64), (1, 16, 16, 4096, 4096, 128))),
               first_dtype_only=True),
    ),
}

DTYPES = {
    ("cpu", "quick"): ("float32", "bfloat16"),
    ("cpu", "full"): ("float32", "bfloat16", "float16"),
    ("cuda", "quick"): ("bfloat16", "float32"),
    ("cuda", "full"): ("bfloat16", "float16", "float32"),
}

KERNEL_TIMING = {
    ("cpu", "quick"): Timing(warmup=3, repeats=25, max_seconds=0.5),
    ("cpu", "full"): Timing(warmup=3, repeats=30, max_seconds=1.5),
    ("cuda", "quick"): Timing(warmup=5, repeats=50, max_seconds=0.3),
    ("cuda", "full"): Timing(warmup=10, repeats=100, max_seconds=0.5),
}

# Decode timings are whole generate calls (seconds each on a CPU), taken in rounds over the
# competitors (bench.model): `repeats` rounds (at least 3), after a generate(2) per
# competitor and `warmup` full calls more (on CUDA one, as it captures gptext's decode
# graph for that length); max_seconds is not used.
#
# Each device and mode runs a GPT-2 section and a gpt-oss section. The gpt-oss section keeps
# gpt-oss-20b's layout (201,088-token vocabulary, grouped-query attention with sinks, a
# 128-token window on even layers, 4 of 32 experts per token) at a size that three copies of
# (gptext, its reference, transformers) fit in memory: on a CPU a narrower model of 4
# layers, on a GPU gpt-oss-20b's own widths with 2 of its 24 layers.
_OSS_CPU = dict(n_embd=768, n_layer=4, n_head=16, n_kv_head=2, head_width=64, expert_width=768,
                context_length=4096)
_OSS_GPU = dict(n_layer=2, context_length=8192)


def _cases(prefill=(), decode=(), train=()):
    """Model cases from (batch, tokens) prefills, (batch, tokens, new_tokens) decodes and
    (batch, tokens) training steps (forward and backward over tokens - 1 predictions)."""
    return (*(ModelCase("prefill", *p) for p in prefill), *(ModelCase("train", *t) for t in train),
            *(ModelCase("decode", *d) for d in decode))


def _sections(dtype, timing, decode_timing, oss_overrides, gpt2_cases, oss_cases, oss_timing=None):
    return (ModelPlan("gpt2-124m", dtype, gpt2_cases, timing, decode_timing, name="gpt2"),
            ModelPlan("gpt-oss-20b", dtype, oss_cases, oss_timing or timing, decode_timing, oss_overrides,
                      name="gpt-oss"))


MODEL_PLANS = {
    ("cpu", "quick"): _sections("float32", Timing(1, 5, 2.0), Timing(0, 3, 0.0), _OSS_CPU,
                                _cases([(1, 128), (4, 128)], [(1, 128, 128)], [(4, 129)]),
                                _cases([(1, 256)], [(1, 256, 32)])),
    ("cpu", "full"): _sections("float32", Timing(1, 10, 5.0), Timing(0, 5, 60.0), _OSS_CPU,
                               _cases([(1, 128), (4, 128), (8, 256)], [(1, 128, 128), (8, 128, 128)], [(4, 257)]),
                               _cases([(1, 256), (4, 256)], [(1, 256, 64), (4, 256, 64)])),
    ("cuda", "quick"): _sections("bfloat16", Timing(3, 20, 1.0), Timing(1, 3, 0.0), _OSS_GPU,
                                 _cases([(1, 128), (8, 1024)], [(1, 128, 128)], [(8, 1025)]),
                                 _cases([(1, 1024)], [(1, 128, 64)])),
    ("cuda", "full"): _sections("bfloat16", Timing(3, 30, 1.0), Timing(1, 5, 20.0), _OSS_GPU,
                                _cases([(1, 128), (1, 1024), (8, 1024)], [(1, 128, 128), (8, 128, 128)], [(8, 1025)]),
                                _cases([(1, 1024), (4, 4096)], [(1, 128, 128), (8, 128, 128)]),
                                oss_timing=Timing(3, 20, 1.0)),
}
MODELS = ("gpt2", "gpt-oss")


def model_plans(device_type: str, mode: str, names=MODELS) -> tuple[ModelPlan, ...]:
    """The model sections of a run, in MODELS order, keeping those named."""
    return tuple(plan for plan in MODEL_PLANS[device_type, mode] if plan.handle in names)


def kernel_cases(device_type: str, mode: str, ops=OPS, dtypes=None, shape_filters=()) -> list[Case]:
    """The cases of a run, op by op in OPS order, each shape in every dtype (the first one
    only for first_dtype_only families); shape_filters keep the cases whose label contains
    one of them."""
    dtypes = tuple(dtypes or DTYPES[device_type, mode])
    cases = []
    for op in OPS:
        if op not in ops:
            continue
        for family in FAMILIES[device_type, mode]:
            if family.op != op:
                continue
            for shape in family.shapes:
                dims, epilogue = (tuple(shape[:-1]), shape[-1]) if isinstance(shape[-1], str) else (tuple(shape), "")
                for dtype in dtypes[:1] if family.first_dtype_only else dtypes:
                    if family.dtypes is not None and dtype not in family.dtypes:
                        continue
                    if op.startswith("attention") and device_type == "cuda" and dtype == "float32":
                        continue  # the fused CUDA attention takes bf16/fp16; fp32 runs the reference
                    cases.append(Case(op, family.name, dims, dtype, epilogue))
    if shape_filters:
        cases = [c for c in cases if any(f in c.label for f in shape_filters)]
    return cases
