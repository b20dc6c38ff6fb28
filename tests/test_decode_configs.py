"""Decode-kernel configs: the batch-aware rules, the autotuner (fastest correct candidate, cached
in JSON so a second process does not re-tune) and its switches. The end-to-end autotune case runs
the kernels (Triton's interpreter on CPU, compiled on a GPU) with a fake timer: the timings are not
what is tested, the choice and the cache are.
"""
from __future__ import annotations

import json

import pytest
import torch

from kernel_setup import DEVICE, rand  # sets TRITON_INTERPRET on CPU before any kernel import
from kvpass.templates import decode_configs as dc


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty tuned-config cache file and fresh in-process memos; autotune off afterwards."""
    path = tmp_path / "decode_configs.json"
    monkeypatch.setenv("KVPASS_CONFIG_CACHE", str(path))
    monkeypatch.setattr(dc, "_TUNED_CACHE", None)
    dc._CHOSEN.clear()
    yield path
    dc.set_autotune(False)
    dc._CHOSEN.clear()
    dc._TUNED_CACHE = None


GQA = dc.DecodeSpec(2, 2, 32, 128, torch.bfloat16, rep=4)
MHA = dc.DecodeSpec(2, 2, 32, 128, torch.bfloat16, rep=1)


def test_rules_are_batch_aware_for_gqa():
    assert not dc.default_config_for(GQA, batch=1).use_dot   # rows: one program per query head
    assert dc.default_config_for(GQA, batch=8).use_dot       # tensor cores for larger batches
    assert not dc.default_config_for(MHA, batch=8).use_dot   # MHA: rows at any batch
    # the Gluon tensor-core kernel where it applies (the rule above where it does not)
    assert dc.default_config_for(GQA, batch=1).use_mma and dc.default_config_for(GQA, batch=8).use_mma
    assert dc.default_config_for(MHA, batch=1).use_mma and dc.default_config_for(MHA, batch=8).use_mma
    assert dc.default_config_for(MHA, batch=1).min_groups_per_split == 4   # >= 128 tokens per split (G32)
    assert dc.config_key(GQA, 32768, 1) != dc.config_key(GQA, 32768, 8)
    assert dc.config_key(GQA, 20000, 5) == dc.config_key(GQA, 32768, 8)  # same length and batch buckets


def test_candidates_start_with_the_rule_and_are_distinct():
    for spec in (GQA, MHA, dc.DecodeSpec(4, 4, 128, 128, torch.float16, rep=8)):
        for batch in (1, 8):
            cands = dc.candidate_configs(spec, batch)
            assert cands[0] == dc.default_config_for(spec, batch)
            assert len(set(cands)) == len(cands) >= 4


def test_resident_programs_follow_the_occupancy_rules():
    h100 = dc.SMLimits()
    assert dc.resident_programs(220, 1, 0, h100) == 8      # 224 x 32 per warp: 9 fit the SM, 2 each quarter
    assert dc.resident_programs(200, 1, 0, h100) == 8      # 10 warps' registers, in multiples of 4
    assert dc.resident_programs(168, 1, 0, h100) == 12     # 5376 per warp: 3 in each 16384-register quarter
    assert dc.resident_programs(128, 2, 0, h100) == 8      # 8192 registers per program
    assert dc.resident_programs(148, 2, 0, h100) == 6      # 152 rounds up: 13 warps' registers -> 12
    assert dc.resident_programs(32, 1, 0, h100) == 32      # the block limit
    assert dc.resident_programs(32, 4, 0, h100) == 16      # the warp limit (64 warps)
    assert dc.resident_programs(64, 4, 100_000, h100) == 2  # shared memory
    assert dc.resident_programs(255, 32, 0, h100) == 1     # never 0


def test_wave_splits_fill_whole_waves():
    assert dc.wave_splits(32, 1188) == 37                  # one wave, 1184 programs
    assert dc.wave_splits(256, 1188) == 4                  # 1024 programs; 5 would start a second wave
    assert dc.wave_splits(1024, 792) == 3                  # 3072 programs = 3.9 waves (1 split: 1.3 waves)
    assert dc.wave_splits(1024, 1024) == 1
    assert dc.wave_splits(1024, 1188) == 1                 # 1, 2, 3, 4 splits fill 86 %: fewest splits win
    for units, total in ((1, 100), (7, 50), (300, 264), (5000, 528)):
        s = dc.wave_splits(units, total)
        assert s >= 1
        if units <= total:
            assert units * s <= total < units * (s + 1)


def test_plan_splits_with_wave_target_counts_the_residual_split():
    from kvpass.templates import decode_attention as da
    cfg = dc.DecodeConfig(use_dot=False, block_n=32, ctas_per_sm=0, min_groups_per_split=1)
    dev = torch.device("cpu")                              # 4 "SMs" off the GPU
    total = dc.wave_splits(2, 9 * da._num_sms(dev))        # 18 programs per unit fit in one wave
    s, chunk, res = da.plan_splits(2, 32 * 1000, 32, True, cfg, dev, resident=9)
    assert (s, res) == (total, total - 1) and chunk * (total - 1) >= 32 * 1000
    assert da.plan_splits(2, 32 * 1000, 32, False, cfg, dev, resident=9)[0] == total
    # unknown occupancy: FALLBACK_CTAS_PER_SM programs per SM
    assert da.plan_splits(1, 32 * 1000, 32, False, cfg, dev)[0] == dc.FALLBACK_CTAS_PER_SM * da._num_sms(dev)


def _fake_run(good: torch.Tensor, wrong=(), failing=()):
    def run(cfg):
        if cfg in failing:
            raise RuntimeError("PassManager::run failed (a config that does not compile)")
        return good + 1.0 if cfg in wrong else good.clone()
    return run


def _fake_timing(run, cost):
    """(run_tracking, timer) for `dc.tune`: run_tracking calls run and remembers the config; the
    timer runs the call as the real one does and returns cost(that config) as its time."""
    last = {}

    def run_tracking(cfg):
        last["cfg"] = cfg
        return run(cfg)

    def timer(fn, device):
        fn()
        return cost(last["cfg"])

    return run_tracking, timer


def test_tune_keeps_the_fastest_correct_config_and_saves_it(fresh_cache, caplog):
    cands = dc.candidate_configs(GQA, 8)
    fastest_wrong, fastest_failing, fastest_ok = cands[1], cands[2], cands[3]
    times = {fastest_wrong: 1.0, fastest_failing: 1.0, fastest_ok: 2.0}
    good = torch.randn(2, 8, 1, 128)
    run = _fake_run(good, wrong={fastest_wrong}, failing={fastest_failing})
    run_tracking, timer = _fake_timing(run, lambda cfg: times.get(cfg, 5.0))
    with caplog.at_level("INFO", logger="kvpass"):
        best = dc.tune(GQA, 32768, 8, run_tracking, timer=timer)
    assert best == fastest_ok
    assert "gave a wrong output" in caplog.text and "does not run" in caplog.text
    saved = json.loads(fresh_cache.read_text())
    assert [tuple(r["key"]) for r in saved] == [dc.config_key(GQA, 32768, 8)]
    assert dc.DecodeConfig(**saved[0]["config"]) == fastest_ok


def test_tune_falls_back_to_the_default_when_nothing_runs(fresh_cache):
    cands = dc.candidate_configs(MHA, 1)
    good = torch.randn(1, 4, 1, 128)
    failing = set(cands)
    calls = []

    def run(cfg):
        calls.append(cfg)
        if cfg in failing and len(calls) > 1:  # the first (reference) call runs, later ones all fail
            raise RuntimeError("no")
        return good

    assert dc.tune(MHA, 4096, 1, run, timer=lambda fn, dev: (fn(), 1.0)[1]) == cands[0]  # the timer runs it
    assert not fresh_cache.exists()  # nothing measured, nothing recorded


def test_autotune_switches_are_checked():
    with pytest.raises(TypeError, match="True or False"):
        dc.set_autotune("yes")
    import kvpass

    with pytest.raises(TypeError, match="autotune must be True or False"):
        kvpass.backend(bits=2, autotune=1)


triton = pytest.importorskip("triton", reason="triton is not importable: the kernels cannot run")


def test_autotune_end_to_end_then_a_new_process_reuses_the_cache(fresh_cache, monkeypatch):
    """decode_attention with autotune on: the first call times every candidate on its own inputs
    and records the winner; after the in-process memos are dropped (a new process), the next call
    takes the config from the JSON file without timing anything; the output stays right."""
    from kvpass.lowering.ops import attention_reference
    from kvpass.store import KVStore, StoreConfig
    from kvpass.templates import decode_attention as da

    B, H, rep, D, G, L = 1, 2, 2, 64, 16, 100
    st = KVStore(StoreConfig(2, 2, G, 16), B, H, D, D, torch.bfloat16, DEVICE)
    st.append(rand((B, H, L, D), torch.bfloat16, 1), rand((B, H, L, D), torch.bfloat16, 2, shift=-0.2))
    q = rand((B, H * rep, 1, D), torch.bfloat16, 3)
    spec = da.store_spec(st, q)
    pick = dc.candidate_configs(spec, B)[-1]  # made the fastest by the fake timer
    timed = []
    real_tune = dc.tune

    def cost(cfg):
        timed.append(cfg)
        return 1.0 if cfg == pick else 2.0

    def tune_with_fake_timer(spec_, length, batch, run):
        run_tracking, timer = _fake_timing(run, cost)
        return real_tune(spec_, length, batch, run_tracking, timer=timer)

    monkeypatch.setattr(dc, "tune", tune_with_fake_timer)
    dc.set_autotune(True)
    out = da.decode_attention_store(q, st)
    assert len(timed) >= 4 and pick in timed, "autotune did not time the candidates"
    key = dc.config_key(spec, L, B)
    saved = {tuple(r["key"]): dc.DecodeConfig(**r["config"]) for r in json.loads(fresh_cache.read_text())}
    assert saved == {key: pick}
    ref = attention_reference(q, st, None, L, rep, 0.0, False, None, True)
    assert (out.float() - ref.float()).abs().max() <= dc.CANDIDATE_REL_ERR[torch.bfloat16] * ref.float().abs().max()

    # a new process: memos gone, the JSON cache remains
    dc._CHOSEN.clear()
    dc._TUNED_CACHE = None
    timed.clear()
    out2 = da.decode_attention_store(q, st)
    assert timed == [], "the second process re-tuned"
    assert dc.get_config(spec, L, B) == pick
    torch.testing.assert_close(out2, out, rtol=0, atol=0)


def test_max_regs_is_validated():
    assert dc.DecodeConfig(max_regs=168).max_regs == 168
    for bad in (-1, 8, 256, 1000):
        with pytest.raises(ValueError, match="max_regs"):
            dc.DecodeConfig(max_regs=bad)


def test_window_splits_is_validated():
    assert dc.DecodeConfig(window_splits=3).window_splits == 3
    for bad in (-2, 1.5, "auto"):
        with pytest.raises(ValueError, match="window_splits"):
            dc.DecodeConfig(window_splits=bad)


def test_window_splits_take_the_free_wave_slots():
    """`decode_mma.window_splits`: with splits of at least WINDOW_MIN_STEPS steps, the wave's slots
    beyond the plan's splits, at most one per 32 window rows, and the window-step cost the kernel
    weighs them by; shorter splits: none added (the kernel may still use splits the call's Lq leaves
    empty); 0 never (cost -1); k > 0 always (cost 0, no minimum)."""
    from kvpass.templates import decode_mma
    dev = torch.device("cpu")                              # 4 "SMs" off the GPU: 8 x 4 = 32 slots
    auto = dc.DecodeConfig(use_mma=True, ctas_per_sm=0)
    slots = dc.wave_splits(2, 8 * 4)                       # 16 per unit for 2 units
    cost, long = decode_mma.WINDOW_STEP_COST, decode_mma.WINDOW_MIN_STEPS
    ws = decode_mma.window_splits
    assert ws(2, slots - 4, long, 100, auto, dev, 8) == (4, cost, long)      # 4 x 32 rows hold 100
    assert ws(2, slots - 6, long, 100, auto, dev, 8) == (4, cost, long)      # capped by the rows
    assert ws(2, slots - 1, long, 100, auto, dev, 8) == (1, cost, long)
    assert ws(2, slots, long, 100, auto, dev, 8) == (0, cost, long)          # a full wave: none added
    assert ws(2, slots - 4, long - 1, 100, auto, dev, 8) == (0, cost, long)  # short splits: none added
    assert ws(2, 4, long, 0, auto, dev, 8) == (0, -1, 0)                     # no window: never
    assert ws(2, 4, long, 100, dc.DecodeConfig(window_splits=0), dev, 8) == (0, -1, 0)
    assert ws(2, slots, 1, 100, dc.DecodeConfig(window_splits=3), dev, 8) == (3, 0, 0)
