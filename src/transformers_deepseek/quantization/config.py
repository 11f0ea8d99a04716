"""Quantization config of the released DeepSeek-V4 FP8 / FP4-expert checkpoints (SPEC §2-§3).

The released ``config.json`` says ``quant_method: "fp8"``, the method name of transformers' generic fine-grained FP8
quantizer. That quantizer stays untouched for every other model: :class:`DeepseekV4Config` renames the method to
:data:`QUANT_METHOD` in memory for V4 configs only (``scale_fmt: ue8m0``), so ``from_pretrained`` picks our quantizer,
and :meth:`DeepseekV4FP8Config.to_dict` writes the released name back, so saved configs stay loadable everywhere.
"""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from .formats import FP8_BLOCK_SIZE

# In-memory method name; "fp8" is the on-disk (released) one.
QUANT_METHOD = "deepseek_v4_fp8"
RELEASED_QUANT_METHOD = "fp8"
EXPERT_DTYPES = ("fp4", "fp8")

# Released keys, in the order of the released config.json.
_RELEASED_KEYS = ("activation_scheme", "fmt", "quant_method", "scale_fmt", "weight_block_size")


class DeepseekV4FP8Config(QuantizationConfigMixin):
    """FP8 e4m3 linears with ue8m0 128x128 scales, routed experts FP4 e2m1 with ue8m0 1x32 scales (SPEC §3).

    Released fields (kept verbatim): ``fmt`` (``"e4m3"``), ``scale_fmt`` (``"ue8m0"``), ``activation_scheme``
    (``"dynamic"``: activations are quantized per 1x128 block at run time, SPEC §5.1), ``weight_block_size``
    (``[128, 128]``), and ``expert_dtype`` when the release nests it here (later releases; the V4 release has it at
    the top level of config.json, which the quantizer reads as well).

    Loading options (never written to disk):

    - ``dequantize=True``: every quantized linear becomes a plain bf16 ``nn.Linear`` holding the exact official
      dequantization (for training / PEFT). Activations are then NOT FP8-quantized before the GEMMs, so the
      numerics are native-style bf16 compute, not the official ones (SPEC §5.1-5.2).
    - ``fp4_to_fp8=True``: routed experts are re-encoded losslessly to FP8 128x128 blocks after loading
      (convert.py ``--expert-dtype fp8``); the model then saves with FP8 experts and ``expert_dtype: "fp8"``.
    """

    def __init__(
        self,
        fmt: str = "e4m3",
        scale_fmt: str = "ue8m0",
        activation_scheme: str = "dynamic",
        weight_block_size: list[int] | tuple[int, int] = FP8_BLOCK_SIZE,
        expert_dtype: str | None = None,
        dequantize: bool = False,
        fp4_to_fp8: bool = False,
        quant_method: str = QUANT_METHOD,
        **kwargs: Any,
    ) -> None:
        if quant_method not in (QUANT_METHOD, RELEASED_QUANT_METHOD):
            raise ValueError(
                f"DeepseekV4FP8Config.quant_method must be {QUANT_METHOD!r} (or the released "
                f"{RELEASED_QUANT_METHOD!r}), got {quant_method!r}"
            )
        self.quant_method = QUANT_METHOD
        self.fmt = fmt
        self.scale_fmt = scale_fmt
        self.activation_scheme = activation_scheme
        self.weight_block_size = list(weight_block_size)
        self.expert_dtype = expert_dtype
        self.dequantize = bool(dequantize)
        self.fp4_to_fp8 = bool(fp4_to_fp8)
        # Unknown released keys are kept and written back unchanged.
        self._extra = dict(kwargs)
        self.post_init()

    def post_init(self) -> None:
        """Validate the fields (ValueError naming the field, found vs expected)."""
        if self.fmt != "e4m3":
            raise ValueError(f"DeepseekV4FP8Config.fmt must be 'e4m3', got {self.fmt!r}")
        if self.scale_fmt != "ue8m0":
            raise ValueError(
                f"DeepseekV4FP8Config.scale_fmt must be 'ue8m0' (power-of-two scales), got {self.scale_fmt!r}"
            )
        if self.activation_scheme != "dynamic":
            raise ValueError(
                f"DeepseekV4FP8Config.activation_scheme must be 'dynamic', got {self.activation_scheme!r}"
            )
        if tuple(self.weight_block_size) != tuple(FP8_BLOCK_SIZE):
            raise ValueError(
                f"DeepseekV4FP8Config.weight_block_size must be {list(FP8_BLOCK_SIZE)}, got {self.weight_block_size!r}"
            )
        if self.expert_dtype not in (None, *EXPERT_DTYPES):
            raise ValueError(
                f"DeepseekV4FP8Config.expert_dtype must be 'fp4', 'fp8' or absent, got {self.expert_dtype!r}"
            )
        if self.dequantize and self.fp4_to_fp8:
            raise ValueError("DeepseekV4FP8Config: dequantize=True and fp4_to_fp8=True are mutually exclusive")

    @property
    def block(self) -> tuple[int, int]:
        return int(self.weight_block_size[0]), int(self.weight_block_size[1])

    def get_loading_attributes(self) -> dict[str, Any]:
        """Options a ``quantization_config=`` passed to ``from_pretrained`` may override on a released config."""
        return {"dequantize": self.dequantize, "fp4_to_fp8": self.fp4_to_fp8}

    def to_dict(self) -> dict[str, Any]:
        """The released form: the released keys (``quant_method: "fp8"``) and a nested ``expert_dtype`` only if it
        was given. Loading options are never written: they describe how a checkpoint was loaded, not its format."""
        out: dict[str, Any] = {
            "activation_scheme": self.activation_scheme,
            "fmt": self.fmt,
            "quant_method": RELEASED_QUANT_METHOD,
            "scale_fmt": self.scale_fmt,
            "weight_block_size": list(self.weight_block_size),
        }
        if self.expert_dtype is not None:
            out["expert_dtype"] = self.expert_dtype
        out.update(copy.deepcopy(self._extra))
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def __iter__(self):  # dict(obj), as QuantizationConfigMixin offers
        yield from self.to_dict().items()


def is_released_v4_fp8(quantization_config: Any) -> bool:
    """Whether a config.json ``quantization_config`` is the released V4 FP8 one (``fp8`` + ``ue8m0``)."""
    if isinstance(quantization_config, DeepseekV4FP8Config):
        return True
    if not isinstance(quantization_config, dict):
        return False
    method = quantization_config.get("quant_method")
    return method == QUANT_METHOD or (
        method == RELEASED_QUANT_METHOD and quantization_config.get("scale_fmt") == "ue8m0"
    )
