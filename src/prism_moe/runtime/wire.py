"""Wire format of the expert transport: one msgpack header frame, then one raw frame per tensor.

A message is a ZeroMQ multipart message::

    frame 0      msgpack map: {"v": 1, "type": str, "id": int, ["layer": int], "tensors": [desc, ...], ...}
    frame 1..k   the raw bytes of tensor i (C order, native little-endian), desc i = {name, dtype, shape}

No pickle anywhere: a peer can only make us allocate tensors of the allowed dtypes within `WireLimits`.
`encode` hands out memoryviews of the tensors' own storage (zero copy with `send_multipart(copy=False)`);
`decode` builds tensors on the received frames' memory (zero copy when the frames are writable buffers
such as `zmq.Frame`, one copy for read-only `bytes`). See docs/wire-protocol.md.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import torch

PROTOCOL_VERSION = 1

# Message types. Requests get exactly one reply with the same `id`.
EXPERT_CALL = "expert_call"  # tensors hidden [n, H], expert_ids [n]  -> expert_result
EXPERT_RESULT = "expert_result"  # tensors out [n, H]
ERROR = "error"  # fields code, message; reply to any request that failed
PING = "ping"  # -> pong
PONG = "pong"  # fields server, inflight
LOAD_EXPERT = "load_expert"  # control (migration): served by a handler registered with ExpertService.on
DROP_EXPERT = "drop_expert"  # control (migration)
LINK = "link"  # link emulation (experiments): fields peer, and delay_ms, bandwidth_mbps, drop or clear
BLOCK_CALL = "block_call"  # plans: run a block of layers for a home's rows (blocks.py) -> ack with hidden
BLOCK_RELEASE = "block_release"  # plans: free the block caches of a home's ended requests -> ack
ACK = "ack"  # generic success reply to a control message
MESSAGE_TYPES = frozenset({EXPERT_CALL, EXPERT_RESULT, ERROR, PING, PONG, LOAD_EXPERT, DROP_EXPERT, LINK, BLOCK_CALL,
                           BLOCK_RELEASE, ACK})
# request type -> its success reply type (any request may also be answered with ERROR)
REPLY_TYPE = {EXPERT_CALL: EXPERT_RESULT, PING: PONG, LOAD_EXPERT: ACK, DROP_EXPERT: ACK, LINK: ACK, BLOCK_CALL: ACK,
              BLOCK_RELEASE: ACK}

# Error codes carried by ERROR messages.
BAD_REQUEST = "bad_request"  # the message failed validation (WireError)
HANDLER_ERROR = "handler_error"  # the handler raised or returned something malformed
UNSUPPORTED = "unsupported"  # the type is valid but not served by this endpoint
BAD_REPLY = "bad_reply"  # client side: the peer's reply failed validation

# bfloat16 has no numpy dtype; we never go through numpy for decoding and go through a uint8 view for
# encoding, so every dtype here travels as its raw little-endian bytes.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32,
    "int64": torch.int64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
# how decode builds a tensor on a frame: numpy dtype of the same size (bfloat16 goes through int16)
_NP_DTYPES: dict[torch.dtype, np.dtype[Any]] = {
    torch.float32: np.dtype("<f4"),
    torch.float16: np.dtype("<f2"),
    torch.bfloat16: np.dtype("<i2"),
    torch.int32: np.dtype("<i4"),
    torch.int64: np.dtype("<i8"),
}
FLOAT_DTYPES = frozenset({torch.float32, torch.float16, torch.bfloat16})
INT_DTYPES = frozenset({torch.int32, torch.int64})

MAX_ID = 2**64 - 1
MAX_NAME_LEN = 64

Frame = Any  # bytes, bytearray, memoryview or zmq.Frame: anything with the buffer protocol


class WireError(ValueError):
    """A message that does not follow the protocol. `request_id` is set when the header was readable,
    so a server can address its error reply to the right request."""

    def __init__(self, message: str, *, code: str = BAD_REQUEST, request_id: int | None = None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id


@dataclass(frozen=True)
class WireLimits:
    """Bounds enforced on decode (and on encode, so a sender fails fast with the same message).

    `max_total_bytes` bounds the sum of the tensor frames; a migration that ships an expert larger than
    this must split it into several messages or raise the limit on both sides.
    """

    max_total_bytes: int = 256 * 2**20
    max_header_bytes: int = 64 * 2**10
    max_tensors: int = 16
    max_ndim: int = 8
    max_dim: int = 2**31 - 1


DEFAULT_LIMITS = WireLimits()


def _nbytes(frame: Frame) -> int:
    return memoryview(frame).nbytes


def frames_nbytes(frames: Sequence[Frame]) -> int:
    """Total payload bytes of a multipart message (what crosses the link, less ZeroMQ framing)."""
    n = 0
    for f in frames:
        n += memoryview(f).nbytes
    return n


def _check_shape(name: str, shape: Any, limits: WireLimits, rid: int | None) -> tuple[int, ...]:
    if not isinstance(shape, list | tuple):
        raise WireError(
            f"tensor {name!r}: shape must be a list of ints, got {type(shape).__name__}", request_id=rid
        )
    if len(shape) > limits.max_ndim:
        raise WireError(
            f"tensor {name!r}: {len(shape)} dims, at most {limits.max_ndim} allowed", request_id=rid
        )
    for d in shape:
        # bool is an int subclass; True as a dim is a bug, not a 1
        if not isinstance(d, int) or isinstance(d, bool):
            raise WireError(f"tensor {name!r}: shape {shape!r} has a non-integer dim", request_id=rid)
        if d < 0:
            raise WireError(f"tensor {name!r}: shape {shape!r} has a negative dim", request_id=rid)
        if d > limits.max_dim:
            raise WireError(f"tensor {name!r}: dim {d} exceeds the limit {limits.max_dim}", request_id=rid)
    return tuple(shape)


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """The storage of contiguous CPU tensor `t` as a byte buffer, sharing memory (no copy)."""
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)  # numpy has no bfloat16; same bytes
    # the numpy array keeps the tensor alive for as long as ZeroMQ holds the memoryview
    return memoryview(t.numpy())


def encode(
    header: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor] | None = None,
    limits: WireLimits | None = None,
) -> list[bytes | memoryview]:
    """Build the frames of one message.

    `header` needs `type` and `id`; `v` and `tensors` are filled in. Tensors are detached, moved to the
    CPU and made contiguous if needed; otherwise their memory is shared with the returned frames, so do
    not modify them until the message is sent. With `limits`, oversized messages raise `WireError`
    here instead of being refused by the receiver.
    """
    mtype = header.get("type")
    if mtype not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {mtype!r}; known: {sorted(MESSAGE_TYPES)}")
    rid = header.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= MAX_ID:
        raise WireError(f"message id must be an int in [0, 2**64), got {rid!r}")
    if header.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
        raise WireError(
            f"cannot encode protocol version {header.get('v')!r}; this is version {PROTOCOL_VERSION}"
        )
    descs: list[dict[str, Any]] = []
    frames: list[bytes | memoryview] = [b""]  # frame 0, the header, is packed last
    total = 0
    if tensors:
        for name, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise WireError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
            dname = DTYPE_NAMES.get(t.dtype)
            if dname is None:
                raise WireError(f"tensor {name!r}: dtype {t.dtype} not allowed; use one of {sorted(DTYPES)}")
            if t.requires_grad:
                t = t.detach()
            if not t.is_cpu:
                t = t.cpu()
            if not t.is_contiguous():
                t = t.contiguous()
            descs.append({"name": name, "dtype": dname, "shape": list(t.shape)})
            buf = _tensor_bytes(t)
            total += buf.nbytes
            frames.append(buf)
    if limits is not None:
        if len(descs) > limits.max_tensors:
            raise WireError(f"{len(descs)} tensors in one message, at most {limits.max_tensors} allowed")
        if total > limits.max_total_bytes:
            raise WireError(
                f"message carries {total} tensor bytes, above the limit of {limits.max_total_bytes}"
            )
    h = dict(header)
    h["v"] = PROTOCOL_VERSION
    h["tensors"] = descs
    frames[0] = msgpack.packb(h, use_bin_type=True)
    return frames


def _unpack(frame: Frame) -> Any:
    return msgpack.unpackb(memoryview(frame), raw=False, strict_map_key=True, use_list=True)


def _unpack_or_none(frame: Frame) -> Any:
    """`_unpack` for the fast paths: None where it fails (the generic decode then says why)."""
    try:
        return _unpack(frame)
    except Exception:
        return None


def decode_header(frame: Frame, limits: WireLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Parse and check frame 0 (version, type, id, layer, tensor list shape); tensors are not read."""
    n = _nbytes(frame)
    if n > limits.max_header_bytes:
        raise WireError(f"header of {n} bytes exceeds the limit of {limits.max_header_bytes}")
    try:
        header = _unpack(frame)
    except Exception as e:  # msgpack raises several unrelated types for corrupt input
        raise WireError(f"malformed msgpack header: {type(e).__name__}: {e}") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a msgpack map, got {type(header).__name__}")
    rid = header.get("id")
    if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid <= MAX_ID:
        raise WireError(f"header 'id' must be an int in [0, 2**64), got {rid!r}")
    if header.get("v") != PROTOCOL_VERSION:
        raise WireError(
            f"unsupported protocol version {header.get('v')!r}; this peer speaks version {PROTOCOL_VERSION}",
            request_id=rid,
        )
    if header.get("type") not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {header.get('type')!r}", request_id=rid)
    layer = header.get("layer")
    if layer is not None and (not isinstance(layer, int) or isinstance(layer, bool)):
        raise WireError(f"header 'layer' must be an int, got {layer!r}", request_id=rid)
    descs = header.get("tensors", [])
    if not isinstance(descs, list):
        raise WireError("header 'tensors' must be a list of {name, dtype, shape}", request_id=rid)
    if len(descs) > limits.max_tensors:
        raise WireError(
            f"{len(descs)} tensors in one message, at most {limits.max_tensors} allowed", request_id=rid
        )
    return header


