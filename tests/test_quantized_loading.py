"""Released FP8 + FP4-expert checkpoints: registration, packed loading, exact values, parity, options, exact save.

Figures (``pytest -s``) are printed for the parity tests. References for the weight values are written here
independently of ``quantization.formats`` (torch's own e4m3 / e8m0 casts and an e2m1 lookup table).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from helpers import read_tensors, require_fixture, same_bytes
from transformers_deepseek import DeepseekV4Config, DeepseekV4ForCausalLM, DeepseekV4PreTrainedModel
from transformers_deepseek.modeling.modeling_deepseek_v4 import DeepseekV4GroupedLinear
from transformers_deepseek.parity import checkpoint_dir, end_to_end, load_golden, rel_l2, teacher_forced
from transformers_deepseek.quantization import (
    QUANT_METHOD,
    DeepseekV4FP8Config,
    DeepseekV4FP8HfQuantizer,
    FP4Linear,
    FP8DequantizedLinear,
    FP8Linear,
    fp8_activation,
    is_released_v4_fp8,
    quantize_fp4_e2m1,
    quantize_fp8_blocks,
    register_quantization,
)

TOLERANCE = 1.5  # x the fixture's per-layer noise floor (issue 4)
E2E_TOLERANCE = 1.2  # x the fixture's end-to-end noise floor
E2M1_LUT = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


# ---------------------------------------------------------------------------------------------------------------------
# Pending modeling/ changes (requested from the lead, see the quantization report). Applied here only when the
# installed modeling/ does not already behave so; each is a no-op once the change lands.
# ---------------------------------------------------------------------------------------------------------------------
def _config_routes_released_fp8() -> bool:
    qc = {"quant_method": "fp8", "scale_fmt": "ue8m0", "fmt": "e4m3", "activation_scheme": "dynamic"}
    cfg = DeepseekV4Config(quantization_config={**qc, "weight_block_size": [128, 128]})
    got = cfg.quantization_config
    return (got.get("quant_method") if isinstance(got, dict) else got.quant_method) == QUANT_METHOD


@pytest.fixture(scope="module", autouse=True)
def pending_modeling_changes() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    if not _config_routes_released_fp8():
        original = DeepseekV4Config.__init__

        def init(self, *args, **kwargs):  # DeepseekV4Config.__init__ + the released "fp8" -> our method rename
            original(self, *args, **kwargs)
            qc = getattr(self, "quantization_config", None)
            if isinstance(qc, dict) and is_released_v4_fp8(qc):
                self.quantization_config = {**qc, "quant_method": QUANT_METHOD}

        mp.setattr(DeepseekV4Config, "__init__", init)
    if "dtype" not in DeepseekV4PreTrainedModel.__dict__:  # model dtype = embedding dtype (torch_dtype on save)
        mp.setattr(DeepseekV4PreTrainedModel, "dtype", property(lambda self: self.get_input_embeddings().weight.dtype))
    yield
    mp.undo()


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------
def _ref_fp8(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Official dequantization, independent of formats.py: e4m3 -> fp32 times the e8m0 block scale (torch casts)."""
    s = scale.float().repeat_interleave(128, 0)[: weight.shape[0]].repeat_interleave(128, 1)[:, : weight.shape[1]]
    return weight.float() * s


