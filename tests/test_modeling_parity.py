"""Numerical parity with the official model on the bf16 golden fixture (SPEC §10).

Per-layer teacher forcing is the primary check; component checks are exact where the math is discrete. Beyond the
tolerances the issue sets, the implementation reproduces the official streams bit for bit: the sha256 of every
layer's output streams equals the one recorded by the fixture generator. That holds with the plain kernels
(``batch_invariant=False``); the default batch-invariant kernels change a prefill only through the order in which the
indexer's top-k breaks bf16 score ties (lower entry first, whatever the row length), which is checked here too.
"""

from __future__ import annotations

import pytest
import torch

import transformers_deepseek.modeling.modeling_deepseek_v4 as modeling
from helpers import require_fixture, stream_digests
from transformers_deepseek import DeepseekV4ForCausalLM
from transformers_deepseek.modeling import kernels
from transformers_deepseek.modeling.numerics import ceil_pow2_scale, rope_cis
from transformers_deepseek.parity import checkpoint_dir, end_to_end, load_golden, teacher_forced

TOLERANCE = 1.5  # x the fixture's per-layer noise floor
E2E_TOLERANCE = 1.2  # x the fixture's end-to-end noise floor


@pytest.fixture(scope="module")
def bf16():
    golden = load_golden(require_fixture("tiny-bf16"))
    with checkpoint_dir(golden.root) as ckpt:
        model = DeepseekV4ForCausalLM.from_pretrained(ckpt).eval()
    return model, golden


@pytest.fixture(scope="module")
def bf16_reference():
    """The plain kernels (``batch_invariant=False``), for the checks that compare with golden tensors bit for bit."""
    golden = load_golden(require_fixture("tiny-bf16"))
    with checkpoint_dir(golden.root) as ckpt:
        model = DeepseekV4ForCausalLM.from_pretrained(ckpt, batch_invariant=False).eval()
    return model, golden


def test_teacher_forced_layers_within_noise_floor(bf16):
    model, golden = bf16
    report = teacher_forced(model, golden)
    print("\n".join(report.lines()))
    # tiny-bf16 stores the layer-0 output (batch 0) and the final streams of the first 32 positions: layer 0 is
    # teacher-forced; layers 1-3 run chained from the stored layer-0 streams, a stricter test than per-layer.
    assert set(report.layers) == {"layer0", "layers1-3 chained[:32]", "mtp (logits)"}
    for name, (err, floor) in report.layers.items():
        # The fixture lists no MTP floor; hold MTP to the smallest per-layer floor.
        floor = floor or min(golden.layer_floor(i) for i in range(model.config.num_hidden_layers))
        assert err <= TOLERANCE * floor, (name, err, floor)


def test_end_to_end_logits_within_noise_floor(bf16):
    model, golden = bf16
    report = end_to_end(model, golden)
    err, floor = report.end_to_end
    assert err <= E2E_TOLERANCE * floor, (err, floor)
    assert report.argmax_agreement >= 0.8


def _stream_digests(name: str, batch_invariant: bool):
    golden = load_golden(require_fixture(name))
    with checkpoint_dir(golden.root) as ckpt:
        model = DeepseekV4ForCausalLM.from_pretrained(ckpt, batch_invariant=batch_invariant).eval()
    with torch.no_grad():
        out = model(golden.input_ids, output_hidden_states=True, use_cache=False)
    return stream_digests(out.hidden_states[1:]), out, golden


FIXTURES = ["tiny-bf16", "tiny-fp8-fp4", "tiny-ratio16", "tiny-wide"]


@pytest.mark.parametrize("name", FIXTURES)
def test_every_layer_stream_bit_identical_to_official(name):
    digests, out, golden = _stream_digests(name, batch_invariant=False)
    assert digests == golden.meta["layer_stream_sha256"]
    # fp32 head: same up to the GEMM's summation order over 256 products.
    assert (out.logits - golden.tensors["prefill.logits"]).abs().max() < 1e-4


def _torch_topk(scores: torch.Tensor, k: int, batch_invariant: bool = True) -> torch.Tensor:
    return scores.topk(k, dim=-1).indices


@pytest.mark.parametrize("name", FIXTURES)
def test_batch_invariant_kernels_change_a_prefill_only_through_topk_tie_order(name, monkeypatch):
    """The default kernels (padded elementwise ops and small GEMMs, full 64-slot attention blocks, the full window)
    give the official prefill streams bit for bit once the indexer breaks ties as torch.topk does; with their own
    tie rule the streams differ (the fixtures have bf16 score ties at the top-k boundary, SPEC §10). The tie rule is
    swapped on the PyTorch path: the compiled indexer kernel builds the batch-invariant top-k keys itself."""
    digests, _, golden = _stream_digests(name, batch_invariant=True)
    assert digests != golden.meta["layer_stream_sha256"]
    with monkeypatch.context() as m:
        m.setattr(modeling, "topk_indices", _torch_topk)
        m.setenv(kernels.DISABLE_ENV, "1")
        kernels._compiled.cache_clear()
        digests, _, golden = _stream_digests(name, batch_invariant=True)
    kernels._compiled.cache_clear()
    assert digests == golden.meta["layer_stream_sha256"]


class _Recorder:
    """Forward hooks collecting module outputs by name (first call only)."""

    def __init__(self, model, names):
        self.out = {}
        self.handles = [
            model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: self.out.setdefault(n, o)) for n in names
        ]

    def close(self):
        for h in self.handles:
            h.remove()


