"""THE weight table: every DeepSeek-V4 tensor, its on-disk name, dtype and shape, its model-parallel shard dim and
its name in transformers' native ``deepseek_v4`` (SPEC §3). Every conversion direction is derived from it, and so
is the loader: the HfQuantizer (quantization/quantizer.py) reads which linears are packed, their on-disk dtypes and
shapes and the on-disk dtypes of the fp32-held tensors from this table.

One :class:`Rule` per logical tensor (a linear counts once, whatever its storage: ``weight`` + ``scale`` in FP8/FP4,
``weight`` alone in bf16). :func:`build_plan` expands the table for a config and a storage :class:`Layout` into the
list of on-disk tensors, from the config alone (no weights). The reverse lookups (released name -> entry, native
name -> entry, MP shard -> entry) are dictionaries built from that same expansion, never written by hand.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from ..modeling.configuration_deepseek_v4 import DeepseekV4Config

# safetensors dtype names <-> torch dtypes (the on-disk vocabulary of SPEC §3, plus F4 of the official MP shards).
ST_DTYPES: dict[str, torch.dtype] = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E8M0": torch.float8_e8m0fnu,
    "F4": torch.float4_e2m1fn_x2,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in ST_DTYPES.items()}
# Bytes per element as safetensors counts them (F4: two elements per byte).
ST_BITS: dict[str, int] = {
    "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "I8": 8, "U8": 8, "BF16": 16, "F16": 16, "F32": 32, "F64": 64,
    "I32": 32, "I64": 64, "BOOL": 8,
}  # fmt: skip

FP8_BLOCK = 128  # SPEC §3: 128x128 weight blocks
FP4_BLOCK = 32  # SPEC §3: 1x32 expert blocks


class Kind(enum.Enum):
    """How a logical tensor is stored (SPEC §3)."""

    LINEAR = "linear"  # FP8 e4m3 + e8m0 128x128 scale in the release; bf16 in a bf16 layout
    EXPERT = "expert"  # routed expert linear: FP4 e2m1 packed in int8 + e8m0 1x32 scale (or FP8, or bf16)
    BF16 = "bf16"  # bf16 on disk and in the model
    BF16_FP32 = "bf16_fp32"  # bf16 on disk, held fp32 by the model (norms, compressor wkv/wgate, head)
    F32 = "f32"
    I64 = "i64"  # tid2eid (the official model holds int32)


class Scope(enum.Enum):
    MODEL = "model"  # once per model
    BLOCK = "block"  # every decoder layer (layers.L) and every MTP block (mtp.K)
    MTP = "mtp"  # MTP blocks only


# Per-layer predicates (ratio = compress_ratios[layer], hash = hash-routed layer).
def _always(ratio: int, hash_: bool) -> bool:
    return True


def _compressed(ratio: int, hash_: bool) -> bool:
    return ratio > 0


def _csa(ratio: int, hash_: bool) -> bool:
    return ratio == 4


def _hash(ratio: int, hash_: bool) -> bool:
    return hash_


def _scored(ratio: int, hash_: bool) -> bool:
    return not hash_


Shape = Callable[[DeepseekV4Config, int], tuple[int, ...]]  # (config, ratio) -> logical shape


def _coff(ratio: int) -> int:
    return 2 if ratio == 4 else 1  # SPEC §4: overlapping compressor doubles its width


@dataclass(frozen=True)
class Rule:
    """One logical tensor. ``name`` is the released name relative to its scope (``{E}`` = expert index).

    ``mp_dim``: dim split across model-parallel ranks by the official convert.py (its ``mapping``), None =
    replicated; routed experts are split by index instead. ``native``: name in transformers 5.23 ``deepseek_v4``
    (``{P}`` = ``model.layers.L``), None = native has no such tensor; ``native_part`` = (chunk, n_chunks) of the
    merged 3-D expert tensor's dim 1 (``gate_up_proj`` = [w1; w3]). ``inference_bf16``: FP8 in the release but used in
    bf16 without activation quantization, so stored dequantized in the official MP shards and dequantized at load by
    the quantizer (``wo_a``, SPEC §3, §5.3).
    """

    name: str
    kind: Kind
    shape: Shape
    scope: Scope = Scope.BLOCK
    when: Callable[[int, bool], bool] = _always
    mp_dim: int | None = None
    native: str | None = None
    native_part: tuple[int, int] | None = None
    inference_bf16: bool = False


def _d(c: DeepseekV4Config, r: int) -> tuple[int, ...]:
    return (c.hidden_size,)


def _hc_fn(c: DeepseekV4Config, r: int) -> tuple[int, ...]:
    return (c.hc_mix_dim, c.hc_mult * c.hidden_size)


def _expert_in(c: DeepseekV4Config, r: int) -> tuple[int, ...]:
    return (c.moe_intermediate_size, c.hidden_size)


def _expert_out(c: DeepseekV4Config, r: int) -> tuple[int, ...]:
    return (c.hidden_size, c.moe_intermediate_size)


L, M, B = Scope.MODEL, Scope.MTP, Scope.BLOCK
# fmt: off
TABLE: tuple[Rule, ...] = (
    Rule("embed.weight", Kind.BF16, lambda c, r: (c.vocab_size, c.hidden_size), L, mp_dim=0,
         native="model.embed_tokens.weight"),
    Rule("attn_norm.weight", Kind.BF16_FP32, _d, native="{P}.input_layernorm.weight"),
    Rule("ffn_norm.weight", Kind.BF16_FP32, _d, native="{P}.post_attention_layernorm.weight"),
    Rule("hc_attn_fn", Kind.F32, _hc_fn, native="{P}.attn_hc.fn"),
    Rule("hc_attn_base", Kind.F32, lambda c, r: (c.hc_mix_dim,), native="{P}.attn_hc.base"),
    Rule("hc_attn_scale", Kind.F32, lambda c, r: (3,), native="{P}.attn_hc.scale"),
    Rule("hc_ffn_fn", Kind.F32, _hc_fn, native="{P}.ffn_hc.fn"),
    Rule("hc_ffn_base", Kind.F32, lambda c, r: (c.hc_mix_dim,), native="{P}.ffn_hc.base"),
    Rule("hc_ffn_scale", Kind.F32, lambda c, r: (3,), native="{P}.ffn_hc.scale"),
    Rule("attn.attn_sink", Kind.F32, lambda c, r: (c.num_attention_heads,), mp_dim=0, native="{P}.self_attn.sinks"),
    Rule("attn.wq_a", Kind.LINEAR, lambda c, r: (c.q_lora_rank, c.hidden_size), native="{P}.self_attn.q_a_proj"),
    Rule("attn.q_norm.weight", Kind.BF16_FP32, lambda c, r: (c.q_lora_rank,), native="{P}.self_attn.q_a_norm.weight"),
    Rule("attn.wq_b", Kind.LINEAR, lambda c, r: (c.num_attention_heads * c.head_dim, c.q_lora_rank), mp_dim=0,
         native="{P}.self_attn.q_b_proj"),
    Rule("attn.wkv", Kind.LINEAR, lambda c, r: (c.head_dim, c.hidden_size), native="{P}.self_attn.kv_proj"),
    Rule("attn.kv_norm.weight", Kind.BF16_FP32, lambda c, r: (c.head_dim,), native="{P}.self_attn.kv_norm.weight"),
    Rule("attn.wo_a", Kind.LINEAR,
         lambda c, r: (c.o_groups * c.o_lora_rank, c.num_attention_heads * c.head_dim // c.o_groups), mp_dim=0,
         native="{P}.self_attn.o_a_proj", inference_bf16=True),
    Rule("attn.wo_b", Kind.LINEAR, lambda c, r: (c.hidden_size, c.o_groups * c.o_lora_rank), mp_dim=1,
         native="{P}.self_attn.o_b_proj"),
    Rule("attn.compressor.ape", Kind.F32, lambda c, r: (r, _coff(r) * c.head_dim), when=_compressed,
         native="{P}.self_attn.compressor.position_bias"),
    Rule("attn.compressor.wkv.weight", Kind.BF16_FP32, lambda c, r: (_coff(r) * c.head_dim, c.hidden_size),
         when=_compressed, native="{P}.self_attn.compressor.kv_proj.weight"),
    Rule("attn.compressor.wgate.weight", Kind.BF16_FP32, lambda c, r: (_coff(r) * c.head_dim, c.hidden_size),
         when=_compressed, native="{P}.self_attn.compressor.gate_proj.weight"),
    Rule("attn.compressor.norm.weight", Kind.BF16_FP32, lambda c, r: (c.head_dim,), when=_compressed,
         native="{P}.self_attn.compressor.kv_norm.weight"),
    Rule("attn.indexer.wq_b", Kind.LINEAR, lambda c, r: (c.index_n_heads * c.index_head_dim, c.q_lora_rank),
         when=_csa, mp_dim=0, native="{P}.self_attn.compressor.indexer.q_b_proj"),
    Rule("attn.indexer.weights_proj.weight", Kind.BF16, lambda c, r: (c.index_n_heads, c.hidden_size), when=_csa,
         mp_dim=0, native="{P}.self_attn.compressor.indexer.scorer.weights_proj.weight"),
    Rule("attn.indexer.compressor.ape", Kind.F32, lambda c, r: (r, _coff(r) * c.index_head_dim), when=_csa,
         native="{P}.self_attn.compressor.indexer.position_bias"),
    Rule("attn.indexer.compressor.wkv.weight", Kind.BF16_FP32,
         lambda c, r: (_coff(r) * c.index_head_dim, c.hidden_size), when=_csa,
         native="{P}.self_attn.compressor.indexer.kv_proj.weight"),
    Rule("attn.indexer.compressor.wgate.weight", Kind.BF16_FP32,
         lambda c, r: (_coff(r) * c.index_head_dim, c.hidden_size), when=_csa,
         native="{P}.self_attn.compressor.indexer.gate_proj.weight"),
    Rule("attn.indexer.compressor.norm.weight", Kind.BF16_FP32, lambda c, r: (c.index_head_dim,), when=_csa,
         native="{P}.self_attn.compressor.indexer.kv_norm.weight"),
    Rule("ffn.gate.weight", Kind.BF16, lambda c, r: (c.n_routed_experts, c.hidden_size), native="{P}.mlp.gate.weight"),
    Rule("ffn.gate.bias", Kind.F32, lambda c, r: (c.n_routed_experts,), when=_scored,
         native="{P}.mlp.gate.e_score_correction_bias"),
    Rule("ffn.gate.tid2eid", Kind.I64, lambda c, r: (c.vocab_size, c.num_experts_per_tok), when=_hash,
         native="{P}.mlp.gate.tid2eid"),
    Rule("ffn.experts.{E}.w1", Kind.EXPERT, _expert_in, native="{P}.mlp.experts.gate_up_proj", native_part=(0, 2)),
    Rule("ffn.experts.{E}.w2", Kind.EXPERT, _expert_out, native="{P}.mlp.experts.down_proj"),
    Rule("ffn.experts.{E}.w3", Kind.EXPERT, _expert_in, native="{P}.mlp.experts.gate_up_proj", native_part=(1, 2)),
    Rule("ffn.shared_experts.w1", Kind.LINEAR, _expert_in, native="{P}.mlp.shared_experts.gate_proj"),
    Rule("ffn.shared_experts.w2", Kind.LINEAR, _expert_out, native="{P}.mlp.shared_experts.down_proj"),
    Rule("ffn.shared_experts.w3", Kind.LINEAR, _expert_in, native="{P}.mlp.shared_experts.up_proj"),
    Rule("e_proj", Kind.LINEAR, lambda c, r: (c.hidden_size, c.hidden_size), M),
    Rule("h_proj", Kind.LINEAR, lambda c, r: (c.hidden_size, c.hidden_size), M),
    Rule("enorm.weight", Kind.BF16_FP32, _d, M),
    Rule("hnorm.weight", Kind.BF16_FP32, _d, M),
    Rule("norm.weight", Kind.BF16_FP32, _d, M),
    Rule("hc_head_fn", Kind.F32, lambda c, r: (c.hc_mult, c.hc_mult * c.hidden_size), M),
    Rule("hc_head_base", Kind.F32, lambda c, r: (c.hc_mult,), M),
    Rule("hc_head_scale", Kind.F32, lambda c, r: (1,), M),
    Rule("norm.weight", Kind.BF16_FP32, _d, L, native="model.norm.weight"),
    Rule("hc_head_fn", Kind.F32, lambda c, r: (c.hc_mult, c.hc_mult * c.hidden_size), L, native="model.hc_head.hc_fn"),
    Rule("hc_head_base", Kind.F32, lambda c, r: (c.hc_mult,), L, native="model.hc_head.hc_base"),
    Rule("hc_head_scale", Kind.F32, lambda c, r: (1,), L, native="model.hc_head.hc_scale"),
    Rule("head.weight", Kind.BF16_FP32, lambda c, r: (c.vocab_size, c.hidden_size), L, mp_dim=0,
         native="lm_head.weight"),
)
# fmt: on
del L, M, B


# ---------------------------------------------------------------------------------------------------------------------
# Layouts and the expanded plan
# ---------------------------------------------------------------------------------------------------------------------
DENSE_FORMATS = ("fp8", "bf16")
EXPERT_FORMATS = ("fp4", "fp8", "bf16")


@dataclass(frozen=True)
class Layout:
    """Storage of the quantizable linears: ``dense`` (LINEAR rules) and ``experts`` (EXPERT rules)."""

    dense: str = "fp8"
    experts: str = "fp4"

    def __post_init__(self) -> None:
        if self.dense not in DENSE_FORMATS:
            raise ValueError(f"Layout.dense must be one of {DENSE_FORMATS}, got {self.dense!r}")
        if self.experts not in EXPERT_FORMATS:
            raise ValueError(f"Layout.experts must be one of {EXPERT_FORMATS}, got {self.experts!r}")

    def format_of(self, kind: Kind) -> str | None:
        """Storage format of a linear of ``kind`` ("fp8" / "fp4" / "bf16"), None for non-linear tensors."""
        if kind is Kind.LINEAR:
            return self.dense
        if kind is Kind.EXPERT:
            return self.experts
        return None

    @classmethod
    def of_config(cls, config: DeepseekV4Config) -> Layout:
        """The layout a released ``config.json`` describes (``quantization_config`` + ``expert_dtype``, SPEC §2)."""
        qc = getattr(config, "quantization_config", None)
        if qc is not None and not isinstance(qc, dict):
            qc = qc.to_dict()
        if not qc:
            return cls("bf16", "bf16")
        expert = qc.get("expert_dtype") or getattr(config, "expert_dtype", None) or "fp4"
        return cls("fp8", expert)


_PLAIN_DTYPES = {Kind.BF16: "BF16", Kind.BF16_FP32: "BF16", Kind.F32: "F32", Kind.I64: "I64"}


def stored_tensors(kind: Kind, fmt: str | None, shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """On-disk ``{suffix: (st_dtype, shape)}`` of one logical tensor (suffix "" for a leaf parameter, else
    "weight" / "scale" of a linear) in format ``fmt`` (SPEC §3)."""
    if kind in _PLAIN_DTYPES:
        return {"": (_PLAIN_DTYPES[kind], shape)}
    out_f, in_f = shape
    if fmt == "bf16":
        return {"weight": ("BF16", shape)}
    if fmt == "fp4":
        return {"weight": ("I8", (out_f, in_f // 2)), "scale": ("F8_E8M0", (out_f, math.ceil(in_f / FP4_BLOCK)))}
    if fmt == "fp8":
        scale = (math.ceil(out_f / FP8_BLOCK), math.ceil(in_f / FP8_BLOCK))
        return {"weight": ("F8_E4M3", shape), "scale": ("F8_E8M0", scale)}
    raise ValueError(f"unknown storage format {fmt!r} for a {kind.value} tensor")


@dataclass(frozen=True)
class Tensor:
    """One logical tensor of a concrete model: its rule, released base name and logical shape."""

    rule: Rule
    base: str  # released name: "layers.3.attn.wq_a" (a linear) or "layers.3.attn.attn_sink" (a leaf)
    shape: tuple[int, ...]
    block: str | None  # "layers.3" / "mtp.0" / None
    layer: int | None  # decoder-layer index (MTP: num_hidden_layers + k)
    expert: int | None

    @property
    def is_linear(self) -> bool:
        return self.rule.kind in (Kind.LINEAR, Kind.EXPERT)

    def stored(self, layout: Layout) -> dict[str, tuple[str, tuple[int, ...]]]:
        """``{released tensor name: (st_dtype, shape)}`` in ``layout``."""
        parts = stored_tensors(self.rule.kind, layout.format_of(self.rule.kind), self.shape)
        return {f"{self.base}.{s}" if s else self.base: v for s, v in parts.items()}

    @property
    def native_name(self) -> str | None:
        if self.rule.native is None or (self.block or "").startswith("mtp."):
            return None  # native deepseek_v4 has no MTP module (SPEC §9.13)
        name = self.rule.native.replace("{P}", f"model.{self.block}") if self.block else self.rule.native
        return name if not self.is_linear or self.rule.kind is Kind.EXPERT else f"{name}.weight"


def _blocks(config: DeepseekV4Config) -> Iterator[tuple[str, int, bool]]:
    for i in range(config.num_hidden_layers):
        yield f"layers.{i}", i, False
    for k in range(config.num_nextn_predict_layers):
        yield f"mtp.{k}", config.num_hidden_layers + k, True


def iter_tensors(config: DeepseekV4Config) -> Iterator[Tensor]:
    """Every logical tensor of ``config``, in a fixed order (embed, layers, MTP, final norm / head)."""
    for rule in TABLE:
        if rule.scope is Scope.MODEL and rule.name == "embed.weight":
            yield Tensor(rule, rule.name, rule.shape(config, 0), None, None, None)
    for block, layer, is_mtp in _blocks(config):
        ratio = config.compress_ratios[layer]
        hash_ = layer < config.num_hash_layers
        for rule in TABLE:
            if rule.scope is Scope.MODEL or (rule.scope is Scope.MTP and not is_mtp) or not rule.when(ratio, hash_):
                continue
            shape = rule.shape(config, ratio)
            if "{E}" in rule.name:
                for e in range(config.n_routed_experts):
                    yield Tensor(rule, f"{block}.{rule.name.replace('{E}', str(e))}", shape, block, layer, e)
            else:
                yield Tensor(rule, f"{block}.{rule.name}", shape, block, layer, None)
    for rule in TABLE:
        if rule.scope is Scope.MODEL and rule.name != "embed.weight":
            yield Tensor(rule, rule.name, rule.shape(config, 0), None, None, None)


@dataclass(frozen=True)
class Entry:
    """One on-disk tensor of a plan."""

    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    tensor: Tensor
    part: str  # "" (leaf), "weight" or "scale"

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ST_BITS[self.dtype] // 8


@dataclass
class Plan:
    """The released-layout tensors of a config: entries in order, and lookups derived from them."""

    config: DeepseekV4Config
    layout: Layout
    entries: list[Entry] = field(default_factory=list)
    tensors: list[Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.by_name: dict[str, Entry] = {}
        self.by_base: dict[str, Tensor] = {}
        for t in self.tensors:
            if t.base in self.by_base:
                raise AssertionError(f"table expands {t.base!r} twice")
            self.by_base[t.base] = t
            for name, (dtype, shape) in t.stored(self.layout).items():
                part = name[len(t.base) + 1 :] if name != t.base else ""
                entry = Entry(name, dtype, shape, t, part)
                self.by_name[name] = entry
                self.entries.append(entry)

    def census(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            out[e.dtype] = out.get(e.dtype, 0) + 1
        return out

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def build_plan(config: DeepseekV4Config, layout: Layout | None = None) -> Plan:
    """The released-layout plan of ``config`` (from the config alone; ``layout`` defaults to the config's own)."""
    layout = layout or Layout.of_config(config)
    return Plan(config, layout, tensors=list(iter_tensors(config)))


# ---------------------------------------------------------------------------------------------------------------------
# Official inference MP shards (convert.py), derived from the same table
# ---------------------------------------------------------------------------------------------------------------------
def mp_file_name(rank: int, mp: int) -> str:
    return f"model{rank}-mp{mp}.safetensors"


def mp_owner(t: Tensor, config: DeepseekV4Config, mp: int) -> int | None:
    """Rank holding routed expert ``t`` (experts split by index, SPEC §3); None for every other tensor."""
    if t.expert is None:
        return None
    per_rank = config.n_routed_experts // mp
    return t.expert // per_rank


def mp_entries(plan: Plan, mp: int, expert_format: str = "fp4") -> list[list[tuple[Entry, str, tuple[int, ...]]]]:
    """Per rank, the tensors of ``model{rank}-mp{mp}.safetensors``: ``(released entry, st_dtype, shape)``.

    As convert.py: tensors with an ``mp_dim`` are narrowed to 1/mp along it (weight and scale alike); routed experts
    go whole to the rank owning their index; ``wo_a`` is dequantized to bf16 and its scale dropped; FP4 experts are
    viewed as ``float4_e2m1fn_x2`` ("F4", shape counted in values) or, with ``expert_format="fp8"``, re-encoded to
    FP8 128x128 blocks. Raises ValueError naming the tensor when a dim does not divide by ``mp``.
    """
    config = plan.config
    if mp < 1 or config.n_routed_experts % mp:
        raise ValueError(f"--model-parallel {mp} must be >= 1 and divide n_routed_experts ({config.n_routed_experts})")
    ranks: list[list[tuple[Entry, str, tuple[int, ...]]]] = [[] for _ in range(mp)]
    for e in plan.entries:
        t, rule = e.tensor, e.tensor.rule
        fmt = plan.layout.format_of(rule.kind)
        dtype, shape = e.dtype, e.shape
        if rule.inference_bf16 and fmt == "fp8":
            if e.part == "scale":
                continue
            dtype = "BF16"
        elif rule.kind is Kind.EXPERT and fmt == "fp4":
            if expert_format == "fp8":
                dtype, shape = stored_tensors(Kind.EXPERT, "fp8", t.shape)[e.part]
            elif e.part == "weight":
                dtype, shape = "F4", t.shape
        owner = mp_owner(t, config, mp)
        if owner is not None:
            ranks[owner].append((e, dtype, shape))
            continue
        dim = rule.mp_dim
        if dim is not None and mp > 1:
            if shape[dim] % mp:
                raise ValueError(
                    f"tensor {e.name!r}: dim {dim} of shape {list(shape)} does not divide by --model-parallel {mp}"
                )
            shape = tuple(s // mp if i == dim else s for i, s in enumerate(shape))
        for r in range(mp):
            ranks[r].append((e, dtype, shape))
    return ranks


def to_jsonable(layout: Layout) -> dict[str, Any]:
    return {"dense": layout.dense, "experts": layout.experts}
