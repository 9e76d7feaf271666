"""Grouped matmul on torch: `torch.nn.functional.grouped_mm`.

torch's own autograd of `grouped_mm` fails on some layouts (a weight
gradient of rows sorted by group on the CPU, for one); the three products
are written out here instead, each one more `grouped_mm` call: the input
gradient against the transposed weights, the weight gradient as the 2-D x
2-D form that splits the contraction by the same offsets.
"""

import torch


def available():
    return hasattr(torch.nn.functional, "grouped_mm")


def _offsets(sizes):
    return torch.cumsum(sizes.to(torch.int32), 0, dtype=torch.int32)


def _zero_past_groups(y, sizes):
    # Rows past the last group are left unwritten by the kernel.
    rows = torch.arange(y.shape[0], device=y.device)
    return torch.where((rows < sizes.sum())[:, None], y, torch.zeros_like(y))


class _GroupedMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, sizes):
        ctx.save_for_backward(x, w, sizes)
        offsets = _offsets(sizes)
        y = torch.nn.functional.grouped_mm(x, w, offs=offsets)
        return _zero_past_groups(y, sizes)

    @staticmethod
    def backward(ctx, dy):
        x, w, sizes = ctx.saved_tensors
        offsets = _offsets(sizes)
        dy = dy.contiguous()
        dx = torch.nn.functional.grouped_mm(
            dy, w.transpose(-2, -1), offs=offsets
        )
        dw = torch.nn.functional.grouped_mm(x.transpose(0, 1), dy, offs=offsets)
        return _zero_past_groups(dx, sizes), dw, None


def grouped_mm(x, w, sizes):
    if x.shape[0] == 0:
        return x.new_zeros((0, w.shape[-1]))
    return _GroupedMatmul.apply(x.contiguous(), w.contiguous(), sizes)


def cuda_capability():
    """`(major, minor)` of the current CUDA device, or `None`."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()
