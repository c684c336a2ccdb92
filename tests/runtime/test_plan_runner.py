"""Plan execution in one process: a home's `PlanRunner` hands layer blocks to a peer's `BlockExecutor` (a second
model instance from the same checkpoint, called directly instead of over ZeroMQ) and still gives each request
`model.generate`'s greedy tokens; a route switch mid-stream and a peer that fails mid-stream rebuild requests
instead of failing them; the peer frees the caches of ended requests. (Over real processes and sockets, for ten
families: tests/runtime/test_cluster_e2e.py.)"""

from __future__ import annotations

import asyncio
import functools
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from prism_moe.model.spec import ModelSpec
from prism_moe.model.tiny import make_tiny_model
from prism_moe.runtime.blocks import BlockExecutor
from prism_moe.runtime.engine import Engine
from prism_moe.runtime.engine.layers import HandoffError, LayerGate, moe_of_decoder_layers
from prism_moe.runtime.engine.plans import PlanRunner, Route
from prism_moe.runtime.service import ServiceError

TEXTS = ["Hello, how are", "The quick brown fox jumps over the lazy dog. Pack my box", "Edge",
         "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Punctuation", "Which experts are popular"]
MAX_TOKENS = [5, 12, 8, 3, 10]


class DirectCalls:
    """The `BlockCalls` of a home whose peers are executors in this process; `down` peers fail like dead ones."""

    def __init__(self, peers: dict[str, BlockExecutor], home: str = "home") -> None:
        self.peers, self.home = peers, home
        self.down: set[str] = set()
        self.calls = 0

    def run(self, server, first, last, rows, starts, counts, hidden, release):
        if server in self.down:
            raise HandoffError(server, "unreachable")
        self.calls += 1
        header = {"home": self.home, "session": "s1", "first": first, "last": last, "rows": rows, "starts": starts,
                  "counts": counts, "release": release}
        try:
            _, out = self.peers[server].handle_call(header, {"hidden": hidden.clone()})
        except ServiceError as e:
            raise HandoffError(server, e.message, e.code) from e
        return out["hidden"]

    def release(self, server, rows):
        if server not in self.down:
            self.peers[server].handle_release({"home": self.home, "session": "s1", "release": rows}, {})


def _load(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _reference(path: Path, prompts: list[list[int]], lengths: list[int]) -> list[list[int]]:
    ref = _load(path)
    return [ref.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False)[0, len(p):].tolist()
            for p, n in zip(prompts, lengths, strict=True)]


def _cluster(path: Path, route: Route, max_running: int = 3):
    """(engine of the home, its runner factory's calls, the peer's executor)."""
    ids = ModelSpec.from_pretrained(path).moe_layer_ids
    peer_model = _load(path)
    peer = BlockExecutor(peer_model, LayerGate(peer_model, ids), max_len=512, max_requests=8)
    home_model = _load(path)
    calls = DirectCalls({"peer": peer})
    factory = functools.partial(PlanRunner, gate=LayerGate(home_model, ids), client=calls, route=route)
    engine = Engine(home_model, _tokenizer(path), device="cpu", max_running=max_running, max_batch_tokens=40,
                    slot_runner=factory)
    return engine, calls, peer


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _route(layers: int, executors: list[str | None], version: int = 1) -> Route:
    return Route(version, tuple(executors), (None,) * layers)


async def _run_all(engine: Engine, prompts, lengths, midway=None):
    """Two requests first, the rest once one has a token; `midway()` runs after the third request's first token."""
    first = [asyncio.ensure_future(engine.generate(p, n)) for p, n in zip(prompts[:2], lengths[:2], strict=True)]
    stream = await engine.submit(prompts[2], lengths[2])
    ids = [(await stream.__anext__()).token_id]
    if midway is not None:
        midway()
    rest = [asyncio.ensure_future(engine.generate(p, n)) for p, n in zip(prompts[3:], lengths[3:], strict=True)]
    ids += [ev.token_id async for ev in stream]
    return [r.token_ids for r in await asyncio.gather(*first)] + [ids] + [r.token_ids for r in
                                                                          await asyncio.gather(*rest)]


