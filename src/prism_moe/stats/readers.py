"""Readers for the public routing data sets in `../shared/data` (see its README).

Every reader returns MoE-layer-indexed data (MoE layer 0 = the first layer that has routed experts),
whatever convention the source used. The mapping per set:

| set | source key | MoE layer |
|---|---|---|
| ESFT `expert_weights_<L>.txt.gz` | decoder layer L = 1..26 (DeepSeek-V2-Lite: decoder layer 0 is dense) | L - 1 |
| MoE-Lens `.pt` `{k: counts}` | k = 1..n, a 1-based count over the layers that have a router (their notebooks: `layer_num = layer_idx + 1`) | k - 1 |
| OLMoE `expert_counts*.pkl` list | list position 0, 1, 2 = decoder layers 0, 7, 15 (`run_routing_analysis.py`); OLMoE and Mixtral have no dense layer | 0, 7, 15 |
| Fiddler `expert_popularity` | row r of the 32x8 matrix = decoder layer r (Mixtral: all layers MoE) | r |
| Mixtral decode `layer` field | decoder layer 0..31 (vLLM `FusedMoE` layer) | layer |

Untrusted formats are read safely: `.pt` with `torch.load(weights_only=True)`, pickles with
`RestrictedUnpickler`, which builds only `collections.Counter` and integer numpy scalars.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import re
import warnings
from collections import Counter
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from prism_moe.stats.trace import RoutingTrace

ESFT_NUM_EXPERTS = 64
ESFT_TOP_K = 6
ESFT_MODEL = "deepseek-v2-lite"
OLMOE_ROUTING_LAYERS = (0, 7, 15)  # decoder layers the OLMoE authors saved, in list order
OLMOE_CROSSLAYER_PAIRS = ((0, 7), (7, 15))

_ESFT_FILE = re.compile(r"^expert_weights_(\d+)\.txt(\.gz)?$")


class UnsafeFileError(ValueError):
    """A pickle asked for a class or function that the restricted loader does not allow."""


# --- restricted unpickling -----------------------------------------------------------------------

class _IntDType:
    """Stand-in for `numpy.dtype` inside a pickle: only integer kinds, no numpy object is built."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True):
        if not isinstance(name, str) or not re.fullmatch(r"[iu][1248]", name):
            raise UnsafeFileError(f"numpy dtype {name!r} refused: only integer dtypes (i1..i8, u1..u8) are allowed")
        self.signed = name[0] == "i"
        self.itemsize = int(name[1])
        self.byteorder = "<"

    def __setstate__(self, state: Any) -> None:
        # numpy pickles dtype state as (version, byteorder, ...); only the byte order matters here
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise UnsafeFileError(f"unexpected numpy dtype state {state!r}")
        self.byteorder = ">" if state[1] == ">" else "<"


def _int_scalar(dtype: Any, data: Any) -> int:
    """Stand-in for `numpy.core.multiarray.scalar`: decode an integer scalar from its raw bytes."""
    if not isinstance(dtype, _IntDType) or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafeFileError("numpy scalar refused: only integer scalars stored as raw bytes are allowed")
    return int.from_bytes(data, "big" if dtype.byteorder == ">" else "little", signed=dtype.signed)


