"""Wire format: exact round trips for every dtype, and every validation error path."""

from __future__ import annotations

import itertools
import random

import msgpack
import pytest
import torch
import zmq

from prism_moe.runtime import wire
from prism_moe.runtime.wire import WireError, WireLimits, decode, encode, validate_expert_call

pytestmark = pytest.mark.timeout(30)

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (3, 5)) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, dtype=dtype)


def _raw_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _header(**fields) -> bytes:
    return msgpack.packb({"v": 1, "type": "ping", "id": 7, "tensors": [], **fields})


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("as_zmq_frame", [False, True])
def test_round_trip_exact_bytes(dtype: torch.dtype, as_zmq_frame: bool) -> None:
    x = _sample(dtype)
    frames = encode({"type": "expert_result", "id": 3, "layer": 2}, {"out": x})
    assert bytes(frames[1]) == _raw_bytes(x)  # raw little-endian bytes, bfloat16 included
    if as_zmq_frame:
        frames = [zmq.Frame(bytes(f)) for f in frames]
    header, tensors = decode(frames)
    assert header["type"] == "expert_result" and header["id"] == 3 and header["layer"] == 2
    assert header["tensors"] == [{"name": "out", "dtype": str(dtype).removeprefix("torch."), "shape": [3, 5]}]
    y = tensors["out"]
    assert y.dtype == dtype and y.shape == x.shape
    assert _raw_bytes(y) == _raw_bytes(x)


def test_encode_shares_memory_and_decode_is_zero_copy_on_zmq_frames() -> None:
    x = torch.randn(64, 32)
    frames = encode({"type": "ping", "id": 1}, {"x": x})
    assert (
        frames[1].obj is not None
        and torch.frombuffer(frames[1], dtype=torch.float32).data_ptr() == x.data_ptr()
    )
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        a.bind("inproc://wire-zero-copy")
        b.connect("inproc://wire-zero-copy")
        a.send_multipart(frames, copy=False)
        received = b.recv_multipart(copy=False)
        _, tensors = decode(received)
        assert torch.equal(tensors["x"], x)
        assert torch.frombuffer(received[1], dtype=torch.uint8).data_ptr() == tensors["x"].data_ptr()
        _, copied = decode(received, copy=True)
        assert copied["x"].data_ptr() != tensors["x"].data_ptr() and torch.equal(copied["x"], x)
    finally:
        a.close(0)
        b.close(0)
        ctx.term()


def test_decode_of_read_only_bytes_copies_without_warning(recwarn: pytest.WarningsRecorder) -> None:
    x = torch.randn(4, 4)
    frames = [bytes(f) for f in encode({"type": "ping", "id": 1}, {"x": x})]
    _, tensors = decode(frames)
    tensors["x"] += 1  # writable: a copy, not an alias of immutable bytes
    assert torch.equal(tensors["x"], x + 1)
    assert not [w for w in recwarn if "not writable" in str(w.message)]


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_decode_copies_misaligned_writable_frames(dtype: torch.dtype) -> None:
    x = _sample(dtype, (4, 3))
    frames = encode({"type": "ping", "id": 1}, {"x": x})
    raw = bytearray(1 + len(bytes(frames[1])))
    raw[1:] = bytes(frames[1])
    _, tensors = decode([frames[0], memoryview(raw)[1:]])  # writable, but off by one byte
    y = tensors["x"]
    assert y.dtype == dtype and y.data_ptr() % dtype.itemsize == 0 and _raw_bytes(y) == _raw_bytes(x)