def test_decoder_layers_join_the_block_of_the_next_moe_layer() -> None:
    # DeepSeek-V2-Lite: decoder layer 0 is dense, MoE layers are decoder layers 1..3
    assert moe_of_decoder_layers([1, 2, 3], 4) == [0, 0, 1, 2]
    # Qwen2-MoE with sparse step 2: MoE layers at 1 and 3; a dense layer after the last joins it
    assert moe_of_decoder_layers([1, 3], 5) == [0, 0, 1, 1, 1]


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2", "gpt_oss"])
def test_pipeline_route_gives_generates_tokens(arch: str, tmp_path: Path) -> None:
    path = make_tiny_model(arch, tmp_path / arch)
    layers = ModelSpec.from_pretrained(path).num_moe_layers
    # a middle block on the peer: the hidden states go out and come back within each forward
    executors = [None] * layers
    executors[layers // 2] = "peer"
    engine, calls, peer = _cluster(path, _route(layers, executors))
    with engine:
        prompts = [engine.encode(t) for t in TEXTS]
        got = asyncio.run(_run_all(engine, prompts, MAX_TOKENS))
        info = engine.runner.info()
    assert got == _reference(path, prompts, MAX_TOKENS)
    assert calls.calls > 0 and info["handoffs"] == calls.calls
    assert peer.stats()["requests_cached"] == 0, "the peer still holds caches of ended requests"


def test_route_switch_mid_stream_rebuilds_requests(tmp_path: Path) -> None:
    path = make_tiny_model("mixtral", tmp_path / "m")
    layers = ModelSpec.from_pretrained(path).num_moe_layers
    engine, calls, peer = _cluster(path, Route.local(layers))
    pipeline = _route(layers, [None] * (layers // 2) + ["peer"] * (layers - layers // 2), version=2)
    with engine:
        prompts = [engine.encode(t) for t in TEXTS]
        got = asyncio.run(_run_all(engine, prompts, MAX_TOKENS, midway=lambda: engine.runner.set_route(pipeline)))
        info = engine.runner.info()
    assert got == _reference(path, prompts, MAX_TOKENS)
    assert info["resumed"] >= 1 and calls.calls > 0
    assert info["path"] == [[0, layers // 2 - 1, "here"], [layers // 2, layers - 1, "peer"]]


def test_failed_peer_requests_are_rebuilt_here_not_lost(tmp_path: Path) -> None:
    path = make_tiny_model("qwen3_moe", tmp_path / "q")
    layers = ModelSpec.from_pretrained(path).num_moe_layers
    engine, calls, peer = _cluster(path, _route(layers, ["peer"] * layers))
    with engine:
        prompts = [engine.encode(t) for t in TEXTS]
        got = asyncio.run(_run_all(engine, prompts, MAX_TOKENS, midway=lambda: calls.down.add("peer")))
        info = engine.runner.info()
    assert got == _reference(path, prompts, MAX_TOKENS)
    assert info["avoid"] == ["peer"] and info["path"] == [[0, layers - 1, "here"]] and info["resumed"] >= 1


def test_peer_that_lost_a_cache_says_so_and_the_home_rebuilds(tmp_path: Path) -> None:
    path = make_tiny_model("olmoe", tmp_path / "o")
    layers = ModelSpec.from_pretrained(path).num_moe_layers

    engine, calls, peer = _cluster(path, _route(layers, ["peer"] + [None] * (layers - 1)))

    def restart() -> None:  # the peer forgets every cache (as after a restart) but keeps serving
        with peer._lock:
            for key in list(peer._entries):
                peer._release(*key[:2], [key[2]])

    with engine:
        prompts = [engine.encode(t) for t in TEXTS]
        got = asyncio.run(_run_all(engine, prompts, MAX_TOKENS, midway=restart))
        info = engine.runner.info()
    assert got == _reference(path, prompts, MAX_TOKENS)
    assert info["avoid"] == [] and info["resumed"] >= 1


def test_block_call_validation(tmp_path: Path) -> None:
    path = make_tiny_model("mixtral", tmp_path / "m")
    model = _load(path)
    peer = BlockExecutor(model, LayerGate(model, ModelSpec.from_pretrained(path).moe_layer_ids), max_len=64,
                         max_requests=1)
    h = model.config.hidden_size
    ok = {"home": "a", "session": "s", "first": 0, "last": 0, "rows": ["r1"], "starts": [0], "counts": [2],
          "release": []}
    peer.handle_call(ok, {"hidden": torch.zeros(1, 2, h)})
    bad = [({**ok, "last": 99}, "first/last"), ({**ok, "rows": ["r1", "r2"]}, "one entry per row"),
           ({**ok, "counts": [3]}, "count"), ({**ok, "starts": [63]}, "max length"),
           ({**ok, "starts": [5], "rows": ["r9"]}, "no cache"), ({**ok, "rows": ["r2"]}, "slots free")]
    for header, says in bad:
        with pytest.raises(ServiceError, match=says):
            peer.handle_call(header, {"hidden": torch.zeros(1, 2, h)})
    with pytest.raises(ServiceError, match="hidden"):
        peer.handle_call(ok, {"hidden": torch.zeros(1, 2, h + 1)})


def test_caches_of_a_home_that_went_silent_expire(tmp_path: Path) -> None:
    """A home that died (or lost the peer) never releases its requests' caches: they expire after `ttl_s`."""
    path = make_tiny_model("mixtral", tmp_path / "m")
    model = _load(path)
    peer = BlockExecutor(model, LayerGate(model, ModelSpec.from_pretrained(path).moe_layer_ids), max_len=64,
                         max_requests=2, ttl_s=0.2)
    h = model.config.hidden_size

    def call(home: str, rid: str) -> None:
        peer.handle_call({"home": home, "session": "s", "first": 0, "last": 0, "rows": [rid], "starts": [0],
                          "counts": [1], "release": []}, {"hidden": torch.zeros(1, 1, h)})

    call("dead", "r1")
    call("dead", "r2")
    with pytest.raises(ServiceError, match="slots free"):
        call("alive", "r1")
    time.sleep(0.3)
    call("alive", "r1")  # the dead home's two caches expired first
    st = peer.stats()
    assert st["expired"] == 2 and st["by_home"] == {"alive": 1}


def test_concurrent_calls_of_several_homes_share_a_forward(tmp_path: Path) -> None:
    """Calls queued while a forward runs are run together by the next thread, with each home's result unchanged."""
    import threading

    path = make_tiny_model("qwen2_moe", tmp_path / "q")
    ids = ModelSpec.from_pretrained(path).moe_layer_ids
    model = _load(path)
    h = model.config.hidden_size
    torch.manual_seed(0)
    hidden = {home: torch.randn(2, 3, h) for home in ("a", "b")}

    def call(peer: BlockExecutor, home: str) -> torch.Tensor:
        header = {"home": home, "session": "s", "first": 0, "last": len(ids) - 1, "rows": ["r1", "r2"],
                  "starts": [0, 0], "counts": [3, 2], "release": []}
        return peer.handle_call(header, {"hidden": hidden[home]})[1]["hidden"]

    alone = BlockExecutor(model, LayerGate(model, ids), max_len=64)
    want = {home: call(alone, home) for home in hidden}
    model2 = _load(path)
    peer = BlockExecutor(model2, LayerGate(model2, ids), max_len=64)
    got: dict[str, torch.Tensor] = {}
    with peer._compute:  # a forward "runs": both calls queue behind it
        threads = [threading.Thread(target=lambda home=home: got.__setitem__(home, call(peer, home)))
                   for home in hidden]
        for t in threads:
            t.start()
        while len(peer._queue) < 2:
            time.sleep(0.01)
    for t in threads:
        t.join()
    st = peer.stats()
    assert (st["calls"], st["forwards"]) == (2, 1)
    for home in hidden:
        torch.testing.assert_close(got[home], want[home], rtol=1e-5, atol=1e-5)
