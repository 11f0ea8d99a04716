"""Resident memory after loading a released-layout quantized checkpoint: ours vs native transformers (issue 4).

Generates a synthetic DeepSeek-V4 checkpoint in the released layout (FP8 e4m3 linears + ue8m0 128x128 scales, routed
experts FP4 e2m1 packed in int8 + ue8m0 1x32 scales, bf16 / fp32 / int64 tensors as in SPEC §3; random but valid
values) of at least ``--min-gb`` on disk in a temporary directory, then loads it in two fresh subprocesses:

- ours: ``import transformers_deepseek`` + ``AutoModelForCausalLM.from_pretrained`` (packed weights stay packed);
- native: transformers' own ``deepseek_v4`` (>= 5.8) without importing our package; on CPU its FP8 quantizer
  dequantizes everything to bf16.

Reports peak RSS (``ru_maxrss``), RSS right after loading and after reading every tensor once (tensors of either
implementation may still be backed by lazily paged shard mmaps right after loading), with their anonymous parts,
side by side, and each as a ratio to the checkpoint's bytes on disk: raw, and minus the RSS of the process right
before ``from_pretrained`` (Python + torch + transformers, ~0.3 GiB, independent of the checkpoint). The issue-4 bound
is 1.15x.

Then the full-size V4-Flash and V4-Pro configs are built on the meta device with our quantized modules, through the
quantizer's own hooks (``quantization.footprint``): the bytes their parameters and buffers would occupy, the released
checkpoint size (on-disk bytes of every tensor of the weight table, SPEC §3) and native transformers' bf16 size.

Usage: ``python bench/memory.py [--min-gb 2.0] [--keep DIR | --checkpoint DIR] [--skip-native] [--skip-meta]
[--meta-only]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD_BYTES = 400 * 2**20
MAX_RATIO = 1.15  # issue 4: bytes resident / in memory <= 1.15x the checkpoint's bytes on disk

# A mid-size V4 (Flash layout, smaller dims) whose FP4 experts dominate the checkpoint as in the release (91% of its
# bytes). 4.2 GB on disk: the process's fixed import cost (~0.33 GiB of Python, torch and transformers) then weighs 8%
# of the checkpoint, still far more than the ~0.2% it weighs next to V4-Flash's 160 GB.
SYNTHETIC = {
    "vocab_size": 8192,
    "hidden_size": 2048,
    "moe_intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_hash_layers": 2,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 16,
    "head_dim": 512,
    "q_lora_rank": 512,
    "o_groups": 4,
    "o_lora_rank": 512,
    "n_routed_experts": 128,
    "num_experts_per_tok": 6,
    "index_n_heads": 16,
    "index_topk": 512,
    "sliding_window": 128,
    "compress_ratios": [0, 0, 4, 128, 4, 128, 4, 128, 0],
    "max_position_embeddings": 65536,
}


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint generation
# ---------------------------------------------------------------------------------------------------------------------
def released_config(template: Path, overrides: dict) -> dict:
    cfg = json.loads(template.read_text())
    cfg.update(overrides)
    cfg["rope_scaling"] = {
        "beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 4096, "type": "yarn",
    }  # fmt: skip
    return cfg


def tensor_plan(cfg: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Released name -> (kind, shape) for every tensor, derived from our model built on the meta device."""
    import torch

    from transformers_deepseek import DeepseekV4Config, DeepseekV4ForCausalLM
    from transformers_deepseek.quantization.quantizer import (
        expected_tensors,
        quantized_linears,
        released_dtype_overrides,
    )

    config = DeepseekV4Config(**{k: v for k, v in cfg.items() if k not in ("model_type", "quantization_config")})
    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config)
    layout = quantized_linears(model, "fp4")
    plan: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, kind in layout.items():
        for part, (dtype, shape) in expected_tensors(kind, model.get_submodule(name), (128, 128)).items():
            plan[f"{name}.{part}"] = (dtype, shape)
    overrides = released_dtype_overrides(model)
    names = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for key, t in names.items():
        if key.rpartition(".")[0] in layout:
            continue
        dtype = overrides.get(key, t.dtype)
        plan[key] = ({torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}[dtype], tuple(t.shape))
    return plan


def random_tensor(name: str, kind: str, shape: tuple[int, ...], n_experts: int, gen):
    import torch

    if kind == "F8_E4M3":
        b = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
        b[(b & 0x7F) == 0x7F] = 0x38  # no NaN codes; 0x38 = 1.0
        return b.view(torch.float8_e4m3fn)
    if kind == "F8_E8M0":  # power-of-two scales 2^-9 .. 2^-3
        return torch.randint(118, 125, shape, dtype=torch.uint8, generator=gen).view(torch.float8_e8m0fnu)
    if kind == "I8":  # any byte is a valid e2m1 pair
        return torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    if kind == "I64":  # tid2eid: expert ids
        return torch.randint(0, n_experts, shape, dtype=torch.int64, generator=gen)
    dtype = torch.bfloat16 if kind == "BF16" else torch.float32
    if name.endswith("norm.weight") or name.endswith("_scale"):
        return torch.ones(shape, dtype=dtype)
    return (torch.randn(shape, generator=gen) * 0.02).to(dtype)


