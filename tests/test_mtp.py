"""Multi-token prediction: MTP logits vs the golden fixtures (fresh and cached state), the MTP cache and per-row
rollback, speculative decoding in generate(use_mtp=True) (greedy exactness, rejection-sampling distribution) and
MTP weights surviving save -> load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, GenerationConfig

from helpers import require_fixture
from transformers_deepseek import DeepseekV4Config, DeepseekV4ForCausalLM
from transformers_deepseek.modeling.cache_deepseek_v4 import DeepseekV4Cache
from transformers_deepseek.parity import checkpoint_dir, load_golden, rel_l2

MTP_FIXTURES = ["tiny-bf16", "tiny-fp8-fp4", "tiny-wide"]  # tiny-ratio16 stores no MTP goldens
ALL_FIXTURES = ["tiny-bf16", "tiny-fp8-fp4", "tiny-ratio16", "tiny-wide"]


def _load(name: str):
    golden = load_golden(require_fixture(name))
    with checkpoint_dir(golden.root) as ckpt:
        return AutoModelForCausalLM.from_pretrained(ckpt).eval(), golden


def _mtp_floor(model, golden) -> float:
    # Fixtures without an MTP floor: the smallest per-layer floor (as tests/test_modeling_parity.py does).
    return golden.mtp_floor() or min(golden.layer_floor(i) for i in range(model.config.num_hidden_layers))


def small_model(vocab: int = 16, seed: int = 0, head_scale: float = 10.0, layers: int = 1) -> DeepseekV4ForCausalLM:
    """A random V4 small enough to run thousands of rows in seconds: a CSA layer (ratio 4, indexer) then SWA
    layers, an SWA MTP block; the head scaled up so that the distributions are far from uniform."""
    config = DeepseekV4Config(
        vocab_size=vocab, hidden_size=64, moe_intermediate_size=32, num_hidden_layers=layers, num_hash_layers=0,
        num_attention_heads=2, head_dim=128, qk_rope_head_dim=64, q_lora_rank=32, o_groups=1, o_lora_rank=32,
        n_routed_experts=4, num_experts_per_tok=2, sliding_window=8, compress_ratios=[4] + [0] * layers,
        index_n_heads=2, index_head_dim=128, index_topk=4, max_position_embeddings=256, bos_token_id=None,
        eos_token_id=None, pad_token_id=None,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        model.head.weight.mul_(head_scale)
    return model


# ---------------------------------------------------------------------------------------------------------------
# MTP logits (SPEC §4 MTPBlock)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", MTP_FIXTURES)
def test_mtp_logits_match_the_fixture_fresh_and_cached(name):
    model, golden = _load(name)
    streams, next_ids, expected = (golden.tensors[k] for k in ("mtp.input_hidden", "mtp.input_ids", "mtp.logits"))
    n = next_ids.shape[1]
    cache = DeepseekV4Cache(config=model.config)
    with torch.no_grad():
        fresh = model.mtp_logits(streams, next_ids)
        # Same positions through the MTP cache in uneven chunks (one of a single token), as speculative decoding
        # feeds them.
        cuts = [0, n // 3, n // 3 + 1, n]
        parts = [(streams[:, a:b], next_ids[:, a:b]) for a, b in zip(cuts, cuts[1:], strict=False)]
        cached = torch.cat([model.mtp_logits(s, i, past_key_values=cache) for s, i in parts], dim=1)
    floor = _mtp_floor(model, golden)
    assert rel_l2(fresh, expected) <= floor
    assert rel_l2(fresh, expected) < 1e-5  # in fact the official MTP block is reproduced (fp32 head noise only)
    assert rel_l2(cached, expected) <= floor
    assert cache.mtp_lengths[0].tolist() == [n, n]
    assert cache.get_seq_length() == 0  # the main model's state is untouched


def test_mtp_logits_padding_mask_and_logits_to_keep():
    model, golden = _load("tiny-bf16")
    streams, next_ids = golden.tensors["mtp.input_hidden"][:, :12], golden.tensors["mtp.input_ids"][:, :12]
    cache = DeepseekV4Cache(config=model.config)
    with torch.no_grad():
        ref = model.mtp_logits(streams, next_ids, past_key_values=cache)
        # Row 0 fed 3 padding columns first: its positions still start at 0.
        pad_streams = torch.cat([streams[:, :3], streams], dim=1)
        pad_ids = torch.cat([next_ids[:, :3], next_ids], dim=1)
        mask = torch.ones(2, 15, dtype=torch.long)
        mask[0, :3] = 0
        padded = DeepseekV4Cache(config=model.config)
        got = model.mtp_logits(pad_streams, pad_ids, past_key_values=padded, attention_mask=mask)
        last = model.mtp_logits(streams, next_ids, logits_to_keep=1)
    assert padded.mtp_lengths[0].tolist() == [12, 15]
    assert rel_l2(got[0, 3:], ref[0]) <= golden.end_to_end_floor
    assert (got[0, 3:].argmax(-1) == ref[0].argmax(-1)).float().mean() >= 0.9
    assert last.shape == (2, 1, 1024)
    assert torch.allclose(last[:, 0], ref[:, -1], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Cache: MTP state and per-row rollback
# ---------------------------------------------------------------------------------------------------------------
def test_cache_has_one_mtp_layer_per_block_with_its_ratio():
    config = DeepseekV4Config(
        num_hidden_layers=2, num_hash_layers=0, num_nextn_predict_layers=2, compress_ratios=[4, 0, 128, 0]
    )
    cache = DeepseekV4Cache(config=config)
    assert [layer.ratio for layer in cache.mtp_layers] == [128, 0]
    assert cache.mtp_lengths == [None, None]


def test_crop_rows_equals_crop_and_rolls_back_each_row():
    model = small_model(vocab=32)
    ids = torch.randint(0, 32, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        caches = [DeepseekV4Cache(config=model.config, max_crop=2) for _ in range(3)]
        for c in caches[:2]:
            model(ids[:, :17], past_key_values=c)
            model(ids[:, 17:19], past_key_values=c)  # completes a ratio-4 block at position 18... then taken back
        caches[0].crop(-2)
        caches[1].crop_rows(torch.tensor([2, 2]))
        # Uniform counts: the same state, bit for bit.
        for a, b in zip(caches[0].layers, caches[1].layers, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True))
        assert torch.equal(caches[0].lengths, caches[1].lengths)
        # Per row: row 0 takes back 1 token, row 1 none == a chunk in which row 0 had only the first token.
        c = DeepseekV4Cache(config=model.config, max_crop=2)
        model(ids[:, :17], past_key_values=c)
        model(ids[:, 17:19], past_key_values=c)
        c.crop_rows(torch.tensor([1, 0]))
        ref = caches[2]
        model(ids[:, :17], past_key_values=ref)
        model(ids[:, 17:19], past_key_values=ref, attention_mask=torch.tensor([[1, 0], [1, 1]]))
        assert c.lengths.tolist() == ref.lengths.tolist() == [18, 19]
        nxt = ids[:, 19:20]
        got, want = model(nxt, past_key_values=c).logits, model(nxt, past_key_values=ref).logits
    assert torch.allclose(got, want, rtol=0, atol=1e-4)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    with pytest.raises(ValueError, match="crop_rows"):
        c.crop_rows(torch.tensor([3, 0]))


# ---------------------------------------------------------------------------------------------------------------
# Greedy speculative decoding
# ---------------------------------------------------------------------------------------------------------------
def _check_greedy_fixture(name: str, new_tokens: int, prompt: int = 120) -> None:
    model, golden = _load(name)
    ids = golden.input_ids[:, :prompt]
    with torch.no_grad():
        spec = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                              use_mtp=True, return_dict_in_generate=True)  # fmt: skip
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False)
    print(f"\n{name}: acceptance {spec.num_accepted}/{spec.num_drafted}, main forwards {spec.num_main_forwards} for "
          f"{new_tokens} tokens")  # fmt: skip
    # Verification runs 2-token chunks where plain greedy runs 1-token steps; the default batch-invariant kernels make
    # a token's logits independent of that, so the tokens are the same. (The random fixtures' MTP heads never agree
    # with the main model: every draft is rejected and rolled back, one main forward per token.)
    assert torch.equal(spec.sequences, plain)
    assert spec.num_main_forwards == new_tokens


def test_greedy_speculation_equals_plain_greedy():
    _check_greedy_fixture("tiny-bf16", new_tokens=64)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ALL_FIXTURES if n != "tiny-bf16"])
def test_greedy_speculation_equals_plain_greedy_every_fixture(name):
    _check_greedy_fixture(name, new_tokens=64)


def _oracle_mtp(model, plain: torch.Tensor, pads: torch.Tensor, wrong_every: list[int]):
    """Wrap ``model.mtp_logits`` (state kept as usual) so that its draft is the plain greedy token, except for
    columns that are multiples of ``wrong_every[row]``, where it is another token."""
    real = model.mtp_logits

    def mtp_logits(streams, next_ids, depth=0, past_key_values=None, attention_mask=None, logits_to_keep=0):
        logits = real(streams, next_ids, depth, past_key_values, attention_mask, logits_to_keep)
        col = pads + past_key_values.mtp_lengths[depth] + 1  # column of the drafted token
        fake = torch.full_like(logits[:, -1], -30.0)
        for b in range(plain.shape[0]):
            c = int(col[b])
            tok = int(plain[b, c]) if c < plain.shape[1] else 0
            fake[b, (tok + 1) % fake.shape[-1] if c % wrong_every[b] == 0 else tok] = 30.0
        logits[:, -1] = fake
        return logits

    return mtp_logits


def test_greedy_speculation_with_accepted_drafts_equals_plain_greedy(monkeypatch):
    """Accepted drafts, bonus tokens, per-row rollback and a left-padded prompt: with distributions far from ties,
    speculative greedy output is plain greedy output token for token."""
    model = small_model(vocab=64, seed=3, head_scale=40.0, layers=2)
    ids = torch.randint(0, 64, (2, 14), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
        monkeypatch.setattr(model, "mtp_logits", _oracle_mtp(model, plain, (1 - mask).sum(1), [3, 5]))
        spec = model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, use_mtp=True,
                              return_dict_in_generate=True)  # fmt: skip
    assert torch.equal(spec.sequences, plain)
    assert 0.3 < spec.acceptance_rate < 0.9
    assert spec.num_main_forwards < 20  # 1 prefill + fewer verifications than tokens
    assert spec.num_new_tokens.tolist() == [24, 24]


def test_eos_and_generation_config_switch(monkeypatch):
    model = small_model(vocab=64, seed=3, head_scale=40.0, layers=2)
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        free = model.generate(ids, max_new_tokens=12, do_sample=False)
        eos = int(free[0, 13])  # a token row 0 emits after 3 new tokens
        plain = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=1)
        monkeypatch.setattr(model, "mtp_logits", _oracle_mtp(model, free, torch.zeros(2, dtype=torch.long), [2, 3]))
        config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=1, use_mtp=True)
        spec = model.generate(ids, generation_config=config)
        off = model.generate(ids, generation_config=config, use_mtp=False)
    assert torch.equal(spec, plain)
    assert torch.equal(off, plain)
    assert bool((spec[0, 14:] == 1).all())


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"num_beams": 2}, "num_beams"), ({"output_scores": True}, "output_scores"), ({"stop_strings": ["x"]}, "stop")],
)
def test_unsupported_options_are_refused(kwargs, field):
    model = small_model()
    with pytest.raises(ValueError, match=field):
        model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2, use_mtp=True, **kwargs)


def test_model_without_mtp_block_refuses_use_mtp():
    model = small_model()
    model.mtp = torch.nn.ModuleList()
    with pytest.raises(ValueError, match="MTP"):
        model.generate(torch.zeros(1, 4, dtype=torch.long), max_new_tokens=2, use_mtp=True)


# ---------------------------------------------------------------------------------------------------------------
# Speculative sampling: the output distribution is the model's
# ---------------------------------------------------------------------------------------------------------------
def _chi2_pvalue(observed: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Pearson chi-square goodness of fit (cells expected < 5 pooled): (statistic, p-value)."""
    small = expected < 5
    obs = torch.cat([observed[~small], observed[small].sum().view(1)]).double()
    exp = torch.cat([expected[~small], expected[small].sum().view(1)]).double()
    keep = exp > 0
    obs, exp = obs[keep], exp[keep]
    stat = float(((obs - exp) ** 2 / exp).sum())
    dof = obs.numel() - 1
    return stat, float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def _warp(logits: torch.Tensor, temperature: float, top_k: int) -> torch.Tensor:
    logits = logits / temperature
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)


