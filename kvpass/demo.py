"""`python -m kvpass demo`: the embedded SmolLM2-135M on CPU, a long prompt, with and without kvpass 2-bit."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

PROMPT_FILE = Path(__file__).parent / "data" / "pride_and_prejudice_opening.txt"
QUESTION = "\n\nQuestion: Who is Mr. Bingley, and what does Mrs. Bennet want her husband to do?\nAnswer:"


def _cache_bytes(cache) -> int:
    """Bytes of the tensors a transformers cache holds (stand-ins count only their tiny storage)."""
    seen, total = set(), 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            s = t.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def _generate(model, ids, new_tokens):
    from transformers import DynamicCache

    cache = DynamicCache()
    start = time.perf_counter()
    out = model.generate(ids, past_key_values=cache, max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.shape[1]:], cache, time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(prog="kvpass demo", description=__doc__)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--residual-length", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--prompt-chars", type=int, default=6000, help="characters of the built-in long prompt")
    p.add_argument("--inner", default="eager", choices=["inductor", "eager"],
                   help="compiler for the rewritten graph: inductor is the production lowering (on CPU it "
                        "spends ~3 minutes compiling this model); eager runs the same rewritten graph at once")
    args = p.parse_args(argv)

    import kvpass
    from kvpass import store as kv_store
    from kvpass.evaluate.model import load_default_model

    torch.manual_seed(0)
    model, tok = load_default_model(torch.float32)
    text = PROMPT_FILE.read_text(encoding="utf-8")[: args.prompt_chars] + QUESTION
    ids = tok(text, return_tensors="pt").input_ids
    print(f"prompt: {ids.shape[1]} tokens of Pride and Prejudice + a question; model: SmolLM2-135M-Instruct (fp32, CPU)")

    with torch.no_grad():
        base_out, base_cache, base_s = _generate(model, ids, args.new_tokens)
        backend = kvpass.backend(bits=args.bits, group_size=args.group_size,
                                 residual_length=args.residual_length, inner=args.inner)
        model.compile(backend=backend)
        kv_out, kv_cache, kv_s = _generate(model, ids, args.new_tokens)
    stores = [s for s in kv_store.live_stores() if s.length == kv_cache.get_seq_length()]
    kv_bytes = sum(s.nbytes() for s in stores) + _cache_bytes(kv_cache)
    base_bytes = _cache_bytes(base_cache)

    print("\n--- without kvpass (full-precision cache) ---")
    print(tok.decode(base_out, skip_special_tokens=True).strip())
    print(f"\n--- kvpass {args.bits}-bit (G={args.group_size}, R={args.residual_length}) ---")
    print(tok.decode(kv_out, skip_special_tokens=True).strip())
    same = min(len(base_out), len(kv_out))
    agree = int((base_out[:same] == kv_out[:same]).cumprod(0).sum())
    print(f"\nidentical leading tokens: {agree}/{same}")
    print(f"cache bytes: full precision {base_bytes / 2**20:.2f} MiB -> kvpass {kv_bytes / 2**20:.2f} MiB "
          f"({base_bytes / max(kv_bytes, 1):.1f}x smaller; fp32 model, scales in fp32)")
    print(f"wall time: full precision {base_s:.1f}s, kvpass {kv_s:.1f}s (kvpass includes compiling; CPU reference path)\n")
    print(kvpass.explain(backend))
