"""The compressed KV cache of DeepSeek-V4 (SPEC §4 runtime state, stored at the precision the model simulates).

Per layer it keeps:

* the sliding window: the KV of the most recent positions (``window + max_crop`` of them), nope dims as e4m3 with
  one ue8m0 scale per 64 values, rope dims bf16 - lossless, since the model already rounds them so (SPEC §5.4);
* compressed entries (ratio > 0): same storage, one entry per ``ratio`` positions (SPEC §5.5);
* indexer keys (ratio 4): e2m1 pairs packed in a byte + one ue8m0 scale per 32 values (SPEC §5.7);
* the compressors' input rows (the normed hidden states, shared by the layer's KV and indexer compressors) of the
  last ``coff * ratio + max_crop`` positions: the unfinished block, the previous block the overlapping compressor
  pools from, and enough history to ``crop``. A block's rows are projected when it completes. (With
  ``batch_invariant=False`` each compressor keeps its rows projected on arrival, fp32 KV and gate scores, as the
  official decode path computes them.)

Buffers are right-aligned per row: slot ``j`` of a buffer of ``T`` slots holds position ``length[b] - T + j`` of
row ``b`` (invalid when negative), so rows of a left-padded batch share every tensor while keeping their own
lengths. Compressed entries are left-aligned (entry ``i`` at index ``i``) and grow in preallocated chunks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from transformers.cache_utils import Cache

from . import kernels
from .numerics import FP4_AMAX_FLOOR, FP4_MAX, FP8_AMAX_FLOOR, FP8_MAX, ceil_pow2_scale, round_to_e2m1

KV_BLOCK = 64  # FP8 simulation block of the KV nope dims (SPEC §5.4)
INDEX_BLOCK = 32  # FP4 simulation block of the indexer keys (SPEC §5.7)
ENTRY_CHUNK = 256  # compressed entries are allocated this many at a time
Store = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Storage formats (values already on these grids are stored and restored exactly)
# ---------------------------------------------------------------------------------------------------------------
def _e8m0(scale: torch.Tensor) -> torch.Tensor:
    return ((scale.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def _from_e8m0(code: torch.Tensor) -> torch.Tensor:
    return (code.to(torch.int32) << 23).view(torch.float32)


def pack_kv(kv: torch.Tensor, rope_dim: int) -> Store:
    """``[..., D]`` bf16 KV whose nope dims lie on the ue8m0 e4m3 grid -> e4m3 nope + e8m0 scales + bf16 rope."""
    nope = kv[..., :-rope_dim].float().unflatten(-1, (-1, KV_BLOCK))
    scale = ceil_pow2_scale(nope.abs().amax(-1, keepdim=True).clamp_min(FP8_AMAX_FLOOR), FP8_MAX)
    # e4m3 bytes kept as uint8: CPU gather/scatter kernels do not take float8 tensors.
    q = (nope / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return {"q": q.flatten(-2), "s": _e8m0(scale.squeeze(-1)), "rope": kv[..., -rope_dim:].to(torch.bfloat16)}


_E4M3_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # [256] fp32 per e4m3 byte
_E8M0_VALUES = _from_e8m0(torch.arange(256, dtype=torch.uint8))  # [256] fp32 per e8m0 scale code


def _e4m3_pairs() -> torch.Tensor:
    """int64 ``[65536]``: for two e4m3 bytes read as a little-endian int16 ``i``, their two values as fp32, at
    ``i + 32768``. A lookup (index_select with int32 indices) decodes two values; several times faster than CPU
    float8 conversion."""
    b = torch.arange(-(1 << 15), 1 << 15) & 0xFFFF
    return torch.stack([_E4M3_VALUES[b & 0xFF], _E4M3_VALUES[b >> 8]], dim=-1).view(torch.int64).view(-1)


_E4M3_PAIRS = _e4m3_pairs()  # 512 KiB


def unpack_kv(store: Store, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed KV -> bf16 ``[..., D]``; with ``out`` (fp32, same shape) the values are written there instead (the
    same values: e4m3 times a power of two, and bf16 rope, are exact in both)."""
    codes = store["q"]
    if kernels.available():  # one compiled pass: look up, scale, write (fp32 or bf16) in place
        dst = out
        if dst is None:
            dst = codes.new_empty((*codes.shape[:-1], codes.shape[-1] + store["rope"].shape[-1]), dtype=torch.bfloat16)
        if kernels.decode_e4m3_blocks(codes, store["s"], _E4M3_VALUES, _E8M0_VALUES, dst[..., : codes.shape[-1]]):
            dst[..., codes.shape[-1] :] = store["rope"]
            return dst
    pairs = codes.reshape(-1).view(torch.int16).to(torch.int32).add_(1 << 15)
    q = _E4M3_PAIRS.to(codes.device).index_select(0, pairs).view(torch.float32)
    q = q.view(*codes.shape[:-1], -1, KV_BLOCK)
    scale = _from_e8m0(store["s"]).unsqueeze(-1)
    if out is None:
        nope = (q * scale).flatten(-2)
        return torch.cat([nope.to(torch.bfloat16), store["rope"]], dim=-1)
    rope_dim = store["rope"].shape[-1]
    nope = out[..., :-rope_dim].unflatten(-1, (-1, KV_BLOCK))
    if out.requires_grad:  # a buffer in an autograd graph (training forward with a cache) takes no out= ops
        nope.copy_(q * scale)
    else:
        torch.mul(q, scale, out=nope)
    out[..., -rope_dim:] = store["rope"]
    return out