def decode(
    frames: Sequence[Frame],
    limits: WireLimits = DEFAULT_LIMITS,
    *,
    copy: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parse one message into (header, {name: tensor}); raise `WireError` on anything malformed.

    Tensors share memory with writable frames (zmq.Frame, bytearray) unless `copy` is set; read-only
    frames (bytes) and frames misaligned for their dtype are copied.
    """
    if len(frames) == 0:
        raise WireError("empty message")
    header = decode_header(frames[0], limits)
    rid = header["id"]
    descs = header.get("tensors", [])
    if len(frames) != 1 + len(descs):
        raise WireError(
            f"header describes {len(descs)} tensors but {len(frames) - 1} tensor frames followed",
            request_id=rid,
        )
    tensors: dict[str, torch.Tensor] = {}
    total = 0
    max_total = limits.max_total_bytes
    for i, desc in enumerate(descs, 1):
        if not isinstance(desc, dict):
            raise WireError("tensor descriptor must be a map {name, dtype, shape}", request_id=rid)
        name = desc.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
            raise WireError(
                f"tensor name must be a string of 1..{MAX_NAME_LEN} chars, got {name!r}", request_id=rid
            )
        if name in tensors:
            raise WireError(f"duplicate tensor name {name!r}", request_id=rid)
        dname = desc.get("dtype")
        dtype = DTYPES.get(dname) if isinstance(dname, str) else None  # (a list is not hashable)
        if dtype is None:
            raise WireError(
                f"tensor {name!r}: dtype {dname!r} not allowed; use one of {sorted(DTYPES)}", request_id=rid
            )
        shape = _check_shape(name, desc.get("shape"), limits, rid)
        want = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on hostile shapes
        total += want
        if total > max_total:
            raise WireError(f"message carries more than {max_total} tensor bytes (limit)", request_id=rid)
        try:
            mv = memoryview(frames[i])
            if mv.ndim != 1 or mv.itemsize != 1:
                mv = mv.cast("B")
        except TypeError as e:
            raise WireError(
                f"tensor {name!r}: frame is not a contiguous buffer ({e})", request_id=rid
            ) from None
        if mv.nbytes != want:
            raise WireError(
                f"tensor {name!r}: shape {list(shape)} of {dname} needs {want} bytes, frame has {mv.nbytes}",
                request_id=rid,
            )
        tensors[name] = _from_buffer(mv, dtype, shape, copy)
    return header, tensors


def _from_buffer(mv: memoryview, dtype: torch.dtype, shape: tuple[int, ...], copy: bool) -> torch.Tensor:
    if mv.nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if mv.readonly:
        # torch would warn and hand out a writable alias of immutable memory
        mv = memoryview(bytearray(mv))
        copy = False
    # through numpy: several times cheaper than torch.frombuffer(...).view(shape); the array keeps a
    # reference to the frame
    a = np.ndarray(shape, _NP_DTYPES[dtype], mv)
    if copy or not a.flags.aligned:
        # ZeroMQ hands out frames at any offset of its receive buffer (an expert_ids frame after a
        # hidden one often is); an unaligned tensor is not safe for every kernel
        a = a.copy()
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype is torch.bfloat16 else t


# --- fast paths for the two hot messages ---------------------------------------------------------------
# A decode step sends one expert_call per (layer, peer) and gets one expert_result back, each a few KB:
# there, Python work per message is most of the cost above the socket round trip. These functions give
# exactly what the generic `encode`/`decode` (+ `validate_expert_call`) give, with fewer calls for the
# well-formed case, and hand anything else to the generic code so every error reads the same.


def _array(t: torch.Tensor) -> np.ndarray[Any, Any] | None:
    """`t` as a numpy array sharing its memory (bfloat16 as int16: the same bytes), or None where numpy
    cannot view it directly (on a GPU, requiring grad, an unlisted dtype): the generic encoder's case.
    One torch call instead of the several attribute checks it replaces."""
    if t.dtype not in DTYPE_NAMES:
        return None
    try:
        return t.view(torch.int16).numpy() if t.dtype is torch.bfloat16 else t.numpy()
    except (TypeError, RuntimeError):
        return None


def encode_expert_call(
    rid: int, layer: int, expert_ids: torch.Tensor, hidden: torch.Tensor, limits: WireLimits | None = None
) -> list[bytes | memoryview]:
    """`encode({"type": "expert_call", "id": rid, "layer": layer}, {"hidden": hidden, "expert_ids": ids})`."""
    h, i = _array(hidden), _array(expert_ids)
    if not (
        h is not None
        and i is not None
        and h.ndim == 2
        and i.ndim == 1
        and h.flags.c_contiguous
        and i.flags.c_contiguous
        and type(rid) is int
        and 0 <= rid <= MAX_ID
        and type(layer) is int
        and (limits is None or h.nbytes + i.nbytes <= limits.max_total_bytes)
    ):
        return encode(
            {"type": EXPERT_CALL, "id": rid, "layer": layer},
            {"hidden": hidden, "expert_ids": expert_ids},
            limits,
        )
    rest = _call_header_rest(layer, DTYPE_NAMES[hidden.dtype], h.shape, DTYPE_NAMES[expert_ids.dtype], i.shape[0])
    return [_CALL_PREFIX + _msgpack_uint(rid) + rest, memoryview(h), memoryview(i)]


def expert_result_header(rid: int, layer: int, dtype: torch.dtype, shape: Sequence[int]) -> bytes:
    """Frame 0 of the expert_result that `encode_expert_result` builds for an `out` of `dtype` and
    `shape`: its exact bytes, so a caller can recognise the reply it expects with one comparison."""
    return _RESULT_PREFIX + _msgpack_uint(rid) + _result_header_rest(layer, DTYPE_NAMES[dtype], tuple(shape))


# The two hot headers are packed once per (layer, shapes, dtypes): the bytes after the request id are
# cached and the id spliced in, as msgpack.packb would write it (shortest uint form; tested against it).
def _header_prefix(mtype: str) -> bytes:
    """The bytes of a `{"type": mtype, "id": ...}` 5-key map up to the id's value."""
    full = msgpack.packb({"type": mtype, "id": 0, "layer": 0, "v": PROTOCOL_VERSION, "tensors": []})
    return full[: full.index(b"\xa2id") + 3]


def _msgpack_uint(v: int) -> bytes:
    """`msgpack.packb(v)` for 0 <= v < 2**64."""
    if v < 0x80:
        return bytes((v,))
    if v < 0x100:
        return b"\xcc" + v.to_bytes(1, "big")
    if v < 0x10000:
        return b"\xcd" + v.to_bytes(2, "big")
    if v < 0x100000000:
        return b"\xce" + v.to_bytes(4, "big")
    return b"\xcf" + v.to_bytes(8, "big")


_CALL_PREFIX, _RESULT_PREFIX = _header_prefix(EXPERT_CALL), _header_prefix(EXPERT_RESULT)


@functools.lru_cache(maxsize=4096)
def _call_header_rest(layer: int, h_dtype: str, h_shape: tuple[int, int], i_dtype: str, n: int) -> bytes:
    header = {
        "type": EXPERT_CALL,
        "id": 0,
        "layer": layer,
        "v": PROTOCOL_VERSION,
        "tensors": [
            {"name": "hidden", "dtype": h_dtype, "shape": list(h_shape)},
            {"name": "expert_ids", "dtype": i_dtype, "shape": [n]},
        ],
    }
    return msgpack.packb(header, use_bin_type=True)[len(_CALL_PREFIX) + 1 :]


@functools.lru_cache(maxsize=4096)
def _result_header_rest(layer: int, dtype: str, shape: tuple[int, ...]) -> bytes:
    header = {
        "type": EXPERT_RESULT,
        "id": 0,
        "layer": layer,
        "v": PROTOCOL_VERSION,
        "tensors": [{"name": "out", "dtype": dtype, "shape": list(shape)}],
    }
    return msgpack.packb(header, use_bin_type=True)[len(_RESULT_PREFIX) + 1 :]


def encode_expert_result(
    rid: int, layer: int, out: torch.Tensor, limits: WireLimits | None = None
) -> list[bytes | memoryview]:
    """`encode({"type": "expert_result", "id": rid, "layer": layer}, {"out": out})`."""
    o = _array(out)
    if not (
        o is not None
        and o.flags.c_contiguous
        and type(rid) is int
        and 0 <= rid <= MAX_ID
        and type(layer) is int
        and (limits is None or o.nbytes <= limits.max_total_bytes)
    ):
        return encode({"type": EXPERT_RESULT, "id": rid, "layer": layer}, {"out": out}, limits)
    return [expert_result_header(rid, layer, out.dtype, o.shape), memoryview(o)]


def expected_result(frames: Sequence[Frame], header: bytes, like: torch.Tensor) -> torch.Tensor | None:
    """The `out` tensor of `frames` if they are exactly an expert_result with frame 0 `header` (from
    `expert_result_header`) and `out` shaped like `like`; None otherwise (decode them generically).
    One byte comparison checks the whole header: the path of a reply from prism's own service."""
    if len(frames) != 2 or bytes(frames[0]) != header:
        return None
    mv = memoryview(frames[1])
    if mv.ndim != 1 or mv.itemsize != 1 or mv.nbytes != like.nbytes:
        return None
    return _from_buffer(mv, like.dtype, tuple(like.shape), False)


def decode_request(
    frames: Sequence[Frame],
    limits: WireLimits,
    num_layers: int,
    num_experts: int,
    hidden_size: int,
    seen: dict[bytes, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, torch.Tensor], tuple[int, torch.Tensor, torch.Tensor] | None]:
    """`decode`, then `validate_expert_call` if it is an expert call: (header, tensors, call), call being
    (layer, expert_ids [n], hidden [n, H]) for an expert_call and None for other types. Raises WireError
    exactly as they do.

    `seen`, a dict owned by one caller whose limits and model sizes do not change, remembers the
    expert_call headers that passed every check, by their bytes after the request id: a header seen
    before is recognised without unpacking or checking it again (prism's callers send a few dozen
    distinct ones: one per layer and batch size). Frame sizes and expert ids are checked every time.
    Do not modify the returned header.
    """
    if seen is not None and len(frames) == 3:
        hit = _seen_expert_call(frames, limits, num_experts, seen)
        if hit is not None:
            return hit
    fast = _plain_expert_call(frames, limits, num_layers, num_experts, hidden_size)
    if fast is not None:
        if seen is not None:
            _remember(frames[0], fast, seen)
        return fast
    header, tensors = decode(frames, limits)
    if header["type"] != EXPERT_CALL:
        return header, tensors, None
    return header, tensors, validate_expert_call(header, tensors, num_layers, num_experts, hidden_size)


# Our encoders lay out an expert_call header as `_CALL_PREFIX` (a 5-key map, type, the key "id"), the
# request id as a msgpack uint, then layer, v and tensors: the same bytes for every call of one layer and
# batch shape.
_UINT_WIDTH = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}  # msgpack uint 8/16/32/64 markers
MAX_SEEN_HEADERS = 4096


