"""Sampling as small pure functions over logits, and the token-by-token generation loop."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .errors import UsageError, arg
from .model import LSTMLanguageModel, State


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Refuse sampling arguments that mean nothing, naming them as the Python API's keywords (or, inside the CLI's
    `errors.options`, as the command line's options)."""
    t, k, p, greedy = arg("temperature"), arg("top_k"), arg("top_p"), arg("top_k", 1)
    problems = []
    if not temperature > 0:
        problems.append(f"{t} must be > 0, got {temperature} (use {greedy} for greedy decoding)")
    if top_k < 0:
        problems.append(f"{k} must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        problems.append(f"{p} must be in (0, 1], got {top_p}")
    if problems:
        raise UsageError("; ".join(problems))


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """Divide logits by T: T < 1 sharpens the distribution, T > 1 flattens it."""
    return logits / temperature


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits along the last axis, set the rest to -inf (k = 0 keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose probabilities sum to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    # Drop a token when the tokens ranked above it already reach p (so the top token always stays).
    drop_sorted = probs.cumsum(-1) - probs >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """Draw one token id per row of `logits` (..., V) after temperature, top-k and top-p."""
    logits = top_p_filter(top_k_filter(apply_temperature(logits.float(), temperature), top_k), top_p)
    probs = logits.softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


@torch.no_grad()
def continue_ids(model: LSTMLanguageModel, context: list[int], max_tokens: int, *, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 num_samples: int = 1) -> Iterator[Tensor]:
    """Yield `max_tokens` steps of (num_samples,) sampled ids continuing `context`.

    The context is read once; after that each new token costs one LSTM step on the carried state.
    """
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed if seed is not None else torch.seed())
    ids = torch.tensor(context, dtype=torch.long, device=device).unsqueeze(1).expand(-1, num_samples)
    logits, state = model(ids, model.init_state(num_samples))  # (T, N, V)
    last: Tensor = logits[-1]
    for _ in range(max_tokens):
        nxt = sample(last, temperature, top_k, top_p, gen)  # (N,)
        yield nxt
        logits, state = model(nxt.unsqueeze(0), state)
        last = logits[0]


@torch.no_grad()
def read_context(model: LSTMLanguageModel, context: list[int]) -> tuple[Tensor, State]:
    """Log-probabilities of the next token after `context`, and the state there."""
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor(context, dtype=torch.long, device=device).unsqueeze(1)
    logits, state = model(ids, model.init_state(1))
    return logits[-1, 0].float().log_softmax(-1), state