def pack_index_keys(keys: torch.Tensor) -> Store:
    """``[..., d]`` bf16 keys on the ue8m0 e2m1 grid -> packed e2m1 pairs (low nibble = even element) + scales."""
    x = keys.float().unflatten(-1, (-1, INDEX_BLOCK))
    scale = ceil_pow2_scale(x.abs().amax(-1, keepdim=True).clamp_min(FP4_AMAX_FLOOR), FP4_MAX)
    v = round_to_e2m1((x / scale).clamp(-FP4_MAX, FP4_MAX)).flatten(-2)
    mag = v.abs()
    code = torch.where(mag < 2, mag * 2, torch.where(mag < 4, mag + 2, mag / 2 + 4)).to(torch.uint8)
    code = code | ((v < 0).to(torch.uint8) << 3)
    return {"q": code[..., 0::2] | (code[..., 1::2] << 4), "s": _e8m0(scale.squeeze(-1))}


_E2M1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6])


def _e2m1_scaled_pairs() -> torch.Tensor:
    """int32 ``[256 * 256]``: at ``scale_code * 256 + byte``, the byte's two e2m1 values (low nibble first) times the
    e8m0 scale, as two bf16 (the exact products ``bf16(value * scale)`` of decoding then scaling)."""
    b = torch.arange(256)
    pairs = torch.stack([_E2M1[b & 0xF], _E2M1[b >> 4]], dim=-1).to(torch.bfloat16)  # [256, 2]
    scales = _E8M0_VALUES.to(torch.bfloat16).view(256, 1, 1)
    return (pairs * scales).view(torch.int32).reshape(-1)


_E2M1_SCALED = _e2m1_scaled_pairs()  # 256 KiB; one lookup decodes and scales 2 values (decode reads every key)


