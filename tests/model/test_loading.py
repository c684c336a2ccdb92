"""Partial loading: dense part + held experts only, exact results, memory that matches what is held."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prism_moe.model import onednn
from prism_moe.model.experts import (
    LocalDispatcher,
    MissingExpertError,
    RemoteDispatcher,
    attach,
    experts_modules,
    stores_of,
)
from prism_moe.model.grouped import compute_rows
from prism_moe.model.loading import load_expert_weights, load_partial, resident_weight_bytes
from prism_moe.model.slots import NoFreeSlotError
from prism_moe.model.spec import ModelSpec
from prism_moe.model.tiny import ARCHS, make_tiny_model

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _bytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v2"])
def test_resident_memory_is_dense_plus_held(arch, packed, tiny_dir, eager_model):
    """k of E experts per layer -> dense + k/E of the expert bytes, measured on real storages (oneDNN-packed
    experts: their packed tensors' bytes)."""
    full = eager_model(arch)
    mods = [m for _, m in experts_modules(full)]
    expert_bytes = _bytes(t for m in mods for t in (m.gate_up_proj, m.down_proj))
    dense_bytes = _bytes(p for p in full.parameters()) - expert_bytes
    num_experts = mods[0].gate_up_proj.shape[0]
    ratios = {}
    for k in (0, 1, num_experts // 2, num_experts):
        model, stores = load_partial(tiny_dir(arch), {i: range(k) for i in range(len(mods))}, packed=packed)
        assert all(s.pool.packed == (packed and onednn.usable("cpu", torch.float32)) for s in stores.values())
        want = dense_bytes + k / num_experts * expert_bytes
        ratios[k] = resident_weight_bytes(model, stores) / want
        assert all(s.held == list(range(k)) for s in stores.values())
    assert all(abs(r - 1) < 0.05 for r in ratios.values()), ratios


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch", ARCHS)
def test_two_partial_servers_generate_like_eager(arch, device, tiny_dir, eager_model, prompt_ids):
    """Server A holds experts {0..E/2-1}, server B the rest; A serves, B computes A's missing experts. B keeps
    its experts oneDNN-packed where it can (what `prism serve` does on a CPU), A keeps dense slabs."""
    path = tiny_dir(arch)
    spec = ModelSpec.from_pretrained(path)
    half = spec.num_experts // 2
    a, a_stores = load_partial(path, {i: range(half) for i in range(spec.num_moe_layers)}, device=device)
    _, b_stores = load_partial(path, {i: range(half, spec.num_experts) for i in range(spec.num_moe_layers)},
                               device=device, packed=True)
    sent = set()

    def remote(layer, batches):
        sent.update((layer, e) for ids, _ in batches.values() for e in ids.tolist())
        return {s: compute_rows(b_stores[layer], ids, x) for s, (ids, x) in batches.items()}

    ref = eager_model(arch).to(device)
    try:
        ids = prompt_ids.to(device)
        want = ref.generate(ids, max_new_tokens=12, do_sample=False)
        with pytest.raises(MissingExpertError, match="does not hold|not hold"):  # default: local only
            a.generate(ids, max_new_tokens=2, do_sample=False)
        attach(a, RemoteDispatcher(remote, lambda layer, e: "B"), spec, a_stores)
        assert torch.equal(a.generate(ids, max_new_tokens=12, do_sample=False), want)
        assert sent and all(e >= half for _, e in sent)
        assert all(p.device.type == device for p in a.parameters())
    finally:
        ref.to("cpu")


def test_layouts_sharded_fused_and_tied(tmp_path, tiny_dir, prompt_ids):
    """Sharded index, fused on-disk experts, tied embeddings: all load to the same model."""
    tied = make_tiny_model("qwen3_moe", tmp_path / "tied", tie_word_embeddings=True)
    ref = AutoModelForCausalLM.from_pretrained(tied, experts_implementation="eager")
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    ref.save_pretrained(tmp_path / "fused", save_original_format=False)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    want = ref.generate(prompt_ids, max_new_tokens=8, do_sample=False)
    module = ref.model.layers[1].mlp.experts
    for folder in ("tied", "sharded", "fused"):
        model, stores = load_partial(tmp_path / folder, {0: range(8), 1: range(8)})
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert torch.equal(model.generate(prompt_ids, max_new_tokens=8, do_sample=False), want), folder
        w = load_expert_weights(tmp_path / folder, 1, 5)
        assert torch.equal(w["gate_up_proj"], module.gate_up_proj[5]) and torch.equal(w["down_proj"],
                                                                                       module.down_proj[5])


def test_only_held_experts_are_loaded(tiny_dir, eager_model, prompt_ids):
    path = tiny_dir("deepseek_v2")  # MoE layer 0 is decoder layer 1
    model, stores = load_partial(path, {0: [1, 6], 1: [2]})
    assert {i: s.held for i, s in stores.items()} == {0: [1, 6], 1: [2]}
    ref_mod = eager_model("deepseek_v2").model.layers[1].mlp.experts
    assert torch.equal(stores[0].get(6)[0], ref_mod.gate_up_proj[6])
    for _, m in experts_modules(model):  # the transformers modules hold no expert memory
        assert m.gate_up_proj.numel() == 0 and m.down_proj.numel() == 0
    with pytest.raises(MissingExpertError, match=r"MoE layer 0: experts \[3\] are not held"):
        compute_rows(stores[0], torch.tensor([3]), torch.zeros(1, 64))
    with pytest.raises(MissingExpertError, match="MoE layer 0: tokens routed to experts"):
        model(prompt_ids)

    attach(model, LocalDispatcher())  # swapping the dispatcher keeps the loaded stores
    assert {i: s.held for i, s in stores_of(model).items()} == {0: [1, 6], 1: [2]}

    # live migration: fetch an expert from the checkpoint; the slots (by default exactly the held experts,
    # shared by the layers) are full, so drop one first
    w = load_expert_weights(path, 1, 7)
    with pytest.raises(NoFreeSlotError, match="all 3 slots"):
        stores[1].add(7, w["gate_up_proj"], w["down_proj"])
    stores[1].drop(2)
    stores[1].add(7, w["gate_up_proj"], w["down_proj"])
    assert stores[1].held == [7]
    _, more = load_partial(path, {0: [1]}, capacity=2)
    more[1].add(7, w["gate_up_proj"], w["down_proj"])
    assert more[0].held == [1] and more[1].held == [7]
    with pytest.raises(ValueError, match="out of range"):
        load_partial(path, {2: [0]})
    with pytest.raises(ValueError, match="out of range"):
        load_partial(path, {0: [8]})


@pytest.mark.skipif(not onednn.usable("cpu", torch.float32), reason="torch without oneDNN")
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v2", "gpt_oss"])
def test_packed_load_computes_like_eager(arch, tiny_dir, eager_model, prompt_ids):
    """`packed=True` (what `prism serve` loads on a CPU): experts and dense linear layers oneDNN-packed, a tied
    LM head left dense; logits equal the eager model's within float32 rounding, greedy tokens identical."""
    spec = ModelSpec.from_pretrained(tiny_dir(arch))
    model, stores = load_partial(tiny_dir(arch), {i: range(spec.num_experts) for i in range(spec.num_moe_layers)},
                                 packed=True)
    ref = eager_model(arch)
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear]
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert linears and all(m.weight.is_mkldnn != (tied and m is model.get_output_embeddings()) for m in linears)
    assert all(s.pool.packed for s in stores.values())
    with torch.no_grad():
        torch.testing.assert_close(model(prompt_ids).logits, ref(prompt_ids).logits, rtol=1e-4, atol=1e-4)
    want = ref.generate(prompt_ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(prompt_ids, max_new_tokens=8, do_sample=False), want)
