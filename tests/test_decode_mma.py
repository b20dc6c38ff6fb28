"""The Gluon tensor-core decode kernel (GQA and MHA) (templates/decode_mma.py) vs the fp64 golden and the
reference, with device lengths, poisoned part rows past Lq and NaN window rows past L - Lq (as
tests/test_decode_device_lengths.py checks the Triton kernels). Gluon has no interpreter, so CI on
CPU skips those and the device tool runs them; CI does build the kernel for sm_90 offline with its
own Triton (`test_mma_compiles_for_sm90_with_the_installed_triton`) and checks the fallbacks."""
from __future__ import annotations

import dataclasses

import pytest
import torch

# (importing the shared helpers sets TRITON_INTERPRET on CPU)
from test_decode_device_lengths import (_assert_close_to_golden, _device_call, _exact_store, _host_mode,  # noqa: E402
                                       _mask, _poisoned_parts, _window)
from test_kernels import _q  # noqa: E402

from kvpass.templates import decode_attention as da  # noqa: E402

gpu_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="Gluon kernels need a CUDA GPU")

BF16, FP16 = torch.bfloat16, torch.float16

# (bits, G, dtype, rep, Lq, L, kv_len, min_groups_per_split)
CASES = {
    "b2_g32_bf16": (2, 32, BF16, 4, 640, 700, 700, 1),
    "b2_g32_fp16_tail": (2, 32, FP16, 4, 320, 357, 800, 1),
    "b4_g32_bf16": (4, 32, BF16, 4, 640, 701, 701, 1),
    "b2_g128_bf16": (2, 128, BF16, 4, 1024, 1100, 1300, 1),
    "b4_g128_fp16": (4, 128, FP16, 8, 768, 800, 800, 1),
    "b2_g64_rep2": (2, 64, BF16, 2, 512, 513, 600, 1),
    "lq0": (2, 32, BF16, 4, 0, 50, 90, 1),
    "empty_window": (4, 32, BF16, 4, 256, 256, 256, 1),
    "long_window": (2, 32, BF16, 4, 64, 250, 300, 1),
    "few_splits": (2, 32, BF16, 4, 2048, 2100, 2100, 16),
    "mha_b2_g32_bf16": (2, 32, BF16, 1, 640, 700, 700, 1),
    "mha_b4_g128_fp16_tail": (4, 128, FP16, 1, 512, 600, 650, 1),
}


@gpu_only
@pytest.mark.parametrize("case", list(CASES))
def test_mma_matches_golden(case):
    bits, G, dtype, rep, Lq, L, kv_len, mgs = CASES[case]
    B, H, D = 2, 2, 128
    seed = sum(map(ord, case))
    st = _exact_store(B, H, D, Lq, L, bits, bits, G, dtype, seed)
    q = _q(B, H * rep, D, dtype, seed)
    cfg = da.DecodeConfig(use_mma=True, ctas_per_sm=0, min_groups_per_split=mgs)
    out = _device_call(q, st, kv_len, None, cfg, seed=seed)
    _assert_close_to_golden(out, q, st, None, kv_len, da.DecodeConfig(use_dot=True, pad_heads=1))


# (bits, G, dtype, rep, Lq, L, kv_len): host lengths, the window exactly [Lq, L), zeros past L
HOST_CASES = {
    "b2_g32_bf16": (2, 32, BF16, 4, 640, 700, 700),
    "b4_g64_fp16_tail": (4, 64, FP16, 2, 256, 300, 340),
    "b2_g128_rep8": (2, 128, BF16, 8, 1024, 1025, 1025),
    "lq0": (2, 32, BF16, 4, 0, 50, 50),
    "mha_b2_g64": (2, 64, BF16, 1, 256, 290, 290),
}


