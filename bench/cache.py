"""KV cache side by side: ours (DeepseekV4Cache) vs native transformers 5.23 `deepseek_v4`, same weights (issue 5).

One random-weight bf16 model with the V4-Flash attention shape (head_dim 512, rope 64, index_head_dim 128, window
128, index_topk 512, the Flash layer pattern truncated to ``[0, 0, 4, 128, 4]`` + MTP) and a small trunk (hidden 256,
4 heads, 8 experts of 128) is built by our package and saved in the released layout; native transformers loads that
directory in processes that never import our package. Every phase runs in its own subprocess (peak RSS =
``ru_maxrss`` of that phase) with a wall-clock and an RSS limit; a phase that hits one is reported as "out of reach"
with the limit.

Phases: ``decode`` (reach each N, then time ``--steps`` single-token steps per N after ``--warmup`` untimed ones,
median) and ``prefill N`` (one prefill of N tokens: time, peak RSS, cache bytes). Ours decodes every N in one
process; native, whose 16K state fills most of this box, one process per N. Both decode workers stay up and take
turns of ``--block`` rounds (ours at every N, then native at its N, repeat), so that outside load on this noisy box
hits both implementations and every length alike; the step ratio against native uses our steps from the same rounds
("paired"). Prefills run one at a time, ours before and after native; each side's time is the mean of two runs
(native's other run: its decode worker's prefill at that length), ours' RSS the larger of its two. Ours prefills in
chunks of ``--chunk`` tokens (same results as one prefill). For ours, decode contexts above ``--real-max`` start from
a cache *sized* as at N tokens (a real 1024-token prefill whose compressed entries are tiled up to N / ratio, lengths
set to N): decode cost depends on the state's sizes, not its values, and this avoids an O(N) prefill per point.
Native always prefills for real.

Usage: ``python bench/cache.py [--decode 1024 16384 65536] [--prefill 16384] [--long 131072] [--timeout 600]``.
Run in the transformers 5.23 venv (native ``deepseek_v4``); other venvs run ours only.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CONFIG = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 5,
    "num_hash_layers": 2,
    "num_nextn_predict_layers": 1,
    "num_attention_heads": 4,
    "head_dim": 512,
    "qk_rope_head_dim": 64,
    "q_lora_rank": 256,
    "o_groups": 2,
    "o_lora_rank": 128,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "index_n_heads": 8,  # Flash has 64; 8 keeps the O(N^2) prefill indexer within this box's budget
    "index_head_dim": 128,
    "index_topk": 512,
    "sliding_window": 128,
    "compress_ratios": [0, 0, 4, 128, 4, 0],  # Flash: [0, 0] + [4, 128] * 20 + [4] + MTP [0]
    "max_position_embeddings": 262144,
}
SEED_LEN = 1024  # real prefill behind a synthesized long-context decode state
LEAD_LEN = 64  # the decode workers' lead-in cache


# ---------------------------------------------------------------------------------------------------------------------
# Worker side (one phase per process)
# ---------------------------------------------------------------------------------------------------------------------
def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _native_nbytes(cache) -> int:
    """Bytes of every distinct tensor held by native's cache layers (keys and values share storage)."""
    import torch

    seen, total = set(), 0

    def visit(obj) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            key = (obj.untyped_storage().data_ptr(), obj.data_ptr(), obj.numel())
            if key not in seen and obj.numel():
                seen.add(key)
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for v in obj.values():
                visit(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)

    for layer in cache.layers:
        visit(vars(layer))
    return total


