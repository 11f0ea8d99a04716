"""Parity against golden outputs of the official model (SPEC §10), shared by the tests and ``bench/parity.py``.

A golden fixture directory holds ``checkpoint/`` (released layout), ``golden.safetensors`` and ``meta.json``
(noise floors, recorded top-k ties). The primary comparison is per-layer teacher forcing: layer L is fed the
stored input streams and its output compared with the stored output streams (relative L2).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

FLOOR_KEY = "noise floor: alt numerics (summation order / bf16 rounding placement)"


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in fp64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@dataclass
class Golden:
    """A loaded fixture: tensors, meta, and paths."""

    root: Path
    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tensors["input_ids"]

    def layer_floor(self, layer: int | str) -> float:
        key = f"layer{layer}" if isinstance(layer, int) else layer
        return self.meta["diagnostics"]["per_layer_teacher_forced_rel_l2"][FLOOR_KEY][key]

    def mtp_floor(self) -> float | None:
        floors = self.meta["diagnostics"]["per_layer_teacher_forced_rel_l2"][FLOOR_KEY]
        return floors.get("mtp")

    @property
    def end_to_end_floor(self) -> float:
        return self.meta["diagnostics"]["noise_floor"]["end_to_end_alt_numerics"]["rel_l2"]

    def stream(self, layer: int) -> tuple[torch.Tensor, slice] | None:
        """Stored streams after ``layer`` and the batch rows they cover (both rows, or batch 0 only)."""
        for key, rows in ((f"prefill.hidden_after_layer{layer}", slice(None)),
                          (f"prefill.b0.hidden_after_layer{layer}", slice(0, 1))):  # fmt: skip
            if key in self.tensors:
                return self.tensors[key], rows
        return None

    def topk_ties(self, layer: int, k: int) -> torch.Tensor:
        """``[B, S]`` bool: rows whose golden bf16 index scores tie at the top-k boundary (k-th == (k+1)-th), where
        the official ``topk`` may pick either entry. Derived from ``debug.prefill.layer{L}.index_score``."""
        score = self.tensors[f"debug.prefill.layer{layer}.index_score"].float()
        top = score.sort(dim=-1, descending=True).values
        if top.shape[-1] <= k:
            return torch.zeros(score.shape[:2], dtype=torch.bool)
        kth, nxt = top[..., k - 1], top[..., k]
        return (kth == nxt) & torch.isfinite(kth)


def load_golden(root: str | os.PathLike) -> Golden:
    root = Path(root)
    return Golden(root, load_file(str(root / "golden.safetensors")), json.loads((root / "meta.json").read_text()))


@contextmanager
def checkpoint_dir(root: str | os.PathLike) -> Iterator[Path]:
    """The fixture's ``checkpoint/`` as a loadable directory.

    Fixture sets shipped without symlink support store a link as a small text file holding the relative target
    path; such files are presented as real symlinks in a temporary directory (the data is never copied).
    """
    ckpt = Path(root) / "checkpoint"
    links = {}
    for f in ckpt.iterdir():
        if f.is_file() and f.suffix == ".safetensors" and f.stat().st_size < 1024:
            target = (ckpt / f.read_text().strip()).resolve()
            if target.is_file():
                links[f.name] = target
    if not links:
        yield ckpt
        return
    with tempfile.TemporaryDirectory(prefix="tdseek-ckpt-") as tmp:
        for f in ckpt.iterdir():
            (Path(tmp) / f.name).symlink_to(links.get(f.name, f.resolve()))
        yield Path(tmp)


def embed_streams(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Layer-0 input: the embedding repeated into ``hc_mult`` streams ``[B,S,hc,dim]``."""
    return model.embed(input_ids).unsqueeze(2).repeat(1, 1, model.config.hc_mult, 1)


def _positions(batch: int, seqlen: int) -> torch.Tensor:
    return torch.arange(seqlen).expand(batch, seqlen)


@dataclass
class ParityReport:
    fixture: str
    layers: dict[str, tuple[float, float | None]] = field(default_factory=dict)  # name -> (rel_l2, floor)
    end_to_end: tuple[float, float] | None = None
    argmax_agreement: float | None = None

    def lines(self, label: str = "ours") -> list[str]:
        out = []
        for name, (err, floor) in self.layers.items():
            ratio = f"{err / floor:6.2f}x floor" if floor else "   (no floor)"
            floor_s = f"{floor:.4f}" if floor else "   -  "
            out.append(f"{self.fixture:14s} {name:22s} {label:6s} rel_l2 {err:.5f}  floor {floor_s}  {ratio}")
        if self.end_to_end:
            err, floor = self.end_to_end
            out.append(
                f"{self.fixture:14s} {'end-to-end logits':22s} {label:6s} rel_l2 {err:.5f}  floor {floor:.4f}  "
                f"{err / floor:6.2f}x floor  argmax agree {self.argmax_agreement:.3f}"
            )
        return out