@gpu_only
@pytest.mark.parametrize("case", list(HOST_CASES))
def test_mma_host_lengths_match_golden(case, mma_launches):
    """Host lengths (the eager / dynamic-cache decode path): the Gluon kernel runs on (Lq, L) passed
    as launch arguments, with the splits planned for Lq."""
    bits, G, dtype, rep, Lq, L, kv_len = HOST_CASES[case]
    B, H, D = 2, 2, 128
    seed = sum(map(ord, case))
    st = _exact_store(B, H, D, Lq, L, bits, bits, G, dtype, seed)
    q = _q(B, H * rep, D, dtype, seed)
    cfg = da.DecodeConfig(use_mma=True, ctas_per_sm=0, min_groups_per_split=1)
    out = _host_mode(q, st, kv_len, None, cfg)
    assert mma_launches == [(Lq, L)], "the Gluon kernel did not run"
    _assert_close_to_golden(out, q, st, None, kv_len, da.DecodeConfig(use_dot=True, pad_heads=1))


# (bits, G, dtype, rep, Lq, L, kv_len, mask kind, per-head mask): padding + static-cache masks
# (`_mask`: left padding in batch row 0, columns past L masked except a few), device and host lengths
MASK_CASES = {
    "bool_gqa_tail": (2, 32, BF16, 4, 640, 700, 800, "bool", False),
    "additive_mha_fp16": (4, 64, FP16, 1, 512, 530, 600, "additive", False),
    "bool_per_head_g128": (2, 128, BF16, 2, 1024, 1100, 1150, "bool", True),
    "additive_per_head_lq0": (2, 32, BF16, 4, 0, 50, 90, "additive", True),
}


