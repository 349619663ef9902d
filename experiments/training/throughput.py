"""Where a step's time goes: model FLOPs and utilisation, time waiting for data, compile time, device memory, and
profiler traces of chosen steps. The trainer logs these with every train event:

    tokens_per_s        tokens of the logging window / its wall time
    model_flops_per_s   tokens_per_s * model FLOPs per token (below)
    mfu                 model_flops_per_s / the devices' peak FLOP/s (train.peak_flops per device; 0: the device
                        kind's dense bfloat16 peak from the vendor's figures, or on CPU a float32 matmul peak
                        measured once per process, which the host's fake devices share)
    data_wait_fraction  share of the window's wall time the loop spent fetching and preparing batches (the host's
                        time: with asynchronous dispatch part of it overlaps the device's work, so it bounds the
                        device's wait from above)
    compile_s           seconds spent tracing, lowering and compiling since the run started (the first event)
    memory_in_use_mb, memory_peak_mb   this process's first device's allocator figures, where the backend reports them (not on CPU)

Model FLOPs per token are PaLM's count (Chowdhery et al. 2022, appendix B): 6 x the matmul parameters a token
uses (models.parameter_count(active=True): the routed experts at top_k / num_experts of theirs; the input embedding
left out since it is a lookup, the output projection in) + 12 x attention layers x seq_len x the attention width
(scores and values, forward and backward, over the full context) + 3 x the chunked SSD's products per Mamba-2
layer (`ssd_flops_per_token`). `train.profile_steps="A:B"` writes a JAX profiler trace of steps A..B into
WORKDIR/profile/ (TensorBoard's profile plugin or XProf open it).
"""

import functools
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import models

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
PEAK_FLOPS = {  # device_kind prefix -> dense bfloat16 matmul FLOP/s per device (vendor figures)
    "NVIDIA H200": 989e12, "NVIDIA H100": 989e12, "NVIDIA A100": 312e12, "NVIDIA L4": 121e12,
    "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12,
}
ATTENTION_MIXERS = "AE"  # hybrid layer letters whose mixer is attention


def parse_profile_steps(spec: str) -> tuple[int, int] | None:
    """"A:B" -> (A, B) with 1 <= A <= B; "" -> None; ValueError otherwise."""
    if not spec:
        return None
    first, _, last = spec.partition(":")
    try:
        steps = (int(first), int(last or first))
    except ValueError:
        steps = (0, 0)
    if not 1 <= steps[0] <= steps[1]:
        raise ValueError(f"train.profile_steps={spec!r} is not 'A:B' with 1 <= A <= B (the steps to trace)")
    return steps


def problems(config) -> list[str]:
    try:
        parse_profile_steps(config.train.profile_steps)
    except ValueError as e:
        return [str(e)]
    return []


def _layers_of(m, letters: str) -> int:
    """How many of the model's layers are of the hybrid kinds `letters` (A, E: attention; S: Mamba-2); a model
    without a layer pattern is all attention."""
    pattern = m.get("layer_pattern", "A")
    return sum(pattern[i % len(pattern)] in letters for i in range(m.num_layers))


def ssd_flops_per_token(m, seq_len: int) -> float:
    """The chunked SSD's matmuls (models/ssd.py) per token of one Mamba-2 layer, forward: within a chunk of T
    positions C B^T (2 G T N) and its product with x (2 H T P), dense over the whole chunk as the attention count
    is over the whole context; the chunk's state B^T x (2 H P N) and the entering state read by C (2 H P N). T is
    the chunk (at most seq_len). Left out: segsum's cumulative sum, which models/ssd.py runs as a T x T x T matmul
    for its accuracy, and the elementwise decays."""
    from models import mamba2
    chunk = min(m.chunk_size or mamba2.chunk_size_for_backend(), seq_len)
    heads, head_dim = m.expand * m.d_model // m.ssm_head_dim, m.ssm_head_dim
    return 2.0 * m.ssm_groups * chunk * m.ssm_state + 2.0 * heads * chunk * head_dim + 4.0 * heads * head_dim * m.ssm_state


