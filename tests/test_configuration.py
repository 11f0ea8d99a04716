"""DeepseekV4Config: released config.json as is, inference names, validation, save/reload."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import require_fixture
from transformers_deepseek import DeepseekV4Config, DeepseekV4ForCausalLM

FIXTURES = ("tiny-bf16", "tiny-fp8-fp4", "tiny-ratio16", "tiny-wide")


def _released(name: str) -> dict:
    return json.loads((require_fixture(name) / "checkpoint" / "config.json").read_text())


@pytest.mark.parametrize("name", FIXTURES)
def test_released_config_loads_and_saves_identically(name, tmp_path):
    raw = _released(name)
    config = DeepseekV4Config.from_pretrained(require_fixture(name) / "checkpoint")
    assert config.compress_ratios == raw["compress_ratios"]
    assert config.rope_scaling == raw["rope_scaling"]
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # Every released key survives with its released name and value (only the writer's version changes).
    for key, value in raw.items():
        if key != "transformers_version":
            assert saved[key] == value, key
    assert DeepseekV4Config.from_pretrained(tmp_path).to_dict() == config.to_dict()


@pytest.mark.parametrize("name", FIXTURES)
def test_inference_config_names_give_the_same_model_config(name):
    raw = _released(name)
    inference = json.loads((require_fixture(name) / "checkpoint" / "inference" / "config.json").read_text())
    from_inference = DeepseekV4Config(**inference)
    released = DeepseekV4Config(**{k: v for k, v in raw.items() if k != "model_type"})
    for key in raw:
        if key in ("architectures", "transformers_version", "torch_dtype", "model_type"):
            continue
        assert getattr(from_inference, key, None) == getattr(released, key), key


def test_ratio_16_and_yarn_only_on_compressed_layers():
    config = DeepseekV4Config(**{k: v for k, v in _released("tiny-ratio16").items() if k != "model_type"})
    model = DeepseekV4ForCausalLM(config)
    assert [layer.attn.ratio for layer in model.layers] == [0, 4, 16, 4]
    assert model.layers[2].attn.compressor.ape.shape == (16, config.head_dim)  # no overlap: coff 1
    assert model.layers[1].attn.compressor.ape.shape == (4, 2 * config.head_dim)  # overlap: coff 2
    assert model.layers[0].attn.yarn is None and model.layers[1].attn.yarn is not None
    assert model.layers[0].attn.rope_base == config.rope_theta
    assert model.layers[1].attn.rope_base == config.compress_rope_theta


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"compress_ratios": [0, 4, 128, 4]}, "compress_ratios"),
        ({"compress_ratios": [0, 4, -1, 4, 0]}, r"compress_ratios\[2\]"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"head_dim": 100}, "head_dim"),
        ({"qk_rope_head_dim": 63}, "qk_rope_head_dim"),
        ({"index_head_dim": 96}, "index_head_dim"),
        ({"o_groups": 3}, "o_groups"),
        ({"num_hash_layers": 9}, "num_hash_layers"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"rope_scaling": {"type": "linear", "factor": 2}}, "rope_scaling"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"expert_dtype": "int3"}, "expert_dtype"),
    ],
)
def test_invalid_values_raise_naming_the_field(override, field):
    raw = {k: v for k, v in _released("tiny-bf16").items() if k != "model_type"}
    raw.update(override)
    with pytest.raises(ValueError, match=field):
        DeepseekV4Config(**raw)


def test_fp8_checkpoint_requires_128_multiples():
    raw = {k: v for k, v in _released("tiny-fp8-fp4").items() if k != "model_type"}
    raw["q_lora_rank"] = 96
    with pytest.raises(ValueError, match="q_lora_rank"):
        DeepseekV4Config(**raw)


# Full-size shapes on the meta device (SPEC §2-§3): parameter counts of the released models.
@pytest.mark.parametrize(
    ("kwargs", "total_b", "active_b"),
    [
        ({}, 284, 13),  # V4-Flash defaults
        (
            dict(
                hidden_size=7168,
                moe_intermediate_size=3072,
                num_hidden_layers=61,
                num_attention_heads=128,
                n_routed_experts=384,
                routed_scaling_factor=2.5,
                q_lora_rank=1536,
                o_groups=16,
                index_topk=1024,
                compress_ratios=[128, 128] + [4, 128] * 29 + [4, 0],
            ),
            1600,
            49,
        ),
    ],
    ids=["flash", "pro"],
)
def test_full_size_parameter_counts_on_meta(kwargs, total_b, active_b):
    config = DeepseekV4Config(**kwargs)
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config)
    # Figures of the main model (the release excludes the MTP block); active = per-token compute, so the
    # embedding lookup does not count and only num_experts_per_tok routed experts per layer do.
    main = [(n, p) for n, p in model.named_parameters() if not n.startswith("mtp.")]
    total = sum(p.numel() for _, p in main)
    expert = sum(p.numel() for n, p in main if ".experts." in n)
    per_layer_expert = expert / (config.n_routed_experts * config.num_hidden_layers)
    active = (
        total
        - expert
        + per_layer_expert * config.num_experts_per_tok * config.num_hidden_layers
        - config.vocab_size * config.hidden_size
    )
    # The release names round figures (284B / 13B and 1.6T / 49B); within 3 % of them.
    assert abs(total / 1e9 - total_b) / total_b < 0.03, total / 1e9
    assert abs(active / 1e9 - active_b) / active_b < 0.03, active / 1e9
