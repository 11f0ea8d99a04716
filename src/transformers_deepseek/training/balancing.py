"""DeepSeek's auxiliary-loss-free expert balancing as a transformers ``TrainerCallback``.

Every score-routed MoE layer selects its top-k experts on ``scores + bias`` (the bias only selects, it never weighs,
SPEC §4). After each optimizer step the callback nudges each layer's bias toward balance with the expert loads
counted during that step (DeepSeek-V3 §2.1.2): ``bias_i += gamma * sign(mean_load - load_i)``. Hash-routed layers
(``layer < num_hash_layers``) have no bias and are only observed.

Counting uses forward hooks on the routers that read their outputs (never change them) while the model is in
training mode; evaluation and inference passes are not counted and are numerically untouched. With gradient
checkpointing a layer's forward runs twice per step, which scales every count of the step by the same factor and so
changes neither the signs of the update nor the logged ratios.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

from ..modeling.modeling_deepseek_v4 import DeepseekV4Gate


def _score_entropy(gate: DeepseekV4Gate, x: torch.Tensor) -> tuple[float, int]:
    """Sum over tokens of the entropy of the router's normalized scores (``x [T, dim]``), and the token count."""
    scores = F.linear(x.detach().float(), gate.weight.detach().float())
    if gate.score_func == "softmax":
        p = scores.softmax(-1)
    else:
        p = scores.sigmoid() if gate.score_func == "sigmoid" else F.softplus(scores).sqrt()
        p = p / p.sum(-1, keepdim=True)
    return float(-(p * p.clamp_min(1e-30).log()).sum()), int(x.shape[0])


class ExpertBalancingCallback(TrainerCallback):
    """Auxiliary-loss-free balancing (``gamma`` = bias update speed; DeepSeek-V3 used 0.001) and MoE logging.

    Logged with the Trainer's other metrics (``state.log_history`` and every reporting integration), per MoE layer
    ``L`` over the steps since the previous log: ``moe/layer{L}/max_mean_load`` (max over mean expert load, 1 is
    perfectly balanced) and ``moe/layer{L}/router_entropy`` (mean entropy of the per-token normalized router scores,
    nats), plus ``moe/max_mean_load`` (the mean over layers). ``history`` keeps the per-step max/mean loads
    ``{layer: [...]}`` for inspection; ``gamma=0`` observes without updating.
    """

    def __init__(self, gamma: float = 1e-3, log_entropy: bool = True) -> None:
        if gamma < 0 or not math.isfinite(gamma):
            raise ValueError(f"ExpertBalancingCallback: gamma must be a finite value >= 0, got {gamma}")
        self.gamma = gamma
        self.log_entropy = log_entropy
        self.gates: dict[int, DeepseekV4Gate] = {}
        self.history: dict[int, list[float]] = {}
        self._hooks: list[Any] = []
        self._step_counts: dict[int, torch.Tensor] = {}
        self._window_counts: dict[int, torch.Tensor] = {}
        self._entropy: dict[int, list[float]] = {}

    # ------------------------------------------------------------------ hooks
    def attach(self, model: nn.Module) -> None:
        """Hook every main-model router of ``model`` (a V4 model, possibly wrapped by PEFT / DDP)."""
        self.detach()
        for name, module in model.named_modules():
            if isinstance(module, DeepseekV4Gate) and ".mtp." not in f".{name}":
                layer = int(name.split("layers.")[-1].split(".")[0])
                self.gates[layer] = module
                self._hooks.append(module.register_forward_hook(self._observe(layer)))
        if not self.gates:
            raise ValueError("ExpertBalancingCallback: the model has no DeepSeek-V4 MoE routers (DeepseekV4Gate)")

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self.gates = [], {}

    def _observe(self, layer: int):
        def hook(module: DeepseekV4Gate, args: tuple, output: tuple[torch.Tensor, torch.Tensor]) -> None:
            if not module.training:
                return
            with torch.no_grad():
                counts = torch.bincount(output[1].flatten(), minlength=module.n_experts).to(torch.float64).cpu()
                self._step_counts[layer] = self._step_counts.get(layer, 0) + counts
                if self.log_entropy:
                    h, n = _score_entropy(module, args[0])
                    acc = self._entropy.setdefault(layer, [0.0, 0])
                    acc[0] += h
                    acc[1] += n

        return hook

    # ------------------------------------------------------------------ balancing
    @torch.no_grad()
    def update_biases(self) -> dict[int, float]:
        """Apply the bias update from the loads of the finished step; returns its max/mean load per layer."""
        ratios = {}
        for layer, counts in self._step_counts.items():
            mean = counts.mean()
            ratios[layer] = float(counts.max() / mean) if mean > 0 else 1.0
            self.history.setdefault(layer, []).append(ratios[layer])
            self._window_counts[layer] = self._window_counts.get(layer, 0) + counts
            gate = self.gates[layer]
            if gate.bias is not None and self.gamma > 0:
                step = torch.sign(mean - counts).to(gate.bias.dtype).to(gate.bias.device)
                gate.bias.add_(self.gamma * step)
        self._step_counts = {}
        return ratios

    # ------------------------------------------------------------------ TrainerCallback
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("ExpertBalancingCallback needs the Trainer's model (on_train_begin got model=None)")
        self.attach(model)

    def on_step_end(self, args, state, control, **kwargs):
        self.update_biases()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._window_counts:
            return
        metrics: dict[str, float] = {}
        for layer in sorted(self._window_counts):
            counts = self._window_counts[layer]
            metrics[f"moe/layer{layer}/max_mean_load"] = round(float(counts.max() / counts.mean().clamp_min(1e-12)), 4)
            if layer in self._entropy and self._entropy[layer][1]:
                h, n = self._entropy[layer]
                metrics[f"moe/layer{layer}/router_entropy"] = round(h / n, 4)
        ratios = [v for k, v in metrics.items() if k.endswith("max_mean_load")]
        metrics["moe/max_mean_load"] = round(sum(ratios) / len(ratios), 4)
        self._window_counts, self._entropy = {}, {}
        if logs is not None:
            logs.update(metrics)
        # Trainer.log appended its record to log_history before calling on_log: add ours to the same record.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)

    def on_train_end(self, args, state, control, **kwargs):
        self.detach()
