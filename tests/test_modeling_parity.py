"""Numerical parity with the official model on the bf16 golden fixture (SPEC §10).

Per-layer teacher forcing is the primary check; component checks are exact where the math is discrete.
Quantized fixtures (tiny-fp8-fp4, tiny-ratio16) are covered with the FP8/FP4 checkpoint support.
"""

from __future__ import annotations

import pytest
import torch

from helpers import require_fixture
from transformers_deepseek import DeepseekV4ForCausalLM
from transformers_deepseek.modeling.numerics import ceil_pow2_scale
from transformers_deepseek.parity import checkpoint_dir, end_to_end, load_golden, rel_l2, teacher_forced

TOLERANCE = 1.5  # x the fixture's per-layer noise floor
E2E_TOLERANCE = 1.2  # x the fixture's end-to-end noise floor


@pytest.fixture(scope="module")
def bf16():
    golden = load_golden(require_fixture("tiny-bf16"))
    with checkpoint_dir(golden.root) as ckpt:
        model = DeepseekV4ForCausalLM.from_pretrained(ckpt).eval()
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


class _Recorder:
    """Forward hooks collecting module outputs by name."""

    def __init__(self, model, names):
        self.out = {}
        self.handles = [
            model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: self.out.setdefault(n, o)) for n in names
        ]

    def close(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _run_layers_from_golden_layer0(model, golden, names):
    """Batch 0 through layers 1-3, fed the stored layer-0 streams; returns hooked outputs."""
    streams, _ = golden.stream(0)
    ids = golden.input_ids[:1]
    positions = torch.arange(ids.shape[1]).expand(1, -1)
    rec = _Recorder(model, names)
    try:
        for layer in range(1, model.config.num_hidden_layers):
            streams = model.layers[layer](streams, positions, ids)
    finally:
        rec.close()
    return rec.out


def test_hash_routing_ids_identical(bf16):
    model, golden = bf16
    rec = _Recorder(model, ["layers.0.ffn.gate"])
    with torch.no_grad():
        model(golden.input_ids)
    rec.close()
    _, ids = rec.out["layers.0.ffn.gate"]
    expected = golden.tensors["debug.prefill.layer0.routing"].long().view(-1, ids.shape[-1])
    assert torch.equal(ids, expected)


def _assert_on_e4m3_grid(values: torch.Tensor, block: int) -> None:
    """Every block of ``block`` values is e4m3 * a power-of-two scale (the official ue8m0 FP8 simulation)."""
    x = values.float().unflatten(-1, (-1, block))
    scale = ceil_pow2_scale(x.abs().amax(-1, keepdim=True).clamp_min(1e-4), 448.0)
    q = x / scale
    assert torch.equal(q.to(torch.float8_e4m3fn).float(), q)


def test_kv_nope_dims_on_e4m3_grid_and_equal_golden(bf16):
    model, golden = bf16
    rd = model.config.qk_rope_head_dim
    out = _run_layers_from_golden_layer0(model, golden, ["layers.1.attn.compressor", "layers.2.attn.compressor"])
    for layer in (1, 2):
        ours = out[f"layers.{layer}.attn.compressor"][0]  # [n, D]
        cache = golden.tensors[f"debug.prefill.layer{layer}.kv_cache"][0]  # [window | compressed (zero padded)]
        theirs = cache[model.config.sliding_window : model.config.sliding_window + ours.shape[0]]
        _assert_on_e4m3_grid(ours[..., :-rd], 64)
        _assert_on_e4m3_grid(theirs[..., :-rd], 64)
        if layer == 1:  # fed the stored layer-0 streams: bit-identical
            assert torch.equal(ours, theirs)
        # Layer 2 is fed our own layer-1 output (tiny-bf16 stores no layer-1 streams), so only its grid is checked
        # here; its values are compared per layer on tiny-fp8-fp4, which stores every layer's streams.
    # Window KV (the ring after a 300-token prefill holds positions 284..299 at slot pos % window).
    attn = model.layers[1].attn
    window = model.config.sliding_window
    x = _attention_input(model, golden, 1)
    from transformers_deepseek.modeling.numerics import rope_cis

    kv = attn.window_kv(x, rope_cis(attn.inv_freq, torch.arange(x.shape[1]).expand(1, -1)))[0]
    _assert_on_e4m3_grid(kv[..., :-rd], 64)
    ring = golden.tensors["debug.prefill.layer1.kv_cache"][0, :window]
    positions = torch.arange(x.shape[1] - window, x.shape[1])
    assert torch.equal(kv[positions], ring[positions % window])


@torch.no_grad()
def _attention_input(model, golden, layer):
    """The normed attention input of ``layer`` for batch 0 fed the stored streams of ``layer - 1``."""
    captured = {}
    def grab(module, args):
        captured["x"] = args[0]  # returns None: a pre-hook's return value would replace the arguments

    handle = model.layers[layer].attn.register_forward_pre_hook(grab)
    streams, _ = golden.stream(layer - 1)
    ids = golden.input_ids[:1]
    model.layers[layer](streams, torch.arange(ids.shape[1]).expand(1, -1), ids)
    handle.remove()
    return captured["x"]


def test_indexer_keys_on_fp4_grid_and_equal_golden(bf16):
    model, golden = bf16
    out = _run_layers_from_golden_layer0(model, golden, ["layers.1.attn.indexer.compressor"])
    keys = out["layers.1.attn.indexer.compressor"][0].float()
    x = keys.unflatten(-1, (-1, 32))
    scale = ceil_pow2_scale(x.abs().amax(-1, keepdim=True).clamp_min(6 * 2.0**-126), 6.0)
    grid = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])
    assert torch.isin((x / scale).abs(), grid).all()
    assert torch.equal(keys, golden.tensors["debug.prefill.layer1.indexer_kv_cache"][0].float())


def test_compressed_visibility_and_indexer_topk(bf16):
    model, golden = bf16
    k = model.config.index_topk
    out = _run_layers_from_golden_layer0(model, golden, ["layers.1.attn.indexer", "layers.3.attn.indexer", "layers.3"])
    final = golden.tensors["mtp.input_hidden"][0]
    match = (out["layers.3"][0, : final.shape[0]] == final).flatten(1).all(-1)
    exact_prefix = int(match.long().cumprod(0).sum())
    assert exact_prefix == final.shape[0]
    for layer in (1, 3):
        ours = out[f"layers.{layer}.attn.indexer"][0]  # [S, k] entry ids, -1 = not visible yet
        theirs = golden.tensors[f"prefill.layer{layer}.indexer_topk"][0].long()
        seqlen = theirs.shape[0]
        theirs = torch.where(theirs >= 0, theirs - seqlen, -1)  # golden carries the +seqlen offset
        # Visibility is exact: entry i is visible to query t iff i < (t + 1) // 4.
        assert torch.equal((ours < 0).sum(-1), (theirs < 0).sum(-1)), layer
        expected_visible = torch.clamp((torch.arange(seqlen) + 1) // 4, max=k)
        assert torch.equal((ours >= 0).sum(-1), expected_visible)
        ties = golden.topk_ties(layer, k)[0]
        same = torch.tensor([set(a.tolist()) == set(b.tolist()) for a, b in zip(ours, theirs)])
        # Layer 1 sees the stored layer-0 streams at every position. Layer 3's input is only known to equal the
        # official one on the positions where the chained output matches the stored final streams bit for bit.
        rows = seqlen if layer == 1 else exact_prefix
        assert same[:rows][~ties[:rows]].all(), (~same & ~ties)[:rows].nonzero().flatten().tolist()
