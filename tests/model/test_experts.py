"""The prism experts implementation: slots, both compute paths, same tokens as transformers' kernels."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import AutoConfig, AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

from prism_moe.model import onednn
from prism_moe.model.experts import (
    IMPLEMENTATION,
    ExpertDispatcher,
    LocalDispatcher,
    MissingExpertError,
    RemoteDispatcher,
    attach,
    combine,
    detach,
    experts_modules,
    group_by_expert,
    skip_padding,
    stores_of,
)
from prism_moe.model.grouped import compute_rows, expert_forward
from prism_moe.model.slots import ExpertSlots, Gate, NoFreeSlotError, SlotPool
from prism_moe.model.tiny import ARCHS

NEW_TOKENS = 16
PATHS = ["loop", "grouped"]
# The grouped path and continuous batching do not depend on the family beyond the expert math: a plain
# family, one with shared experts, one with latent attention and dense first layers, and GPT-OSS's biased,
# clamped experts cover them (the loop, the exact reference, runs on every family).
REPRESENTATIVE = [a for a in ("mixtral", "qwen2_moe", "deepseek_v2", "gpt_oss") if a in ARCHS]


def _generate(model, ids):
    return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)


def _split_stores(model) -> tuple[dict[int, ExpertSlots], dict[int, ExpertSlots]]:
    """Even experts 'here', odd experts on a 'peer' (separate pools, copied weights)."""
    here, peer = {}, {}
    for layer, (_, m) in enumerate(experts_modules(model)):
        n = m.gate_up_proj.shape[0]
        here[layer] = ExpertSlots.from_module(m, layer, range(0, n, 2))
        peer[layer] = ExpertSlots.from_module(m, layer, range(1, n, 2))
    return here, peer


class PoolPeer:
    """A fake peer server: computes its slots' experts on a worker thread, returns futures."""

    def __init__(self, stores: dict[int, ExpertSlots]) -> None:
        self.stores = stores
        threads = torch.get_num_threads()  # per thread in OpenMP: the same count gives the same BLAS bits
        self.pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(threads,))
        self.batches: list[tuple[int, torch.Tensor]] = []  # (layer, expert ids [m]), read after the forward

    def remote(self, layer, batches):
        futures = {}
        for server, (expert_ids, x) in batches.items():
            assert server == "peer"
            self.batches.append((layer, expert_ids.clone()))
            futures[server] = self.pool.submit(compute_rows, self.stores[layer], expert_ids.clone(), x.clone())
        return futures


class HostReads(TorchFunctionMode):
    """Counts the calls that read tensor values on the host (each one a device sync on a GPU)."""

    READS = {"tolist", "item", "numpy", "__bool__", "__int__", "__float__", "nonzero", "unique", "cpu",
             "unique_consecutive", "__index__"}

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def _random_slots(num_experts=6, hidden=8, inter=4, held=range(6), capacity=None, bias=False, seed=0, packed=False):
    g = torch.Generator().manual_seed(seed)
    pool = SlotPool(capacity or len(held), hidden, inter, bias=bias, packed=packed)
    store = ExpertSlots(0, num_experts, pool, Gate.activation("silu"))
    weights = {e: (torch.randn(2 * inter, hidden, generator=g), torch.randn(hidden, inter, generator=g),
                   torch.randn(2 * inter, generator=g) if bias else None,
                   torch.randn(hidden, generator=g) if bias else None) for e in range(num_experts)}
    for e in held:
        store.add(e, *weights[e])
    return store, weights


def test_group_by_expert_matches_eager_order():
    top_k = torch.tensor([[3, 1], [1, 0], [3, 2], [0, 1]])  # [T=4, k=2]
    groups = group_by_expert(top_k)
    assert list(groups) == [0, 1, 2, 3]
    for e, (rows, slots) in groups.items():
        mask = torch.nn.functional.one_hot(top_k, num_classes=5).permute(2, 1, 0)[e]  # the eager [k, T] mask
        want_slots, want_rows = torch.where(mask)
        assert rows.tolist() == want_rows.tolist() and slots.tolist() == want_slots.tolist()
        assert (top_k[rows, slots] == e).all()


