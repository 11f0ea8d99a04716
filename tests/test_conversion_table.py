"""The weight table (conversion/table.py): full-size plans on the meta device, census, property tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from transformers_deepseek import DeepseekV4Config, DeepseekV4ForCausalLM, DeepseekV4Model
from transformers_deepseek.conversion.table import TABLE, Kind, Layout, build_plan, mp_entries, mp_file_name, mp_owner
from transformers_deepseek.quantization.quantizer import expected_tensors, quantized_linears, released_dtype_overrides

FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
       "weight_block_size": [128, 128]}  # fmt: skip


def flash() -> DeepseekV4Config:
    return DeepseekV4Config(expert_dtype="fp4", quantization_config=dict(FP8))


def pro() -> DeepseekV4Config:
    return DeepseekV4Config(
        hidden_size=7168, moe_intermediate_size=3072, num_hidden_layers=61, num_attention_heads=128,
        n_routed_experts=384, routed_scaling_factor=2.5, q_lora_rank=1536, o_groups=16, index_topk=1024,
        compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0], expert_dtype="fp4", quantization_config=dict(FP8),
    )  # fmt: skip


# SPEC §3 census of the released checkpoints (Flash from a third-party census of Flash@60d8d707, Pro derived).
CENSUS = {
    "flash": (flash, 69187, {"BF16": 433, "F32": 417, "I64": 3, "F8_E8M0": 34167, "F8_E4M3": 375, "I8": 33792}),
    "pro": (pro, 145116, {"BF16": 619, "F32": 590, "I64": 3, "F8_E8M0": 71952, "F8_E4M3": 528, "I8": 71424}),
}


def _check_against_model(config: DeepseekV4Config, plan) -> None:
    """The plan covers every parameter / persistent buffer of the model exactly once, with its shape, and agrees
    with the quantizer on which linears are quantized and how they are stored."""
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    logical = {}
    for t in plan.tensors:
        logical[f"{t.base}.weight" if t.is_linear else t.base] = t.shape
    assert len(logical) == len(plan.tensors)  # each logical tensor once
    assert logical.keys() == state.keys(), sorted(set(logical) ^ set(state))[:10]
    bad = [(k, logical[k], state[k]) for k in state if logical[k] != state[k]]
    assert not bad, bad[:10]
    if plan.layout.dense == "fp8":
        kinds = quantized_linears(model, plan.layout.experts)
        assert set(kinds) == {t.base for t in plan.tensors if t.is_linear}
        for t in plan.tensors:
            if t.is_linear:
                quant = expected_tensors(kinds[t.base], model.get_submodule(t.base), (128, 128))
                assert {f"{t.base}.{p}": v for p, v in quant.items()} == t.stored(plan.layout), t.base
    bf16_fp32 = {t.base for t in plan.tensors if t.rule.kind is Kind.BF16_FP32}
    assert set(released_dtype_overrides(model)) == bf16_fp32


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_full_size_plan_covers_every_tensor_once_with_release_census(name):
    make, total, census = CENSUS[name]
    config = make()
    plan = build_plan(config)
    assert plan.layout == Layout("fp8", "fp4")
    assert len(plan.entries) == total
    assert len({e.name for e in plan.entries}) == total
    assert plan.census() == census
    if name == "flash":
        assert sum(e.name.startswith("mtp.") for e in plan.entries) == 1575  # SPEC §3
    _check_against_model(config, plan)


def test_flash_mp8_split_matches_the_official_mapping_and_covers_every_tensor():
    config = flash()
    plan = build_plan(config)
    ranks = mp_entries(plan, 8)
    per_name: dict[str, list] = {}
    for r, items in enumerate(ranks):
        for e, dtype, shape in items:
            per_name.setdefault(e.name, []).append((r, dtype, shape))
    assert set(per_name) == {e.name for e in plan.entries if not e.name.endswith("wo_a.scale")}
    for e in plan.entries:
        if e.name.endswith("wo_a.scale"):
            continue
        got = per_name[e.name]
        if ".ffn.experts." in e.name:
            assert len(got) == 1 and got[0][0] == mp_owner(e.tensor, config, 8)
            assert got[0][1] == ("F4" if e.part == "weight" else e.dtype)
        elif e.tensor.rule.mp_dim is not None:
            dim = e.tensor.rule.mp_dim
            assert len(got) == 8 and sum(s[dim] for _, _, s in got) == e.shape[dim]
        else:
            assert len(got) == 8 and all(s == e.shape for _, _, s in got)


def test_quantizer_reads_the_table_for_the_tensors_the_model_holds():
    """The bare DeepseekV4Model has no MTP blocks and no head: the quantizer's views of the table leave them out."""
    config = DeepseekV4Config(
        vocab_size=256, hidden_size=128, moe_intermediate_size=128, num_hidden_layers=2, num_nextn_predict_layers=1,
        num_hash_layers=1, num_attention_heads=2, head_dim=128, q_lora_rank=128, o_groups=2, o_lora_rank=128,
        n_routed_experts=2, num_experts_per_tok=1, index_n_heads=2, index_head_dim=128, compress_ratios=[4, 128, 0],
    )  # fmt: skip
    with torch.device("meta"):
        full, bare = DeepseekV4ForCausalLM(config), DeepseekV4Model(config)
    kinds = quantized_linears(full, "fp8")
    assert kinds["layers.0.attn.wo_a"] == "wo_a" and kinds["layers.0.attn.indexer.wq_b"] == "fp8"
    assert kinds["layers.1.ffn.experts.1.w2"] == "fp8" and kinds["mtp.0.e_proj"] == "fp8"
    assert quantized_linears(bare, "fp8") == {k: v for k, v in kinds.items() if not k.startswith("mtp.")}
    overrides = released_dtype_overrides(full)
    assert overrides["head.weight"] == torch.bfloat16 and "mtp.0.enorm.weight" in overrides
    kept = {k: v for k, v in overrides.items() if not k.startswith("mtp.") and k != "head.weight"}
    assert released_dtype_overrides(bare) == kept
    params = dict(bare.named_parameters())
    assert all(params[k].dtype == torch.float32 for k in kept)  # held fp32, stored bf16


