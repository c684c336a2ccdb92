"""Per-token routing traces and the project's own trace and counts file formats.

A `RoutingTrace` is what a MoE model's routers decided for every token: the top-k expert ids (and,
when known, their gate weights) at every MoE layer, with the tokens grouped into sequences
(requests). MoE layers are numbered from 0, as in `prism_moe.model.spec`.

Files (see docs/trace-format.md):
- trace: a safetensors file holding `experts`, optional `weights`, `seq_starts` and string metadata
  `format="prism-moe-trace"`, `version="1"`, `num_experts`, `source`, `model`. safetensors is plain
  tensors plus a JSON header: loading it never runs code, unlike pickle.
- counts: a JSON file `{"format": "prism-moe-counts", "version": 1, "num_experts": E,
  "counts": [[...] per layer]}` for data that has only per-layer activation counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from prism_moe.fileio import atomic_write_bytes, atomic_write_text

TRACE_FORMAT = "prism-moe-trace"
TRACE_VERSION = "1"
COUNTS_FORMAT = "prism-moe-counts"
COUNTS_VERSION = 1

_EXPERT_DTYPES = (np.dtype(np.int16), np.dtype(np.int32))
_TRACE_TENSORS = {"experts", "weights", "seq_starts"}


def _readonly(a: np.ndarray) -> np.ndarray:
    # A read-only view: traces are shared by caches, and the caller's own array keeps its flags.
    v = a.view()
    v.flags.writeable = False
    return v


def _expert_dtype(num_experts: int) -> np.dtype:
    return np.dtype(np.int16) if num_experts <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


class TraceSequence(NamedTuple):
    """One sequence of a trace: `experts`/`weights` are views `[tokens, layers, k]`."""

    index: int
    experts: np.ndarray
    weights: np.ndarray | None


@dataclass(frozen=True, eq=False)  # arrays: identity equality, not ambiguous elementwise ==
class RoutingTrace:
    """Per-token top-k routing of a set of sequences.

    experts:    int16/int32 `[tokens, layers, k]`, expert ids in `0..num_experts-1`, no repeats within
                one token's top-k. Other integer dtypes are converted (int16 unless ids need int32).
    weights:    float32 `[tokens, layers, k]` gate weights in the same order, or None when unknown.
    seq_starts: int64 `[sequences + 1]`: sequence i is tokens `seq_starts[i]:seq_starts[i+1]`;
                starts at 0, strictly increasing (no empty sequence), ends at `tokens`.
    num_experts: routed experts per MoE layer.
    source:     where the trace came from (a workload name or a description).
    model:      preset name of the model it was measured on, "" when unknown.

    Arrays are stored as read-only views, so a trace can be shared safely.
    """

    experts: np.ndarray
    weights: np.ndarray | None
    seq_starts: np.ndarray
    num_experts: int
    source: str = ""
    model: str = ""

    def __post_init__(self) -> None:
        ctx = f"routing trace {self.source!r}" if self.source else "routing trace"
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, (int, np.integer)):
            raise ValueError(f"{ctx}: num_experts must be an int, got {self.num_experts!r}")
        num_experts = int(self.num_experts)
        if num_experts <= 0:
            raise ValueError(f"{ctx}: num_experts must be positive, got {num_experts}")
        object.__setattr__(self, "num_experts", num_experts)

        experts = np.asarray(self.experts)
        if experts.ndim != 3:
            raise ValueError(f"{ctx}: experts must have shape [tokens, layers, k], got shape {experts.shape}")
        if experts.shape[1] < 1 or experts.shape[2] < 1:
            raise ValueError(f"{ctx}: experts needs at least one layer and k >= 1, got shape {experts.shape}")
        if not np.issubdtype(experts.dtype, np.integer):
            raise ValueError(f"{ctx}: experts must hold integer expert ids, got dtype {experts.dtype}")
        if experts.size:
            lo, hi = int(experts.min()), int(experts.max())
            if lo < 0 or hi >= num_experts:
                raise ValueError(f"{ctx}: expert ids must be in 0..{num_experts - 1}, found {lo}..{hi}; "
                                 f"check num_experts or the layer/expert order of the data")
        if experts.dtype not in _EXPERT_DTYPES:
            experts = experts.astype(_expert_dtype(num_experts))
        k = experts.shape[2]
        if k > num_experts:
            raise ValueError(f"{ctx}: top-k {k} exceeds num_experts {num_experts}")
        if k > 1 and experts.size:
            srt = np.sort(experts, axis=2)
            dup = np.argwhere((srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2))
            if len(dup):
                t, layer = (int(x) for x in dup[0])
                raise ValueError(f"{ctx}: token {t} picks expert(s) twice at layer {layer}: "
                                 f"{experts[t, layer].tolist()}; a top-k choice has k distinct experts")

        weights = self.weights
        if weights is not None:
            weights = np.asarray(weights)
            if weights.shape != experts.shape:
                raise ValueError(f"{ctx}: weights shape {weights.shape} must equal experts shape {experts.shape}")
            if not np.issubdtype(weights.dtype, np.floating):
                raise ValueError(f"{ctx}: weights must be floating point, got dtype {weights.dtype}")
            weights = weights.astype(np.float32, copy=False)
            if weights.size and not np.isfinite(weights).all():
                raise ValueError(f"{ctx}: weights contain NaN or infinity")

        seq_starts = np.asarray(self.seq_starts)
        if seq_starts.ndim != 1 or seq_starts.size < 1:
            raise ValueError(f"{ctx}: seq_starts must be 1-D [sequences + 1], got shape {seq_starts.shape}")
        if not np.issubdtype(seq_starts.dtype, np.integer):
            raise ValueError(f"{ctx}: seq_starts must be integers, got dtype {seq_starts.dtype}")
        seq_starts = seq_starts.astype(np.int64, copy=False)
        tokens = experts.shape[0]
        if seq_starts[0] != 0 or seq_starts[-1] != tokens:
            raise ValueError(f"{ctx}: seq_starts must start at 0 and end at the token count {tokens}, "
                             f"got {int(seq_starts[0])}..{int(seq_starts[-1])}")
        if (np.diff(seq_starts) <= 0).any():
            raise ValueError(f"{ctx}: seq_starts must be strictly increasing (every sequence has a token)")

        object.__setattr__(self, "experts", _readonly(experts))
        object.__setattr__(self, "weights", None if weights is None else _readonly(weights))
        object.__setattr__(self, "seq_starts", _readonly(seq_starts))

    # shape -------------------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def top_k(self) -> int:
        return int(self.experts.shape[2])

    @property
    def num_sequences(self) -> int:
        return int(self.seq_starts.size - 1)

    def sequence_lengths(self) -> np.ndarray:
        """Tokens per sequence, int64 `[sequences]`."""
        return np.diff(self.seq_starts)

    # statistics --------------------------------------------------------------------------------
    def counts(self) -> np.ndarray:
        """How often each expert was selected, float64 `[layers, experts]` (row sums = tokens * k)."""
        layers, experts = self.num_layers, self.num_experts
        flat = self.experts.astype(np.int64) + (np.arange(layers, dtype=np.int64) * experts)[None, :, None]
        return np.bincount(flat.ravel(), minlength=layers * experts).reshape(layers, experts).astype(np.float64)

    # sequences ---------------------------------------------------------------------------------
    def sequences(self) -> Iterator[TraceSequence]:
        """Each sequence in order, as views (no copy)."""
        for i in range(self.num_sequences):
            a, b = int(self.seq_starts[i]), int(self.seq_starts[i + 1])
            yield TraceSequence(i, self.experts[a:b], None if self.weights is None else self.weights[a:b])

    def subset(self, seq_indices: Sequence[int] | np.ndarray) -> RoutingTrace:
        """A trace of the chosen sequences, in the given order (repeats allowed)."""
        idx = np.asarray(seq_indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_sequences):
            raise ValueError(f"sequence indices must be in 0..{self.num_sequences - 1}, "
                             f"got {int(idx.min())}..{int(idx.max())}")
        lengths = self.sequence_lengths()[idx]
        starts = self.seq_starts[idx]
        # token index of every selected token, sequence after sequence
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        tok = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return RoutingTrace(
            experts=self.experts[tok],
            weights=None if self.weights is None else self.weights[tok],
            seq_starts=offsets,
            num_experts=self.num_experts,
            source=self.source,
            model=self.model,
        )

    @staticmethod
    def concat(traces: Sequence[RoutingTrace], source: str | None = None) -> RoutingTrace:
        """Sequences of all traces, one after the other. Layers, k and num_experts must agree;
        weights are kept only if every trace has them."""
        if not traces:
            raise ValueError("concat needs at least one trace")
        first = traces[0]
        for t in traces[1:]:
            if (t.num_layers, t.top_k, t.num_experts) != (first.num_layers, first.top_k, first.num_experts):
                raise ValueError(f"cannot concatenate traces of shape (layers, k, experts) "
                                 f"{(first.num_layers, first.top_k, first.num_experts)} and "
                                 f"{(t.num_layers, t.top_k, t.num_experts)}")
        keep_w = all(t.weights is not None for t in traces)
        offsets = np.cumsum([0] + [t.num_tokens for t in traces])
        starts = np.concatenate([[0]] + [t.seq_starts[1:] + off for t, off in zip(traces, offsets, strict=False)])
        dtype = np.result_type(*[t.experts.dtype for t in traces])
        return RoutingTrace(
            experts=np.concatenate([t.experts.astype(dtype, copy=False) for t in traces]),
            weights=np.concatenate([t.weights for t in traces]) if keep_w else None,  # type: ignore[misc]
            seq_starts=starts,
            num_experts=first.num_experts,
            source=first.source if source is None else source,
            model=first.model if all(t.model == first.model for t in traces) else "",
        )

    @staticmethod
    def empty(num_layers: int, top_k: int, num_experts: int, *, with_weights: bool = True,
              source: str = "", model: str = "") -> RoutingTrace:
        """A trace with no sequence."""
        return RoutingTrace(
            experts=np.zeros((0, num_layers, top_k), dtype=_expert_dtype(num_experts)),
            weights=np.zeros((0, num_layers, top_k), dtype=np.float32) if with_weights else None,
            seq_starts=np.zeros(1, dtype=np.int64),
            num_experts=num_experts,
            source=source,
            model=model,
        )


# --- trace files ---------------------------------------------------------------------------------

def save_trace(trace: RoutingTrace, path: str | Path) -> Path:
    """Write `trace` as a prism-moe trace file (safetensors). Returns the path written."""
    path = Path(path)
    tensors = {
        "experts": np.ascontiguousarray(trace.experts),
        "seq_starts": np.ascontiguousarray(trace.seq_starts, dtype=np.int64),
    }
    if trace.weights is not None:
        tensors["weights"] = np.ascontiguousarray(trace.weights, dtype=np.float32)
    metadata = {
        "format": TRACE_FORMAT,
        "version": TRACE_VERSION,
        "num_experts": str(trace.num_experts),
        "source": trace.source,
        "model": trace.model,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))  # never a torn trace
    return path


def load_trace(path: str | Path) -> RoutingTrace:
    """Read and validate a prism-moe trace file; any problem is a ValueError that says how to fix it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path}")
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = f.metadata() or {}
            names = set(f.keys())
            tensors = {n: f.get_tensor(n) for n in names & _TRACE_TENSORS}
    except Exception as e:  # safetensors raises its own error type for broken headers
        raise ValueError(f"{path} is not a readable safetensors file ({e}); a prism-moe trace is written by "
                         f"prism_moe.stats.save_trace") from e

    fmt = metadata.get("format")
    if fmt != TRACE_FORMAT:
        raise ValueError(f"{path}: metadata format is {fmt!r}, expected {TRACE_FORMAT!r}; this safetensors "
                         f"file is not a prism-moe trace (a model checkpoint?). Write traces with save_trace")
    version = metadata.get("version")
    if version != TRACE_VERSION:
        raise ValueError(f"{path}: trace format version {version!r} is not supported (this code reads version "
                         f"{TRACE_VERSION!r}); re-export it with this version of prism-moe")
    try:
        num_experts = int(metadata.get("num_experts", ""))
    except ValueError:
        raise ValueError(f"{path}: metadata num_experts={metadata.get('num_experts')!r} is not an integer; "
                         f"set it to the routed experts per layer, e.g. '64'") from None
    missing = {"experts", "seq_starts"} - names
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {sorted(missing)}; a trace holds 'experts' "
                         f"[tokens, layers, k] and 'seq_starts' [sequences + 1] (and optionally 'weights')")
    extra = names - _TRACE_TENSORS
    if extra:
        raise ValueError(f"{path}: unexpected tensor(s) {sorted(extra)}; a version-1 trace holds only "
                         f"{sorted(_TRACE_TENSORS)}")
    experts = tensors["experts"]
    if experts.dtype not in _EXPERT_DTYPES:
        raise ValueError(f"{path}: 'experts' has dtype {experts.dtype}; it must be int16 or int32")
    seq_starts = tensors["seq_starts"]
    if seq_starts.dtype != np.int64:
        raise ValueError(f"{path}: 'seq_starts' has dtype {seq_starts.dtype}; it must be int64")
    weights = tensors.get("weights")
    if weights is not None and weights.dtype != np.float32:
        raise ValueError(f"{path}: 'weights' has dtype {weights.dtype}; it must be float32")
    try:
        return RoutingTrace(experts=experts, weights=weights, seq_starts=seq_starts, num_experts=num_experts,
                            source=metadata.get("source", ""), model=metadata.get("model", ""))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# --- counts files --------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)  # arrays: identity equality, not ambiguous elementwise ==