ONEDNN = onednn.usable("cpu", torch.float32)
POOLS = [False, pytest.param(True, marks=pytest.mark.skipif(not ONEDNN, reason="torch without oneDNN"))]


@pytest.mark.parametrize("packed", POOLS)
def test_slots_write_publish_drop_and_budget(packed):
    store, w = _random_slots(held=[1, 4], capacity=3, packed=packed)
    assert store.held == [1, 4] and 2 not in store and len(store) == 2
    assert store.view.slot_of.tolist() == [-1, 0, -1, -1, 1, -1, -1]  # + the padding entry
    assert torch.equal(store.get(4)[0], w[4][0])

    slot = store.write(2, *w[2])  # staged: weights present, not mapped for own tokens
    assert slot == 2 and store.staged == [2] and 2 not in store and store.has_weights(2)
    assert store.view.slot_of[2] == -1 and store.view.serving[2] == 2
    with pytest.raises(NoFreeSlotError, match="all 3 slots"):
        store.write(5, *w[5])  # the budget is the pool: nothing allocated beyond it
    assert store.publish() == [2] and store.held == [1, 2, 4] and store.view.slot_of[2] == 2

    store.drop(1)
    assert store.held == [2, 4] and store.view.slot_of[1] == -1
    with pytest.raises(MissingExpertError, match="MoE layer 0: expert 1 is not held"):
        store.get(1)
    assert store.add(5, *w[5]) == 0  # the dropped slot, reused
    with pytest.raises(ValueError, match="expected gate_up"):
        store.write(3, w[3][1], w[3][0])
    with pytest.raises(ValueError, match="have no biases"):
        store.write(3, w[3][0], w[3][1], torch.zeros(8), torch.zeros(8))
    with pytest.raises(ValueError, match="already held"):
        store.write(5, *w[5])
    with pytest.raises(ValueError, match="dequantized"):
        store.write(3, w[3][0].to(torch.float8_e4m3fn), w[3][1])


@pytest.mark.parametrize("packed", POOLS)
def test_dropped_slot_waits_for_forwards_that_may_read_it(packed):
    store, w = _random_slots(held=[0, 1], capacity=2, packed=packed)
    with store.reading() as view:  # a forward in progress saw expert 0 in slot 0
        store.drop(0)
        assert view.host[0] == 0 and store.view.host[0] == -1
        with pytest.raises(NoFreeSlotError, match="still read"):
            store.write(3, *w[3], timeout=0.05)
        done = threading.Event()
        threading.Thread(target=lambda: (store.write(3, *w[3], timeout=5), done.set())).start()
        assert not done.wait(0.1)  # blocked until the forward ends
    assert done.wait(5) and store.staged == [3]
    assert torch.equal(store.get(3)[0], w[3][0])


@pytest.mark.parametrize("bias", [False, True])
def test_grouped_matches_loop_reference(bias):
    store, _ = _random_slots(num_experts=8, hidden=16, inter=8, held=[0, 2, 3, 5, 7], capacity=6, bias=bias)
    g = torch.Generator().manual_seed(3)
    for tokens in (1, 5, 33):
        hidden = torch.randn(tokens, 16, generator=g)
        top_k = torch.stack([torch.randperm(5, generator=g)[:2] for _ in range(tokens)])
        top_k = torch.tensor([0, 2, 3, 5, 7])[top_k]
        weights = torch.rand(tokens, 2, generator=g)
        loop = LocalDispatcher(path="loop").moe_forward(0, hidden, top_k, weights, store)
        grouped = LocalDispatcher(path="grouped").moe_forward(0, hidden, top_k, weights, store)
        torch.testing.assert_close(grouped, loop, rtol=1e-5, atol=1e-5)
        ids = top_k[:, 0]
        for grouped_rows in (False, True):
            rows = compute_rows(store, ids, hidden, grouped=grouped_rows)
            want = torch.stack([expert_forward(store.pool, store.gate, int(store.view.host[e]), hidden[i:i + 1])[0]
                                for i, e in enumerate(ids.tolist())])
            torch.testing.assert_close(rows, want, rtol=1e-5, atol=1e-5)


