"""The runtime KV store that kvpass owns, and the registry that finds it from a cache tensor.

One `KVStore` holds one attention layer's keys and values for one cache object. The user's
cache (DynamicCache, StaticCache, a model's own buffers) keeps only *stand-ins*: tensors of the
right logical shape [B, H, T, D] that alias a tiny storage (stride 0, or stride 1 for static
caches so that `cache.reset()`'s `zero_()` still works) filled with NaN, so any use of a
stand-in's values outside kvpass is loudly wrong instead of silently wrong. The compiled graph
finds the store through the registry, keyed by the storage of the tensor it is handed.

Token layout inside a store (L = length, Lq = quantized length, a multiple of G):
    tokens [0, Lq)   encoded by the codec, parts appended along dim 2 (never re-encoded)
    tokens [Lq, L)   the full-precision residual window, res_k/res_v [B, H, L - Lq, D]
Flush policy: after every write, while the window holds at least R + G tokens, its oldest
whole groups are encoded, so it keeps between min(L, R) and R + G - 1 tokens; with R = 0 it
keeps the last partial group (< G tokens), since a key group needs G tokens to be quantized
per channel. Keys and values share the boundary Lq.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from kvpass.lowering.codecs import make_codec

log = logging.getLogger("kvpass")


@dataclass(frozen=True)
class StoreConfig:
    """What a store needs to know about quantization; fixed per compiled site."""

    key_bits: int
    value_bits: int
    group_size: int
    residual_length: int


class KVStoreError(RuntimeError):
    """The cache and kvpass's store disagree in a way kvpass cannot repair (never silently wrong)."""


