"""``transformers-deepseek convert <subcommand> INPUT_DIR OUTPUT_DIR [options]``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from . import converters
from .io import run_job

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """``"5GB"`` / ``"500MB"`` / ``"1024"`` -> bytes (powers of 1024)."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB)")
    return int(float(m[1]) * 1024 ** " KMGT".index(m[2].upper() or " "))


def _common(p: argparse.ArgumentParser, shards: bool = False) -> None:
    p.add_argument("input_dir", type=Path, metavar="INPUT_DIR")
    p.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR", help="must not exist (written atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if shards:
        p.add_argument("--max-shard-size", type=parse_size, default=converters.DEFAULT_MAX_SHARD,
                       help="largest output shard (default 5GB)")  # fmt: skip


def add_convert_parser(subparsers: argparse._SubParsersAction) -> None:
    convert = subparsers.add_parser(
        "convert",
        help="convert checkpoints between layouts (streaming, atomic, resumable)",
        description="Convert DeepSeek-V4 checkpoints. Every subcommand validates the whole input first, streams "
        "tensor by tensor, writes into OUTPUT_DIR.partial-<id>/ and renames it into place at the end; rerunning "
        "an interrupted conversion resumes it (finished shards are verified by sha256).",
    )
    sub = convert.add_subparsers(dest="convert_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser("to-inference", help="released layout -> official inference model-parallel shards",
                       description="Released layout -> model{i}-mp{N}.safetensors as the official convert.py writes "
                       "them (shard dims, experts by index, wo_a in bf16).")  # fmt: skip
    _common(p)
    p.add_argument("--model-parallel", type=int, required=True, metavar="N", help="number of ranks")
    p.add_argument("--expert-dtype", choices=("fp4", "fp8"), default="fp4",
                   help="FP4 experts as float4_e2m1fn_x2 (default) or cast losslessly to FP8")  # fmt: skip
    p.set_defaults(make=lambda a: converters.to_inference(a.input_dir, a.output_dir, a.model_parallel, a.expert_dtype))

    p = sub.add_parser("from-inference", help="official inference model-parallel shards -> released layout",
                       description="model{i}-mp{N}.safetensors -> released layout (needs the released config.json, "
                       "which to-inference copies; else pass --config).")  # fmt: skip
    _common(p, shards=True)
    p.add_argument("--config", type=Path, help="released config.json (default: INPUT_DIR/config.json)")
    p.set_defaults(make=lambda a: converters.from_inference(a.input_dir, a.output_dir, a.config, a.max_shard_size))

    p = sub.add_parser(
        "fp4-to-fp8",
        help="FP4 experts -> FP8 (lossless re-encode)",
        description="Routed experts FP4 e2m1 (1x32 scales) -> FP8 e4m3 (128x128 scales), lossless.",
    )
    _common(p)
    p.set_defaults(make=lambda a: converters.fp4_to_fp8(a.input_dir, a.output_dir))

    p = sub.add_parser("dequantize", help="FP8/FP4 -> bf16 (exact)",
                       description="Quantized -> bf16, exact. The original scales are kept in "
                       f"{converters.SOURCE_SCALES} so that `quantize` gives back the same bytes.")  # fmt: skip
    _common(p)
    p.add_argument("--no-source-scales", action="store_true", help=f"do not write {converters.SOURCE_SCALES}")
    p.set_defaults(make=lambda a: converters.dequantize(a.input_dir, a.output_dir, not a.no_source_scales))

    p = sub.add_parser("quantize", help="bf16 -> FP8 / FP4 with the official rounding",
                       description="bf16 -> FP8 e4m3 128x128 + FP4 e2m1 1x32 experts (or FP8 experts), ue8m0 scales, "
                       "round-to-nearest-even as the official kernels.")  # fmt: skip
    _common(p)
    p.add_argument("--expert-dtype", choices=("fp4", "fp8"), default="fp4")
    p.add_argument("--ignore-source-scales", action="store_true",
                   help=f"always use the official scale rule, even where {converters.SOURCE_SCALES} "
                   "would reproduce the original bytes")  # fmt: skip
    p.set_defaults(
        make=lambda a: converters.quantize(a.input_dir, a.output_dir, a.expert_dtype, not a.ignore_source_scales)
    )

    p = sub.add_parser("merge-lora", help="merge a PEFT LoRA adapter, then re-quantize",
                       description="W + scaling * B @ A per adapted linear (dequantized first, re-quantized after, "
                       "in the input's format); other tensors copied byte for byte.")  # fmt: skip
    _common(p)
    p.add_argument("--adapter", type=Path, required=True, metavar="DIR", help="PEFT adapter directory")
    p.set_defaults(make=lambda a: converters.merge_lora(a.input_dir, a.output_dir, a.adapter))

    p = sub.add_parser("from-native", help="native transformers 5.23 deepseek_v4 checkpoint -> released layout",
                       description="A checkpoint saved by transformers' native DeepseekV4ForCausalLM -> released bf16 "
                       "layout. Native has no MTP block, so neither has the output.")  # fmt: skip
    _common(p, shards=True)
    p.add_argument("--config", type=Path, help="released config.json to use instead of translating the native one")
    p.set_defaults(make=lambda a: converters.from_native(a.input_dir, a.output_dir, a.config, a.max_shard_size))
    convert.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    try:
        job = args.make(args)
        out = run_job(job, progress=not args.no_progress)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"output": str(out), "command": job.command, **job.summary}, default=str))
    return 0
