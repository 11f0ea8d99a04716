"""Streaming converters between the DeepSeek-V4 checkpoint layouts, all derived from :mod:`.table`.

Every converter (1) reads the input headers and validates the whole input against the plan the config implies
(every tensor present, right dtype and shape, shards not truncated) before anything is written, then (2) builds a
:class:`~.io.Job` whose groups produce one logical tensor at a time, run by :func:`~.io.run_job` (atomic,
resumable). Values are converted with the bit-exact format math of ``quantization.formats`` (SPEC §3, §6).

Scales that a conversion drops (``wo_a`` in the MP shards, every scale in ``dequantize``, FP4 scales replaced by
FP8 ones) are kept in ``conversion/source_scales.safetensors``: an e8m0 scale is not a function of the dequantized
values (a block whose largest code is 224 in FP8 or 3 in FP4 is equally exact at half the scale), so re-quantizing
reproduces the original bytes only with the original scale. They are used when they still encode the tensor
exactly (i.e. it was not changed in between); otherwise the official rounding rule decides.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..modeling.configuration_deepseek_v4 import DeepseekV4Config
from ..quantization import formats
from .io import Group, Job, OutputFile, Reader, TensorInfo, copy_side_files, run_job
from .table import ST_DTYPES, Kind, Layout, Plan, Tensor, build_plan, mp_entries, mp_file_name, mp_owner

SOURCE_SCALES = "conversion/source_scales.safetensors"
# Small files carried over verbatim when the input has them (tokenizer + chat template, generation config).
SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
    "LICENSE",
)
RELEASED_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "scale_fmt": "ue8m0",
    "weight_block_size": [128, 128],
}
DEFAULT_MAX_SHARD = 5 * 1024**3


# ---------------------------------------------------------------------------------------------------------------------
# Config and validation
# ---------------------------------------------------------------------------------------------------------------------
def read_raw_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    if not path.is_file():
        raise ValueError(f"input {root} has no config.json")
    return json.loads(path.read_text())


def config_from_raw(raw: dict[str, Any]) -> DeepseekV4Config:
    data = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "transformers_version")}
    return DeepseekV4Config(**copy.deepcopy(data))


def layout_of_raw(raw: dict[str, Any]) -> Layout:
    qc = raw.get("quantization_config")
    if not qc:
        return Layout("bf16", "bf16")
    return Layout("fp8", qc.get("expert_dtype") or raw.get("expert_dtype") or "fp4")


def raw_config_for(raw: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """``raw`` (a released config.json) edited to describe ``layout``; every other key kept as it is."""
    out = copy.deepcopy(raw)
    if layout.dense == "bf16":
        out.pop("quantization_config", None)
        out.pop("expert_dtype", None)
        return out
    qc = out.get("quantization_config") or copy.deepcopy(RELEASED_QUANTIZATION_CONFIG)
    if "expert_dtype" in qc:
        qc["expert_dtype"] = layout.experts
    out["quantization_config"] = qc
    out["expert_dtype"] = layout.experts
    return out


def inference_config_for(raw: dict[str, Any], layout: Layout) -> dict[str, Any]:
    """The official ``inference/config.json`` (ModelArgs) edited to describe ``layout`` (SPEC §2)."""
    out = copy.deepcopy(raw)
    out["dtype"] = layout.dense
    if layout.dense == "bf16" or layout.experts == "bf16":
        out.pop("expert_dtype", None)
    else:
        out["expert_dtype"] = layout.experts
    return out


def validate(found: dict[str, TensorInfo], expected: dict[str, tuple[str, tuple[int, ...]]], where: str) -> None:
    """Every expected tensor present with its dtype and shape, nothing unexpected; ValueError naming each problem."""
    problems = []
    for name, (dtype, shape) in expected.items():
        info = found.get(name)
        if info is None:
            problems.append(f"{name}: missing (expected {dtype} {list(shape)})")
        elif (info.dtype, info.shape) != (dtype, shape):
            problems.append(f"{name}: found {info.dtype} {list(info.shape)}, expected {dtype} {list(shape)}")
    problems += [f"{name}: unexpected tensor ({found[name].dtype})" for name in found if name not in expected]
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise ValueError(f"{where}: {len(problems)} problem(s): " + "; ".join(problems[:20]) + more)


def _expected(plan: Plan) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {e.name: (e.dtype, e.shape) for e in plan.entries}


# ---------------------------------------------------------------------------------------------------------------------
# Per-tensor value transforms (formats.py does the math)
# ---------------------------------------------------------------------------------------------------------------------
def decode(t: Tensor, fmt: str | None, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Values of linear ``t`` stored in ``fmt``: bf16 [out, in] (exact for FP8/FP4 with e8m0 scales, SPEC §3)."""
    w = get(f"{t.base}.weight")
    if fmt == "fp8":
        return formats.dequantize_fp8_blocks(w, get(f"{t.base}.scale"), torch.bfloat16, name=t.base)
    if fmt == "fp4":
        return formats.dequantize_fp4(w, get(f"{t.base}.scale"), torch.bfloat16, name=t.base)
    return w


