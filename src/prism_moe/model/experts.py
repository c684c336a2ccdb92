"""One experts implementation for every MoE family, plugged into transformers' `ExpertsInterface`.

transformers 5 routes the routed experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3 (and more) through
`ALL_EXPERTS_FUNCTIONS`: each `*Experts` module's forward becomes
`fn(module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]` for the function
named by `config._experts_implementation`. We register `prism_experts_forward` under `"prism"`; it looks up
the MoE layer index, the dispatcher and the `ExpertStore` that `attach` tagged the module with, and hands the
work to the dispatcher. Router, shared experts and everything dense stay in transformers' own code.

The math matches transformers' eager path bit for bit on the same device and dtype: the same per-expert row
order (slot-major, then token), the same `linear -> chunk(gate, up) -> act(gate) * up -> linear`, and the
same accumulation order (`index_add_` in ascending expert id), so greedy decoding gives identical tokens.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .spec import ModelSpec

IMPLEMENTATION = "prism"

# (token rows [n], top-k slots [n]) of the tokens that chose one expert, in eager order.
Group = tuple[Tensor, Tensor]


class PendingReply(Protocol):
    """A remote batch in flight: a `concurrent.futures.Future` or anything with the same two methods."""

    def result(self, timeout: float | None = None) -> Tensor: ...

    def cancel(self) -> bool: ...


# remote(layer, {server: (expert_ids [m], x [m, H])}) -> {server: pending y [m, H] (or y itself)}
RemoteFn = Callable[[int, dict[Hashable, tuple[Tensor, Tensor]]], Mapping[Hashable, "PendingReply | Tensor"]]
# locate(layer, expert_id) -> the server to send that expert's tokens to
LocateFn = Callable[[int, int], Hashable]


class MissingExpertError(LookupError):
    """A token was routed to an expert this process neither holds nor knows where to find."""


class ExpertStore:
    """A subset of one MoE layer's routed experts: expert id -> (gate_up [2I, H], down [H, I]).

    Only held experts take memory. Weights follow transformers' fused layout per expert: rows `[:I]` of
    `gate_up` are the gate projection, rows `[I:]` the up projection (`chunk(2)` order of the eager path).
    """

    def __init__(self, layer: int, act_fn: Callable[[Tensor], Tensor] | str = "silu",
                 weights: Mapping[int, tuple[Tensor, Tensor]] | None = None) -> None:
        if isinstance(act_fn, str):
            from transformers.activations import ACT2FN

            act_fn = ACT2FN[act_fn]
        self.layer = layer
        self.act_fn = act_fn
        self._w: dict[int, tuple[Tensor, Tensor]] = {}
        for e, (gate_up, down) in (weights or {}).items():
            self.add(e, gate_up, down)

    @classmethod
    def from_module(cls, module: nn.Module, layer: int, expert_ids: Sequence[int] | None = None) -> ExpertStore:
        """Views (no copy) into a transformers experts module's fused `gate_up_proj`/`down_proj`."""
        _check_layout(module)
        ids = range(module.gate_up_proj.shape[0]) if expert_ids is None else expert_ids
        return cls(layer, module.act_fn,
                   {int(e): (module.gate_up_proj.data[e], module.down_proj.data[e]) for e in ids})

    # --- contents -------------------------------------------------------------------------------------------
    @property
    def held(self) -> list[int]:
        return sorted(self._w)

    def __contains__(self, expert_id: object) -> bool:
        return expert_id in self._w

    def __len__(self) -> int:
        return len(self._w)

    def __repr__(self) -> str:
        return f"ExpertStore(layer={self.layer}, held={self.held})"

    def get(self, expert_id: int) -> tuple[Tensor, Tensor]:
        """(gate_up [2I, H], down [H, I]) of a held expert."""
        try:
            return self._w[expert_id]
        except KeyError:
            raise MissingExpertError(f"MoE layer {self.layer}: expert {expert_id} is not held here "
                                     f"(held: {self.held})") from None

    def add(self, expert_id: int, gate_up: Tensor, down: Tensor) -> None:
        """Hold one more expert (replaces it if already held). `gate_up` [2I, H], `down` [H, I]."""
        if gate_up.dim() != 2 or down.dim() != 2 or gate_up.shape[0] != 2 * down.shape[1] \
                or gate_up.shape[1] != down.shape[0]:
            raise ValueError(f"expert {expert_id}: expected gate_up [2I, H] and down [H, I], "
                             f"got {tuple(gate_up.shape)} and {tuple(down.shape)}")
        if self._w:
            g0, d0 = next(iter(self._w.values()))
            if g0.shape != gate_up.shape or d0.shape != down.shape or g0.dtype != gate_up.dtype \
                    or g0.device != gate_up.device:
                raise ValueError(f"expert {expert_id}: shape/dtype/device differ from the experts already held")
        self._w[int(expert_id)] = (gate_up, down)

    def remove(self, expert_id: int) -> tuple[Tensor, Tensor]:
        """Stop holding an expert; returns its weights (drop them to free the memory)."""
        w = self.get(expert_id)
        del self._w[expert_id]
        return w

    def nbytes(self) -> int:
        """Bytes of the held weights (views of a larger tensor count only their own elements)."""
        return sum(t.numel() * t.element_size() for w in self._w.values() for t in w)

    def tensors(self) -> list[Tensor]:
        return [t for w in self._w.values() for t in w]

    # --- math -----------------------------------------------------------------------------------------------
    def compute(self, expert_id: int, x: Tensor) -> Tensor:
        """One expert on its tokens: x [n, H] -> [n, H], transformers' eager math, no routing weight."""
        gate_up, down = self.get(expert_id)
        gate, up = nn.functional.linear(x, gate_up).chunk(2, dim=-1)
        return nn.functional.linear(self.act_fn(gate) * up, down)

    def compute_batch(self, expert_ids: Tensor, x: Tensor) -> Tensor:
        """Rows for several experts: expert_ids [m], x [m, H] -> [m, H] (what a peer runs for a request).

        Each expert's rows are computed together in their given order, so results equal `compute` on the
        same rows.
        """
        out = torch.empty_like(x)
        ids = expert_ids.to(x.device)
        for e in torch.unique(ids).tolist():
            rows = (ids == e).nonzero().squeeze(1)
            out[rows] = self.compute(e, x[rows]).to(out.dtype)
        return out