@torch.no_grad()
def teacher_forced(model: torch.nn.Module, golden: Golden, call_layer=None, embed=None) -> ParityReport:
    """Per-layer teacher forcing on every layer whose input and output streams the fixture stores, the MTP
    block, and (for layers whose inputs are not stored) the chain from the last stored stream to the final
    streams stored as ``mtp.input_hidden``.

    ``call_layer(model, layer_idx, streams, positions, input_ids)`` runs one decoder layer; the default calls
    ``model.layers[L](streams, positions, input_ids)``; ``embed(model, input_ids)`` gives the layer-0 input streams.
    Override both to drive another implementation (``bench/parity.py`` does so for transformers' native model).
    """
    own = call_layer is None
    call_layer = call_layer or (lambda m, i, s, p, ids: m.layers[i](s, p, ids))
    embed = embed or embed_streams
    streams_cache: list = []

    def own_streams(m, input_ids):  # the model's own input streams of every layer, computed once
        if not streams_cache:
            streams_cache.extend(m(input_ids, output_hidden_states=True, use_cache=False).hidden_states)
        return streams_cache

    full_batch = own_streams if own else None
    ids = golden.input_ids
    report = ParityReport(golden.name)
    n_layers = model.config.num_hidden_layers
    last_known: tuple[int, torch.Tensor, slice] | None = None
    for layer in range(n_layers):
        if layer == 0:
            inp, rows = embed(model, ids), slice(None)
        else:
            stored = golden.stream(layer - 1)
            if stored is None:
                continue
            inp, rows = stored
        out = golden.stream(layer)
        if out is None:
            last_known = (layer, inp, rows)
            continue
        target, out_rows = out
        if inp.shape[0] < ids.shape[0] and full_batch is not None:
            # Only batch row 0 is stored: run the layer on the whole batch anyway (CPU kernels round differently
            # for other batch shapes), rows 1.. taken from the model's own forward.
            inp = torch.cat([inp, full_batch(model, ids)[layer][inp.shape[0] :]], dim=0)
        sub_ids = ids[: inp.shape[0]]
        got = call_layer(model, layer, inp, _positions(*sub_ids.shape), sub_ids)[out_rows]
        report.layers[f"layer{layer}"] = (rel_l2(got, target), golden.layer_floor(layer))
        last_known = (layer + 1, target, rows)
    final_key = "mtp.input_hidden"
    if last_known is not None and last_known[0] < n_layers and final_key in golden.tensors:
        start, streams, rows = last_known
        target = golden.tensors[final_key][rows]
        n = target.shape[1]
        sub_ids = ids[rows, :]
        s = streams
        for layer in range(start, n_layers):
            s = call_layer(model, layer, s, _positions(*sub_ids.shape), sub_ids)
        floors = [golden.layer_floor(i) for i in range(start, n_layers)]
        report.layers[f"layers{start}-{n_layers - 1} chained[:{n}]"] = (rel_l2(s[:, :n], target), min(floors))
    if "mtp.logits" in golden.tensors and hasattr(model, "mtp_logits") and len(model.mtp):
        got = model.mtp_logits(golden.tensors["mtp.input_hidden"], golden.tensors["mtp.input_ids"])
        report.layers["mtp (logits)"] = (rel_l2(got, golden.tensors["mtp.logits"]), golden.mtp_floor())
    return report


@torch.no_grad()
def end_to_end(model: torch.nn.Module, golden: Golden, report: ParityReport | None = None) -> ParityReport:
    """Prefill logits at every position vs ``prefill.logits`` (a coarse check, SPEC §10)."""
    report = report or ParityReport(golden.name)
    logits = model(golden.input_ids).logits.float()
    target = golden.tensors["prefill.logits"]
    report.end_to_end = (rel_l2(logits, target), golden.end_to_end_floor)
    report.argmax_agreement = float((logits.argmax(-1) == target.argmax(-1)).float().mean())
    return report