def _routings(seed: int, held=(0, 2, 3, 5, 7)):
    """(hidden [T, 64], top-2 ids among `held`, weights) for T = 1, 7 and 130 tokens."""
    g = torch.Generator().manual_seed(seed)
    for tokens in (1, 7, 130):
        hidden = torch.randn(tokens, 64, generator=g)
        top_k = torch.tensor(held)[torch.stack([torch.randperm(len(held), generator=g)[:2] for _ in range(tokens)])]
        yield hidden, top_k, torch.rand(tokens, 2, generator=g)


@pytest.mark.skipif(not ONEDNN, reason="torch without oneDNN")
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_loop_matches_loop_reference(bias):
    """The loop with oneDNN's GEMMs: the loop's results within float32 rounding, for the forward and for a peer's
    rows; `auto` takes it for float32 on the CPU (and the exact loop stays what `loop` names)."""
    store, _ = _random_slots(num_experts=8, hidden=64, inter=32, held=[0, 2, 3, 5, 7], capacity=6, bias=bias)
    for hidden, top_k, weights in _routings(seed=4):
        loop = LocalDispatcher(path="loop").moe_forward(0, hidden, top_k, weights, store)
        for path in ("onednn", "auto"):
            out = LocalDispatcher(path=path).moe_forward(0, hidden, top_k, weights, store)
            torch.testing.assert_close(out, loop, rtol=1e-4, atol=1e-4)
        ids = top_k[:, 0]
        torch.testing.assert_close(compute_rows(store, ids, hidden, grouped=False, onednn=True),
                                   compute_rows(store, ids, hidden, grouped=False), rtol=1e-4, atol=1e-4)
    assert LocalDispatcher(path="auto").onednn_on(torch.device("cpu"), torch.float32)
    assert not LocalDispatcher(path="loop").onednn_on(torch.device("cpu"), torch.float32)
    assert not LocalDispatcher(path="auto").onednn_on(torch.device("cpu"), torch.float64)


@pytest.mark.skipif(not ONEDNN, reason="torch without oneDNN")
@pytest.mark.parametrize("bias", [False, True])
def test_packed_pool_matches_dense_loop_reference(bias):
    """A packed pool (what a CPU server holds): every path but grouped computes the dense pool's exact loop within
    float32 rounding, a peer's rows too; its weights read back exactly (migration sends them); grouped refuses it."""
    dense, w = _random_slots(num_experts=8, hidden=64, inter=32, held=[0, 2, 3, 5, 7], capacity=6, bias=bias)
    packed, _ = _random_slots(num_experts=8, hidden=64, inter=32, held=[0, 2, 3, 5, 7], capacity=6, bias=bias,
                              packed=True)
    assert packed.pool.packed and all(t.is_mkldnn for t in packed.pool.gate_up if t is not None)
    for e in (0, 7):
        for got, want in zip(packed.get(e), w[e], strict=True):
            assert (got is None and want is None) or torch.equal(got, want)
    for hidden, top_k, weights in _routings(seed=5):
        want = LocalDispatcher(path="loop").moe_forward(0, hidden, top_k, weights, dense)
        for path in ("auto", "onednn", "loop"):
            out = LocalDispatcher(path=path).moe_forward(0, hidden, top_k, weights, packed)
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        ids = top_k[:, 0]
        torch.testing.assert_close(compute_rows(packed, ids, hidden), compute_rows(dense, ids, hidden, grouped=False),
                                   rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="grouped experts path reads whole slabs"):
        LocalDispatcher(path="grouped").moe_forward(0, hidden, top_k, weights, packed)
    with pytest.raises(ValueError, match="float32 weights on a CPU"):
        SlotPool(2, 8, 4, dtype=torch.float64, packed=True)


@pytest.mark.parametrize("path", PATHS)
def test_local_dispatcher_matches_module_and_refuses_missing(path, eager_model):
    module = experts_modules(eager_model("qwen3_moe"))[0][1]
    store = ExpertSlots.from_module(module, 0, [1, 4])
    hidden = torch.randn(5, module.hidden_dim, generator=torch.Generator().manual_seed(0))
    top_k = torch.tensor([[1, 4]] * 5)
    weights = torch.rand(5, 2, generator=torch.Generator().manual_seed(1))
    out = LocalDispatcher(path=path).moe_forward(0, hidden, top_k, weights, store)
    with torch.no_grad():
        want = type(module).forward.__wrapped__(module, hidden, top_k, weights)  # transformers' eager forward
    if path == "loop":
        assert torch.equal(out, want)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(MissingExpertError, match=r"tokens routed to experts \[2\]"):
        LocalDispatcher(path=path).moe_forward(0, hidden, torch.tensor([[1, 2]] * 5), weights, store)


