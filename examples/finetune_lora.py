"""LoRA fine-tuning of a tiny DeepSeek-V4 with the unchanged transformers ``Trainer`` and PEFT, on chat-formatted
English text available offline, with the loss on assistant tokens only; then adapter save -> reload, merge into the
released layout with ``transformers-deepseek convert merge-lora``, and the merged export loaded back.

Run: ``python examples/finetune_lora.py [--base CKPT] [--steps 200] [--out DIR]`` (a few minutes on 2 CPU cores;
not run by the tests).

Data: one conversation per standard-library function, ``user: "Write the docstring of `module.name(signature)`."``
-> ``assistant: <its docstring>``, rendered by the V4 chat template (``thinking=False``); 5 % of the modules are
held out. Tokens: the real V4 tokenizer; to keep the 129k-row embedding and head affordable on CPU, the model's
vocabulary is the ``vocab_size`` (of ``--base``) most frequent tokens of the rendered corpus, ids remapped densely
(special tokens included), every rarer token mapped to one "other" id that is never a target.

Base: ``--base`` = a bf16 released-layout checkpoint (default: the tiny-bf16 golden fixture, random weights, vocab
1024), or ``--random`` for a random tiny model (``demo.TINY`` with a 1024-token vocabulary). Trained: LoRA (rank
``--rank``) on the attention projections including the grouped ``wo_a``, the shared expert and every routed expert;
everything else is frozen (embedding, head, norms, routers, mHC mixers). The router biases are moved by the
auxiliary-loss-free balancing callback only with ``--gamma > 0`` (buffers, not trained by the optimizer, and not
part of the adapter); by default the callback only logs the expert loads.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from transformers_deepseek import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers_deepseek.demo import TINY, stdlib_modules
from transformers_deepseek.quantization.quantizer import released_dtype_overrides
from transformers_deepseek.tokenization import load_default_tokenizer
from transformers_deepseek.training import (
    DataCollatorForChat,
    ExpertBalancingCallback,
    load_adapter,
    lora_config,
    prepare_chat_example,
)

DEFAULT_BASE = Path(os.environ.get("TDSEEK_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
DEFAULT_BASE = DEFAULT_BASE / "tiny-bf16" / "checkpoint"


def docstring_chats(max_modules: int | None = None) -> list[tuple[str, list[dict[str, str]]]]:
    """``(module, conversation)`` per documented public function / method of the standard library."""
    out = []
    for module, tree in stdlib_modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                doc = ast.get_docstring(node)
                if doc and 40 <= len(doc) <= 600:
                    sig = ", ".join(a.arg for a in node.args.args)
                    question = f"Write the docstring of `{module}.{node.name}({sig})`."
                    out.append(
                        (module, [{"role": "user", "content": question}, {"role": "assistant", "content": doc}])
                    )
        if max_modules is not None and len({m for m, _ in out}) >= max_modules:
            break
    return out


class Remap:
    """Dense model ids for the ``size - 1`` most frequent tokenizer ids; the rest share the last id ("other")."""

    def __init__(self, examples: list[dict[str, list[int]]], size: int) -> None:
        counts = Counter(t for ex in examples for t in ex["input_ids"])
        self.keep = {tok: i for i, (tok, _) in enumerate(counts.most_common(size - 1))}
        self.other = size - 1
        total = sum(counts.values())
        self.coverage = sum(c for t, c in counts.items() if t in self.keep) / total

    def __call__(self, ex: dict[str, list[int]]) -> dict[str, list[int]]:
        ids = [self.keep.get(t, self.other) for t in ex["input_ids"]]
        # The "other" id is an input, never a target.
        labels = [-100 if lab == -100 or i == self.other else i for i, lab in zip(ids, ex["labels"], strict=True)]
        return {"input_ids": ids, "attention_mask": ex["attention_mask"], "labels": labels}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE, help="bf16 released-layout checkpoint")
    parser.add_argument("--random", action="store_true", help="random tiny base (demo.TINY, vocab 1024) instead")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    # Router biases are buffers outside the adapter: with gamma > 0 the merged export would need them written too.
    parser.add_argument("--gamma", type=float, default=0.0, help="balancing bias update speed (0: only log loads)")
    parser.add_argument("--eval-every", type=int, default=20)
    parser.add_argument("--eval-examples", type=int, default=96)
    parser.add_argument("--modules", type=int, default=400, help="stdlib modules read (corpus size)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep adapter, merged export and curve here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    t0 = time.perf_counter()
    tokenizer = load_default_tokenizer()
    chats = docstring_chats(args.modules)
    modules = sorted({m for m, _ in chats})
    random.Random(args.seed).shuffle(modules)
    held_modules = set(modules[: max(1, len(modules) // 20)])
    examples = [(m, prepare_chat_example(tokenizer, c, args.max_length, thinking=False)) for m, c in chats]
    base_dir = None if args.random else args.base
    vocab = DeepseekV4Config.from_pretrained(base_dir).vocab_size if base_dir else 1024
    remap = Remap([ex for m, ex in examples if m not in held_modules], vocab)
    train = [remap(ex) for m, ex in examples if m not in held_modules]
    held = [remap(ex) for m, ex in examples if m in held_modules][: args.eval_examples]
    n_targets = sum(sum(lab != -100 for lab in ex["labels"]) for ex in train)
    print(f"data: {len(train)} train / {len(held)} held-out conversations ({len(held_modules)} held-out modules), "
          f"{n_targets / 1e3:.0f}k assistant target tokens; vocab {vocab} covers {remap.coverage:.1%} of tokens; "
          f"{time.perf_counter() - t0:.0f}s")  # fmt: skip

    torch.manual_seed(args.seed)
    if base_dir is None:
        config = DeepseekV4Config(vocab_size=vocab, bos_token_id=None, eos_token_id=None, **TINY)
        # bf16 like the release; the parameters the official model keeps in fp32 are created in fp32 regardless.
        base = DeepseekV4ForCausalLM._from_config(config, dtype=torch.bfloat16)
        base_dir = Path(tempfile.mkdtemp(prefix="tdseek-base-"))
        # Released on-disk dtypes: the norms / compressor projections / head the model holds in fp32 are bf16 on disk.
        overrides = released_dtype_overrides(base)
        state = {k: v.to(overrides.get(k, v.dtype)) for k, v in base.state_dict().items()}
        base.save_pretrained(base_dir, state_dict=state)
    model = DeepseekV4ForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    model.config.use_cache = False
    peft_model = get_peft_model(model, lora_config(r=args.rank, lora_alpha=2 * args.rank))
    peft_model.print_trainable_parameters()

    work = args.out or Path(tempfile.mkdtemp(prefix="tdseek-lora-"))
    balancing = ExpertBalancingCallback(gamma=args.gamma)
    training_args = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        per_device_eval_batch_size=16, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=args.steps // 20,
        weight_decay=0.0, logging_steps=args.eval_every, eval_strategy="steps", eval_steps=args.eval_every,
        save_strategy="no", use_cpu=True, report_to=[], seed=args.seed, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=True, prediction_loss_only=True,
    )  # fmt: skip
    trainer = Trainer(
        model=peft_model, args=training_args, train_dataset=train, eval_dataset=held,
        data_collator=DataCollatorForChat(pad_token_id=remap.other), callbacks=[balancing],
    )  # fmt: skip
    t0 = time.perf_counter()
    before = trainer.evaluate()["eval_loss"]
    curve = [(0, before)]
    print(f"step    0  held-out loss {before:.4f}", flush=True)
    trainer.train()
    elapsed = time.perf_counter() - t0
    train_loss = {r["step"]: r["loss"] for r in trainer.state.log_history if "loss" in r}
    for record in trainer.state.log_history:
        if "eval_loss" in record:
            curve.append((record["step"], record["eval_loss"]))
            moe = {k: v for k, v in record.items() if k == "moe/max_mean_load"}
            print(f"step {record['step']:4d}  held-out loss {record['eval_loss']:.4f}"
                  f"  train loss {train_loss.get(record['step'], float('nan')):.4f}  {moe}", flush=True)  # fmt: skip
    for record in trainer.state.log_history:
        if "moe/max_mean_load" in record:
            last_moe = {k: v for k, v in record.items() if k.startswith("moe/")}
    after = curve[-1][1]
    drop = 1 - after / before
    print(f"held-out loss {before:.4f} -> {after:.4f} ({drop:.1%} lower) in {args.steps} steps, {elapsed:.0f}s "
          f"({elapsed / args.steps:.2f}s/step)")  # fmt: skip
    print(f"last MoE log: {last_moe}")

    # Adapter save -> reload: identical logits.
    peft_model.eval()
    probe = DataCollatorForChat(remap.other)(held[:4])
    with torch.no_grad():
        tuned = peft_model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    peft_model.save_pretrained(work / "adapter")
    fresh = DeepseekV4ForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16)
    # The router biases are part of the fine-tuned model (buffers moved by the balancing callback), not of the adapter.
    for layer, gate in balancing.gates.items():
        if gate.bias is not None:
            fresh.layers[layer].ffn.gate.bias.copy_(gate.bias)
    reloaded = load_adapter(fresh, work / "adapter").eval()
    with torch.no_grad():
        again = reloaded(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    print(f"adapter save -> load: logits identical = {torch.equal(tuned, again)}")

    # Merge into the released layout with the converter and load the export back.
    merged = work / "merged"
    cmd = [sys.executable, "-m", "transformers_deepseek.cli", "convert", "merge-lora", str(base_dir), str(merged),
           "--adapter", str(work / "adapter"), "--no-progress"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True)
    exported = DeepseekV4ForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval()
    for layer, gate in balancing.gates.items():
        if gate.bias is not None:
            exported.layers[layer].ffn.gate.bias.copy_(gate.bias)
    with torch.no_grad():
        ex_logits = exported(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits
    mask = probe["attention_mask"].bool()
    rel = float((ex_logits[mask] - tuned[mask]).norm() / tuned[mask].norm())
    print(f"merged export (bf16) vs adapter model: logits rel-L2 {rel:.2e}")
    from transformers_deepseek import has_native_deepseek_v4

    if has_native_deepseek_v4():
        from transformers.models.deepseek_v4 import DeepseekV4ForCausalLM as NativeDeepseekV4

        native = NativeDeepseekV4.from_pretrained(merged, dtype=torch.bfloat16).eval()
        with torch.no_grad():
            nat = native(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()
        rel_native = float((nat[mask] - ex_logits[mask]).norm() / ex_logits[mask].norm())
        print(f"merged export in native transformers vs in transformers_deepseek: logits rel-L2 {rel_native:.2e}")
    if args.out:
        (work / "curve.json").write_text(json.dumps({"held_out": curve, "train": sorted(train_loss.items())}) + "\n")
    ok = drop >= 0.2 and math.isfinite(after)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