def _split_call_header(head: bytes) -> tuple[int, bytes] | None:
    """(request id, the bytes after it) of an expert_call header in our layout; None otherwise."""
    p = len(_CALL_PREFIX)
    if len(head) <= p or not head.startswith(_CALL_PREFIX):
        return None
    marker = head[p]
    if marker < 0x80:  # positive fixint
        return marker, head[p + 1 :]
    width = _UINT_WIDTH.get(marker)
    if width is None:
        return None
    return int.from_bytes(head[p + 1 : p + 1 + width], "big"), head[p + 1 + width :]


def _remember(head: Frame, fast: Any, seen: dict[bytes, Any]) -> None:
    split = _split_call_header(bytes(head))
    if split is None:
        return
    header, _, (layer, ids, hidden) = fast
    if len(seen) >= MAX_SEEN_HEADERS:
        seen.clear()
    template = {k: v for k, v in header.items() if k != "id"}
    seen[split[1]] = (template, layer, hidden.dtype, tuple(hidden.shape), ids.dtype, hidden.nbytes, ids.nbytes)


def _seen_expert_call(
    frames: Sequence[Frame], limits: WireLimits, num_experts: int, seen: dict[bytes, Any]
) -> tuple[dict[str, Any], dict[str, torch.Tensor], tuple[int, torch.Tensor, torch.Tensor]] | None:
    """`decode_request`'s result for an expert_call whose header (but for its id) passed before; None
    for anything else."""
    head = bytes(frames[0])
    split = _split_call_header(head)
    entry = None if split is None else seen.get(split[1])
    if entry is None or len(head) > limits.max_header_bytes:
        return None
    rid = split[0]  # type: ignore[index]
    template, layer, h_dtype, h_shape, i_dtype, h_nbytes, i_nbytes = entry
    mv_h, mv_i = memoryview(frames[1]), memoryview(frames[2])
    if not (
        mv_h.nbytes == h_nbytes
        and mv_i.nbytes == i_nbytes
        and mv_h.ndim == 1
        and mv_i.ndim == 1
        and mv_h.itemsize == 1
        and mv_i.itemsize == 1
    ):
        return None
    hidden = _from_buffer(mv_h, h_dtype, h_shape, False)
    ids = _from_buffer(mv_i, i_dtype, h_shape[:1], False)
    _check_expert_range(ids, num_experts, rid)
    header = dict(template)
    header["id"] = rid
    return header, {"hidden": hidden, "expert_ids": ids}, (layer, ids, hidden)