def test_validate_checks_expert_ids_of_long_batches_too() -> None:
    # short batches are checked through a list, long ones with a torch reduction: same answers
    for n in (3, 64, 65, 300):
        ids = torch.randint(0, 4, (n,))
        h, t = _call(hidden=torch.randn(n, 8), ids=ids)
        assert validate_expert_call(h, t, 4, 4, 8)[1].shape == (n,)
        for bad in (4, -1):
            ids_bad = ids.clone()
            ids_bad[n // 2] = bad
            h, t = _call(hidden=torch.randn(n, 8), ids=ids_bad)
            with pytest.raises(WireError, match="expert ids must be in"):
                validate_expert_call(h, t, 4, 4, 8)


def test_special_tensors_and_order() -> None:
    t = {
        "noncontig": torch.arange(12, dtype=torch.int64).view(3, 4).t(),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 8, dtype=torch.bfloat16),
        "grad": torch.ones(2, requires_grad=True),
    }
    header, out = decode(encode({"type": "ack", "id": 0}, t))
    assert list(out) == list(t)
    assert [d["name"] for d in header["tensors"]] == list(t)
    for k in t:
        assert out[k].shape == t[k].shape and torch.equal(out[k], t[k].detach())


def test_extra_header_fields_pass_through() -> None:
    header, _ = decode(encode({"type": "pong", "id": 9, "server": "b", "inflight": 3}))
    assert header["server"] == "b" and header["inflight"] == 3 and header["v"] == wire.PROTOCOL_VERSION


# ------------------------------------------------------------------------------ decode error paths


def _err(frames: list, limits: WireLimits = wire.DEFAULT_LIMITS) -> WireError:
    with pytest.raises(WireError) as e:
        decode(frames, limits)
    assert e.value.code == wire.BAD_REQUEST
    return e.value


def _desc(name: str = "x", dtype: str = "float32", shape: list | None = None) -> dict:
    return {"name": name, "dtype": dtype, "shape": [2, 2] if shape is None else shape}


def test_error_empty_and_malformed_header() -> None:
    assert "empty" in str(_err([]))
    assert "malformed msgpack" in str(_err([b"\xc1garbage"]))  # 0xc1 is never valid msgpack
    assert "malformed msgpack" in str(_err([msgpack.packb({1: 2})]))  # non-str map key
    assert "malformed msgpack" in str(_err([msgpack.packb({"v": 1}) + b"trailing"]))
    assert "must be a msgpack map" in str(_err([msgpack.packb([1, 2])]))
    assert "exceeds the limit" in str(_err([_header(pad="x" * 200)], WireLimits(max_header_bytes=100)))


@pytest.mark.parametrize("bad_id", [None, -1, True, "1", 1.0, {"a": 1}])
def test_error_bad_id(bad_id) -> None:
    assert "'id'" in str(_err([msgpack.packb({"v": 1, "type": "ping", "id": bad_id})]))


def test_error_version_and_type_carry_request_id() -> None:
    e = _err([_header(v=2)])
    assert "unsupported protocol version 2" in str(e) and e.request_id == 7
    e = _err([_header(type="exec_python")])
    assert "unknown message type" in str(e) and e.request_id == 7
    assert "'layer'" in str(_err([_header(layer="3")])) and "'layer'" in str(_err([_header(layer=True)]))


def test_error_tensor_descriptors() -> None:
    four = b"\x00" * 16
    assert "'tensors' must be a list" in str(_err([_header(tensors={"x": 1})]))
    assert "at most 2 allowed" in str(
        _err([_header(tensors=[_desc(str(i)) for i in range(3)])] + [four] * 3, WireLimits(max_tensors=2))
    )
    assert "descriptor must be a map" in str(_err([_header(tensors=[[1]]), four]))
    assert "tensor name" in str(_err([_header(tensors=[_desc(name="")]), four]))
    assert "tensor name" in str(_err([_header(tensors=[_desc(name=3)]), four]))
    assert "duplicate" in str(_err([_header(tensors=[_desc(), _desc()]), four, four]))
    for dtype in ["float64", "object", "uint8", None, [1], {"a": 1}]:  # unhashable ones too
        assert "not allowed" in str(_err([_header(tensors=[_desc(dtype=dtype)]), four]))
    assert "shape must be a list" in str(_err([_header(tensors=[_desc(shape="2,2")]), four]))
    assert "non-integer" in str(_err([_header(tensors=[_desc(shape=[2, 2.0])]), four]))
    assert "non-integer" in str(_err([_header(tensors=[_desc(shape=[True, 4])]), four]))
    assert "negative" in str(_err([_header(tensors=[_desc(shape=[-2, -2])]), four]))
    assert "exceeds the limit" in str(_err([_header(tensors=[_desc(shape=[2**40, 0])]), b""]))
    assert "dims, at most" in str(_err([_header(tensors=[_desc(shape=[1] * 9)]), b"\x00" * 4]))


