"""Shared setup of the Triton kernel tests: the interpreter on machines without CUDA (set before
any kernel module is imported), the device, the dtypes, random test data and the fixture that
routes stores to the kernels."""
import os

import pytest
import torch

if not torch.cuda.is_available():  # must precede the first import of the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture
def kernel_path(monkeypatch):
    """Route stores to the kernels (on CPU: through the interpreter)."""
    monkeypatch.delenv("KVPASS_DISABLE_TRITON", raising=False)
    if not ON_GPU:
        monkeypatch.setenv("KVPASS_TRITON_INTERPRET", "1")


def rand(shape, dtype, seed, scale=1.0, shift=0.3):
    """Random data on DEVICE with an outlier channel (as real keys have) and no exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale + shift
    x[..., 1] *= 6.0
    x = torch.where(x == 0, torch.full_like(x, 0.125), x)
    return x.to(dtype).to(DEVICE)