class _Parts:
    """Growable buffers for one codec's parts. Capacity grows geometrically by 1/8 (at least 16
    groups), so appends stay amortized O(1) while spare capacity stays under ~12.5%."""

    def __init__(self, codec, B, H, D, device):
        self.codec, self.specs = codec, codec.parts(D)
        self.group = max(s.tokens_per_row for s in self.specs.values())
        self.B, self.H, self.device = B, H, device
        self.buffers = {n: self._alloc(s, 0) for n, s in self.specs.items()}
        self.tokens = 0

    def _alloc(self, spec, tokens):
        rows = tokens // spec.tokens_per_row
        return torch.empty(self.B, self.H, rows, *spec.tail, dtype=spec.dtype, device=self.device)

    def append(self, x):  # x [B, H, n, D], n whole groups
        parts = self.codec.encode(x)
        new_tokens = self.tokens + x.shape[2]
        for name, spec in self.specs.items():
            buf, tpr = self.buffers[name], spec.tokens_per_row
            if buf.shape[2] * tpr < new_tokens:
                cap = buf.shape[2] * tpr
                step = max(cap // 8 // self.group * self.group, 16 * self.group)
                grown = self._alloc(spec, max(new_tokens, cap + step))
                grown[:, :, : self.tokens // tpr] = buf[:, :, : self.tokens // tpr]
                self.buffers[name] = buf = grown
            buf[:, :, self.tokens // tpr : new_tokens // tpr] = parts[name]
        self.tokens = new_tokens

    def view(self, start, stop):  # parts of tokens [start, stop), both multiples of every tokens_per_row
        return {n: b[:, :, start // s.tokens_per_row : stop // s.tokens_per_row]
                for (n, b), s in zip(self.buffers.items(), self.specs.values())}

    def decode(self, start, stop):
        return self.codec.decode(self.view(start, stop))

    def truncate(self, tokens):
        self.tokens = tokens

    def nbytes(self):
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def used_bytes(self):
        return sum(b[:, :, : self.tokens // s.tokens_per_row].numel() * b.element_size()
                   for b, s in zip(self.buffers.values(), self.specs.values()))


class KVStore:
    """One layer's quantized keys and values for one cache (see the module docstring for layout)."""

    def __init__(self, cfg: StoreConfig, B: int, H: int, Dk: int, Dv: int, dtype, device):
        device = torch.empty(0, device=device).device  # "cuda" -> "cuda:0", so device checks compare equal
        self.cfg, self.dtype, self.device = cfg, dtype, device
        self.B, self.H, self.Dk, self.Dv = B, H, Dk, Dv
        G = cfg.group_size
        self.keys = _Parts(make_codec("key", cfg.key_bits, G, dtype, Dk), B, H, Dk, device)
        self.values = _Parts(make_codec("value", cfg.value_bits, G, dtype, Dv), B, H, Dv, device)
        self.res_k = torch.empty(B, H, 0, Dk, dtype=dtype, device=device)  # [B, H, L - Lq, Dk]
        self.res_v = torch.empty(B, H, 0, Dv, dtype=dtype, device=device)

    @property
    def quantized_length(self) -> int:
        return self.keys.tokens

    @property
    def length(self) -> int:
        return self.keys.tokens + self.res_k.shape[2]

    def check_compatible(self, k_new: torch.Tensor, v_new: torch.Tensor):
        B, H, _, Dk = k_new.shape
        if (B, H, Dk, v_new.shape[-1]) != (self.B, self.H, self.Dk, self.Dv) or k_new.device != self.device:
            raise KVStoreError(
                f"kvpass: new tokens of shape {tuple(k_new.shape)} on {k_new.device} do not fit the store "
                f"(batch {self.B}, heads {self.H}, head_dim {self.Dk}/{self.Dv} on {self.device}); the cache "
                "was changed outside the compiled model (batch reorder/expansion). Use a fresh cache."
            )

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor):
        """Append tokens k_new [B, H, n, Dk], v_new [B, H, n, Dv] and flush the window."""
        self.check_compatible(k_new, v_new)
        self.res_k = torch.cat([self.res_k, k_new.to(self.dtype)], dim=2)
        self.res_v = torch.cat([self.res_v, v_new.to(self.dtype)], dim=2)
        G, R = self.cfg.group_size, self.cfg.residual_length
        window = self.res_k.shape[2]
        if window >= R + G:
            n = (window - R) // G * G
            self.keys.append(self.res_k[:, :, :n])
            self.values.append(self.res_v[:, :, :n])
            self.res_k = self.res_k[:, :, n:].clone()
            self.res_v = self.res_v[:, :, n:].clone()

    def truncate(self, length: int):
        """Keep the first `length` tokens (crop, reset, rewrite from an earlier position).

        Cutting inside an encoded group moves that group's kept tokens, as dequantized, back into
        the window: they keep exactly the values attention saw before.
        """
        if length >= self.length:
            return
        Lq, G = self.quantized_length, self.cfg.group_size
        if length >= Lq:
            self.res_k = self.res_k[:, :, : length - Lq].clone()
            self.res_v = self.res_v[:, :, : length - Lq].clone()
            return
        start = length // G * G
        self.res_k = self.keys.decode(start, start + G)[:, :, : length - start].to(self.dtype)
        self.res_v = self.values.decode(start, start + G)[:, :, : length - start].to(self.dtype)
        self.keys.truncate(start)
        self.values.truncate(start)

    def _read(self, parts: _Parts, res: torch.Tensor, kv_len: int) -> torch.Tensor:
        Lq = parts.tokens
        pieces = [parts.decode(0, Lq).to(self.dtype), res] if Lq else [res]
        out = torch.cat(pieces, dim=2)
        if kv_len > out.shape[2]:  # static buffers: unwritten slots read as zeros, as in HF's buffer
            pad = out.new_zeros(*out.shape[:2], kv_len - out.shape[2], out.shape[3])
            out = torch.cat([out, pad], dim=2)
        return out[:, :, :kv_len]

    def read_keys(self, kv_len: int) -> torch.Tensor:
        """Dequantized keys [B, H, kv_len, Dk] in the model dtype (fp32 math, then cast)."""
        return self._read(self.keys, self.res_k, kv_len)

    def read_values(self, kv_len: int) -> torch.Tensor:
        """Dequantized values [B, H, kv_len, Dv] in the model dtype."""
        return self._read(self.values, self.res_v, kv_len)

    def nbytes(self) -> int:
        """Bytes this store holds on its device (allocated capacity, residual included)."""
        res = self.res_k.numel() * self.res_k.element_size() + self.res_v.numel() * self.res_v.element_size()
        return self.keys.nbytes() + self.values.nbytes() + res

    def used_bytes(self) -> int:
        """Bytes of the tokens actually stored (no spare capacity)."""
        res = self.res_k.numel() * self.res_k.element_size() + self.res_v.numel() * self.res_v.element_size()
        return self.keys.used_bytes() + self.values.used_bytes() + res


# ---------------------------------------------------------------------------------------------
# Registry: storage of a tensor the graph is handed -> the store it stands for.

_REGISTRY: dict[int, tuple[StorageWeakRef, KVStore]] = {}
_inserts_since_purge = 0


def _key(t: torch.Tensor):
    storage = t.untyped_storage()
    return storage.data_ptr(), StorageWeakRef(storage)


def lookup(t: torch.Tensor) -> KVStore | None:
    """The store whose stand-in, token or buffer `t` is, or None."""
    if t.numel() == 0:
        return None
    ptr, ref = _key(t)
    entry = _REGISTRY.get(ptr)
    if entry is None or entry[0].expired() or entry[0].cdata != ref.cdata:
        return None
    return entry[1]


def register(t: torch.Tensor, store: KVStore):
    """Make `t`'s storage find `store` for as long as that storage lives."""
    global _inserts_since_purge
    ptr, ref = _key(t)
    _REGISTRY[ptr] = (ref, store)
    _inserts_since_purge += 1
    if _inserts_since_purge >= 256:
        purge()


def purge():
    """Forget entries whose storage died (their stores are freed with the last entry)."""
    global _inserts_since_purge
    _inserts_since_purge = 0
    for ptr in [p for p, (ref, _) in _REGISTRY.items() if ref.expired()]:
        del _REGISTRY[ptr]


def live_stores() -> list[KVStore]:
    """Distinct stores still reachable from a live tensor."""
    purge()
    seen = {}
    for _, store in _REGISTRY.values():
        seen[id(store)] = store
    return list(seen.values())


def new_token(store: KVStore) -> torch.Tensor:
    """A fresh 1-element NaN tensor registered to `store`; the write op's output."""
    token = torch.full((1,), float("nan"), dtype=store.dtype, device=store.device)
    register(token, store)
    return token
