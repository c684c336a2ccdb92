"""Named workload sources: real routing statistics by name, and the data folder they live in.

A workload is what one server's users make the model do: per-MoE-layer expert activation counts, plus
the per-token trace when the source has one. Names:

    esft:<domain>                          intent, law, summary, translation (DeepSeek-V2-Lite layout, traces)
    moe-lens:<base|chat|olmoe|qwen>:<domain>  counts
    olmoe-routing:<olmoe|mistral>:<domain>[:top1]  counts of layers 0, 7, 15 only
    fiddler:<original|instruct>:<subject>   Mixtral counts
    mixtral-decode:<gsm8k|humaneval>        Mixtral decode traces
    embedded:esft:<domain>                 the compact ESFT sample shipped in the package (no data folder needed)
    <path>.safetensors / <path>.json        a prism-moe trace or counts file
    <path>.pt                               an SGLang expert-distribution recorder dump (logical_count)
    <path>.safetensors (not a trace)        a vLLM EPLB expert-load file (global_expert_load_window_i<N>)

Domains are discovered from the data folder; `list_workloads()` lists every valid name. When no data folder
holds the ESFT set, `esft:<domain>` falls back to `embedded:esft:<domain>` with a note.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from prism_moe.model.spec import ModelSpec, load_model_spec
from prism_moe.stats import engines, readers
from prism_moe.stats.trace import TRACE_FORMAT, RoutingTrace, load_counts, load_trace

DATA_ENV = "PRISM_DATA_DIR"

FAMILIES = ("esft", "moe-lens", "olmoe-routing", "fiddler", "mixtral-decode", "embedded")
# the compact real sample shipped inside the package (src/prism_moe/data/README.md)
EMBEDDED_DIR = Path(__file__).resolve().parents[1] / "data"
# MoE-Lens file suffix -> preset of the model it was measured on
MOE_LENS_MODELS = {"base": "deepseek-moe-16b", "chat": "deepseek-moe-16b", "olmoe": "olmoe-1b-7b",
                   "qwen": "qwen1.5-moe-a2.7b"}
OLMOE_ROUTING_MODELS = {"olmoe": "olmoe-1b-7b", "mistral": "mixtral-8x7b"}
# the OLMoE authors' text file of each domain (run_routing_analysis.py: name2finaldata)
OLMOE_TEXT_FILES = {"github": "github_oss_with_stack_texts.txt", "book": "b3g_texts.txt"}
FIDDLER_VARIANTS = ("original", "instruct")
MIXTRAL = "mixtral-8x7b"

_DATA_HELP = ("the data sets are the public routing measurements described in shared/data/README.md "
              "(ESFT, MoE-Lens, OLMoE, Fiddler, speculative-moe): `prism data fetch` downloads them, or pass "
              f"--data-dir or set {DATA_ENV} to the folder that holds them")


def user_data_dir() -> Path:
    """Where `prism data fetch` stores the data sets: $PRISM_DATA_DIR, else $XDG_CACHE_HOME/prism-moe/data
    (~/.cache/prism-moe/data when XDG_CACHE_HOME is unset). It may not exist yet."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "prism-moe" / "data"


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The routing data folder: `data_dir`, else $PRISM_DATA_DIR, else `shared/data` beside the
    repository, else `./shared/data` or `../shared/data` from the working directory, else the user cache
    folder that `prism data fetch` fills (`user_data_dir()`)."""
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"data folder {p} does not exist; {_DATA_HELP}")
        return p.resolve()
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"{DATA_ENV}={env} is not a folder; {_DATA_HELP}")
        return p.resolve()
    candidates = list(dict.fromkeys([Path(__file__).resolve().parents[3].parent / "shared" / "data",
                                     Path.cwd() / "shared" / "data", Path.cwd().parent / "shared" / "data",
                                     user_data_dir()]))
    for p in candidates:
        if p.is_dir():
            return p.resolve()
    raise FileNotFoundError(f"no routing data folder found (looked in {', '.join(map(str, candidates))}); "
                            f"{_DATA_HELP}")


# --- the workload ----------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # arrays: identity equality, not ambiguous elementwise ==
class Workload:
    """Routing statistics of one workload.

    counts:          float64 `[layers, experts]` activation counts per MoE layer (read-only).
    trace:           per-token routing when the source has it, else None.
    measured_layers: bool `[layers]`; False rows were not measured (zeros, or filled by `fit_to`).
    model_hint:      preset name of the model the data was measured on ("" when unknown).
    top_k:           expert selections per token in `counts` (the model's top-k; 1 for `:top1` data;
                     0 when unknown).
    notes:           approximations made on the way, in words; show them to the user.
    """

    source: str
    counts: np.ndarray
    trace: RoutingTrace | None
    measured_layers: np.ndarray
    model_hint: str
    top_k: int
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts, dtype=np.float64)
        if counts.ndim != 2 or 0 in counts.shape:
            raise ValueError(f"workload {self.source!r}: counts must be [layers, experts], got {counts.shape}")
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError(f"workload {self.source!r}: counts must be finite and non-negative")
        measured = np.asarray(self.measured_layers, dtype=bool)
        if measured.shape != (counts.shape[0],):
            raise ValueError(f"workload {self.source!r}: measured_layers must have shape ({counts.shape[0]},)")
        t = self.trace
        if t is not None and (t.num_layers, t.num_experts) != counts.shape:
            raise ValueError(f"workload {self.source!r}: trace has {t.num_layers} layers x {t.num_experts} "
                             f"experts but counts are {counts.shape}")
        for name, arr in (("counts", counts), ("measured_layers", measured)):
            v = arr.view()
            v.flags.writeable = False
            object.__setattr__(self, name, v)
        object.__setattr__(self, "notes", list(self.notes))

    @property
    def num_layers(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_tokens(self) -> int:
        """Tokens behind the counts (exact with a trace; else the largest measured row sum / top_k)."""
        if self.trace is not None:
            return self.trace.num_tokens
        if not self.top_k or not self.measured_layers.any():
            return 0
        return int(round(self.counts[self.measured_layers].sum(axis=1).max() / self.top_k))

    def frequencies(self) -> np.ndarray:
        """Counts normalised per layer, float64 `[layers, experts]`; rows sum to 1, an all-zero row is
        uniform."""
        sums = self.counts.sum(axis=1, keepdims=True)
        uniform = np.full_like(self.counts, 1.0 / self.num_experts)
        return np.where(sums > 0, self.counts / np.where(sums > 0, sums, 1.0), uniform)

    def fit_to(self, num_layers: int, num_experts: int) -> Workload:
        """This workload shaped `[num_layers, num_experts]` for a model.

        The expert count must match (expert ids of different models mean nothing to each other). Layers
        that were not measured take the counts of the nearest measured layer; if the layer counts differ,
        layer i takes the measured layer at the same relative depth. Each such approximation is added to
        `notes`. The trace, if any, is remapped the same way.
        """
        if num_experts != self.num_experts:
            raise ValueError(f"workload {self.source!r} has {self.num_experts} experts per layer (measured on "
                             f"{self.model_hint or 'an unknown model'}) but the model has {num_experts}; expert "
                             f"ids do not carry over between models: use a workload measured on a model with "
                             f"{num_experts} experts")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        measured = np.flatnonzero(self.measured_layers)
        if measured.size == 0:
            raise ValueError(f"workload {self.source!r} has no measured layer to fit from")
        n_src = self.num_layers
        if num_layers == n_src:
            pos = np.arange(num_layers, dtype=np.float64)
        elif num_layers == 1:
            pos = np.zeros(1)
        else:
            pos = np.arange(num_layers) * (n_src - 1) / (num_layers - 1)
        # nearest measured layer; ties go to the shallower layer (argmin takes the first)
        src = measured[np.argmin(np.abs(measured[None, :] - pos[:, None]), axis=1)]
        notes = list(self.notes)
        if num_layers == n_src:
            filled = np.flatnonzero(src != np.arange(num_layers))
            if filled.size == 0:
                return replace(self, notes=notes)
            notes.append(f"{self.source}: MoE layers {_ranges(filled)} were not measured; their counts are "
                         f"copied from the nearest measured layer ({_ranges(measured)}), an approximation")
            new_measured = src == np.arange(num_layers)
        else:
            notes.append(f"{self.source}: measured on {n_src} MoE layers, fitted to {num_layers}: each layer takes "
                         f"the measured layer at the nearest relative depth, an approximation")
            new_measured = np.zeros(num_layers, dtype=bool)
        trace = self.trace
        if trace is not None:
            trace = RoutingTrace(experts=trace.experts[:, src], seq_starts=trace.seq_starts,
                                 weights=None if trace.weights is None else trace.weights[:, src],
                                 num_experts=trace.num_experts, source=trace.source, model=trace.model)
        return replace(self, counts=self.counts[src], trace=trace, measured_layers=new_measured, notes=notes)

    def fit_to_model(self, spec: ModelSpec) -> Workload:
        """`fit_to(spec.num_moe_layers, spec.num_experts)`, with a note when the data comes from another model."""
        w = self.fit_to(spec.num_moe_layers, spec.num_experts)
        if self.model_hint and self.model_hint != spec.name:
            w.notes.append(f"{self.source}: measured on {self.model_hint}, used for {spec.name}")
        return w


def _ranges(idx: np.ndarray) -> str:
    """[1,2,3,5] -> '1-3, 5'."""
    out, idx = [], [int(i) for i in idx]
    start = prev = idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ", ".join(out)


def stack_counts(workloads: list[Workload], *, normalize: bool = False) -> np.ndarray:
    """Counts of one workload per server, float64 `[servers, layers, experts]` (per-layer frequencies when
    `normalize`). All workloads must have the same shape: `fit_to` them first."""
    if not workloads:
        raise ValueError("stack_counts needs at least one workload")
    shapes = {w.counts.shape for w in workloads}
    if len(shapes) != 1:
        listing = ", ".join(f"{w.source}: {w.counts.shape}" for w in workloads)
        raise ValueError(f"workloads have different shapes ({listing}); fit_to(num_layers, num_experts) them "
                         f"to one model first")
    return np.stack([w.frequencies() if normalize else np.array(w.counts) for w in workloads])


# --- discovery -------------------------------------------------------------------------------------

def esft_domains(root: Path) -> list[str]:
    """The ESFT domains the data folder holds."""
    return list(_esft_domains(root))


def _esft_domains(root: Path) -> dict[str, Path]:
    base = root / "esft" / "expert_scores"
    if not base.is_dir():
        return {}
    return {d.name: d for d in sorted(base.iterdir())
            if d.is_dir() and any(re.match(r"expert_weights_\d+\.txt", p.name) for p in d.iterdir())}


def _moe_lens_files(root: Path) -> dict[tuple[str, str], Path]:
    base = root / "moe-lens"
    out = {}
    for p in sorted(base.glob("*_expert_data_*.pt")) if base.is_dir() else []:
        m = re.fullmatch(r"(.+)_expert_data_([a-z0-9]+)\.pt", p.name)
        if m and m.group(2) in MOE_LENS_MODELS:  # an unknown suffix names no known model
            out[(m.group(2), m.group(1))] = p
    return out


def _olmoe_files(root: Path) -> dict[tuple[str, str, bool], Path]:
    out = {}
    for m in OLMOE_ROUTING_MODELS:
        for top1, sub in ((False, "expert_counts"), (True, "expert_counts_top1")):
            d = root / "olmoe-routing" / m / sub
            for p in sorted(d.glob("*.pkl")) if d.is_dir() else []:
                out[(m, p.stem, top1)] = p
    return out


def _fiddler_files(root: Path) -> dict[tuple[str, str], Path]:
    out = {}
    for v in FIDDLER_VARIANTS:
        d = root / "fiddler-mixtral" / v
        for p in sorted(d.glob("expert_popularity_*.json")) if d.is_dir() else []:
            out[(v, p.stem.removeprefix("expert_popularity_"))] = p
    return out


def _mixtral_decode_files(root: Path) -> dict[str, Path]:
    d = root / "mixtral-decode"
    found: dict[str, tuple[int, Path]] = {}
    for p in sorted(d.glob("*_routing.jsonl")) if d.is_dir() else []:
        m = re.fullmatch(r"(.+)_(\d+|full)_routing\.jsonl", p.name)
        if m:
            rank = 10**12 if m.group(2) == "full" else int(m.group(2))  # prefer the run with most problems
            if m.group(1) not in found or rank > found[m.group(1)][0]:
                found[m.group(1)] = (rank, p)
    return {k: v[1] for k, v in found.items()}


def embedded_workloads() -> list[str]:
    """The names of the sample shipped in the package: `embedded:esft:<domain>`."""
    return sorted(f"embedded:esft:{p.stem.removeprefix('esft-')}" for p in EMBEDDED_DIR.glob("esft-*.safetensors"))


def find_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """`resolve_data_dir`, or None when no folder was named (argument or $PRISM_DATA_DIR) and none is
    found; a named folder must exist."""
    try:
        return resolve_data_dir(data_dir)
    except FileNotFoundError:
        if data_dir is not None or os.environ.get(DATA_ENV):
            raise
        return None


def list_workloads(data_dir: str | Path | None = None) -> list[str]:
    """Every workload name the data folder holds, and the embedded sample's (all there is without a
    data folder)."""
    names = embedded_workloads()
    root = find_data_dir(data_dir)
    if root is None:
        return names
    names += [f"esft:{d}" for d in _esft_domains(root)]
    names += [f"moe-lens:{m}:{d}" for m, d in _moe_lens_files(root)]
    names += [f"olmoe-routing:{m}:{d}" + (":top1" if top1 else "") for m, d, top1 in _olmoe_files(root)]
    names += [f"fiddler:{v}:{s}" for v, s in _fiddler_files(root)]
    names += [f"mixtral-decode:{d}" for d in _mixtral_decode_files(root)]
    return sorted(names)


def _choice(what: str, value: str, valid: list[str] | tuple[str, ...], where: Path | None = None,
            context: str = "") -> None:
    if value not in valid:
        found = f" (found in {where})" if where is not None else ""
        fetch = "; `prism data fetch` downloads the public data sets" if not valid else ""
        raise ValueError(f"unknown {what} {value!r}{context}; choose one of: {', '.join(sorted(valid)) or 'none'}"
                         f"{found}{fetch}")


def _is_path(source: str) -> bool:
    return source.endswith((".safetensors", ".json", ".pt")) or "/" in source or os.sep in source


# --- loading ---------------------------------------------------------------------------------------

def load_workload(source: str, data_dir: str | Path | None = None) -> Workload:
    """A workload by name (see the module docstring) or from a trace/counts file path. Cached per process;
    each call returns its own `notes` list."""
    source = source.strip()
    if _is_path(source):
        p = Path(source).expanduser().resolve()
        if not p.is_file():
            raise FileNotFoundError(f"no trace or counts file at {p}")
        st = p.stat()
        w = _load_file_cached(str(p), st.st_mtime_ns, st.st_size)
    else:
        family = source.split(":", 1)[0]
        if family not in FAMILIES:
            if Path(source).is_file():
                raise ValueError(f"{source}: unsupported file type; give a .safetensors trace, a .json counts file or an SGLang .pt dump")
            raise ValueError(f"unknown workload {source!r}: use one of the families {', '.join(FAMILIES)} "
                             f"(e.g. esft:law; list_workloads() shows all) or a path to a .safetensors trace "
                             f"or .json counts file")
        w = _load_named(source, data_dir)
    return replace(w, notes=list(w.notes))


def _load_named(source: str, data_dir: str | Path | None) -> Workload:
    family, *args = source.split(":")
    if family == "embedded":
        return _load_embedded(source)
    if family == "esft" and len(args) == 1:
        root = find_data_dir(data_dir)
        if root is None or not _esft_domains(root):
            return _esft_fallback(source, root)
    return _load_named_cached(source, str(resolve_data_dir(data_dir)))


def _embedded_path(source: str) -> Path:
    names = embedded_workloads()
    if len(source.split(":")) != 3 or not source.startswith("embedded:esft:"):
        raise ValueError(f"use embedded:esft:<domain>, one of: {', '.join(names)}")
    _choice("embedded workload", source, names, EMBEDDED_DIR)
    return EMBEDDED_DIR / f"esft-{source.split(':')[2]}.safetensors"


def _load_embedded(source: str) -> Workload:
    p = _embedded_path(source)
    st = p.stat()
    return _load_file_cached(str(p), st.st_mtime_ns, st.st_size)


def _esft_fallback(source: str, root: Path | None) -> Workload:
    """`esft:<domain>` without the ESFT set: the embedded sample of that domain, with a note."""
    embedded = f"embedded:{source}"
    where = f"the data folder {root} has no esft/expert_scores" if root else "no routing data folder found"
    if embedded not in embedded_workloads():
        raise ValueError(f"{source}: {where}, and the embedded sample has only "
                         f"{', '.join(n.removeprefix('embedded:') for n in embedded_workloads())}; "
                         f"`prism data fetch esft` downloads the full ESFT set")
    w = _load_embedded(embedded)
    return replace(w, notes=[*w.notes, f"{source}: {where}; using the embedded sample {embedded} "
                                        f"({w.num_tokens:,} tokens of real ESFT routing; `prism data fetch esft` "
                                        f"downloads the full set)"])


@lru_cache(maxsize=64)
def _load_file_cached(path: str, mtime_ns: int, size: int) -> Workload:
    p = Path(path)
    if p.suffix == ".pt":  # SGLang's expert-distribution recorder
        counts, notes = engines.read_sglang_dump(p)
        return Workload(source=str(p), counts=counts, trace=None, measured_layers=np.ones(len(counts), bool),
                        model_hint="", top_k=0, notes=notes)
    if p.suffix == ".safetensors" and not is_trace_file(p):  # vLLM's EPLB load window
        counts = engines.read_vllm_load(p)
        return Workload(source=str(p), counts=counts, trace=None, measured_layers=np.ones(len(counts), bool),
                        model_hint="", top_k=0)
    if p.suffix == ".safetensors":
        t = load_trace(p)
        return Workload(source=t.source or str(p), counts=t.counts(), trace=t,
                        measured_layers=np.ones(t.num_layers, dtype=bool), model_hint=t.model, top_k=t.top_k)
    if p.suffix == ".json":
        c = load_counts(p)
        measured = np.ones(c.counts.shape[0], dtype=bool) if c.measured_layers is None else c.measured_layers
        notes = []
        top_k = c.top_k
        if not top_k and c.model:
            try:
                top_k = load_model_spec(c.model).top_k
                notes.append(f"{p.name}: no top_k in the file; took top-{top_k} of model {c.model}")
            except ValueError:
                pass
        return Workload(source=c.source or str(p), counts=c.counts, trace=None, measured_layers=measured,
                        model_hint=c.model, top_k=top_k, notes=notes)
    raise ValueError(f"{p}: unsupported file type; give a .safetensors trace, a .json counts file or an SGLang .pt dump")


def is_trace_file(path: Path) -> bool:
    """Whether a safetensors file says it is a prism-moe trace (its header's format)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return (f.metadata() or {}).get("format") == TRACE_FORMAT
    except Exception as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None


@lru_cache(maxsize=64)
def _load_named_cached(source: str, root_str: str) -> Workload:
    root = Path(root_str)
    family, *args = source.split(":")

    if family == "esft":
        domains = _esft_domains(root)
        if len(args) != 1:
            raise ValueError(f"use esft:<domain>, domain one of: {', '.join(domains)}")
        _choice("ESFT domain", args[0], list(domains), root / "esft" / "expert_scores")
        t = readers.read_esft_domain(domains[args[0]], source=source)
        return Workload(source=source, counts=t.counts(), trace=t, measured_layers=np.ones(t.num_layers, bool),
                        model_hint=readers.ESFT_MODEL, top_k=t.top_k)

    if family == "moe-lens":
        files = _moe_lens_files(root)
        if len(args) != 2:
            raise ValueError(f"use moe-lens:<model>:<domain>, model one of {', '.join(MOE_LENS_MODELS)}")
        m, domain = args
        _choice("MoE-Lens model", m, list(MOE_LENS_MODELS))
        _choice("MoE-Lens domain", domain, [d for mm, d in files if mm == m], root / "moe-lens",
                f" for model {m}")
        spec = load_model_spec(MOE_LENS_MODELS[m])
        counts = readers.read_moe_lens(files[(m, domain)])
        if counts.shape != (spec.num_moe_layers, spec.num_experts):
            raise ValueError(f"{files[(m, domain)]}: counts of shape {counts.shape} do not fit {spec.name} "
                             f"({spec.num_moe_layers} MoE layers x {spec.num_experts} experts)")
        return Workload(source=source, counts=counts, trace=None, measured_layers=np.ones(len(counts), bool),
                        model_hint=spec.name, top_k=spec.top_k)

    if family == "olmoe-routing":
        files = _olmoe_files(root)
        if len(args) not in (2, 3) or (len(args) == 3 and args[2] != "top1"):
            raise ValueError(f"use olmoe-routing:<model>:<domain>[:top1], model one of "
                             f"{', '.join(OLMOE_ROUTING_MODELS)}")
        m, domain = args[:2]
        top1 = len(args) == 3
        _choice("OLMoE-routing model", m, list(OLMOE_ROUTING_MODELS))
        _choice("OLMoE-routing domain", domain, [d for mm, d, t1 in files if mm == m and t1 == top1],
                root / "olmoe-routing" / m, f" for model {m}" + (" (top1)" if top1 else ""))
        spec = load_model_spec(OLMOE_ROUTING_MODELS[m])
        counts, measured = readers.read_olmoe_counts(files[(m, domain, top1)], num_layers=spec.num_moe_layers,
                                                     num_experts=spec.num_experts)
        note = (f"{source}: only MoE layers {', '.join(map(str, readers.OLMOE_ROUTING_LAYERS))} were measured "
                f"(other rows are zero; see measured_layers)")
        return Workload(source=source, counts=counts, trace=None, measured_layers=measured, model_hint=spec.name,
                        top_k=1 if top1 else spec.top_k, notes=[note])

    if family == "fiddler":
        files = _fiddler_files(root)
        if len(args) != 2:
            raise ValueError(f"use fiddler:<variant>:<subject>, variant one of {', '.join(FIDDLER_VARIANTS)}")
        v, subject = args
        _choice("Fiddler variant", v, list(FIDDLER_VARIANTS))
        _choice("Fiddler subject", subject, [s for vv, s in files if vv == v], root / "fiddler-mixtral" / v)
        spec = load_model_spec(MIXTRAL)
        counts = readers.read_fiddler(files[(v, subject)])
        if counts.shape != (spec.num_moe_layers, spec.num_experts):
            raise ValueError(f"{files[(v, subject)]}: shape {counts.shape}, expected "
                             f"({spec.num_moe_layers}, {spec.num_experts}) for {spec.name}")
        return Workload(source=source, counts=counts, trace=None, measured_layers=np.ones(len(counts), bool),
                        model_hint=spec.name, top_k=spec.top_k)

    if family == "mixtral-decode":
        files = _mixtral_decode_files(root)
        if len(args) != 1:
            raise ValueError(f"use mixtral-decode:<dataset>, dataset one of {', '.join(files)}")
        _choice("mixtral-decode dataset", args[0], list(files), root / "mixtral-decode")
        spec = load_model_spec(MIXTRAL)
        notes: list[str] = []
        t = readers.read_mixtral_decode(files[args[0]], num_layers=spec.num_moe_layers,
                                        num_experts=spec.num_experts, source=source, model=spec.name, notes=notes)
        return Workload(source=source, counts=t.counts(), trace=t, measured_layers=np.ones(t.num_layers, bool),
                        model_hint=spec.name, top_k=t.top_k, notes=notes)

    raise AssertionError(family)  # guarded by FAMILIES


def load_prompts(source: str, data_dir: str | Path | None = None) -> list[str] | None:
    """Real prompt texts of a workload, for prompt lengths, or None when the source has none.

    - `esft:<domain>`: the `prompt` field of `esft/prompts/<domain>.jsonl`. These are ESFT's eval prompts;
      ESFT measured its routing on the train split of the same task, so they share the domain, not the
      exact records.
    - `olmoe-routing:<m>:<domain>`: the non-empty lines of the OLMoE authors' text file of the domain. They
      tokenised that text as one stream and measured 2048-token windows, so lines are documents or
      paragraphs (code lines for github), not the measured sequences. `tulu` has no text.
    """
    source = source.strip()
    if _is_path(source):
        return None
    family, *args = source.split(":")
    if family == "embedded":
        _embedded_path(source)  # raises the error that says what is wrong with the name
        return _embedded_prompts(args[1])
    if family == "esft" and len(args) == 1:
        root = find_data_dir(data_dir)
        if root is None or not _esft_domains(root):
            load_workload(source, data_dir)  # raises when the sample lacks the domain
            return _embedded_prompts(args[0])
    root = resolve_data_dir(data_dir)
    if source not in list_workloads(root):
        load_workload(source, root)  # raises the error that says what is wrong with the name
        raise ValueError(f"unknown workload {source!r}; list_workloads() shows the valid names")
    if family == "esft":
        p = root / "esft" / "prompts" / f"{args[0]}.jsonl"
        return readers.read_esft_prompts(p) if p.is_file() else None
    if family == "olmoe-routing":
        p = root / "olmoe-routing" / "text" / OLMOE_TEXT_FILES.get(args[1], f"{args[1]}_texts.txt")
        return readers.read_text_lines(p) if p.is_file() else None
    return None


def _embedded_prompts(domain: str) -> list[str] | None:
    doc = json.loads((EMBEDDED_DIR / "esft-prompts.json").read_text(encoding="utf-8"))
    return doc.get(domain) or None
