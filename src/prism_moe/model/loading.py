"""Partial loading: the dense part of a MoE checkpoint plus only the routed experts a server holds.

The model skeleton is built with every parameter on the meta device (buffers such as RoPE frequencies are
computed for real), dense tensors are then read one by one from the safetensors files, and each MoE layer's
held experts go into `ExpertSlots` (one slot pool). The fused expert parameters of the transformers modules are left as
zero-size tensors, so resident weight memory is dense + held experts only.

Checkpoints may be in transformers' original per-expert layout (what the hub has and what `save_pretrained`
writes: `...experts.<e>.{gate_proj,up_proj,down_proj}.weight`, Mixtral's `w1/w3/w2` under
`block_sparse_moe`) or in the fused in-memory layout (`...experts.gate_up_proj` [E, 2I, H],
`...experts.down_proj` [E, H, I]); single file or sharded with `model.safetensors.index.json`. Only the bytes
of the needed tensors are read (`safe_open` + `get_slice`).
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .experts import ExpertDispatcher, LocalDispatcher, attach, experts_modules
from .slots import ExpertSlots, layer_slots
from .spec import ModelSpec

# Per-expert tensor names of the original layouts -> which part of the fused expert they are.
_PART = {"w1": "gate", "w3": "up", "w2": "down", "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
_PER_EXPERT_RE = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<e>\d+)\.(?P<name>w1|w2|w3|gate_proj|up_proj|down_proj)"
                            r"\.weight$")
_FUSED_RE = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<name>gate_up_proj|down_proj)$")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    return getattr(torch, str(dtype).removeprefix("torch."))


@dataclass
class Checkpoint:
    """Index of a safetensors checkpoint folder: which file holds each tensor, and where the experts are.

    `dense[model_key] = checkpoint_key` (keys renamed the way transformers renames them on load);
    `experts[(moe_layer, expert_id)][part] = checkpoint_key` with part in gate/up/down (per-expert layout);
    `fused[moe_layer][part] = checkpoint_key` with part in gate_up/down (fused layout).
    """

    path: Path
    config: dict[str, Any]
    spec: ModelSpec
    file_of: dict[str, str]
    dense: dict[str, str] = field(default_factory=dict)
    experts: dict[tuple[int, int], dict[str, str]] = field(default_factory=dict)
    fused: dict[int, dict[str, str]] = field(default_factory=dict)

    @classmethod
    def open(cls, checkpoint_dir: str | Path) -> Checkpoint:
        path = Path(checkpoint_dir)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a transformers checkpoint folder")
        config = json.loads(cfg_file.read_text())
        spec = ModelSpec.from_pretrained(path)
        ckpt = cls(path, config, spec, _file_map(path))
        ckpt._index_keys()
        return ckpt

    def _index_keys(self) -> None:
        renamings = _renamings(str(self.config.get("model_type", "")))
        moe_of_decoder = {d: i for i, d in enumerate(self.spec.moe_layer_ids)}
        for key in self.file_of:
            name = _apply(key, renamings)
            m = _PER_EXPERT_RE.match(name) or _FUSED_RE.match(name)
            if m is None:
                self.dense[name] = key
                continue
            layer = _LAYER_RE.search(m["prefix"])
            if layer is None or int(layer.group(1)) not in moe_of_decoder:
                raise ValueError(f"{self.path}: expert tensor {key!r} is not in a MoE layer "
                                 f"(MoE decoder layers: {list(self.spec.moe_layer_ids)})")
            moe = moe_of_decoder[int(layer.group(1))]
            if "e" in m.groupdict():
                self.experts.setdefault((moe, int(m["e"])), {})[_PART[m["name"]]] = key
            else:
                self.fused.setdefault(moe, {})["gate_up" if m["name"] == "gate_up_proj" else "down"] = key

    @contextlib.contextmanager
    def reader(self) -> Iterator[_Reader]:
        """Open safetensors files lazily for a batch of reads; closes them on exit."""
        r = _Reader(self)
        try:
            yield r
        finally:
            r.close()

    def expert_weights(self, reader: _Reader, layer: int, expert_id: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """(gate_up [2I, H], down [H, I]) of one expert of MoE layer `layer`, reading only its bytes."""
        if not 0 <= layer < self.spec.num_moe_layers:
            raise ValueError(f"MoE layer {layer} out of range 0..{self.spec.num_moe_layers - 1}")
        if not 0 <= expert_id < self.spec.num_experts:
            raise ValueError(f"expert {expert_id} out of range 0..{self.spec.num_experts - 1}")
        if layer in self.fused:
            keys = self.fused[layer]
            gate_up = reader.slice(keys["gate_up"], expert_id)
            down = reader.slice(keys["down"], expert_id)
        elif (layer, expert_id) in self.experts:
            keys = self.experts[(layer, expert_id)]
            missing = {"gate", "up", "down"} - keys.keys()
            if missing:
                raise KeyError(f"{self.path}: MoE layer {layer} expert {expert_id} lacks its {sorted(missing)} tensors")
            gate_up = torch.cat([reader.tensor(keys["gate"]), reader.tensor(keys["up"])], dim=0)
            down = reader.tensor(keys["down"])
        else:
            raise KeyError(f"{self.path}: no weights for MoE layer {layer} expert {expert_id}")
        return gate_up.to(device=device, dtype=dtype), down.to(device=device, dtype=dtype)


class _Reader:
    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self._open: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

    def _file(self, key: str) -> Any:
        from safetensors import safe_open

        fname = self.ckpt.file_of[key]
        if fname not in self._open:
            self._open[fname] = self._stack.enter_context(safe_open(str(self.ckpt.path / fname), framework="pt"))
        return self._open[fname]

    def tensor(self, key: str) -> Tensor:
        return self._file(key).get_tensor(key)

    def slice(self, key: str, index: int) -> Tensor:
        # get_slice reads only the bytes of row `index` of the fused [E, ...] tensor.
        return self._file(key).get_slice(key)[index]

    def close(self) -> None:
        self._stack.close()
        self._open.clear()


def _file_map(path: Path) -> dict[str, str]:
    """Checkpoint key -> safetensors file name (relative to `path`)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} holds no .safetensors file")
    from safetensors import safe_open

    out: dict[str, str] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            out.update(dict.fromkeys(h.keys(), f.name))
    return out


