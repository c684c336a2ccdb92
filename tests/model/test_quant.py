"""Quantized checkpoints: FP8 block-scaled and MXFP4 load with the format's rules; anything else is refused.

The tests write tiny quantized checkpoints themselves: FP8 with transformers' own quantizer (`Fp8Quantize`),
MXFP4 with the OCP microscaling rule (shared exponent floor(log2 amax) - 2, e2m1 elements). The reference is
independent of prism's dequantization: transformers' own dequantization (`Fp8Dequantize`,
`convert_moe_packed_tensors`) writes a plain checkpoint that plain transformers then runs.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, FineGrainedFP8Config
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from prism_moe.model.experts import experts_modules
from prism_moe.model.loading import Checkpoint, load_partial
from prism_moe.model.quant import FP4_VALUES, Fp8Blocks, Mxfp4, QuantizationError, quant_format
from prism_moe.model.spec import ModelSpec
from prism_moe.model.tiny import make_tiny_model

FP8_BLOCK = (8, 8)  # divides every tiny dimension, so transformers' own dequantization applies everywhere


def _write(path: Path, tensors: dict[str, torch.Tensor], quantization_config: dict | None) -> None:
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("quantization_config", None)
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(cfg))


def _fp8_checkpoint(arch: str, root: Path, fused: bool = False) -> tuple[Path, Path]:
    """(FP8 checkpoint, plain checkpoint dequantized by transformers' Fp8Dequantize) of a tiny `arch` model.

    `fused`: experts stored as transformers holds them in memory (`experts.gate_up_proj` [E, 2I, H] with
    `experts.gate_up_proj_scale_inv` [E, 2I/8, H/8]) instead of the hub's one tensor per expert.
    """
    fp8 = make_tiny_model(arch, root / "fp8", seed=1)
    plain = make_tiny_model(arch, root / "plain", seed=1)
    quantize = Fp8Quantize(types.SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=FP8_BLOCK)))
    dequantize = Fp8Dequantize(None)
    quantized, dequantized = {}, {}
    if fused:
        tensors = {k: v.contiguous() for k, v in AutoModelForCausalLM.from_pretrained(fp8).state_dict().items()}
    else:
        tensors = load_file(str(fp8 / "model.safetensors"))
    for key, t in tensors.items():
        if key.endswith(("proj.weight", "experts.gate_up_proj", "experts.down_proj")) and t.dim() >= 2:
            # every linear projection and the experts; embeddings, norms and routers stay unquantized
            parts = quantize._quantize_one(key, t)
            scale_key = key.removesuffix("weight") + "weight_scale_inv" if key.endswith("weight") else key + "_scale_inv"
            assert parts[key].dtype == torch.float8_e4m3fn and scale_key in parts, key
            quantized.update(parts)
            dequantized[key] = dequantize._dequantize_one(parts[key], parts[scale_key], output_dtype=t.dtype)
        else:
            quantized[key] = dequantized[key] = t
    _write(fp8, quantized, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "weight_block_size": list(FP8_BLOCK)})
    _write(plain, dequantized, None)
    return fp8, plain


@pytest.mark.parametrize(("arch", "fused"), [("deepseek_v3", False), ("qwen3_moe", False), ("qwen3_moe", True)])
def test_fp8_checkpoint_matches_transformers_dequantized(arch, fused, tmp_path, prompt_ids):
    """DeepSeek-V3 / Qwen3-FP8 style: `weight_scale_inv` beside every projection, experts included."""
    fp8, plain = _fp8_checkpoint(arch, tmp_path, fused)
    spec = ModelSpec.from_pretrained(fp8)
    ref = AutoModelForCausalLM.from_pretrained(plain, experts_implementation="eager").eval()
    held = {i: range(spec.num_experts) for i in range(spec.num_moe_layers)}
    model, _ = load_partial(fp8, held)
    with torch.no_grad():
        got = model(prompt_ids).logits
        assert torch.equal(got, load_partial(plain, held)[0](prompt_ids).logits)  # the same values, bit for bit
        assert torch.allclose(got, ref(prompt_ids).logits, rtol=1e-5, atol=1e-6)  # transformers' own forward
    want = ref.generate(prompt_ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(prompt_ids, max_new_tokens=8, do_sample=False), want)
    # a naive cast of the FP8 codes (what loading without the scales would do) is far off
    ckpt = Checkpoint.open(fp8)
    key = next(k for k in ckpt.file_of if k.endswith("o_proj.weight"))
    raw = load_file(str(fp8 / "model.safetensors"))[key].to(torch.float32)
    assert not torch.allclose(raw, load_file(str(plain / "model.safetensors"))[key], atol=1e-2)


def test_fp8_ragged_blocks_follow_the_scale_grid():
    """Shapes that blocks do not divide (DeepSeek-V3's kv_a_proj_with_mqa is 576 rows in 128-row blocks)."""
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(2, 40, 24, generator=gen) * 3).to(torch.float8_e4m3fn)
    scale = torch.rand(2, 3, 2, generator=gen) + 0.5  # ceil(40 / 16) x ceil(24 / 16)
    got = Fp8Blocks((16, 16)).dequantize(weight, scale, torch.float32)
    want = _dequantize_fp8_weight(weight.clone(), scale, [16, 16], torch.float32)
    assert torch.equal(got, want)
    with pytest.raises(QuantizationError, match=r"scale has shape \(2, 2, 2\), expected \(2, 3, 2\)"):
        Fp8Blocks((16, 16)).dequantize(weight, scale[:, :2], torch.float32)


def _mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., rows, cols] -> (blocks [..., rows, cols/32, 16] uint8, scales [..., rows, cols/32] uint8).

    OCP MX rule: one shared exponent per 32 values, X = floor(log2(amax)) - 2 (e2m1's largest exponent), elements
    rounded to the nearest e2m1 value of v / 2^X (saturating at +-6), two per byte, low nibble first.
    """
    groups = w.reshape(*w.shape[:-1], -1, 32).to(torch.float32)
    amax = groups.abs().amax(dim=-1, keepdim=True).clamp(min=2.0**-100)
    exp = torch.floor(torch.log2(amax)) - 2
    scaled = (groups / torch.exp2(exp)).clamp(-6, 6)
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(dim=-1).to(torch.uint8)  # [..., G, 32]
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks, (exp.squeeze(-1) + 127).to(torch.uint8)


def test_mxfp4_gpt_oss_experts_match_transformers_dequantized(tmp_path):
    """GPT-OSS ships its experts as `*_blocks` / `*_scales` (MXFP4), transposed [E, H, 2I] in memory."""
    src = make_tiny_model("gpt_oss", tmp_path / "src", seed=1)
    model = AutoModelForCausalLM.from_pretrained(src, experts_implementation="eager")
    fused = {k: v.contiguous() for k, v in model.state_dict().items()}  # the in-memory (fused) layout
    quantized, dequantized = {}, {}
    for key, t in fused.items():
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            blocks, scales = _mxfp4_quantize(t.transpose(1, 2))  # rows = output features, as GPT-OSS stores them
            quantized[key + "_blocks"], quantized[key + "_scales"] = blocks, scales
            dequantized[key] = convert_moe_packed_tensors(blocks, scales, dtype=t.dtype)  # transformers' rule
        else:
            quantized[key] = dequantized[key] = t
    mx, plain = make_tiny_model("gpt_oss", tmp_path / "mx", seed=1), make_tiny_model("gpt_oss", tmp_path / "plain",
                                                                                     seed=1)
    _write(mx, quantized, {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn",
                                                                             "model.layers.*.mlp.router", "lm_head"]})
    _write(plain, dequantized, None)
    ref = AutoModelForCausalLM.from_pretrained(plain, experts_implementation="eager")
    ckpt = Checkpoint.open(mx)
    assert isinstance(ckpt.quant, Mxfp4)
    with ckpt.reader() as reader:
        for layer, (_, module) in enumerate(experts_modules(ref)):
            for e in (0, 5):
                w = ckpt.expert_weights(reader, layer, e)
                gate_up = module.gate_up_proj[e].t()  # [2I, H], rows interleaved gate0, up0, gate1, ...
                assert torch.equal(w.gate_up, torch.cat([gate_up[0::2], gate_up[1::2]]))
                assert torch.equal(w.down, module.down_proj[e].t())
                bias = module.gate_up_proj_bias[e]
                assert torch.equal(w.gate_up_bias, torch.cat([bias[0::2], bias[1::2]]))
                assert torch.equal(w.down_bias, module.down_proj_bias[e])
        for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.router.bias"):
            assert torch.equal(ckpt.dense_tensor(reader, name), ref.state_dict()[name])
    # the quantization is lossy: the values really went through the format
    assert not torch.equal(ref.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj)
    # and the served model (dequantized experts in the store, GPT-OSS's expert math) runs like transformers
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    served, _ = load_partial(mx, {0: range(8), 1: range(8)})
    with torch.no_grad():
        assert torch.allclose(served(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(served.generate(ids, max_new_tokens=6, do_sample=False),
                       ref.generate(ids, max_new_tokens=6, do_sample=False))


def test_other_quantizations_are_refused(tmp_path):
    path = make_tiny_model("qwen3_moe", tmp_path / "q", seed=1)
    tensors = load_file(str(path / "model.safetensors"))
    for qc, msg in [({"quant_method": "gptq", "bits": 4}, r"qwen3_moe: checkpoint quantized with quant_method='gptq'"),
                    ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "supported: fp8, mxfp4"),
                    ({"quant_method": "fp8", "activation_scheme": "static"}, "static activation scales"),
                    ({"quant_method": "fp8", "weight_block_size": [128]}, "two positive integers")]:
        _write(path, tensors, qc)
        with pytest.raises(QuantizationError, match=msg):
            load_partial(path, {0: [0]})
    assert quant_format({"model_type": "x"}) is None


def test_quantized_tensors_are_never_loaded_as_values(tmp_path):
    fp8, _ = _fp8_checkpoint("qwen3_moe", tmp_path)
    tensors = load_file(str(fp8 / "model.safetensors"))
    cfg = json.loads((fp8 / "config.json").read_text())["quantization_config"]
    _write(fp8, tensors, None)  # scales present, quantization_config gone
    with pytest.raises(QuantizationError, match="is an FP8 scale but config.json declares no quantization_config"):
        load_partial(fp8, {0: [0]})
    key = next(k for k in tensors if k.endswith("o_proj.weight"))
    del tensors[key + "_scale_inv"]  # an FP8 weight without its scale
    _write(fp8, tensors, cfg)
    with pytest.raises(QuantizationError, match=rf"{key}.* holds torch.float8_e4m3fn codes"):
        load_partial(fp8, {0: [0]})