def test_grouped_path_host_reads_and_launches_do_not_grow():
    """All local: no host read of a tensor value; some remote: exactly one (the routed ids)."""
    store, w = _random_slots(num_experts=8, hidden=16, inter=8, held=range(8), capacity=8)
    peer, _ = _random_slots(num_experts=8, hidden=16, inter=8, held=range(8), capacity=8)
    g = torch.Generator().manual_seed(0)
    hidden, weights = torch.randn(16, 16, generator=g), torch.rand(16, 2, generator=g)
    d = LocalDispatcher(path="grouped")
    ops = []
    for active in (1, 8):
        top_k = torch.randint(0, active, (16, 2), generator=g)
        with HostReads() as mode, torch.profiler.profile() as prof:
            d.moe_forward(0, hidden, top_k, weights, store)
        assert mode.reads == []
        # ops the host dispatches (not those inside an op: the CPU grouped_mm loops over groups internally)
        ops.append([e.name for e in prof.events() if e.name.startswith("aten::")
                    and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))])
    assert ops[0] == ops[1] and ops[0].count("aten::_grouped_mm") == 2  # the same sequence for 1 and 8 experts

    for e in range(4, 8):
        store.drop(e)
    remote = RemoteDispatcher(PoolPeer({0: peer}).remote, lambda layer, e: "peer", path="grouped")  # peer's
    # reads happen on its own thread (another process in a cluster), outside this thread's mode
    top_k = torch.randint(0, 8, (16, 2), generator=g)
    with HostReads() as mode:
        out = remote.moe_forward(0, hidden, top_k, weights, store)
    assert mode.reads == ["numpy"]
    torch.testing.assert_close(out, LocalDispatcher(path="loop").moe_forward(0, hidden, top_k, weights, peer),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("arch", "path"), [(a, "loop") for a in ARCHS] + [(a, "grouped") for a in REPRESENTATIVE])
def test_tokens_identical_to_transformers(arch, path, tiny_dir, eager_model, prompt_ids):
    """Greedy tokens of transformers (eager for the loop, its grouped_mm kernel for the grouped path), locally
    and with half the experts on a peer. Where the family keeps transformers' canonical layout the logits are
    bit-identical too (the same ops on the same rows); a transposed/interleaved/biased layout (GPT-OSS) is
    computed from canonical slabs, equal within rounding."""
    ref = eager_model(arch) if path == "loop" else AutoModelForCausalLM.from_pretrained(
        tiny_dir(arch), experts_implementation="grouped_mm").eval()
    want = _generate(ref, prompt_ids)
    exact = all(not m.is_transposed and m.is_concatenated and not m.has_bias for _, m in experts_modules(ref))

    def check_logits(model):
        with torch.no_grad():
            got, ref_logits = model(want).logits, ref(want).logits
        if exact:
            assert torch.equal(got, ref_logits)
        torch.testing.assert_close(got, ref_logits, rtol=1e-4, atol=1e-5)

    model = AutoModelForCausalLM.from_pretrained(tiny_dir(arch)).eval()
    layers = attach(model, LocalDispatcher(path=path))
    assert model.config._experts_implementation == IMPLEMENTATION
    assert [m.prism_layer for m in layers.values()] == list(range(len(layers)))
    assert torch.equal(_generate(model, prompt_ids), want)
    check_logits(model)

    here, peer_stores = _split_stores(model)
    peer = PoolPeer(peer_stores)
    attach(model, RemoteDispatcher(peer.remote, lambda layer, e: "peer", path=path), stores=here)
    assert torch.equal(_generate(model, prompt_ids), want)
    assert peer.batches and all(e % 2 == 1 for _, ids in peer.batches for e in ids.tolist())
    if path == "loop":  # grouped: the peer computes its rows with the loop (CPU), not the grouped_mm kernel
        check_logits(model)
    else:
        with torch.no_grad():
            torch.testing.assert_close(model(want).logits, ref(want).logits, rtol=1e-4, atol=1e-5)


