"""One experts implementation for every MoE family, plugged into transformers' `ExpertsInterface`.

transformers 5 routes the routed experts of Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2/V3, GPT-OSS (and more)
through `ALL_EXPERTS_FUNCTIONS`: each `*Experts` module's forward becomes
`fn(module, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]` for the function
named by `config._experts_implementation`. We register `prism_experts_forward` under `"prism"`; it looks up
the MoE layer index, the dispatcher and the layer's `ExpertSlots` (model/slots.py: slabs in a slot pool and
a device map expert id -> slot) that `attach` tagged the module with, and hands the work to the dispatcher.
Router, shared experts and everything dense stay in transformers' own code.

A dispatcher's forward, per MoE layer:
1. routing on the device: `slot = slot_of[top_k_index]` (-1: not here), the activation count (a hook);
2. local pairs computed by one of two paths (`path`):
   * `grouped`: one fixed kernel sequence over the slabs (model/grouped.py), no host sync when every expert
     of the layer is mapped here; otherwise one device-to-host copy (the routed ids and the hidden rows, into
     pinned memory on CUDA) tells the host what to send, while the local kernels run. Replies are scattered
     into the pair buffer, which one sum over the k choices combines (transformers' `grouped_mm` combine).
   * `loop`: one expert at a time in transformers' eager order (the exact reference: bit-identical to the
     eager path on the same device and dtype, locally and split across servers); faster on CPU for the small
     batches of decoding.
   * `onednn`: the loop with oneDNN's GEMMs (float32 on CPU; model/grouped.py): 1.2-2x faster than the
     loop's MKL GEMMs on this project's CPU, equal to it within float32 rounding.
   `auto` picks grouped on a GPU with a grouped GEMM, onednn for float32 on a CPU whose torch has oneDNN, the
   loop elsewhere. A peer computes the rows it is sent with its own dispatcher's choice.
3. experts not mapped here go to `remote(layer, {server: (expert_ids [m], x [m, H])})`, one batch per server
   (rows of one expert contiguous, experts ascending), sent before the local compute waits for anything.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from . import onednn as dnn
from .grouped import expert_forward, grouped_mm_usable, grouped_pairs
from .slots import ExpertSlots, MissingExpertError, SlotView, gate_of
from .spec import ModelSpec

IMPLEMENTATION = "prism"
PATHS = ("auto", "grouped", "loop", "onednn")

__all__ = ["IMPLEMENTATION", "PATHS", "ExpertDispatcher", "ExpertSlots", "LocalDispatcher", "MissingExpertError",
           "RemoteDispatcher", "attach", "combine", "detach", "experts_modules", "group_by_expert", "skip_padding",
           "stores_of"]

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
                    experts: ExpertSlots) -> Tensor:
        """hidden [T, H], top_k_index [T, k], top_k_weights [T, k] -> routed-experts output [T, H]."""
        ...


class _HostRouting:
    """The routed ids [S] and hidden [T, H] on the host: on CUDA one asynchronous copy into pinned memory
    (waited for once, in `wait`); on the CPU the tensors themselves."""

    def __init__(self, flat: Tensor, hidden: Tensor) -> None:
        self._event = None
        if flat.device.type == "cuda":
            self.ids = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True).copy_(flat, non_blocking=True)
            self.hidden = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True).copy_(
                hidden.detach(), non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self.ids, self.hidden = flat, hidden.detach()

    def wait(self) -> np.ndarray:
        if self._event is not None:
            self._event.synchronize()  # only the copies: kernels queued after them keep running
        return self.ids.numpy()


class LocalDispatcher:
    """Every routed expert computed from the local slots; a token routed elsewhere is an error.

    `observer(layer, top_k_index [T, k])`, if given, sees every routing decision. `path`: "auto", "grouped",
    "loop" or "onednn" (module docstring).
    """

    def __init__(self, observer: Callable[[int, Tensor], None] | None = None, path: str = "auto") -> None:
        if path not in PATHS:
            raise ValueError(f"experts path {path!r}: use one of {', '.join(PATHS)}")
        self.observer = observer
        self.path = path
        self.timeout: float | None = None  # seconds to wait for a remote reply (RemoteDispatcher)

    def grouped_on(self, device: torch.device) -> bool:
        """Whether a forward on `device` takes the grouped path."""
        if self.path != "auto":
            return self.path == "grouped"
        return device.type == "cuda" and grouped_mm_usable(device)

    def onednn_on(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether a forward on `device` in `dtype` computes the loop's GEMMs with oneDNN."""
        if self.path not in ("auto", "onednn") or self.grouped_on(device):
            return False
        return dnn.usable(device, dtype)

    def count(self, layer: int, top_k_index: Tensor, idx: Tensor, view: SlotView) -> None:
        """Sees each layer's routing: `idx` [S] = top_k_index.reshape(-1) % (E + 1) (padding -> E) on the
        device, to index the view's tables (`view.route_code[idx]`: expert and local/remote)."""
        if self.observer is not None:
            self.observer(layer, top_k_index)

    def plan(self, layer: int, expert_ids: Sequence[int], view: SlotView) -> dict[Hashable, list[int]]:
        """{server: expert ids} for experts not mapped here (ascending); here: none may be."""
        raise MissingExpertError(f"MoE layer {layer}: tokens routed to experts {list(expert_ids)} that this server "
                                 f"does not hold (held: {np.flatnonzero(view.host >= 0).tolist()}); use a "
                                 f"dispatcher that sends them to a peer")

    def remote(self, layer: int, batches: dict[Hashable, tuple[Tensor, Tensor]]
               ) -> Mapping[Hashable, PendingReply | Tensor]:
        raise NotImplementedError("a LocalDispatcher sends nothing")

    # --- the forward -------------------------------------------------------------------------------------------
    def moe_forward(self, layer: int, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    experts: ExpertSlots) -> Tensor:
        with experts.reading() as view:
            flat = top_k_index.reshape(-1)
            idx = flat.remainder(experts.num_experts + 1)  # padding (-1) and sentinels (E) -> the extra entry E
            self.count(layer, top_k_index, idx, view)
            if self.grouped_on(hidden.device):
                return self._grouped(layer, hidden, top_k_index, top_k_weights, experts, view, flat, idx)
            return self._loop(layer, hidden, top_k_index, top_k_weights, experts, view)

    def _grouped(self, layer: int, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                 experts: ExpertSlots, view: SlotView, flat: Tensor, idx: Tensor) -> Tensor:
        k = top_k_index.shape[1]
        weights = top_k_weights.reshape(-1)
        key = view.sort_key[idx]  # slot, or C where the pair is not local
        host = None if view.all_local else _HostRouting(flat, hidden)
        pairs = None
        if host is None or hidden.device.type != "cpu":  # queue the local kernels before waiting for the copy
            pairs = grouped_pairs(experts.pool, experts.gate, key, hidden, weights, k)
        if host is not None:
            ids = host.wait()
            valid = (ids >= 0) & (ids < experts.num_experts)  # padding and sentinels are nobody's
            is_remote = valid & (view.host[np.where(valid, ids, 0)] < 0)
            sent = self._send_pairs(layer, ids, is_remote, host.hidden, k, view) if is_remote.any() else None
            try:
                if pairs is None:  # CPU: compute while the peers do
                    pairs = grouped_pairs(experts.pool, experts.gate, key, hidden, weights, k)
                if sent is not None:
                    positions, y = self._await_replies(layer, *sent)
                    pos = torch.from_numpy(positions)
                    if hidden.device.type == "cuda":  # a copy from pageable memory would wait for the stream
                        pos = pos.pin_memory()
                    pos = pos.to(hidden.device, non_blocking=True)
                    y = y.to(hidden.device, non_blocking=True)
                    pairs.index_copy_(0, pos, (y * weights[pos].unsqueeze(-1)).to(pairs.dtype))  # one scatter
            except BaseException:
                if sent is not None:
                    _cancel(sent[1])
                raise
        assert pairs is not None
        return pairs.view(hidden.shape[0], k, hidden.shape[1]).sum(dim=1).to(hidden.dtype)

    def _send_pairs(self, layer: int, ids: np.ndarray, is_remote: np.ndarray, hidden_host: Tensor, k: int,
              view: SlotView) -> tuple[dict[Hashable, np.ndarray], Mapping[Hashable, PendingReply | Tensor],
                                       dict[Hashable, tuple[Tensor, Tensor]]]:
        """Remote pairs -> one batch per server, sent. Returns ({server: pair positions}, pending, batches)."""
        pos = np.flatnonzero(is_remote)
        pos = pos[np.argsort(ids[pos], kind="stable")]  # by expert, then pair order
        experts = ids[pos]
        uniq, starts = np.unique(experts, return_index=True)
        bounds = [*starts.tolist(), len(pos)]
        plan = self.plan(layer, uniq.tolist(), view)
        where = {e: pos[bounds[i]:bounds[i + 1]] for i, e in enumerate(uniq.tolist())}
        positions: dict[Hashable, np.ndarray] = {}
        batches: dict[Hashable, tuple[Tensor, Tensor]] = {}
        for server, es in plan.items():
            p = np.concatenate([where[e] for e in es])
            positions[server] = p
            batches[server] = (torch.from_numpy(ids[p]), hidden_host[torch.from_numpy(p // k)])
        return positions, self.remote(layer, batches), batches

    def _await_replies(self, layer: int, positions: dict[Hashable, np.ndarray],
                 pending: Mapping[Hashable, PendingReply | Tensor],
                 batches: dict[Hashable, tuple[Tensor, Tensor]]) -> tuple[np.ndarray, Tensor]:
        """Wait for every server's reply: (pair positions [R], outputs [R, H] in a pinned buffer on CUDA)."""
        ys = []
        for server in positions:
            reply = pending[server]
            y = reply if isinstance(reply, Tensor) else reply.result(self.timeout)
            if y.shape != batches[server][1].shape:
                raise RuntimeError(f"MoE layer {layer}: server {server!r} answered {tuple(y.shape)} for a batch "
                                   f"of {tuple(batches[server][1].shape)}")
            ys.append(y)
        x = next(iter(batches.values()))[1]
        pinned = torch.cuda.is_available() and all(y.device.type == "cpu" for y in ys)
        out = torch.empty((sum(len(y) for y in ys), x.shape[1]), dtype=ys[0].dtype, pin_memory=pinned)
        torch.cat([y.to(out.device) for y in ys], out=out)
        return np.concatenate(list(positions.values())), out

    def _loop(self, layer: int, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
              experts: ExpertSlots, view: SlotView) -> Tensor:
        groups = group_by_expert(top_k_index)
        local = [e for e in groups if view.host[e] >= 0]
        missing = [e for e in groups if view.host[e] < 0]
        plan = self.plan(layer, missing, view) if missing else {}
        batches: dict[Hashable, tuple[Tensor, Tensor]] = {}
        for server, ids in plan.items():
            rows = [groups[e][0] for e in ids]
            counts = torch.tensor([len(r) for r in rows], device=hidden.device)
            expert_ids = torch.repeat_interleave(torch.tensor(ids, device=hidden.device), counts)
            batches[server] = (expert_ids, hidden[torch.cat(rows)])
        pending = self.remote(layer, batches) if batches else {}
        try:
            pool, gate = experts.pool, experts.gate  # local experts overlap the remote calls
            onednn = self.onednn_on(hidden.device, hidden.dtype) and pool.dtype == hidden.dtype
            outputs = {e: expert_forward(pool, gate, int(view.host[e]), hidden[groups[e][0]], onednn)
                       for e in local}
            for server, ids in plan.items():
                reply = pending[server]
                y = reply if isinstance(reply, Tensor) else reply.result(self.timeout)
                if y.shape != batches[server][1].shape:
                    raise RuntimeError(f"MoE layer {layer}: server {server!r} answered {tuple(y.shape)} for a "
                                       f"batch of {tuple(batches[server][1].shape)}")
                for e, part in zip(ids, torch.split(y, [len(groups[e][0]) for e in ids]), strict=True):
                    outputs[e] = part
        except BaseException:
            _cancel(pending)
            raise
        return combine(hidden, groups, outputs, top_k_weights)


def _cancel(pending: Mapping[Hashable, PendingReply | Tensor]) -> None:
    """Let go of calls still out (e.g. after a failed local expert)."""
    for reply in pending.values():
        if not isinstance(reply, Tensor):
            reply.cancel()


class RemoteDispatcher(LocalDispatcher):
    """Mapped experts computed locally, the others sent in one batch per target server, overlapped.

    Pass `remote`/`locate` or override the methods. `remote` must not block: return
    `concurrent.futures.Future`s, finished tensors, or any handle with `result(timeout)` and `cancel()` (the
    cluster's direct calls, which wait on the calling thread).

    Threading: `moe_forward` runs on whatever thread runs the model (under continuous batching, the
    manager's generation thread) and blocks in `result()`, so never run the model on an asyncio event
    loop thread. Replies may live on any device. With the loop path, results are bit-identical to local
    compute when the peer uses the same device type and dtype, since it sees the same rows per expert in the
    same order.
    """

    def __init__(self, remote: RemoteFn | None = None, locate: LocateFn | None = None,
                 timeout: float | None = None, observer: Callable[[int, Tensor], None] | None = None,
                 path: str = "auto") -> None:
        super().__init__(observer, path)
        self._remote = remote
        self._locate = locate
        self.timeout = timeout

    def locate(self, layer: int, expert_id: int) -> Hashable:
        if self._locate is None:
            raise MissingExpertError(f"MoE layer {layer}: expert {expert_id} is not held here and no locate "
                                     f"function was given")
        return self._locate(layer, expert_id)

    def plan(self, layer: int, expert_ids: Sequence[int], view: SlotView) -> dict[Hashable, list[int]]:
        plan: dict[Hashable, list[int]] = {}
        for e in expert_ids:
            plan.setdefault(self.locate(layer, e), []).append(e)
        return plan

    def remote(self, layer: int, batches: dict[Hashable, tuple[Tensor, Tensor]]
               ) -> Mapping[Hashable, PendingReply | Tensor]:
        if self._remote is None:
            raise NotImplementedError("give RemoteDispatcher a remote function or override remote()")
        return self._remote(layer, batches)


# --- transformers integration ---------------------------------------------------------------------------------
# bool [T]: rows of this thread's forwards whose experts' output nobody reads (a batched prefill's padding)
_padding_rows: ContextVar[Tensor | None] = ContextVar("prism_padding_rows", default=None)


@contextmanager
def skip_padding(padding: Tensor) -> Iterator[None]:
    """Within the block, MoE layers route no expert for the rows where `padding` [T] is True (the forward's tokens,
    batch-major, as the experts see them flattened): their routed output is 0 and they cost no GEMM row, no
    remote call and no activation count. For a right-padded batch (`SlotRunner`'s prefill, where padding was
    up to a third of the tokens); a layer seeing another number of rows ignores it."""
    token = _padding_rows.set(padding)
    try:
        yield
    finally:
        _padding_rows.reset(token)


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
    padding = _padding_rows.get()
    if padding is not None and padding.shape[0] == top_k_index.shape[0]:
        top_k_index = top_k_index.masked_fill(padding.unsqueeze(-1), -1)  # -1: padding, routed nowhere
    return dispatcher.moe_forward(layer, hidden_states, top_k_index, top_k_weights, store)


def register() -> None:
    """Register `prism_experts_forward` in transformers' global experts interface (idempotent)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, prism_experts_forward)


register()

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _check_layout(module: nn.Module) -> None:
    """NotImplementedError, naming the family, for experts the slots cannot compute (see `slots.gate_of`)."""
    gate_of(module)


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
           stores: Mapping[int, ExpertSlots] | None = None) -> dict[int, nn.Module]:
    """Tag each experts module with its MoE layer, `dispatcher` and store; select the prism implementation.

    `spec` (a `ModelSpec` or its `moe_layer_ids`) maps MoE layer i to decoder layer `moe_layer_ids[i]`; by
    default it is derived from `model.config`. `stores[i]` is MoE layer i's `ExpertSlots` (from
    `load_partial`); a layer without one keeps the slots it was attached with before, else gets slots over all
    the module's own experts (`ExpertSlots.from_module`: views of its weights where the layout is already
    canonical, a copy otherwise; attach after moving the model to its device).
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
        _check_layout(module)  # a family whose experts prism cannot compute fails here, by name
        store = stores.get(moe_layer) if stores is not None else None
        if store is None:
            store = getattr(module, "prism_store", None)  # re-attach keeps what load_partial loaded
        if store is None:
            store = ExpertSlots.from_module(module, moe_layer)
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


def stores_of(model: nn.Module) -> dict[int, ExpertSlots]:
    """{MoE layer: ExpertSlots} of an attached model (for live writes and drops of experts)."""
    return {m.prism_layer: m.prism_store for _, m in experts_modules(model) if hasattr(m, "prism_store")}
