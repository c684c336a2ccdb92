"""The few ZeroMQ socket calls the transport's hot paths make, without pyzmq's Python-level sugar.

pyzmq's `send_multipart` / `recv_multipart` wrappers (type checks, enum flags, RCVMORE lookups) cost
about 4x the socket calls themselves for a 3-frame message, so the transport calls the backend's
per-frame `send` / `recv` / `get` directly, with plain-int flags.
"""

from __future__ import annotations

from typing import Any

import zmq

# plain ints: pyzmq's enum flags cost microseconds per operation on the hot path
POLLIN, POLLOUT, NOBLOCK = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.NOBLOCK)
NOBLOCK_MORE, EVENTS = int(zmq.NOBLOCK | zmq.SNDMORE), int(zmq.EVENTS)

if issubclass(zmq.Socket, zmq.backend.Socket):
    send_frame, recv_frame, sockopt = zmq.backend.Socket.send, zmq.backend.Socket.recv, zmq.backend.Socket.get
else:  # pragma: no cover - a pyzmq whose sugar Socket is not built on its backend's
    send_frame, recv_frame, sockopt = zmq.Socket.send, zmq.Socket.recv, zmq.Socket.get


def send_nowait(sock: zmq.Socket, frames: list[Any]) -> None:
    """Send one multipart message without waiting; zmq.Again (nothing sent) if ZeroMQ cannot take it now.
    Multipart is atomic: if the first part is accepted, so are the others."""
    last = len(frames) - 1
    for i, f in enumerate(frames):
        send_frame(sock, f, NOBLOCK_MORE if i < last else NOBLOCK, False, False)


def recv_rest(sock: zmq.Socket, first: zmq.Frame) -> list[zmq.Frame]:
    """`first` and the other parts of its multipart message (there already once the first arrived)."""
    frames = [first]
    while first.more:
        first = recv_frame(sock, NOBLOCK, False, False)
        frames.append(first)
    return frames
