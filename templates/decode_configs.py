"""Launch configs of the decode-attention kernel (templates/decode_attention.py): the config and
spec dataclasses, the rules that pick a config per spec (`default_config_for`), the autotune list
(`candidate_configs`) and the autotuner (`tune`), and the JSON cache of tuned configs, keyed by
(bits, group, head_dim, dtype, length bucket, GQA, batch bucket), so a second process does not
re-tune. Plain Python (no Triton import): the backend can switch autotuning on without loading
the kernels.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

log = logging.getLogger("kvpass")

_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel. `DecodeConfig()` is the safe default (valid for
    every supported spec: BLOCK_N is clipped to the group size)."""

    block_n: int = 64          # tokens per step (the dot variant clips it to the group size)
    use_dot: bool = True       # tensor-core variant; else the CUDA-core rows variant (best for MHA)
    use_asm: bool = True       # packed 16-bit unpacking in inline PTX (GPU); else fp32 unpacking
    num_warps: int = 4
    num_stages: int = 2
    ctas_per_sm: int = 4       # split-KV target: B * Hkv * splits ~ ctas_per_sm * SMs; 0: whole waves of the
                               # compiled kernel's resident programs (`wave_splits`)
    min_groups_per_split: int = 4
    pad_heads: int = 16        # dot variant: query rows per program padded to >= this (1 = exact)
    fuse_reduce: bool = True   # with several splits, the last program of a row reduces them (one launch;
                               # Gluon kernel: MHA launches without window splits, `decode_mma.fuse_reduce`)
    max_regs: int = 0          # registers per thread the compiler may use (Triton's maxnreg; 0: no cap). A cap
                               # trades spills for more resident programs (one-warp programs: 12 per
                               # SM from 168 down, 16 from 128; caps of 169-255 keep 8, see
                               # `resident_programs`); ignored by the interpreter
    use_mma: bool = False      # CUDA: the Gluon tensor-core kernel (MHA and GQA/MQA, masks too)
                               # (templates/decode_mma.py; `mma_unsupported` says when not)
    window_splits: int = -1    # Gluon kernel: splits that take the full-precision window rows alone.
                               # -1: splits without quantized tokens (free wave slots added when the
                               # splits are long) when the rule of `decode_mma.window_splits` says so;
                               # 0: window rows dealt over all splits; k > 0: k extra splits, always

    def __post_init__(self):
        if not (self.max_regs == 0 or 24 <= self.max_regs <= 255):
            raise ValueError(f"kvpass DecodeConfig: max_regs {self.max_regs!r} is not 0 (no cap) or 24..255 "
                             "registers per thread")
        if not (isinstance(self.window_splits, int) and self.window_splits >= -1):
            raise ValueError(f"kvpass DecodeConfig: window_splits {self.window_splits!r} is not -1 (automatic), "
                             "0 (window rows over all splits) or a positive number of window splits")


DEFAULT_CONFIG = DecodeConfig()


@dataclass(frozen=True)
class DecodeSpec:
    """What selects a compiled specialization."""

    key_bits: int
    value_bits: int
    group_size: int
    head_dim: int
    dtype: torch.dtype
    rep: int = 1  # query heads per KV head


def kernel_name(spec: DecodeSpec) -> str:
    bits = f"b{spec.key_bits}" if spec.key_bits == spec.value_bits else f"k{spec.key_bits}v{spec.value_bits}"
    return f"kvpass_attn_{bits}_g{spec.group_size}_d{spec.head_dim}_{_DTYPE_NAMES.get(spec.dtype, str(spec.dtype))}"


def length_bucket(n: int) -> int:
    """Power-of-two bucket of the attended length (4096, 8192, ...; minimum 1024)."""
    return max(1024, 1 << max(0, (max(n, 1) - 1).bit_length()))


def batch_bucket(n: int) -> int:
    """Power-of-two bucket of the batch size (1, 2, 4, ...)."""
    return 1 << max(0, (max(n, 1) - 1).bit_length())