def write_checkpoint(out: Path, min_bytes: int, template: Path) -> int:
    """Write config.json + sharded safetensors + index; returns the bytes of tensor data on disk."""
    import torch
    from safetensors.torch import save_file

    cfg = released_config(template, SYNTHETIC)
    plan = tensor_plan(cfg)
    elem = {"F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "BF16": 2, "F32": 4, "I64": 8}
    total = sum(elem[k] * _numel(s) for k, s in plan.values())
    if total < min_bytes:
        raise ValueError(f"synthetic checkpoint is {total / 1e9:.2f} GB, below --min-gb {min_bytes / 1e9:.2f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = torch.Generator().manual_seed(0)
    shards: list[list[str]] = [[]]
    size = 0
    for key, (kind, shape) in plan.items():
        nbytes = elem[kind] * _numel(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes
    weight_map = {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: random_tensor(k, *plan[k], cfg["n_routed_experts"], gen) for k in keys}
        save_file(tensors, str(out / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, fname))
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---------------------------------------------------------------------------------------------------------------------
# Measurement (each loader in its own process)
# ---------------------------------------------------------------------------------------------------------------------
_PROBE = r"""
import gc, json, os, resource, sys, time
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    kb = lambda k: int(fields[k].split()[0]) * 1024 if k in fields else 0
    return kb("VmRSS"), kb("RssAnon")
import torch, transformers
from transformers import AutoModelForCausalLM
which, path = sys.argv[1], sys.argv[2]
if which == "ours":
    import transformers_deepseek  # registers the config, the models and the quantizer
base, base_anon = rss()
t0 = time.time()
model = AutoModelForCausalLM.from_pretrained(path)
seconds = time.time() - t0
gc.collect()
after, anon = rss()
# Tensors may still be backed by the (lazily paged) shard mmaps: read every byte once, as a forward pass would.
with torch.no_grad():
    for t in [*model.parameters(), *model.buffers()]:
        t.detach().reshape(-1).view(torch.uint8).max()
gc.collect()
touched, touched_anon = rss()
params = sum(p.numel() * p.element_size() for p in model.parameters())
params += sum(b.numel() * b.element_size() for b in model.buffers())
print("RESULT " + json.dumps({
    "class": f"{type(model).__module__}.{type(model).__name__}",
    "quantizer": type(getattr(model, "hf_quantizer", None)).__name__,
    "ours_imported": "transformers_deepseek" in sys.modules,
    "transformers": transformers.__version__,
    "baseline_rss": base, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    "rss_after_load": after, "anon_after_load": anon,
    "rss_after_touch": touched, "anon_after_touch": touched_anon, "tensor_bytes": params, "seconds": seconds,
}))
"""


def measure(which: str, path: Path, python: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run(
        [python, "-c", _PROBE, which, str(path)], capture_output=True, text=True, env=env, timeout=900, check=False
    )
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-5:]}


def _gib(n: float) -> str:
    return f"{n / 2**30:8.2f} GiB"


def report(disk: int, results: dict[str, dict]) -> None:
    rows = [
        ("peak RSS (load + read all)", "peak_rss"),
        ("RSS after load", "rss_after_load"),
        ("  of which anonymous", "anon_after_load"),
        ("RSS after reading every tensor", "rss_after_touch"),
        ("  of which anonymous", "anon_after_touch"),
        ("RSS before load (imports)", "baseline_rss"),
        ("model tensors (params+buffers)", "tensor_bytes"),
    ]
    names = list(results)
    print(f"\ncheckpoint on disk: {_gib(disk)} ({disk / 1e9:.2f} GB)")
    print(f"{'':32s}" + "".join(f"{n:>14s}" for n in names) + ("   native/ours" if len(names) == 2 else ""))
    for label, key in rows:
        vals = [results[n].get(key) for n in names]
        line = f"{label:32s}" + "".join(f"{_gib(v) if v is not None else 'n/a':>14s}" for v in vals)
        if len(vals) == 2 and all(vals) and vals[0]:
            line += f"   {vals[1] / vals[0]:8.2f}x"
        print(line)
    print(f"{'load time':32s}" + "".join(f"{results[n].get('seconds', float('nan')):13.1f}s" for n in names))
    print(f"\nratio to the checkpoint on disk (issue 4 bound: our RSS after load <= {MAX_RATIO}x):")
    for label, key in (("RSS after load", "rss_after_load"), ("RSS after reading every tensor", "rss_after_touch")):
        for suffix, minus in (("", False), (" - RSS before load", True)):
            vals = []
            for n in names:
                r = results[n]
                if key not in r:
                    vals.append("n/a")
                    continue
                v = r[key] - (r["baseline_rss"] if minus else 0)
                vals.append(f"{v / disk:.3f}x")
            print(f"{label + suffix:48s}" + "".join(f"{v:>12s}" for v in vals))
    print(f"{'model tensors':48s}" + "".join(
        f"{results[n]['tensor_bytes'] / disk:11.3f}x" if "tensor_bytes" in results[n] else f"{'n/a':>12s}"
        for n in names))  # fmt: skip
    for n in names:
        r = results[n]
        if "error" in r:
            print(f"{n}: FAILED: {r['error']}")
        else:
            print(f"{n}: {r['class']} (quantizer {r['quantizer']}, transformers {r['transformers']}, "
                  f"transformers_deepseek imported: {r['ours_imported']})")  # fmt: skip


def report_meta() -> bool:
    """Full-size released models on the meta device: our bytes in memory vs the released checkpoint and native."""
    from transformers_deepseek.quantization.footprint import RELEASED_MODELS, meta_footprint, released_config

    print("\nfull-size models on the meta device (quantized modules swapped in by the quantizer's own hooks):")
    print(
        f"{'':10s}{'checkpoint':>22s}{'ours in memory':>18s}{'ours/ckpt':>11s}{'native bf16':>15s}{'native/ckpt':>13s}"
    )
    ok = True
    for name in RELEASED_MODELS:
        t0 = time.time()
        fp = meta_footprint(released_config(name))
        ratio = fp["ours"] / fp["checkpoint"]
        ok &= ratio <= MAX_RATIO
        print(
            f"{name:10s}{fp['checkpoint'] / 2**30:9.2f} GiB ({fp['checkpoint'] / 1e9:6.1f} GB)"
            f"{_gib(fp['ours']):>18s}{ratio:10.3f}x{_gib(fp['native_bf16']):>15s}"
            f"{fp['native_bf16'] / fp['checkpoint']:12.2f}x   ({time.time() - t0:.0f}s)"
        )
    return ok


def measure_and_report(checkpoint: Path, args: argparse.Namespace) -> int:
    on_disk = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors"))
    print(f"checkpoint {checkpoint}: {on_disk / 1e9:.2f} GB of shards")
    results = {"ours": measure("ours", checkpoint, args.python)}
    if not args.skip_native:
        results["native"] = measure("native", checkpoint, args.python)
        if results["native"].get("ours_imported"):
            results["native"] = {"error": ["native run imported transformers_deepseek"]}
    report(on_disk, results)
    ok = all("error" not in r for r in results.values())
    if not args.skip_meta:
        ok &= report_meta()
    return 0 if ok else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-gb", type=float, default=2.0, help="minimum checkpoint size on disk (GB, 1e9 bytes)")
    parser.add_argument("--keep", type=Path, help="write the checkpoint here and keep it (default: temp dir, removed)")
    parser.add_argument("--checkpoint", type=Path, help="measure this existing released-layout checkpoint instead")
    parser.add_argument("--skip-native", action="store_true")
    parser.add_argument("--skip-meta", action="store_true", help="skip the full-size meta-device footprints")
    parser.add_argument("--meta-only", action="store_true", help="only the full-size meta-device footprints")
    parser.add_argument("--python", default=sys.executable, help="interpreter for the loader subprocesses")
    args = parser.parse_args()

    if args.meta_only:
        return 0 if report_meta() else 1
    if args.checkpoint is not None:
        return measure_and_report(args.checkpoint, args)
    repo = Path(__file__).resolve().parents[1]
    template = repo.parent / "shared" / "fixtures" / "tiny-fp8-fp4" / "checkpoint" / "config.json"
    free = shutil.disk_usage(args.keep.parent if args.keep else tempfile.gettempdir()).free
    if free < 3 * args.min_gb * 1e9:
        print(f"not enough free disk: {free / 1e9:.1f} GB for a {args.min_gb} GB checkpoint", file=sys.stderr)
        return 1
    tmp = None
    out = args.keep or Path(tmp := tempfile.mkdtemp(prefix="tdseek-memory-")) / "checkpoint"
    try:
        t0 = time.time()
        disk = write_checkpoint(out, int(args.min_gb * 1e9), template)
        print(f"generated {out} in {time.time() - t0:.0f}s: {disk / 1e9:.2f} GB of tensor data")
        return measure_and_report(out, args)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