def group_by_expert(top_k_index: Tensor) -> dict[int, Group]:
    """Which (token row, top-k slot) pairs chose each expert: top_k_index [T, k] -> {expert: ([n], [n])}.

    Experts come in ascending id order; within one expert the pairs are slot-major then token order, the
    order transformers' eager loop uses (`torch.where` over its `[k, T]` mask), which keeps results
    bit-identical to it. Negative ids (padding / expert-parallel sentinels) are skipped.
    """
    num_tokens = top_k_index.shape[0]
    flat = top_k_index.t().reshape(-1)  # [k * T], slot-major
    order = torch.argsort(flat, stable=True)
    uniq, counts = torch.unique_consecutive(flat[order], return_counts=True)
    sizes = counts.tolist()
    # rows and slots for all pairs at once, then split per expert (two ops, not two per expert)
    rows, slots = torch.split(order % num_tokens, sizes), torch.split(order // num_tokens, sizes)
    return {e: (r, s) for e, r, s in zip(uniq.tolist(), rows, slots, strict=True) if e >= 0}


def combine(like: Tensor, groups: Mapping[int, Group], outputs: Mapping[int, Tensor],
            top_k_weights: Tensor) -> Tensor:
    """Weighted sum of expert outputs per token -> [T, H] with `like`'s shape, dtype and device.

    `outputs[e]` [n_e, H] holds expert e's results for `groups[e]`'s rows (it may live on another device,
    e.g. straight from the network). Accumulates in ascending expert id, like the eager path: one
    `index_add_` over the pairs in that order adds them to each row in the same order as one call per expert.
    """
    final = torch.zeros_like(like)
    experts = sorted(outputs)
    if not experts:
        return final
    rows = torch.cat([groups[e][0] for e in experts])
    slots = torch.cat([groups[e][1] for e in experts])
    y = torch.cat([outputs[e].to(like.device) for e in experts])
    final.index_add_(0, rows, (y * top_k_weights[rows, slots, None]).to(final.dtype))
    return final


@runtime_checkable
class ExpertDispatcher(Protocol):
    def moe_forward(self, layer: int, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    experts: ExpertStore) -> Tensor:
        """hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> routed-experts output [T, H]."""
        ...


class LocalDispatcher:
    """Every routed expert computed from the local store; a token routed elsewhere is an error.

    `observer(layer, top_k_index [T, k])`, if given, sees every routing decision (activation counts).
    """

    def __init__(self, observer: Callable[[int, Tensor], None] | None = None) -> None:
        self.observer = observer

    def moe_forward(self, layer: int, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    experts: ExpertStore) -> Tensor:
        if self.observer is not None:
            self.observer(layer, top_k_index)
        groups = group_by_expert(top_k_index)
        missing = [e for e in groups if e not in experts]
        if missing:
            raise MissingExpertError(f"MoE layer {layer}: tokens routed to experts {missing} that this server does "
                                     f"not hold (held: {experts.held}); use a dispatcher that sends them to a peer")
        outputs = {e: experts.compute(e, hidden[rows]) for e, (rows, _) in groups.items()}
        return combine(hidden, groups, outputs, top_k_weights)


class RemoteDispatcher(LocalDispatcher):
    """Held experts computed locally, the others sent in one batch per target server, overlapped.

    Per MoE layer: group tokens by expert; ask `locate(layer, e)` where each missing expert lives; call
    `remote(layer, {server: (expert_ids [m], x [m, H])})` once with every server's batch (rows of one
    expert are contiguous, experts ascending) and get futures back; compute the local experts while those
    run; wait; split each reply [m, H] back per expert; combine. Pass `remote`/`locate` or override the
    methods. `remote` must not block: return `concurrent.futures.Future`s, finished tensors, or any handle
    with `result(timeout)` and `cancel()` (the cluster's `DirectCall`s, which wait on the calling thread).

    Threading: `moe_forward` runs on whatever thread runs the model (under continuous batching, the
    manager's generation thread) and blocks in `result()`, so never run the model on an asyncio event
    loop thread; from asyncio code hand coroutines over with `asyncio.run_coroutine_threadsafe`. Replies may
    live on any device (moved in `combine`). Results are bit-identical to local compute when the peer uses
    the same device type and dtype, since it sees the same rows per expert in the same order.
    """

    def __init__(self, remote: RemoteFn | None = None, locate: LocateFn | None = None,
                 timeout: float | None = None, observer: Callable[[int, Tensor], None] | None = None) -> None:
        super().__init__(observer)
        self._remote = remote
        self._locate = locate
        self.timeout = timeout

    def locate(self, layer: int, expert_id: int) -> Hashable:
        if self._locate is None:
            raise MissingExpertError(f"MoE layer {layer}: expert {expert_id} is not held here and no locate "
                                     f"function was given")
        return self._locate(layer, expert_id)

    def remote(self, layer: int, batches: dict[Hashable, tuple[Tensor, Tensor]]
               ) -> Mapping[Hashable, PendingReply | Tensor]:
        if self._remote is None:
            raise NotImplementedError("give RemoteDispatcher a remote function or override remote()")
        return self._remote(layer, batches)

    def moe_forward(self, layer: int, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    experts: ExpertStore) -> Tensor:
        if self.observer is not None:
            self.observer(layer, top_k_index)
        groups = group_by_expert(top_k_index)
        local = [e for e in groups if e in experts]
        plan: dict[Hashable, list[int]] = {}
        for e in groups:
            if e not in experts:
                plan.setdefault(self.locate(layer, e), []).append(e)

        batches: dict[Hashable, tuple[Tensor, Tensor]] = {}
        for server, ids in plan.items():
            rows = [groups[e][0] for e in ids]
            counts = torch.tensor([len(r) for r in rows], device=hidden.device)
            expert_ids = torch.repeat_interleave(torch.tensor(ids, device=hidden.device), counts)
            batches[server] = (expert_ids, hidden[torch.cat(rows)])
        pending = self.remote(layer, batches) if batches else {}
        try:
            outputs = {e: experts.compute(e, hidden[groups[e][0]]) for e in local}  # overlaps the remote calls

            for server, ids in plan.items():
                reply = pending[server]
                y = reply if isinstance(reply, Tensor) else reply.result(self.timeout)
                if y.shape != batches[server][1].shape:
                    raise RuntimeError(f"MoE layer {layer}: server {server!r} answered {tuple(y.shape)} for a "
                                       f"batch of {tuple(batches[server][1].shape)}")
                for e, part in zip(ids, torch.split(y, [len(groups[e][0]) for e in ids]), strict=True):
                    outputs[e] = part
        except BaseException:
            for reply in pending.values():  # let go of calls still out (e.g. after a failed local expert)
                if not isinstance(reply, Tensor):
                    reply.cancel()
            raise
        return combine(hidden, groups, outputs, top_k_weights)


# --- transformers integration ---------------------------------------------------------------------------------
def prism_experts_forward(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                          top_k_weights: Tensor) -> Tensor:
    """The function registered in `ALL_EXPERTS_FUNCTIONS["prism"]`: [T, H], [T, k], [T, k] -> [T, H]."""
    try:
        dispatcher = module.prism_dispatcher
        layer = module.prism_layer
        store = module.prism_store
    except AttributeError:
        raise RuntimeError(f"{type(module).__name__} has no prism tags: call prism_moe.model.experts.attach(model, "
                           f"dispatcher) before running with experts_implementation='{IMPLEMENTATION}'") from None
    return dispatcher.moe_forward(layer, hidden_states, top_k_index, top_k_weights, store)


def register() -> None:
    """Register `prism_experts_forward` in transformers' global experts interface (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, prism_experts_forward)


register()

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check_layout(module: nn.Module) -> None:
    from transformers.integrations.moe import _default_apply_gate

    ok = (getattr(module, "has_gate", False) and not getattr(module, "has_bias", True)
          and not getattr(module, "is_transposed", True) and getattr(module, "is_concatenated", False)
          and not getattr(module, "has_post_expert_norm", False)
          and getattr(type(module), "_apply_gate", _default_apply_gate) is _default_apply_gate)
    if not ok:
        raise NotImplementedError(f"{type(module).__name__}: only the concatenated, untransposed, bias-free "
                                  f"gate_up_proj/down_proj layout with act(gate) * up is supported")


def experts_modules(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(decoder layer index, experts module) of every routed-experts module, in layer order.

    An experts module is one transformers decorated with `use_experts_implementation` (it has
    `gate_up_proj`/`down_proj` and `_is_expert_parallel`).
    """
    found = []
    for name, module in model.named_modules():
        if hasattr(module, "_is_expert_parallel") and hasattr(module, "down_proj") \
                and isinstance(getattr(module, "down_proj", None), nn.Parameter):
            m = _LAYER_RE.search(name)
            if m is None:
                raise ValueError(f"experts module {name!r} is not inside a `layers.<i>` decoder layer")
            found.append((int(m.group(1)), module))
    return sorted(found, key=lambda t: t[0])


def moe_layer_ids_of(model: nn.Module, spec: ModelSpec | Sequence[int] | None = None) -> tuple[int, ...]:
    """Decoder-layer index of each MoE layer, from `spec`, an explicit list, or the model's config."""
    if spec is None:
        spec = ModelSpec.from_hf_config(model.config.to_dict())
    return tuple(spec.moe_layer_ids) if isinstance(spec, ModelSpec) else tuple(int(i) for i in spec)


def attach(model: nn.Module, dispatcher: ExpertDispatcher, spec: ModelSpec | Sequence[int] | None = None,
           stores: Mapping[int, ExpertStore] | None = None) -> dict[int, nn.Module]:
    """Tag each experts module with its MoE layer, `dispatcher` and store; select the prism implementation.

    `spec` (a `ModelSpec` or its `moe_layer_ids`) maps MoE layer i to decoder layer `moe_layer_ids[i]`; by
    default it is derived from `model.config`. `stores[i]` is MoE layer i's `ExpertStore` (from
    `load_partial`); a layer without one keeps the store it was attached with before, else gets a zero-copy
    store of all the module's own experts (attach after moving the model to its device: those are views).
    Calling it again swaps the dispatcher (and the stores given). Returns {MoE layer: experts module}.
    """
    ids = moe_layer_ids_of(model, spec)
    mods = experts_modules(model)
    found = tuple(i for i, _ in mods)
    if found != ids:
        raise ValueError(f"the model's experts modules sit in decoder layers {list(found)} but the spec says MoE "
                         f"layers are {list(ids)}")
    by_layer: dict[int, nn.Module] = {}
    for moe_layer, (_, module) in enumerate(mods):
        _check_layout(module)
        store = stores.get(moe_layer) if stores is not None else None
        if store is None:
            store = getattr(module, "prism_store", None)  # re-attach keeps what load_partial loaded
        if store is None:
            store = ExpertStore.from_module(module, moe_layer)
        elif store.layer != moe_layer:
            raise ValueError(f"store for MoE layer {moe_layer} says it is layer {store.layer}")
        module.prism_layer = moe_layer
        module.prism_dispatcher = dispatcher
        module.prism_store = store
        by_layer[moe_layer] = module
    model.set_experts_implementation(IMPLEMENTATION)
    return by_layer


def detach(model: nn.Module, implementation: str = "eager") -> None:
    """Remove the prism tags and switch back to a transformers implementation."""
    for _, module in experts_modules(model):
        for attr in ("prism_layer", "prism_dispatcher", "prism_store"):
            if hasattr(module, attr):
                delattr(module, attr)
    model.set_experts_implementation(implementation)


def stores_of(model: nn.Module) -> dict[int, ExpertStore]:
    """{MoE layer: ExpertStore} of an attached model (for live add/remove of experts)."""
    return {m.prism_layer: m.prism_store for _, m in experts_modules(model) if hasattr(m, "prism_store")}
