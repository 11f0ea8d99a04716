"""Per-layer teacher-forced parity with the official model, ours vs transformers' native deepseek_v4, per fixture.

Prints, for every golden fixture, the relative L2 of each teacher-forced layer (and the MTP block, and the
end-to-end prefill logits) against the official outputs, next to the fixture's noise floor, for our
implementation and, when the installed transformers has one (>= 5.8), the native implementation.

Usage: python bench/parity.py [--fixtures DIR] [--only tiny-bf16 ...]
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch


class _Stop(Exception):
    pass


def native_layer_runner():
    """``call_layer`` / ``embed`` for transformers' native model: run its full forward, substitute the input of
    layer L with the given streams (a pre-hook), capture the layer's output and stop."""

    def call_layer(model, idx, streams, positions, ids):
        layer = model.model.layers[idx]
        captured = {}

        def pre(module, args, kwargs):
            return (streams.to(args[0].dtype), *args[1:]), kwargs

        def post(module, args, kwargs, output):
            captured["out"] = output
            raise _Stop

        handles = [layer.register_forward_pre_hook(pre, with_kwargs=True),
                   layer.register_forward_hook(post, with_kwargs=True)]  # fmt: skip
        try:
            model(ids)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return captured["out"]

    def embed(model, ids):
        return model.model.embed_tokens(ids).unsqueeze(2).repeat(1, 1, model.config.hc_mult, 1)

    return call_layer, embed


def load_native(ckpt: Path, quantized: bool):
    from transformers import FineGrainedFP8Config
    from transformers.models.deepseek_v4 import DeepseekV4ForCausalLM as Native

    kwargs = {"quantization_config": FineGrainedFP8Config(dequantize=True)} if quantized else {}
    return Native.from_pretrained(ckpt, **kwargs).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = os.environ.get("TDSEEK_FIXTURES") or Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
    parser.add_argument("--fixtures", type=Path, default=Path(default))
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args(argv)

    import transformers

    import transformers_deepseek
    from transformers_deepseek import DeepseekV4ForCausalLM
    from transformers_deepseek.parity import checkpoint_dir, end_to_end, load_golden, teacher_forced

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    native = transformers_deepseek.has_native_deepseek_v4()
    print(f"transformers {transformers.__version__}; native deepseek_v4: {'yes' if native else 'no'}")
    names = args.only or sorted(p.name for p in args.fixtures.iterdir() if (p / "golden.safetensors").exists())
    for name in names:
        golden = load_golden(args.fixtures / name)
        quantized = "quantization_config" in (golden.root / "checkpoint" / "config.json").read_text()
        print(f"\n== {name} ({'FP8/FP4' if quantized else 'bf16'} checkpoint)")
        with checkpoint_dir(golden.root) as ckpt, torch.no_grad():
            ours = DeepseekV4ForCausalLM.from_pretrained(ckpt).eval()
            report = end_to_end(ours, golden, teacher_forced(ours, golden))
            del ours
            lines = report.lines("ours")
            if native:
                call_layer, embed = native_layer_runner()
                try:
                    model = load_native(ckpt, quantized)
                except Exception as err:  # e.g. ratio 16: native maps compress ratios through {0, 4, 128} (SPEC §9.14)
                    print("\n".join(lines))
                    print(f"{name:14s} native cannot load this checkpoint: {type(err).__name__}: {err}")
                    continue
                nat = end_to_end(model, golden, teacher_forced(model, golden, call_layer=call_layer, embed=embed))
                del model
                nat_lines = nat.lines("native")
                if "mtp (logits)" in report.layers:
                    nat_lines.insert(len(nat.layers), f"{name:14s} {'mtp (logits)':22s} native not available: "
                                                      "native transformers drops the MTP weights")  # fmt: skip
                lines = [x for pair in itertools.zip_longest(lines, nat_lines, fillvalue="") for x in pair if x]
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
