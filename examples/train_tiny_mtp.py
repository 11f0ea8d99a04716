"""Train a tiny DeepSeek-V4 (main model + MTP head, jointly) on real English text on CPU, then measure MTP
speculative decoding: acceptance rate and main-model forward passes per generated token.

Run: ``python examples/train_tiny_mtp.py [--steps 400] [--out DIR]`` (about 10 minutes on 2 busy CPU cores; not run
by the tests). Text: docstrings of the Python standard library (offline, English). Tokens: the real V4 tokenizer;
to keep the 129k-row embedding and head affordable on CPU, the model's vocabulary is the ``--vocab`` most
frequent tokens of the corpus (ids remapped densely; the rest share one "other" id).

Loss: next-token CE of the main model + ``--mtp-weight`` x CE of the MTP logits, which predict token ``t + 2`` from
the main model's final streams at ``t`` and the embedding of token ``t + 1`` (SPEC §4 MTPBlock).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from transformers_deepseek import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers_deepseek.demo import TINY, stdlib_docstrings
from transformers_deepseek.tokenization import load_default_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mtp-weight", type=float, default=1.0)
    parser.add_argument("--chars", type=int, default=3_000_000)
    parser.add_argument("--eval-prompts", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    # One thread: on a shared 2-core box, 2 threads per process ran ~30x slower (oversubscription spin-waits).
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the trained model here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    tokenizer = load_default_tokenizer()
    text = "\n\n".join(doc for _, doc in stdlib_docstrings(args.chars))
    raw = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = [tok for tok, _ in Counter(raw).most_common(args.vocab - 1)]
    to_model = {tok: i for i, tok in enumerate(keep)}
    other = len(keep)  # every rarer token
    ids = torch.tensor([to_model.get(t, other) for t in raw])
    coverage = float((ids != other).float().mean())
    split = int(len(ids) * 0.95)
    train, held = ids[:split], ids[split:]
    print(f"corpus: {len(text) / 1e6:.1f}M chars, {len(ids) / 1e3:.0f}k tokens, vocab {args.vocab} "
          f"(covers {coverage:.1%} of tokens), {time.perf_counter() - t0:.0f}s")  # fmt: skip

    config = DeepseekV4Config(vocab_size=args.vocab, bos_token_id=None, eos_token_id=None, **TINY)
    model = DeepseekV4ForCausalLM(config).float().train()  # fp32 master weights for training
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))
    )
    t0 = time.perf_counter()
    for step in range(args.steps):
        start = torch.randint(0, len(train) - args.seq - 1, (args.batch,))
        batch = torch.stack([train[s : s + args.seq] for s in start.tolist()])
        out = model(batch, use_cache=False)
        # The "other" id is an input, never a target: the model should not learn to emit it.
        main_loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), ignore_index=other)
        # MTP at position t: streams at t + embedding of token t+1 -> token t+2.
        mtp = model.mtp_logits(out.streams[:, :-2], batch[:, 1:-1])
        mtp_loss = F.cross_entropy(mtp.flatten(0, 1), batch[:, 2:].flatten(), ignore_index=other)
        loss = main_loss + args.mtp_weight * mtp_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  main CE {main_loss.item():.3f}  MTP CE {mtp_loss.item():.3f}  "
                  f"{(time.perf_counter() - t0) / (step + 1):.2f}s/step", flush=True)  # fmt: skip

    # Inference as released: saved, then reloaded in bf16 (the parameters the official model keeps in fp32 stay fp32).
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(args.out or tmp)
        model = DeepseekV4ForCausalLM.from_pretrained(args.out or tmp, dtype=torch.bfloat16).eval()
    stride = len(held) // args.eval_prompts
    prompts = torch.stack([held[i * stride : i * stride + 64] for i in range(args.eval_prompts)])
    results = {}
    with torch.no_grad():
        held_out = held[: 64 * 32].view(32, 64)
        out = model(held_out, use_cache=False)
        main_ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), held_out[:, 1:].flatten(), ignore_index=other)
        results["held_out_main_ce"] = main_ce.item()
        mtp = model.mtp_logits(out.streams[:, :-2], held_out[:, 1:-1])
        mtp_ce = F.cross_entropy(mtp.flatten(0, 1), held_out[:, 2:].flatten(), ignore_index=other)
        results["held_out_mtp_ce"] = mtp_ce.item()
        # On held-out text (true context): how often the MTP draft is the main model's greedy token, and the
        # expected speculative-sampling acceptance sum_x min(p(x), q(x)) = 1 - TV(p, q).
        p, q = out.logits[:, 1:-1].softmax(-1), mtp.softmax(-1)
        results["held_out_top1_agreement"] = (p.argmax(-1) == q.argmax(-1)).float().mean().item()
        results["held_out_expected_sampling_acceptance"] = torch.minimum(p, q).sum(-1).mean().item()
        kw = {"max_new_tokens": args.new_tokens, "suppress_tokens": [other]}
        plain = model.generate(prompts, do_sample=False, **kw)
        for mode, kwargs in (("greedy", {"do_sample": False}), ("sampling T=1", {"do_sample": True})):
            torch.manual_seed(args.seed)
            for batch_rows in (1,):  # per-row figures; a batch advances at the pace of its slowest row
                drafted = accepted = forwards = new = 0
                seqs = []
                for chunk in prompts.split(batch_rows):
                    res = model.generate(chunk, use_mtp=True, return_dict_in_generate=True, **kw, **kwargs)
                    drafted, accepted = drafted + res.num_drafted, accepted + res.num_accepted
                    forwards += res.num_main_forwards
                    new += float(res.num_new_tokens.float().mean())  # per row
                    seqs.append(res.sequences)
                key = f"{mode}, batch {batch_rows}"
                results[key] = {
                    "acceptance_rate": round(accepted / max(1, drafted), 4),
                    "main_forwards_per_token": round(forwards / new, 4),
                }
                if mode == "greedy":
                    same = (torch.cat(seqs) == plain).all(1)
                    results[key]["rows_identical_to_plain_greedy"] = f"{int(same.sum())}/{len(same)}"
    inverse = {i: t for t, i in to_model.items()}
    for row in plain[:2]:
        print("greedy continuation:", repr(tokenizer.decode([inverse.get(int(t), 0) for t in row[64:]])))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