_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "Counter"): Counter,
    ("numpy", "dtype"): _IntDType,
    ("numpy.core.multiarray", "scalar"): _int_scalar,
    ("numpy._core.multiarray", "scalar"): _int_scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Builds only what the OLMoE count pickles hold: Counters keyed by numpy integers.

    Any other global (os.system, builtins.eval, a class, ...) raises UnsafeFileError before it is
    looked up, so a malicious pickle cannot run code. Numpy integers come back as Python ints.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeFileError(
                f"refused to load {module}.{name} from a pickle: only collections.Counter and numpy integer "
                f"scalars are allowed (pickles can run code; this file is not a plain counts pickle)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError("refused a pickle persistent id: not a plain counts pickle")


def restricted_pickle_load(path: str | Path) -> Any:
    """Unpickle `path` with `RestrictedUnpickler`; errors name the file."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except UnsafeFileError as e:
        raise UnsafeFileError(f"{path}: {e}") from None
    except Exception as e:  # truncated or garbage data
        raise ValueError(f"{path} is not a readable pickle: {type(e).__name__}: {e}") from e


def _counter_to_row(c: Any, num_experts: int, ctx: str) -> np.ndarray:
    if not isinstance(c, Counter):
        raise ValueError(f"{ctx}: expected a collections.Counter, got {type(c).__name__}")
    row = np.zeros(num_experts, dtype=np.float64)
    for k, v in c.items():
        if not isinstance(k, int) or not 0 <= k < num_experts:
            raise ValueError(f"{ctx}: expert id {k!r} is not in 0..{num_experts - 1}")
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{ctx}: count {v!r} of expert {k} is not a non-negative integer")
        row[k] = v
    return row


# --- ESFT ----------------------------------------------------------------------------------------

def esft_layer_files(domain_dir: str | Path) -> list[Path]:
    """`expert_weights_<L>.txt[.gz]` of one ESFT domain, ordered by decoder layer L = 1..n."""
    domain_dir = Path(domain_dir)
    found: dict[int, Path] = {}
    for p in domain_dir.iterdir() if domain_dir.is_dir() else []:
        m = _ESFT_FILE.match(p.name)
        if m and (int(m.group(1)) not in found or p.name.endswith(".gz")):
            found[int(m.group(1))] = p
    if not found:
        raise FileNotFoundError(f"no expert_weights_<L>.txt(.gz) files in {domain_dir}")
    layers = sorted(found)
    if layers != list(range(1, len(layers) + 1)):
        raise ValueError(f"{domain_dir}: ESFT layer files must be numbered 1..n without gaps, found {layers}")
    return [found[i] for i in layers]


def _parse_esft_file(path: Path, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One layer file -> ids int64 [fields], weights float32 [fields], tokens per line int64 [lines]."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    lines = raw.decode("ascii").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    id_parts, w_parts, fields = [], [], []
    for i, line in enumerate(lines):
        halves = line.rstrip("\r").split("\t\t")
        if len(halves) != 2:
            raise ValueError(f"{path}: line {i + 1} must be '<ids tab-separated>\\t\\t<weights tab-separated>'")
        n_ids, n_w = halves[0].count("\t") + 1, halves[1].count("\t") + 1
        if n_ids != n_w or n_ids % top_k:
            raise ValueError(f"{path}: line {i + 1} has {n_ids} ids and {n_w} weights; both must be the same "
                             f"multiple of top-k={top_k}")
        id_parts.append(halves[0])
        w_parts.append(halves[1])
        fields.append(n_ids)
    # One C-level parse per file instead of a Python loop over ~100k numbers.
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy warns (not raises) on a malformed number
        try:
            ids = np.fromstring("\t".join(id_parts), dtype=np.int64, sep="\t")
            weights = np.fromstring("\t".join(w_parts), dtype=np.float32, sep="\t")
        except (ValueError, DeprecationWarning) as e:
            raise ValueError(f"{path}: unreadable number ({e})") from None
    total = sum(fields)
    if ids.size != total or weights.size != total:
        raise ValueError(f"{path}: expected {total} numbers per half, parsed {ids.size} ids and {weights.size} "
                         f"weights; the file has a malformed number")
    return ids, weights, np.asarray(fields, dtype=np.int64) // top_k


def read_esft_domain(domain_dir: str | Path, *, top_k: int = ESFT_TOP_K, num_experts: int = ESFT_NUM_EXPERTS,
                     source: str = "", model: str = ESFT_MODEL) -> RoutingTrace:
    """All layers of one ESFT domain as a trace: one sequence per line (ESFT logs one forward pass of a
    training example per line), file `expert_weights_<L>` -> MoE layer L-1. Cached per process.

    Returns experts int16 `[tokens, 26, 6]`, weights float32 (softmax gate scores, not renormalised over
    the top-6, so each token's weights sum to < 1).
    """
    d = Path(domain_dir).resolve()
    files = esft_layer_files(d)
    stamp = tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
    return _read_esft_cached(str(d), stamp, top_k, num_experts, source, model)


@lru_cache(maxsize=16)
def _read_esft_cached(domain_dir: str, stamp: tuple, top_k: int, num_experts: int, source: str,
                      model: str) -> RoutingTrace:
    files = esft_layer_files(domain_dir)
    parsed = [_parse_esft_file(p, top_k) for p in files]
    per_line = parsed[0][2]
    for p, (_, _, n) in zip(files, parsed, strict=True):
        if not np.array_equal(n, per_line):
            bad = int(np.argmax(n != per_line)) if len(n) == len(per_line) else None
            where = f"line {bad + 1} has {n[bad]} tokens vs {per_line[bad]}" if bad is not None else \
                f"{len(n)} lines vs {len(per_line)}"
            raise ValueError(f"{p}: does not match {files[0].name} ({where}); every layer file must hold the "
                             f"same sequences line by line")
    tokens = int(per_line.sum())
    layers = len(files)
    experts = np.empty((tokens, layers, top_k), dtype=np.int64)
    weights = np.empty((tokens, layers, top_k), dtype=np.float32)
    for layer, (ids, w, _) in enumerate(parsed):
        experts[:, layer, :] = ids.reshape(tokens, top_k)
        weights[:, layer, :] = w.reshape(tokens, top_k)
    if experts.size and (experts.min() < 0 or experts.max() >= num_experts):
        raise ValueError(f"{domain_dir}: expert ids {int(experts.min())}..{int(experts.max())} outside "
                         f"0..{num_experts - 1}")
    seq_starts = np.concatenate([[0], np.cumsum(per_line)]).astype(np.int64)
    return RoutingTrace(experts=experts.astype(np.int16), weights=weights, seq_starts=seq_starts,
                        num_experts=num_experts, source=source or f"esft:{Path(domain_dir).name}", model=model)


def read_esft_prompts(path: str | Path) -> list[str]:
    """The `prompt` field of every record of an ESFT eval `.jsonl` (fields: idx, prompt, raw_answers,
    answers)."""
    path = Path(path)
    prompts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {i + 1} is not JSON: {e}") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise ValueError(f"{path}: line {i + 1} has no string 'prompt' field")
        prompts.append(rec["prompt"])
    return prompts


# --- MoE-Lens ------------------------------------------------------------------------------------

def read_moe_lens(path: str | Path) -> np.ndarray:
    """A MoE-Lens `.pt` archive `{k: FloatTensor[n_experts]}` -> float64 `[layers, experts]`, key k -> MoE
    layer k-1. Loaded with `torch.load(weights_only=True)`: tensors and plain containers only."""
    import torch  # heavy; only this reader needs it

    path = Path(path)
    try:
        data = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"{path}: not a loadable tensor archive with weights_only=True ({e})") from e
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a dict {{layer: tensor[experts]}}, got {type(data).__name__}")
    keys = sorted(data)
    if not all(isinstance(k, int) for k in keys) or keys != list(range(1, len(keys) + 1)):
        raise ValueError(f"{path}: layer keys must be the integers 1..n, got {keys[:5]}...")
    rows = []
    for k in keys:
        t = data[k]
        if not isinstance(t, torch.Tensor) or t.ndim != 1:
            raise ValueError(f"{path}: layer {k} must be a 1-D tensor, got {type(t).__name__}")
        rows.append(t.detach().to(torch.float64).numpy())
    if len({r.size for r in rows}) != 1:
        raise ValueError(f"{path}: layers have different expert counts {sorted({r.size for r in rows})}")
    counts = np.stack(rows)
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"{path}: counts must be finite and non-negative")
    return counts


# --- OLMoE routing analysis ----------------------------------------------------------------------

def read_olmoe_counts(path: str | Path, *, num_layers: int, num_experts: int,
                      layers: tuple[int, ...] = OLMOE_ROUTING_LAYERS) -> tuple[np.ndarray, np.ndarray]:
    """An OLMoE `expert_counts{,_top1}/<domain>.pkl` (a list of Counters, one per measured layer) ->
    (counts float64 `[num_layers, experts]` with zeros for unmeasured layers, measured bool `[num_layers]`).
    List position i is decoder (= MoE) layer `layers[i]`."""
    obj = restricted_pickle_load(path)
    if not isinstance(obj, list) or len(obj) != len(layers):
        raise ValueError(f"{path}: expected a list of {len(layers)} Counters (layers {layers}), "
                         f"got {type(obj).__name__} of length {len(obj) if isinstance(obj, list) else '-'}")
    if max(layers) >= num_layers:
        raise ValueError(f"{path}: layer {max(layers)} does not exist in a {num_layers}-layer model")
    counts = np.zeros((num_layers, num_experts), dtype=np.float64)
    measured = np.zeros(num_layers, dtype=bool)
    for layer, c in zip(layers, obj, strict=True):
        counts[layer] = _counter_to_row(c, num_experts, f"{path} layer {layer}")
        measured[layer] = True
    return counts, measured


def read_olmoe_crosslayer(path: str | Path, *, num_experts: int) -> np.ndarray:
    """An OLMoE `expert_counts_crosslayer/<domain>.pkl` -> float64 `[2, experts, experts]`: entry
    [p, a, b] counts tokens whose i-th ranked expert was a at layer `OLMOE_CROSSLAYER_PAIRS[p][0]` and b at
    layer `[p][1]`. The authors zip the two top-k lists rank by rank, so this is rank-aligned, not the full
    k x k co-activation; each matrix sums to tokens * k."""
    obj = restricted_pickle_load(path)
    if not isinstance(obj, list) or len(obj) != len(OLMOE_CROSSLAYER_PAIRS):
        raise ValueError(f"{path}: expected a list of {len(OLMOE_CROSSLAYER_PAIRS)} Counters")
    out = np.zeros((len(obj), num_experts, num_experts), dtype=np.float64)
    for p, c in enumerate(obj):
        if not isinstance(c, Counter):
            raise ValueError(f"{path}: entry {p} is {type(c).__name__}, expected a Counter")
        for key, v in c.items():
            if not (isinstance(key, tuple) and len(key) == 2 and all(
                    isinstance(x, int) and 0 <= x < num_experts for x in key)):
                raise ValueError(f"{path}: key {key!r} is not a pair of expert ids in 0..{num_experts - 1}")
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{path}: count {v!r} is not a non-negative integer")
            out[p, key[0], key[1]] = v
    return out


def read_text_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a text file."""
    return [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


# --- Fiddler -------------------------------------------------------------------------------------

def read_fiddler(path: str | Path) -> np.ndarray:
    """A Fiddler `expert_popularity_<subject>.json` -> float64 `[32, 8]` (row = Mixtral layer). Its
    `total_input_tokens` is a word count, not tokens; tokens = row sum / top-2."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    pop = doc.get("expert_popularity") if isinstance(doc, dict) else None
    if not isinstance(pop, list) or not pop or not all(isinstance(r, list) for r in pop):
        raise ValueError(f"{path}: expected 'expert_popularity' as a list of per-layer lists")
    if len({len(r) for r in pop}) != 1:
        raise ValueError(f"{path}: layers have different numbers of experts")
    counts = np.asarray(pop, dtype=np.float64)
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"{path}: counts must be finite and non-negative")
    return counts


# --- Mixtral decode (speculative-moe) ------------------------------------------------------------

def read_mixtral_decode(path: str | Path, *, num_layers: int = 32, num_experts: int = 8,
                        source: str = "", model: str = "mixtral-8x7b",
                        notes: list[str] | None = None) -> RoutingTrace:
    """A `<dataset>_<n>_routing.jsonl` (one record per problem, layer, decoded token) -> trace with one
    sequence per problem, layer field -> MoE layer. Only decoded tokens are in the file (the source
    dropped the prefill), so sequence lengths are generated lengths.

    `token_idx` counts decode steps per (problem, layer), and the source's per-layer decode detection keeps
    0..3 fewer steps on some layers; a token is aligned across layers by `token_idx` and each problem is cut
    to its shortest layer. What was cut is appended to `notes` (when given)."""
    path = Path(path)
    by: dict[tuple[int, int], dict[int, tuple[list[int], list[float]]]] = {}
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            key = (int(r["problem_id"]), int(r["layer"]))
            tok = int(r["token_idx"])
            ex, gp = [int(x) for x in r["experts"]], [float(x) for x in r["gating_probs"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: line {i + 1} is not a routing record with problem_id, layer, token_idx, "
                             f"experts, gating_probs ({e})") from None
        if not 0 <= key[1] < num_layers:
            raise ValueError(f"{path}: line {i + 1}: layer {key[1]} outside 0..{num_layers - 1}")
        if len(ex) != len(gp):
            raise ValueError(f"{path}: line {i + 1}: {len(ex)} experts but {len(gp)} gating probs")
        slot = by.setdefault(key, {})
        if tok in slot:
            raise ValueError(f"{path}: line {i + 1}: duplicate token_idx {tok} for problem {key[0]} layer {key[1]}")
        slot[tok] = (ex, gp)
    if not by:
        raise ValueError(f"{path}: no routing records")
    ks = {len(ex) for slot in by.values() for ex, _ in slot.values()}
    if len(ks) != 1:
        raise ValueError(f"{path}: records have different top-k {sorted(ks)}")
    k = ks.pop()
    problems = sorted({p for p, _ in by})
    exp_parts, w_parts, lengths, dropped, spread = [], [], [], 0, 0
    for p in problems:
        missing = [layer for layer in range(num_layers) if (p, layer) not in by]
        if missing:
            raise ValueError(f"{path}: problem {p} has no records for layer(s) {missing}")
        n_per_layer = []
        for layer in range(num_layers):
            toks = sorted(by[(p, layer)])
            if toks != list(range(len(toks))):
                raise ValueError(f"{path}: problem {p} layer {layer}: token_idx must run 0..n-1")
            n_per_layer.append(len(toks))
        n = min(n_per_layer)
        dropped += sum(n_per_layer) - n * num_layers
        spread = max(spread, max(n_per_layer) - n)
        e = np.empty((n, num_layers, k), dtype=np.int64)
        w = np.empty((n, num_layers, k), dtype=np.float32)
        for layer in range(num_layers):
            slot = by[(p, layer)]
            e[:, layer] = [slot[t][0] for t in range(n)]
            w[:, layer] = [slot[t][1] for t in range(n)]
        exp_parts.append(e)
        w_parts.append(w)
        lengths.append(n)
    if dropped and notes is not None:
        total = sum(len(s) for s in by.values())
        notes.append(f"{path.name}: layers disagree on the decoded length by up to {spread} token(s); each "
                     f"problem was cut to its shortest layer, dropping {dropped} of {total} records, and "
                     f"tokens are aligned across layers by token_idx (approximate near the gaps)")
    return RoutingTrace(
        experts=np.concatenate(exp_parts),
        weights=np.concatenate(w_parts),
        seq_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        num_experts=num_experts,
        source=source or path.stem,
        model=model,
    )
