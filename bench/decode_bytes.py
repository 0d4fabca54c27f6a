"""Bytes a batch-1 greedy decode step actually reads, for the bandwidth fractions of bench/decode.py and
bench/serve.py.

A step reads every linear layer in full (plus the LayerNorms and one embedding row), except the lm_head on
phiforge's greedy path: its decode plan reads a smaller copy of it (phiforge.decode.ArgmaxScreen: int8 codes with
a scale and a bias per row, or a bf16 copy), recomputes only the candidate rows in the lm_head's dtype, and reads
the full lm_head only on the steps the screen cannot decide. `count_screen` counts candidate rows and fallbacks
over real decode steps (run it on an untimed generation: the count is deterministic for a prompt), and
`bytes_per_token` turns the count into bytes. The benches run as scripts, so this is imported as `decode_bytes`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch.nn as nn


@dataclass
class ScreenCount:
    """What a screen did over some decode steps: rows screened, candidate rows recomputed, fallbacks."""

    steps: int = 0
    rows: int = 0
    fallbacks: int = 0


@contextlib.contextmanager
def count_screen(screen) -> Iterator[ScreenCount]:
    """Count, while inside, the rows `screen` recomputes from the lm_head and the steps it gives up on."""
    count = ScreenCount()
    weight, argmax = screen.weight, screen.argmax

    class Rows:  # the screen reads candidate rows as `weight[idx]` and nothing else after it is built
        def __getitem__(self, idx):
            count.rows += len(idx)
            return weight[idx]

    def counted(h):
        tok = argmax(h)
        count.steps += h.shape[0]
        count.fallbacks += h.shape[0] if tok is None else 0
        return tok

    screen.weight, screen.argmax = Rows(), counted
    try:
        yield count
    finally:
        screen.weight = weight
        del screen.argmax  # the class's method again


def screen_bytes(screen) -> int:
    """Bytes of the screen's own copy read every step (its codes or bf16 weight, scales and bias)."""
    if screen.kind == "int8":
        return screen.q.numel() + 4 * screen.scale.numel() + 4 * screen.bias32.numel()
    return 2 * screen.weight.numel() + screen.bias.numel() * screen.bias.element_size()


def linear_bytes(layer: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in layer.parameters())


def bytes_per_token(full: int, lm_head: nn.Module, screen, count: ScreenCount | None) -> float:
    """`full` (every weight read in full, e.g. serve.quant.weight_bytes_per_token) with the lm_head counted as
    the greedy path read it: the screen's copy, the candidate rows and the fallbacks, per step."""
    if screen is None or count is None or count.steps == 0:
        return float(full)
    head = linear_bytes(lm_head)
    w = screen.weight
    row = w.shape[1] * w.element_size() + screen.bias.element_size()
    per_step = screen_bytes(screen) + (count.rows * row + count.fallbacks * head) / count.steps
    return full - head + per_step


def dynamic_int8_bytes(model: nn.Module) -> int:
    """Bytes a step of `torch.ao.quantization.quantize_dynamic`'s int8 version of `model` (an fp32 model,
    before quantizing) reads: int8 linear weights, fp32 biases and LayerNorms, one fp32 embedding row."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() + (4 * m.bias.numel() if m.bias is not None else 0)
        elif isinstance(m, nn.LayerNorm):
            total += sum(4 * p.numel() for p in m.parameters())
        elif isinstance(m, nn.Embedding):
            total += 4 * m.weight.shape[1]
    return total
