"""Main job: chat with a tiny DeepSeek-V4 that this package trains on real English text, on CPU, offline.

Run: ``python -m transformers_deepseek.demo [--prompt TEXT] [--retrain] [--max-new-tokens N]``.

First run (a few minutes on 2 cores; progress printed): builds a chat corpus from the docstrings of the Python
standard library (question: "What does <name> do?", answer: the docstring), trains a 2-layer V4 (a CSA layer with
its lightning indexer and a ratio-128 HCA layer, hash-routed and score-routed MoE, mHC) on it, and writes it in the
released layout (FP8 128x128 dense weights + FP4 experts, ``model.safetensors.index.json``, config, V4 tokenizer with
the chat template, generation config) under ``$TDSEEK_CACHE`` (default ``~/.cache/transformers_deepseek``). Later
runs load that directory in seconds. Then: ``AutoModelForCausalLM.from_pretrained``, the prompt through the V4 chat
template, tokens streamed as ``generate`` produces them with the compressed :class:`DeepseekV4Cache`, and the
cache's memory.

Vocabulary: the tokenizer is the real V4 one (129,280 ids) and so is the model's vocabulary. Training a 129k-way
softmax on CPU costs ~1.5 s per batch, so training runs on the ``--vocab`` most frequent corpus tokens plus one
"rare" class that stands for all the others, and the exported model gives every rare token that class's embedding,
head row and hash route. Adding ``log(number of rare tokens)`` to the rare class's logit in the training loss makes
it the exact full-vocabulary cross-entropy of the exported model (up to a constant on rare targets): the softmax
over 129,280 ids of the exported model is the trained one (tests check the weights are the trained rows bit for bit
and the logits agree up to fp32 GEMM rounding).
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
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

# The demo model: TINY cut to what trains in minutes on 2 cores (~900 tokens/s per thread): layer 0 CSA (ratio 4,
# indexer, hash-routed MoE), layer 1 HCA (ratio 128, score-routed MoE), no MTP block.
DEMO = dict(TINY, num_hidden_layers=2, compress_ratios=[4, 128], num_nextn_predict_layers=0, n_routed_experts=4)

CACHE_ENV = "TDSEEK_CACHE"
DEFAULT_PROMPT = "What does the open function do?"
_MARKER = "demo_training.json"  # written last: its presence marks a complete cached model


def cache_root() -> Path:
    """``$TDSEEK_CACHE``, else ``~/.cache/transformers_deepseek``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "transformers_deepseek"