@pytest.fixture(scope="module")
def bf16_recorded(bf16_reference):
    model, golden = bf16_reference
    names = ["layers.0.ffn.gate", "layers.1.attn.indexer", "layers.3.attn.indexer", "layers.1.attn.indexer.compressor"]
    names += [f"layers.{i}.attn.compressor" for i in (1, 2, 3)] + [f"layers.{i}.attn" for i in range(4)]
    rec = _Recorder(model, names)
    captured = {}

    def grab(module, args):
        captured.setdefault("x1", args[0])  # returns None: a pre-hook's return value would replace the arguments

    pre = model.layers[1].attn.register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            model(golden.input_ids, use_cache=False)
    finally:
        rec.close()
        pre.remove()
    return model, golden, {**rec.out, **captured}


def test_hash_routing_ids_identical(bf16_recorded):
    _, golden, out = bf16_recorded
    _, ids = out["layers.0.ffn.gate"]
    expected = golden.tensors["debug.prefill.layer0.routing"].long().view(-1, ids.shape[-1])
    assert torch.equal(ids, expected)


def _assert_on_e4m3_grid(values: torch.Tensor, block: int) -> None:
    """Every block of ``block`` values is e4m3 * a power-of-two scale (the official ue8m0 FP8 simulation)."""
    x = values.float().unflatten(-1, (-1, block))
    scale = ceil_pow2_scale(x.abs().amax(-1, keepdim=True).clamp_min(1e-4), 448.0)
    q = x / scale
    assert torch.equal(q.to(torch.float8_e4m3fn).float(), q)


def test_kv_nope_dims_on_e4m3_grid_and_equal_golden(bf16_recorded):
    model, golden, out = bf16_recorded
    rd, window = model.config.qk_rope_head_dim, model.config.sliding_window
    for layer in (1, 2):
        ours = out[f"layers.{layer}.attn.compressor"][0]  # [B, n, D] entries of the prefill
        cache = golden.tensors[f"debug.prefill.layer{layer}.kv_cache"]  # [window ring | compressed (zero padded)]
        theirs = cache[:, window : window + ours.shape[1]]
        _assert_on_e4m3_grid(ours[..., :-rd], 64)
        assert torch.equal(ours, theirs), layer
    # Window KV: after a 300-token prefill the official ring holds positions 284..299 at slot pos % window.
    attn = model.layers[1].attn
    x = out["x1"]
    seqlen = x.shape[1]
    kv = attn.window_kv(x, rope_cis(attn.inv_freq, torch.arange(seqlen).expand(x.shape[0], -1)))
    _assert_on_e4m3_grid(kv[..., :-rd], 64)
    positions = torch.arange(seqlen - window, seqlen)
    assert torch.equal(kv[:, positions], golden.tensors["debug.prefill.layer1.kv_cache"][:, positions % window])


def test_indexer_keys_on_fp4_grid_and_equal_golden(bf16_recorded):
    _, golden, out = bf16_recorded
    keys = out["layers.1.attn.indexer.compressor"][0].float()
    x = keys.unflatten(-1, (-1, 32))
    scale = ceil_pow2_scale(x.abs().amax(-1, keepdim=True).clamp_min(6 * 2.0**-126), 6.0)
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert torch.isin((x / scale).abs(), grid).all()
    assert torch.equal(keys, golden.tensors["debug.prefill.layer1.indexer_kv_cache"].float())


def test_compressed_visibility_and_indexer_topk(bf16_recorded):
    model, golden, out = bf16_recorded
    k = model.config.index_topk
    for layer in (1, 3):
        ours = out[f"layers.{layer}.attn.indexer"]  # [B, S, k] entry ids, -1 = not visible yet
        theirs = golden.tensors[f"prefill.layer{layer}.indexer_topk"].long()
        seqlen = theirs.shape[1]
        theirs = torch.where(theirs >= 0, theirs - seqlen, -1)  # golden carries the +seqlen offset
        # Visibility is exact: entry i is visible to query t iff i < (t + 1) // 4.
        expected_visible = torch.clamp((torch.arange(seqlen) + 1) // 4, max=k).expand_as(theirs[..., 0])
        assert torch.equal((ours >= 0).sum(-1), expected_visible)
        assert torch.equal((theirs >= 0).sum(-1), expected_visible)
        ties = golden.topk_ties(layer, k)
        same = torch.tensor(
            [
                [set(a.tolist()) == set(b.tolist()) for a, b in zip(r, t, strict=True)]
                for r, t in zip(ours, theirs, strict=True)
            ]
        )
        assert same[~ties].all(), (~same & ~ties).nonzero().tolist()
        # Not only up to ties: the official topk's own tie-breaking is reproduced too.
        assert torch.equal(ours, theirs)


def test_batch_invariant_topk_differs_from_official_only_at_ties(bf16):
    """Default kernels: the first indexer (its input streams are the official ones) picks the official entry set
    except where bf16 scores tie at the top-k boundary; the order is score-descending, lower entry first on ties."""
    model, golden = bf16
    rec = _Recorder(model, ["layers.1.attn.indexer"])
    try:
        with torch.no_grad():
            model(golden.input_ids, use_cache=False)
    finally:
        rec.close()
    k = model.config.index_topk
    ours = rec.out["layers.1.attn.indexer"]
    theirs = golden.tensors["prefill.layer1.indexer_topk"].long()
    theirs = torch.where(theirs >= 0, theirs - theirs.shape[1], -1)
    ties = golden.topk_ties(1, k)
    same = torch.tensor(
        [
            [set(a.tolist()) == set(b.tolist()) for a, b in zip(r, t, strict=True)]
            for r, t in zip(ours, theirs, strict=True)
        ]
    )
    assert same[~ties].all() and not same.all()  # the fixture has boundary ties, and they are where we differ
    assert not torch.equal(ours, theirs)