def _plain_expert_call(
    frames: Sequence[Frame], limits: WireLimits, num_layers: int, num_experts: int, hidden_size: int
) -> tuple[dict[str, Any], dict[str, torch.Tensor], tuple[int, torch.Tensor, torch.Tensor]] | None:
    """`decode_request`'s result for a well-formed expert_call with exactly the expected fields; None for
    anything else, which the generic checks then decode (and explain). Raises WireError only for expert
    ids out of range, as `validate_expert_call` does."""
    if not (
        len(frames) == 3
        and _nbytes(frames[0]) <= limits.max_header_bytes
        and limits.max_tensors >= 2
        and limits.max_ndim >= 2
    ):
        return None
    header = _unpack_or_none(frames[0])
    descs = header.get("tensors") if type(header) is dict else None
    if not (type(descs) is list and len(descs) == 2 and header.get("v") == PROTOCOL_VERSION):
        return None
    d_h, d_i = descs
    rid, layer = header.get("id"), header.get("layer")
    if not (
        type(d_h) is dict
        and type(d_i) is dict
        and len(d_h) == 3
        and len(d_i) == 3
        and d_h.get("name") == "hidden"
        and d_i.get("name") == "expert_ids"
        and header.get("type") == EXPERT_CALL
        and type(rid) is int
        and 0 <= rid <= MAX_ID
        and type(layer) is int
        and 0 <= layer < num_layers
    ):
        return None
    h_dtype = _FLOAT_BY_NAME.get(d_h.get("dtype")) if type(d_h.get("dtype")) is str else None
    i_dtype = _INT_BY_NAME.get(d_i.get("dtype")) if type(d_i.get("dtype")) is str else None
    h_shape, i_shape = d_h.get("shape"), d_i.get("shape")
    if not (
        h_dtype is not None
        and i_dtype is not None
        and type(h_shape) is list
        and type(i_shape) is list
        and len(h_shape) == 2
        and len(i_shape) == 1
    ):
        return None
    n, h = h_shape
    if not (
        type(n) is int
        and type(h) is int
        and h == hidden_size
        and 0 <= n <= limits.max_dim
        and h <= limits.max_dim
        and i_shape[0] == n
        and type(i_shape[0]) is int
        and n * (h * h_dtype.itemsize + i_dtype.itemsize) <= limits.max_total_bytes
    ):
        return None
    mv_h, mv_i = memoryview(frames[1]), memoryview(frames[2])
    if not (
        mv_h.ndim == 1
        and mv_i.ndim == 1
        and mv_h.itemsize == 1
        and mv_i.itemsize == 1
        and mv_h.nbytes == n * h * h_dtype.itemsize
        and mv_i.nbytes == n * i_dtype.itemsize
    ):
        return None
    hidden = _from_buffer(mv_h, h_dtype, (n, h), False)
    ids = _from_buffer(mv_i, i_dtype, (n,), False)
    _check_expert_range(ids, num_experts, rid)
    return header, {"hidden": hidden, "expert_ids": ids}, (layer, ids, hidden)