class ExpertCounts:
    """Contents of a counts file.

    counts: float64 `[layers, experts]` activation counts (or any non-negative per-expert load).
    top_k:  expert selections per token in these counts; 0 when unknown.
    measured_layers: bool `[layers]`, or None when every layer was measured.
    """

    counts: np.ndarray
    top_k: int = 0
    source: str = ""
    model: str = ""
    measured_layers: np.ndarray | None = None

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])


def _check_counts(counts: np.ndarray, ctx: str) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] < 1 or counts.shape[1] < 1:
        raise ValueError(f"{ctx}: counts must be [layers, experts] with at least one of each, got shape {counts.shape}")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise ValueError(f"{ctx}: counts must be finite and non-negative")
    return counts


def save_counts(counts: np.ndarray, path: str | Path, *, top_k: int = 0, source: str = "", model: str = "",
                measured_layers: np.ndarray | None = None) -> Path:
    """Write float `[layers, experts]` counts as a prism-moe counts JSON file. Returns the path written."""
    path = Path(path)
    counts = _check_counts(counts, str(path))
    integral = bool((counts == np.round(counts)).all()) and counts.max(initial=0) < 2**53
    rows = counts.astype(np.int64).tolist() if integral else counts.tolist()
    doc: dict[str, Any] = {"format": COUNTS_FORMAT, "version": COUNTS_VERSION, "num_experts": counts.shape[1],
                           "counts": rows}
    if top_k:
        doc["top_k"] = int(top_k)
    if source:
        doc["source"] = source
    if model:
        doc["model"] = model
    if measured_layers is not None:
        m = np.asarray(measured_layers, dtype=bool)
        if m.shape != (counts.shape[0],):
            raise ValueError(f"measured_layers must have shape ({counts.shape[0]},), got {m.shape}")
        doc["measured_layers"] = m.tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=None) + "\n")
    return path