def model_flops_per_token(model_config, seq_len: int) -> float:
    """PaLM's model FLOPs per token of a training step (forward and backward) of `config.model`: 6 x the parameters
    a token uses (models.parameter_count(active=True); the input embedding left out unless tied, as a lookup) plus
    3 x the forward FLOPs of the sequence mixing the parameters do not count: attention's 4 x seq_len x width per
    layer, and the SSD's (`ssd_flops_per_token`) per Mamba-2 layer."""
    m = model_config
    if "num_heads" not in m:  # not a language model (an SAE): 6 x its parameters per row
        shapes = jax.eval_shape(models.build(m).init, jax.random.key(0), models.example_inputs(m))
        return 6.0 * sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
    lookups = ("position_embedding",) if m.get("tie_embeddings") else ("embed", "position_embedding")
    used = models.parameter_count(m, seq_len, exclude=lookups, active=True)
    width = m.num_heads * (m.head_dim or m.d_model // m.num_heads)
    mixing = 4.0 * seq_len * width * _layers_of(m, ATTENTION_MIXERS)
    ssd_layers = _layers_of(m, "S")
    if ssd_layers:  # only a config with Mamba-2 layers has the SSD's keys
        mixing += ssd_flops_per_token(m, seq_len) * ssd_layers
    return 6.0 * used + 3.0 * mixing


@functools.cache
def _measured_cpu_peak() -> float:
    """The host's float32 matmul FLOP/s: the best of three 1024 x 1024 products."""
    a = jnp.asarray(np.random.default_rng(0).standard_normal((1024, 1024), np.float32))
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a))
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


def peak_flops(per_device: float, devices) -> float:
    """The FLOP/s the devices can do together: `per_device` (if > 0) or the device kind's known peak times their
    number; on CPU the measured host peak (its fake devices share the host's cores)."""
    if per_device:
        return per_device * len(devices)
    if devices[0].platform == "cpu":
        return _measured_cpu_peak()
    kind = devices[0].device_kind
    known = next((peak for prefix, peak in PEAK_FLOPS.items() if kind.startswith(prefix)), None)
    return known * len(devices) if known else float("nan")


def device_memory(device) -> dict[str, float]:
    stats = device.memory_stats() or {}
    out = {}
    if "bytes_in_use" in stats:
        out["memory_in_use_mb"] = stats["bytes_in_use"] / 2**20
    if "peak_bytes_in_use" in stats:
        out["memory_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


class StepClock:
    """The loop's stopwatch: data time per window, compile time since the start, the profiler's trace window."""

    def __init__(self, config, workdir: str, devices, tokens_per_step: int, flops_per_token: float):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak = peak_flops(config.train.peak_flops, devices)
        self.device = next(d for d in devices if d.process_index == jax.process_index())  # memory_stats: own devices only
        self.profile = parse_profile_steps(config.train.profile_steps)
        self.profile_dir = os.path.join(workdir, "profile")
        self.data_seconds = self.compile_seconds = 0.0
        self._compile_reported = False
        self._tracing = False
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)

    def _on_duration(self, event: str, seconds: float, **unused) -> None:
        if event in COMPILE_EVENTS:
            self.compile_seconds += seconds

    def data(self):
        """Context manager around fetching and preparing a batch."""
        return _Timed(self)

    def before_step(self, step: int) -> None:
        """`step` is the step about to run (1-based)."""
        if self.profile and step == self.profile[0] and not self._tracing:
            jax.profiler.start_trace(self.profile_dir)
            self._tracing = True

    def after_step(self, step: int, state) -> None:
        if self._tracing and step >= self.profile[1]:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self._tracing = False

    def window_metrics(self, steps: int, seconds: float) -> dict[str, float]:
        """The throughput figures of a logging window of `steps` steps and `seconds` wall time; resets data time."""
        tokens_per_s = self.tokens_per_step * steps / seconds
        out = {"tokens_per_s": tokens_per_s, "model_flops_per_s": tokens_per_s * self.flops_per_token,
               "mfu": tokens_per_s * self.flops_per_token / self.peak, "data_wait_fraction": self.data_seconds / seconds,
               **device_memory(self.device)}
        if not self._compile_reported:
            out["compile_s"] = self.compile_seconds
            self._compile_reported = True
        self.data_seconds = 0.0
        return out

    def close(self) -> None:
        if self._tracing:
            jax.profiler.stop_trace()
            self._tracing = False
        jax.monitoring.unregister_event_duration_listener(self._on_duration)


class _Timed:
    def __init__(self, clock: StepClock):
        self.clock = clock

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.clock.data_seconds += time.perf_counter() - self.start
