"""Quality evaluation for KV-cache compression on a real model (CPU-friendly).

  model.py       load SmolLM2-135M-Instruct offline (load_default_model, load_model)
  perplexity.py  perplexity through the decode path (perplexity, sequence_nll, full_sequence_perplexity)
  passkey.py     passkey retrieval in filler text (passkey)
  baselines.py   naive per-token fake-quant cache, HF QuantizedCache factories
  configs.py     config names -> backend / cache factory
  cli.py         table of configs (main_eval); also ``python -m kvpass.evaluate``
"""
from kvpass.evaluate.baselines import (FakeQuantCache, hf_quantized_cache_factory,
                                       naive_cache_factory)
from kvpass.evaluate.model import load_default_model, load_model
from kvpass.evaluate.passkey import passkey
from kvpass.evaluate.perplexity import full_sequence_perplexity, perplexity, sequence_nll

__all__ = ["FakeQuantCache", "full_sequence_perplexity", "hf_quantized_cache_factory",
           "load_default_model", "load_model", "naive_cache_factory", "passkey", "perplexity", "sequence_nll"]
