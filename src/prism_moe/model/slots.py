"""Expert weights in preallocated slots: a pool of slabs and, per MoE layer, a map expert id -> slot.

The physical/logical split of vLLM's expert-parallel layer: a `SlotPool` owns slabs
`gate_up [C, 2I, H]`, `down [C, H, I]` (and `gate_up_bias [C, 2I]`, `down_bias [C, H]` for families with
biases) for `C` experts, allocated once; an `ExpertSlots` (one per MoE layer) maps that layer's expert ids to
pool slots with a device table `slot_of [E]` (-1: not here). A server's layers share one pool sized from its
memory budget, so memory is counted in slots exactly as the placement and the migration planner count it
(a total per server, any layer), and a load can never go over it: `NoFreeSlotError` instead.

Weights are canonical per expert whatever the family's in-memory layout: `gate_up [2I, H]` with the gate
projection in rows `[:I]` and the up projection in rows `[I:]`, `down [H, I]`, biases `[2I]` / `[H]` in the
same order. Transposed or interleaved layouts (GPT-OSS) are converted when written (`canonical_expert`).

Changing what a layer holds, in two steps (live migration, repair):
* `write(e, gate_up, down, ...)` copies into a free slot, *staged*: peers may already be served from it, but
  this server's own tokens keep their current route; `publish()` flips the map at the placement switch.
* `drop(e)` flips the map back to -1; the slot is reused only once every forward that may have read the old
  map has finished (reader epochs), so a concurrent forward never computes from overwritten weights.
Readers (`reading()`) get an immutable `SlotView`; every change installs a new view (copy on write, a few
hundred bytes), so a forward sees one consistent map without taking a lock around its compute.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from . import onednn

NOT_HERE = -1


class MissingExpertError(LookupError):
    """A token was routed to an expert this process neither holds nor knows where to find."""


class NoFreeSlotError(RuntimeError):
    """Every slot of the pool is taken: drop an expert (after a placement switch) before loading another."""


# --- the gated activation ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Gate:
    """How `[n, 2I]` gate/up projections become `[n, I]` (canonical halves: gate `[:I]`, up `[I:]`).

    `act`: transformers' default `act_fn(gate) * up`. `clamped_swiglu`: GPT-OSS's
    `(clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)` with `g = clamp(gate, max=limit)`.
    """

    kind: str = "act"
    act_fn: Callable[[Tensor], Tensor] | None = None
    alpha: float = 1.702
    limit: float = 7.0

    @classmethod
    def activation(cls, act_fn: Callable[[Tensor], Tensor] | str = "silu") -> Gate:
        if isinstance(act_fn, str):
            from transformers.activations import ACT2FN

            act_fn = ACT2FN[act_fn]
        return cls("act", act_fn)

    def __call__(self, gate_up: Tensor) -> Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        if self.kind == "act":
            assert self.act_fn is not None
            return self.act_fn(gate) * up
        gate = gate.clamp(min=None, max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


def _gpt_oss_apply_gate() -> Callable | None:
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:  # pragma: no cover - a transformers without GPT-OSS
        return None
    return GptOssExperts._apply_gate


def gate_of(module: nn.Module) -> Gate:
    """The `Gate` of a transformers experts module, or NotImplementedError naming what is not supported."""
    from transformers.integrations.moe import _default_apply_gate

    name = type(module).__name__
    if not getattr(module, "has_gate", False) or getattr(module, "has_post_expert_norm", False):
        raise NotImplementedError(f"{name}: prism serves gated experts (gate_up_proj) without a post-expert norm; "
                                  f"this family has has_gate={getattr(module, 'has_gate', None)}, "
                                  f"has_post_expert_norm={getattr(module, 'has_post_expert_norm', None)}")
    apply_gate = getattr(type(module), "_apply_gate", _default_apply_gate)
    if apply_gate is _default_apply_gate:
        return Gate.activation(module.act_fn)
    if apply_gate is _gpt_oss_apply_gate():
        return Gate("clamped_swiglu", alpha=float(module.alpha), limit=float(module.limit))
    raise NotImplementedError(f"{name}: its own gating ({type(module).__qualname__}._apply_gate) is not one prism "
                              f"implements (transformers' default act(gate) * up, or GPT-OSS's clamped SwiGLU)")


def canonical_expert(module: nn.Module, expert_id: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """One expert of a transformers experts module in canonical form (copies where the layout differs):
    gate_up [2I, H] (gate rows first), down [H, I], gate_up_bias [2I] | None, down_bias [H] | None."""
    gate_up, down = module.gate_up_proj.data[expert_id], module.down_proj.data[expert_id]
    if getattr(module, "is_transposed", False):  # stored [H, 2I] and [I, H]
        gate_up, down = gate_up.t(), down.t()
    gub = module.gate_up_proj_bias.data[expert_id] if getattr(module, "has_bias", False) else None
    db = module.down_proj_bias.data[expert_id] if getattr(module, "has_bias", False) else None
    if not getattr(module, "is_concatenated", True):  # interleaved gate0, up0, gate1, ...: de-interleave
        gate_up = torch.cat([gate_up[0::2], gate_up[1::2]], dim=0)
        if gub is not None:
            gub = torch.cat([gub[0::2], gub[1::2]], dim=0)
    return gate_up, down, gub, db


# --- the pool -----------------------------------------------------------------------------------------------------
class SlotPool:
    """Preallocated slabs for `capacity` experts of one shape, and which slots are free.

    gate_up [C, 2I, H], down [C, H, I], gate_up_bias [C, 2I] | None, down_bias [C, H] | None.

    `packed` (float32 on a CPU with oneDNN; what a CPU server holds): `gate_up` and `down` are lists of C
    oneDNN-packed weights (model/onednn.py; None where never written) instead of slabs, 1.3-1.8x faster to compute
    at decode sizes. A write packs into its slot (the memory is allocated then, not up front; the count of slots
    still bounds it); `weights(slot)` unpacks exactly. Only oneDNN reads them: the grouped path refuses them.
    """

    def __init__(self, capacity: int, hidden: int, intermediate: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 slabs: Sequence[Tensor | None] | None = None, packed: bool = False) -> None:
        if capacity < 0:
            raise ValueError(f"slot capacity must be >= 0, got {capacity}")
        if packed and (slabs is not None or not onednn.usable(device, dtype)):
            raise ValueError(f"a packed slot pool holds float32 weights on a CPU with oneDNN, written slot by slot; "
                             f"got {dtype} on {device}{' and existing slabs' if slabs is not None else ''}")
        self.capacity, self.hidden, self.intermediate, self.has_bias = int(capacity), hidden, intermediate, bias
        self.packed = packed
        if slabs is None:
            def empty(*shape: int) -> Tensor:
                return torch.empty(*shape, dtype=dtype, device=device)

            unwritten: list[Tensor | None] = [None] * self.capacity
            slabs = (list(unwritten) if packed else empty(capacity, 2 * intermediate, hidden),
                     list(unwritten) if packed else empty(capacity, hidden, intermediate),
                     empty(capacity, 2 * intermediate) if bias else None, empty(capacity, hidden) if bias else None)
        else:
            dtype, device = slabs[0].dtype, slabs[0].device
        self._dtype, self._device = dtype, torch.device(device)
        self.gate_up, self.down, self.gate_up_bias, self.down_bias = slabs
        self._free = list(range(self.capacity - 1, -1, -1))  # pop() gives the lowest slot
        self._retired: list[tuple[int, int]] = []  # (slot, epoch it was dropped in)
        self._epoch = 0
        self._readers: Counter[int] = Counter()  # forwards in progress, by the epoch they started in
        self._cv = threading.Condition()

    @classmethod
    def wrap(cls, gate_up: Tensor, down: Tensor, gate_up_bias: Tensor | None = None,
             down_bias: Tensor | None = None) -> SlotPool:
        """A pool over existing canonical slabs (no copy): gate_up [C, 2I, H], down [C, H, I]; all slots used."""
        pool = cls(gate_up.shape[0], gate_up.shape[2], down.shape[2], bias=gate_up_bias is not None,
                   slabs=(gate_up, down, gate_up_bias, down_bias))
        pool._free.clear()
        return pool

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return self._device

    def slabs(self) -> list[Tensor]:
        """The tensors holding the weights (a packed pool: each written slot's packed weights)."""
        weights = [*self.gate_up, *self.down] if self.packed else [self.gate_up, self.down]
        return [t for t in (*weights, self.gate_up_bias, self.down_bias) if t is not None]

    def weights(self, slot: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Slot `slot`'s canonical weights: views of the slabs, or exact dense copies of packed weights."""
        gate_up, down = self.gate_up[slot], self.down[slot]
        if gate_up is None or down is None:
            raise ValueError(f"slot {slot} holds no weights")
        return (onednn.unpack(gate_up), onednn.unpack(down),
                self.gate_up_bias[slot] if self.gate_up_bias is not None else None,
                self.down_bias[slot] if self.down_bias is not None else None)

    def free_slots(self) -> int:
        """Slots a write can take now or once older forwards finish (dropped slots included)."""
        with self._cv:
            return len(self._free) + len(self._retired)

    # --- readers (forwards) ---------------------------------------------------------------------------------------
    def enter(self) -> int:
        with self._cv:
            self._readers[self._epoch] += 1
            return self._epoch

    def leave(self, epoch: int) -> None:
        with self._cv:
            self._readers[epoch] -= 1
            if self._readers[epoch] <= 0:
                del self._readers[epoch]
                self._cv.notify_all()

    # --- slots --------------------------------------------------------------------------------------------------
    def allocate(self, what: str, timeout: float = 30.0) -> int:
        """A free slot for `what`; waits (up to `timeout` s) for forwards that may still read a dropped one."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                oldest = min(self._readers, default=None)
                reusable = [r for r in self._retired if oldest is None or r[1] < oldest]
                for r in reusable:
                    self._retired.remove(r)
                    self._free.append(r[0])
                if self._free:
                    slot = self._free.pop()
                    break
                if not self._retired:
                    raise NoFreeSlotError(f"no free expert slot for {what}: all {self.capacity} slots of this "
                                          f"server's memory budget are in use; drop an expert first (after a "
                                          f"placement switch that no longer routes to it)")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NoFreeSlotError(f"no free expert slot for {what}: the dropped slots are still read by "
                                          f"forwards that started {timeout:.0f} s ago or more")
                self._cv.wait(left)
        if reusable and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # kernels queued on any stream may still read the old weights
        return slot

    def release(self, slot: int, retire: bool) -> None:
        """Give a slot back: `retire` when a forward may have seen it mapped (reused after those finish)."""
        with self._cv:
            if retire:
                self._retired.append((slot, self._epoch))
                self._epoch += 1
            else:
                self._free.append(slot)
            self._cv.notify_all()

    def write(self, slot: int, gate_up: Tensor, down: Tensor, gate_up_bias: Tensor | None = None,
              down_bias: Tensor | None = None) -> None:
        """Copy one canonical expert into `slot` (cast to the pool's dtype and device)."""
        if self.packed:  # a new packed tensor per write: forwards that still read the old one keep it alive
            self.gate_up[slot] = onednn.pack(gate_up.to(self.device, self.dtype))
            self.down[slot] = onednn.pack(down.to(self.device, self.dtype))
        else:
            self.gate_up[slot].copy_(gate_up)
            self.down[slot].copy_(down)
        if self.has_bias:
            assert self.gate_up_bias is not None and self.down_bias is not None
            self.gate_up_bias[slot].copy_(gate_up_bias)
            self.down_bias[slot].copy_(down_bias)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # complete before the map makes it visible

    def check(self, expert: str, gate_up: Tensor, down: Tensor, gate_up_bias: Tensor | None,
              down_bias: Tensor | None) -> None:
        h, i = self.hidden, self.intermediate
        if tuple(gate_up.shape) != (2 * i, h) or tuple(down.shape) != (h, i):
            raise ValueError(f"{expert}: expected gate_up [2I, H] = {[2 * i, h]} and down [H, I] = {[h, i]}, "
                             f"got {list(gate_up.shape)} and {list(down.shape)}")
        if self.has_bias != (gate_up_bias is not None) or self.has_bias != (down_bias is not None):
            raise ValueError(f"{expert}: this model's experts {'have' if self.has_bias else 'have no'} biases; "
                             f"got gate_up_bias={'given' if gate_up_bias is not None else None}, "
                             f"down_bias={'given' if down_bias is not None else None}")
        if gate_up_bias is not None and down_bias is not None and (
                tuple(gate_up_bias.shape) != (2 * i,) or tuple(down_bias.shape) != (h,)):
            raise ValueError(f"{expert}: expected biases [2I] = [{2 * i}] and [H] = [{h}], got "
                             f"{list(gate_up_bias.shape)} and {list(down_bias.shape)}")
        for t in (gate_up, down, gate_up_bias, down_bias):
            if t is not None and (t.dtype.is_floating_point is False or t.element_size() == 1):
                raise ValueError(f"{expert}: weights must be dequantized floating point, got {t.dtype}")


# --- one layer's map ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlotView:
    """One consistent version of a layer's map (never mutated).

    On the pool's device, indexed by `ids.remainder(E + 1)` (so padding -1 and expert-parallel sentinels E land
    on the extra entry E): `slot_of` int64 [E + 1], the slot or -1 (not mapped for this server's own tokens);
    `sort_key` [E + 1], the slot or C (the pool's capacity: sorts after every local slot); `route_code`
    [E + 1], 2e + (0 mapped | 1 not), 2E for the extra entry (the activation counter's bins).
    On the host: `host` int64 [E] (slot or -1); `serving` [E], slots whose weights are present (mapped or
    staged: what peers may call); `all_local`: every expert is mapped (a forward then needs no host sync).
    """

    tables: Tensor  # int64 [3, E + 1]: slot_of, sort_key, route_code (one host-to-device copy per change)
    host: np.ndarray
    serving: np.ndarray
    all_local: bool

    @property
    def slot_of(self) -> Tensor:
        return self.tables[0]

    @property
    def sort_key(self) -> Tensor:
        return self.tables[1]

    @property
    def route_code(self) -> Tensor:
        return self.tables[2]


class ExpertSlots:
    """One MoE layer's routed experts held in a `SlotPool` (shared by the server's layers)."""

    def __init__(self, layer: int, num_experts: int, pool: SlotPool, gate: Gate | None = None) -> None:
        self.layer, self.num_experts, self.pool = layer, int(num_experts), pool
        self.gate = gate or Gate.activation("silu")
        self._lock = threading.Lock()  # writers only (readers take the view)
        self._staged: dict[int, int] = {}
        self._install(np.full(self.num_experts, NOT_HERE, dtype=np.int64))

    @classmethod
    def from_module(cls, module: nn.Module, layer: int, expert_ids: Sequence[int] | None = None) -> ExpertSlots:
        """A layer over a transformers experts module's own weights: no copy when the module keeps transformers'
        canonical layout and every expert is taken; otherwise copies into a pool of `len(expert_ids)` slots."""
        gate = gate_of(module)
        num = module.gate_up_proj.shape[0]
        ids = list(range(num)) if expert_ids is None else [int(e) for e in expert_ids]
        canonical = (not getattr(module, "is_transposed", False) and getattr(module, "is_concatenated", True)
                     and not getattr(module, "has_bias", False))
        if canonical and ids == list(range(num)):
            store = cls(layer, num, SlotPool.wrap(module.gate_up_proj.data, module.down_proj.data), gate)
            store._install(np.arange(num, dtype=np.int64))
            return store
        gate_up, down, gub, _ = canonical_expert(module, 0)
        pool = SlotPool(len(ids), gate_up.shape[1], down.shape[1], bias=gub is not None, dtype=gate_up.dtype,
                        device=gate_up.device)
        store = cls(layer, num, pool, gate)
        for e in ids:
            store.add(e, *canonical_expert(module, e))
        return store

    # --- reading -----------------------------------------------------------------------------------------------
    @property
    def view(self) -> SlotView:
        return self._view

    @contextlib.contextmanager
    def reading(self) -> Iterator[SlotView]:
        """The current map, kept valid until the block ends (its dropped slots are not reused meanwhile)."""
        epoch = self.pool.enter()
        try:
            yield self._view
        finally:
            self.pool.leave(epoch)

    @property
    def held(self) -> list[int]:
        """Mapped expert ids (what this server's own tokens compute here), ascending."""
        return np.flatnonzero(self._view.host >= 0).tolist()

    @property
    def staged(self) -> list[int]:
        return sorted(self._staged)

    def __contains__(self, expert_id: object) -> bool:
        return isinstance(expert_id, int | np.integer) and 0 <= expert_id < self.num_experts \
            and bool(self._view.host[expert_id] >= 0)

    def __len__(self) -> int:
        return int((self._view.host >= 0).sum())

    def __repr__(self) -> str:
        return f"ExpertSlots(layer={self.layer}, held={self.held}, staged={self.staged})"

    def has_weights(self, expert_id: int) -> bool:
        """Held or staged: its weights are in a slot."""
        return bool(self._view.serving[expert_id] >= 0)

    def get(self, expert_id: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """A held or staged expert (views, or exact copies from a packed pool): gate_up [2I, H], down [H, I], gate_up_bias [2I] | None, down_bias [H] | None."""
        self._check_id(expert_id)
        slot = int(self._view.serving[expert_id])
        if slot < 0:
            raise MissingExpertError(f"MoE layer {self.layer}: expert {expert_id} is not held here "
                                     f"(held: {self.held})")
        return self.pool.weights(slot)

    def tensors(self) -> list[Tensor]:
        return self.pool.slabs()

    # --- writing -----------------------------------------------------------------------------------------------
    def write(self, expert_id: int, gate_up: Tensor, down: Tensor, gate_up_bias: Tensor | None = None,
              down_bias: Tensor | None = None, timeout: float = 30.0) -> int:
        """Copy one canonical expert into a free slot, staged (peers may use it; `publish` maps it for this
        server's own tokens). gate_up [2I, H], down [H, I], optional biases [2I], [H]. Returns the slot."""
        self._check_id(expert_id)
        what = f"MoE layer {self.layer} expert {expert_id}"
        self.pool.check(what, gate_up, down, gate_up_bias, down_bias)
        with self._lock:
            if self._view.serving[expert_id] >= 0:
                raise ValueError(f"{what} is already held or staged here")
            slot = self.pool.allocate(what, timeout)
            try:
                self.pool.write(slot, gate_up, down, gate_up_bias, down_bias)
            except BaseException:
                self.pool.release(slot, retire=False)
                raise
            self._staged[expert_id] = slot
            self._install(self._view.host)
        return slot

    def publish(self, expert_ids: Sequence[int] | None = None) -> list[int]:
        """Map staged experts (all, or those given) for this server's own tokens; returns those mapped."""
        with self._lock:
            ids = sorted(self._staged) if expert_ids is None else [int(e) for e in expert_ids if e in self._staged]
            if ids:
                host = self._view.host.copy()
                for e in ids:
                    host[e] = self._staged.pop(e)
                self._install(host)
        return ids

    def add(self, expert_id: int, gate_up: Tensor, down: Tensor, gate_up_bias: Tensor | None = None,
            down_bias: Tensor | None = None) -> int:
        """`write` then `publish`: hold one more expert right away."""
        slot = self.write(expert_id, gate_up, down, gate_up_bias, down_bias)
        self.publish([expert_id])
        return slot

    def drop(self, expert_id: int) -> None:
        """Stop holding (or staging) an expert: the map flips back to -1, the slot is freed."""
        self._check_id(expert_id)
        with self._lock:
            if expert_id in self._staged:
                slot = self._staged.pop(expert_id)
                host = self._view.host
            else:
                slot = int(self._view.host[expert_id])
                if slot < 0:
                    raise MissingExpertError(f"MoE layer {self.layer}: expert {expert_id} is not held here "
                                             f"(held: {self.held})")
                host = self._view.host.copy()
                host[expert_id] = NOT_HERE
            self._install(host)
        self.pool.release(slot, retire=True)  # peers' calls and forwards may still read it

    remove = drop

    def _install(self, host: np.ndarray) -> None:
        serving = host.copy()
        for e, s in self._staged.items():
            serving[e] = s
        e = self.num_experts
        tables = np.empty((3, e + 1), dtype=np.int64)
        tables[0, :e], tables[0, e] = host, NOT_HERE
        tables[1, :e], tables[1, e] = np.where(host >= 0, host, self.pool.capacity), self.pool.capacity
        tables[2, :e], tables[2, e] = 2 * np.arange(e) + (host < 0), 2 * e
        self._view = SlotView(torch.as_tensor(tables, device=self.pool.device), host, serving,
                              bool((host >= 0).all()))

    def _check_id(self, expert_id: int) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"MoE layer {self.layer}: expert {expert_id} out of range 0..{self.num_experts - 1}")


def held_count(stores: Mapping[int, ExpertSlots]) -> int:
    return sum(len(s) for s in stores.values())


def pool_for(module: nn.Module, capacity: int, device: torch.device | str, dtype: torch.dtype,
             packed: bool = False) -> SlotPool:
    """An empty pool of `capacity` slots for experts shaped like those of a transformers experts module (its
    parameters may be zero-size stand-ins: only their trailing shape is read); `packed`: see `SlotPool`."""
    down = module.down_proj.shape[1:]
    hidden, intermediate = (down[1], down[0]) if getattr(module, "is_transposed", False) else (down[0], down[1])
    return SlotPool(capacity, int(hidden), int(intermediate), bias=bool(getattr(module, "has_bias", False)),
                    dtype=dtype, device=device, packed=packed)


def layer_slots(modules: Sequence[nn.Module], num_experts: int, capacity: int, device: torch.device | str,
                dtype: torch.dtype, packed: bool = False) -> dict[int, ExpertSlots]:
    """{MoE layer: empty ExpertSlots} for a model's experts modules (in MoE-layer order), sharing one pool of
    `capacity` slots: a server's memory budget in experts, which any layer may use (`packed`: see `SlotPool`)."""
    if not modules:
        return {}
    pool = pool_for(modules[0], capacity, device, dtype, packed)
    return {layer: ExpertSlots(layer, num_experts, pool, gate_of(m)) for layer, m in enumerate(modules)}