def _renamings(model_type: str) -> list[Any]:
    """transformers' own key renamings for this model type (e.g. Mixtral's `block_sparse_moe` -> `mlp`)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # pragma: no cover - older/newer transformers without the conversion API
        return []
    return [t for t in (get_checkpoint_conversion_mapping(model_type) or []) if isinstance(t, WeightRenaming)]


def _apply(key: str, renamings: Sequence[Any]) -> str:
    for r in renamings:
        key, _ = r.rename_source_key(key)
    return key


_META = threading.local()  # per-thread nesting depth of _parameters_on_meta
_PATCH = {"lock": threading.Lock(), "users": 0}
_ORIGINAL_REGISTER = nn.Module.register_parameter


def _register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    _ORIGINAL_REGISTER(module, name, param)
    if param is not None and getattr(_META, "depth", 0) and param.device.type != "meta":
        module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """In this thread, put every parameter on the meta device as it is registered; buffers stay real.

    Unlike `with torch.device("meta")`, buffers computed in `__init__` (RoPE inverse frequencies) keep their
    values, so only parameters need loading afterwards. The hook on `nn.Module.register_parameter` is
    installed while any thread is inside this context and acts only in those threads, so modules another
    thread builds meanwhile are untouched. A parameter is briefly allocated (uninitialised, pages untouched)
    before it moves to meta.
    """
    with _PATCH["lock"]:
        if _PATCH["users"] == 0:
            nn.Module.register_parameter = _register_parameter  # type: ignore[method-assign]
        _PATCH["users"] += 1
    _META.depth = getattr(_META, "depth", 0) + 1
    try:
        yield
    finally:
        _META.depth -= 1
        with _PATCH["lock"]:
            _PATCH["users"] -= 1
            if _PATCH["users"] == 0:
                nn.Module.register_parameter = _ORIGINAL_REGISTER  # type: ignore[method-assign]


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise KeyError(f"model has no parameter or buffer {name!r}")


def load_partial(checkpoint_dir: str | Path, held: Mapping[int, Sequence[int]], device: torch.device | str = "cpu",
                 dtype: torch.dtype | str | None = None, dispatcher: ExpertDispatcher | None = None,
                 capacity: int | None = None) -> tuple[nn.Module, dict[int, ExpertSlots]]:
    """Load the dense part and only the `held` experts ({MoE layer: expert ids}) of a checkpoint.

    Returns the model, already attached (experts implementation "prism") to `dispatcher` (default: a
    `LocalDispatcher`, which raises on a token routed to an absent expert; call `attach` again with the
    runtime's dispatcher), and {MoE layer: ExpertSlots} for every MoE layer (empty where nothing is held), all
    in one slot pool of `capacity` experts (default: exactly the held ones; a server passes its memory budget
    in slots so that live migration can load more).
    `dtype` defaults to the checkpoint's dtype.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    ckpt = Checkpoint.open(checkpoint_dir)
    spec = ckpt.spec
    for layer, ids in held.items():
        if not 0 <= layer < spec.num_moe_layers:
            raise ValueError(f"held MoE layer {layer} out of range 0..{spec.num_moe_layers - 1}")
        bad = [e for e in ids if not 0 <= e < spec.num_experts]
        if bad:
            raise ValueError(f"MoE layer {layer}: expert ids {bad} out of range 0..{spec.num_experts - 1}")
    device = torch.device(device)
    config = AutoConfig.from_pretrained(ckpt.path)
    dtype = _torch_dtype(dtype) or _torch_dtype(getattr(config, "dtype", None)) or torch.float32

    with _parameters_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    if device.type != "cpu":
        for module in model.modules():  # parameters are still on meta: move only the real buffers
            for bname, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[bname] = buf.to(device)

    expert_params = set()
    for _, module in experts_modules(model):
        for pname in ("gate_up_proj", "down_proj"):
            # zero-size stand-ins: the module keeps its attributes but holds no expert memory
            shape = (0, *getattr(module, pname).shape[1:])
            module._parameters[pname] = nn.Parameter(torch.empty(shape, device=device, dtype=dtype),
                                                     requires_grad=False)
            expert_params.add(id(module._parameters[pname]))

    tied = _tied_keys(model)
    with ckpt.reader() as reader:
        missing = []
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in expert_params:
                continue
            key = ckpt.dense.get(name)
            if key is None:
                if name in tied or tensor.device.type != "meta":
                    continue  # tied to another weight, or a buffer computed at init
                missing.append(name)
                continue
            _set_tensor(model, name, reader.tensor(key).to(device=device, dtype=tensor.dtype))
        if missing:
            raise KeyError(f"{ckpt.path}: checkpoint lacks dense tensors {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}")
        if tied:
            model.tie_weights()

        total = sum(len(set(ids)) for ids in held.values())
        if capacity is not None and capacity < total:
            raise ValueError(f"{total} experts to hold but only {capacity} expert slots")
        stores = layer_slots([m for _, m in experts_modules(model)], spec.num_experts,
                             total if capacity is None else capacity, device, dtype)
        for layer, store in stores.items():
            for e in sorted(set(held.get(layer, ()))):
                store.add(e, *ckpt.expert_weights(reader, layer, e, device=device, dtype=dtype))

    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"parameters left unloaded: {leftover[:8]}")
    attach(model, dispatcher if dispatcher is not None else LocalDispatcher(), spec, stores)
    return model, stores


