"""Bad input gets a clear error naming what was received and what is valid."""
import pytest
import torch

import kvpass
from tiny_models import FAMILIES


@pytest.mark.parametrize("bits", [0, 1, 3, 5, 32])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match=rf"bits={bits} is not supported; valid: 2, 4, 8"):
        kvpass.backend(bits=bits)


def test_key_and_value_bits_are_validated_too():
    with pytest.raises(ValueError, match="value_bits=3"):
        kvpass.backend(bits=2, value_bits=3)
    with pytest.raises(TypeError, match="key_bits must be an int"):
        kvpass.backend(key_bits=2.0)


def test_residual_not_a_multiple_of_group():
    with pytest.raises(ValueError, match=r"residual_length=100 must be a non-negative multiple of group_size=32; use 96 or 128"):
        kvpass.backend(residual_length=100)


@pytest.mark.parametrize("group_size", [0, -32, 12])
def test_bad_group_size(group_size):
    with pytest.raises(ValueError, match=f"group_size={group_size}"):
        kvpass.backend(group_size=group_size, residual_length=0)


def test_group_not_dividing_head_dim_is_reported_at_compile():
    model = FAMILIES["llama"][0]("sdpa")  # head_dim 16
    model.compile(backend=kvpass.backend(bits=2, group_size=24, residual_length=0, inner="eager"))
    with pytest.raises(Exception, match="group_size=24 does not divide the key head_dim 16") as info:
        model.generate(torch.randint(1, 97, (1, 8)), max_new_tokens=2)
    assert isinstance(getattr(info.value, "inner_exception", info.value), ValueError)


def test_float64_model_is_refused_with_a_fix():
    model = FAMILIES["llama"][0]("sdpa").double()
    model.compile(backend=kvpass.backend(bits=2, group_size=8, residual_length=0, inner="eager"))
    with pytest.raises(Exception, match=r"torch.float64; supported cache dtypes are float16, bfloat16 and float32"):
        model.generate(torch.randint(1, 97, (1, 8)), max_new_tokens=2)


def test_explain_needs_a_kvpass_backend():
    with pytest.raises(TypeError, match="kvpass.explain expects the object returned by kvpass.backend"):
        kvpass.explain("inductor")


def test_bad_inner():
    with pytest.raises(ValueError, match="inner='cudagraphs' is not valid"):
        kvpass.backend(inner="cudagraphs")


def test_registered_as_named_dynamo_backend():
    """`torch.compile(model, backend="kvpass")` resolves through the torch_dynamo_backends entry point."""
    from importlib.metadata import entry_points

    if not [e for e in entry_points(group="torch_dynamo_backends") if e.name == "kvpass"]:
        pytest.skip("kvpass is not pip-installed here (entry points come from the installed metadata)")
    from torch._dynamo import lookup_backend

    assert lookup_backend("kvpass") is kvpass.backend.__globals__["dynamo_backend"]