def load_counts(path: str | Path) -> ExpertCounts:
    """Read and validate a prism-moe counts JSON file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no counts file at {path}")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: a counts file is a JSON object with format {COUNTS_FORMAT!r}")
    if doc.get("format") != COUNTS_FORMAT:
        raise ValueError(f"{path}: format is {doc.get('format')!r}, expected {COUNTS_FORMAT!r}; write counts "
                         f"files with prism_moe.stats.save_counts")
    version = doc.get("version")
    if isinstance(version, bool) or version != COUNTS_VERSION:
        raise ValueError(f"{path}: counts format version {version!r} is not supported; this code reads "
                         f"version {COUNTS_VERSION} (the integer {COUNTS_VERSION})")
    num_experts = doc.get("num_experts")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"{path}: num_experts must be a positive integer, got {num_experts!r}")
    rows = doc.get("counts")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) for r in rows):
        raise ValueError(f"{path}: 'counts' must be a non-empty list of per-layer lists")
    for i, r in enumerate(rows):
        if len(r) != num_experts:
            raise ValueError(f"{path}: layer {i} has {len(r)} counts but num_experts is {num_experts}")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                   for x in r):
            raise ValueError(f"{path}: layer {i} has a count that is not a finite non-negative number")
    counts = np.asarray(rows, dtype=np.float64)
    top_k = doc.get("top_k", 0)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= num_experts:
        raise ValueError(f"{path}: top_k must be an integer in 0..{num_experts}, got {top_k!r}")
    measured = doc.get("measured_layers")
    if measured is not None:
        if not isinstance(measured, list) or len(measured) != len(rows) or not all(
                isinstance(x, bool) for x in measured):
            raise ValueError(f"{path}: measured_layers must be a list of {len(rows)} booleans")
        measured = np.asarray(measured, dtype=bool)
    for key in ("source", "model"):
        if not isinstance(doc.get(key, ""), str):
            raise ValueError(f"{path}: {key} must be a string")
    return ExpertCounts(counts=_readonly(counts), top_k=top_k, source=doc.get("source", ""),
                        model=doc.get("model", ""),
                        measured_layers=None if measured is None else _readonly(measured))


# --- recorder ------------------------------------------------------------------------------------

class TraceRecorder:
    """Builds a RoutingTrace step by step while a model runs.

    Call `append(experts, weights, seq=...)` after each forward step with that sequence's routing
    `[tokens, layers, k]` (prefill: all prompt tokens; decode: one token), then `finish_sequence(seq)`
    when the request ends. Several sequences may be open at once (continuous batching); they enter the
    trace in the order they finish. Weights are all-or-nothing: the first `append` decides.
    """

    def __init__(self, num_layers: int, top_k: int, num_experts: int, *, source: str = "", model: str = ""):
        if num_layers < 1 or top_k < 1 or num_experts < 1 or top_k > num_experts:
            raise ValueError(f"recorder needs num_layers >= 1 and 1 <= top_k <= num_experts, got "
                             f"num_layers={num_layers}, top_k={top_k}, num_experts={num_experts}")
        self.num_layers, self.top_k, self.num_experts = num_layers, top_k, num_experts
        self.source, self.model = source, model
        self._dtype = _expert_dtype(num_experts)
        self._with_weights: bool | None = None
        self._open: dict[Hashable, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        self._done_e: list[np.ndarray] = []
        self._done_w: list[np.ndarray] = []

    def append(self, experts: np.ndarray, weights: np.ndarray | None = None, *, seq: Hashable = 0) -> None:
        """Add routing of new tokens of sequence `seq`: experts int `[tokens, layers, k]`,
        weights float `[tokens, layers, k]` or None. Arrays are copied."""
        e = np.asarray(experts)
        shape = (self.num_layers, self.top_k)
        if e.ndim == 2 and e.shape == shape:  # one token
            e = e[None]
        if e.ndim != 3 or e.shape[1:] != shape:
            raise ValueError(f"experts must have shape [tokens, {self.num_layers}, {self.top_k}], got {e.shape}")
        if not np.issubdtype(e.dtype, np.integer):
            raise ValueError(f"experts must be integer ids, got dtype {e.dtype}")
        if e.size and (e.min() < 0 or e.max() >= self.num_experts):
            raise ValueError(f"expert ids must be in 0..{self.num_experts - 1}, got {int(e.min())}..{int(e.max())}")
        has_w = weights is not None
        if self._with_weights is None:
            self._with_weights = has_w
        elif has_w != self._with_weights:
            raise ValueError("this recorder " + ("records weights: pass weights with every append"
                                                 if self._with_weights else "was started without weights"))
        es, ws = self._open.setdefault(seq, ([], []))
        es.append(e.astype(self._dtype, copy=True))
        if has_w:
            w = np.asarray(weights, dtype=np.float32)
            if w.shape != e.shape:
                if w.shape == e.shape[1:]:
                    w = w[None]
                else:
                    raise ValueError(f"weights shape {w.shape} must equal experts shape {e.shape}")
            ws.append(w.copy())

    def finish_sequence(self, seq: Hashable = 0) -> int:
        """Close sequence `seq`; returns its index in the trace."""
        if seq not in self._open:
            raise ValueError(f"no open sequence {seq!r}; open: {list(self._open)}")
        es, ws = self._open.pop(seq)
        e = np.concatenate(es)
        if len(e) == 0:
            raise ValueError(f"sequence {seq!r} has no token; nothing to record")
        self._done_e.append(e)
        if self._with_weights:
            self._done_w.append(np.concatenate(ws))
        return len(self._done_e) - 1

    def discard_sequence(self, seq: Hashable = 0) -> None:
        """Forget an open sequence (e.g. an aborted request)."""
        self._open.pop(seq, None)

    @property
    def open_sequences(self) -> list[Hashable]:
        return list(self._open)

    @property
    def num_sequences(self) -> int:
        """Finished sequences."""
        return len(self._done_e)

    @property
    def num_tokens(self) -> int:
        """Tokens of finished sequences."""
        return sum(len(e) for e in self._done_e)

    def to_trace(self) -> RoutingTrace:
        """The finished sequences as a trace (open sequences are not included)."""
        if not self._done_e:
            return RoutingTrace.empty(self.num_layers, self.top_k, self.num_experts,
                                      with_weights=bool(self._with_weights), source=self.source, model=self.model)
        lengths = [len(e) for e in self._done_e]
        return RoutingTrace(
            experts=np.concatenate(self._done_e),
            weights=np.concatenate(self._done_w) if self._with_weights else None,
            seq_starts=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            num_experts=self.num_experts,
            source=self.source,
            model=self.model,
        )