def test_error_frames_do_not_match_descriptors() -> None:
    h = _header(tensors=[_desc()])
    assert "needs 16 bytes, frame has 15" in str(_err([h, b"\x00" * 15]))
    assert "needs 16 bytes, frame has 17" in str(_err([h, b"\x00" * 17]))
    assert "1 tensors but 0 tensor frames" in str(_err([h]))
    assert "1 tensors but 2 tensor frames" in str(_err([h, b"\x00" * 16, b"\x00" * 16]))


def test_error_total_size_above_limit() -> None:
    limits = WireLimits(max_total_bytes=1000)
    # checked from the shapes before touching the frames: a hostile header cannot make us allocate
    e = _err([_header(tensors=[_desc(shape=[100, 100])]), b""], limits)
    assert "more than 1000 tensor bytes" in str(e)
    e = _err(
        [_header(tensors=[_desc("a", shape=[150]), _desc("b", shape=[150])]), b"\0" * 600, b"\0" * 600],
        limits,
    )
    assert "more than 1000" in str(e)


def test_encode_errors() -> None:
    with pytest.raises(WireError, match="unknown message type"):
        encode({"type": "nope", "id": 1})
    with pytest.raises(WireError, match="message id"):
        encode({"type": "ping", "id": -1})
    with pytest.raises(WireError, match="protocol version"):
        encode({"type": "ping", "id": 1, "v": 9})
    with pytest.raises(WireError, match="dtype torch.float64 not allowed"):
        encode({"type": "ping", "id": 1}, {"x": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(WireError, match="expected a torch.Tensor"):
        encode({"type": "ping", "id": 1}, {"x": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(WireError, match="above the limit"):
        encode({"type": "ping", "id": 1}, {"x": torch.zeros(300)}, WireLimits(max_total_bytes=1000))


def test_random_garbage_only_ever_raises_wire_error() -> None:
    rng = random.Random(0)
    good = [
        bytes(f)
        for f in encode(
            {"type": "expert_call", "id": 5, "layer": 1},
            {"hidden": torch.randn(2, 4), "expert_ids": torch.tensor([0, 1])},
        )
    ]
    for _ in range(400):
        frames = [bytearray(f) for f in good]
        for _ in range(rng.randint(1, 6)):  # flip, truncate or drop
            i = rng.randrange(len(frames))
            op = rng.random()
            if op < 0.6 and frames[i]:
                frames[i][rng.randrange(len(frames[i]))] = rng.randrange(256)
            elif op < 0.85:
                frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
            elif len(frames) > 1:
                frames.pop(i)
        try:
            decode(frames)
        except WireError:
            pass


# -------------------------------------------------------------------------- validate_expert_call


def _call(layer=1, hidden=None, ids=None, **extra) -> tuple[dict, dict]:
    hidden = torch.randn(3, 8) if hidden is None else hidden
    ids = torch.tensor([0, 3, 3]) if ids is None else ids
    tensors = {"hidden": hidden, "expert_ids": ids, **extra}
    return decode(encode({"type": "expert_call", "id": 11, "layer": layer}, tensors))


def test_validate_expert_call_ok() -> None:
    h, t = _call(ids=torch.tensor([0, 3, 3], dtype=torch.int32), hidden=torch.randn(3, 8).half())
    layer, ids, hidden = validate_expert_call(h, t, num_layers=4, num_experts=4, hidden_size=8)
    assert layer == 1 and ids.tolist() == [0, 3, 3] and hidden.shape == (3, 8)
    h, t = _call(hidden=torch.empty(0, 8), ids=torch.empty(0, dtype=torch.int64))  # empty batch is valid
    assert validate_expert_call(h, t, 4, 4, 8)[1].numel() == 0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer": 4}, r"layer 4 out of range \[0, 4\)"),
        ({"layer": -1}, "out of range"),
        ({"layer": None}, "out of range"),
        ({"ids": torch.tensor([0, 4, 1])}, r"expert ids must be in \[0, 4\)"),
        ({"ids": torch.tensor([0, -1, 1])}, "expert ids must be in"),
        ({"ids": torch.tensor([0, 1])}, "expert_ids must be"),
        ({"ids": torch.tensor([[0, 1, 2]])}, "expert_ids must be"),
        ({"ids": torch.tensor([0.0, 1.0, 2.0])}, "int32 or int64"),
        ({"hidden": torch.randn(3, 7)}, r"hidden must be \[n, 8\]"),
        ({"hidden": torch.randn(24)}, r"hidden must be \[n, 8\]"),
        ({"hidden": torch.ones(3, 8, dtype=torch.int32)}, "float tensor"),
        ({"extra": torch.zeros(1)}, "needs tensors 'hidden' and 'expert_ids'"),
    ],
)
def test_validate_expert_call_errors(kwargs: dict, match: str) -> None:
    h, t = _call(**kwargs)
    with pytest.raises(WireError, match=match) as e:
        validate_expert_call(h, t, num_layers=4, num_experts=4, hidden_size=8)
    assert e.value.request_id == 11


def test_validate_rejects_other_types_and_missing_tensors() -> None:
    h, t = decode(encode({"type": "ping", "id": 2}))
    with pytest.raises(WireError, match="expected an expert_call"):
        validate_expert_call(h, t, 4, 4, 8)
    h, t = decode(encode({"type": "expert_call", "id": 2, "layer": 0}, {"hidden": torch.randn(1, 8)}))
    with pytest.raises(WireError, match="needs tensors"):
        validate_expert_call(h, t, 4, 4, 8)


# ------------------------------------------------------------------------ fast paths (hot messages)
# encode_expert_call / encode_expert_result / decode_request must give exactly what
# the generic encode / decode / validate_expert_call give: the same bytes, tensors and errors.


def _outcome(fn, *args):
    """(kind, value) of calling fn: its result, or the WireError's message and request id."""
    try:
        return "ok", fn(*args)
    except WireError as e:
        return "error", (str(e), e.request_id, e.code)


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and _raw_bytes(a[k]) == _raw_bytes(b[k])
        for k in a
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("ids_dtype", [torch.int64, torch.int32], ids=str)
def test_fast_encoders_give_the_generic_bytes(dtype: torch.dtype, ids_dtype: torch.dtype) -> None:
    # ids at every msgpack uint width boundary: the fast encoders splice the id into cached header bytes
    rids = (0, 9, 127, 128, 255, 256, 2**16 - 1, 2**16, 2**32 - 1, 2**32, 2**40, 2**64 - 1)
    for n, rid in itertools.product((0, 1, 5), rids):
        x, ids = torch.randn(n, 8).to(dtype), torch.randint(0, 4, (n,), dtype=ids_dtype)
        fast = wire.encode_expert_call(rid, 3, ids, x)
        slow = encode({"type": "expert_call", "id": rid, "layer": 3}, {"hidden": x, "expert_ids": ids})
        assert [bytes(f) for f in fast] == [bytes(f) for f in slow]
        fast = wire.encode_expert_result(rid, 1, x, wire.DEFAULT_LIMITS)
        slow = encode({"type": "expert_result", "id": rid, "layer": 1}, {"out": x})
        assert [bytes(f) for f in fast] == [bytes(f) for f in slow]
        assert wire.expert_result_header(rid, 1, x.dtype, list(x.shape)) == bytes(slow[0])
    # inputs the fast path does not take go the generic way (same bytes, same errors)
    x = torch.randn(8, 4).t()  # not contiguous
    ids = torch.tensor([0, 1, 2, 3])
    assert [bytes(f) for f in wire.encode_expert_call(1, 0, ids, x)] == [
        bytes(f)
        for f in encode({"type": "expert_call", "id": 1, "layer": 0}, {"hidden": x, "expert_ids": ids})
    ]
    with pytest.raises(WireError, match="dtype"):
        wire.encode_expert_result(1, 0, torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(WireError, match="above the limit"):
        wire.encode_expert_result(1, 0, torch.zeros(4, 4), WireLimits(max_total_bytes=32))


def _call_frames(header_edit=None, frames_edit=None, n=3, h=8, dtype=torch.float32, ids=None):
    x = torch.randn(n, h).to(dtype)
    ids = torch.tensor([0, 3, 3][:n] + [1] * max(0, n - 3)) if ids is None else ids
    frames = [
        bytes(f)
        for f in encode({"type": "expert_call", "id": 11, "layer": 1}, {"hidden": x, "expert_ids": ids})
    ]
    if header_edit is not None:
        header = msgpack.unpackb(frames[0])
        header_edit(header)
        frames[0] = msgpack.packb(header)
    if frames_edit is not None:
        frames_edit(frames)
    return [zmq.Frame(f) for f in frames]


def _set(path, value):
    def edit(h):
        d = h
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    return edit


CALL_VARIANTS = {
    "ok": {},
    "ok_bf16_int32": {"dtype": torch.bfloat16, "ids": torch.tensor([1, 2, 3], dtype=torch.int32)},
    "ok_empty": {"n": 0, "ids": torch.empty(0, dtype=torch.int64)},
    "layer_out_of_range": {"header_edit": _set(["layer"], 4)},
    "layer_bool": {"header_edit": _set(["layer"], True)},
    "hidden_size": {"h": 6},
    "ids_out_of_range": {"ids": torch.tensor([0, 9, 1])},
    "ids_negative": {"ids": torch.tensor([0, -1, 1])},
    "ids_float": {"ids": torch.tensor([0.0, 1.0, 2.0])},
    "ids_length": {"header_edit": _set(["tensors", 1, "shape"], [2])},
    "hidden_int": {"header_edit": _set(["tensors", 0, "dtype"], "int32")},
    "dtype_list": {"header_edit": _set(["tensors", 0, "dtype"], ["float32"])},
    "dim_bool": {"header_edit": _set(["tensors", 0, "shape"], [True, 8])},
    "dim_negative": {"header_edit": _set(["tensors", 0, "shape"], [-3, 8])},
    "three_dims": {"header_edit": _set(["tensors", 0, "shape"], [3, 8, 1])},
    "ok_extra_desc_key": {"header_edit": _set(["tensors", 0, "extra"], 1)},
    "renamed": {"header_edit": _set(["tensors", 0, "name"], "h")},
    "bad_version": {"header_edit": _set(["v"], 2)},
    "bad_id": {"header_edit": _set(["id"], -1)},
    "ping_type": {"header_edit": _set(["type"], "ping")},
    "short_frame": {"frames_edit": lambda f: f.__setitem__(1, f[1][:-4])},
    "missing_frame": {"frames_edit": lambda f: f.pop()},
    "garbage_header": {"frames_edit": lambda f: f.__setitem__(0, b"\xc1\xff")},
}


def _assert_decode_request_matches_generic(variant: str, frames: list, seen: dict | None) -> None:
    limits = WireLimits()

    def generic(fr):
        header, tensors = decode(fr, limits)
        call = validate_expert_call(header, tensors, 4, 4, 8) if header["type"] == "expert_call" else None
        return header, tensors, call

    kind_fast, fast = _outcome(wire.decode_request, frames, limits, 4, 4, 8, seen)
    kind_slow, slow = _outcome(generic, frames)
    assert kind_fast == kind_slow
    if kind_fast == "error":
        assert fast == slow
    else:
        assert fast[0] == slow[0] and _same_tensors(fast[1], slow[1])
        assert (fast[2] is None) == (slow[2] is None)
        if fast[2] is not None:
            assert fast[2][0] == slow[2][0] and _same_tensors(
                {"i": fast[2][1], "h": fast[2][2]}, {"i": slow[2][1], "h": slow[2][2]}
            )
    assert variant.startswith("ok") == (kind_fast == "ok" and fast[2] is not None) or variant == "ping_type"


@pytest.mark.parametrize("variant", sorted(CALL_VARIANTS))
def test_decode_request_matches_decode_then_validate(variant: str) -> None:
    _assert_decode_request_matches_generic(variant, _call_frames(**CALL_VARIANTS[variant]), None)


@pytest.mark.parametrize("variant", sorted(CALL_VARIANTS))
def test_decode_request_with_seen_headers_matches_decode_then_validate(variant: str) -> None:
    # every well-formed header remembered first: a variant with the same header but bad frames or ids
    # (short_frame, ids_out_of_range, ...) then takes the remembered-header path
    seen: dict = {}
    for ok in (v for v in CALL_VARIANTS if v.startswith("ok")):
        wire.decode_request(_call_frames(**CALL_VARIANTS[ok]), WireLimits(), 4, 4, 8, seen)
    assert len(seen) == 3
    _assert_decode_request_matches_generic(variant, _call_frames(**CALL_VARIANTS[variant]), seen)


def test_remembered_header_reads_every_request_id_width(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict = {}
    x, ids = torch.randn(2, 8), torch.tensor([1, 3])
    first = [zmq.Frame(bytes(f)) for f in wire.encode_expert_call(7, 2, ids, x)]
    wire.decode_request(first, WireLimits(), 4, 4, 8, seen)
    assert len(seen) == 1

    def unexpected(*args):
        raise AssertionError("a remembered header was unpacked again")

    monkeypatch.setattr(wire, "_plain_expert_call", unexpected)
    for rid in (0, 127, 128, 255, 256, 2**16, 2**32, 2**64 - 1):
        frames = [zmq.Frame(bytes(f)) for f in wire.encode_expert_call(rid, 2, ids, x)]
        header, tensors, call = wire.decode_request(frames, WireLimits(), 4, 4, 8, seen)
        assert header == decode(frames)[0] and header["id"] == rid
        assert call[0] == 2 and torch.equal(call[1], ids) and torch.equal(call[2], x)


def test_expected_result_takes_only_the_exact_reply_and_matches_decode() -> None:
    x = torch.randn(3, 8).to(torch.bfloat16)
    good = [zmq.Frame(bytes(f)) for f in encode({"type": "expert_result", "id": 4, "layer": 2}, {"out": x})]
    header = wire.expert_result_header(4, 2, x.dtype, list(x.shape))
    out = wire.expected_result(good, header, x)
    assert out is not None and _same_tensors({"out": out}, decode(good)[1])
    # another id, shape or type, a corrupt or missing frame: not taken (the caller decodes them)
    other_id = [bytes(f) for f in encode({"type": "expert_result", "id": 5, "layer": 2}, {"out": x})]
    other = [bytes(f) for f in encode({"type": "expert_result", "id": 4, "layer": 2}, {"out": torch.randn(2, 8)})]
    err = [bytes(f) for f in encode({"type": "error", "id": 4, "code": "not_held", "message": "m"})]
    corrupt = [bytes(good[0]), bytes(good[1])[:-2]]
    for frames in (other_id, other, err, corrupt, good[:1], [*good, b"x"], [b"\x00"]):
        assert wire.expected_result(frames, header, x) is None


def test_decode_request_on_random_garbage_only_raises_wire_error() -> None:
    rng = random.Random(1)
    good = [bytes(f) for f in _call_frames()]
    for _ in range(400):
        frames = [bytearray(f) for f in good]
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(frames))
            if frames[i] and rng.random() < 0.7:
                frames[i][rng.randrange(len(frames[i]))] = rng.randrange(256)
            else:
                frames[i] = frames[i][: rng.randrange(len(frames[i]) + 1)]
        try:
            wire.decode_request(frames, WireLimits(), 4, 4, 8)
        except WireError:
            pass
