"""Depth-1 inference through torch's own LSTM kernel (what ``nn.LSTM`` calls: oneDNN on CPU,
cuDNN on CUDA), which gives exactly ``nn.LSTM``'s numbers.

It covers the standard LSTM (sigmoid gates, tanh candidate and cell) on unpacked input in either
direction, and packed input in forward order whose rows all have at least one step (what
``pack_padded_sequence`` accepts). Inside the op it runs inference; in eager mode the entry point
also trains with it, outside the op, through torch's own autograd (inside, the op's backward
needs its saved-tensor layout, which torch's kernel does not give).
"""

from __future__ import annotations

import torch
from torch import Tensor

from nestrnn.ops.common.levels import LevelActivations, LevelWeights

LSTM_ACTIVATIONS = (LevelActivations("sigmoid", "tanh", "tanh"),)


def unavailable_reason(
    x: Tensor, batch_sizes: Tensor | None, reverse: bool, activations: tuple[LevelActivations, ...]
) -> str | None:
    """Why torch's LSTM cannot run this call (None when it can)."""
    if tuple(activations) != LSTM_ACTIVATIONS:
        return "it runs one standard LSTM level only"
    if x.shape[0] == 0:
        return "the sequence is empty"
    if batch_sizes is not None and (reverse or int(batch_sizes[0]) != x.shape[1]):
        return "packed input must be in forward order with every row active at the first step"
    return None


def forward(
    x: Tensor, w: LevelWeights, h0: Tensor, c0: Tensor, batch_sizes: Tensor | None, reverse: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Output (T, B, H), h_n (B, H), c_n (1, B, H) of one LSTM direction (differentiable by
    torch's autograd when called outside the op)."""
    has_bias = w.bias_ih is not None or w.bias_hh is not None
    params = [w.weight_ih, w.weight_hh]
    if has_bias:  # a lone missing bias is a zero bias
        zero = w.weight_hh.new_zeros(w.weight_hh.shape[0])
        params += [zero if b is None else b for b in (w.bias_ih, w.bias_hh)]
    hx = (h0.unsqueeze(0), c0)
    train = torch.is_grad_enabled()  # the kernel keeps what its backward needs
    if batch_sizes is None:
        xs = x.flip(0) if reverse else x
        out, h_n, c_n = torch._VF.lstm(xs, hx, params, has_bias, 1, 0.0, train, False, False)
        return (out.flip(0) if reverse else out), h_n[0], c_n
    steps, batch = x.shape[0], x.shape[1]
    lengths = (batch_sizes.unsqueeze(1) > torch.arange(batch)).sum(0)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=True)
    data, h_n, c_n = torch._VF.lstm(
        packed.data, packed.batch_sizes, hx, params, has_bias, 1, 0.0, train, False
    )
    out, _ = torch.nn.utils.rnn.pad_packed_sequence(
        torch.nn.utils.rnn.PackedSequence(data, packed.batch_sizes), total_length=steps
    )
    return out, h_n[0], c_n
