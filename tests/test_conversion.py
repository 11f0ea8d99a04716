"""`transformers-deepseek convert ...`: byte-identical round trips, the official MP layout, LoRA merge, native
import, golden parity of every loadable output, kill/resume, bad input."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from helpers import has_native_deepseek_v4, read_tensors, require_fixture, same_bytes, stream_digests
from transformers_deepseek.cli import main as cli
from transformers_deepseek.parity import checkpoint_dir, end_to_end, load_golden, teacher_forced
from transformers_deepseek.quantization import formats

TOLERANCE = 1.5  # x the fixture's per-layer noise floor
E2E_TOLERANCE = 1.2  # x the fixture's end-to-end noise floor
# The official convert.py `mapping` for V4 names (leaf module -> split dim); written out here independently of the
# table so that the table is checked against it.
OFFICIAL_MP_DIMS = {"embed": 0, "wq_b": 0, "wo_a": 0, "wo_b": 1, "head": 0, "attn_sink": 0, "weights_proj": 0}


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:10]
    bad = [k for k in a if not same_bytes(a[k], b[k])]
    assert not bad, bad[:10]


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def convert(*args: str | Path) -> int:
    return cli(["convert", *(str(a) for a in args), "--no-progress"])


@pytest.fixture(scope="module")
def fp8_ckpt():
    golden = load_golden(require_fixture("tiny-fp8-fp4"))
    with checkpoint_dir(golden.root) as ckpt:
        yield ckpt, golden


@pytest.fixture(scope="module")
def out(tmp_path_factory, fp8_ckpt) -> Path:
    """Every conversion of tiny-fp8-fp4, run once. The input gets a tokenizer + chat template to be carried."""
    from transformers_deepseek.tokenization import load_default_tokenizer

    root = tmp_path_factory.mktemp("conv")
    src = root / "released"
    shutil.copytree(fp8_ckpt[0], src, symlinks=False)
    load_default_tokenizer().save_pretrained(src)
    before = tree_digest(src)
    assert convert("to-inference", src, root / "mp2", "--model-parallel", "2") == 0
    assert convert("from-inference", root / "mp2", root / "back") == 0
    assert convert("dequantize", src, root / "bf16") == 0
    assert convert("quantize", root / "bf16", root / "requant") == 0
    assert convert("quantize", root / "bf16", root / "requant_rule", "--ignore-source-scales") == 0
    assert convert("fp4-to-fp8", src, root / "fp8") == 0
    assert convert("to-inference", src, root / "mp2fp8", "--model-parallel", "2", "--expert-dtype", "fp8") == 0
    # PEFT initialises B = 0: merging such an adapter must change nothing.
    _adapter(root / "zero_lora", {"layers.0.attn.wq_a": (128, 256), "layers.3.ffn.experts.1.w2": (256, 128)}, 8, 8,
             False, zero_b=True)  # fmt: skip
    assert convert("merge-lora", src, root / "merged_zero_lora", "--adapter", root / "zero_lora") == 0
    assert tree_digest(src) == before  # the input is never touched
    return root


# ---------------------------------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------------------------------
def test_released_to_mp_shards_and_back_is_byte_identical(out):
    src = read_tensors(out / "released")
    assert_identical(read_tensors(out / "back"), src)
    assert json.loads((out / "back" / "config.json").read_text()) == json.loads(
        (out / "released/config.json").read_text()
    )
    index = json.loads((out / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(src)


def test_mp_shards_are_what_the_official_convert_py_writes(out):
    """Independent of the table: split dims from the official `mapping`, experts by index, wo_a dequantized to bf16
    (each 128x128 block times its scale in fp32), int8 experts viewed as float4_e2m1fn_x2, official file names."""
    src = read_tensors(out / "released")
    mp = 2
    assert sorted(p.name for p in (out / "mp2").glob("*.safetensors")) == [
        "model0-mp2.safetensors",
        "model1-mp2.safetensors",
    ]
    for rank in range(mp):
        got = {}
        with safe_open(str(out / "mp2" / f"model{rank}-mp{mp}.safetensors"), "pt") as f:
            for k in f.keys():  # noqa: SIM118
                got[k] = f.get_tensor(k)
        expected = {}
        for name, t in src.items():
            if name.endswith("wo_a.scale"):
                continue
            parts = name.split(".")
            key = parts[-1] if any(x in name for x in ("hc", "attn_sink", "tid2eid", "ape")) else parts[-2]
            if ".experts." in name and ".shared_experts." not in name:
                if int(parts[parts.index("experts") + 1]) // (8 // mp) != rank:
                    continue
            elif key in OFFICIAL_MP_DIMS:
                dim = OFFICIAL_MP_DIMS[key]
                size = t.shape[dim] // mp
                t = t.narrow(dim, rank * size, size)
            if name.endswith("wo_a.weight"):
                scale = src[name.replace("weight", "scale")].float()
                s = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)
                lo = rank * t.shape[0]
                t = (t.float() * s[lo : lo + t.shape[0]]).bfloat16()
            elif ".experts." in name and t.dtype == torch.int8:
                t = t.view(torch.float4_e2m1fn_x2)
            expected[name] = t.contiguous()
        assert_identical(got, expected)


def test_mp_shards_with_fp8_experts_round_trip(out, tmp_path):
    src = read_tensors(out / "released")
    assert convert("from-inference", out / "mp2fp8", tmp_path / "back") == 0
    back = read_tensors(tmp_path / "back")
    assert set(back) == set(src)
    for name, t in src.items():
        if ".experts." in name and ".shared_" not in name and name.endswith(".weight"):
            scale = name[: -len("weight")] + "scale"
            assert back[name].dtype == torch.float8_e4m3fn
            assert torch.equal(
                formats.dequantize_fp8_blocks(back[name], back[scale], torch.float32),
                formats.dequantize_fp4(t, src[scale], torch.float32),
            ), name
        elif ".experts." not in name or ".shared_" in name:
            assert same_bytes(back[name], t), name
    assert json.loads((tmp_path / "back" / "config.json").read_text())["expert_dtype"] == "fp8"


def test_dequantize_is_exact_and_quantize_gives_back_the_released_bytes(out):
    src = read_tensors(out / "released")
    bf16 = read_tensors(out / "bf16")
    assert not any(k.endswith(".scale") for k in bf16)
    for name, t in bf16.items():
        if name in src:
            ref = src[name]
            if ref.dtype == torch.float8_e4m3fn:
                ref = formats.dequantize_fp8_blocks(ref, src[name[:-6] + "scale"], torch.bfloat16)
            elif ref.dtype == torch.int8:
                ref = formats.dequantize_fp4(ref, src[name[:-6] + "scale"], torch.bfloat16)
            assert same_bytes(t, ref), name
    cfg = json.loads((out / "bf16" / "config.json").read_text())
    assert "quantization_config" not in cfg and "expert_dtype" not in cfg
    assert_identical(read_tensors(out / "requant"), src)
    cfg = json.loads((out / "requant" / "config.json").read_text())
    assert cfg == json.loads((out / "released" / "config.json").read_text())


def test_quantize_with_the_official_rule_alone_gives_the_same_values(out):
    """Without the original scales, blocks whose largest code is 224 (FP8) / 3 (FP4) get half the scale: other
    bytes, identical values (SPEC §6 rounding is applied to already-exact values)."""
    src, rule = read_tensors(out / "released"), read_tensors(out / "requant_rule")
    assert set(src) == set(rule)
    differ = 0
    for name, t in src.items():
        if name.endswith(".scale"):
            continue  # compared through the values below
        if t.dtype not in (torch.float8_e4m3fn, torch.int8):
            assert same_bytes(rule[name], t), name
            continue
        scale = name[:-6] + "scale"
        deq = formats.dequantize_fp8_blocks if t.dtype == torch.float8_e4m3fn else formats.dequantize_fp4
        assert torch.equal(deq(rule[name], rule[scale], torch.float32), deq(t, src[scale], torch.float32)), name
        differ += not same_bytes(rule[name], t)
    assert differ > 0  # the ambiguity is real on this fixture (every FP4 expert has such blocks)


def test_fp4_to_fp8_dequantizes_to_identical_values(out):
    src, fp8 = read_tensors(out / "released"), read_tensors(out / "fp8")
    n = 0
    for name, t in src.items():
        if t.dtype == torch.int8:
            scale = name[:-6] + "scale"
            assert fp8[name].dtype == torch.float8_e4m3fn and fp8[scale].shape == (
                t.shape[0] // 128,
                t.shape[1] * 2 // 128,
            )
            assert torch.equal(
                formats.dequantize_fp8_blocks(fp8[name], fp8[scale], torch.float32),
                formats.dequantize_fp4(t, src[scale], torch.float32),
            ), name
            n += 1
        elif not (
            name.endswith(".scale") and name[:-5] + "weight" in src and src[name[:-5] + "weight"].dtype == torch.int8
        ):
            assert same_bytes(fp8[name], t), name
    assert n == 5 * 8 * 3
    assert json.loads((out / "fp8" / "config.json").read_text())["expert_dtype"] == "fp8"
    assert json.loads((out / "fp8" / "inference" / "config.json").read_text())["expert_dtype"] == "fp8"


def test_outputs_carry_tokenizer_and_chat_template(out):
    from transformers_deepseek.tokenization import DeepseekV4TokenizerFast

    ref = DeepseekV4TokenizerFast.from_pretrained(out / "released")
    msgs = [{"role": "user", "content": "hi"}]
    for name in ("mp2", "back", "bf16", "requant", "fp8"):
        tok = DeepseekV4TokenizerFast.from_pretrained(out / name)
        assert tok.chat_template == ref.chat_template
        assert tok.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)


# ---------------------------------------------------------------------------------------------------------------------
# Golden parity of every loadable output
# ---------------------------------------------------------------------------------------------------------------------
def _load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _assert_parity(model, golden):
    report = teacher_forced(model, golden)
    end_to_end(model, golden, report)
    print("\n" + "\n".join(report.lines()))
    min_floor = min(golden.layer_floor(i) for i in range(model.config.num_hidden_layers))
    assert report.layers
    for name, (err, floor) in report.layers.items():
        assert err <= TOLERANCE * (floor or min_floor), (name, err, floor)
    err, floor = report.end_to_end
    assert err <= E2E_TOLERANCE * floor, (err, floor)
    return report


@pytest.mark.slow
@pytest.mark.parametrize("name", ["back", "requant", "fp8", "merged_zero_lora"])
def test_golden_parity_holds_for_quantized_outputs(out, fp8_ckpt, name):
    """Per-layer teacher forcing (incl. MTP) and end-to-end vs the official golden, loaded from each output."""
    model = _load(out / name)
    report = _assert_parity(model, fp8_ckpt[1])
    assert {"layer0", "layer1", "layer2", "layer3", "mtp (logits)"} <= set(report.layers)


def test_byte_identical_outputs_load_as_the_released_model(out, fp8_ckpt):
    """Fast companion of the parity test: outputs whose tensors equal the released ones load into the same model."""
    ref = _load(fp8_ckpt[0]).state_dict()
    for name in ("back", "requant", "merged_zero_lora"):
        got = _load(out / name).state_dict()
        assert got.keys() == ref.keys()
        assert all(same_bytes(got[k], ref[k]) for k in ref), name


def test_dequantized_output_loads_as_exact_bf16(out, fp8_ckpt):
    """The bf16 output holds the exact dequantized weights; a bf16 model runs without the FP8 activation
    quantization of the official FP8 path (SPEC §5.1), so the fp8 golden is not its reference: checked here is
    that the loaded weights are the exact dequantization of the released ones."""
    model = _load(out / "bf16")
    ref = _load(fp8_ckpt[0])
    w = model.layers[1].attn.wq_b.weight
    assert w.dtype == torch.bfloat16
    assert torch.equal(w, formats.dequantize_fp8_blocks(ref.layers[1].attn.wq_b.weight, ref.layers[1].attn.wq_b.scale))


# ---------------------------------------------------------------------------------------------------------------------
# merge-lora
# ---------------------------------------------------------------------------------------------------------------------
def _adapter(path: Path, modules: dict[str, tuple[int, int]], r: int, alpha: float, rslora: bool, zero_b=False):
    path.mkdir()
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for m, (out_f, in_f) in modules.items():
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, in_f, generator=g) * 0.02
        b = torch.zeros(out_f, r) if zero_b else torch.randn(out_f, r, generator=g) * 0.02
        tensors[f"base_model.model.{m}.lora_B.weight"] = b
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora, "bias": "none",
           "target_modules": sorted({m.split(".")[-1] for m in modules})}  # fmt: skip
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return tensors


@pytest.mark.parametrize("rslora", [False, True])
def test_merge_lora_math_and_requantization(out, tmp_path, rslora):
    src = read_tensors(out / "released")
    modules = {
        "layers.1.attn.wq_a": (128, 256),  # FP8
        "layers.2.ffn.experts.3.w2": (256, 128),  # FP4
        "layers.1.attn.compressor.wkv": (256, 256),  # bf16 leaf
    }
    r, alpha = 4, 16.0
    lora = _adapter(tmp_path / "adapter", modules, r, alpha, rslora)
    assert convert("merge-lora", out / "released", tmp_path / "merged", "--adapter", tmp_path / "adapter") == 0
    merged = read_tensors(tmp_path / "merged")
    scaling = alpha / (r**0.5) if rslora else alpha / r
    changed = set()
    for m in modules:
        a, b = lora[f"base_model.model.{m}.lora_A.weight"], lora[f"base_model.model.{m}.lora_B.weight"]
        delta = scaling * (b @ a)
        if m.endswith("wkv"):
            expected = {f"{m}.weight": (src[f"{m}.weight"].float() + delta).bfloat16()}
        elif m.endswith("wq_a"):
            w = formats.dequantize_fp8_blocks(src[f"{m}.weight"], src[f"{m}.scale"])
            q, s = formats.quantize_fp8_blocks((w.float() + delta).bfloat16())
            expected = {f"{m}.weight": q, f"{m}.scale": s}
        else:
            w = formats.dequantize_fp4(src[f"{m}.weight"], src[f"{m}.scale"])
            q, s = formats.quantize_fp4_e2m1((w.float() + delta).bfloat16())
            expected = {f"{m}.weight": q, f"{m}.scale": s}
        for k, v in expected.items():
            assert same_bytes(merged[k], v), k
            changed.add(k)
        assert not same_bytes(merged[f"{m}.weight"], src[f"{m}.weight"])
    assert set(merged) == set(src)
    assert all(same_bytes(merged[k], src[k]) for k in src if k not in changed)


def test_merge_lora_with_zero_b_is_identity(out):
    assert_identical(read_tensors(out / "merged_zero_lora"), read_tensors(out / "released"))


def test_merge_lora_refuses_unknown_modules_and_bad_shapes(out, tmp_path, capsys):
    _adapter(tmp_path / "a1", {"layers.0.attn.nope": (128, 256)}, 4, 8, False)
    assert convert("merge-lora", out / "released", tmp_path / "m1", "--adapter", tmp_path / "a1") == 2
    assert "layers.0.attn.nope" in capsys.readouterr().err
    _adapter(tmp_path / "a2", {"layers.0.attn.wq_a": (128, 128)}, 4, 8, False)
    assert convert("merge-lora", out / "released", tmp_path / "m2", "--adapter", tmp_path / "a2") == 2
    assert "layers.0.attn.wq_a" in capsys.readouterr().err
    assert not (tmp_path / "m1").exists() and not (tmp_path / "m2").exists()


# ---------------------------------------------------------------------------------------------------------------------
# from-native
# ---------------------------------------------------------------------------------------------------------------------
_SAVE_NATIVE = textwrap.dedent("""
    import sys, torch
    from transformers.models.deepseek_v4 import DeepseekV4ForCausalLM  # the native class; our package not imported
    assert "transformers_deepseek" not in sys.modules
    model = DeepseekV4ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    model.save_pretrained(sys.argv[2], save_original_format=sys.argv[3] == "reverted")
