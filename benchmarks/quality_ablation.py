"""Eager-simulation ablation for benchmarks/results/quality.md: flush policy (kvpass vs KIVI original)
and scale dtype (fp32 vs fp16) at 2-bit G=32 R=128 on Emma (chars 30,000+, 512 + 1,024 tokens).
Usage: PYTHONPATH=. python benchmarks/quality_ablation.py {kvpass,kivi} {float32,float16}"""
import sys, torch, time
sys.path.insert(0, ".")
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from kvpass.evaluate.model import load_default_model
from kvpass.evaluate.perplexity import perplexity
from kvpass.lowering import kivi

model, tok = load_default_model(torch.float32)
text = open("/work/shared/data/texts/emma.txt", encoding="utf-8").read()[30000:]
ids = tok(text, return_tensors="pt").input_ids[:, :512 + 1024]

def factory(policy, scale_dtype):
    G, R = 32, 128
    def lq(L):
        if policy == "kvpass":
            return max(0, (L - R) // G * G)
        return L // R * R  # KIVI original: the window empties when it reaches R
    class Layer(DynamicLayer):
        def update(self, k, v, *a, **kw):
            K, V = super().update(k, v, *a, **kw)
            n = lq(K.shape[2])
            if n == 0:
                return K, V
            kq = kivi.fake_quantize_keys(K[:, :, :n], 2, G, scale_dtype)
            vq = kivi.fake_quantize_values(V[:, :, :n], 2, G, scale_dtype)
            return torch.cat([kq, K[:, :, n:]], 2), torch.cat([vq, V[:, :, n:]], 2)
    def make():
        c = DynamicCache(); c.layers = [Layer() for _ in range(model.config.num_hidden_layers)]; c.layer_class_to_replicate = None
        return c
    return make

for policy, sd in [(sys.argv[1], getattr(torch, sys.argv[2]))]:
    t = time.time()
    p = perplexity(model, ids, prefix=512, cache_factory=factory(policy, sd), progress=False)
    print(f"policy={policy} scales={sd} ppl={p:.3f} (+{(p/32.359-1)*100:.1f}%) {time.time()-t:.0f}s", flush=True)