def encode(t: Tensor, fmt: str | None, w: torch.Tensor, hint: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Store the bf16/fp32 values ``w`` of linear ``t`` in ``fmt`` with the official rounding (SPEC §6), keeping the
    ``hint`` scale when it encodes ``w`` exactly (then the original bytes come back)."""
    name = f"{t.base}.weight"
    if fmt == "bf16":
        return {name: w.to(torch.bfloat16)}
    quantize, dequantize = (
        (formats.quantize_fp8_blocks, formats.dequantize_fp8_blocks)
        if fmt == "fp8"
        else (formats.quantize_fp4_e2m1, formats.dequantize_fp4)
    )
    if hint is not None:
        try:
            q, s = quantize(w, scale=hint, name=t.base)
            if torch.equal(dequantize(q, s, torch.float32), w.float()):
                return {name: q, f"{t.base}.scale": s}
        except ValueError:
            pass  # a hint of another format's shape: not applicable
    q, s = quantize(w, name=t.base)
    return {name: q, f"{t.base}.scale": s}


def _cast_exact(x: torch.Tensor, dtype: torch.dtype, name: str, inexact: list[str]) -> torch.Tensor:
    if x.dtype == dtype:
        return x
    y = x.to(dtype)
    if x.is_floating_point() and not torch.equal(y.to(x.dtype), x):
        inexact.append(name)
    return y


@dataclass
class _Hints:
    """Original scales from a ``conversion/source_scales.safetensors`` sidecar (or none)."""

    reader: Reader | None

    @classmethod
    def load(cls, root: Path, use: bool = True) -> _Hints:
        path = root / SOURCE_SCALES
        if not use or not path.is_file():
            return cls(None)
        return cls(Reader(path.parent, files=[path.name]))

    def get(self, t: Tensor) -> torch.Tensor | None:
        name = f"{t.base}.scale"
        if self.reader is None or name not in self.reader.tensors:
            return None
        return self.reader.get(name)


# ---------------------------------------------------------------------------------------------------------------------
# Released -> released (same names): dequantize, quantize, fp4-to-fp8, merge-lora
# ---------------------------------------------------------------------------------------------------------------------
def _extras(src: Path, raw: dict[str, Any], layout: Layout, inference_dir: bool = True) -> Callable[[Path], None]:
    def write(dst: Path) -> None:
        (dst / "config.json").write_text(json.dumps(raw_config_for(raw, layout), indent=2) + "\n")
        inf = src / "inference" / "config.json"
        if inference_dir and inf.is_file():
            (dst / "inference").mkdir(exist_ok=True)
            (dst / "inference" / "config.json").write_text(
                json.dumps(inference_config_for(json.loads(inf.read_text()), layout), indent=4) + "\n"
            )
        copy_side_files(src, dst, SIDE_FILES)

    return write


def _identity(reader: Reader, options: dict[str, Any], extra: Iterable[Path] = ()) -> dict[str, Any]:
    fp = reader.fingerprint()
    for p in extra:
        if p.is_file():
            st = p.stat()
            fp.append((str(p), st.st_size, st.st_mtime_ns))
    return {"input": str(reader.root.resolve()), "fingerprint": fp, "options": options}


def _recode_job(
    command: str,
    input_dir: Path,
    output_dir: Path,
    target: Callable[[Layout], Layout],
    options: dict[str, Any],
    *,
    keep_scales: bool = False,
    use_hints: bool = False,
    changed: Callable[[Tensor], Callable[[torch.Tensor], torch.Tensor] | None] = lambda t: None,
    extra_identity: Iterable[Path] = (),
) -> Job:
    raw = read_raw_config(input_dir)
    config = config_from_raw(raw)
    layout_in = layout_of_raw(raw)
    layout_out = target(layout_in)
    reader = Reader(input_dir)
    plan_in = build_plan(config, layout_in)
    validate(reader.tensors, _expected(plan_in), f"input {input_dir}")
    plan_out = build_plan(config, layout_out)
    hints = _Hints.load(input_dir, use_hints)

    def producer(t: Tensor) -> Callable[[], dict[str, torch.Tensor]]:
        fmt_in, fmt_out = layout_in.format_of(t.rule.kind), layout_out.format_of(t.rule.kind)
        delta = changed(t)

        def produce() -> dict[str, torch.Tensor]:
            if not t.is_linear or (fmt_in == fmt_out and delta is None):
                return {name: reader.get(name) for name in t.stored(layout_in)}  # bytes as they are
            if fmt_in == "fp4" and fmt_out == "fp8" and delta is None:
                # Lossless official re-encode (convert.py --expert-dtype fp8, SPEC §3).
                w, s = formats.fp4_to_fp8(reader.get(f"{t.base}.weight"), reader.get(f"{t.base}.scale"), name=t.base)
                return {f"{t.base}.weight": w, f"{t.base}.scale": s}
            w = decode(t, fmt_in, reader.get)
            hint = hints.get(t)
            if delta is not None:
                w = delta(w)
                # The tensor's own scale is kept only if it still encodes the merged values exactly (a zero LoRA
                # update, as PEFT initialises B); otherwise the official rule decides.
                hint = reader.get(f"{t.base}.scale") if fmt_in == fmt_out and fmt_in != "bf16" else None
            return encode(t, fmt_out, w, hint)

        return produce

    by_file: dict[str, list[Tensor]] = {}
    for t in plan_in.tensors:
        first = next(iter(t.stored(layout_in)))
        by_file.setdefault(reader.tensors[first].file.name, []).append(t)
    files = []
    for fname in sorted(by_file):
        groups = [
            Group([(n, d, s) for n, (d, s) in t.stored(layout_out).items()], producer(t)) for t in by_file[fname]
        ]
        files.append(OutputFile(fname, groups))
    if keep_scales:
        scales = [e for e in plan_in.entries if e.part == "scale"]
        if scales:
            files.append(
                OutputFile(
                    SOURCE_SCALES,
                    [Group([(e.name, e.dtype, e.shape)], (lambda n=e.name: {n: reader.get(n)})) for e in scales],
                )
            )
    del plan_out
    return Job(
        command,
        input_dir,
        output_dir,
        _identity(reader, options, extra_identity),
        files,
        _extras(input_dir, raw, layout_out),
        summary={"layout_in": vars(layout_in), "layout_out": vars(layout_out)},
    )


def dequantize(input_dir: Path, output_dir: Path, keep_scales: bool = True) -> Job:
    """Quantized (FP8 + FP4/FP8 experts) -> bf16, exact (SPEC §3). The input's scales go to the sidecar."""

    def target(layout: Layout) -> Layout:
        if layout.dense == "bf16":
            raise ValueError(f"input {input_dir} is already bf16 (config.json has no quantization_config)")
        return Layout("bf16", "bf16")

    return _recode_job(
        "dequantize", input_dir, output_dir, target, {"keep_scales": keep_scales}, keep_scales=keep_scales
    )


def quantize(input_dir: Path, output_dir: Path, expert_dtype: str = "fp4", use_source_scales: bool = True) -> Job:
    """bf16 -> FP8 128x128 (+ FP4 1x32 or FP8 experts) with the official rounding (SPEC §6)."""

    def target(layout: Layout) -> Layout:
        if layout.dense != "bf16":
            raise ValueError(f"input {input_dir} is already quantized ({layout.dense} / {layout.experts} experts)")
        return Layout("fp8", expert_dtype)

    options = {"expert_dtype": expert_dtype, "use_source_scales": use_source_scales}
    return _recode_job(
        "quantize", input_dir, output_dir, target, options, use_hints=use_source_scales,
        extra_identity=[input_dir / SOURCE_SCALES],
    )  # fmt: skip


def fp4_to_fp8(input_dir: Path, output_dir: Path) -> Job:
    """FP4 experts -> FP8 128x128 blocks, lossless (convert.py ``cast_e2m1fn_to_e4m3fn``, SPEC §3)."""

    def target(layout: Layout) -> Layout:
        if layout.experts != "fp4":
            raise ValueError(f"input {input_dir} has no FP4 experts (experts stored {layout.experts})")
        return Layout(layout.dense, "fp8")

    return _recode_job("fp4-to-fp8", input_dir, output_dir, target, {}, keep_scales=True)


# ---------------------------------------------------------------------------------------------------------------------
# merge-lora
# ---------------------------------------------------------------------------------------------------------------------
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", module):  # PEFT's rank_pattern / alpha_pattern matching
            return value
    return default


def read_lora(adapter_dir: Path, plan: Plan) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{linear base name: (A [r, in], B [out, r], scaling)}`` of a PEFT LoRA adapter, validated against ``plan``
    (scaling = alpha / r, or alpha / sqrt(r) with ``use_rslora``)."""
    from safetensors.torch import load_file

    cfg_path = adapter_dir / "adapter_config.json"
    weights = adapter_dir / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise ValueError(f"adapter {adapter_dir}: expected adapter_config.json and adapter_model.safetensors")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"adapter {adapter_dir}: peft_type {cfg.get('peft_type')!r}, only LORA can be merged")
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise ValueError(f"adapter {adapter_dir}: {flag}=true is not supported by merge-lora")
    if cfg.get("bias", "none") != "none":
        raise ValueError(f"adapter {adapter_dir}: bias={cfg['bias']!r} is not supported (only 'none')")
    tensors = load_file(str(weights))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise ValueError(f"adapter tensor {key!r}: not a LoRA A/B weight (embeddings / biases cannot be merged)")
        pairs.setdefault(m["module"], {})[m["ab"]] = value
    out = {}
    for module, ab in pairs.items():
        t = plan.by_base.get(module)
        if t is None or not (t.is_linear or t.base.endswith((".wkv.weight", ".wgate.weight", "head.weight"))):
            raise ValueError(f"adapter module {module!r}: no such linear in the checkpoint")
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter module {module!r}: needs both lora_A and lora_B, found {sorted(ab)}")
        a, b = ab["A"], ab["B"]
        r = int(_pattern_value(cfg.get("rank_pattern") or {}, module, cfg.get("r", 8)))
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, cfg.get("lora_alpha", 8)))
        out_f, in_f = t.shape
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise ValueError(
                f"adapter module {module!r}: lora_A {list(a.shape)} / lora_B {list(b.shape)}, expected "
                f"[{r}, {in_f}] / [{out_f}, {r}]"
            )
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        out[module] = (a, b, scaling)
    return out


def _add_delta(w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``w + delta`` in fp32, cast back; elements with a zero update keep their exact value (incl. the FP4 -0 code,
    which ``-0.0 + 0.0`` would turn into +0)."""
    return torch.where(delta == 0, w.float(), w.float() + delta).to(w.dtype)


def _leaf_base(t: Tensor) -> str:
    return t.base[: -len(".weight")] if not t.is_linear and t.base.endswith(".weight") else t.base


def merge_lora(input_dir: Path, output_dir: Path, adapter_dir: Path) -> Job:
    """Merge a PEFT LoRA adapter: per adapted linear dequantize -> W + scaling * B @ A (fp32) -> re-quantize with
    the official rounding into the input's format; every other tensor is copied byte for byte."""
    raw = read_raw_config(input_dir)
    plan = build_plan(config_from_raw(raw), layout_of_raw(raw))
    # LoRA on bf16 "leaf" linears (compressor wkv/wgate, head) names the module, not its weight.
    aliases = {_leaf_base(t): t.base for t in plan.tensors if not t.is_linear and t.base.endswith(".weight")}
    plan_view = copy.copy(plan)
    plan_view.by_base = {**plan.by_base, **{k: plan.by_base[v] for k, v in aliases.items()}}
    lora = read_lora(adapter_dir, plan_view)
    by_base = {plan_view.by_base[m].base: v for m, v in lora.items()}

    def changed(t: Tensor) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if t.base not in by_base:
            return None
        a, b, scaling = by_base[t.base]

        def apply(w: torch.Tensor) -> torch.Tensor:
            return _add_delta(w, scaling * (b.float() @ a.float()))

        return apply

    files = [adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"]
    job = _recode_job(
        "merge-lora", input_dir, output_dir, lambda layout: layout, {"adapter": str(adapter_dir.resolve())},
        changed=changed, extra_identity=files,
    )  # fmt: skip
    _merge_leaves(job, plan, by_base)
    job.summary["merged_modules"] = sorted(by_base)
    return job


def _merge_leaves(job: Job, plan: Plan, by_base: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
    """LoRA on non-quantized leaf weights (copied as bytes by the generic path): merge them here."""
    for of in job.files:
        for g in of.groups:
            name = g.specs[0][0]
            t = plan.by_base.get(name)
            if t is None or t.is_linear or name not in by_base:
                continue
            a, b, scaling = by_base[name]
            inner = g.produce

            def produce(inner=inner, name=name, a=a, b=b, scaling=scaling) -> dict[str, torch.Tensor]:
                w = inner()[name]
                return {name: _add_delta(w, scaling * (b.float() @ a.float()))}

            g.produce = produce


# ---------------------------------------------------------------------------------------------------------------------
# Official inference MP shards
# ---------------------------------------------------------------------------------------------------------------------
def _pack(groups: list[tuple[int, Group]], max_shard: int) -> list[OutputFile]:
    """Groups (with their byte sizes) packed in order into ``model-0000i-of-0000n.safetensors`` shards."""
    shards: list[list[Group]] = [[]]
    size = 0
    for nbytes, g in groups:
        if shards[-1] and size + nbytes > max_shard:
            shards.append([])
            size = 0
        shards[-1].append(g)
        size += nbytes
    n = len(shards)
    return [OutputFile(f"model-{i + 1:05d}-of-{n:05d}.safetensors", gs) for i, gs in enumerate(shards)]


def _group_bytes(specs: list[tuple[str, str, tuple[int, ...]]]) -> int:
    from .table import ST_BITS

    return sum(math.prod(s) * ST_BITS[d] // 8 for _, d, s in specs)


def to_inference(input_dir: Path, output_dir: Path, mp: int, expert_dtype: str = "fp4") -> Job:
    """Released layout -> ``model{i}-mp{mp}.safetensors`` of the official inference code (its convert.py: shard
    dims from the table, experts split by index, ``wo_a`` dequantized to bf16, FP4 experts viewed as
    ``float4_e2m1fn_x2`` or cast to FP8). Unlike convert.py it also accepts a bf16 checkpoint."""
    raw = read_raw_config(input_dir)
    config = config_from_raw(raw)
    layout = layout_of_raw(raw)
    if expert_dtype not in ("fp4", "fp8"):
        raise ValueError(f"--expert-dtype must be fp4 or fp8, got {expert_dtype!r}")
    reader = Reader(input_dir)
    plan = build_plan(config, layout)
    validate(reader.tensors, _expected(plan), f"input {input_dir}")
    ranks = mp_entries(plan, mp, expert_dtype)

    def producer(t: Tensor, rank: int, specs: list[tuple[str, str, tuple[int, ...]]]):
        fmt = layout.format_of(t.rule.kind)

        def produce() -> dict[str, torch.Tensor]:
            if t.rule.inference_bf16 and fmt == "fp8":
                full = {f"{t.base}.weight": decode(t, fmt, reader.get)}  # SPEC §3: wo_a dequantized to bf16
            elif t.rule.kind is Kind.EXPERT and fmt == "fp4":
                w, s = reader.get(f"{t.base}.weight"), reader.get(f"{t.base}.scale")
                if expert_dtype == "fp8":
                    w, s = formats.fp4_to_fp8(w, s, name=t.base)
                else:
                    w = w.view(torch.float4_e2m1fn_x2)
                full = {f"{t.base}.weight": w, f"{t.base}.scale": s}
            else:
                full = {name: reader.get(name) for name in t.stored(layout)}
            out = {}
            for name, _, shape in specs:
                x = full[name]
                dim = t.rule.mp_dim
                if dim is not None and mp_owner(t, config, mp) is None and mp > 1:
                    x = x.narrow(dim, rank * shape[dim], shape[dim]).contiguous()
                out[name] = x
            return out

        return produce

    files = []
    for rank, items in enumerate(ranks):
        groups: list[Group] = []
        current: Tensor | None = None
        for entry, dtype, shape in items:
            if entry.tensor is not current:
                current = entry.tensor
                groups.append(Group([], None))  # type: ignore[arg-type]
            groups[-1].specs.append((entry.name, dtype, shape))
        for g in groups:
            g.produce = producer(plan.by_name[g.specs[0][0]].tensor, rank, g.specs)
        files.append(OutputFile(mp_file_name(rank, mp), groups))
    # The scales convert.py drops or replaces, so that from-inference gives back the released bytes.
    kept = [
        e for e in plan.entries
        if e.part == "scale" and (
            (e.tensor.rule.inference_bf16 and layout.format_of(e.tensor.rule.kind) == "fp8")
            or (e.tensor.rule.kind is Kind.EXPERT and layout.experts == "fp4" and expert_dtype == "fp8")
        )
    ]  # fmt: skip
    if kept:
        files.append(
            OutputFile(
                SOURCE_SCALES,
                [Group([(e.name, e.dtype, e.shape)], (lambda n=e.name: {n: reader.get(n)})) for e in kept],
            )
        )
    out_layout = Layout(layout.dense, expert_dtype if layout.experts == "fp4" else layout.experts)

    def extras(dst: Path) -> None:
        # config.json describes the released layout this was made from (from-inference reads it back).
        (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        inf = input_dir / "inference" / "config.json"
        if inf.is_file():
            (dst / "inference").mkdir(exist_ok=True)
            (dst / "inference" / "config.json").write_text(
                json.dumps(inference_config_for(json.loads(inf.read_text()), out_layout), indent=4) + "\n"
            )
        copy_side_files(input_dir, dst, SIDE_FILES)

    return Job(
        "to-inference",
        input_dir,
        output_dir,
        _identity(reader, {"model_parallel": mp, "expert_dtype": expert_dtype}),
        files,
        extras,
        index=False,
        summary={"model_parallel": mp, "layout_in": vars(layout), "expert_dtype": expert_dtype},
    )


def from_inference(
    input_dir: Path, output_dir: Path, config_path: Path | None = None, max_shard_size: int = DEFAULT_MAX_SHARD
) -> Job:
    """Official ``model{i}-mp{mp}.safetensors`` -> released layout: shards concatenated along the table's dims,
    experts gathered by index, ``wo_a`` re-quantized (original scales from the sidecar when present, else the
    official rule), ``float4_e2m1fn_x2`` viewed back as int8."""
    files = sorted(input_dir.glob("model*-mp*.safetensors"))
    found = {re.fullmatch(r"model(\d+)-mp(\d+)\.safetensors", p.name) for p in files}
    found.discard(None)
    if not found:
        raise ValueError(f"input {input_dir} holds no model{{i}}-mp{{N}}.safetensors shard")
    mps = {int(m[2]) for m in found if m}
    if len(mps) != 1:
        raise ValueError(f"input {input_dir} mixes model-parallel sizes {sorted(mps)}")
    mp = mps.pop()
    ranks = {int(m[1]) for m in found if m}
    if ranks != set(range(mp)):
        raise ValueError(f"input {input_dir}: missing rank shard(s) {sorted(set(range(mp)) - ranks)} of mp={mp}")
    raw = json.loads(config_path.read_text()) if config_path else read_raw_config(input_dir)
    config = config_from_raw(raw)
    layout_src = layout_of_raw(raw)
    readers = [Reader(input_dir, files=[mp_file_name(r, mp)]) for r in range(mp)]
    expert_dtypes = {
        i.dtype for i in readers[0].tensors.values() if ".experts." in i.name and i.name.endswith(".weight")
    }
    mp_expert = "fp8" if expert_dtypes == {"F8_E4M3"} else "fp4"
    if layout_src.experts == "bf16":
        mp_expert = "fp4"  # unused: bf16 experts pass through mp_entries unchanged
    plan = build_plan(config, layout_src)
    expected = mp_entries(plan, mp, mp_expert)
    for r, items in enumerate(expected):
        validate(readers[r].tensors, {e.name: (d, s) for e, d, s in items}, f"input {input_dir / mp_file_name(r, mp)}")
    layout_out = Layout(layout_src.dense, mp_expert if layout_src.experts != "bf16" else "bf16")
    out_plan = build_plan(config, layout_out)
    hints = _Hints.load(input_dir)

    def producer(t: Tensor) -> Callable[[], dict[str, torch.Tensor]]:
        fmt = layout_out.format_of(t.rule.kind)

        def produce() -> dict[str, torch.Tensor]:
            owner = mp_owner(t, config, mp)
            names = list(t.stored(layout_out))
            if t.rule.inference_bf16 and fmt == "fp8":
                names = [f"{t.base}.weight"]
            got: dict[str, torch.Tensor] = {}
            for name in names:
                if owner is not None:
                    x = readers[owner].get(name)
                elif t.rule.mp_dim is not None and mp > 1:
                    x = torch.cat([rd.get(name) for rd in readers], dim=t.rule.mp_dim)
                else:
                    x = readers[0].get(name)
                got[name] = x.view(torch.int8) if x.dtype == torch.float4_e2m1fn_x2 else x
            if t.rule.inference_bf16 and fmt == "fp8":
                return encode(t, "fp8", got[f"{t.base}.weight"], hints.get(t))
            return got

        return produce

    groups = []
    for t in out_plan.tensors:
        specs = [(n, d, s) for n, (d, s) in t.stored(layout_out).items()]
        groups.append((_group_bytes(specs), Group(specs, producer(t))))
    return Job(
        "from-inference",
        input_dir,
        output_dir,
        _identity(
            readers[0],
            {"model_parallel": mp, "max_shard_size": max_shard_size},
            [p for p in files] + [input_dir / SOURCE_SCALES],
        ),
        _pack(groups, max_shard_size),
        _extras(input_dir, raw, layout_out),
        summary={"model_parallel": mp, "layout_out": vars(layout_out), "used_source_scales": hints.reader is not None},
    )


# ---------------------------------------------------------------------------------------------------------------------
# Native transformers (5.23) deepseek_v4 -> released
# ---------------------------------------------------------------------------------------------------------------------
_NATIVE_ONLY_KEYS = (
    "layer_types", "mlp_layer_types", "compress_rates", "rope_parameters", "partial_rotary_factor",
    "output_router_logits", "router_aux_loss_coef", "router_jitter_noise", "mlp_bias", "dtype",
)  # fmt: skip


def released_config_from_native(native: dict[str, Any]) -> dict[str, Any]:
    """A released-style config.json from a native 5.23 one. Native drops the MTP block (SPEC §9.13), so the result
    has ``num_nextn_predict_layers: 0`` and no MTP entry in ``compress_ratios``."""
    out = {k: v for k, v in native.items() if k not in _NATIVE_ONLY_KEYS}
    rates = native.get("compress_rates") or {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
    ratio_of = {"sliding_attention": 0, **rates}
    try:
        out["compress_ratios"] = [int(ratio_of[k]) for k in native["layer_types"]]
    except KeyError as exc:
        raise ValueError(f"native config.json: unknown or missing layer type {exc}") from exc
    out["num_hash_layers"] = sum(1 for k in native.get("mlp_layer_types", []) if k == "hash_moe")
    out["num_nextn_predict_layers"] = 0
    rope = native.get("rope_parameters") or {}
    main, comp = rope.get("main", {}), rope.get("compress", {})
    if "rope_theta" in main:
        out["rope_theta"] = main["rope_theta"]
    if comp:
        out["compress_rope_theta"] = comp.get("rope_theta", out.get("compress_rope_theta"))
        if comp.get("rope_type", comp.get("type")) == "yarn":
            out["rope_scaling"] = {
                "beta_fast": comp.get("beta_fast", 32),
                "beta_slow": comp.get("beta_slow", 1),
                "factor": comp.get("factor", 1),
                "original_max_position_embeddings": comp["original_max_position_embeddings"],
                "type": "yarn",
            }
    out["torch_dtype"] = "bfloat16"
    out["model_type"] = "deepseek_v4"
    return out


def _native_renamer() -> Callable[[str], str] | None:
    """transformers' own deepseek_v4 key renaming (as its loader applies it), when available (>= 5.8)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:
        return None
    mapping = get_checkpoint_conversion_mapping("deepseek_v4") or []
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    if not renamings:
        return None
    return lambda key: apply_renamings(key, renamings)


def from_native(
    input_dir: Path, output_dir: Path, config_path: Path | None = None, max_shard_size: int = DEFAULT_MAX_SHARD
) -> Job:
    """A checkpoint saved by transformers 5.23's native ``DeepseekV4ForCausalLM`` (either its default, reverted
    save or ``save_original_format=False``) -> released bf16 layout. Merged 3-D experts are split by index; fp32
    norms cast to the released bf16 (counted if inexact). Native has no MTP: the output has none."""
    native_raw = read_raw_config(input_dir)
    raw = json.loads(config_path.read_text()) if config_path else released_config_from_native(native_raw)
    raw = {k: v for k, v in raw.items() if k not in ("quantization_config", "expert_dtype")}
    if raw.get("num_nextn_predict_layers", 0):
        n = raw["num_nextn_predict_layers"]
        raw["num_nextn_predict_layers"] = 0  # native has no MTP weights to convert
        raw["compress_ratios"] = raw["compress_ratios"][: len(raw["compress_ratios"]) - n]
    config = config_from_raw(raw)
    layout = Layout("bf16", "bf16")
    plan = build_plan(config, layout)
    reader = Reader(input_dir)
    # Names a native save may use for each released tensor, all derived from the table.
    index: dict[str, tuple[Tensor, str]] = {}
    for t in plan.tensors:
        released = f"{t.base}.weight" if t.is_linear else t.base
        index[f"model.{released}"] = (t, "released")
        index[released] = (t, "released")
        if t.native_name is not None:
            index.setdefault(t.native_name, (t, "merged" if t.rule.kind is Kind.EXPERT else "native"))
    rename = _native_renamer()
    resolved: dict[str, tuple[str, str]] = {}  # released base -> (input key, how)
    problems = []
    for key, info in reader.tensors.items():
        hit = index.get(key) or (index.get(rename(key)) if rename else None)
        if hit is None:
            problems.append(f"{key}: unexpected tensor ({info.dtype} {list(info.shape)})")
            continue
        t, how = hit
        if how == "merged":
            n_chunks = t.rule.native_part[1] if t.rule.native_part else 1
            shape = (config.n_routed_experts, t.shape[0] * n_chunks, t.shape[1])
            targets = [x for x in plan.tensors if x.native_name == key]
        else:
            shape, targets = t.shape, [t]
        if info.shape != shape:
            problems.append(f"{key}: found shape {list(info.shape)}, expected {list(shape)}")
            continue
        allowed = ("I64", "I32") if t.rule.kind is Kind.I64 else ("BF16", "F32", "F16")
        if info.dtype not in allowed:
            problems.append(f"{key}: found {info.dtype}, expected one of {allowed} (a bf16 native checkpoint)")
            continue
        for x in targets:
            if x.base in resolved:
                problems.append(f"{x.base}: provided twice, by {resolved[x.base][0]!r} and {key!r}")
            resolved[x.base] = (key, how)
    problems += [
        f"{t.base}: missing (no native or released name for it)" for t in plan.tensors if t.base not in resolved
    ]
    if problems:
        raise ValueError(f"input {input_dir}: {len(problems)} problem(s): " + "; ".join(problems[:20]))
    inexact: list[str] = []

    def producer(t: Tensor) -> Callable[[], dict[str, torch.Tensor]]:
        key, how = resolved[t.base]
        ((name, (dtype, _)),) = t.stored(layout).items()

        def produce() -> dict[str, torch.Tensor]:
            if how == "merged":
                x = reader.get_rows(key, t.expert)  # [n_chunks * out, in]
                if t.rule.native_part:
                    chunk, n = t.rule.native_part
                    x = x.chunk(n, dim=0)[chunk]
                x = x.contiguous()
            else:
                x = reader.get(key)
            return {name: _cast_exact(x, ST_DTYPES[dtype], name, inexact)}

        return produce

    groups = []
    for t in plan.tensors:
        specs = [(n, d, s) for n, (d, s) in t.stored(layout).items()]
        groups.append((_group_bytes(specs), Group(specs, producer(t))))
    summary: dict[str, Any] = {"missing_from_native": "mtp.* (native deepseek_v4 has no MTP module)"}
    job = Job(
        "from-native",
        input_dir,
        output_dir,
        _identity(reader, {"config": str(config_path) if config_path else None, "max_shard_size": max_shard_size}),
        _pack(groups, max_shard_size),
        _extras(input_dir, raw, layout, inference_dir=False),
        summary=summary,
    )
    job.summary["inexact_casts"] = inexact  # filled while running (same list object)
    return job


__all__ = [
    "SOURCE_SCALES",
    "dequantize",
    "fp4_to_fp8",
    "from_inference",
    "from_native",
    "merge_lora",
    "quantize",
    "released_config_from_native",
    "run_job",
    "to_inference",
]
