"""Conversion throughput and peak memory on a synthetic released-layout FP8/FP4 checkpoint (>= 2 GB).

The checkpoint is generated from the weight table (`conversion.table.build_plan`) with valid random FP8 / FP4 bytes
and power-of-two scales, in a temporary directory that is removed afterwards. Each conversion runs in its own
process (`transformers-deepseek convert ...`); its peak RSS is read from `getrusage(RUSAGE_CHILDREN)` and checked
against the issue's bound: 2 x the largest shard (input or output) + 500 MB.

    python bench/convert.py [--min-gb 2.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from transformers_deepseek import DeepseekV4Config
from transformers_deepseek.conversion.io import ShardWriter
from transformers_deepseek.conversion.table import ST_DTYPES, build_plan

FP8 = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
       "weight_block_size": [128, 128]}  # fmt: skip
SHARD = 512 * 1024**2


def bench_config(layers: int) -> DeepseekV4Config:
    return DeepseekV4Config(
        vocab_size=32768, hidden_size=2048, moe_intermediate_size=1024, num_hidden_layers=layers, num_hash_layers=1,
        num_attention_heads=16, head_dim=512, q_lora_rank=1024, o_groups=4, o_lora_rank=512, n_routed_experts=64,
        num_experts_per_tok=6, index_n_heads=16, index_head_dim=128, sliding_window=128,
        compress_ratios=[0] + [4, 128] * ((layers - 1) // 2) + [4] * ((layers - 1) % 2) + [0],
        expert_dtype="fp4", quantization_config=dict(FP8),
    )  # fmt: skip


def random_tensor(dtype: str, shape: tuple[int, ...], gen: torch.Generator, n_experts: int) -> torch.Tensor:
    if dtype == "F8_E4M3":
        b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        b = torch.where((b & 0x7F) == 0x7F, b - 1, b)  # no NaN codes
        return b.view(torch.float8_e4m3fn)
    if dtype == "F8_E8M0":
        return torch.randint(118, 125, shape, dtype=torch.uint8, generator=gen).view(torch.float8_e8m0fnu)
    if dtype == "I8":
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    if dtype == "I64":
        return torch.randint(0, n_experts, shape, dtype=torch.int64, generator=gen)
    return (torch.randn(shape, generator=gen) * 0.02).to(ST_DTYPES[dtype])


def write_checkpoint(root: Path, min_bytes: int) -> tuple[int, int]:
    layers = 2
    while build_plan(bench_config(layers)).total_bytes < min_bytes:
        layers += 1
    config = bench_config(layers)
    plan = build_plan(config)
    shards: list[list] = [[]]
    size = 0
    for e in plan.entries:
        if shards[-1] and size + e.nbytes > SHARD:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    largest = 0
    for i, entries in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        w = ShardWriter(root / name, [(e.name, e.dtype, e.shape) for e in entries])
        for e in entries:
            w.write(e.name, random_tensor(e.dtype, e.shape, gen, config.n_routed_experts))
            weight_map[e.name] = name
        w.close()
        largest = max(largest, (root / name).stat().st_size)
    index = {"metadata": {"total_size": plan.total_bytes}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = config.to_dict()
    cfg["architectures"] = ["DeepseekV4ForCausalLM"]
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    return plan.total_bytes, largest


_CHILD = (
    "import resource, sys\n"
    "from transformers_deepseek.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n"
)


def run(args: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes, the child's own getrusage) of one converter process."""
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, "convert", *args, "--no-progress"], check=True,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    wall = time.perf_counter() - t
    line = [x for x in proc.stderr.splitlines() if x.startswith("MAXRSS ")][-1]
    return wall, int(line.split()[1]) * 1024  # ru_maxrss is KiB on Linux


def du(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*.safetensors") if p.is_file()]
    return sum(p.stat().st_size for p in files), max(p.stat().st_size for p in files)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-gb", type=float, default=2.0)
    parser.add_argument("--keep", type=Path, help="keep the outputs in this directory instead of a temp dir")
    args = parser.parse_args()
    tmp = Path(args.keep or tempfile.mkdtemp(prefix="tdseek-bench-convert-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        src = tmp / "released"
        src.mkdir()
        t = time.perf_counter()
        total, largest_in = write_checkpoint(src, int(args.min_gb * 1e9))
        print(f"synthetic released FP8/FP4 checkpoint: {total / 1e9:.2f} GB of tensors, largest shard "
              f"{largest_in / 1e6:.0f} MB, written in {time.perf_counter() - t:.1f}s")  # fmt: skip
        jobs = [
            ("fp4-to-fp8", [str(src), str(tmp / "fp8")], tmp / "fp8"),
            ("to-inference --model-parallel 2", [str(src), str(tmp / "mp2"), "--model-parallel", "2"], tmp / "mp2"),
            ("dequantize", [str(src), str(tmp / "bf16")], tmp / "bf16"),
        ]
        ok = True
        for label, argv, out in jobs:
            wall, peak = run([label.split()[0], *argv])
            out_bytes, largest_out = du(out)
            bound = 2 * max(largest_in, largest_out) + 500 * 1024**2
            ok &= peak <= bound
            verdict = "ok" if peak <= bound else "OVER"
            print(
                f"{label:32s} {wall:6.1f}s  read {total / wall / 1e6:7.1f} MB/s  write {out_bytes / wall / 1e6:7.1f} "
                f"MB/s  peak RSS {peak / 1e6:6.0f} MB  bound {bound / 1e6:6.0f} MB  {verdict}"
            )
            if not args.keep:
                shutil.rmtree(out)
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