# config_key(...) -> config: fixed entries that win over the rules (none yet: the rules in
# `default_config_for` are what the H100 sweeps found); tuned entries (JSON cache) win over both.
CONFIG_TABLE: dict[tuple, DecodeConfig] = {}

_TUNED_CACHE: dict[tuple, DecodeConfig] | None = None


def _cache_path() -> str:
    return os.environ.get("KVPASS_CONFIG_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "kvpass", "decode_configs.json"))


def _load_tuned() -> dict:
    global _TUNED_CACHE
    if _TUNED_CACHE is None:
        _TUNED_CACHE = {}
        try:
            with open(_cache_path()) as f:
                for row in json.load(f):
                    _TUNED_CACHE[tuple(row["key"])] = DecodeConfig(**row["config"])
        except (OSError, ValueError, TypeError, KeyError):
            pass
    return _TUNED_CACHE


def save_tuned(key: tuple, cfg: DecodeConfig):
    """Record a tuned config so later processes do not re-tune (JSON beside the user's cache)."""
    _CHOSEN.clear()
    table = _load_tuned()
    table[key] = cfg
    path = _cache_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump([{"key": list(k), "config": asdict(c)} for k, c in table.items()], f)
    except OSError as e:  # a read-only home is not an error: the config is still used in-process
        log.info("kvpass: could not save tuned decode config to %s (%s)", path, e)


def config_key(spec: DecodeSpec, length: int, batch: int = 1) -> tuple:
    """(key bits, value bits, group, head_dim, dtype name, length bucket, GQA, batch bucket)."""
    return (spec.key_bits, spec.value_bits, spec.group_size, spec.head_dim, _DTYPE_NAMES.get(spec.dtype, "?"),
            length_bucket(length), spec.rep > 1, batch_bucket(batch))


def rows_warps(spec: DecodeSpec, block_n: int) -> int:
    """Warps that hold one rows-kernel step without replication: BLOCK_N / 2 rows, each row's key
    words spread over threads in 16-byte vectors (2-bit D=128: 8 words, 2 threads per row)."""
    words = spec.head_dim * spec.key_bits // 32
    return max(1, (block_n // 2) * max(1, words // 4) // 32)


# Programs per SM assumed when the compiled kernel's occupancy is unknown (CPU interpreter, a
# Triton without `n_regs`, or the first call of a specialization inside a CUDA-graph capture).
FALLBACK_CTAS_PER_SM = 8


@dataclass(frozen=True)
class SMLimits:
    """Per-SM limits that bound resident programs (CUDA occupancy rules)."""

    regs: int = 65536          # 32-bit registers per SM
    warp_granularity: int = 4  # warps held by an SM's registers come in multiples of this (one per
                               # sub-partition: 4 on sm_70 and later, 2 on sm_60)
    max_warps: int = 64        # resident warps per SM
    max_blocks: int = 32       # resident blocks (programs) per SM: 32 on sm_80/sm_90, 16 on sm_86/87, 24 on sm_89
    shared: int = 233472       # shared memory per SM, bytes (228 KiB on sm_90)


def sm_limits(props) -> SMLimits:
    """SMLimits of a torch.cuda device-properties object (attributes it lacks keep the H100 values)."""
    major, minor = getattr(props, "major", 9), getattr(props, "minor", 0)
    blocks = 16 if (major, minor) in ((8, 6), (8, 7)) else 24 if (major, minor) == (8, 9) else 32
    return SMLimits(regs=getattr(props, "regs_per_multiprocessor", 65536),
                    warp_granularity=2 if (major, minor) == (6, 0) else 4,
                    max_warps=getattr(props, "max_threads_per_multi_processor", 2048) // 32,
                    max_blocks=blocks, shared=getattr(props, "shared_memory_per_multiprocessor", 233472))


def resident_programs(n_regs: int, num_warps: int, shared_bytes: int, limits: SMLimits = SMLimits()) -> int:
    """Programs of one compiled kernel resident at once on an SM: registers are allocated per warp
    in units of 256 (8 per thread) and the warps they hold come in multiples of
    `warp_granularity` (each sub-partition's register file holds whole warps: 200 registers per
    thread fit 10 warps in 65536 registers but only 2 per 16384-register quarter, so 8), then the
    warp, block and shared-memory limits. H100, session 18 (benchmarks/NOTES.md): a split plan for
    10 one-warp programs per SM at 200 registers ran 40-50 % slower than the uncapped kernel's plan
    for 8, as a second wave would."""
    regs_per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    warps_by_regs = limits.regs // regs_per_warp // limits.warp_granularity * limits.warp_granularity
    by_regs = warps_by_regs // num_warps
    by_warps = limits.max_warps // num_warps
    by_smem = limits.shared // shared_bytes if shared_bytes > 0 else limits.max_blocks
    return max(1, min(by_regs, by_warps, by_smem, limits.max_blocks))


def wave_splits(units: int, resident_total: int, max_waves: int = 4) -> int:
    """Splits per unit (B * heads programs per split) that fill whole waves of `resident_total`
    programs (resident programs per SM x SMs). Fewer units than resident slots: one wave, as many
    splits as fit. More: the split count (<= max_waves) whose last wave is fullest, fewest waves on
    ties. Why (H100 graph replays, results/tune_graph_s6_ctas_b*.csv): a decode program streams
    its tokens at a rate set by memory latency, so time ~ waves x tokens per program; a partial
    last wave costs as much as a full one. 2-bit rows (Triton 3.6: 240 registers, 1 warp: 8 per
    SM, 1056): batch 8 -> 4 splits, 1024 programs, 179 us; 5 splits (1280, a second wave) 233 us.
    4-bit rows (154-166 registers, 2 warps: 6 per SM, 792): batch 8 -> 3 splits (768) 251 us, 4
    (1024) 321 us; batch 32 -> 3 splits (3072 = 3.9 waves) 990 us, 1 split (1.3 waves) 1251 us
    (results/tune_graph_s7_ctas_b*.csv: within 1-7 % of the best fixed target in every shape)."""
    if units <= 0 or resident_total <= 0:
        return 1
    if units <= resident_total:
        return resident_total // units
    best, best_fill = 1, 0.0
    for s in range(1, max_waves + 1):
        waves = -(-units * s // resident_total)
        fill = units * s / (waves * resident_total)
        if fill > best_fill + 1e-9:
            best, best_fill = s, fill
    return best


def default_config_for(spec: DecodeSpec, batch: int = 1) -> DecodeConfig:
    """Rules distilled from the H100 sweeps (benchmarks/NOTES.md, 2026-11-22, D=128):
    MHA: the CUDA-core rows variant beats every tensor-core config; since session 5 (two tokens of a
    key group per thread) with 32-token blocks in the fewest warps that hold them (`rows_warps`:
    1 warp for 2-bit D=128, 2 for 4-bit; 64- and 128-token blocks hold more registers and lose,
    results/tune_graph_s5_pairs*.csv), splits filling whole waves of resident programs
    (ctas_per_sm 0, `wave_splits`).
    GQA/MQA at batch 1: the same rows config (one program per query head): 32/8 heads, T=32k,
    2-bit G32: 52.5 us vs 65-67 us for the tensor-core variant in graph replays
    (results/tune_graph_s5_gqa.csv).
    GQA/MQA at batch >= 2: the tensor-core variant with unpadded query rows, one key group per step,
    1 warp and many splits (short programs, many in flight); rows lost 15-50 % there at batch
    8-32 (results/attention.csv run of session 5). Session 7 graph replays, batch 8 32/8 T16k 2-bit
    (results/tune_graph_s7_gqa_*.csv): G32 1 warp 168 us vs 2 warps 215. Session 8 (window loads
    vectorized, one-pass reduce; results/tune_graph_s8_regs_*.csv): 2 stages and whole-wave splits
    (ctas_per_sm 0; 8 programs of 255 registers per SM) beat 3 stages at 32 programs per SM in
    every shape swept: batch 8 T16k G32 125 vs 176 us, G128 198 vs 274 us; batch 32 T16k G32 458 vs
    593 us; batch 8 T32k 235 vs 316 us. Register caps (max_regs 128/168/200) lost or gained < 5 %."""
    if spec.rep == 1 or batch == 1:
        cfg = replace(DEFAULT_CONFIG, use_dot=False, block_n=32, num_warps=rows_warps(spec, 32), num_stages=2,
                      ctas_per_sm=0)
    else:
        cfg = replace(DEFAULT_CONFIG, use_dot=True, pad_heads=1,
                      block_n=64 if spec.group_size >= 64 else min(32, spec.group_size), num_warps=1, num_stages=2,
                      ctas_per_sm=0)
    # On a GPU: the Gluon tensor-core kernel. GQA/MQA since session 10 (results/ab_mma_s10.log,
    # 32/8 heads T16k 2-bit G32: batch 1 29.8 -> 20.4 us, batch 8 131 -> 71, batch 32 466 -> 245; G128
    # batch 8 239 -> 72-80; 4-bit batch 8 139 -> 90-95); host lengths too since session 13. MHA since
    # session 15 (one query head in the MMA's 8 columns; results/ab_mma_s15.log, 32/32 heads T16k, vs
    # the rows rule: 2-bit G32 batch 8 181.2 -> 168.5 us, batch 32 688.8 -> 629.0, batch 1 31.2 -> 29.9;
    # G128 batch 8 190.7 -> 159.6; 4-bit batch 8 250.8 -> 241.5); attention masks since session 15.
    # Calls it does not take (CPU, other specs) run the rule above, with a log line.
    # At least 128 tokens per split (G128 at batch 1 had a quarter of the programs a wave holds).
    return replace(cfg, use_mma=True, min_groups_per_split=max(1, 128 // spec.group_size))


_CHOSEN: dict = {}


def get_config(spec: DecodeSpec, length: int, batch: int = 1,
               tune_with: Callable[[DecodeConfig], torch.Tensor] | None = None) -> DecodeConfig:
    """Tuned (JSON cache) > CONFIG_TABLE > autotune (when enabled and `tune_with` is given, see
    `tune`) > rules; memoized per config key."""
    key = config_key(spec, length, batch)
    cfg = _CHOSEN.get(key)
    if cfg is None:
        cfg = _load_tuned().get(key) or CONFIG_TABLE.get(key)
        if cfg is None and tune_with is not None and _AUTOTUNE[0]:
            if _capturing():  # no timing inside a CUDA-graph capture; not memoized: tune at the next call
                return default_config_for(spec, batch)
            cfg = tune(spec, length, batch, tune_with)
        cfg = cfg or default_config_for(spec, batch)
        _CHOSEN[key] = cfg
    return cfg


# ---------------------------------------------------------------------------------------------
# Autotuning

_AUTOTUNE = [os.environ.get("KVPASS_AUTOTUNE", "0") == "1"]

# Largest max|candidate - default| / max|default| accepted from a candidate config, by model dtype.
# Two correct configs differ by at most the sum of their errors against the exact result, and the
# kernel tests bound each (tests/test_kernels.py TOLERANCE) by ~3x the reference's rounding of K/V
# times |out| plus the output's rounding: fp32 ~1e-6 relative (summation order), fp16 2**-11 and
# bf16 2**-9 per rounding, times a few roundings (q*s, p, V). These bounds leave a 4-8x margin over
# that and still reject a wrong config, whose error is of the order of |out| itself.
CANDIDATE_REL_ERR = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}


def set_autotune(on: bool) -> None:
    """Process-wide switch (also KVPASS_AUTOTUNE=1, or kvpass.backend(autotune=True)): the first
    decode call of a config key not in the tuned cache times `candidate_configs` on its own inputs
    and records the fastest correct one (`save_tuned`), so later calls and processes reuse it."""
    if not isinstance(on, bool):
        raise TypeError(f"kvpass: set_autotune takes True or False, got {on!r}")
    _AUTOTUNE[0] = on
    _CHOSEN.clear()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def autotune_enabled() -> bool:
    return _AUTOTUNE[0]


def candidate_configs(spec: DecodeSpec, batch: int = 1) -> list[DecodeConfig]:
    """The autotune list of a spec: the rule's config first (the safe default), then the variants
    the H100 sweeps found close to it (benchmarks/results/tune_graph_s5*.csv). Configs that do not
    compile for a spec on some Triton version (e.g. rows blocks with more rows than threads on
    3.6) are skipped by `tune`."""
    rows = [replace(DEFAULT_CONFIG, use_dot=False, block_n=bn, num_warps=rows_warps(spec, bn), num_stages=2,
                    ctas_per_sm=ctas) for bn, ctas in ((32, 0), (32, 4), (32, 6), (32, 8), (32, 12), (32, 16), (64, 0))]
    g = min(32, spec.group_size)
    dots = [replace(DEFAULT_CONFIG, use_dot=True, pad_heads=1, block_n=bn, num_warps=w, num_stages=ns, ctas_per_sm=c)
            for bn, w, ns, c in ((g, 1, 2, 0), (min(64, spec.group_size), 1, 2, 0), (g, 1, 3, 32), (g, 2, 3, 32),
                                 (min(64, spec.group_size), 1, 3, 32), (g, 4, 3, 16))]
    out = [default_config_for(spec, batch)]
    for cfg in rows + dots:
        if cfg not in out:
            out.append(cfg)
    return out


def _time_call(fn: Callable[[], object], device: torch.device, reps: int = 10) -> float:
    """Seconds per call: the median of 3 rounds of `reps` calls (CUDA events on a GPU)."""
    fn()  # compile / warm
    rounds = []
    for _ in range(3):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            rounds.append(start.elapsed_time(end) / 1e3 / reps)
        else:
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            rounds.append((time.perf_counter() - t0) / reps)
    return sorted(rounds)[1]


def _compile_errors() -> tuple[type, ...]:
    """What a candidate that does not compile or launch for a spec raises (skipped by `tune`)."""
    errors: list[type] = [RuntimeError, ValueError]
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources

        errors += [CompilationError, OutOfResources]
    except ImportError:
        pass
    return tuple(errors)


def tune(spec: DecodeSpec, length: int, batch: int, run: Callable[[DecodeConfig], torch.Tensor],
         timer: Callable[[Callable[[], object], torch.device], float] | None = None) -> DecodeConfig:
    """Time `run(cfg)` (one decode call on the caller's inputs, returning its output) for every
    candidate config, keep the fastest whose output matches the default's (CANDIDATE_REL_ERR),
    record it under config_key(spec, length, batch) in the JSON cache and return it. `get_config`
    never calls it while a CUDA graph is being captured (the default is used then, and tuning waits
    for an uncaptured call)."""
    cands = candidate_configs(spec, batch)
    default = cands[0]
    ref = run(default)
    timer = timer or _time_call
    tol = CANDIDATE_REL_ERR.get(spec.dtype, CANDIDATE_REL_ERR[torch.float32])
    scale = ref.float().abs().max().clamp_min(1e-30)
    results = []
    for cfg in cands:
        try:
            out = ref if cfg == default else run(cfg)
            err = float((out.float() - ref.float()).abs().max() / scale)
            if not err <= tol:  # NaN fails too
                log.warning("kvpass autotune: %s gave a wrong output for %s (rel err %.2e > %.0e); skipped",
                            cfg, kernel_name(spec), err, tol)
                continue
            results.append((timer(lambda: run(cfg), ref.device), cfg))
        except _compile_errors() as e:
            log.info("kvpass autotune: %s does not run for %s (%s: %s); skipped",
                     cfg, kernel_name(spec), type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    if not results:
        return default
    best_t, best = min(results, key=lambda r: r[0])
    t_default = next((t for t, c in results if c == default), float("nan"))
    save_tuned(config_key(spec, length, batch), best)
    log.info("kvpass autotune: %s, length %d, batch %d: %s (%.1f us; default %.1f us; %d candidates timed)",
             kernel_name(spec), length, batch, best, best_t * 1e6, t_default * 1e6, len(results))
    return best