def _ref_fp4(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    b = packed.view(torch.uint8).long()
    codes = torch.stack([b & 15, b >> 4], dim=-1).flatten(-2)  # element 2j in the low nibble
    return E2M1_LUT[codes] * scale.float().repeat_interleave(32, 1)


def _load(path: Path, **kwargs) -> DeepseekV4ForCausalLM:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _rewrite_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A single-file copy of a checkpoint with ``tensors`` as its content and optionally another config.json."""
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = config if config is not None else json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def fp8_fixture() -> Iterator[tuple[Path, object]]:
    golden = load_golden(require_fixture("tiny-fp8-fp4"))
    with checkpoint_dir(golden.root) as ckpt:
        yield ckpt, golden


@pytest.fixture(scope="module")
def model(fp8_fixture) -> DeepseekV4ForCausalLM:
    return _load(fp8_fixture[0])


@pytest.fixture(scope="module")
def raw(fp8_fixture) -> dict[str, torch.Tensor]:
    return read_tensors(fp8_fixture[0])


# ---------------------------------------------------------------------------------------------------------------------
# Registration and config routing
# ---------------------------------------------------------------------------------------------------------------------
def test_registration_is_idempotent_and_leaves_native_fp8_alone():
    from transformers.quantizers import auto
    from transformers.utils.quantization_config import FineGrainedFP8Config

    register_quantization(DeepseekV4Config)
    register_quantization(DeepseekV4Config)
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] is DeepseekV4FP8Config
    assert auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] is DeepseekV4FP8HfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["fp8"] is FineGrainedFP8Config
    assert auto.LOADING_ATTRIBUTES_CONFIG_TYPES.count(DeepseekV4FP8Config) == 1
    # A generic FP8 config of another model still goes to transformers' own quantizer.
    generic = auto.AutoQuantizationConfig.from_dict({"quant_method": "fp8", "weight_block_size": [128, 128]})
    assert type(generic) is FineGrainedFP8Config


def test_released_config_routes_to_our_quantizer_and_saves_back_as_fp8(fp8_fixture):
    from transformers.quantizers.auto import AutoHfQuantizer, AutoQuantizationConfig

    released = json.loads((fp8_fixture[0] / "config.json").read_text())
    cfg = DeepseekV4Config.from_dict(released)
    qc = AutoQuantizationConfig.from_dict(cfg.quantization_config)
    assert type(qc) is DeepseekV4FP8Config
    assert isinstance(AutoHfQuantizer.from_config(qc, pre_quantized=True), DeepseekV4FP8HfQuantizer)
    assert qc.to_dict() == released["quantization_config"]
    cfg.quantization_config = qc
    assert cfg.to_dict()["quantization_config"] == released["quantization_config"]
    assert json.loads(cfg.to_json_string())["quantization_config"] == released["quantization_config"]


def test_config_rejects_bad_fields():
    with pytest.raises(ValueError, match="scale_fmt"):
        DeepseekV4FP8Config(scale_fmt="e8m0")
    with pytest.raises(ValueError, match="weight_block_size"):
        DeepseekV4FP8Config(weight_block_size=[64, 64])
    with pytest.raises(ValueError, match="expert_dtype"):
        DeepseekV4FP8Config(expert_dtype="fp16")
    with pytest.raises(ValueError, match="quant_method"):
        DeepseekV4FP8Config(quant_method="gptq")


# ---------------------------------------------------------------------------------------------------------------------
# Loading: module layout, exact values
# ---------------------------------------------------------------------------------------------------------------------
def test_layout_after_loading(model):
    assert isinstance(model.hf_quantizer, DeepseekV4FP8HfQuantizer)
    assert type(model.config.quantization_config) is DeepseekV4FP8Config
    kinds = {FP8Linear: 0, FP4Linear: 0, FP8DequantizedLinear: 0}
    for m in model.modules():
        if type(m) in kinds:
            kinds[type(m)] += 1
    n_blocks = model.config.num_hidden_layers + model.config.num_nextn_predict_layers
    n_csa = sum(r == 4 for r in model.config.compress_ratios)
    # Per block: wq_a wq_b wkv wo_b + 3 shared experts; indexer wq_b per CSA layer; MTP e_proj / h_proj.
    assert kinds[FP8Linear] == 7 * n_blocks + n_csa + 2
    assert kinds[FP4Linear] == 3 * model.config.n_routed_experts * n_blocks
    assert kinds[FP8DequantizedLinear] == n_blocks
    attn = model.layers[1].attn
    assert attn.wo_a.weight.dtype == torch.bfloat16 and isinstance(attn.wo_a, nn.Linear)
    assert type(attn.compressor.wkv) is nn.Linear and attn.compressor.wkv.weight.dtype == torch.float32
    assert type(attn.indexer.weights_proj) is nn.Linear and attn.indexer.weights_proj.weight.dtype == torch.bfloat16
    assert model.head.weight.dtype == torch.float32 and model.embed.weight.dtype == torch.bfloat16
    assert not any(p.requires_grad for m in model.modules() if isinstance(m, (FP8Linear, FP4Linear))
                   for p in m.parameters())  # fmt: skip


def test_packed_storage_is_the_checkpoint_and_values_equal_official_dequant(model, raw):
    """Every tensor type: packed FP8 / FP4 bytes as stored; their dequantization, the bf16 ``wo_a`` and every
    high-precision tensor equal the official values exactly."""
    counts = {"fp8": 0, "fp4": 0, "wo_a": 0, "other": 0}
    done = set()
    for name, m in model.named_modules():
        if isinstance(m, FP8DequantizedLinear):
            w, s = raw[f"{name}.weight"], raw[f"{name}.scale"]
            assert torch.equal(m.weight, _ref_fp8(w, s).to(torch.bfloat16)), name
            assert same_bytes(m.scale, s), name
            counts["wo_a"] += 1
        elif isinstance(m, (FP8Linear, FP4Linear)):
            w, s = raw[f"{name}.weight"], raw[f"{name}.scale"]
            assert same_bytes(m.weight.data, w) and same_bytes(m.scale.data, s), name
            ref = _ref_fp8(w, s) if isinstance(m, FP8Linear) else _ref_fp4(w, s)
            assert torch.equal(m.dequantized_weight(torch.float32), ref), name
            counts["fp8" if isinstance(m, FP8Linear) else "fp4"] += 1
        else:
            continue
        done |= {f"{name}.weight", f"{name}.scale"}
    state = model.state_dict()
    for key, tensor in raw.items():
        if key in done:
            continue
        # bf16 on disk, fp32 in the model (norms, compressor, head) is an exact upcast.
        assert torch.equal(state[key], tensor.to(state[key].dtype)), key
        counts["other"] += 1
    print(f"\nexact: {counts}")
    assert counts["fp8"] and counts["fp4"] and counts["wo_a"] and counts["other"]
    assert sum(2 * v for k, v in counts.items() if k != "other") + counts["other"] == len(raw)


def test_requantize_reproduces_every_packed_tensor(model):
    """quantize(dequantize(w)) with the stored scale gives back every FP8 / FP4 tensor and scale bit for bit."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            q, s = quantize_fp8_blocks(m.dequantized_weight(torch.float32), scale=m.scale, name=name)
        elif isinstance(m, FP4Linear):
            q, s = quantize_fp4_e2m1(m.dequantized_weight(torch.float32), scale=m.scale, name=name)
        elif isinstance(m, FP8DequantizedLinear):
            q, s = m.requantize()
            raw_w = m.weight  # compare through the dequantization (the module holds bf16)
            assert torch.equal(_ref_fp8(q, s).to(torch.bfloat16), raw_w), name
            n += 1
            continue
        else:
            continue
        assert same_bytes(q, m.weight.data) and same_bytes(s, m.scale.data), name
        n += 1
    print(f"\nbit-exact re-quantized modules: {n}")
    assert n > 0


# ---------------------------------------------------------------------------------------------------------------------
# Module numerics (SPEC §5.1-5.2, §6)
# ---------------------------------------------------------------------------------------------------------------------
def _blockwise_gemm(x: torch.Tensor, weight: torch.Tensor, k_block: int) -> torch.Tensor:
    """The official fp8_gemm / fp4_gemm accumulation: per K block an fp32 partial product times a_s * b_s."""
    q, a_s = x
    acc = torch.zeros(q.shape[0], weight.shape[0])
    for k0 in range(0, q.shape[1], k_block):
        part = q[:, k0 : k0 + k_block] @ weight[:, k0 : k0 + k_block].T
        acc += part * a_s[:, k0 // 128 : k0 // 128 + 1]
    return acc


def test_fp8_and_fp4_linear_match_the_official_blockwise_gemm(model):
    from transformers_deepseek.modeling.numerics import quantize_activation_fp8

    torch.manual_seed(0)
    for m in (model.layers[0].attn.wq_a, model.layers[0].ffn.experts[0].w1):
        x = torch.randn(5, m.in_features) * 3
        q, a_s = quantize_activation_fp8(x, 128)
        # Weight blocks already carry b_s (exact: power-of-two scales).
        k_block = 128 if isinstance(m, FP8Linear) else 32
        ref = _blockwise_gemm((q, a_s), m.dequantized_weight(torch.float32), k_block)
        got = m(x)  # fp32 input -> fp32 output
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # Activations really are FP8-quantized: quantizing them again changes nothing, skipping it changes the result.
        assert torch.equal(m(fp8_activation(x)), got)
        assert not torch.equal(torch.nn.functional.linear(x, m.dequantized_weight()), got)
        assert m(x.bfloat16()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# Parity (SPEC §10)
# ---------------------------------------------------------------------------------------------------------------------
def _min_floor(golden, n_layers: int) -> float:
    return min(golden.layer_floor(i) for i in range(n_layers))


def test_teacher_forced_parity_tiny_fp8_fp4(model, fp8_fixture):
    golden = fp8_fixture[1]
    report = teacher_forced(model, golden)
    end_to_end(model, golden, report)
    print("\n" + "\n".join(report.lines()))
    assert {"layer0", "layer1", "layer2", "layer3", "mtp (logits)"} <= set(report.layers)
    for name, (err, floor) in report.layers.items():
        # No MTP floor is recorded: hold it to the smallest per-layer floor.
        floor = floor or _min_floor(golden, model.config.num_hidden_layers)
        assert err <= TOLERANCE * floor, (name, err, floor)
    err, floor = report.end_to_end
    assert err <= E2E_TOLERANCE * floor, (err, floor)


def test_teacher_forced_parity_tiny_ratio16(fp8_fixture):
    """tiny-ratio16 stores only the streams after layer 2. Its layers 0-1 are byte-identical to tiny-fp8-fp4's
    (same shard, same ratios), so layer 2 (the ratio-16 layer) is fed tiny-fp8-fp4's stored layer-1 streams."""
    golden = load_golden(require_fixture("tiny-ratio16"))
    with checkpoint_dir(golden.root) as ckpt:
        model = _load(ckpt)
        shard1 = [f for f in ckpt.iterdir() if f.name.startswith("model-00001")][0]
        assert shard1.resolve() == (fp8_fixture[0] / shard1.name).resolve()
    assert model.config.compress_ratios[:3] == [0, 4, 16]
    inp = fp8_fixture[1].tensors["prefill.b0.hidden_after_layer1"]
    ids = golden.input_ids[:1]
    assert torch.equal(ids, fp8_fixture[1].input_ids[:1])
    with torch.no_grad():
        out = model.layers[2](inp, torch.arange(ids.shape[1]).expand(1, -1), ids)
    err, floor = rel_l2(out, golden.tensors["prefill.b0.hidden_after_layer2"]), golden.layer_floor(2)
    report = end_to_end(model, golden)
    print(
        f"\ntiny-ratio16   layer2 (ratio 16)      ours   rel_l2 {err:.5f}  floor {floor:.4f}  {err / floor:.2f}x floor"
    )
    print("\n".join(report.lines()))
    assert err <= TOLERANCE * floor
    e2e, e2e_floor = report.end_to_end
    assert e2e <= E2E_TOLERANCE * e2e_floor


# ---------------------------------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------------------------------
def _assert_same_checkpoint(a: Path, b: Path) -> int:
    ta, tb = read_tensors(a), read_tensors(b)
    assert set(ta) == set(tb), sorted(set(ta) ^ set(tb))[:10]
    bad = [k for k in ta if not same_bytes(ta[k], tb[k])]
    assert not bad, [(k, ta[k].dtype, tb[k].dtype, tuple(ta[k].shape), tuple(tb[k].shape)) for k in bad[:10]]
    return len(ta)


def test_save_writes_the_released_layout_byte_for_byte(model, fp8_fixture, tmp_path):
    src = fp8_fixture[0]
    model.save_pretrained(tmp_path / "saved")
    n = _assert_same_checkpoint(src, tmp_path / "saved")
    released = json.loads((src / "config.json").read_text())
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    differing = {k for k in released if released[k] != saved.get(k)}
    assert differing <= {"transformers_version"}, {k: (released[k], saved.get(k)) for k in differing}
    # Round trip: the saved checkpoint loads into the same packed model and saves to the same tensors again.
    again = _load(tmp_path / "saved")
    assert isinstance(again.hf_quantizer, DeepseekV4FP8HfQuantizer)
    again.save_pretrained(tmp_path / "again")
    _assert_same_checkpoint(tmp_path / "saved", tmp_path / "again")
    print(f"\nsave/reload/save: {n} tensors byte-identical to the release")


# ---------------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------------
def test_dequantize_option_gives_plain_bf16_linears(fp8_fixture, raw, tmp_path):
    model = _load(fp8_fixture[0], quantization_config=DeepseekV4FP8Config(dequantize=True))
    assert not any(isinstance(m, (FP8Linear, FP4Linear, FP8DequantizedLinear)) for m in model.modules())
    assert getattr(model.config, "quantization_config", None) is None and not getattr(model, "is_quantized", False)
    for name in ("layers.1.attn.wq_a", "layers.1.attn.wo_a", "layers.1.ffn.experts.3.w2", "mtp.0.e_proj"):
        m = model.get_submodule(name)
        plain = DeepseekV4GroupedLinear if name.endswith("wo_a") else nn.Linear  # wo_a keeps its grouped form
        assert type(m) is plain and m.weight.dtype == torch.bfloat16 and m.weight.requires_grad
        w, s = raw[f"{name}.weight"], raw[f"{name}.scale"]
        ref = _ref_fp4(w, s) if w.dtype == torch.int8 else _ref_fp8(w, s)
        assert torch.equal(m.weight, ref.to(torch.bfloat16)), name
    # Trainable: gradients reach the dequantized weights (numerics are then bf16 compute without FP8 activations).
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    model(ids).logits.float().sum().backward()
    assert model.layers[1].attn.wq_a.weight.grad is not None
    model.save_pretrained(tmp_path / "bf16")
    saved = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert "quantization_config" not in saved
    assert read_tensors(tmp_path / "bf16")["layers.1.attn.wq_a.weight"].dtype == torch.bfloat16


def test_fp4_to_fp8_option(fp8_fixture, model, raw, tmp_path):
    fp8 = _load(fp8_fixture[0], quantization_config=DeepseekV4FP8Config(fp4_to_fp8=True))
    assert not any(isinstance(m, FP4Linear) for m in fp8.modules())
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, FP4Linear):
            new = fp8.get_submodule(name)
            assert type(new) is FP8Linear and new.weight.dtype == torch.float8_e4m3fn
            assert torch.equal(new.dequantized_weight(), _ref_fp4(raw[f"{name}.weight"], raw[f"{name}.scale"])), name
            n += 1
    assert n == 3 * model.config.n_routed_experts * 5
    ids = fp8_fixture[1].input_ids[:, :64]
    with torch.no_grad():
        assert torch.equal(fp8(ids).logits, model(ids).logits)  # same values, same activation quantization
    fp8.save_pretrained(tmp_path / "fp8")
    saved = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert saved["expert_dtype"] == "fp8" and saved["quantization_config"]["quant_method"] == "fp8"
    tensors = read_tensors(tmp_path / "fp8")
    assert tensors["layers.0.ffn.experts.0.w1.weight"].dtype == torch.float8_e4m3fn
    assert tuple(tensors["layers.0.ffn.experts.0.w1.scale"].shape) == (1, 2)
    reloaded = _load(tmp_path / "fp8")
    assert type(reloaded.layers[0].ffn.experts[0].w1) is FP8Linear
    reloaded.save_pretrained(tmp_path / "fp8-again")
    _assert_same_checkpoint(tmp_path / "fp8", tmp_path / "fp8-again")


def test_nested_expert_dtype_and_disagreement(fp8_fixture, raw, tmp_path):
    cfg = json.loads((fp8_fixture[0] / "config.json").read_text())
    nested = {**cfg, "quantization_config": {**cfg["quantization_config"], "expert_dtype": "fp4"}}
    del nested["expert_dtype"]
    m = _load(_rewrite_checkpoint(fp8_fixture[0], tmp_path / "nested", raw, nested))
    assert type(m.layers[0].ffn.experts[0].w1) is FP4Linear
    assert m.config.quantization_config.to_dict()["expert_dtype"] == "fp4"
    clash = {**cfg, "quantization_config": {**cfg["quantization_config"], "expert_dtype": "fp8"}}
    with pytest.raises(ValueError, match="expert_dtype"):
        _load(_rewrite_checkpoint(fp8_fixture[0], tmp_path / "clash", raw, clash))
    # Absent everywhere (V4-Flash efc85512): the checkpoint's int8 experts say FP4.
    absent = {k: v for k, v in cfg.items() if k != "expert_dtype"}
    m = _load(_rewrite_checkpoint(fp8_fixture[0], tmp_path / "absent", raw, absent))
    assert type(m.layers[0].ffn.experts[0].w1) is FP4Linear


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.pop("layers.2.attn.wq_b.scale"), r"layers\.2\.attn\.wq_b\.scale: missing"),
        (lambda t: t.pop("layers.0.ffn.experts.1.w2.scale"), r"layers\.0\.ffn\.experts\.1\.w2\.scale: missing"),
        (lambda t: t.__setitem__("layers.0.attn.wq_a.scale", t["layers.0.attn.wq_a.scale"][:, :1].contiguous()),
         r"layers\.0\.attn\.wq_a\.scale: found F8_E8M0 \[1, 1\], expected F8_E8M0 \[1, 2\]"),
        (lambda t: t.__setitem__("layers.3.ffn.shared_experts.w1.scale",
                                 t["layers.3.ffn.shared_experts.w1.scale"].float()),
         r"layers\.3\.ffn\.shared_experts\.w1\.scale: found F32 .*expected F8_E8M0"),
        (lambda t: t.__setitem__("layers.1.ffn.experts.4.w3.scale",
                                 t["layers.1.ffn.experts.4.w3.scale"][:, :4].contiguous()),
         r"layers\.1\.ffn\.experts\.4\.w3\.scale: found F8_E8M0 \[128, 4\], expected F8_E8M0 \[128, 8\]"),
        (lambda t: t.__setitem__("layers.0.attn.wkv.weight", t["layers.0.attn.wkv.weight"].float()),
         r"layers\.0\.attn\.wkv\.weight: found F32 \[128, 256\], expected F8_E4M3"),
        (lambda t: t.__setitem__("layers.0.attn.compressor.wkv.scale", t["layers.0.attn.wkv.scale"].clone()), None),
        (lambda t: t.__setitem__("layers.1.attn.compressor.wkv.scale", t["layers.1.attn.wkv.scale"].clone()),
         r"layers\.1\.attn\.compressor\.wkv\.scale: a quantization scale"),
        (lambda t: t.__setitem__("layers.1.attn.indexer.weights_proj.weight",
                                 t["layers.1.attn.indexer.weights_proj.weight"].to(torch.float8_e4m3fn)),
         r"weights_proj\.weight: found F8_E4M3, expected a bf16"),
    ],
)  # fmt: skip
def test_bad_checkpoints_are_refused_by_tensor_name(fp8_fixture, raw, tmp_path, edit, message):
    tensors = dict(raw)
    edit(tensors)
    path = _rewrite_checkpoint(fp8_fixture[0], tmp_path / "bad", tensors)
    if message is None:  # layer 0 is a sliding-window layer: it has no compressor, the tensor is just unexpected
        _, info = DeepseekV4ForCausalLM.from_pretrained(path, output_loading_info=True)
        assert "layers.0.attn.compressor.wkv.scale" in info["unexpected_keys"]
        return
    with pytest.raises(ValueError, match=message):
        _load(path)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.__setitem__("expert_dtype", "fp16"), r"expert_dtype.*'fp16'"),
        (lambda c: c.__setitem__("expert_dtype", "bf16"), r"expert_dtype.*'bf16'"),  # valid unquantized, not here
        (lambda c: c["quantization_config"].__setitem__("expert_dtype", "int4"), r"expert_dtype.*'int4'"),
        (lambda c: c["quantization_config"].__setitem__("weight_block_size", [64, 64]),
         r"weight_block_size must be \[128, 128\], got \[64, 64\]"),
        (lambda c: c["quantization_config"].__setitem__("weight_block_size", [128]), r"weight_block_size.*\[128\]"),
        (lambda c: c["quantization_config"].__setitem__("fmt", "e5m2"), r"fmt must be 'e4m3', got 'e5m2'"),
    ],
)  # fmt: skip
def test_bad_configs_are_refused_by_field_name(fp8_fixture, raw, tmp_path, edit, message):
    """Bad fields of a released config.json: ValueError naming the field, from ``from_pretrained`` itself."""
    cfg = json.loads((fp8_fixture[0] / "config.json").read_text())
    cfg["quantization_config"] = dict(cfg["quantization_config"])
    edit(cfg)
    path = _rewrite_checkpoint(fp8_fixture[0], tmp_path / "bad", raw, cfg)
    with pytest.raises(ValueError, match=message):
        _load(path)


