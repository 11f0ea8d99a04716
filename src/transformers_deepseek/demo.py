"""Main job on an embedded default: build a tiny DeepSeek-V4 checkpoint in the released layout, load it through
``AutoModelForCausalLM`` like any Hub checkpoint, chat through the V4 chat template and generate a few tokens.

Run: ``python -m transformers_deepseek.demo [--out DIR] [--max-new-tokens N]``. The weights are random (the
point is the plumbing: released tensor names, Auto registration, chat template, generate), so the text is noise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

# Tiny V4: the V4-Flash layer kinds (sliding window, CSA ratio 4 with indexer, HCA ratio 128) and an MTP block,
# at a size that loads in a second on a laptop CPU. The vocabulary is the real V4 tokenizer's.
TINY = dict(
    hidden_size=256, moe_intermediate_size=128, num_hidden_layers=4, num_hash_layers=1, num_attention_heads=4,
    head_dim=128, qk_rope_head_dim=64, q_lora_rank=128, o_groups=2, o_lora_rank=128, n_routed_experts=8,
    num_experts_per_tok=2, sliding_window=16, compress_ratios=[0, 4, 128, 4, 0], index_n_heads=4,
    index_head_dim=128, index_topk=8, max_position_embeddings=4096,
    rope_scaling={"type": "yarn", "factor": 16, "original_max_position_embeddings": 256, "beta_fast": 32,
                  "beta_slow": 1},
)  # fmt: skip


def build_tiny_checkpoint(out: Path, seed: int = 0) -> Path:
    """Write a random tiny V4 model + the V4 tokenizer (with chat template) to ``out``; returns ``out``."""
    from transformers import AutoModelForCausalLM

    from transformers_deepseek import DeepseekV4Config, DeepseekV4ForCausalLM
    from transformers_deepseek.tokenization import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    config = DeepseekV4Config(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TINY
    )
    torch.manual_seed(seed)
    # bf16 like the release; the parameters the official model keeps in fp32 are created in fp32 regardless.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    assert isinstance(model, DeepseekV4ForCausalLM)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the tiny checkpoint (default: a temp dir)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--prompt", default="Explain hyper-connections in one sentence.")
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    import transformers_deepseek  # noqa: F401  (registers deepseek_v4 with the Auto classes)

    with tempfile.TemporaryDirectory(prefix="tdseek-demo-") as tmp:
        out = args.out or Path(tmp) / "tiny-deepseek-v4"
        t0 = time.perf_counter()
        build_tiny_checkpoint(out)
        index = (
            json.loads((out / "model.safetensors.index.json").read_text())
            if (out / "model.safetensors.index.json").exists()
            else None
        )
        files = sorted(p.name for p in out.iterdir())
        print(f"[1/3] built a random tiny DeepSeek-V4 checkpoint in {out} ({time.perf_counter() - t0:.1f}s)")
        print(f"      files: {', '.join(files)}")
        if index:
            print(f"      {len(index['weight_map'])} tensors")

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        tokenizer = AutoTokenizer.from_pretrained(out)
        n_params = sum(p.numel() for p in model.parameters())
        kinds = ["SWA" if r == 0 else ("CSA" if r == 4 else f"HCA/{r}") for r in model.config.compress_ratios[:-1]]
        print(
            f"[2/3] AutoModelForCausalLM -> {type(model).__module__}.{type(model).__name__} "
            f"({n_params / 1e6:.1f}M params, layers {kinds} + {len(model.mtp)} MTP; {time.perf_counter() - t0:.1f}s)"
        )

        messages = [{"role": "user", "content": args.prompt}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, thinking=False)
        inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        print(f"[3/3] chat prompt ({inputs.input_ids.shape[1]} tokens): {prompt!r}")
        print("      generated: ", end="", flush=True)
        t0 = time.perf_counter()
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                streamer=TextStreamer(tokenizer, skip_prompt=True), pad_token_id=tokenizer.eos_token_id,
            )  # fmt: skip
        new = output.shape[1] - inputs.input_ids.shape[1]
        dt = time.perf_counter() - t0
        print(f"      {new} new tokens in {dt:.2f}s ({new / dt:.1f} tok/s); random weights, so the text is noise.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