# ---------------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------------
def stdlib_modules() -> Iterator[tuple[str, ast.Module]]:
    """``(dotted path, parsed source)`` of the standard library's modules in a fixed order: real English text that
    every Python install has offline (tests, idlelib, lib2to3 and site-packages left out; ``pkg.__init__`` kept as
    such)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        if any(p in path.parts for p in ("test", "tests", "idlelib", "lib2to3", "site-packages")):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        yield ".".join(path.relative_to(root).with_suffix("").parts), tree


def stdlib_docstrings(limit_chars: int) -> list[tuple[str, str]]:
    """``(qualified name, docstring)`` of standard-library modules, classes and functions with a docstring of more
    than 200 characters, in a fixed order, until ``limit_chars`` characters."""
    out, total = [], 0
    for dotted, tree in stdlib_modules():
        module = dotted.removesuffix(".__init__")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    name = module if isinstance(node, ast.Module) else f"{module}.{node.name}"
                    out.append((name, doc))
                    total += len(doc)
        if total >= limit_chars:
            break
    return out


def _prose(doc: str, max_chars: int = 600) -> str:
    """The prose paragraphs of a docstring (no doctest or indented code), lines joined, cut at a sentence end."""
    paragraphs = []
    for para in re.split(r"\n\s*\n", doc):
        lines = para.splitlines()
        if not lines or any(line.lstrip().startswith(">>>") or line.startswith((" ", "\t")) for line in lines):
            continue
        paragraphs.append(" ".join(line.strip() for line in lines))
    text = "\n\n".join(paragraphs)
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut[: cut.rfind(". ") + 1] if ". " in cut else cut
    return text.strip()


_QUESTIONS = ("What does {} do?", "Explain {}.", "Tell me about {}.", "How do I use {}?", "What is {} for?")


def chat_corpus(tokenizer, limit_chars: int, seed: int = 0) -> list[str]:
    """Conversations rendered with the V4 chat template: a question about a stdlib object, its docstring as the
    answer (ending with the end-of-sentence token, so the model learns to stop)."""
    rng = random.Random(seed)
    texts = []
    for name, doc in stdlib_docstrings(limit_chars):
        answer = _prose(doc)
        if len(answer) < 80:
            continue
        short = name.rsplit(".", 1)[-1]
        messages = [
            {"role": "user", "content": rng.choice(_QUESTIONS).format(rng.choice((name, short)))},
            {"role": "assistant", "content": answer},
        ]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False, thinking=False))
    return texts


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainSettings:
    steps: int = 420
    batch: int = 8
    seq: int = 64
    vocab: int = 8192  # trained token ids (most frequent in the corpus); the rest share the "rare" class
    lr: float = 4e-3
    chars: int = 1_500_000
    seed: int = 0
    layout: str = "fp8"  # stored as released: "fp8" (FP8 dense + FP4 experts) or "bf16"

    def key(self) -> str:
        from transformers_deepseek import __version__

        blob = json.dumps({"settings": asdict(self), "model": DEMO, "version": __version__}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def expand_vocab(model, keep: list[int], vocab_size: int):
    """The full-vocabulary model of a model trained on ids ``keep`` (row ``i`` <-> token ``keep[i]``) plus a last
    "rare" row standing for every other token: each rare token gets that row's embedding, head row and hash route.
    Returns a new ``DeepseekV4ForCausalLM`` (same tensors and dtypes) whose logits at ``keep`` and at any rare id are
    the trained model's logits at ``0..K-1`` and ``K`` (up to the GEMM rounding of a wider head)."""
    from transformers_deepseek import DeepseekV4ForCausalLM

    k = len(keep)
    if model.config.vocab_size != k + 1:
        raise ValueError(f"expand_vocab: model vocab_size {model.config.vocab_size}, expected len(keep) + 1 = {k + 1}")
    rows = torch.full((vocab_size,), k, dtype=torch.long)  # full id -> trained row
    rows[torch.tensor(keep, dtype=torch.long)] = torch.arange(k)
    config = copy.deepcopy(model.config)
    config.vocab_size = vocab_size
    full = DeepseekV4ForCausalLM(config)
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith(("embed.weight", "head.weight", "gate.tid2eid")):
            value = value[rows]
        state[name] = value.clone()
    full.load_state_dict(state, strict=True, assign=True)  # the trained tensors, dtypes included
    return full.eval()


def save_released_bf16(model, out: Path) -> Path:
    """Write ``model`` as a bf16 checkpoint in the released layout: every tensor in the dtype the weight table gives
    it (fp32-held norms / head stored bf16, as released), one shard + ``model.safetensors.index.json``, config."""
    from safetensors.torch import save_file

    from transformers_deepseek.conversion.table import ST_DTYPES, Layout, build_plan

    plan = build_plan(model.config, Layout("bf16", "bf16"))
    state = model.state_dict()
    if set(state) != {e.name for e in plan.entries}:
        raise ValueError(f"save_released_bf16: model tensors differ from the plan: {set(state) ^ set(plan.by_name)}")
    tensors = {e.name: state[e.name].detach().to(ST_DTYPES[e.dtype]).contiguous() for e in plan.entries}
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
        "weight_map": {name: "model.safetensors" for name in sorted(tensors)},
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config = copy.deepcopy(model.config)
    config.architectures = ["DeepseekV4ForCausalLM"]
    config.dtype = torch.bfloat16
    config.save_pretrained(out)
    return out


def _rare_offset_loss(logits: torch.Tensor, targets: torch.Tensor, n_rare: int) -> torch.Tensor:
    """Cross-entropy of the exported full-vocabulary model: the rare class is ``n_rare`` tied rows, so its
    log-sum-exp is its logit + log(n_rare)."""
    import torch.nn.functional as F

    offset = torch.zeros(logits.shape[-1], dtype=logits.dtype)
    offset[-1] = math.log(n_rare)
    return F.cross_entropy((logits + offset).flatten(0, 1), targets.flatten())


