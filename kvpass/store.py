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

Two append paths with bit-identical results (`lowering/dispatch.py` picks one per call):
    reference (CPU, and wherever the kernel does not apply): the window grows by `torch.cat`,
        flushed groups go through the codecs (lowering/kivi.py) and are copied into the parts;
    kernel (CUDA, or Triton's interpreter): the window lives in a preallocated buffer of R + G
        tokens per store (res_k/res_v are views of its prefix); a step writes the new tokens in
        place, and a flush is one launch of templates/quantize_append.py that encodes the oldest
        whole groups straight into the part buffers and shifts the rest of the window down. A
        write that does not fit (a prefill) concatenates window and new tokens first (torch).
Device-lengths mode (`enable_device_lengths`, used for static caches when the kernels apply): Lq and L
also live in `device_lengths` (int32 [4] = Lq, L, error, and a count of the append kernel's programs
that is 0 between launches) and every buffer is allocated up front (parts for the cache's
capacity, a window of R + 2G tokens). A decode write (`append_at`) is one launch of the
quantize-append kernel in its FROM_STATE mode, which reads the lengths and the cache positions
on the device, writes the token, flushes when due and updates the lengths there; the decode
kernel reads them there too. Nothing on that path reads a length on the host, so it can be
replayed from a CUDA graph (kvpass/cudagraph.py). Host-side users (prefill appends, truncate, reads,
`length`) first sync the host fields from the device (`_host_view`, counted by `host_path_uses`).
Reads (`read_keys` / `read_values`: multi-token queries, eager-attention models) are routed the same
way as appends: the codecs' fp32 dequantize, a cast and `torch.cat` with the window and zeros (reference), or
one launch of templates/dequantize.py that writes the whole [B, H, kv_len, D] result (bit-identical).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from kvpass.lowering import dispatch
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

    def capacity(self) -> int:
        return min(b.shape[2] * s.tokens_per_row for b, s in zip(self.buffers.values(), self.specs.values()))

    def reserve(self, new_tokens, exact=False):
        """Grow the buffers (keeping the stored tokens) until they hold `new_tokens` tokens
        (geometrically, or exactly `new_tokens` when `exact`)."""
        for name, spec in self.specs.items():
            buf, tpr = self.buffers[name], spec.tokens_per_row
            if buf.shape[2] * tpr < new_tokens:
                cap = buf.shape[2] * tpr
                step = max(cap // 8 // self.group * self.group, 16 * self.group)
                grown = self._alloc(spec, new_tokens if exact else max(new_tokens, cap + step))
                grown[:, :, : self.tokens // tpr] = buf[:, :, : self.tokens // tpr]
                self.buffers[name] = grown

    def append(self, x):  # x [B, H, n, D], n whole groups
        parts = self.codec.encode(x)
        new_tokens = self.tokens + x.shape[2]
        self.reserve(new_tokens)
        for name, spec in self.specs.items():
            tpr = spec.tokens_per_row
            self.buffers[name][:, :, self.tokens // tpr : new_tokens // tpr] = parts[name]
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
        self._win_k = self._win_v = None  # kernel path: [B, H, R + G (+ G), D] buffers, res_k/res_v their prefix
        # device-lengths mode (enable_device_lengths): int32 [4] = (Lq, L, error, append ticket count) on the device
        self.device_lengths: torch.Tensor | None = None
        self._host_stale = False  # the device lengths moved on since the host fields were synced

    @property
    def quantized_length(self) -> int:
        self._host_view()
        return self.keys.tokens

    @property
    def length(self) -> int:
        self._host_view()
        return self.keys.tokens + self.res_k.shape[2]

    @property
    def window_k(self) -> torch.Tensor | None:
        """Device-lengths mode: the whole window buffer [B, H, R + 2G, Dk] (rows [0, L - Lq) valid)."""
        return self._win_k

    @property
    def window_v(self) -> torch.Tensor | None:
        return self._win_v

    # ---- device-side lengths (CUDA-graph capturable decode steps)

    def enable_device_lengths(self, capacity: int):
        """Keep Lq and L in `device_lengths` so that a decode step (`append_at` + the decode kernel)
        never reads a length on the host: it can then be captured in a CUDA graph and replayed.

        Allocates everything the store will ever need up front: parts for `capacity` tokens (a
        StaticCache's max_cache_len, rounded up to whole groups) and a window of R + 2G tokens, so
        no buffer moves afterwards (a replay keeps the addresses it recorded). Host-side users
        (prefill appends, truncate, reads, `length`) sync the host fields from the device first."""
        G, R = self.cfg.group_size, self.cfg.residual_length
        cap = -(-capacity // G) * G
        self.keys.reserve(cap, exact=True)
        self.values.reserve(cap, exact=True)
        self._ensure_window()
        self._to_window_buffer()
        self.device_lengths = torch.zeros(4, dtype=torch.int32, device=self.device)
        self._push_lengths()

    @property
    def capacity(self) -> int:
        """Tokens the part buffers hold without growing."""
        return self.keys.capacity()

    def can_append_on_device(self, n: int) -> bool:
        return self.device_lengths is not None and n <= self.cfg.group_size + 1

    def append_at(self, k_new: torch.Tensor, v_new: torch.Tensor, positions: torch.Tensor, kernels):
        """Device-lengths decode write of k_new/v_new [B, H, n, D] at `positions` (int [n] on the
        device): no host sync, no allocation that outlives the call (see `append_from_state`)."""
        if k_new.dtype != self.dtype:
            k_new, v_new = k_new.to(self.dtype), v_new.to(self.dtype)
        if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
            k_new, v_new = k_new.contiguous(), v_new.contiguous()
        kb, vb = self.keys.buffers, self.values.buffers
        kernels.append_from_state(
            k_new, v_new, positions.reshape(-1), self.device_lengths, self._win_k, self._win_v,
            kb["codes"], kb["scale"], kb["zero"], vb["codes"], vb["scale"], vb["zero"],
            key_bits=self.cfg.key_bits, value_bits=self.cfg.value_bits, group_size=self.cfg.group_size,
            residual_length=self.cfg.residual_length)
        self._host_stale = True

    def _host_view(self):
        """Make the host fields (part token counts, res_k/res_v) current; counts a host-path use."""
        count_host_path_use()
        if not self._host_stale:
            return
        Lq, L, err, _ = self.device_lengths.tolist()  # a device sync: never on the decode path
        self._host_stale = False
        if err:
            self.device_lengths[2] = 0
            raise KVStoreError(
                "kvpass: a decode step wrote to positions the quantized cache cannot take (not consecutive, "
                f"before the full-precision window, past the end, or beyond the capacity of {self.capacity} tokens); "
                "that write was dropped. Use consecutive cache positions, or crop with a fresh cache."
            )
        self.keys.tokens = self.values.tokens = Lq
        self.res_k, self.res_v = self._win_k[:, :, : L - Lq], self._win_v[:, :, : L - Lq]

    def _push_lengths(self):
        """After a host-side change in device-lengths mode: window into its buffer, lengths to the device."""
        if self.device_lengths is None:
            return
        self._to_window_buffer()
        Lq = self.keys.tokens
        host = torch.tensor([Lq, Lq + self.res_k.shape[2], 0, 0], dtype=torch.int32)
        self.device_lengths.copy_(host)

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
        self._host_view()
        if self.device_lengths is not None and self.length + k_new.shape[2] > self.capacity:
            raise KVStoreError(f"kvpass: writing {k_new.shape[2]} tokens after {self.length} overflows the cache's "
                               f"{self.capacity} slots (its max_cache_len)")
        kernels = dispatch.quantize_append_kernel(self)
        if kernels is None:
            self._append_reference(k_new, v_new)
        else:
            self._append_kernel(kernels, k_new, v_new)
        self._push_lengths()

    def _append_reference(self, k_new, v_new):
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

    def _window_in_buffer(self) -> bool:
        """Whether res_k/res_v are prefix views of the window buffers (the kernel path's layout)."""
        return self._win_k is not None and all(
            r.data_ptr() == w.data_ptr() and r.stride() == w.stride()
            for r, w in ((self.res_k, self._win_k), (self.res_v, self._win_v)))

    def _ensure_window(self):
        """The kernel path's window buffers: R + 2G token slots (R + G - 1 kept, plus up to G + 1 new)."""
        if self._win_k is None:
            G, R = self.cfg.group_size, self.cfg.residual_length
            self._win_k = torch.empty(self.B, self.H, R + 2 * G, self.Dk, dtype=self.dtype, device=self.device)
            self._win_v = torch.empty(self.B, self.H, R + 2 * G, self.Dv, dtype=self.dtype, device=self.device)

    def _to_window_buffer(self):
        """Move res_k/res_v into the window buffers' prefix (after the reference path or truncate)."""
        if not self._window_in_buffer():
            w = self.res_k.shape[2]
            self._win_k[:, :, :w].copy_(self.res_k)
            self._win_v[:, :, :w].copy_(self.res_v)
            self.res_k, self.res_v = self._win_k[:, :, :w], self._win_v[:, :, :w]

    def _append_kernel(self, kernels, k_new, v_new):
        G, R = self.cfg.group_size, self.cfg.residual_length
        w, n = self.res_k.shape[2], k_new.shape[2]
        self._ensure_window()
        cap = self._win_k.shape[2]
        if w + n <= cap:  # decode: write the new tokens in place after the window
            self._to_window_buffer()  # after the reference path, truncate, or a caller that set res_k/res_v
            self._win_k[:, :, w : w + n].copy_(k_new)
            self._win_v[:, :, w : w + n].copy_(v_new)
            src_k, src_v = self._win_k[:, :, : w + n], self._win_v[:, :, : w + n]  # [B, H, w + n, D]
        else:  # a prefill: window + new tokens, whose leftover the kernel copies into the buffer
            src_k = torch.cat([self.res_k, k_new.to(self.dtype)], dim=2)
            src_v = torch.cat([self.res_v, v_new.to(self.dtype)], dim=2)
        total = w + n
        if total >= R + G:
            m = (total - R) // G * G  # oldest whole groups; total - m < R + G tokens stay
            Lq = self.keys.tokens
            self.keys.reserve(Lq + m)  # never grows in device-lengths mode (checked in `append`)
            self.values.reserve(Lq + m)
            kb, vb = self.keys.buffers, self.values.buffers
            kernels.quantize_append(
                src_k, src_v, kb["codes"], kb["scale"], kb["zero"], vb["codes"], vb["scale"], vb["zero"],
                key_bits=self.cfg.key_bits, value_bits=self.cfg.value_bits, group_size=G, n=m, row=Lq,
                window_k=self._win_k, window_v=self._win_v, rest=total - m)
            self.keys.tokens = self.values.tokens = Lq + m
            total -= m
        assert total <= cap, "the window outgrew its buffer"
        self.res_k, self.res_v = self._win_k[:, :, :total], self._win_v[:, :, :total]

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
        else:
            start = length // G * G
            self.res_k = self.keys.decode(start, start + G)[:, :, : length - start].to(self.dtype)
            self.res_v = self.values.decode(start, start + G)[:, :, : length - start].to(self.dtype)
            self.keys.truncate(start)
            self.values.truncate(start)
        self._push_lengths()

    def _read(self, kind: str, kv_len: int) -> torch.Tensor:
        self._host_view()
        parts, res = (self.keys, self.res_k) if kind == "key" else (self.values, self.res_v)
        Lq = parts.tokens
        kernel = dispatch.dequantize_kernel(self, kind)
        if kernel is not None:  # one launch: parts, window and zero tail, bit-identical to the torch path below
            b = parts.buffers
            return kernel.dequantize(b["codes"], b["scale"], b["zero"], res, kind=kind, bits=parts.codec.bits,
                                     group_size=parts.codec.group_size, n_quant=Lq, kv_len=kv_len)
        pieces = [parts.decode(0, Lq).to(self.dtype), res] if Lq else [res]
        out = torch.cat(pieces, dim=2)
        if kv_len > out.shape[2]:  # static buffers: unwritten slots read as zeros, as in HF's buffer
            pad = out.new_zeros(*out.shape[:2], kv_len - out.shape[2], out.shape[3])
            out = torch.cat([out, pad], dim=2)
        return out[:, :, :kv_len]

    def read_keys(self, kv_len: int) -> torch.Tensor:
        """Dequantized keys [B, H, kv_len, Dk] in the model dtype (fp32 math, then cast)."""
        return self._read("key", kv_len)

    def read_values(self, kv_len: int) -> torch.Tensor:
        """Dequantized values [B, H, kv_len, Dv] in the model dtype."""
        return self._read("value", kv_len)

    def nbytes(self) -> int:
        """Bytes this store holds on its device: the parts' allocated capacity and the residual window's
        tokens (the kernel path's preallocated window buffer, R + 2G token slots, counts the tokens it
        holds, so both append paths report the same bytes)."""
        self._host_view()
        res = self.res_k.numel() * self.res_k.element_size() + self.res_v.numel() * self.res_v.element_size()
        return self.keys.nbytes() + self.values.nbytes() + res

    def used_bytes(self) -> int:
        """Bytes of the tokens actually stored (no spare capacity)."""
        self._host_view()
        res = self.res_k.numel() * self.res_k.element_size() + self.res_v.numel() * self.res_v.element_size()
        return self.keys.used_bytes() + self.values.used_bytes() + res


# ---------------------------------------------------------------------------------------------
# Registry: storage of a tensor the graph is handed -> the store it stands for.

_REGISTRY: dict[int, tuple[StorageWeakRef, KVStore]] = {}
_inserts_since_purge = 0
_host_path_uses = 0


def host_path_uses() -> int:
    """How many times a store's host-side state was used (prefill appends, reads, truncation,
    lengths, host-side positions). A call that leaves it unchanged ran on the device only, so its
    launches can be captured in a CUDA graph and replayed (kvpass/cudagraph.py)."""
    return _host_path_uses


def count_host_path_use():
    global _host_path_uses
    _host_path_uses += 1


def _key(t: torch.Tensor):
    storage = t.untyped_storage()
    return storage.data_ptr(), StorageWeakRef(storage)


def lookup(t: torch.Tensor) -> KVStore | None:
    """The store whose stand-in, token or buffer `t` is, or None."""
    if t.numel() == 0:
        return None
    storage = t.untyped_storage()
    entry = _REGISTRY.get(storage.data_ptr())
    if entry is None:  # the common case (the CUDA-graph runner asks for every input): no weak ref built
        return None
    if entry[0].expired() or entry[0].cdata != StorageWeakRef(storage).cdata:
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
    """A fresh 1-element tensor registered to `store`; the write op's output. NaN off CUDA; on CUDA
    left uninitialized (a fill would be one more kernel per layer in every decode step: 1 us each
    on the H100). Only kvpass ops consume a token, and they use its storage, never its value."""
    if store.device.type == "cuda":
        token = torch.empty((1,), dtype=store.dtype, device=store.device)
    else:
        token = torch.full((1,), float("nan"), dtype=store.dtype, device=store.device)
    register(token, store)
    return token
