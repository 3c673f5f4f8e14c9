"""Weight-only quantized linear layers: int8 per output channel, int4 per group of input columns.

Weights are quantized once, on load; activations stay in the model's dtype. int8 is symmetric
(w ≈ q · scale, q in [-127, 127]); int4 is asymmetric per group of `group_size` input columns
(w ≈ q · scale + minimum, q in [0, 15], two values packed per byte), which keeps a group's outliers
from wasting half the range. That is the grid of GGUF's Q4_1 blocks, so a Q4_1 checkpoint re-quantized
with group size 32 keeps its own values.

Matmul, where the weights are read packed (the point of quantizing a memory-bound decode step):
- GPU, half precision, int8: one row (batch-1 decode) through our matrix-vector kernel
  (`layers/decode_gemv.py`), more rows through our tile kernel (`int8_triton.py`).
- GPU, half precision, int4: PyTorch's tinygemm kernel (`torch._weight_int4pack_mm`, bf16, scale and
  zero point per group), its packed layout made once, on the first call; where tinygemm cannot take the
  layer's shape, our matrix-vector kernel for one row.
- CPU, a few rows: int8 through `torch._weight_int8pack_mm`.
A batch-1 decode step on the GPU calls that matrix-vector kernel itself, its blocks' norms and residual
adds folded in.
Otherwise the weight is dequantized per call into the activation dtype and multiplied: exact to the
quantized values and graph-safe, but slower than full precision.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecInferError

MODES = ("int8", "int4")
# torch's CPU int8 kernel beats dequantizing only for a few rows (decode); measured on 2 x86 cores:
# 1 row 0.57 vs 3.2 ms, 16 rows 9.0 vs 4.0 ms for a 576 x 1536 layer.
INT8_KERNEL_MAX_ROWS = 8


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (int8 [out, in], fp32 scale [out])."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float -> (uint8 [out, in/2] two 4-bit values per byte, fp32 scale and minimum [out, in/group]).

    The scale and minimum are rounded to fp16 values (as GGUF's Q4_1 stores them) before the weights are
    placed on their grid, so kernels that read the groups in fp16 (layers/decode_gemv.py) compute with
    exactly the weights every other path dequantizes."""
    out_features, in_features = weight.shape
    if in_features % group_size or group_size % 2:
        raise SpecInferError(f"int4 needs in_features ({in_features}) to be a multiple of the group size {group_size}")
    w = weight.float().view(out_features, in_features // group_size, group_size)
    low, high = w.amin(-1), w.amax(-1)
    scale = ((high - low) / 15.0).half().float().clamp_min(2.0**-24)  # the smallest fp16 above zero
    low = low.half().float()
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.view(out_features, in_features)), scale, low


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """[out, in] uint8 in 0..15 -> [out, in / 2], column 2i in the low nibble, 2i + 1 in the high one."""
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_int4`."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(packed.shape[0], -1)


class QuantizedLinear(nn.Module):
    """Drop-in for `nn.Linear` (inference only) holding quantized weights as buffers."""

    def __init__(self, linear: nn.Linear, mode: str, group_size: int = 64, int4_values=None) -> None:
        """`int4_values`: (values [out, in] uint8 0..15, scale, minimum [out, in / group_size]) already
        quantized elsewhere (a GGUF file's Q4_1 blocks): taken as they are, `linear`'s weight unused."""
        super().__init__()
        if mode not in MODES:
            raise SpecInferError(f"quantization must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode, self.group_size = mode, group_size
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach()
        if mode == "int8":
            q, scale = quantize_int8(weight)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
        else:
            if int4_values is None:
                packed, scale, minimum = quantize_int4(weight, group_size)
            else:
                values, scale, minimum = (t.to(weight.device) for t in int4_values)
                if values.shape != weight.shape or scale.shape != (self.out_features, self.in_features // group_size):
                    raise SpecInferError(f"int4 values of shape {tuple(values.shape)} do not fit a {tuple(weight.shape)} layer")
                packed = pack_int4(values)
            self.register_buffer("qweight", packed)
            self.register_buffer("scale", scale)
            self.register_buffer("minimum", minimum)
            self._keep_half_groups()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @classmethod
    def concat(cls, layers: list[QuantizedLinear]) -> QuantizedLinear:
        """One layer whose output is the outputs of `layers` (same mode, group size and input width)."""
        first = layers[0]
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.mode, fused.group_size, fused.in_features = first.mode, first.group_size, first.in_features
        fused.out_features = sum(layer.out_features for layer in layers)
        names = ("qweight", "scale") + (("minimum",) if first.mode == "int4" else ())
        for name in names:
            fused.register_buffer(name, torch.cat([getattr(layer, name) for layer in layers]))
        if first.mode == "int4":
            fused._keep_half_groups()
        biases = [layer.bias for layer in layers]
        fused.bias = None if biases[0] is None else nn.Parameter(torch.cat(biases), requires_grad=False)
        return fused

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight the layer computes with, [out, in] in `dtype`."""
        if self.mode == "int8":
            return (self.qweight.to(torch.float32) * self.scale[:, None]).to(dtype)
        groups = unpack_int4(self.qweight).view(self.out_features, -1, self.group_size).to(torch.float32)
        w = groups * self.scale[..., None] + self.minimum[..., None]
        return w.view(self.out_features, self.in_features).to(dtype)

    @torch.compiler.disable  # its kernels are already fused; the packed layout is built lazily
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        out = None
        if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            from ..layers.decode_gemv import decode_product, foldable  # Triton comes with CUDA builds of torch only

            if flat.shape[0] == 1 and foldable(self):  # one row (a decode step's LM head, say): our kernel
                out = decode_product(flat, self)
            elif self.mode == "int8":
                from .int8_triton import int8_matmul

                out = int8_matmul(flat.contiguous(), self.qweight, self.scale)
            elif self._tinygemm() is not None:
                weight, scales_and_zeros = self._tinygemm()
                out = torch._weight_int4pack_mm(flat.to(torch.bfloat16).contiguous(), weight, self.group_size,
                                                scales_and_zeros).to(x.dtype)
        elif self.mode == "int8" and x.device.type == "cpu" and flat.shape[0] <= INT8_KERNEL_MAX_ROWS:
            out = torch._weight_int8pack_mm(flat, self.qweight, self.scale.to(x.dtype))
        if out is None:
            return F.linear(x, self.dequantized(x.dtype), self.bias)
        out = out.view(*x.shape[:-1], -1)
        return out if self.bias is None else out + self.bias

    def half_groups(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """int4: the scale and minimum in fp16, for kernels that read them beside each strip of weights
        (layers/decode_gemv.py), where fp32 would add 8 bytes a group to the 64 of a 128-wide group; None
        where fp16 cannot hold them exactly (groups given by a caller), so that no kernel rounds them."""
        return (self.scale_half, self.minimum_half) if self.groups_exact_in_half else None

    def _keep_half_groups(self) -> None:
        # Buffers, so that they follow the layer's moves, but not saved: they are derived.
        self.register_buffer("scale_half", self.scale.half(), persistent=False)
        self.register_buffer("minimum_half", self.minimum.half(), persistent=False)
        self.groups_exact_in_half = bool(
            torch.equal(self.scale_half.float(), self.scale) and torch.equal(self.minimum_half.float(), self.minimum)
        )

    def _tinygemm(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The int4 weights in tinygemm's layout (built once), or None where its kernel cannot take them."""
        if not hasattr(self, "_tinygemm_weights"):
            self._tinygemm_weights = None
            tiles = next((t for t in (8, 4, 2) if self.in_features % (t * 16) == 0), None)
            if self.group_size in (32, 64, 128, 256) and self.out_features % 8 == 0 and tiles is not None:
                q = unpack_int4(self.qweight)
                packed = ((q[:, 0::2] << 4) | q[:, 1::2]).to(torch.uint8)  # tinygemm: even column in the high nibble
                weight = torch._convert_weight_to_int4pack(packed.contiguous(), tiles)
                # tinygemm computes (q - 8) * scale + zero: our minimum is zero - 8 * scale.
                zeros = self.minimum + 8 * self.scale
                scales_and_zeros = torch.stack((self.scale.t(), zeros.t()), dim=-1).to(torch.bfloat16).contiguous()
                self._tinygemm_weights = (weight, scales_and_zeros)
        return self._tinygemm_weights

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{group}"


def quantize_model(model: nn.Module, mode: str, group_size: int = 64, int4_blocks: dict | None = None,
                   lm_head: bool = False) -> nn.Module:
    """Replace every linear layer inside the transformer blocks with its quantized form, in place. The
    embedding stays in full precision (a step reads one row of it); the LM head too unless `lm_head`:
    it sets the logits, and for a 7B model it is some 7% of an int4 step's bytes. A head tied to the
    embedding gets a quantized copy of its own.

    `int4_blocks` (mode int4): {parameter name: (values, scale, minimum)} of layers whose 4-bit values
    come ready-made, from a GGUF file's Q4_1 blocks (group size 32, whatever `group_size` says); they keep
    the file's values exactly instead of being re-quantized from their dequantized weights."""
    int4_blocks = int4_blocks if mode == "int4" else None
    for index, block in enumerate(model.layers):
        for name, module in list(block.named_modules()):
            if isinstance(module, nn.Linear):
                parent_name, _, child = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                ready = (int4_blocks or {}).get(f"layers.{index}.{name}.weight")
                size = group_size if ready is None else module.in_features // ready[1].shape[1]
                setattr(parent, child, QuantizedLinear(module, mode, size, int4_values=ready))
    if lm_head:
        model.lm_head = QuantizedLinear(model.lm_head, mode, group_size)
    return model
