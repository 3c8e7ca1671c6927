"""The character-level LSTM of the loss-aware papers (§3.7): one-hot input, 1x512 LSTM, FP softmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.models.registry import register

__all__ = ["CharLSTM"]


class CharLSTM(nn.Module):
    """``one_hot(x) -> LSTM(hidden, layers) -> Linear(vocab)``; input (B, T) int ids, output (B, T, vocab).

    Init as the Lasagne code: LSTM weights U(-0.08, 0.08), forget-gate bias 1 (PyTorch's gate order
    is input, forget, cell, output; the bias lives in ``bias_ih``), output layer Normal(0, 0.01).
    ``num_classes`` is the vocabulary size; ``input_shape`` is ``(seq_len,)``.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (100,),
        num_classes: int = 128,
        hidden: int = 512,
        layers: int = 1,
    ) -> None:
        super().__init__()
        if len(tuple(input_shape)) != 1:
            raise ValueError(
                f"char_lstm takes sequences of character ids, input shape (T,); got {tuple(input_shape)}"
            )
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.lstm = nn.LSTM(num_classes, hidden, layers, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)
        with torch.no_grad():
            for name, p in self.lstm.named_parameters():
                if name.startswith("weight"):
                    p.uniform_(-0.08, 0.08)
                elif name.startswith("bias_ih"):
                    p.zero_()
                    p[hidden : 2 * hidden] = 1.0
                else:
                    p.zero_()
            nn.init.normal_(self.fc.weight, 0.0, 0.01)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype.is_floating_point:
            raise TypeError(
                f"char_lstm expects integer character ids of shape (B, T), got {x.dtype} {tuple(x.shape)}"
            )
        out, _ = self.lstm(F.one_hot(x.long(), self.num_classes).float())
        return self.fc(out)


register(
    "char_lstm",
    "character LSTM 1x512, one-hot input, FP softmax output (§3.7)",
    (100,),
    128,
    task="sequence",
)(CharLSTM)