def unpack_index_keys(store: Store, out: torch.Tensor | None = None) -> torch.Tensor:
    """Packed e2m1 pairs + e8m0 scales -> bf16 keys ``[..., d]`` (exact: e2m1 times a power of two fits bf16).

    ``out``: an int32 ``[..., d/2]`` buffer the compiled kernel decodes into (the result is a view of it)."""
    packed = store["q"]  # uint8 [..., d/2], 16 bytes per 32-value block
    values = kernels.lookup_e2m1_pairs(packed, store["s"], _E2M1_SCALED, out)  # None: no compiled kernels
    if values is not None:
        return values.view(torch.bfloat16).view(*packed.shape[:-1], -1)
    index = (store["s"].to(torch.int32) << 8).unsqueeze(-1) + packed.unflatten(-1, (-1, INDEX_BLOCK // 2))
    # index_select with int32 indices: a plain table lookup, faster than gather (int64 indices) or advanced indexing
    values = _E2M1_SCALED.to(packed.device).index_select(0, index.view(-1))
    return values.view(torch.bfloat16).view(*packed.shape[:-1], -1)


def _take(store: Store, index: torch.Tensor) -> Store:
    """Gather slots ``index [B, ...]`` (clamped to the buffer) from every tensor of a ``[B, T, ...]`` store."""
    out = {}
    for key, t in store.items():
        bsz, slots = t.shape[:2]
        idx = index.clamp(0, max(slots - 1, 0)).reshape(bsz, -1)
        rows = (idx + (torch.arange(bsz, device=idx.device) * slots).unsqueeze(1)).view(-1)
        # whole-slot row copies (index_select), several times faster than an element-wise gather
        out[key] = t.reshape(bsz * slots, *t.shape[2:]).index_select(0, rows).view(*index.shape, *t.shape[2:])
    return out


# ---------------------------------------------------------------------------------------------------------------
# Right-aligned rolling buffers
# ---------------------------------------------------------------------------------------------------------------
class ChunkView:
    """Positions of one forward chunk against a right-aligned buffer of ``prev`` slots.

    The combined sequence ``cat(buffer, chunk)`` has ``prev + S`` slots; :meth:`slot` maps absolute positions to
    slots of it (``-1`` where the position is not there), whatever the padding of the chunk.

    ``dense`` (no padding in the chunk, so row ``b`` holds positions ``old_len[b] + s``) makes the map plain
    arithmetic, slot = position - (old_len - prev), with no lookup table (every decode step of every layer).
    """

    def __init__(self, positions: torch.Tensor, old_len: torch.Tensor, prev: int, dense: bool | None = None) -> None:
        bsz, seqlen = positions.shape
        self.prev, self.seqlen = prev, seqlen
        self.base = old_len - prev  # [B]: position of combined slot 0
        self.dense = bool((positions >= 0).all()) if dense is None else dense
        self.inv: torch.Tensor | None = None
        if self.dense:
            return
        inv = torch.full((bsz, prev + seqlen), -1, dtype=torch.long, device=positions.device)
        inv[:, :prev] = torch.arange(prev, device=positions.device)
        valid = positions >= 0
        rel = torch.where(valid, positions - self.base.unsqueeze(1), prev + seqlen)  # pads -> dropped column
        inv = torch.cat([inv, inv.new_full((bsz, 1), -1)], dim=1)
        cols = (prev + torch.arange(seqlen, device=positions.device)).expand(bsz, seqlen)
        inv.scatter_(1, rel, torch.where(valid, cols, -1))
        self.inv = inv[:, :-1]

    def slot(self, pos: torch.Tensor) -> torch.Tensor:
        """Combined-sequence slot of absolute positions ``pos [B, ...]`` (``-1`` if negative or absent)."""
        rel = pos - self.base.view(-1, *([1] * (pos.dim() - 1)))
        total = self.prev + self.seqlen
        ok = (pos >= 0) & (rel >= 0) & (rel < total)
        if self.inv is None:
            return rel.masked_fill_(~ok, -1)
        flat = rel.clamp(0, total - 1).reshape(pos.shape[0], -1)
        found = torch.gather(self.inv, 1, flat).view(pos.shape)
        return torch.where(ok, found, -1)

    def keep_last(self, combined: Store, new_len: torch.Tensor, keep: int) -> Store:
        """The right-aligned buffer of the last ``keep`` positions of each row, from the combined sequence."""
        total = self.prev + self.seqlen
        if self.dense and keep <= total:  # the last `keep` slots (a short row's oldest ones are invalid either way)
            return {k: v[:, total - keep :].clone() for k, v in combined.items()}
        pos = new_len.unsqueeze(1) - keep + torch.arange(keep, device=new_len.device)
        return _take(combined, self.slot(pos))


class DeepseekV4CacheLayer:
    """State of one attention layer (see the module docstring)."""

    is_compileable = False
    is_croppable = True
    is_sliding = False
    supports_early_init = False

    def __init__(self, window: int, ratio: int, rope_dim: int, max_crop: int) -> None:
        self.window_cap = window + max_crop
        self.ratio = ratio
        self.rope_dim = rope_dim
        self.tail_cap = ((2 if ratio == 4 else 1) * ratio + max_crop) if ratio else 0
        self.window: Store | None = None  # packed KV, [B, T, ...]
        self.tails: dict[str, Store] = {}  # "rows": {"x" [B, T, dim]}, or per compressor {"kv", "score"} fp32
        self.entries: dict[str, Store] = {}  # "kv" (packed KV) / "index" (packed FP4 keys), [B, N_cap, ...]
        self.scratch: dict[str, torch.Tensor] = {}  # working buffers, shared by a cache's layers (not state)

    # -- sizes -----------------------------------------------------------------------------------------------
    def window_len(self) -> int:
        return 0 if self.window is None else self.window["q"].shape[1]

    def tail(self, name: str) -> Store | None:
        return self.tails.get(name)

    def entry_capacity(self, name: str) -> int:
        e = self.entries.get(name)
        return 0 if e is None else e["q"].shape[1]

    def tensors(self) -> Iterator[torch.Tensor]:
        if self.window is not None:
            yield from self.window.values()
        for store in (*self.tails.values(), *self.entries.values()):
            yield from store.values()

    def scratch_buffer(
        self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """A working buffer of ``shape`` reused from step to step (a decode step would otherwise allocate and free
        megabytes per layer). Not cache state: not in ``nbytes``, not reordered; its contents are the caller's."""
        need = math.prod(shape)
        buf = self.scratch.get(name)
        if buf is None or buf.numel() < need or buf.dtype != dtype or buf.device != device:
            buf = self.scratch[name] = torch.empty(need, dtype=dtype, device=device)
        return buf[:need].view(shape)

    # -- updates (called by the attention layer) -------------------------------------------------------------
    def set_window(self, window: Store) -> None:
        self.window = window

    def set_tail(self, name: str, tail: Store) -> None:
        self.tails[name] = tail

    def write_entries(
        self,
        name: str,
        new: torch.Tensor,
        pack: Callable[[torch.Tensor], Store],
        first: torch.Tensor,
        count: torch.Tensor,
    ) -> None:
        """Store ``pack(new)[b, j]`` at entry ``first[b] + j`` for ``j < count[b]`` (``new``: ``[B, nb, ...]``).

        Most decode steps complete no entry (``nb == 0``): nothing is packed then."""
        nb = new.shape[1]
        if nb == 0:
            return
        values = pack(new)
        need = int((first + count).max())
        store = self.entries.get(name)
        if store is None or store["q"].shape[1] < need:
            cap = -(-need // ENTRY_CHUNK) * ENTRY_CHUNK
            grown = {}
            for key, v in values.items():
                t = v.new_zeros((v.shape[0], cap, *v.shape[2:]))
                if store is not None:
                    t[:, : store[key].shape[1]] = store[key]
                grown[key] = t
            store = self.entries[name] = grown
        j = torch.arange(nb, device=first.device)
        rows, cols = torch.nonzero(j.unsqueeze(0) < count.unsqueeze(1), as_tuple=True)
        for key, v in values.items():
            store[key][rows, first[rows] + cols] = v[rows, cols]

    def read_entries(self, name: str, index: torch.Tensor) -> Store:
        return _take(self.entries[name], index)

    # -- cache protocol --------------------------------------------------------------------------------------
    def _apply(self, fn) -> None:
        if self.window is not None:
            self.window = {k: fn(v) for k, v in self.window.items()}
        self.tails = {n: {k: fn(v) for k, v in s.items()} for n, s in self.tails.items()}
        self.entries = {n: {k: fn(v) for k, v in s.items()} for n, s in self.entries.items()}

    def reset(self) -> None:
        self.window, self.tails, self.entries = None, {}, {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices])

    def drop_last(self, n: int) -> None:
        """Forget the last ``n`` positions of every row: right-aligned buffers shift right (their oldest slots
        become invalid); entries need no change (the cache's lengths decide which are complete)."""

        def shift(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t.new_zeros((t.shape[0], n, *t.shape[2:])), t[:, : t.shape[1] - n]], dim=1)

        if self.window is not None:
            self.window = {k: shift(v) for k, v in self.window.items()}
        self.tails = {name: {k: shift(v) for k, v in s.items()} for name, s in self.tails.items()}

    def drop_last_rows(self, counts: torch.Tensor) -> None:
        """Forget the last ``counts[b]`` positions of row ``b`` (``[B]``): :meth:`drop_last` with a per-row count
        (speculative decoding rejects a different number of draft tokens in each row)."""

        def shift(t: torch.Tensor) -> torch.Tensor:
            src = torch.arange(t.shape[1], device=t.device) - counts.to(t.device).unsqueeze(1)  # [B, T]
            kept = _take({"t": t}, src)["t"]
            return kept.masked_fill((src < 0).view(*src.shape, *([1] * (t.dim() - 2))), 0)

        if self.window is not None:
            self.window = {k: shift(v) for k, v in self.window.items()}
        self.tails = {name: {k: shift(v) for k, v in s.items()} for name, s in self.tails.items()}


class DeepseekV4Cache(Cache):
    """Compressed KV cache for :class:`DeepseekV4ForCausalLM` (pass it as ``past_key_values``; ``generate`` creates
    one by itself).

    ``max_crop`` is how many of the most recent tokens :meth:`crop` can take back exactly (speculative decoding);
    the window and compressor buffers keep that much extra history.

    ``mtp_layers`` hold the state of the MTP blocks (one per block, its own compress ratio; SPEC §4) and
    ``mtp_lengths`` their per-row lengths: MTP position ``t`` reads the main model's streams at ``t`` and token
    ``t + 1``, so it trails the main model. They are filled by ``mtp_logits(..., past_key_values=cache)`` only;
    :meth:`crop` leaves them alone (speculative decoding feeds them accepted tokens only).
    """

    def __init__(self, config=None, max_crop: int = 64, **kwargs) -> None:
        if config is None:
            raise ValueError("DeepseekV4Cache needs the model config (DeepseekV4Cache(config=model.config))")
        layers = [
            DeepseekV4CacheLayer(config.sliding_window, r, config.qk_rope_head_dim, max_crop)
            for r in config.compress_ratios[: config.num_hidden_layers]
        ]
        super().__init__(layers=layers)
        self.max_crop = max_crop
        scratch: dict[str, torch.Tensor] = {}
        self.lengths: torch.Tensor | None = None  # [B] tokens seen per row (padding excluded)
        self.columns = 0  # input columns seen (padding included): what generate() calls the sequence length
        self._crop_budget = 0  # tokens crop() can still take back exactly
        first = config.num_hidden_layers
        self.mtp_layers = [
            DeepseekV4CacheLayer(config.sliding_window, r, config.qk_rope_head_dim, max_crop)
            for r in config.compress_ratios[first : first + config.num_nextn_predict_layers]
        ]
        self.mtp_lengths: list[torch.Tensor | None] = [None] * len(self.mtp_layers)  # [B] per MTP block
        for layer in (*self.layers, *self.mtp_layers):  # layers run one after the other: one set of buffers
            layer.scratch = scratch

    # -- what generate() and users ask -----------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.columns

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.columns + query_length, 0

    @property
    def batch_size(self) -> int:
        return -1 if self.lengths is None else int(self.lengths.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held by the cache tensors (all layers)."""
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.tensors())

    def memory_report(self) -> list[dict]:
        """Per layer: compression ratio and bytes of the window, compressor rows, entries and indexer keys."""
        out = []
        for i, layer in enumerate(self.layers):

            def size(store: Store | None) -> int:
                return 0 if store is None else sum(t.numel() * t.element_size() for t in store.values())

            out.append({
                "layer": i,
                "ratio": layer.ratio,
                "window_bytes": size(layer.window),
                "compressor_bytes": sum(size(s) for s in layer.tails.values()),
                "entry_bytes": size(layer.entries.get("kv")),
                "index_key_bytes": size(layer.entries.get("index")),
            })  # fmt: skip
        return out

    # -- bookkeeping for one forward -------------------------------------------------------------------------
    def commit(self, new_len: torch.Tensor, columns: int) -> None:
        self.lengths = new_len
        self.columns += columns
        self._crop_budget = min(self._crop_budget + columns, self.max_crop)

    # -- cache protocol --------------------------------------------------------------------------------------
    def crop(self, max_length: int) -> None:
        """Take back the last ``-max_length`` tokens (negative), or keep the first ``max_length`` columns (>= 0)."""
        remove = -max_length if max_length < 0 else self.columns - max_length
        if remove <= 0:
            return
        if remove > self._crop_budget:
            raise ValueError(
                f"crop: can take back {self._crop_budget} more tokens exactly (max_crop={self.max_crop}), "
                f"asked for {remove}"
            )
        if self.lengths is not None and bool((self.lengths < remove).any()):
            raise ValueError(f"crop: a row has fewer than {remove} tokens")
        for layer in self.layers:
            layer.drop_last(remove)
        self.lengths = self.lengths - remove
        self.columns -= remove
        self._crop_budget -= remove

    def crop_rows(self, counts: torch.Tensor) -> None:
        """Take back the last ``counts[b]`` tokens of row ``b`` (``[B]``, each ``<= max_crop``): speculative
        decoding's per-row rollback. The removed tokens become padding columns, so :attr:`columns` is unchanged."""
        counts = counts.to(torch.long)
        worst = int(counts.max()) if counts.numel() else 0
        if worst <= 0:
            return
        if int(counts.min()) < 0:
            raise ValueError(f"crop_rows: counts must be >= 0, got {counts.tolist()}")
        if worst > self._crop_budget:
            raise ValueError(
                f"crop_rows: can take back {self._crop_budget} more tokens exactly (max_crop={self.max_crop}), "
                f"asked for {worst}"
            )
        if self.lengths is None or bool((self.lengths < counts).any()):
            raise ValueError(f"crop_rows: a row has fewer tokens than asked for ({counts.tolist()})")
        for layer in self.layers:
            layer.drop_last_rows(counts)
        self.lengths = self.lengths - counts.to(self.lengths.device)
        self._crop_budget -= worst

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.lengths is not None:
            self.lengths = self.lengths.index_select(0, beam_idx.to(self.lengths.device))
        self._mtp_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.lengths is not None:
            self.lengths = self.lengths.repeat_interleave(repeats)
        self._mtp_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.lengths is not None:
            self.lengths = self.lengths[indices]
        self._mtp_rows(lambda t: t[indices])

    def reset(self) -> None:
        super().reset()
        self.lengths, self.columns, self._crop_budget = None, 0, 0
        for layer in self.mtp_layers:
            layer.reset()
        self.mtp_lengths = [None] * len(self.mtp_layers)

    def _mtp_rows(self, fn) -> None:
        """Apply a batch-dimension operation to the MTP state too."""
        for layer in self.mtp_layers:
            layer._apply(fn)
        self.mtp_lengths = [None if n is None else fn(n) for n in self.mtp_lengths]