def _tiny_gpt_oss():
    config = AutoConfig.for_model(
        "gpt_oss", vocab_size=128, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=6, num_experts_per_tok=2,
        max_position_embeddings=128, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        swiglu_limit=0.5, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    with torch.no_grad():  # large random weights and biases, so the clamps and biases matter
        for _, m in experts_modules(model):
            for p in (m.gate_up_proj, m.down_proj, m.gate_up_proj_bias, m.down_proj_bias):
                p.normal_(0, 0.5)
        for layer in model.model.layers:
            layer.mlp.router.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("path", PATHS)
def test_gpt_oss_biases_clamped_swiglu_interleaved(path):
    """GPT-OSS experts (transposed, interleaved gate/up, biases, clamped SwiGLU) against its own module."""
    model = _tiny_gpt_oss()
    module = experts_modules(model)[0][1]
    store = ExpertSlots.from_module(module, 0)
    assert store.gate.kind == "clamped_swiglu" and store.pool.has_bias
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 32, generator=g) * 3
    top_k = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(9)])
    weights = torch.rand(9, 2, generator=g)
    with torch.no_grad():
        want = type(module).forward.__wrapped__(module, hidden, top_k, weights)
        got = LocalDispatcher(path=path).moe_forward(0, hidden, top_k, weights, store)
    gate_up = hidden @ module.gate_up_proj[top_k[0, 0]] + module.gate_up_proj_bias[top_k[0, 0]]
    assert (gate_up[:, 1::2].abs() > 0.5).any()  # the up clamp is exercised
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    ids = torch.randint(3, 128, (1, 10), generator=g)
    want_tokens = model.generate(ids, max_new_tokens=8, do_sample=False)
    attach(model, LocalDispatcher(path=path))
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want_tokens)


def test_unsupported_gate_is_refused_by_name():
    class Odd(torch.nn.Module):
        has_gate, has_post_expert_norm = True, False

        def _apply_gate(self, x):
            return x

    with pytest.raises(NotImplementedError, match="Odd: its own gating"):
        ExpertSlots.from_module(Odd(), 0)


def test_observer_sees_every_layer(tiny_dir, prompt_ids):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("deepseek_v2")).eval()
    seen: list[tuple[int, int]] = []
    attach(model, LocalDispatcher(observer=lambda layer, idx: seen.append((layer, idx.shape[0]))))
    with torch.no_grad():
        model(prompt_ids)
    assert seen == [(0, prompt_ids.shape[1]), (1, prompt_ids.shape[1])]
    assert set(stores_of(model)) == {0, 1}
    detach(model)
    assert model.config._experts_implementation == "eager"
    assert not hasattr(experts_modules(model)[0][1], "prism_layer")


