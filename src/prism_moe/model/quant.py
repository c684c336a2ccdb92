"""Quantized checkpoints: the formats that load (dequantized with the format's own rules) and a refusal for the rest.

Two formats are read, both dequantized on load into the model's dtype, as transformers does when it runs
them without a kernel (`dequantize=True`):

- FP8 block-scaled (`quant_method: fp8`, what DeepSeek-V3/R1 and Qwen3-FP8 ship): every quantized weight
  `W` [..., N, K] (float8_e4m3fn) has a sibling `W_scale_inv` [..., ceil(N/bn), ceil(K/bn)] and the value is
  `W[i, j] * scale_inv[i // bm, j // bn]` with `(bm, bn) = weight_block_size` (one scale per tensor when
  the block size is null). Tensors without a scale are stored unquantized (embeddings, norms, routers).
- MXFP4 (`quant_method: mxfp4`, GPT-OSS's experts): `P_blocks` [..., rows, G, 16] uint8 holds two e2m1 values
  per byte (low nibble first), `P_scales` [..., rows, G] uint8 one E8M0 exponent (bias 127) per group of 32;
  the value is `FP4[nibble] * 2 ** (scale - 127)`, giving [..., rows, 32 G], which the module holds transposed
  ([..., 32 G, rows], as transformers' `convert_moe_packed_tensors` returns it).

Anything else with a `quantization_config` is refused: loading its packed integers as weights would be silently
wrong. A checkpoint without one must not hold quantized tensors either (checked per tensor by the loader).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SUPPORTED_METHODS = ("fp8", "mxfp4")

# e2m1 values of the 16 nibbles (sign bit 3), as the OCP microscaling spec and transformers' mxfp4.py list them
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MXFP4_GROUP = 32  # values per E8M0 scale


class QuantizationError(ValueError):
    """A checkpoint's quantization cannot be loaded correctly."""


def _floating(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and dtype.itemsize >= 2


def is_quantized_dtype(dtype: torch.dtype) -> bool:
    """True for dtypes that hold quantized codes, not values (float8 variants, integers)."""
    return not _floating(dtype) and dtype != torch.bool


@dataclass(frozen=True)
class Fp8Blocks:
    """FP8 weights with one float scale per `block` tile (`None`: one scale per tensor)."""

    block: tuple[int, int] | None

    method = "fp8"

    @staticmethod
    def scale_key(key: str) -> str:
        """`x.weight` -> `x.weight_scale_inv`; a fused expert tensor `...experts.gate_up_proj` -> `..._scale_inv`."""
        return key + "_scale_inv"

    def dequantize(self, weight: Tensor, scale_inv: Tensor, dtype: torch.dtype, name: str = "") -> Tensor:
        """weight [..., N, K] (float8) and scale_inv [..., ceil(N/bm), ceil(K/bn)] -> values [..., N, K] in `dtype`."""
        if weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise QuantizationError(f"{name}: FP8 checkpoint tensor has dtype {weight.dtype}, expected float8_e4m3fn "
                                    f"(other FP8 layouts such as packed FP4 experts are not supported)")
        scale = scale_inv.to(torch.float32)
        values = weight.to(torch.float32)
        if self.block is None or scale.numel() == 1:
            if scale.numel() != 1:
                raise QuantizationError(f"{name}: per-tensor FP8 scale has shape {tuple(scale.shape)}, expected one value")
            return (values * scale.reshape(())).to(dtype)
        rows, cols = values.shape[-2:]
        bm, bn = self.block
        want = (*values.shape[:-2], -(-rows // bm), -(-cols // bn))
        if tuple(scale.shape) != want:
            raise QuantizationError(f"{name}: FP8 scale has shape {tuple(scale.shape)}, expected {want} for a weight "
                                    f"of {tuple(values.shape)} in blocks of {self.block}")
        full = scale.repeat_interleave(bm, dim=-2)[..., :rows, :].repeat_interleave(bn, dim=-1)[..., :cols]
        return (values * full).to(dtype)


@dataclass(frozen=True)
class Mxfp4:
    """MXFP4 experts: `<param>_blocks` and `<param>_scales` in place of `<param>`."""

    method = "mxfp4"

    @staticmethod
    def parts(key: str) -> tuple[str, str]:
        return key + "_blocks", key + "_scales"

    @staticmethod
    def dequantize(blocks: Tensor, scales: Tensor, dtype: torch.dtype, name: str = "") -> Tensor:
        """blocks [..., rows, G, 16] uint8, scales [..., rows, G] uint8 -> values [..., rows, 32 G] in `dtype`."""
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise QuantizationError(f"{name}: MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
        if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MXFP4_GROUP // 2:
            raise QuantizationError(f"{name}: MXFP4 blocks {tuple(blocks.shape)} do not match scales "
                                    f"{tuple(scales.shape)} (expected blocks [..., G, 16] and scales [..., G])")
        lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
        values = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1)  # [..., G, 16, 2]
        values = values.flatten(-2)  # [..., G, 32]: low nibble first
        values = torch.ldexp(values, scales.to(torch.int32).unsqueeze(-1) - 127)
        return values.flatten(-2).to(dtype)


QuantFormat = Fp8Blocks | Mxfp4


def quant_format(config: dict[str, Any], model_type: str = "") -> QuantFormat | None:
    """The quantization a checkpoint's `config.json` declares; raises `QuantizationError` for one we cannot load."""
    qc = config.get("quantization_config")
    if qc is None and isinstance(config.get("text_config"), dict):
        qc = config["text_config"].get("quantization_config")
    if qc is None:
        return None
    family = model_type or config.get("model_type", "model")
    if not isinstance(qc, dict):
        raise QuantizationError(f"{family}: quantization_config must be a JSON object, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    if method == "fp8":
        if str(qc.get("activation_scheme", "dynamic")).lower() != "dynamic":
            raise QuantizationError(f"{family}: FP8 checkpoints with activation_scheme="
                                    f"{qc.get('activation_scheme')!r} (static activation scales) are not supported; "
                                    f"only dynamic activation scaling (weight-only dequantization) is")
        if str(qc.get("expert_dtype", "fp8")).lower() != "fp8":
            raise QuantizationError(f"{family}: FP8 checkpoints with expert_dtype={qc.get('expert_dtype')!r} "
                                    f"(packed FP4 experts) are not supported")
        fmt = str(qc.get("fmt", "e4m3")).lower()
        if fmt not in ("e4m3", "float8_e4m3fn"):
            raise QuantizationError(f"{family}: FP8 format {fmt!r} is not supported (only e4m3)")
        block = qc.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, list | tuple) and len(block) == 2 and all(isinstance(b, int) and b > 0
                                                                                 for b in block)):
                raise QuantizationError(f"{family}: weight_block_size must be two positive integers, got {block!r}")
            block = (int(block[0]), int(block[1]))
        return Fp8Blocks(block)
    if method == "mxfp4":
        return Mxfp4()
    raise QuantizationError(f"{family}: checkpoint quantized with quant_method={method or '?'!r}, which prism-moe "
                            f"cannot load; supported: {', '.join(SUPPORTED_METHODS)} (FP8 block-scaled, MXFP4), or "
                            f"an unquantized checkpoint")
