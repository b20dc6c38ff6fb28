"""generate()'s own compile must not bypass kvpass. transformers compiles the forward of static-cache
generation by itself on CUDA (`_valid_auto_compile_criteria`, torch.compile with Inductor around
the model's __call__); here it is forced on CPU through `CompileConfig._compile_all_devices`. A model
compiled in place with kvpass must still decode through kvpass: the same logits as with
`disable_compile=True`, and not the full-precision ones."""
import pytest
import torch

import kvpass
from conftest import LOGIT_ATOL
from tiny_models import FAMILIES

CompileConfig = pytest.importorskip("transformers.generation.configuration_utils").CompileConfig
needs_flag = pytest.mark.skipif(not hasattr(CompileConfig, "_compile_all_devices"),
                                reason="this transformers has no CompileConfig._compile_all_devices")

NEW = 8
# 200 prompt tokens > R + G (128 + 32): the decode steps read a quantized region
IDS = torch.randint(0, 97, (1, 200), generator=torch.Generator().manual_seed(1))


def _logits(use_kvpass: bool, auto_compile: bool):
    torch._dynamo.reset()
    model = FAMILIES["llama"][0]("sdpa")
    backend = kvpass.backend(bits=2, inner="eager")
    if use_kvpass:
        model.compile(backend=backend)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, cache_implementation="static",
              output_logits=True, return_dict_in_generate=True)
    if auto_compile:
        cc = CompileConfig()
        cc._compile_all_devices = True          # what a CUDA device gets without it
        model.generation_config.compile_config = cc
    else:
        kw["disable_compile"] = True
    out = model.generate(IDS, **kw)
    if auto_compile:
        assert hasattr(model, "_compiled_call"), "generate() did not take its auto-compile path"
    if use_kvpass:
        assert kvpass.explain(backend).rewritten == model.config.num_hidden_layers
    return torch.stack(out.logits)                                   # [NEW, 1, vocab]


@needs_flag
def test_generate_auto_compile_keeps_kvpass():
    full = _logits(False, False)
    manual = _logits(True, False)
    auto = _logits(True, True)
    tol = LOGIT_ATOL[torch.float32]
    assert (manual - full).abs().max() > 10 * tol, "the kvpass run matches full precision: nothing quantized?"
    torch.testing.assert_close(auto, manual, atol=tol, rtol=0)