def test_bf16_checkpoint_is_quantized_on_load_and_saves_the_released_layout(tmp_path, fp8_fixture):
    """A bf16 checkpoint with an explicit DeepseekV4FP8Config: packed after loading with the official rounding
    (FP8 128x128 / FP4 1x32, ue8m0 scales), wo_a back to its bf16 dequantization; saving writes the released
    layout, which loads back into the same packed tensors."""
    raw = json.loads((fp8_fixture[0] / "config.json").read_text())
    raw.pop("quantization_config"), raw.pop("expert_dtype", None)
    config = DeepseekV4Config(**raw)
    torch.manual_seed(0)
    DeepseekV4ForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "bf16", quantization_config=DeepseekV4FP8Config())
    bf16 = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "bf16")
    wq_b, w1 = model.layers[1].attn.wq_b, model.layers[1].ffn.experts[0].w1
    assert isinstance(wq_b, FP8Linear) and isinstance(w1, FP4Linear)
    q, s = quantize_fp8_blocks(bf16.layers[1].attn.wq_b.weight.detach().to(torch.bfloat16))
    assert same_bytes(wq_b.weight, q) and same_bytes(wq_b.scale, s)
    q, s = quantize_fp4_e2m1(bf16.layers[1].ffn.experts[0].w1.weight.detach().to(torch.bfloat16))
    assert same_bytes(w1.weight, q) and same_bytes(w1.scale, s)
    model.save_pretrained(tmp_path / "fp8")
    saved = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "fp8" and saved["expert_dtype"] == "fp4"
    again = DeepseekV4ForCausalLM.from_pretrained(tmp_path / "fp8")
    mine, theirs = dict(model.named_parameters()), dict(again.named_parameters())
    assert mine.keys() == theirs.keys()
    assert all(same_bytes(mine[k], theirs[k]) for k in mine)


@pytest.fixture(autouse=True)
def _no_leftover_dirs(tmp_path) -> Iterator[None]:
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)
