"""DeepSeek-V4 configuration: every key of the released ``config.json``, the official inference names, validation."""

from __future__ import annotations

import copy
from typing import Any

from transformers import PretrainedConfig

SCORING_FUNCS = ("sqrtsoftplus", "softmax", "sigmoid")

# V4-Flash layer pattern (SPEC §2): 2 sliding-window layers, then CSA (4) / HCA (128) alternating, MTP entry last.
_FLASH_COMPRESS_RATIOS = [0, 0] + [4, 128] * 20 + [4, 0]

_FLASH_ROPE_SCALING = {
    "type": "yarn",
    "factor": 16,
    "original_max_position_embeddings": 65536,
    "beta_fast": 32,
    "beta_slow": 1,
}

# Official inference/config.json (ModelArgs) names -> released config.json names. Values are copied as they are.
INFERENCE_KEY_MAP = {
    "dim": "hidden_size",
    "moe_inter_dim": "moe_intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_hash_layers": "num_hash_layers",
    "n_mtp_layers": "num_nextn_predict_layers",
    "n_heads": "num_attention_heads",
    "n_activated_experts": "num_experts_per_tok",
    "score_func": "scoring_func",
    "route_scale": "routed_scaling_factor",
    "rope_head_dim": "qk_rope_head_dim",
    "window_size": "sliding_window",
    "norm_eps": "rms_norm_eps",
}
# In-memory quant_method of the released FP8 config (`quant_method: "fp8"`, `scale_fmt: "ue8m0"`): routes V4
# checkpoints to transformers_deepseek's quantizer without touching transformers' generic "fp8" one. to_dict writes
# "fp8" back (the quantization config's own to_dict does so too).
V4_QUANT_METHOD = "deepseek_v4_fp8"
# ModelArgs keys that only size the official runtime buffers or are folded into other fields.
_INFERENCE_RUNTIME_KEYS = ("max_batch_size", "scale_dtype")