@pytest.mark.parametrize(("temperature", "top_k"), [(1.0, 16), (0.7, 5)])
def test_speculative_sampling_matches_the_model_distribution(temperature, top_k):
    """2000 two-token continuations of one prompt: speculative sampling vs the exact joint distribution
    p(x1) p(x2 | x1) of the (warped) model, chi-square over the 16 x 16 cells."""
    vocab, n = 16, 2000
    model = small_model(vocab=vocab, seed=0)
    prompt = torch.randint(0, vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(prompt, use_cache=False)
        p1 = _warp(out.logits[0, -1], temperature, top_k)
        second = torch.cat([prompt.repeat(vocab, 1), torch.arange(vocab)[:, None]], dim=1)
        p2 = _warp(model(second, use_cache=False).logits[:, -1], temperature, top_k)  # [x1, x2]
        exact = p1[:, None] * p2
        # What always accepting the draft would give (x2 from the MTP head): the test must be able to tell.
        q2 = _warp(model.mtp_logits(out.streams.repeat(vocab, 1, 1, 1), second[:, 1:]).float()[:, -1], temperature,
                   top_k)  # fmt: skip
        torch.manual_seed(1234)
        res = model.generate(prompt.repeat(n, 1), max_new_tokens=2, do_sample=True, temperature=temperature,
                             top_k=top_k, use_mtp=True, return_dict_in_generate=True)  # fmt: skip
    x1, x2 = res.sequences[:, -2], res.sequences[:, -1]
    counts = torch.bincount(x1 * vocab + x2, minlength=vocab * vocab).double()
    stat, pvalue = _chi2_pvalue(counts, n * exact.flatten().double())
    print(f"\nT={temperature} top_k={top_k}: chi2 {stat:.1f}, p = {pvalue:.3f}, acceptance {res.acceptance_rate:.2f}")
    assert pvalue > 0.01
    assert counts[exact.flatten() == 0].sum() == 0  # nothing the (top-k) model cannot emit
    assert min(res.num_accepted, res.num_drafted - res.num_accepted) >= 50  # both paths taken, many times
    # Power: the always-accept distribution p(x1) q(x2 | x1) would give an expected statistic far above the 1%
    # critical value (~300 for 255 cells at most).
    wrong = p1[:, None] * q2
    assert n * float(((wrong - exact) ** 2 / exact.clamp_min(1e-12)).sum()) > 1000


# ---------------------------------------------------------------------------------------------------------------
# MTP weights survive load -> save
# ---------------------------------------------------------------------------------------------------------------
def _shards(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("name", ["tiny-bf16", "tiny-fp8-fp4"])
def test_mtp_weights_survive_save_and_reload(tmp_path, name):
    golden = load_golden(require_fixture(name))
    with checkpoint_dir(golden.root) as ckpt:
        source = {k: v for k, v in _shards(Path(ckpt)).items() if k.startswith("mtp.0.")}
        model = AutoModelForCausalLM.from_pretrained(ckpt)
    model.save_pretrained(tmp_path)
    saved = {k: v for k, v in _shards(tmp_path).items() if k.startswith("mtp.0.")}
    assert len(source) > 20 and sorted(saved) == sorted(source)
    widened = []
    for key, tensor in source.items():
        if saved[key].dtype == tensor.dtype:
            assert torch.equal(saved[key].view(torch.uint8), tensor.view(torch.uint8)), key
        else:  # bf16 norms of the bf16 fixture come back as the fp32 the model keeps them in (SPEC §4): same values
            widened.append(key)
            assert tensor.dtype == torch.bfloat16 and saved[key].dtype == torch.float32, key
            assert torch.equal(saved[key].to(torch.bfloat16).view(torch.uint8), tensor.view(torch.uint8)), key
            assert torch.equal(saved[key], tensor.float()), key
    if name == "tiny-fp8-fp4":
        assert not widened  # the quantized save path writes the released dtypes
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    before, after = model.state_dict(), reloaded.state_dict()
    for key in (k for k in before if k.startswith("mtp.0.")):
        assert torch.equal(before[key].view(torch.uint8), after[key].view(torch.uint8)), key