def _tied_keys(model: nn.Module) -> set[str]:
    """Parameter names that transformers ties to another weight (absent from checkpoints)."""
    keys = getattr(model, "all_tied_weights_keys", None)
    if isinstance(keys, Mapping):
        return set(keys)
    if getattr(model.config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()


def load_expert_weights(checkpoint_dir: str | Path, layer: int, expert_id: int, device: torch.device | str = "cpu",
                        dtype: torch.dtype | str | None = None) -> dict[str, Tensor]:
    """One expert's weights from the checkpoint: {"gate_up_proj": [2I, H], "down_proj": [H, I]}.

    `layer` is the MoE layer index. For live migration: `store.add(e, w["gate_up_proj"], w["down_proj"])`.
    """
    ckpt = Checkpoint.open(checkpoint_dir)
    with ckpt.reader() as reader:
        gate_up, down = ckpt.expert_weights(reader, layer, expert_id, device=device, dtype=_torch_dtype(dtype))
    return {"gate_up_proj": gate_up, "down_proj": down}


def _storage_bytes(tensors: Iterator[Tensor] | Sequence[Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t.device.type == "meta" or t.numel() == 0:
            continue
        s = t.untyped_storage()
        seen[(str(t.device), s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def resident_weight_bytes(model: nn.Module, stores: Mapping[int, ExpertSlots] | None = None) -> int:
    """Bytes of real storage behind the model's parameters/buffers and the stores' experts (shared once)."""
    tensors: list[Tensor] = [*model.parameters(), *model.buffers()]
    for store in (stores or {}).values():
        tensors.extend(store.tensors())
    return _storage_bytes(tensors)
