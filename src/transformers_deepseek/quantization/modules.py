"""Quantized linears holding the released packed weights as their storage (SPEC §3, §5.1-5.3, §6).

CPU compute dequantizes one module's weight per call (exact: e4m3/e2m1 values times power-of-two scales are exact in
fp32) and discards it afterwards, so the resident model stays packed. Inputs go through the official FP8 activation
quantization (``act_quant(x, 128)`` with ue8m0 scales) first. The official ``fp8_gemm`` / ``fp4_gemm`` sum fp32 partial
products of 128-wide (FP8) or 32-wide (FP4) K blocks, each scaled by ``a_s * b_s``; here the same exact products are
summed by one fp32 matmul of the dequantized operands, which differs only in fp32 summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.modeling_deepseek_v4 import DeepseekV4GroupedLinear
from ..modeling.numerics import linear, quantize_activation_fp8
from .formats import (
    FP4_BLOCK_SIZE,
    FP8_BLOCK_SIZE,
    dequantize_fp4,
    dequantize_fp8_blocks,
    dequantize_wo_a,
    fp4_to_fp8,
    quantize_fp8_blocks,
)

ACT_BLOCK = 128  # SPEC §5.1: activations are quantized per token in 1x128 blocks before every FP8/FP4 GEMM


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fp8_activation(x: torch.Tensor) -> torch.Tensor:
    """``act_quant(x, 128, ue8m0)`` and back to fp32 values: e4m3 code times its power-of-two scale (exact)."""
    q, s = quantize_activation_fp8(x, ACT_BLOCK)  # [..., K] fp32 e4m3 values, [..., K/128] fp32 scales
    return (q.unflatten(-1, (-1, ACT_BLOCK)) * s.unsqueeze(-1)).flatten(-2)


class _FrozenPackedMatmul(torch.autograd.Function):
    """``act_quant(x) @ W^T`` of a frozen packed linear whose backward dequantizes ``W`` again instead of keeping it.

    Plain autograd would save the fp32 dequantized weight of every packed linear for the backward pass (4 bytes per
    parameter, 4-8x the packed storage); here nothing but the module is kept. The weight gets no gradient (frozen);
    the input gradient is ``grad @ W`` with the activation quantization passed straight through (SPEC §5.1), as the
    simulated quantization points of the model do (numerics.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: _PackedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.module, ctx.dtype = module, x.dtype
        return module.matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return (grad.float() @ ctx.module.dequantized_weight(torch.float32)).to(ctx.dtype), None


class _PackedLinear(nn.Module):
    """Common part: storage is ``weight`` + ``scale`` exactly as released; ``forward`` = act quant + fp32 GEMM."""

    in_features: int
    out_features: int
    # config.batch_invariant, set by the quantizer: rows independent of how many are computed together.
    batch_invariant: bool = True

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input has {x.shape[-1]} features, expected {self.in_features}")
        if torch.is_grad_enabled() and x.requires_grad:  # training through the frozen base (e.g. LoRA)
            return _FrozenPackedMatmul.apply(x, self)
        return self.matmul(x)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Output in the activation dtype (bf16 in the model), as the official GEMMs write the default dtype.
        w = self.dequantized_weight(torch.float32)
        return linear(fp8_activation(x), w, self.batch_invariant).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class FP8Linear(_PackedLinear):
    """FP8 e4m3 weight ``[out, in]`` with one ue8m0 scale per 128x128 block ``[ceil(out/128), ceil(in/128)]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: tuple[int, int] = FP8_BLOCK_SIZE,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block = (int(block[0]), int(block[1]))
        scale_shape = (_ceil_div(out_features, self.block[0]), _ceil_div(in_features, self.block[1]))
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.float8_e4m3fn, device=device), requires_grad=False
        )
        self.scale = nn.Parameter(
            torch.empty(scale_shape, dtype=torch.float8_e8m0fnu, device=device), requires_grad=False
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8_blocks(self.weight, self.scale, dtype, self.block)

    @classmethod
    def from_fp4(cls, module: FP4Linear) -> FP8Linear:
        """Lossless FP4 -> FP8 re-encode (convert.py ``--expert-dtype fp8``, SPEC §3)."""
        weight, scale = fp4_to_fp8(module.weight.data, module.scale.data)
        new = cls(module.in_features, module.out_features, device="meta")
        new.weight = nn.Parameter(weight, requires_grad=False)
        new.scale = nn.Parameter(scale, requires_grad=False)
        new.batch_invariant = module.batch_invariant
        return new


class FP4Linear(_PackedLinear):
    """Routed-expert weight: e2m1 pairs packed in int8 ``[out, in/2]`` (element 2j in the low nibble) with one ue8m0
    scale per 1x32 block ``[out, in/32]``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        block: int = FP4_BLOCK_SIZE,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if in_features % 2:
            raise ValueError(f"FP4Linear: in_features must be even to pack e2m1 pairs, got {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.block = int(block)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features // 2, dtype=torch.int8, device=device), requires_grad=False
        )
        self.scale = nn.Parameter(
            torch.empty(out_features, _ceil_div(in_features, self.block), dtype=torch.float8_e8m0fnu, device=device),
            requires_grad=False,
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp4(self.weight, self.scale, dtype, self.block)


class FP8DequantizedLinear(DeepseekV4GroupedLinear):
    """The grouped bf16 ``wo_a`` dequantized once at load, as convert.py does (SPEC §3, §5.3).

    Its original e8m0 block ``scale`` is kept as a buffer so that saving re-encodes the released FP8 bytes exactly
    (the scale of a dequantized block is ambiguous when its largest value is exactly 224 * s).
    """

    def __init__(
        self, weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] = FP8_BLOCK_SIZE, groups: int = 1
    ) -> None:
        out_features, in_features = weight.shape
        super().__init__(in_features, out_features, groups, device="meta", dtype=torch.bfloat16)
        self.block = (int(block[0]), int(block[1]))
        # SPEC §3: each 128x128 block times its scale in fp32, then bf16.
        self.weight = nn.Parameter(dequantize_wo_a(weight, scale), requires_grad=False)
        self.register_buffer("scale", scale.clone())

    def requantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(float8_e4m3fn weight, e8m0 scale)``: the released bytes for an unmodified weight (kept scale); a weight
        the kept scale no longer encodes exactly gets fresh ue8m0 scales instead."""
        w = self.weight.detach()
        q, s = quantize_fp8_blocks(w, self.block, scale=self.scale)
        if torch.equal(dequantize_fp8_blocks(q, s, w.dtype, self.block), w):
            return q, s
        return quantize_fp8_blocks(w, self.block)


def to_dequantized_linear(
    module: _PackedLinear, dtype: torch.dtype = torch.bfloat16, groups: int | None = None
) -> nn.Linear:
    """A plain ``nn.Linear`` holding the exact official dequantization of ``module`` (``dequantize=True``); with
    ``groups``, the grouped ``wo_a`` form (:class:`DeepseekV4GroupedLinear`)."""
    if groups is None:
        linear = nn.Linear(module.in_features, module.out_features, bias=False, device="meta", dtype=dtype)
    else:
        linear = DeepseekV4GroupedLinear(module.in_features, module.out_features, groups, device="meta", dtype=dtype)
    linear.weight = nn.Parameter(module.dequantized_weight(dtype))
    return linear
