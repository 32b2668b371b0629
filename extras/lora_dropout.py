"""LoRA's input dropout with a 1-bit mask: the same maths as lora.LoRALinear, less activation memory in training.

An adapter computes A(dropout(x)). Left to autograd, dropout keeps its bool mask for backward (1 byte an element)
and A's weight gradient keeps the dropped copy of x (2 bytes in bf16), for each of a Llama block's seven adapters,
though q, k and v read the same x, and gate and up too: 3 bytes an element per adapter. Here A and its dropout are
one autograd function that keeps x itself (one tensor, shared by the adapters that read it) and the mask packed
eight elements to a byte; backward rebuilds the dropped copy from the two. For q, k and v that is 2 + 3/8 bytes an
element of x instead of 9. The distribution is nn.Dropout's: each element is kept with probability 1 - p and scaled
by 1 / (1 - p).

    pack_lora_dropout(model)   every adapter with dropout (in_features a multiple of 8): its lora_A becomes a
                               DropoutLinear sharing the same weight (names unchanged) and its nn.Dropout goes

train.py calls it before training; evaluation mode is the plain A(x).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import LoRALinear


def pack_bits(keep):
    """bool (..., n), n a multiple of 8 -> uint8 (..., n / 8): element 8i + j is bit j of byte i."""
    shifts = torch.arange(8, dtype=torch.uint8, device=keep.device)
    return (keep.unflatten(-1, (-1, 8)).to(torch.uint8) << shifts).sum(-1, dtype=torch.uint8)


def unpack_bits(packed):
    """pack_bits' inverse: uint8 (..., m) -> bool (..., 8 m)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).bool().flatten(-2)


class DropoutThenLinear(torch.autograd.Function):
    """F.linear(dropout(x, p), weight), saving x and a packed mask instead of the dropped x and a bool mask."""

    @staticmethod
    def forward(ctx, x, weight, p):
        keep = torch.empty_like(x).bernoulli_(1 - p).bool()  # drawn as nn.Dropout draws: compared in fp32
        ctx.scale = 1 / (1 - p)
        ctx.save_for_backward(x, weight, pack_bits(keep))
        return F.linear(x * keep * ctx.scale, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight, packed = ctx.saved_tensors
        keep = unpack_bits(packed).view(x.shape)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight) * keep * ctx.scale  # dropout's backward: the same mask and scale
        if ctx.needs_input_grad[1]:
            dropped = x * keep * ctx.scale  # rebuilt, as forward computed it
            grad_w = grad.flatten(0, -2).T @ dropped.flatten(0, -2)  # (r, in)
        return grad_x, grad_w, None


class DropoutLinear(nn.Linear):
    """A bias-free nn.Linear that applies dropout p to its input in training mode (DropoutThenLinear)."""

    p = 0.0

    def forward(self, x):
        if not (self.training and self.p > 0):
            return super().forward(x)
        return DropoutThenLinear.apply(x, self.weight, self.p)

    def extra_repr(self):
        return f"{super().extra_repr()}, dropout={self.p}"


def pack_lora_dropout(model):
    """Move each LoRA layer's input dropout into its lora_A (see the module doc); returns how many were moved."""
    moved = 0
    for m in model.modules():
        if isinstance(m, LoRALinear) and m.r > 0 and m.dropout_p > 0 and m.in_features % 8 == 0 \
                and type(m.lora_A) is nn.Linear:
            a = DropoutLinear(m.in_features, m.r, bias=False, device="meta")
            a.weight, a.p = m.lora_A.weight, m.dropout_p  # the same Parameter: optimizer and checkpoints see no change
            m.lora_A, m.dropout = a, nn.Identity()
            moved += 1
    return moved