class DeepseekV4Config(PretrainedConfig):
    r"""Configuration of a DeepSeek-V4 model (V4-Flash by default).

    Accepts the released Hugging Face ``config.json`` unchanged (every key keeps its released name, so a saved
    config is loadable by vLLM, SGLang, native transformers and the official code) and, equivalently, the official
    ``inference/config.json`` names (``dim``, ``n_layers``, ``window_size``, ``original_seq_len``, ...).

    ``compress_ratios`` has one entry per decoder layer plus one per MTP layer (the trailing entries): ``0`` is a
    pure sliding-window layer, ``4`` a compressed-sparse-attention layer (overlapping compressor + lightning
    indexer), any other positive ratio a heavily-compressed layer attending to every complete compressed entry.
    """

    model_type = "deepseek_v4"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Tensor parallelism, `from_pretrained(..., tp_plan="auto")`: every dense projection the model calls as a module
    # is split by output features and the shards are gathered, which is exact (each output is the same dot product).
    # No row splits: they would sum bf16 partial products where the official model rounds once after a full fp32
    # accumulation, and the rounding differences reach the top-k routing (1.9e-2 relative on the tiny logits). wo_a
    # (grouped einsum), the compressors and the fp32 head read their weights directly and stay replicated; the routed
    # experts are split by expert instead (`DeepseekV4PreTrainedModel.distribute_experts`).
    base_model_tp_plan = {
        f"{stack}.*.{proj}": "colwise_gather_output"
        for stack in ("layers", "mtp")
        for proj in (
            "attn.wq_a", "attn.wq_b", "attn.wkv", "attn.wo_b", "attn.indexer.wq_b",
            "ffn.shared_experts.w1", "ffn.shared_experts.w2", "ffn.shared_experts.w3",
        )
    } | {"mtp.*.e_proj": "colwise_gather_output", "mtp.*.h_proj": "colwise_gather_output"}  # fmt: skip
    # A plain attribute: transformers >= 5 turns `rope_scaling` into a property that rewrites it as
    # `rope_parameters`; the released key (and its YaRN-only-on-compressed-layers meaning) is kept verbatim.
    rope_scaling = None

    def __init__(
        self,
        vocab_size: int = 129280,
        hidden_size: int = 4096,
        moe_intermediate_size: int = 2048,
        num_hidden_layers: int = 43,
        num_hash_layers: int = 3,
        num_nextn_predict_layers: int = 1,
        num_attention_heads: int = 64,
        num_key_value_heads: int = 1,
        head_dim: int = 512,
        qk_rope_head_dim: int = 64,
        q_lora_rank: int = 1024,
        o_groups: int = 8,
        o_lora_rank: int = 1024,
        n_routed_experts: int = 256,
        n_shared_experts: int = 1,
        num_experts_per_tok: int = 6,
        scoring_func: str = "sqrtsoftplus",
        routed_scaling_factor: float = 1.5,
        norm_topk_prob: bool = True,
        topk_method: str = "noaux_tc",
        swiglu_limit: float = 10.0,
        sliding_window: int = 128,
        compress_ratios: list[int] | None = None,
        rope_theta: float = 10000.0,
        compress_rope_theta: float = 160000.0,
        rope_scaling: dict[str, Any] | None = _FLASH_ROPE_SCALING,
        max_position_embeddings: int = 1048576,
        index_n_heads: int = 64,
        index_head_dim: int = 128,
        index_topk: int = 512,
        hc_mult: int = 4,
        hc_sinkhorn_iters: int = 20,
        hc_eps: float = 1e-6,
        rms_norm_eps: float = 1e-6,
        expert_dtype: str | None = None,
        hidden_act: str = "silu",
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        initializer_range: float = 0.02,
        use_cache: bool = True,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 1,
        pad_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        batch_invariant: bool = True,
        **kwargs: Any,
    ) -> None:
        inference = _pop_inference_keys(kwargs)
        local = {k: v for k, v in locals().items() if k not in ("self", "kwargs", "inference", "__class__")}
        local.update(inference)
        self.vocab_size = local["vocab_size"]
        # Not a released key. True: shape-independent CPU kernels (numerics.pointwise / linear / topk_indices), so a
        # token's logits do not depend on the batch, the chunking or speculative verification around it. False: the
        # plain kernels, whose rounding depends on the call's shape as the official model's does; they reproduce the
        # golden fixtures' decode path bit for bit (prefill is bit-exact either way).
        self.batch_invariant = bool(local["batch_invariant"])
        self.hidden_size = local["hidden_size"]
        self.moe_intermediate_size = local["moe_intermediate_size"]
        self.num_hidden_layers = local["num_hidden_layers"]
        self.num_hash_layers = local["num_hash_layers"]
        self.num_nextn_predict_layers = local["num_nextn_predict_layers"]
        self.num_attention_heads = local["num_attention_heads"]
        self.num_key_value_heads = local["num_key_value_heads"]
        self.head_dim = local["head_dim"]
        self.qk_rope_head_dim = local["qk_rope_head_dim"]
        self.q_lora_rank = local["q_lora_rank"]
        self.o_groups = local["o_groups"]
        self.o_lora_rank = local["o_lora_rank"]
        self.n_routed_experts = local["n_routed_experts"]
        self.n_shared_experts = local["n_shared_experts"]
        self.num_experts_per_tok = local["num_experts_per_tok"]
        self.scoring_func = local["scoring_func"]
        self.routed_scaling_factor = local["routed_scaling_factor"]
        self.norm_topk_prob = local["norm_topk_prob"]
        self.topk_method = local["topk_method"]
        self.swiglu_limit = local["swiglu_limit"]
        self.sliding_window = local["sliding_window"]
        ratios = local["compress_ratios"]
        self.compress_ratios = list(_FLASH_COMPRESS_RATIOS if ratios is None else ratios)
        self.rope_theta = local["rope_theta"]
        self.compress_rope_theta = local["compress_rope_theta"]
        self.rope_scaling = copy.deepcopy(local["rope_scaling"])
        self.max_position_embeddings = local["max_position_embeddings"]
        self.index_n_heads = local["index_n_heads"]
        self.index_head_dim = local["index_head_dim"]
        self.index_topk = local["index_topk"]
        self.hc_mult = local["hc_mult"]
        self.hc_sinkhorn_iters = local["hc_sinkhorn_iters"]
        self.hc_eps = local["hc_eps"]
        self.rms_norm_eps = local["rms_norm_eps"]
        self.expert_dtype = local["expert_dtype"]
        self.hidden_act = hidden_act
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.initializer_range = initializer_range
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        qc = getattr(self, "quantization_config", None)
        if isinstance(qc, dict) and qc.get("quant_method") == "fp8" and qc.get("scale_fmt") == "ue8m0":
            self.quantization_config = {**qc, "quant_method": V4_QUANT_METHOD}
        self.validate()

    # ------------------------------------------------------------------ derived sizes (SPEC §2, §4)
    @property
    def nope_head_dim(self) -> int:
        return self.head_dim - self.qk_rope_head_dim

    @property
    def num_mtp_layers(self) -> int:
        return self.num_nextn_predict_layers

    @property
    def hc_mix_dim(self) -> int:
        """Width of the hyper-connection mixing projection: pre (hc) + post (hc) + comb (hc x hc)."""
        return (2 + self.hc_mult) * self.hc_mult

    @property
    def yarn(self) -> dict[str, float] | None:
        """YaRN parameters applied to compressed layers only (SPEC §4), or None when YaRN is off."""
        scaling = self.rope_scaling
        if not scaling or scaling.get("original_max_position_embeddings", 0) <= 0:
            return None
        return {
            "factor": float(scaling.get("factor", 1.0)),
            "original_max_position_embeddings": int(scaling["original_max_position_embeddings"]),
            "beta_fast": float(scaling.get("beta_fast", 32)),
            "beta_slow": float(scaling.get("beta_slow", 1)),
        }

    def layer_compress_ratio(self, layer_idx: int) -> int:
        """Compression ratio of decoder layer ``layer_idx``; MTP layers follow at ``num_hidden_layers + k``."""
        return self.compress_ratios[layer_idx]

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError`` naming the offending field when the configuration cannot describe a V4 model."""
        positive = (
            "vocab_size", "hidden_size", "moe_intermediate_size", "num_hidden_layers", "num_attention_heads",
            "head_dim", "qk_rope_head_dim", "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts",
            "num_experts_per_tok", "sliding_window", "index_n_heads", "index_head_dim", "index_topk", "hc_mult",
            "hc_sinkhorn_iters",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"DeepseekV4Config.{name} must be a positive integer, got {value!r}")
        for name in ("num_hash_layers", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"DeepseekV4Config.{name} must be a non-negative integer, got {value!r}")
        if self.num_hash_layers > self.num_hidden_layers:
            raise ValueError(
                f"DeepseekV4Config.num_hash_layers ({self.num_hash_layers}) exceeds num_hidden_layers "
                f"({self.num_hidden_layers})"
            )
        expected = self.num_hidden_layers + self.num_nextn_predict_layers
        if not isinstance(self.compress_ratios, (list, tuple)) or len(self.compress_ratios) != expected:
            found = len(self.compress_ratios) if isinstance(self.compress_ratios, (list, tuple)) else "not a list"
            raise ValueError(
                f"DeepseekV4Config.compress_ratios must have num_hidden_layers + num_nextn_predict_layers = "
                f"{expected} entries (the MTP entries last), got {found}: {self.compress_ratios!r}"
            )
        for i, ratio in enumerate(self.compress_ratios):
            if not isinstance(ratio, int) or isinstance(ratio, bool) or ratio < 0:
                raise ValueError(
                    f"DeepseekV4Config.compress_ratios[{i}] must be 0 (sliding window) or a positive integer, "
                    f"got {ratio!r}"
                )
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(
                f"DeepseekV4Config.scoring_func must be one of {SCORING_FUNCS}, got {self.scoring_func!r}"
            )
        if self.n_shared_experts != 1:
            raise ValueError(
                f"DeepseekV4Config.n_shared_experts must be 1 (as in the release), got {self.n_shared_experts}"
            )
        if self.num_key_value_heads != 1:
            raise ValueError(
                "DeepseekV4Config.num_key_value_heads must be 1 (MQA, one shared K=V head), "
                f"got {self.num_key_value_heads}"
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"DeepseekV4Config.num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts "
                f"({self.n_routed_experts})"
            )
        rope = self.qk_rope_head_dim
        if rope % 2:
            raise ValueError(f"DeepseekV4Config.qk_rope_head_dim must be even (interleaved pairs), got {rope}")
        if self.head_dim <= rope or (self.head_dim - rope) % 64:
            raise ValueError(
                f"DeepseekV4Config.head_dim ({self.head_dim}) minus qk_rope_head_dim ({rope}) must be a positive "
                "multiple of 64 (the KV FP8 simulation block, SPEC §5.4)"
            )
        d = self.index_head_dim
        if d <= rope or d & (d - 1) or d % 32:
            raise ValueError(
                f"DeepseekV4Config.index_head_dim must be a power of two, a multiple of 32 (FP4 block) and larger "
                f"than qk_rope_head_dim ({rope}), got {d}"
            )
        if self.num_attention_heads % self.o_groups:
            raise ValueError(
                f"DeepseekV4Config.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"o_groups ({self.o_groups})"
            )
        if self.rope_scaling is not None:
            if not isinstance(self.rope_scaling, dict):
                raise ValueError(f"DeepseekV4Config.rope_scaling must be a dict or None, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                raise ValueError(f"DeepseekV4Config.rope_scaling type must be 'yarn' (SPEC §4), got {kind!r}")
        if self.expert_dtype not in (None, "fp4", "fp8", "bf16"):
            raise ValueError(f"DeepseekV4Config.expert_dtype must be None, 'fp4' or 'fp8', got {self.expert_dtype!r}")
        if self.expert_dtype == "fp4":
            for name in ("hidden_size", "moe_intermediate_size"):
                if getattr(self, name) % 32:
                    raise ValueError(
                        f"DeepseekV4Config.{name} ({getattr(self, name)}) must be a multiple of 32 for FP4 experts"
                    )
        qc = getattr(self, "quantization_config", None)
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        if method in ("fp8", V4_QUANT_METHOD):
            # Every FP8 GEMM quantizes its input activations in 1x128 blocks (SPEC §5.1).
            for name in ("hidden_size", "q_lora_rank", "moe_intermediate_size"):
                if getattr(self, name) % 128:
                    raise ValueError(
                        f"DeepseekV4Config.{name} ({getattr(self, name)}) must be a multiple of 128 for FP8 weights "
                        "(activations are quantized in 1x128 blocks)"
                    )
            if (self.o_groups * self.o_lora_rank) % 128:
                raise ValueError("DeepseekV4Config.o_groups * o_lora_rank must be a multiple of 128 for FP8 weights")

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # transformers >= 5 standardises RoPE into `rope_parameters`; the released key is `rope_scaling` (kept as is).
        out.pop("rope_parameters", None)
        _write_released_quant_method(out)
        out["rope_scaling"] = copy.deepcopy(self.__dict__.get("rope_scaling"))
        # The release (and tools reading it) spell the dtype `torch_dtype`; transformers >= 5 writes `dtype`.
        if out.get("dtype") is not None:
            out["torch_dtype"] = out["dtype"]
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        # transformers re-inserts quantization_config as held in memory here (config.json is written from this).
        return _write_released_quant_method(super().to_diff_dict())


def _write_released_quant_method(out: dict[str, Any]) -> dict[str, Any]:
    """The on-disk name of a V4 FP8 quantization config is the released "fp8" (see V4_QUANT_METHOD)."""
    qc = out.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == V4_QUANT_METHOD:
        out["quantization_config"] = {**qc, "quant_method": "fp8"}
    return out


def _pop_inference_keys(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Translate official ``inference/config.json`` names found in ``kwargs`` (removed from it) to released names."""
    out: dict[str, Any] = {}
    for old, new in INFERENCE_KEY_MAP.items():
        if old in kwargs:
            out[new] = kwargs.pop(old)
    yarn_keys = ("original_seq_len", "rope_factor", "beta_fast", "beta_slow")
    if any(k in kwargs for k in yarn_keys):
        original = kwargs.pop("original_seq_len", 0)
        factor = kwargs.pop("rope_factor", 40)
        beta_fast = kwargs.pop("beta_fast", 32)
        beta_slow = kwargs.pop("beta_slow", 1)
        out["rope_scaling"] = (
            {
                "type": "yarn",
                "factor": factor,
                "original_max_position_embeddings": original,
                "beta_fast": beta_fast,
                "beta_slow": beta_slow,
            }
            if original > 0
            else None
        )
    if "max_seq_len" in kwargs:
        out["max_position_embeddings"] = kwargs.pop("max_seq_len")
    if "dtype" in kwargs and kwargs["dtype"] in ("fp8", "bf16"):
        if kwargs.pop("dtype") == "fp8":
            kwargs.setdefault(
                "quantization_config",
                {
                    "activation_scheme": "dynamic",
                    "fmt": "e4m3",
                    "quant_method": "fp8",
                    "scale_fmt": kwargs.pop("scale_fmt", "ue8m0"),
                    "weight_block_size": [128, 128],
                },
            )
        kwargs.pop("scale_fmt", None)
    for key in _INFERENCE_RUNTIME_KEYS:
        kwargs.pop(key, None)
    return out