@pytest.mark.parametrize("path", PATHS)
def test_skip_padding_routes_padding_nowhere(path, tiny_dir, prompt_ids):
    """A right-padded batch under `skip_padding`: the padding rows reach the dispatcher as -1 (no expert, no
    count), the real tokens' logits are those of the same batch computed with the padding's experts."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("mixtral")).eval()
    seen: list[torch.Tensor] = []
    attach(model, LocalDispatcher(observer=lambda layer, idx: seen.append(idx.clone()), path=path))
    n = prompt_ids.shape[1]
    ids = torch.stack([prompt_ids[0], torch.cat([prompt_ids[0, :n - 4], torch.zeros(4, dtype=torch.long)])])
    valid = torch.ones(2, n, dtype=torch.bool)
    valid[1, n - 4:] = False
    with torch.no_grad():
        want = model(ids).logits
        seen.clear()
        with skip_padding(~valid.reshape(-1)):
            got = model(ids).logits
        model(ids)  # outside the block: every row routed again
    layers = len(experts_modules(model))
    for idx in seen[:layers]:
        assert ((idx < 0).all(dim=-1) == ~valid.reshape(-1)).all() and (idx[valid.reshape(-1)] >= 0).all()
    assert all((idx >= 0).all() for idx in seen[layers:]) and len(seen) == 2 * layers
    torch.testing.assert_close(got[valid], want[valid], rtol=1e-4, atol=1e-5)  # causal: padding is never read


def test_attach_checks_layer_map(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("deepseek_v2"))
    with pytest.raises(ValueError, match="decoder layers"):
        attach(model, LocalDispatcher(), [0, 1])
    attach(model, LocalDispatcher(), [1, 2])
    with pytest.raises(ValueError, match="experts path"):
        LocalDispatcher(path="fast")


def test_unattached_module_error(tiny_dir, prompt_ids):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("olmoe"))
    model.set_experts_implementation(IMPLEMENTATION)
    with pytest.raises(RuntimeError, match="attach"), torch.no_grad():
        model(prompt_ids)


@pytest.mark.parametrize("path", PATHS)
def test_remote_dispatcher_batches_per_server(path):
    """Experts on two peers: one call per forward, one batch per server, rows grouped by expert."""
    full, _ = _random_slots(num_experts=6, hidden=8, inter=4, held=range(6), seed=0)
    here = ExpertSlots(0, 6, SlotPool(2, 8, 4), full.gate)
    for e in (0, 1):
        here.add(e, *full.get(e))
    owner = {2: "a", 3: "a", 4: "b", 5: "b"}
    calls = []

    def remote(layer, batches):
        calls.append({s: ids.tolist() for s, (ids, _) in batches.items()})
        return {s: compute_rows(full, ids, x) for s, (ids, x) in batches.items()}  # plain tensors work too

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(7, 8, generator=g)
    top_k = torch.tensor([[0, 2], [4, 3], [5, 1], [2, 4], [1, 0], [3, 3], [5, 2]])
    w = torch.rand(7, 2, generator=g)
    out = RemoteDispatcher(remote, lambda layer, e: owner[e], path=path).moe_forward(0, hidden, top_k, w, here)
    want = LocalDispatcher(path="loop").moe_forward(0, hidden, top_k, w, full)
    if path == "loop":
        assert torch.equal(out, want)
        groups = group_by_expert(top_k)
        outputs = {e: expert_forward(full.pool, full.gate, e, hidden[r]) for e, (r, _) in groups.items()}
        assert torch.equal(combine(hidden, groups, outputs, w), out)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert len(calls) == 1 and set(calls[0]) == {"a", "b"}
    assert calls[0]["a"] == sorted(calls[0]["a"]) and set(calls[0]["a"]) == {2, 3}
    assert isinstance(RemoteDispatcher(), ExpertDispatcher)


def _cb_config():
    # Small explicit sizes: the defaults size the paged cache from device memory, slow on CPU.
    return ContinuousBatchingConfig(page_size=16, num_blocks=32, max_batch_tokens=64, max_requests_per_batch=4,
                                    use_cuda_graph=False, use_async_batching=False)


@pytest.mark.parametrize("arch", [a for a in REPRESENTATIVE if a != "deepseek_v2"])  # CB rejects MLA keys
def test_continuous_batching_identical(arch, tiny_dir, eager_model):
    ref = eager_model(arch)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir(arch)).eval()
    threads = set()
    here, peer_stores = _split_stores(model)
    peer = PoolPeer(peer_stores)
    attach(model, RemoteDispatcher(peer.remote, lambda layer, e: "peer", path="loop",
                                   observer=lambda layer, idx: threads.add(threading.current_thread().name)),
           stores=here)
    prompts = [[1, 4, 45, 292, 327, 17, 310, 300], [1, 4, 60, 70, 80], [1, 5, 100, 200, 300, 301, 302, 303, 10]]
    gen = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=2, pad_token_id=0)
    out = model.generate_batch(prompts, generation_config=gen, continuous_batching_config=_cb_config(),
                               warmup=False)
    got = [r.generated_tokens for r in out.values()]
    want = [ref.generate(torch.tensor([p]), generation_config=gen)[0, len(p):].tolist() for p in prompts]
    assert got == want
    assert threads and threading.current_thread().name not in threads  # CB runs the model on its own thread
