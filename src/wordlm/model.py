"""The LSTM language model: ids in, next-token logits (and the carried LSTM state) out. No I/O, no globals."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

State = tuple[Tensor, Tensor]  # (h, c), each (num_layers, B, hidden_size)


class LSTMLanguageModel(nn.Module):
    """embedding -> dropout -> multi-layer nn.LSTM -> dropout -> decoder.

    The decoder is a linear layer over the whole vocabulary (optionally tied to the embedding), or an adaptive
    softmax, whose "logits" are exact log-probabilities. Time-major throughout, as nn.LSTM and cuDNN prefer:
    ids are (T, B), logits (T, B, V).
    """

    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        if cfg.tie_weights and cfg.embedding_size != cfg.hidden_size:
            from .errors import ConfigError

            raise ConfigError(f"model.tie_weights needs model.embedding_size == model.hidden_size "
                              f"(got {cfg.embedding_size} and {cfg.hidden_size})")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm = nn.LSTM(cfg.embedding_size, cfg.hidden_size, cfg.num_layers,
                            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
        self.decoder: nn.Linear | None = None
        self.adaptive: nn.AdaptiveLogSoftmaxWithLoss | None = None
        if cfg.decoder == "adaptive":
            cutoffs = [c for c in cfg.adaptive_cutoffs if c < vocab_size - 1]
            if cutoffs:
                self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(cfg.hidden_size, vocab_size, cutoffs,
                                                              div_value=cfg.adaptive_div_value, head_bias=True)
        if self.adaptive is None:  # full softmax (also when the vocabulary is smaller than the first cutoff)
            self.decoder = nn.Linear(cfg.hidden_size, vocab_size)
        self.reset_parameters()
        if cfg.tie_weights:
            # Press & Wolf 2017: one matrix both reads and writes words; saves V*H parameters and helps ppl.
            self.decoder.weight = self.embedding.weight

    def reset_parameters(self) -> None:
        # Zaremba et al. (2014): every weight uniform in [-r, r]; the decoder bias starts at zero.
        r = self.cfg.init_range
        for p in self.parameters():
            nn.init.uniform_(p, -r, r)
        if self.decoder is not None:
            nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch_size: int) -> State:
        """A zero state on the weights' device and dtype."""
        w = self.embedding.weight
        shape = (self.cfg.num_layers, batch_size, self.cfg.hidden_size)
        return w.new_zeros(shape), w.new_zeros(shape)

    def forward(self, ids: Tensor, state: State | None = None,
                targets: Tensor | None = None) -> tuple[Tensor, State]:
        """ids (T, B) -> logits (T, B, V), or with `targets` (T, B) the per-token NLL (T, B) in fp32; and the
        LSTM state after the last step. (The loss lives in forward so DistributedDataParallel sees it.)"""
        out, state = self.lstm(self.drop(self.embedding(ids)), state)  # (T, B, H)
        out = self.drop(out)
        if self.adaptive is not None:
            if targets is not None:  # only the target's cluster is computed: the point of the adaptive softmax
                logp = self.adaptive(out.flatten(0, 1), targets.flatten()).output
                return -logp.float().view_as(targets), state
            return self.adaptive.log_prob(out.flatten(0, 1)).view(*ids.shape, -1), state  # exact log-probs
        logits = self.decoder(out)  # (T, B, V)
        if targets is not None:
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            return nll.view_as(targets), state
        return logits, state

    def nll(self, ids: Tensor, targets: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Per-token negative log-likelihood (T, B) in fp32, and the carried state."""
        return self(ids, state, targets)


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def detach_state(state: State) -> State:
    """Cut the autograd graph at a window edge (truncated BPTT), keeping the values."""
    return state[0].detach(), state[1].detach()


def build_model(cfg: ModelConfig, vocab_size: int, device: torch.device | str = "cpu") -> LSTMLanguageModel:
    return LSTMLanguageModel(vocab_size, cfg).to(device)
