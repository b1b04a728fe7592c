"""Dense projections with their weight stored in half precision or int8 (Engine weight_dtype)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Linear(nn.Linear):
    """nn.Linear whose weight may be stored in half precision or as int8 (Engine weight_dtype): activations keep
    their dtype, while the matrix-vector products of decode read half or a quarter of the bytes.

    Half: the function is a half-precision linear (input and output rounded to the weight's dtype) whatever the
    rows. From UPCAST_ROWS rows on a CPU it runs as a float GEMM on the upcast weight, since CPUs without half
    arithmetic run half GEMMs several times slower, while decode batches are bound by the bytes read, where half
    wins (bench/engine_probes.py).

    int8 (quantize_int8): weight-only, symmetric, one scale per output row, as llama.cpp's Q8_0 and gpt-fast's
    int8 do. The function is a bf16 linear on the dequantised weight: bf16 input, fp32 products and sums, the
    row's scale, bf16 output. Under UPCAST_ROWS rows on a CPU it runs torch's int8 x bf16 kernel
    (torch._weight_int8pack_mm); from there on, and off the CPU, a float GEMM on the int8 weight cast to float.
    """

    UPCAST_ROWS = 64
    INT8_BLOCK = 16  # the int8 kernel's inputs come in blocks of 16: other widths crash it (segfault), so stay float

    def quantize_int8(self) -> bool:
        """Store the weight as int8 rows with a bf16 scale each (the Engine's weight_dtype=torch.int8); False,
        and the weight unchanged, where in_features is not a multiple of INT8_BLOCK."""
        if self.in_features % self.INT8_BLOCK:
            return False
        w = self.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp_min(torch.finfo(torch.float32).tiny).to(torch.bfloat16)
        q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        self.weight = nn.Parameter(q, requires_grad=False)
        self.register_buffer("weight_scale", scale)
        return True

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if w.dtype == torch.int8:
            return self._int8_forward(x)
        if w.dtype == x.dtype:
            return F.linear(x, w, self.bias)
        if w.device.type == "cpu" and x.numel() >= self.UPCAST_ROWS * x.shape[-1]:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return F.linear(x.to(w.dtype).to(x.dtype), w.to(x.dtype), bias).to(w.dtype).to(x.dtype)
        return F.linear(x.to(w.dtype), w, self.bias).to(x.dtype)

    def _int8_forward(self, x: Tensor) -> Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if x.device.type == "cpu" and rows.shape[0] < self.UPCAST_ROWS:
            y = torch._weight_int8pack_mm(rows, self.weight, self.weight_scale)
        else:
            y = (F.linear(rows.float(), self.weight.float()) * self.weight_scale.float()).to(torch.bfloat16)
        y = y.reshape(*x.shape[:-1], -1).to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)
