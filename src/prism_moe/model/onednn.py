"""oneDNN's float32 linear on CPU, and expert weights stored in its packed (blocked) layout.

oneDNN is what vLLM's CPU backend and torch inductor's CPU code compute linear layers with. Two things make it
faster than `nn.functional.linear` (MKL) for an expert's small GEMMs on this project's CPU (an AMD EPYC, where
MKL does not take its fastest code path): its kernels, measured 1.2x (8 rows) to 2x (120 rows); and weights
reordered once into the blocked layout its kernel reads (`pack`, what inductor's `_reorder_linear_weight`
freezing pass does), a further 1.3-1.8x at decode sizes (1-16 rows per expert), because a decode step reads
every expert's weights once and the blocked layout streams them. Packed results equal the unpacked ones (the
same kernel reads the same numbers); `unpack` gives the exact dense weight back (migration sends it).

A packed weight is an opaque tensor (`layout=torch._mkldnn`): no views, no storage, only oneDNN reads it.

`pack_linears` does the same for a model's dense linear layers (attention projections, routers, LM head), as vLLM's
CPU backend does: measured 1.7x MKL at 64 rows (a decode step of 64 requests) and 2x at 192 (a prefill), equal at
16, slower at 1 row (13 vs 4 us of fixed cost per call at this project's tiny sizes).
"""

from __future__ import annotations

import functools
import threading
import types
from collections import Counter

import torch
from torch import Tensor, nn

# the batch size oneDNN picks the blocked layout for: 4-16 rows measured best at decode sizes and no worse than
# the unpacked weight up to 256 rows (an expert's share of a decode step is a few rows; a prefill's, tens)
PACK_ROWS = 8


@functools.cache
def _ops() -> tuple | None:  # (linear, reorder) op overloads, or None where this torch lacks them
    if not torch.backends.mkldnn.is_available():
        return None
    try:  # the fp32 linear inductor's CPU backend calls; takes the weight as stored ([out, in]) or packed
        return torch.ops.mkldnn._linear_pointwise.default, torch.ops.mkldnn._reorder_linear_weight.default
    except (AttributeError, RuntimeError):
        return None


def usable(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether `linear` (and `pack`) can run: float32 on a CPU whose torch has oneDNN's linear."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and _ops() is not None


def pack(weight: Tensor) -> Tensor:
    """weight [out, in] (float32, CPU) -> the same weight in oneDNN's blocked layout (an opaque tensor)."""
    if not usable(weight.device, weight.dtype):
        raise ValueError(f"oneDNN packing takes float32 CPU weights on a torch with oneDNN; got {weight.dtype} "
                         f"on {weight.device}")
    return _ops()[1](weight.contiguous(), PACK_ROWS)


def unpack(weight: Tensor) -> Tensor:
    """A packed weight's dense [out, in] copy (exact); a dense weight as it is."""
    return weight.to_dense() if weight.is_mkldnn else weight


_omp = threading.local()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [n, in] @ weight.T + bias with oneDNN; weight dense [out, in] or `pack`ed."""
    if getattr(_omp, "threads", None) != torch.get_num_threads():
        # oneDNN runs on OpenMP, whose thread count is per thread: a thread started after `torch.set_num_threads`
        # (the engine's loop, the expert service's worker) would use every core, measured 8x slower here
        torch.set_num_threads(torch.get_num_threads())
        _omp.threads = torch.get_num_threads()
    ops = _ops()
    assert ops is not None, "oneDNN linear called where `usable` is False"
    return ops[0](x, weight, bias, "none", [None], "")


def _packed_forward(module: nn.Linear, x: Tensor) -> Tensor:
    y = linear(x.reshape(-1, x.shape[-1]), module.weight, module.bias)
    return y.view(*x.shape[:-1], y.shape[-1])


def pack_linears(model: nn.Module) -> int:
    """Keep the weight of every float32 CPU `nn.Linear` of `model` oneDNN-packed (in place of the dense one: no
    second copy) and compute the layer with oneDNN. A weight another parameter shares (a tied LM head) stays as it
    is. Returns how many layers were packed."""
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    packed = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if type(module) is not nn.Linear or w is None or w.is_mkldnn or uses[id(w)] > 1 or not usable(w.device, w.dtype):
            continue
        module.weight = nn.Parameter(pack(w.detach()), requires_grad=False)
        module.forward = types.MethodType(_packed_forward, module)  # type: ignore[method-assign]
        packed += 1
    return packed