@st.composite
def small_configs(draw):
    n_layers = draw(st.integers(1, 4))
    n_mtp = draw(st.integers(0, 2))
    ratios = draw(st.lists(st.sampled_from([0, 4, 8, 16, 128]), min_size=n_layers + n_mtp, max_size=n_layers + n_mtp))
    heads = draw(st.sampled_from([2, 4, 8]))
    groups = draw(st.sampled_from([g for g in (1, 2, 4) if heads % g == 0]))
    experts = draw(st.sampled_from([2, 4, 8]))
    expert_dtype = draw(st.sampled_from(["fp4", "fp8", None]))
    return DeepseekV4Config(
        vocab_size=draw(st.sampled_from([256, 512])), hidden_size=draw(st.sampled_from([128, 256])),
        moe_intermediate_size=128, num_hidden_layers=n_layers, num_hash_layers=draw(st.integers(0, n_layers)),
        num_nextn_predict_layers=n_mtp, num_attention_heads=heads, head_dim=128, q_lora_rank=128, o_groups=groups,
        o_lora_rank=128, n_routed_experts=experts, num_experts_per_tok=min(2, experts), index_n_heads=heads,
        index_head_dim=128, compress_ratios=ratios, expert_dtype=expert_dtype,
        quantization_config=dict(FP8) if expert_dtype else None,
    )  # fmt: skip


@settings(max_examples=30)  # each example builds a model on the meta device
@given(small_configs(), st.sampled_from([1, 2]))
def test_table_round_trips_and_covers_every_tensor_exactly_once(config, mp):
    plan = build_plan(config)
    # released name -> entry -> logical tensor -> stored names: back to the same name, each exactly once
    assert len(plan.by_name) == len(plan.entries)
    for e in plan.entries:
        assert plan.by_name[e.name] is e
        assert e.name in e.tensor.stored(plan.layout)
        assert plan.by_base[e.tensor.base] is e.tensor
    # native names: injective (merged experts share their 3-D tensor, split by index and chunk)
    native: dict[tuple, str] = {}
    for t in plan.tensors:
        if t.native_name is None:
            assert t.block is not None and t.block.startswith("mtp.")
            continue
        key = (t.native_name, t.expert, t.rule.native_part)
        assert key not in native, (key, native.get(key), t.base)
        native[key] = t.base
    assert len(native) == sum(1 for t in plan.tensors if not (t.block or "").startswith("mtp."))
    # every layout of the same config expands the same logical tensors
    for layout in (Layout("bf16", "bf16"), Layout("fp8", "fp8"), Layout("fp8", "fp4")):
        other = build_plan(config, layout)
        assert [t.base for t in other.tensors] == [t.base for t in plan.tensors]
    # MP split: concatenation along the table's dim (or the expert's owner) restores every tensor
    if config.n_routed_experts % mp == 0:
        try:
            ranks = mp_entries(plan, mp)
        except ValueError as exc:
            assert "does not divide" in str(exc)
        else:
            assert [mp_file_name(r, mp) for r in range(mp)] == [f"model{r}-mp{mp}.safetensors" for r in range(mp)]
            counts: dict[str, int] = {}
            for items in ranks:
                for e, dtype, shape in items:  # elements; F4 shapes count values, the released I8 packed pairs
                    counts[e.name] = counts.get(e.name, 0) + math.prod(shape) // (2 if dtype == "F4" else 1)
            for e in plan.entries:
                if e.tensor.rule.inference_bf16 and plan.layout.dense == "fp8" and e.part == "scale":
                    assert e.name not in counts  # convert.py drops wo_a.scale
                    continue
                replicas = 1 if (e.tensor.expert is not None or e.tensor.rule.mp_dim is not None) else mp
                assert counts[e.name] == math.prod(e.shape) * replicas, e.name
    _check_against_model(config, plan)


def test_table_rules_are_unique_per_scope():
    seen = set()
    for rule in TABLE:
        assert (rule.scope, rule.name) not in seen, rule.name
        seen.add((rule.scope, rule.name))
