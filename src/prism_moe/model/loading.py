"""Partial loading: the dense part of a MoE checkpoint plus only the routed experts a server holds.

The model skeleton is built with every parameter on the meta device (buffers such as RoPE frequencies are
computed for real), dense tensors are then read one by one from the safetensors files, and each MoE layer's
held experts go into `ExpertSlots` (one slot pool). The expert parameters of the transformers modules are left as
zero-size tensors, so resident weight memory is dense + held experts only.

Checkpoint keys are mapped to model parameters with transformers' own conversion mapping for the model
(`get_model_conversion_mapping`: its renamings, then at most one `WeightConverter`, exactly as
`from_pretrained` does), so every layout transformers loads is read the same way: the original per-expert
layout of the hub (`...experts.<e>.gate_proj.weight`, Mixtral's `w1/w3/w2`), fused on-disk experts
(`...experts.gate_up_proj` [E, ...]) and whatever the family's converters build (e.g. split or fused dense
projections). An expert converter runs on one expert's tensors at a time (its merge then makes [1, ...]), so
only the bytes of held experts are read (`safe_open` + `get_slice`). Quantized checkpoints are dequantized with
the format's rules (`quant.py`) before the converters run; other quantizations are refused, and a tensor
holding quantized codes is never loaded as if it were values. Keys transformers drops on load (its
`_keys_to_ignore_on_load_unexpected`, multi-token-prediction layers past `num_hidden_layers`) are ignored.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import onednn
from .experts import ExpertDispatcher, LocalDispatcher, attach, experts_modules
from .families import ExpertsLayout, UnsupportedModelError, check_servable
from .quant import Fp8Blocks, Mxfp4, QuantFormat, QuantizationError, is_quantized_dtype, quant_format
from .slots import ExpertSlots, layer_slots
from .spec import ModelSpec

log = logging.getLogger(__name__)

# Parameter names of a transformers experts module (fixed by its ExpertsInterface), per expert after slicing.
EXPERT_PARAMS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias", "up_proj", "up_proj_bias")
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _torch_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    return getattr(torch, str(dtype).removeprefix("torch."))


@dataclass(frozen=True)
class ExpertWeights:
    """One routed expert in the store's canonical layout.

    `gate_up` [2I, H] (rows `[:I]` gate, `[I:]` up, whatever the module's layout), `down` [H, I], and the
    biases `gate_up_bias` [2I], `down_bias` [H] of families that have them.
    """

    gate_up: Tensor
    down: Tensor
    gate_up_bias: Tensor | None = None
    down_bias: Tensor | None = None


@dataclass
class _Source:
    """Where one model tensor (dense) or one expert parameter comes from.

    `converter`: transformers' `WeightConverter` to run (None: a plain rename). `keys[pattern]` lists the
    checkpoint keys per source pattern; for per-expert sources `by_expert[pattern][e]` gives expert e's key;
    `fused` marks checkpoint tensors that hold every expert ([E, ...], sliced per expert).
    """

    target: str
    converter: Any = None
    keys: dict[str, list[str]] = field(default_factory=dict)
    by_expert: dict[str, dict[int, str]] = field(default_factory=dict)
    fused: bool = False

    def add(self, pattern: str, key: str, expert: int | None = None) -> None:
        self.keys.setdefault(pattern, []).append(key)
        if expert is not None:
            self.by_expert.setdefault(pattern, {})[expert] = key


@dataclass
class Checkpoint:
    """Index of a safetensors checkpoint folder: which file holds each tensor and which model tensor it feeds.

    `dense[model_name]` says how to build one dense model tensor; `expert_params[moe_layer][param]` how to
    build one expert's `param` (gate_up_proj, down_proj and the biases). `layouts[moe_layer]` is the experts
    module's layout. `quant` is the checkpoint's quantization format (None: unquantized).
    """

    path: Path
    config: dict[str, Any]
    spec: ModelSpec
    file_of: dict[str, str]
    quant: QuantFormat | None = None
    dense: dict[str, _Source] = field(default_factory=dict)
    expert_params: dict[int, dict[str, _Source]] = field(default_factory=dict)
    layouts: dict[int, ExpertsLayout] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    dequant_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def open(cls, checkpoint_dir: str | Path, model: nn.Module | None = None) -> Checkpoint:
        """Index `checkpoint_dir`; `model` is the (meta) skeleton to map keys onto (built on meta if not given)."""
        path = Path(checkpoint_dir)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{path} has no config.json: not a transformers checkpoint folder")
        config = json.loads(cfg_file.read_text())
        spec = ModelSpec.from_pretrained(path)
        family = str(config.get("model_type", "model"))
        ckpt = cls(path, config, spec, _file_map(path), quant=quant_format(config, family))
        ckpt.dequant_dtype = _torch_dtype(config.get("dtype") or config.get("torch_dtype")) or torch.bfloat16
        if model is None:
            model = _meta_model(path)
        ckpt._index(model)
        return ckpt

    @property
    def family(self) -> str:
        return str(self.config.get("model_type", "model"))

    # --- indexing ---------------------------------------------------------------------------------------------
    def _logical_keys(self) -> dict[str, str]:
        """Checkpoint key of each weight -> its storage kind ("plain", "fp8", "mxfp4"); scales are folded in."""
        keys = set(self.file_of)
        out: dict[str, str] = {}
        aux = set()
        if isinstance(self.quant, Mxfp4):
            for k in keys:
                if k.endswith("_blocks") and k.removesuffix("_blocks") + "_scales" in keys:
                    out[k.removesuffix("_blocks")] = "mxfp4"
                    aux.update((k, k.removesuffix("_blocks") + "_scales"))
        for k in keys:
            if k.endswith("_scale_inv") and k.removesuffix("_scale_inv") in keys:
                if not isinstance(self.quant, Fp8Blocks):
                    raise QuantizationError(
                        f"{self.path}: tensor {k!r} is an FP8 scale but config.json declares "
                        f"{'no quantization_config' if self.quant is None else self.quant.method}; refusing to "
                        f"load quantized weights as plain values (add the checkpoint's quantization_config)")
                out[k.removesuffix("_scale_inv")] = "fp8"
                aux.add(k)
        if self.quant is None and any(k.endswith("_blocks") for k in keys):
            bad = sorted(k for k in keys if k.endswith("_blocks"))[:3]
            raise QuantizationError(f"{self.path}: tensors {bad} look MXFP4-packed but config.json has no "
                                    f"quantization_config; refusing to load them as plain values")
        for k in keys - aux:
            out.setdefault(k, "plain")
        return out

    def _index(self, model: nn.Module) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self._model = model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        names = dict(model.state_dict(keep_vars=True))
        modules = experts_modules(model)
        moe_of_decoder = {d: i for i, (d, _) in enumerate(modules)}
        experts_prefix = {name: i for i, (name, _) in enumerate(_experts_module_names(model))}
        self.layouts = {i: ExpertsLayout.of(m, self.family) for i, (_, m) in enumerate(modules)}
        ignore = _ignore_regex(model)
        num_layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)

        for key, kind in sorted(self._logical_keys().items()):
            self._kind[key] = kind
            name, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, names)
            layer = _LAYER_RE.search(name)
            if (ignore is not None and (ignore.search(key) or ignore.search(name))) \
                    or (layer is not None and num_layers and int(layer.group(1)) >= num_layers):
                self.ignored.append(key)  # what transformers drops too (e.g. DeepSeek-V3's MTP layer)
                continue
            module_name, _, param = name.rpartition(".")
            if module_name in experts_prefix and param in EXPERT_PARAMS:
                moe = experts_prefix[module_name]
                src = self.expert_params.setdefault(moe, {}).setdefault(param, _Source(name))
                if pattern is None:  # the checkpoint holds this parameter for every expert: [E, ...]
                    src.fused = True
                    src.add(key, key)
                else:
                    src.converter = by_pattern[pattern]
                    m = re.search(pattern.replace("*", r"(\d+)"), _renamed_only(key, renamings))
                    if m is None or not m.groups():
                        src.fused = True
                        src.add(pattern, key)
                    else:
                        src.add(pattern, key, int(m.group(1)))
                continue
            if name in names:
                src = self.dense.get(name)
                if src is None:
                    src = _Source(name, by_pattern[pattern] if pattern is not None else None)
                    self.dense[name] = src
                    if src.converter is not None:  # a one-to-many converter feeds several model tensors
                        for t in src.converter.target_patterns[1:]:
                            self.dense.setdefault(name.replace(src.converter.target_patterns[0], t), src)
                src.add(pattern or key, key)
                continue
            if layer is not None and int(layer.group(1)) not in moe_of_decoder and ".experts." in name:
                raise ValueError(f"{self.path}: expert tensor {key!r} is not in a MoE layer "
                                 f"(MoE decoder layers: {sorted(moe_of_decoder)})")
            self.unexpected.append(key)
        if self.unexpected:
            log.warning("%s: %d checkpoint tensors are not used by %s (as transformers would drop them): %s%s",
                        self.path, len(self.unexpected), type(model).__name__, self.unexpected[:5],
                        " ..." if len(self.unexpected) > 5 else "")

    # --- reading ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def reader(self) -> Iterator[_Reader]:
        """Open safetensors files lazily for a batch of reads; closes them on exit."""
        r = _Reader(self)
        try:
            yield r
        finally:
            r.close()

    def _value(self, reader: _Reader, key: str, index: int | None, dtype: torch.dtype | None) -> Tensor:
        """The values of checkpoint weight `key` (row `index` of a fused tensor), dequantized if quantized."""
        kind = self._kind.get(key, "plain")
        target = dtype or self.dequant_dtype
        if kind == "fp8":
            assert isinstance(self.quant, Fp8Blocks)
            scale_key = Fp8Blocks.scale_key(key)
            w, s = reader.read(key, index), reader.read(scale_key, index)
            return self.quant.dequantize(w, s, target, name=key)
        if kind == "mxfp4":
            blocks, scales = Mxfp4.parts(key)
            values = Mxfp4.dequantize(reader.read(blocks, index), reader.read(scales, index), target, name=key)
            # packed rows are the module's last dim (GPT-OSS's [E, H, 2I]), as convert_moe_packed_tensors has it
            return values.transpose(-1, -2)
        t = reader.read(key, index)
        if is_quantized_dtype(t.dtype) and (dtype is None or dtype.is_floating_point):  # int buffers stay ints
            raise QuantizationError(f"{self.path}: tensor {key!r} holds {t.dtype} codes without a scale the "
                                    f"checkpoint's quantization ({self.quant.method if self.quant else 'none'}) "
                                    f"explains; refusing to load it as values")
        return t if dtype is None else t.to(dtype)

    def _convert(self, src: _Source, tensors: dict[str, list[Callable[[], Tensor]]],
                 model: nn.Module | None) -> dict[str, Tensor]:
        """Run `src`'s transformers converter on the given source tensors -> {model name: tensor}.

        `model` is the skeleton whose parameter shapes some operations read (e.g. `Split` sizes its pieces).
        """
        conv = copy.deepcopy(src.converter)
        for pattern, loaders in tensors.items():
            for load in loaders:
                conv.add_tensor(src.target, "", pattern, load)
        try:
            out = conv.convert(src.target, model=model, config=getattr(model, "config", None))
        except Exception as e:
            raise UnsupportedModelError(f"{self.path}: transformers' converter {conv!r} for {src.target!r} could "
                                        f"not run outside a full model load ({type(e).__name__}: {e})") from e
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}

    def dense_tensor(self, reader: _Reader, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """Model tensor `name` (dense part), renamed/converted/dequantized as transformers loads it."""
        src = self.dense[name]
        if src.converter is None:
            (key,) = next(iter(src.keys.values()))
            return self._value(reader, key, None, dtype)
        cached = reader.converted.get(id(src))
        if cached is None:
            cached = self._convert(src, {p: [lambda k=k: self._value(reader, k, None, dtype) for k in keys]
                                         for p, keys in src.keys.items()}, self._model)
            reader.converted[id(src)] = cached
        if name not in cached:
            raise KeyError(f"{self.path}: converter for {src.target!r} produced {sorted(cached)}, not {name!r}")
        return cached[name]

    def has_expert(self, layer: int, expert_id: int) -> bool:
        params = self.expert_params.get(layer, {})
        if "down_proj" not in params:
            return False
        return all(src.fused or all(expert_id in ids for ids in src.by_expert.values()) for src in params.values())

    def holds_all_experts(self) -> bool:
        return all(self.has_expert(layer, e) for layer in range(self.spec.num_moe_layers)
                   for e in range(self.spec.num_experts))

    def expert_weights(self, reader: _Reader, layer: int, expert_id: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None) -> ExpertWeights:
        """One expert of MoE layer `layer` in the store's canonical layout, reading only its bytes."""
        if not 0 <= layer < self.spec.num_moe_layers:
            raise ValueError(f"MoE layer {layer} out of range 0..{self.spec.num_moe_layers - 1}")
        if not 0 <= expert_id < self.spec.num_experts:
            raise ValueError(f"expert {expert_id} out of range 0..{self.spec.num_experts - 1}")
        params = self.expert_params.get(layer, {})
        missing = [p for p in ("gate_up_proj", "down_proj") if p not in params]
        if missing:
            raise KeyError(f"{self.path}: no {missing} weights for MoE layer {layer}")
        layout = self.layouts[layer]
        out: dict[str, Tensor] = {}
        for pname, src in params.items():
            t = self._expert_param(reader, src, expert_id, dtype)
            out[pname] = layout.canonical(pname, t).to(device=device)
        if layout.has_bias and ("gate_up_proj_bias" not in out or "down_proj_bias" not in out):
            raise KeyError(f"{self.path}: MoE layer {layer} lacks the expert biases its {layout.module} needs")
        return ExpertWeights(out["gate_up_proj"], out["down_proj"], out.get("gate_up_proj_bias"),
                             out.get("down_proj_bias"))

    def _expert_param(self, reader: _Reader, src: _Source, e: int, dtype: torch.dtype | None) -> Tensor:
        if src.converter is None:  # fused on disk under the model's own name: row e
            (key,) = next(iter(src.keys.values()))
            return self._value(reader, key, e, dtype)
        loaders: dict[str, list[Callable[[], Tensor]]] = {}
        for pattern, keys in src.keys.items():
            if pattern in src.by_expert:
                key = src.by_expert[pattern].get(e)
                if key is None:
                    raise KeyError(f"{self.path}: no {pattern!r} tensor for expert {e} of {src.target!r}")
                loaders[pattern] = [lambda k=key: self._value(reader, k, None, dtype)]
            else:  # fused source tensors behind a converter: expert e as a batch of one
                loaders[pattern] = [lambda k=k: self._value(reader, k, e, dtype).unsqueeze(0) for k in keys]
        out = self._convert(src, loaders, None)  # the module's expert parameters are zero-size stand-ins
        (t,) = out.values()
        if t.dim() < 2 or t.shape[0] != 1:
            raise UnsupportedModelError(f"{self.path}: converter for {src.target!r} gave {tuple(t.shape)} for one "
                                        f"expert, expected [1, ...]")
        return t[0]

    def __post_init__(self) -> None:
        self._kind: dict[str, str] = {}
        self._model: nn.Module | None = None  # the skeleton the keys were mapped onto (for converters' shapes)


class _Reader:
    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.converted: dict[int, dict[str, Tensor]] = {}  # one run per multi-target dense converter
        self._open: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

    def _file(self, key: str) -> Any:
        from safetensors import safe_open

        fname = self.ckpt.file_of[key]
        if fname not in self._open:
            self._open[fname] = self._stack.enter_context(safe_open(str(self.ckpt.path / fname), framework="pt"))
        return self._open[fname]

    def read(self, key: str, index: int | None = None) -> Tensor:
        """Tensor `key`, or only the bytes of its row `index` (a fused [E, ...] tensor)."""
        if index is None:
            return self._file(key).get_tensor(key)
        return self._file(key).get_slice(key)[index]

    def close(self) -> None:
        self._stack.close()
        self._open.clear()
        self.converted.clear()


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


def _renamed_only(key: str, renamings: Sequence[Any]) -> str:
    from transformers.core_model_loading import apply_renamings

    return apply_renamings(key, list(renamings))


def _experts_module_names(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of the experts modules, in the order of `experts_modules` (MoE layer order)."""
    ids = {id(m): i for i, (_, m) in enumerate(experts_modules(model))}
    named = [(n, m) for n, m in model.named_modules() if id(m) in ids]
    return sorted(named, key=lambda t: ids[id(t[1])])


def _ignore_regex(model: nn.Module) -> re.Pattern[str] | None:
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    if any(n.endswith("rotary_emb.inv_freq") for n, _ in model.named_buffers()):
        patterns.add(r"rotary_emb\.inv_freq")
    return re.compile("|".join(f"({p})" for p in patterns)) if patterns else None


def _hf_config(path: Path) -> Any:
    """transformers' config of the checkpoint, without its quantization (prism dequantizes on load itself)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return config


def _meta_model(path: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(_hf_config(path))


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
                 capacity: int | None = None, packed: bool = False) -> tuple[nn.Module, dict[int, ExpertSlots]]:
    """Load the dense part and only the `held` experts ({MoE layer: expert ids}) of a checkpoint.

    Returns the model, already attached (experts implementation "prism") to `dispatcher` (default: a
    `LocalDispatcher`, which raises on a token routed to an absent expert; call `attach` again with the
    runtime's dispatcher), and {MoE layer: ExpertSlots} for every MoE layer (empty where nothing is held), all
    in one slot pool of `capacity` experts (default: exactly the held ones; a server passes its memory budget
    in slots so that live migration can load more).
    `dtype` defaults to the checkpoint's dtype. A family the expert store cannot compute is refused with
    `UnsupportedModelError` before any weight is read. `packed`: keep the experts and the dense linear layers in
    oneDNN's packed layout where oneDNN computes them (float32 on a CPU; ignored elsewhere), what `prism serve` does
    (model/onednn.py).
    """

    path = Path(checkpoint_dir)
    spec = ModelSpec.from_pretrained(path)
    for layer, ids in held.items():
        if not 0 <= layer < spec.num_moe_layers:
            raise ValueError(f"held MoE layer {layer} out of range 0..{spec.num_moe_layers - 1}")
        bad = [e for e in ids if not 0 <= e < spec.num_experts]
        if bad:
            raise ValueError(f"MoE layer {layer}: expert ids {bad} out of range 0..{spec.num_experts - 1}")
    device = torch.device(device)
    model = model_skeleton(path, dtype)
    config, dtype = model.config, next(model.parameters()).dtype
    packed = packed and onednn.usable(device, dtype)
    layouts = check_servable(model, str(config.model_type))
    built = [d for d, _ in experts_modules(model)]
    if tuple(built) != tuple(spec.moe_layer_ids):
        raise UnsupportedModelError(f"model family {config.model_type!r}: transformers builds experts in decoder layers "
                                    f"{built} but prism-moe reads MoE layers {list(spec.moe_layer_ids)} from its config "
                                    f"(its MoE layer fields are not known to model/spec.py yet)")
    for (_, module), layout in zip(experts_modules(model), layouts, strict=True):
        experts, *shape = module.gate_up_proj.shape  # [E, 2I, H], or [E, H, 2I] when transposed
        width = (shape[1] if layout.is_transposed else shape[0]) // 2
        if (experts, width) != (spec.num_experts, spec.expert_intermediate_size):
            raise UnsupportedModelError(f"model family {config.model_type!r}: transformers builds {experts} experts "
                                        f"of width {width} but prism-moe reads {spec.num_experts} of width "
                                        f"{spec.expert_intermediate_size} from its config, so its memory plan would "
                                        f"be wrong (model/spec.py does not know this family's expert fields yet)")
    ckpt = Checkpoint.open(path, model)
    if device.type != "cpu":
        for module in model.modules():  # parameters are still on meta: move only the real buffers
            for bname, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[bname] = buf.to(device)

    expert_params = set()
    for _, module in experts_modules(model):
        for pname in EXPERT_PARAMS:
            param = module._parameters.get(pname)
            if param is None:
                continue
            # zero-size stand-ins: the module keeps its attributes but holds no expert memory
            module._parameters[pname] = nn.Parameter(torch.empty((0, *param.shape[1:]), device=device, dtype=dtype),
                                                     requires_grad=False)
            expert_params.add(id(module._parameters[pname]))

    tied = _tied_keys(model)
    with ckpt.reader() as reader:
        missing = []
        for name, tensor in model.state_dict(keep_vars=True).items():
            if id(tensor) in expert_params:
                continue
            if name not in ckpt.dense:
                if name in tied or tensor.device.type != "meta":
                    continue  # tied to another weight, or a buffer computed at init
                missing.append(name)
                continue
            value = ckpt.dense_tensor(reader, name, dtype=tensor.dtype)
            if tuple(value.shape) != tuple(tensor.shape):
                raise ValueError(f"{ckpt.path}: {name} has shape {tuple(value.shape)} in the checkpoint, the model "
                                 f"expects {tuple(tensor.shape)}")
            _set_tensor(model, name, value.to(device=device))
        if missing:
            raise KeyError(f"{ckpt.path}: checkpoint lacks dense tensors {missing[:8]}"
                           f"{' ...' if len(missing) > 8 else ''}")
        if tied:
            model.tie_weights()

        total = sum(len(set(ids)) for ids in held.values())
        if capacity is not None and capacity < total:
            raise ValueError(f"{total} experts to hold but only {capacity} expert slots")
        stores = layer_slots([m for _, m in experts_modules(model)], spec.num_experts,
                             total if capacity is None else capacity, device, dtype,
                             packed=packed)
        for layer, store in stores.items():
            for e in sorted(set(held.get(layer, ()))):
                w = ckpt.expert_weights(reader, layer, e, device=device, dtype=dtype)
                if layouts[layer].has_bias:  # check_servable let it through: the store takes biases
                    store.add(e, w.gate_up, w.down, w.gate_up_bias, w.down_bias)
                else:
                    store.add(e, w.gate_up, w.down)

    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"parameters left unloaded: {leftover[:8]}")
    if packed:
        onednn.pack_linears(model)
    attach(model, dispatcher if dispatcher is not None else LocalDispatcher(), spec, stores)
    return model, stores


def model_skeleton(checkpoint_dir: str | Path, dtype: torch.dtype | str | None = None) -> nn.Module:
    """The checkpoint's model with every parameter on the meta device (no memory, no weights read): its config,
    generation config and shapes, what `load_partial` fills and what the API process reads (runtime/api_process.py).
    `dtype` defaults to the checkpoint's."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = _hf_config(Path(checkpoint_dir))
    dtype = _torch_dtype(dtype) or _torch_dtype(getattr(config, "dtype", None)) or torch.float32
    with _parameters_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


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
    """One expert's weights from the checkpoint: {"gate_up_proj": [2I, H], "down_proj": [H, I]} (+ the
    "gate_up_proj_bias" [2I] and "down_proj_bias" [H] of biased families), dequantized if quantized.

    `layer` is the MoE layer index. For live migration: `store.add(e, w["gate_up_proj"], w["down_proj"])`.
    """
    ckpt = Checkpoint.open(checkpoint_dir)
    with ckpt.reader() as reader:
        w = ckpt.expert_weights(reader, layer, expert_id, device=device, dtype=_torch_dtype(dtype))
    out = {"gate_up_proj": w.gate_up, "down_proj": w.down}
    if w.gate_up_bias is not None:
        out["gate_up_proj_bias"] = w.gate_up_bias
    if w.down_bias is not None:
        out["down_proj_bias"] = w.down_bias
    return out


def _storage_bytes(tensors: Iterator[Tensor] | Sequence[Tensor]) -> int:
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t.device.type == "meta" or t.numel() == 0:
            continue
        if t.is_mkldnn:  # a oneDNN-packed weight (opaque: no storage to share)
            seen[("mkldnn", id(t))] = t.numel() * t.element_size()
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