_FLOAT_BY_NAME = {DTYPE_NAMES[d]: d for d in FLOAT_DTYPES}
_INT_BY_NAME = {DTYPE_NAMES[d]: d for d in INT_DTYPES}


def validate_expert_call(
    header: Mapping[str, Any],
    tensors: Mapping[str, torch.Tensor],
    num_layers: int,
    num_experts: int,
    hidden_size: int,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Check a decoded expert_call against the model and return (layer, expert_ids [n], hidden [n, H]).

    One call carries the tokens of one MoE layer (0-based MoE layer index, not decoder layer) for any
    number of that layer's experts: row i of `hidden` goes to expert `expert_ids[i]`.
    """
    rid = header.get("id")
    if header.get("type") != EXPERT_CALL:
        raise WireError(f"expected an {EXPERT_CALL} message, got {header.get('type')!r}", request_id=rid)
    layer = header.get("layer")
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < num_layers:
        raise WireError(f"layer {layer!r} out of range [0, {num_layers})", request_id=rid)
    if set(tensors) != {"hidden", "expert_ids"}:
        raise WireError(
            f"expert_call needs tensors 'hidden' and 'expert_ids', got {sorted(tensors)}", request_id=rid
        )
    hidden, ids = tensors["hidden"], tensors["expert_ids"]
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
        raise WireError(f"hidden must be [n, {hidden_size}], got {list(hidden.shape)}", request_id=rid)
    if hidden.dtype not in FLOAT_DTYPES:
        raise WireError(f"hidden must be a float tensor, got {hidden.dtype}", request_id=rid)
    if ids.dim() != 1 or ids.shape[0] != hidden.shape[0]:
        raise WireError(
            f"expert_ids must be [n] with n = {hidden.shape[0]} rows of hidden, got {list(ids.shape)}",
            request_id=rid,
        )
    if ids.dtype not in INT_DTYPES:
        raise WireError(f"expert_ids must be int32 or int64, got {ids.dtype}", request_id=rid)
    _check_expert_range(ids, num_experts, rid)
    return layer, ids, hidden


def _check_expert_range(ids: torch.Tensor, num_experts: int, rid: Any) -> None:
    n = ids.shape[0]
    if n:
        if n <= 64:  # a list is cheaper than a torch reduction for a few tokens
            vals = ids.tolist()
            lo, hi = min(vals), max(vals)
        else:
            lo, hi = (int(v) for v in torch.aminmax(ids))
        if lo < 0 or hi >= num_experts:
            raise WireError(
                f"expert ids must be in [0, {num_experts}), got min {lo} max {hi}", request_id=rid
            )