@gpu_only
@pytest.mark.parametrize("case", list(MASK_CASES))
def test_mma_with_a_mask_matches_golden(case, mma_launches):
    """Masks (HF passes one at every decode step, all True without padding) run in the Gluon kernel:
    bool or additive, the same for all heads or per head, over the quantized part, the window and
    the zero tail."""
    bits, G, dtype, rep, Lq, L, kv_len, kind, per_head = MASK_CASES[case]
    B, H, D = 2, 2, 128
    seed = sum(map(ord, case))
    st = _exact_store(B, H, D, Lq, L, bits, bits, G, dtype, seed)
    q = _q(B, H * rep, D, dtype, seed)
    mask = _mask(kind, B, L, kv_len, seed, dtype)
    if per_head:   # odd heads also drop 7 tokens of the quantized part or the window
        mask = mask.expand(B, H * rep, 1, kv_len).clone()
        drop = slice(L // 2, L // 2 + 7)
        mask[:, 1::2, :, drop] = False if kind == "bool" else torch.finfo(dtype).min
    cfg = da.DecodeConfig(use_mma=True, ctas_per_sm=0, min_groups_per_split=1)
    out = _device_call(q, st, kv_len, mask, cfg, seed=seed)
    _assert_close_to_golden(out, q, st, mask, kv_len, cfg)   # its host-mode call runs the Gluon kernel too
    assert mma_launches == [(0, 0), (Lq, L)], "the Gluon kernel did not run in both length modes"


# (B, bits, G, dtype, rep, Lq, L, kv_len, window_splits, mask kind): the window on splits of its own
# (`decode_mma.window_splits`). k > 0 forces k window splits; -1 is the automatic rule, which takes
# them at batch 1 with a long quantized part ("auto_b1": 4 quantized steps per split, one window step
# each) and not when the quantized part is short for the cache's capacity ("auto_short_lq").
WINDOW_CASES = {
    "forced1_two_window_steps": (2, 2, 32, BF16, 4, 640, 700, 760, 1, None),
    "forced3_mha_bool": (2, 4, 32, FP16, 1, 320, 350, 350, 3, "bool"),
    "forced2_lq0_additive": (2, 2, 32, BF16, 4, 0, 50, 90, 2, "additive"),
    "forced8_more_splits_than_rows": (2, 2, 64, BF16, 2, 512, 517, 600, 8, None),
    "auto_b1": (1, 2, 32, BF16, 4, 4096, 4196, 4196, -1, "bool"),
    "auto_b1_mha_g128": (1, 2, 128, FP16, 1, 4096, 4150, 4300, -1, None),
    "auto_short_lq": (1, 2, 32, BF16, 4, 256, 356, 4196, -1, None),
}


@gpu_only
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_mma_window_splits_match_golden(case, mma_launches):
    """Window rows on splits of their own, in both length modes: rows dealt over those splits only,
    splits left without rows, a window longer than one step per split, masks over the window."""
    B, bits, G, dtype, rep, Lq, L, kv_len, wsplits, kind = WINDOW_CASES[case]
    H, D = 2, 128
    seed = sum(map(ord, case))
    st = _exact_store(B, H, D, Lq, L, bits, bits, G, dtype, seed)
    q = _q(B, H * rep, D, dtype, seed)
    mask = _mask(kind, B, L, kv_len, seed, dtype)
    cfg = da.DecodeConfig(use_mma=True, ctas_per_sm=0, window_splits=wsplits)
    out = _device_call(q, st, kv_len, mask, cfg, seed=seed)
    _assert_close_to_golden(out, q, st, mask, kv_len, cfg)
    assert mma_launches == [(0, 0), (Lq, L)], "the Gluon kernel did not run in both length modes"


def _record_launches(monkeypatch) -> list:
    """Replace the Gluon kernel and the split-reduce kernel by recorders, and accept every call for
    the Gluon launcher (runs on the CPU): returns the list that collects (kind "decode" or "reduce",
    grid, positional args, keyword args) per launch."""
    from kvpass.templates import decode_mma

    launches = []

    class _Recorder:
        def __init__(self, kind):
            self.kind = kind

        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((self.kind, grid, args, kw))

    monkeypatch.setattr(decode_mma, "_kvpass_decode_mma", _Recorder("decode"))
    monkeypatch.setattr(da, "_kvpass_decode_reduce", _Recorder("reduce"))
    monkeypatch.setattr(decode_mma, "mma_unsupported", lambda *a, **k: None)
    return launches


@pytest.mark.parametrize("wsplits", [-1, 0, 3])
def test_launcher_passes_the_window_splits_it_plans(wsplits, monkeypatch):
    """The launcher (CPU, the kernels replaced by recorders) launches the planned splits plus
    WIN_SPLITS, passes `window_splits`' (WIN_SPLITS, WIN_COST, WIN_MIN_STEPS) as the kernel's
    arguments of those names, and reduces over the same number of splits."""
    from kvpass.templates import decode_mma

    names = decode_mma._kvpass_decode_mma.arg_names
    plans = []
    real_plan = decode_mma.window_splits
    monkeypatch.setattr(decode_mma, "window_splits", lambda *a: plans.append(real_plan(*a)) or plans[-1])
    launches = _record_launches(monkeypatch)
    st = _exact_store(1, 2, 128, 4096, 4196, 2, 2, 32, BF16, 7)
    q = _q(1, 8, 128, BF16, 7)
    cfg = da.DecodeConfig(use_mma=True, ctas_per_sm=0, window_splits=wsplits)
    _device_call(q, st, 4196, None, cfg, seed=7)
    (plan,) = plans
    ((_, grid, args, _),) = [x for x in launches if x[0] == "decode"]
    ((_, _, reduce_args, _),) = [x for x in launches if x[0] == "reduce"]
    arg = dict(zip(names, args))
    assert (arg["WIN_SPLITS"], arg["WIN_COST"], arg["WIN_MIN_STEPS"]) == plan
    assert grid[0] == arg["NUM_SPLITS_RT"] == reduce_args[4]
    assert plan == {0: (0, -1, 0), 3: (3, 0, 0)}.get(wsplits, plan)
    planned = da.plan_splits(2, 4196, 32, False, cfg, q.device, decode_mma.resident_per_sm(cfg.max_regs))[0]
    assert grid[0] == planned + plan[0]   # the plan's splits plus the window's own


@pytest.mark.parametrize("rep,fuse,wsplits", [(1, True, 0), (1, False, 0), (4, True, 0), (1, True, 3)])
def test_launcher_fuses_the_reduce_for_mha_only(rep, fuse, wsplits, monkeypatch):
    """MHA launches (rep 1) with DecodeConfig.fuse_reduce and no window splits reduce in the kernel
    (FUSE_REDUCE, the output and zeroed counters passed, no reduce launch); fuse_reduce=False, GQA
    and launches with window splits launch the reduce (CPU, the kernels replaced by recorders)."""
    from kvpass.templates import decode_mma

    names = decode_mma._kvpass_decode_mma.arg_names
    launches = _record_launches(monkeypatch)
    st = _exact_store(1, 2, 128, 4096, 4196, 2, 2, 32, BF16, 3)
    q = _q(1, 2 * rep, 128, BF16, 3)
    cfg = da.DecodeConfig(use_mma=True, ctas_per_sm=0, fuse_reduce=fuse, window_splits=wsplits)
    out = _device_call(q, st, 4196, None, cfg, seed=3)
    ((_, grid, args, kw),) = [x for x in launches if x[0] == "decode"]
    arg = dict(zip(names, args))
    fused = fuse and rep == 1 and wsplits == 0
    assert grid[0] > 1 and kw["FUSE_REDUCE"] is fused
    assert [x[0] for x in launches] == (["decode"] if fused else ["decode", "reduce"])
    if fused:
        assert arg["OUT"] is out and arg["CNT"].dtype == torch.int32 and arg["CNT"].numel() >= 2
        assert not arg["CNT"].any(), "the counters must be zero before a launch"


# (bits, G, dtype, rep, Lq, L, kv_len, mask kind): logit softcap (Gemma2) in both length modes
SOFTCAP_CASES = {
    "gqa_bf16_tail": (2, 32, BF16, 4, 640, 700, 800, None),
    "mha_fp16_bool": (4, 64, FP16, 1, 512, 530, 600, "bool"),
    "gqa_additive_lq0": (2, 32, BF16, 2, 0, 50, 90, "additive"),
}


@gpu_only
@pytest.mark.parametrize("case", list(SOFTCAP_CASES))
def test_mma_with_softcap_matches_golden(case, mma_launches):
    """softcap 2 on scores of several units (q scaled by 3): the quantized steps, the window and the
    zero tail, with and without a mask; the cap must change the output (not a no-op)."""
    bits, G, dtype, rep, Lq, L, kv_len, kind = SOFTCAP_CASES[case]
    B, H, D = 2, 2, 128
    seed = sum(map(ord, case))
    st = _exact_store(B, H, D, Lq, L, bits, bits, G, dtype, seed)
    q = (_q(B, H * rep, D, dtype, seed).float() * 3.0).to(dtype)
    mask = _mask(kind, B, L, kv_len, seed, dtype)
    cfg = da.DecodeConfig(use_mma=True, ctas_per_sm=0, min_groups_per_split=1)
    out = _device_call(q, st, kv_len, mask, cfg, seed=seed, softcap=2.0)
    _assert_close_to_golden(out, q, st, mask, kv_len, cfg, softcap=2.0)
    assert mma_launches == [(0, 0), (Lq, L)], "the Gluon kernel did not run in both length modes"
    plain = _device_call(q, st, kv_len, mask, cfg, seed=seed)
    assert (out.double() - plain.double()).abs().max().item() > 1e-2


@gpu_only
def test_mma_falls_back_with_a_log_line(caplog):
    """head_dim 64 is not supported by the Gluon kernel: the Triton kernel runs, and says so once."""
    st = _exact_store(1, 2, 64, 64, 70, 2, 2, 32, BF16, 7)
    q = _q(1, 8, 64, BF16, 7)
    da._LOGGED.clear()  # a reason is logged once per process
    with caplog.at_level("INFO", logger="kvpass"):
        out = _device_call(q, st, 80, None, da.DecodeConfig(use_mma=True, use_dot=True, pad_heads=1), seed=7)
    assert torch.isfinite(out).all()
    assert any("needs head_dim 128" in r.getMessage() for r in caplog.records)


@gpu_only
def test_mma_falls_back_on_misaligned_code_rows(caplog):
    """The Gluon kernel loads code rows with 8/16-byte vector loads from each lane's first address;
    a code buffer whose rows are not 16-byte aligned goes to the Triton kernel (correct result, one
    log line) instead of faulting."""
    st = _exact_store(1, 2, 128, 128, 150, 2, 2, 32, BF16, 11)
    q = _q(1, 8, 128, BF16, 11)
    kb, vb = st.keys.buffers, st.values.buffers
    codes = kb["codes"]
    shifted = torch.empty(codes.numel() + 4, dtype=torch.uint8, device=codes.device)[4:].view(codes.shape)
    shifted.copy_(codes)
    da._LOGGED.clear()  # a reason is logged once per process
    with caplog.at_level("INFO", logger="kvpass"):
        out = da.decode_attention(
            q, shifted, kb["scale"], kb["zero"], vb["codes"], vb["scale"], vb["zero"], st.res_k, st.res_v,
            key_bits=2, value_bits=2, group_size=32, quantized_length=st.quantized_length, length=st.length,
            config=da.DecodeConfig(use_mma=True, use_dot=True, pad_heads=1))
    assert any("16-byte aligned code rows" in r.getMessage() for r in caplog.records)
    _assert_close_to_golden(out, q, st, None, st.length, da.DecodeConfig(use_dot=True, pad_heads=1))


def test_split_plan_counts_the_programs_a_register_cap_lets_reside():
    """A cap only adds resident one-warp programs where each quarter of the SM's registers holds one
    more warp (3 at <= 168 registers, 4 at <= 128); 200 still means 8 (session 18: a plan for 10 ran
    as a second wave, 40-50 % slower)."""
    from kvpass.templates import decode_mma
    assert [decode_mma.resident_per_sm(r) for r in (0, 255, 200, 169, 168, 128)] == [8, 8, 8, 8, 12, 16]


@gpu_only
@pytest.mark.parametrize("max_regs", [128, 168])
def test_mma_with_a_register_cap(max_regs):
    """DecodeConfig.max_regs caps the Gluon kernel's registers (spills in the window loop)."""
    B, H, D, rep, Lq, L, kv_len = 2, 2, 128, 4, 512, 620, 700
    st = _exact_store(B, H, D, Lq, L, 2, 2, 32, BF16, max_regs)
    q = _q(B, H * rep, D, BF16, max_regs)
    cfg = da.DecodeConfig(use_mma=True, ctas_per_sm=0, min_groups_per_split=1, max_regs=max_regs)
    out = _device_call(q, st, kv_len, None, cfg, seed=max_regs)
    _assert_close_to_golden(out, q, st, None, kv_len, da.DecodeConfig(use_dot=True, pad_heads=1))


@gpu_only
@pytest.mark.parametrize("bits,G,dtype,Lq,L,kv_len", [(2, 32, BF16, 4096, 4196, 4300), (4, 64, FP16, 640, 700, 720)])
def test_mma_fused_reduce_matches_the_reduce_launch(bits, G, dtype, Lq, L, kv_len):
    """MHA with the reduce in the kernel (the default without window splits) vs the reduce launch:
    the same sums up to their order (a tree over 32 splits in one warp vs 64 in four), so within
    an ulp of the output dtype; the fused one close to the golden; and the same again after a call
    and CUDA-graph replays (the counters go back to zero after each launch)."""
    B, H, D = 3, 4, 128
    seed = bits * 100 + G
    st = _exact_store(B, H, D, Lq, L, bits, bits, G, dtype, seed)
    q = _q(B, H, D, dtype, seed)
    fused = da.DecodeConfig(use_mma=True, ctas_per_sm=0, min_groups_per_split=1, window_splits=0)
    separate = dataclasses.replace(fused, fuse_reduce=False)
    out = _device_call(q, st, kv_len, None, fused, seed=seed)
    _assert_close_to_golden(out, q, st, None, kv_len, da.DecodeConfig(use_dot=True, pad_heads=1))
    ref = _device_call(q, st, kv_len, None, separate, seed=seed)
    ulp = torch.finfo(dtype).eps * ref.abs().float().clamp_min(torch.finfo(dtype).tiny)
    assert ((out.float() - ref.float()).abs() <= ulp).all(), "fused and launched reduce differ by more than an ulp"
    parts = _poisoned_parts(st, kv_len, seed)
    wk, wv = _window(st.res_k, 2 * G + 3), _window(st.res_v, 2 * G + 3)
    lengths = torch.tensor([Lq, L, 0, 0], dtype=torch.int32, device="cuda")
    static = q.new_full(q.shape, float("nan"))

    def call():
        return da.decode_attention(q, *parts, wk, wv, key_bits=bits, value_bits=bits, group_size=G, kv_len=kv_len,
                                   config=fused, lengths=lengths, out=static)
    call()   # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(3):
        static.fill_(float("nan"))
        graph.replay()
        torch.testing.assert_close(static, out, rtol=0, atol=0)


def test_default_gqa_config_falls_back_off_gpu(caplog):
    """The GQA default asks for the Gluon kernel; where it cannot run (here: the CPU interpreter, or
    a CPU tensor) the Triton kernel answers, correctly, and one log line says why."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the Gluon kernel runs (test_mma_matches_golden)")
    st = _exact_store(1, 2, 64, 32, 40, 2, 2, 32, BF16, 3)
    q = _q(1, 8, 64, BF16, 3)
    cfg = da.default_config_for(da.DecodeSpec(2, 2, 32, 64, BF16, rep=4), batch=1)
    assert cfg.use_mma
    da._LOGGED.clear()  # a reason is logged once per process
    with caplog.at_level("INFO", logger="kvpass"):
        out = _device_call(q, st, 48, None, cfg, seed=3)
    _assert_close_to_golden(out, q, st, None, 48, cfg)
    assert any("needs a CUDA device" in r.getMessage() for r in caplog.records)


def test_a_triton_that_cannot_compile_the_kernel_falls_back(monkeypatch, caplog):
    """A Triton whose Gluon API changed (Triton 3.9 renamed two calls the kernel makes) must not break
    decode: the launch's CompilationError sends this call and every later one to the Triton kernel,
    with one log line naming the Triton version and the error."""
    from triton.compiler.errors import CompilationError

    from kvpass.templates import decode_mma

    class _Unbuildable:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                raise CompilationError(None, None, "gl.some_call has been removed")
            return launch

    real_unsupported = decode_mma.mma_unsupported
    monkeypatch.setattr(decode_mma, "_kvpass_decode_mma", _Unbuildable())
    monkeypatch.setattr(decode_mma, "_COMPILE_FAILURE", [])
    # pass the device checks (this runs on the CPU too), keep the compile-failure check
    monkeypatch.setattr(decode_mma, "mma_unsupported",
                        lambda *a, **k: decode_mma._COMPILE_FAILURE[0] if decode_mma._COMPILE_FAILURE else None)
    st = _exact_store(1, 2, 64, 32, 40, 2, 2, 32, BF16, 5)
    q = _q(1, 8, 64, BF16, 5)
    cfg = da.DecodeConfig(use_mma=True, use_dot=True, pad_heads=1)
    da._LOGGED.clear()  # a reason is logged once per process
    with caplog.at_level("INFO", logger="kvpass"):
        out = _device_call(q, st, 48, None, cfg, seed=5)
    _assert_close_to_golden(out, q, st, None, 48, cfg)
    assert any("does not compile with Triton" in r.getMessage() and "has been removed" in r.getMessage()
               for r in caplog.records)
    assert real_unsupported(da.DecodeSpec(2, 2, 32, 128, BF16, rep=4), None, q).startswith("does not compile")


# offline builds for sm_90 with the installed Triton (CI's is newer than the device's 3.6): the
# specializations' corners (bits, G, REP, dtype, length mode, mask kind)
COMPILE_CASES = [
    (2, 32, 4, "bf16", False, "none"),
    (4, 32, 1, "fp16", True, "bool"),
    (2, 128, 8, "bf16", False, "additive-heads"),
    (4, 64, 2, "fp16", True, "bool-heads"),
]


@pytest.mark.parametrize("bits,group,rep,dtype,host,mask", COMPILE_CASES)
def test_mma_compiles_for_sm90_with_the_installed_triton(bits, group, rep, dtype, host, mask):
    """Gluon kernels cannot run without a GPU, but they compile without one
    (benchmarks/inspect_sass.py, in a process of its own: under TRITON_INTERPRET=1, which CI sets,
    the kernel's helpers are built for the interpreter). Catches a Triton API change (and
    static_assert mistakes) in CI instead of on the device."""
    import os
    import subprocess
    import sys

    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this Triton has no bundled ptxas")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KVPASS_TRITON_INTERPRET")}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, os.path.join(root, "benchmarks", "inspect_sass.py"), "--variant", "mma", "--bits",
           str(bits), "--group", str(group), "--rep", str(rep), "--dtype", dtype, "--mask", mask]
    run = subprocess.run(cmd + (["--host-lengths"] if host else []), env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"mma b{bits} g{group} rep {rep} {dtype}" in run.stdout and "HMMA" in run.stdout, run.stdout
