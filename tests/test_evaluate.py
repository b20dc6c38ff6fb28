"""Tests for kvpass.evaluate on the real SmolLM2-135M model (CPU).

The model is converted once (a few minutes the first time) and cached under
~/.cache/kvpass (KVPASS_CACHE_DIR); the tests skip only when it cannot be
obtained at all (no PyPI access and no cached copy).
"""
from pathlib import Path

import pytest
import torch

from kvpass.evaluate.baselines import naive_cache_factory
from kvpass.evaluate.passkey import build_prompt
from kvpass.evaluate.perplexity import full_sequence_perplexity, perplexity

EXCERPT = Path(__file__).parent / "data" / "emma_excerpt.txt"
PREFIX, SCORED = 192, 48


@pytest.fixture(scope="session")
def model_and_tok():
    from kvpass.evaluate.model import load_default_model

    try:
        return load_default_model(torch.float32)
    except (RuntimeError, OSError) as err:
        pytest.skip(f"SmolLM2-135M unavailable (needs PyPI once, then cached): {err}")


@pytest.fixture(scope="session")
def emma_ids(model_and_tok):
    _, tok = model_and_tok
    ids = tok(EXCERPT.read_text(), return_tensors="pt").input_ids   # [1, ~650]
    return ids[:, :PREFIX + SCORED]


@pytest.fixture(scope="session")
def fp_ppl(model_and_tok, emma_ids):
    return perplexity(model_and_tok[0], emma_ids, prefix=PREFIX)


def test_greedy_capital_of_france(model_and_tok):
    model, tok = model_and_tok
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert tok.decode(out[0, ids.shape[1]:]).startswith(" Paris.")


def test_decode_path_perplexity_matches_full_forward(model_and_tok, emma_ids, fp_ppl):
    full = full_sequence_perplexity(model_and_tok[0], emma_ids, prefix=PREFIX)
    assert fp_ppl == pytest.approx(full, rel=1e-3)
    assert 5 < full < 200  # a real language model on English prose


def test_chunked_decode_matches(model_and_tok, emma_ids, fp_ppl):
    chunked = perplexity(model_and_tok[0], emma_ids, prefix=PREFIX, chunk=16)
    assert chunked == pytest.approx(fp_ppl, rel=1e-3)


def test_naive_2bit_much_worse(model_and_tok, emma_ids, fp_ppl):
    # Naive fake quant happens on cache write, so the chunk size does not change what
    # attention sees; a large chunk keeps the test fast.
    naive = perplexity(model_and_tok[0], emma_ids, prefix=PREFIX, chunk=16,
                       cache_factory=naive_cache_factory(bits=2, group_size=32))
    assert naive > 1.2 * fp_ppl


def test_passkey_prompt_has_exact_length_and_key(model_and_tok):
    _, tok = model_and_tok
    for length, depth in ((300, 0.1), (517, 0.9)):
        ids = build_prompt(tok, length, depth, "40417")
        assert ids.shape == (1, length)
        assert "The pass key is 40417." in tok.decode(ids[0])


def test_config_names(model_and_tok):
    from kvpass.evaluate.configs import default_config_names, make_config

    model = model_and_tok[0]
    names = default_config_names()
    assert names[0] == "bf16" and "naive-b2" in names and "kivi-b2-g32-r128" in names
    naive = make_config("naive-b4-g64", model)
    assert naive.cache_factory is not None and naive.backend is None
    assert naive.cache_factory().layer_class_to_replicate().bits == 4
    with pytest.raises(ValueError, match="unknown config"):
        make_config("kivi-2bit", model)


def test_cli_writes_table(model_and_tok, tmp_path):
    from kvpass.evaluate.cli import main_eval

    rc = main_eval(["--text", str(EXCERPT), "--tokens", "8", "--prefix", "64", "--chunk", "4",
                    "--configs", "bf16,naive-b2", "--no-passkey", "--out", str(tmp_path)])
    assert rc == 0
    md = (tmp_path / "quality.md").read_text()
    assert "| bf16 |" in md and "| naive-b2 |" in md
    rows = (tmp_path / "quality.csv").read_text().splitlines()
    assert rows[0].startswith("config,") and len(rows) == 3


def _kvpass_ppl(model_and_tok, emma_ids, **kw):
    import kvpass

    backend = kvpass.backend(inner="eager", **kw)
    ppl = perplexity(model_and_tok[0], emma_ids, prefix=PREFIX, chunk=16, backend=backend)
    assert kvpass.explain(backend).rewritten == 30  # every SmolLM2 layer went through kvpass
    return ppl


def test_kvpass_8bit_within_half_a_percent(model_and_tok, emma_ids, fp_ppl):
    assert _kvpass_ppl(model_and_tok, emma_ids, bits=8, group_size=32, residual_length=32) == pytest.approx(fp_ppl, rel=5e-3)


def test_kivi_2bit_beats_naive_per_token_2bit(model_and_tok, emma_ids):
    kivi2 = _kvpass_ppl(model_and_tok, emma_ids, bits=2, group_size=32, residual_length=32)
    naive = perplexity(model_and_tok[0], emma_ids, prefix=PREFIX, chunk=16,
                       cache_factory=naive_cache_factory(bits=2, group_size=32))
    assert kivi2 < naive
