"""Which MoE families prism-moe serves, and a start-up refusal that says why for the others.

transformers 5 describes every routed-experts module through the flags `use_experts_implementation` sets
(`has_gate`, `has_bias`, `is_transposed`, `is_concatenated`, `has_post_expert_norm`) plus an optional
`_apply_gate` of its own (GPT-OSS's clamped SwiGLU). The loader hands the expert store each expert in one
canonical form whatever the checkpoint layout: `gate_up` [2I, H] with the gate rows first, `down` [H, I]
(transposed layouts are transposed back, GPT-OSS's interleaved gate/up rows split), biases `gate_up_bias` [2I]
and `down_bias` [H] where the family has them (the expert store's canonical form). Whether the store can compute a module is the expert
store's own check (`experts._check_layout`); this module turns its refusal into a message naming the family
and each feature its experts use that the store lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


class UnsupportedModelError(NotImplementedError):
    """A model family prism-moe cannot serve (raised at start-up, before any weight is read)."""


@dataclass(frozen=True)
class ExpertsLayout:
    """How one transformers experts module stores and computes its experts."""

    family: str
    module: str
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool
    has_post_expert_norm: bool
    custom_gate: bool

    @classmethod
    def of(cls, module: nn.Module, family: str) -> ExpertsLayout:
        from transformers.integrations.moe import _default_apply_gate

        return cls(family=family, module=type(module).__name__,
                   has_gate=bool(getattr(module, "has_gate", True)),
                   has_bias=bool(getattr(module, "has_bias", False)),
                   is_transposed=bool(getattr(module, "is_transposed", False)),
                   is_concatenated=bool(getattr(module, "is_concatenated", True)),
                   has_post_expert_norm=bool(getattr(module, "has_post_expert_norm", False)),
                   custom_gate=getattr(type(module), "_apply_gate", _default_apply_gate) is not _default_apply_gate)

    def features(self) -> list[str]:
        """What these experts need beyond plain `act(gate) * up` with concatenated, bias-free weights."""
        out = []
        if not self.has_gate:
            out.append("experts without a gate projection (up_proj only)")
        if self.has_bias:
            out.append("biases on the gate_up and down projections")
        if self.custom_gate:
            out.append(f"its own gate activation ({self.module}._apply_gate)")
        if not self.is_concatenated:
            out.append("interleaved gate/up rows")
        if self.has_post_expert_norm:
            out.append("a norm after each expert")
        return out

    def canonical(self, name: str, t: Tensor) -> Tensor:
        """One expert's `name` tensor in the module's layout -> the store's: matrices [out, in], gate rows first.

        Transposed layouts ([H, 2I], [I, H]) are transposed back; interleaved gate/up rows (gate0, up0, gate1,
        ...) are split into gate rows then up rows, for `gate_up_proj` and its bias alike.
        """
        if self.is_transposed and t.dim() == 2:
            t = t.t()
        if not self.is_concatenated and name in ("gate_up_proj", "gate_up_proj_bias"):
            t = torch.cat([t[0::2], t[1::2]], dim=0)
        return t.contiguous()


def check_servable(model: nn.Module, family: str) -> list[ExpertsLayout]:
    """Layouts of the model's experts modules; raises `UnsupportedModelError` if the store cannot compute one."""
    from .experts import _check_layout, experts_modules

    layouts = []
    for _, module in experts_modules(model):
        layout = ExpertsLayout.of(module, family)
        try:
            _check_layout(module)
        except NotImplementedError as e:
            missing = "; ".join(layout.features()) or str(e)
            raise UnsupportedModelError(
                f"model family {family!r} ({layout.module}) cannot be served yet: prism-moe's expert store does not "
                f"compute {missing}. Use a family whose experts are plain act(gate) * up (mixtral, qwen2_moe, "
                f"qwen3_moe, olmoe, deepseek_v2/v3, glm4_moe, ernie4_5_moe, ...)") from None
        layouts.append(layout)
    if not layouts:
        raise UnsupportedModelError(f"model family {family!r} ({type(model).__name__}) has no routed-experts module "
                                    f"that goes through transformers' ExpertsInterface, so it has no experts to "
                                    f"place")
    return layouts