def _grow_to(cache, n: int) -> None:
    """Make a (short, real) cache of ours look like one at ``n`` tokens: entries tiled to ``n // ratio``."""
    import torch

    for layer in cache.layers:
        for name, store in layer.entries.items():
            have = int(cache.lengths.max()) // layer.ratio
            want = n // layer.ratio
            reps = -(-want // have)
            layer.entries[name] = {k: torch.cat([v[:, :have]] * reps, dim=1)[:, :want].contiguous()
                                   for k, v in store.items()}  # fmt: skip
    cache.lengths = torch.full_like(cache.lengths, n)
    cache.columns = n


def worker(impl: str, phase: str, ns: list[int], ckpt: str, chunk: int, steps: int, real_max: int) -> list[dict]:
    """One process: ``prefill`` one length, or ``decode``: reach every length of ``ns``, then serve timed single-token
    steps on request (``step J`` on stdin -> ``T seconds`` on stdout, ``done`` ends) so that the driver can interleave
    them with the steps of other lengths and of the other implementation. ``steps`` bounds the steps per length."""
    import torch

    torch.manual_seed(0)
    if impl == "ours":
        from transformers import AutoModelForCausalLM

        import transformers_deepseek  # noqa: F401  (registers the model)
        from transformers_deepseek.modeling.cache_deepseek_v4 import DeepseekV4Cache

        model = AutoModelForCausalLM.from_pretrained(ckpt).eval()
        new_cache = lambda: DeepseekV4Cache(config=model.config)  # noqa: E731
        nbytes = lambda cache: cache.nbytes  # noqa: E731
        from transformers_deepseek.modeling import kernels

        kernel_path = "numba" if kernels.available() else "torch"  # the cache decode's table lookups
    else:
        from transformers import DynamicCache
        from transformers.models.deepseek_v4 import DeepseekV4ForCausalLM as Native

        model = Native.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
        new_cache = lambda: DynamicCache(config=model.config)  # noqa: E731
        nbytes = _native_nbytes
    assert ("transformers_deepseek" in sys.modules) == (impl == "ours")
    longest = max(ns)
    ids = torch.randint(2, CONFIG["vocab_size"], (1, longest + steps + 1), generator=torch.Generator().manual_seed(1))
    model_rss = _peak_rss()
    outs, caches = [], []
    with torch.inference_mode():
        for n in ns:
            out: dict = {"impl": impl, "phase": phase, "n": n, "model_rss": model_rss}
            if impl == "ours":
                out["kernels"] = kernel_path
            cache = new_cache()
            synth = impl == "ours" and phase == "decode" and n > real_max
            reach = SEED_LEN if synth else n
            t0 = time.perf_counter()
            # Native prefills in one call (its cache is built for that); ours in chunks.
            step = chunk if impl == "ours" else reach
            for a in range(0, reach, step):
                model(ids[:, a : min(a + step, reach)], past_key_values=cache, use_cache=True, logits_to_keep=1)
            out["prefill_s"] = time.perf_counter() - t0
            out["prefill_rss"] = _peak_rss()
            if synth:
                _grow_to(cache, n)
                out["synthesized"] = True
            out["cache_bytes"] = nbytes(cache)
            outs.append(out)
            caches.append(cache)
        if phase == "decode":
            # ``step -1``: an untimed lead-in step on a cache of its own, so the timed caches keep their cadence (one
            # step per round: the compressors complete a block every 4th / 128th position, and such steps cost more).
            lead = new_cache()
            model(ids[:, :LEAD_LEN], past_key_values=lead, use_cache=True, logits_to_keep=1)
            print("READY", flush=True)
            done = [0] * (len(ns) + 1)
            for line in sys.stdin:
                if line.strip() == "done":
                    break
                j = int(line.split()[1])
                n, cache = (LEAD_LEN, lead) if j < 0 else (ns[j], caches[j])
                if done[j] == steps:
                    raise SystemExit(f"more than {steps} steps asked at {n}")
                tok = ids[:, n + done[j] : n + done[j] + 1]
                t0 = time.perf_counter()
                model(tok, past_key_values=cache, use_cache=True)
                print(f"T {time.perf_counter() - t0!r}", flush=True)
                done[j] += 1
    for out in outs:
        out["peak_rss"] = _peak_rss()
    return outs


# ---------------------------------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------------------------------
def _rss_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Phase:
    """One worker process under the wall-clock and RSS limits. A ``decode`` worker serves timed steps on request."""

    def __init__(self, args, impl: str, phase: str, ns: list[int], ckpt: Path, steps: int, timeout: float) -> None:
        cmd = [sys.executable, __file__, "--worker", impl, phase, ",".join(map(str, ns)), str(ckpt),
               "--chunk", str(args.chunk), "--steps", str(steps), "--real-max", str(args.real_max)]  # fmt: skip
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
        self.impl, self.phase, self.ns, self.t0 = impl, phase, ns, time.time()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.reason: list[str] = []
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self.result: list[dict] | None = None
        self.ended = False  # the worker's stdout is closed

        def watch() -> None:  # kill the phase before it takes the box down, or when it runs out of time
            while self.proc.poll() is None:
                if _rss_of(self.proc.pid) > args.max_rss_gb * 2**30:
                    self.reason.append(f"RSS > {args.max_rss_gb} GB")
                    self.proc.kill()
                elif time.time() - self.t0 > timeout:
                    self.reason.append(f"> {timeout:.0f} s")
                    self.proc.kill()
                time.sleep(0.5)

        def read_stdout() -> None:
            for line in self.proc.stdout:
                self.lines.put(line)
            self.lines.put(None)

        def read_stderr() -> None:
            self.stderr.extend(self.proc.stderr)

        for target in (watch, read_stdout, read_stderr):
            threading.Thread(target=target, daemon=True).start()

    def _reply(self, prefix: str) -> str | None:
        """The next line the worker prints that starts with ``prefix`` (``None`` once it has exited)."""
        while not self.ended:
            line = self.lines.get()
            if line is None:
                self.ended = True
            elif line.startswith("RESULT "):
                self.result = json.loads(line[7:])
            if line is not None and line.startswith(prefix):
                return line
        return None

    def ready(self) -> bool:
        return self._reply("READY") is not None

    def step(self, j: int) -> float | None:
        """Time of one decode step of the worker's ``j``-th length (``None`` if the worker is gone)."""
        try:
            self.proc.stdin.write(f"step {j}\n")
            self.proc.stdin.flush()
        except OSError:
            return None
        line = self._reply("T ")
        return float(line[2:]) if line else None

    def finish(self) -> list[dict]:
        try:
            if self.phase == "decode":
                self.proc.stdin.write("done\n")
            self.proc.stdin.close()
        except OSError:
            pass
        if self.result is None:
            self._reply("RESULT ")
        self.proc.wait()
        wall = time.time() - self.t0
        if self.result is not None:
            for r in self.result:
                r["wall_s"] = wall
            return self.result
        last = ("".join(self.stderr).strip().splitlines() or ["?"])[-1]
        alloc = re.search(r"allocate (\d+) bytes", last)
        why = (
            self.reason[0]
            if self.reason
            else f"alloc of {int(alloc[1]) / 2**30:.0f} GB failed"
            if alloc
            else f"failed: {last[:60]}"
        )
        return [{"impl": self.impl, "phase": self.phase, "n": n, "out_of_reach": why, "wall_s": wall} for n in self.ns]


def _median(ts: list[float]) -> float:
    return sorted(ts)[len(ts) // 2]


def run_decode(args, ckpt: Path, has_native: bool) -> list[dict]:
    """Our decode worker holds every length and stays up while native's workers (one per length: its 16K state is
    most of this box) come and go. The two take turns in blocks of ``--block`` rounds: ours steps every length
    once per round, then native steps its length as many times, so that load from outside hits both
    implementations and all lengths alike. Ours' median per length is over all its rounds; against native at a
    length, ours' median over the rounds paired with that native worker is reported too.

    At each hand-over the driver waits ``--switch-gap`` seconds, for the other worker's OpenMP threads to stop
    spinning, and the worker takes one untimed step on a short cache of its own first. Within a block the steps run
    back to back, as in ``generate()``. Turns of one round each (``--block 1``) slowed our steps more than native's:
    every step found the caches of the CPU filled by the other worker (our 16K step 22-25 ms, 18-21 ms alone)."""
    ns = args.decode
    rounds = args.steps * (len(ns) + 1) + args.warmup
    ours = Phase(args, "ours", "decode", ns, ckpt, rounds, args.timeout * (len(ns) + 1))
    times: dict[int, list[float]] = {n: [] for n in ns}
    native_results: list[dict] = []

    def hand_over(worker: Phase) -> None:
        time.sleep(args.switch_gap)
        worker.step(-1)  # lead-in

    def ours_rounds(count: int) -> list[list[float]] | None:
        hand_over(ours)
        out = []
        for _ in range(count):
            ts = [ours.step(j) for j in range(len(ns))]
            if None in ts:
                return None
            for n, t in zip(ns, ts, strict=True):
                times[n].append(t)
            out.append(ts)
        return out

    def native_steps(native: Phase, count: int) -> list[float] | None:
        hand_over(native)
        ts = [native.step(0) for _ in range(count)]
        return None if None in ts else ts

    alive = ours.ready() and all(ours.step(j) is not None for j in range(len(ns)) for _ in range(args.warmup))
    for i, n in enumerate(ns if has_native and alive else []):
        native = Phase(args, "native", "decode", [n], ckpt, args.steps + args.warmup, args.timeout)
        paired, nt = [], []
        if native.ready() and all(native.step(0) is not None for _ in range(args.warmup)):
            for k0 in range(0, args.steps, args.block):
                count = min(args.block, args.steps - k0)
                ts, t = ours_rounds(count), native_steps(native, count)
                if ts is None or t is None:
                    break
                paired += [r[i] for r in ts]
                nt += t
        res = native.finish()
        if nt and "out_of_reach" not in res[0]:
            res[0].update(step_s=_median(nt), step_min_s=min(nt), steps_s=nt)
            res[0].update(ours_step_s=_median(paired), ours_step_min_s=min(paired), ours_steps_s=paired)
        native_results += res
    if alive and not any(times.values()):  # no native worker to pair with: ours alone, lengths interleaved
        ours_rounds(args.steps)
    ours_results = ours.finish()
    for r in ours_results:
        if times.get(r["n"]) and "out_of_reach" not in r:
            ts = times[r["n"]]
            r.update(step_s=_median(ts), step_min_s=min(ts), steps_s=ts, interleaved_with=ns)
    return ours_results + native_results


def run_phase(args, impl: str, phase: str, ns: list[int], ckpt: Path) -> list[dict]:
    return Phase(args, impl, phase, ns, ckpt, args.steps, args.timeout).finish()


def build_checkpoint(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import transformers_deepseek  # noqa: F401
    from transformers_deepseek import DeepseekV4Config

    torch.manual_seed(0)
    config = DeepseekV4Config(**CONFIG)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)


def _fmt(x: float | None, unit: str) -> str:
    if x is None:
        return "-"
    if unit == "s":
        return f"{x * 1e3:.0f} ms" if x < 1 else f"{x:.1f} s"
    if unit == "B":
        return f"{x / 2**30:.2f} GB" if x >= 2**30 else f"{x / 2**20:.0f} MB"
    return f"{x:.0f}"


def report(results: list[dict]) -> list[str]:
    def get(impl: str, phase: str, n: int) -> dict | None:
        return next((r for r in results if (r["impl"], r["phase"], r["n"]) == (impl, phase, n)), None)

    rows: list[tuple[str, object, object, str]] = []
    lines = [f"{'metric':44s} {'ours':>16s} {'native':>22s} {'ours/native':>12s}"]
    paths = sorted({r["kernels"] for r in results if "kernels" in r})
    if paths:  # numba kernels (the `fast` extra) or the PyTorch ops
        lines.insert(0, f"ours: cache decode lookups via {' / '.join(paths)}")

    def cell(r: dict | None, key: str, unit: str, per: int | None = None) -> tuple[str, float | None]:
        if r is None:
            return "not run", None
        if "out_of_reach" in r:
            return f"out of reach ({r['out_of_reach']})", None
        v = r.get(key)
        if v is not None and per:
            v = v / per
        return _fmt(v, unit), v

    ns = sorted({r["n"] for r in results})
    for phase, key, unit, label, per in [
        ("decode", "cache_bytes", "", "cache bytes/token @ {n}", True),
        ("prefill", "cache_bytes", "", "cache bytes/token @ {n}", True),
        ("decode", "step_s", "s", "decode step (median) @ {n}", False),
        ("decode", "step_min_s", "s", "decode step (min) @ {n}", False),
        ("prefill", "prefill_s", "s", "prefill time @ {n}", False),
        ("prefill", "peak_rss", "B", "prefill peak RSS @ {n}", False),
    ]:
        for n in ns:
            a, b = get("ours", phase, n), get("native", phase, n)
            if a is None and b is None:
                continue
            if a and b and b.get("ours_" + key) is not None:  # ours over the rounds it took turns with native
                a = {**a, key: b["ours_" + key]}
            if (
                phase == "prefill"
                and key == "cache_bytes"
                and (get("ours", "decode", n) or get("native", "decode", n))
            ):
                continue  # already reported from the decode phase at this length
            sa, va = cell(a, key, unit, n if per else None)
            sb, vb = cell(b, key, unit, n if per else None)
            ratio = f"{va / vb:.3f}x" if va and vb else "-"
            synth = " (sized)" if a and a.get("synthesized") and key.startswith("step") else ""
            synth += " (paired)" if b and b.get("ours_" + key) is not None else ""
            rows.append((label.format(n=n) + synth, sa, sb, ratio))
    # Marginal bytes per token (slope between the shortest and longest reached contexts): the fixed-size part
    # (windows, compressor rows, crop history) drops out.
    pts = {
        impl: dict(sorted((r["n"], r["cache_bytes"]) for r in results if r["impl"] == impl and "cache_bytes" in r))
        for impl in ("ours", "native")
    }
    # Over the same range for both when both have it (native usually stops at 16K).
    common = sorted(set(pts["ours"]) & set(pts["native"]))
    slopes = {}
    for impl, p in pts.items():
        ns_ = [n for n in (common if len(common) >= 2 else sorted(p)) if n >= 1024]
        if len(ns_) >= 2:
            lo, hi = ns_[0], ns_[-1]
            slopes[impl] = ((p[hi] - p[lo]) / (hi - lo), f"{lo}-{hi}")
    if slopes:
        (va, ra), (vb, rb) = slopes.get("ours", (None, "")), slopes.get("native", (None, ""))
        sa, sb = (f"{va:.0f} ({ra})" if va else "-"), (f"{vb:.0f} ({rb})" if vb else "-")
        rows.insert(0, ("cache bytes/token, marginal", sa, sb, f"{va / vb:.3f}x" if va and vb else "-"))

    # Step ratios of the same rounds, two estimates: the ratio of the medians, and the median of the per-round ratios
    # (each round's two steps ran back to back, so a drift of the box's speed over the run cancels in each ratio; at
    # 1K and 64K tokens both caches complete their compressor blocks in the same rounds).
    def per_round(num: list[float], den: list[float]) -> str:
        return f"{_median([a / b for a, b in zip(num, den, strict=True)]):.3f}x"

    for n in ns:
        a, b = get("ours", "decode", n), get("native", "decode", n)
        if a and b and b.get("ours_steps_s"):
            rows.append(
                (f"ours/native step @ {n}, median per round", "-", "-", per_round(b["ours_steps_s"], b["steps_s"]))
            )
    ours_dec = sorted((r["n"], r) for r in results if r["impl"] == "ours" and r["phase"] == "decode" and "step_s" in r)
    for n, r in ours_dec[1:]:
        base = ours_dec[0][1]
        rows.append((
            f"ours: step @ {n} / step @ {ours_dec[0][0]}",
            f"{r['step_s'] / base['step_s']:.3f}x", f"per round {per_round(r['steps_s'], base['steps_s'])}", "-",
        ))  # fmt: skip
        rows.append(("", "", f"min {r['step_min_s'] / base['step_min_s']:.3f}x", ""))
    for label, sa, sb, ratio in rows:
        lines.append(f"{label:44s} {sa:>16s} {sb:>22s} {ratio:>12s}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "PHASE", "N", "CKPT"), help=argparse.SUPPRESS)
    parser.add_argument("--decode", type=int, nargs="*", default=[1024, 16384, 65536])
    parser.add_argument("--prefill", type=int, nargs="*", default=[16384])
    parser.add_argument("--long", type=int, nargs="*", default=[131072], help="prefill lengths run for ours only")
    parser.add_argument("--chunk", type=int, default=4096, help="our prefill chunk")
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed per length (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed decode steps per length and worker first")
    parser.add_argument("--switch-gap", type=float, default=0.05, help="seconds between the decode workers' turns")
    parser.add_argument("--block", type=int, default=10, help="decode rounds per turn of each worker")
    parser.add_argument(
        "--real-max", type=int, default=SEED_LEN, help="ours: longest decode context prefilled for real"
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="per phase, seconds")
    parser.add_argument("--max-rss-gb", type=float, default=20.0, help="per phase (native at 16K peaks near 18.6 GB)")
    parser.add_argument("--skip-native", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results here")
    parser.add_argument("--render", type=Path, default=None, help="only print the table of a --json file")
    args = parser.parse_args(argv)

    if args.render:
        print("\n".join(report(json.loads(args.render.read_text()))))
        return 0

    if args.worker:
        impl, phase, ns, ckpt = args.worker
        res = worker(impl, phase, [int(n) for n in ns.split(",")], ckpt, args.chunk, args.steps, args.real_max)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    from importlib.util import find_spec

    has_native = find_spec("transformers.models.deepseek_v4") is not None and not args.skip_native
    with tempfile.TemporaryDirectory(prefix="tdseek-cache-bench-") as tmp:
        ckpt = Path(tmp) / "model"
        build_checkpoint(ckpt)
        results = []

        def show(res: dict) -> None:
            print(f"  {res['impl']:6s} {res['phase']:7s} {res['n']:>7d}: " + ", ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()
                if k not in ("impl", "phase", "n", "steps_s", "ours_steps_s", "interleaved_with")
            ), flush=True)  # fmt: skip
            results.append(res)

        # Phases never share the CPUs: the decode workers take turns of --block rounds, the prefills run one at a time.
        if args.decode:
            for res in run_decode(args, ckpt, has_native):
                show(res)
        for n in args.prefill:
            if not has_native:
                show(run_phase(args, "ours", "prefill", [n], ckpt)[0])
                continue
            # Ours before and after native (a linear drift of the box's speed cancels in the mean): time = the mean
            # of the two runs, RSS = the larger.
            first = run_phase(args, "ours", "prefill", [n], ckpt)[0]
            native = run_phase(args, "native", "prefill", [n], ckpt)[0]
            second = run_phase(args, "ours", "prefill", [n], ckpt)[0]
            if "out_of_reach" in first or "out_of_reach" in second:
                show(first if "out_of_reach" in first else second)
            else:
                runs = [first["prefill_s"], second["prefill_s"]]
                peak = max(first["peak_rss"], second["peak_rss"])
                show({**first, "prefill_s": sum(runs) / 2, "prefill_runs_s": runs, "peak_rss": peak})
            # Native's decode worker at this length made the same one-call prefill: its second sample.
            again = next(
                (r for r in results if r["impl"] == "native" and r["phase"] == "decode" and r["n"] == n), None
            )
            if "out_of_reach" not in native and again and "prefill_s" in again:
                runs = [again["prefill_s"], native["prefill_s"]]
                native = {**native, "prefill_s": sum(runs) / 2, "prefill_runs_s": runs}
            show(native)
        for n in args.long:
            show(run_phase(args, "ours", "prefill", [n], ckpt)[0])
    print(f"\nconfig: {json.dumps(CONFIG)}")
    print("\n".join(report(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
