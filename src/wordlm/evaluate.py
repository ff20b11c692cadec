"""Loss, perplexity, bits per token and word-level perplexity, with the LSTM state carried through the text."""

from __future__ import annotations

import contextlib
import math

import torch

from .data import EncodedSplit, Streams
from .model import LSTMLanguageModel


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def total_nll(model: LSTMLanguageModel, streams: Streams, seq_len: int = 70,
              precision: str = "fp32") -> tuple[float, int]:
    """Summed negative log-likelihood (nats) over every target of `streams`, and the number of targets.

    The state is never reset: each stream is read from start to end as one context.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    state = model.init_state(streams.batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with autocast(device, precision):
        for row in range(0, streams.rows - 1, seq_len):
            x, y = streams.window(row, seq_len)
            nll, state = model.nll(x, y, state)
            total += nll.sum(dtype=torch.float64)
    model.train(was_training)
    return total.item(), streams.targets


def report(nll: float, targets: int, split: EncodedSplit | None = None, subword: bool = False) -> dict:
    """The figures users read. For subword tokenizers also word-level perplexity: the same total loss spread
    over the split's words (whitespace words plus one per line end, the unit PTB/WikiText results count), so
    it compares across tokenizers. When streams dropped a tail, the loss is scaled to the whole split."""
    loss = nll / targets
    out = {"loss": loss, "ppl": math.exp(loss), "bits_per_token": loss / math.log(2), "tokens": targets}
    if split is not None and subword:
        total_for_split = loss * split.tokens
        out["words"] = split.words
        out["word_ppl"] = math.exp(total_for_split / split.words)
    return out