def train_demo_model(out: Path, settings: TrainSettings = TrainSettings(), log: Callable[[str], None] = print) -> Path:
    """Train the demo model and write it to ``out`` in the released layout (atomically: a temp dir renamed)."""
    from transformers import GenerationConfig

    from transformers_deepseek import DeepseekV4Config, DeepseekV4ForCausalLM
    from transformers_deepseek.tokenization import load_default_tokenizer

    t_start = time.perf_counter()
    torch.manual_seed(settings.seed)
    tokenizer = load_default_tokenizer()
    texts = chat_corpus(tokenizer, settings.chars, settings.seed)
    raw = [i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids]
    keep = [tok for tok, _ in Counter(raw).most_common(settings.vocab)]
    n_rare = len(tokenizer) - len(keep)
    to_row = {tok: i for i, tok in enumerate(keep)}
    ids = torch.tensor([to_row.get(t, len(keep)) for t in raw])
    coverage = float((ids != len(keep)).float().mean())
    log(
        f"      corpus: {len(texts)} stdlib docstrings as chats, {len(ids) / 1e3:.0f}k tokens; training ids: the "
        f"{len(keep)} most frequent ({coverage:.1%} of tokens) + 1 class for the other {n_rare} "
        f"({time.perf_counter() - t_start:.0f}s)"
    )

    config = DeepseekV4Config(
        vocab_size=len(keep) + 1, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **DEMO
    )
    model = DeepseekV4ForCausalLM(config).float().train()  # fp32 master weights
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.95))
    warmup = max(1, settings.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / settings.steps)))),
    )
    gen = torch.Generator().manual_seed(settings.seed)
    t0 = time.perf_counter()
    every = max(1, settings.steps // 12)
    for step in range(settings.steps):
        start = torch.randint(0, len(ids) - settings.seq - 1, (settings.batch,), generator=gen)
        batch = torch.stack([ids[s : s + settings.seq + 1] for s in start.tolist()])
        logits = model(batch[:, :-1], use_cache=False).logits
        loss = _rare_offset_loss(logits, batch[:, 1:], n_rare)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % every == 0 or step == settings.steps - 1:
            dt = time.perf_counter() - t0
            eta = dt / (step + 1) * (settings.steps - step - 1)
            log(f"      step {step + 1:4d}/{settings.steps}  loss {loss.item():.3f}  {dt:.0f}s, ~{eta:.0f}s left")

    full = expand_vocab(model.eval(), keep, len(tokenizer))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        bf16 = tmp / "bf16"
        save_released_bf16(full, bf16)
        tokenizer.save_pretrained(bf16)
        GenerationConfig(
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, do_sample=False,
            repetition_penalty=1.3, max_new_tokens=60,
        ).save_pretrained(bf16)  # fmt: skip
        final = bf16
        if settings.layout == "fp8":
            from transformers_deepseek.conversion.converters import quantize
            from transformers_deepseek.conversion.io import run_job

            final = run_job(quantize(bf16, tmp / "fp8", use_source_scales=False), progress=False, log=lambda m: None)
        meta = {
            "settings": asdict(settings), "model": DEMO, "trained_ids": len(keep), "rare_ids": n_rare,
            "corpus_tokens": len(ids), "coverage": coverage, "final_loss": loss.item(),
            "train_seconds": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        (final / _MARKER).write_text(json.dumps(meta, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(final, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def ensure_demo_model(
    settings: TrainSettings = TrainSettings(), retrain: bool = False, root: Path | None = None, log=print
) -> tuple[Path, bool]:
    """The cached demo model directory (trained now if absent or ``retrain``); returns ``(dir, trained_now)``."""
    out = (root or cache_root()) / f"demo-{settings.key()}"
    if not retrain and (out / _MARKER).is_file():
        return out, False
    return train_demo_model(out, settings, log), True


# ---------------------------------------------------------------------------------------------------------------------
# Chat
# ---------------------------------------------------------------------------------------------------------------------
def chat(model_dir: Path, prompt: str, max_new_tokens: int = 60, log=print, stream: bool = True) -> dict:
    """Load ``model_dir`` with the Auto classes, answer ``prompt`` through the chat template with a
    :class:`DeepseekV4Cache`, streaming tokens to stdout; returns the reply and the cache figures."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    import transformers_deepseek  # noqa: F401  (registers deepseek_v4 with the Auto classes)
    from transformers_deepseek.modeling.cache_deepseek_v4 import DeepseekV4Cache

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n_params = sum(p.numel() for p in model.parameters())
    kinds = ["SWA" if r == 0 else ("CSA" if r == 4 else f"HCA/{r}") for r in model.config.compress_ratios]
    quant = getattr(model.config, "quantization_config", None)
    quant_name = "FP8 + FP4 experts" if quant else "bf16"
    log(
        f"[2/3] AutoModelForCausalLM -> {type(model).__name__} ({n_params / 1e6:.1f}M params, {quant_name}, "
        f"layers {kinds}, vocab {model.config.vocab_size}; {time.perf_counter() - t0:.1f}s)"
    )

    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, thinking=False)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    log(f"[3/3] chat prompt ({inputs.input_ids.shape[1]} tokens): {text!r}")
    log("      assistant: ", end="", flush=True)
    cache = DeepseekV4Cache(config=model.config)
    t0 = time.perf_counter()
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        output = model.generate(
            **inputs, past_key_values=cache, max_new_tokens=max_new_tokens, streamer=streamer,
            pad_token_id=tokenizer.eos_token_id,
        )  # fmt: skip
    dt = time.perf_counter() - t0
    new_ids = output[0, inputs.input_ids.shape[1] :]
    reply = tokenizer.decode(new_ids, skip_special_tokens=True)
    if not stream:
        log(reply)
    report = cache.memory_report()
    per_layer = ", ".join(
        f"L{r['layer']} {'ratio ' + str(r['ratio']) if r['ratio'] else 'SWA'}: "
        f"{sum(v for k, v in r.items() if k.endswith('_bytes')) / 1024:.1f} KiB"
        for r in report
    )
    log(f"      {len(new_ids)} new tokens in {dt:.2f}s ({len(new_ids) / dt:.1f} tok/s)")
    log(f"      DeepseekV4Cache: {cache.get_seq_length()} tokens, {cache.nbytes / 1024:.1f} KiB ({per_layer})")
    return {"reply": reply, "new_tokens": len(new_ids), "cache_nbytes": cache.nbytes, "cache_report": report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help=f"user message (default: {DEFAULT_PROMPT!r})")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--retrain", action="store_true", help="train again even if a cached model exists")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: ${CACHE_ENV} or ~/.cache/...")
    parser.add_argument("--steps", type=int, default=TrainSettings.steps, help="training steps (first run)")
    parser.add_argument("--chars", type=int, default=TrainSettings.chars, help="docstring characters to read")
    parser.add_argument("--vocab", type=int, default=TrainSettings.vocab, help="trained token ids (+ 1 rare class)")
    parser.add_argument("--batch", type=int, default=TrainSettings.batch)
    parser.add_argument("--seq", type=int, default=TrainSettings.seq)
    parser.add_argument("--layout", choices=("fp8", "bf16"), default=TrainSettings.layout)
    parser.add_argument("--seed", type=int, default=TrainSettings.seed)
    # One thread: on a shared 2-core box, two threads per process ran several times slower (spin-waits).
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    settings = TrainSettings(
        steps=args.steps, chars=args.chars, vocab=args.vocab, batch=args.batch, seq=args.seq, layout=args.layout,
        seed=args.seed,
    )  # fmt: skip
    root = args.cache_dir or cache_root()
    t0 = time.perf_counter()
    cached = (root / f"demo-{settings.key()}" / _MARKER).is_file() and not args.retrain
    if not cached:
        print(f"[1/3] training the demo model (first run, {settings.steps} steps; cached afterwards)", flush=True)
    model_dir, trained = ensure_demo_model(settings, args.retrain, root, log=lambda m: print(m, flush=True))
    meta = json.loads((model_dir / _MARKER).read_text())
    what = "trained and saved" if trained else "cached"
    print(
        f"[1/3] {what}: {model_dir} ({time.perf_counter() - t0:.1f}s; final training loss {meta['final_loss']:.2f}, "
        f"{meta['settings']['steps']} steps)",
        flush=True,
    )
    chat(model_dir, args.prompt, args.max_new_tokens, log=lambda m, **kw: print(m, **{"flush": True, **kw}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