""")


@pytest.mark.skipif(not has_native_deepseek_v4(), reason="needs transformers with a native deepseek_v4 (>= 5.8)")
@pytest.mark.parametrize("form", ["reverted", "native"])
def test_from_native_gives_back_the_released_tensors_except_mtp(tmp_path, form):
    golden = load_golden(require_fixture("tiny-bf16"))
    with checkpoint_dir(golden.root) as ckpt:
        env = {**os.environ, "TDSEEK_NO_OVERRIDE": "1"}
        subprocess.run([sys.executable, "-c", _SAVE_NATIVE, str(ckpt), str(tmp_path / "native"), form], check=True,
                       env=env, capture_output=True)  # fmt: skip
        src = read_tensors(ckpt)
        src_cfg = json.loads((ckpt / "config.json").read_text())
    assert convert("from-native", tmp_path / "native", tmp_path / "released") == 0
    got = read_tensors(tmp_path / "released")
    missing = sorted(set(src) - set(got))
    assert missing and all(k.startswith("mtp.") for k in missing)  # native drops the MTP block (SPEC §9.13)
    assert_identical(got, {k: v for k, v in src.items() if not k.startswith("mtp.")})
    cfg = json.loads((tmp_path / "released" / "config.json").read_text())
    assert cfg["compress_ratios"] == src_cfg["compress_ratios"][:-1] and cfg["num_nextn_predict_layers"] == 0
    for key in (
        "rope_scaling",
        "rope_theta",
        "compress_rope_theta",
        "num_hash_layers",
        "hidden_size",
        "sliding_window",
    ):
        assert cfg[key] == src_cfg[key], key
    manifest = json.loads((tmp_path / "released" / "conversion" / "manifest.json").read_text())
    assert "mtp" in manifest["summary"]["missing_from_native"]
    model = _load(tmp_path / "released")
    assert len(model.mtp) == 0
    if form == "native":
        # The loaded output is the tiny-bf16 model minus MTP: per-layer teacher forcing + end-to-end hold.
        report = _assert_parity(model, golden)
        assert {"layer0", "layers1-3 chained[:32]"} <= set(report.layers)


# ---------------------------------------------------------------------------------------------------------------------
# Atomic + resumable
# ---------------------------------------------------------------------------------------------------------------------
_SLOW_CONVERT = textwrap.dedent("""
    import sys, time
    from transformers_deepseek.conversion import io
    write = io.ShardWriter.write
    started = []
    def parked(self, name, tensor):  # test-only: park for good one tensor into the second shard
        write(self, name, tensor)
        if self.path not in started:
            started.append(self.path)
        if len(started) >= 2:
            self._f.flush()
            time.sleep(600)
    io.ShardWriter.write = parked
    from transformers_deepseek.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_then_rerun_gives_identical_output(out, tmp_path):
    target = tmp_path / "bf16"
    cmd = [
        sys.executable,
        "-c",
        _SLOW_CONVERT,
        "convert",
        "dequantize",
        str(out / "released"),
        str(target),
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    partial = None
    while time.time() < deadline and proc.poll() is None:
        found = list(tmp_path.glob("bf16.partial-*"))
        if found and (found[0] / ".journal.json").is_file() and list(found[0].glob("*.tmp")):
            journal = json.loads((found[0] / ".journal.json").read_text())
            if len(journal["files"]) >= 1:
                partial = found[0]
                break
        time.sleep(0.02)
    assert partial is not None and proc.poll() is None, "converter finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Killed mid-run: nothing at the output path, and the partial directory does not look like a checkpoint.
    assert not target.exists()
    assert not (partial / "config.json").exists() and not (partial / "model.safetensors.index.json").exists()
    assert list(partial.glob("*.tmp")), "expected a half-written shard"
    assert convert("dequantize", out / "released", target) == 0
    assert not partial.exists()
    assert tree_digest(target) == tree_digest(out / "bf16")
    # A rerun on a finished output is a no-op; a different job there is refused.
    assert convert("dequantize", out / "released", target) == 0
    assert convert("fp4-to-fp8", out / "released", target) == 2


def test_resume_rewrites_a_corrupted_journaled_shard(out, tmp_path):
    target = tmp_path / "fp8"
    job_dir = None
    # Interrupt deterministically: fail on the second shard, in-process.
    from transformers_deepseek.conversion import converters, io

    job = converters.fp4_to_fp8(out / "released", target)
    original = job.files[1].groups[0].produce
    job.files[1].groups[0].produce = lambda: (_ for _ in ()).throw(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        io.run_job(job, progress=False)
    job_dir = next(tmp_path.glob("fp8.partial-*"))
    first = job_dir / job.files[0].name
    data = bytearray(first.read_bytes())
    data[-1] ^= 0xFF  # corrupt the journaled shard: the rerun must notice (sha256) and rewrite it
    first.write_bytes(bytes(data))
    job.files[1].groups[0].produce = original
    io.run_job(converters.fp4_to_fp8(out / "released", target), progress=False)
    assert tree_digest(target) == tree_digest(out / "fp8")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False)
    return dst


def _rewrite(ckpt: Path, edit) -> None:
    """Apply ``edit(tensors)`` to the shard holding ``layers.1.attn.attn_sink`` (index updated)."""
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = ckpt / index["weight_map"]["layers.1.attn.attn_sink"]
    tensors = read_file_tensors(shard)
    edit(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name}
    index["weight_map"].update({k: shard.name for k in tensors})
    index_path.write_text(json.dumps(index))


def read_file_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize(
    "case, message",
    [
        ("truncated", "is truncated"),
        ("missing", "layers.1.attn.attn_sink: missing"),
        ("dtype", "layers.1.attn.attn_sink: found BF16 [4], expected F32 [4]"),
        ("shape", "layers.1.attn.wq_a.scale: found F8_E8M0 [2, 2], expected F8_E8M0 [1, 2]"),
    ],
)
def test_bad_input_is_refused_naming_the_tensor_and_left_untouched(out, tmp_path, capsys, case, message):
    ckpt = _copy(out / "released", tmp_path / "in")
    if case == "truncated":
        shard = sorted(ckpt.glob("model-*.safetensors"))[1]
        shard.write_bytes(shard.read_bytes()[:-1000])
    elif case == "missing":
        _rewrite(ckpt, lambda t: t.pop("layers.1.attn.attn_sink"))
    elif case == "dtype":
        _rewrite(ckpt, lambda t: t.update({"layers.1.attn.attn_sink": t["layers.1.attn.attn_sink"].bfloat16()}))
    else:
        _rewrite(
            ckpt, lambda t: t.update({"layers.1.attn.wq_a.scale": torch.cat([t["layers.1.attn.wq_a.scale"]] * 2)})
        )
    before = tree_digest(ckpt)
    for command in (["dequantize"], ["to-inference", "--model-parallel", "2"], ["fp4-to-fp8"]):
        assert convert(command[0], ckpt, tmp_path / "o", *command[1:]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert case != "truncated" or "model-00002-of-00003.safetensors" in err
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob("o.partial-*"))
    assert tree_digest(ckpt) == before


def test_output_dir_that_is_not_ours_is_refused_and_untouched(out, tmp_path, capsys):
    target = tmp_path / "o"
    target.mkdir()
    (target / "precious.txt").write_text("keep me")
    assert convert("dequantize", out / "released", target) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["precious.txt"] and (
        target / "precious.txt"
    ).read_text() == "keep me"
    assert not list(tmp_path.glob("o.partial-*"))


def test_every_subcommand_has_help(capsys):
    for sub in ("to-inference", "from-inference", "fp4-to-fp8", "dequantize", "quantize", "merge-lora", "from-native"):
        with pytest.raises(SystemExit) as exc:
            cli(["convert", sub, "--help"])
        assert exc.value.code == 0
        assert "INPUT_DIR" in capsys.readouterr().out


def test_dequantized_output_quantized_on_load_has_the_fp8_golden_parity(out, fp8_ckpt):
    """The bf16 output served in FP8: `from_pretrained(bf16_dir, quantization_config=DeepseekV4FP8Config())`
    quantizes after loading with fresh ue8m0 scales; every packed value is the released one, so the model is the
    released FP8 model (activation quantization included) and its layer streams are the official ones bit for bit."""
    from transformers import AutoModelForCausalLM

    from transformers_deepseek.quantization import DeepseekV4FP8Config
    from transformers_deepseek.quantization.modules import FP4Linear, FP8Linear

    golden = fp8_ckpt[1]
    model = AutoModelForCausalLM.from_pretrained(
        out / "bf16", quantization_config=DeepseekV4FP8Config(), batch_invariant=False
    ).eval()
    ref = AutoModelForCausalLM.from_pretrained(fp8_ckpt[0], batch_invariant=False).eval()
    assert isinstance(model.layers[1].attn.wq_b, FP8Linear) and isinstance(
        model.layers[2].ffn.experts[3].w1, FP4Linear
    )
    for name, module in ref.named_modules():
        if isinstance(module, (FP8Linear, FP4Linear)):
            ours = model.get_submodule(name)
            assert torch.equal(ours.dequantized_weight(), module.dequantized_weight()), name
    with torch.no_grad():
        streams = model(golden.input_ids, output_hidden_states=True, use_cache=False).hidden_states[1:]
    assert stream_digests(streams) == golden.meta["layer_stream_sha256"]
    report = _assert_parity(model, golden)
    print("\n".join(report.lines()))
