"""The LSTM language model: ids in, next-token logits (and the carried LSTM state) out. No I/O, no globals."""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .errors import ConfigError

State = tuple[Tensor, Tensor]  # (h, c), each (num_layers, B, hidden_size)


class LSTMLanguageModel(nn.Module):
    """embedding -> dropout -> multi-layer nn.LSTM -> dropout -> decoder.

    The decoder is a linear layer over the whole vocabulary (optionally tied to the embedding), or an adaptive
    softmax, whose "logits" are exact log-probabilities. Time-major throughout, as nn.LSTM and cuDNN prefer:
    ids are (T, B), logits (T, B, V).
    """

    def __init__(self, vocab_size: int, cfg: ModelConfig):
        super().__init__()
        # Each layer's LSTM width and output width: hidden_size, except a narrower last layer (AWD-LSTM) or a
        # projection of every layer's output (proj_size).
        self.widths = [cfg.hidden_size] * (cfg.num_layers - 1) + [cfg.last_hidden_size or cfg.hidden_size]
        self.out_widths = [cfg.proj_size or w for w in self.widths]
        out_size = self.out_widths[-1]
        if cfg.tie_weights and cfg.embedding_size != out_size:
            which = ("model.proj_size" if cfg.proj_size else "model.last_hidden_size" if cfg.last_hidden_size
                     else "model.hidden_size")
            raise ConfigError(f"model.tie_weights needs model.embedding_size == {which} "
                              f"(got {cfg.embedding_size} and {out_size})")
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.out_size = out_size
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_size)
        self.drop = nn.Dropout(cfg.dropout)
        # One fused multi-layer nn.LSTM, unless something must happen between layers (variational dropout) or
        # to a layer's weights (weight drop): then one single-layer nn.LSTM per layer, same state layout.
        # (Also when the layers differ in width: one nn.LSTM has one width.)
        self.layered = cfg.dropout_hidden > 0 or cfg.weight_drop > 0 or len(set(self.widths)) > 1
        if self.layered:
            self.lstm = None
            self.layers = nn.ModuleList(
                nn.LSTM(cfg.embedding_size if i == 0 else self.out_widths[i - 1], self.widths[i], 1,
                        proj_size=cfg.proj_size)
                for i in range(cfg.num_layers))
        else:
            self.lstm = nn.LSTM(cfg.embedding_size, cfg.hidden_size, cfg.num_layers,
                                dropout=cfg.dropout if cfg.num_layers > 1 else 0.0, proj_size=cfg.proj_size)
        self.ar_alpha = self.tar_beta = 0.0  # set by the training loop; AR/TAR terms land in self.reg_loss
        self.reg_loss: Tensor | None = None
        self.decoder: nn.Linear | None = None
        self.adaptive: nn.AdaptiveLogSoftmaxWithLoss | None = None
        if cfg.decoder == "adaptive":
            cutoffs = [c for c in cfg.adaptive_cutoffs if c < vocab_size - 1]
            if cutoffs:
                self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(out_size, vocab_size, cutoffs,
                                                              div_value=cfg.adaptive_div_value, head_bias=True)
        if self.adaptive is None:  # full softmax (also when the vocabulary is smaller than the first cutoff)
            self.decoder = nn.Linear(out_size, vocab_size)
        self.reset_parameters()
        if cfg.tie_weights:
            # Press & Wolf 2017: one matrix both reads and writes words; saves V*H parameters and helps ppl.
            self.decoder.weight = self.embedding.weight

    def reset_parameters(self) -> None:
        # Zaremba et al. (2014): every weight uniform in [-r, r]; the decoder bias starts at zero. AWD-LSTM
        # (lstm_init = "pytorch") keeps nn.LSTM's own +-1/sqrt(hidden_size) for the LSTM: at 1150 units that is
        # 0.029, where r = 0.1 would start its gates three times as large.
        r = self.cfg.init_range
        lstm = self.lstm if self.lstm is not None else self.layers
        keep = {id(p) for p in lstm.parameters()} if self.cfg.lstm_init == "pytorch" else set()
        for p in self.parameters():
            if id(p) not in keep:
                nn.init.uniform_(p, -r, r)
        if self.decoder is not None:
            nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch_size: int) -> State:
        """A zero state on the weights' device and dtype: (h, c), each (num_layers, B, width). Layers narrower
        than the widest (AWD-LSTM's last) use the first columns of their row; the rest stay zero."""
        w, L = self.embedding.weight, self.cfg.num_layers
        return w.new_zeros(L, batch_size, max(self.out_widths)), w.new_zeros(L, batch_size, max(self.widths))

    def forward(self, ids: Tensor, state: State | None = None, targets: Tensor | None = None,
                mean: bool = False) -> tuple[Tensor, State]:
        """ids (T, B) -> logits (T, B, V), or with `targets` (T, B) the per-token NLL (T, B) in fp32, or with
        `mean` too their mean (0-d, what training needs, in fewer operations); and the LSTM state after the
        last step. (The loss lives in forward so DistributedDataParallel sees it.)"""
        x = self.drop(self._embed(ids))  # (T, B, E)
        x = locked_dropout(x, self.cfg.dropout_input, self.training)
        raw, state = self._lstm(x, state)  # (T, B, H or proj_size)
        out = self.drop(locked_dropout(raw, self.cfg.dropout_output, self.training))
        self.reg_loss = None
        if self.training and (self.ar_alpha or self.tar_beta):
            # Merity et al. 2017: AR penalises large (dropped) outputs, TAR large steps between time steps.
            self.reg_loss = self.ar_alpha * out.float().pow(2).mean() + \
                self.tar_beta * (raw[1:] - raw[:-1]).float().pow(2).mean()
        if self.adaptive is not None:
            if targets is not None:  # only the target's cluster is computed: the point of the adaptive softmax
                res = self.adaptive(out.flatten(0, 1), targets.flatten())
                return (res.loss.float() if mean else -res.output.float().view_as(targets)), state
            return self.adaptive.log_prob(out.flatten(0, 1)).view(*ids.shape, -1), state  # exact log-probs
        logits = self.decoder(out)  # (T, B, V)
        if targets is not None:
            nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="mean" if mean else "none")
            return (nll if mean else nll.view_as(targets)), state
        return logits, state

    def nll(self, ids: Tensor, targets: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Per-token negative log-likelihood (T, B) in fp32, and the carried state."""
        return self(ids, state, targets)


    def _embed(self, ids: Tensor) -> Tensor:
        p = self.cfg.dropout_embedding
        if not (self.training and p > 0):
            return self.embedding(ids)
        # Drop whole words: every occurrence of a dropped word in this batch reads a zero vector.
        w = self.embedding.weight
        mask = w.new_empty(w.shape[0], 1).bernoulli_(1 - p) / (1 - p)
        return F.embedding(ids, w * mask)

    def _lstm(self, x: Tensor, state: State | None) -> tuple[Tensor, State]:
        if not self.layered:
            return self.lstm(x, state)
        if state is None:
            state = self.init_state(x.shape[1])
        hs, cs = [], []
        for i, layer in enumerate(self.layers):
            h, c = state[0][i: i + 1], state[1][i: i + 1]
            if h.shape[-1] > self.out_widths[i] or c.shape[-1] > self.widths[i]:  # a narrower layer
                h = h[..., :self.out_widths[i]].contiguous()
                c = c[..., :self.widths[i]].contiguous()
            if self.training and self.cfg.weight_drop > 0:
                x, h, c = _weight_dropped_lstm(layer, x, h, c, self.cfg.weight_drop)
            else:
                x, (h, c) = layer(x, (h, c))
            if i < len(self.layers) - 1:
                x = locked_dropout(x, self.cfg.dropout_hidden, self.training)
            hs.append(F.pad(h, (0, state[0].shape[-1] - h.shape[-1])) if h.shape[-1] < state[0].shape[-1] else h)
            cs.append(F.pad(c, (0, state[1].shape[-1] - c.shape[-1])) if c.shape[-1] < state[1].shape[-1] else c)
        return x, (torch.cat(hs), torch.cat(cs))


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Variational dropout (Gal & Ghahramani 2016): one mask per sequence and unit, the same at every time step."""
    if not training or p == 0:
        return x
    mask = x.new_empty(1, x.shape[1], x.shape[2]).bernoulli_(1 - p) / (1 - p)  # (1, B, D)
    return x * mask


def _weight_dropped_lstm(layer: nn.LSTM, x: Tensor, h: Tensor, c: Tensor, p: float):
    """One LSTM layer with DropConnect on its hidden-to-hidden matrix (Wan et al. 2013; AWD-LSTM).

    The registered parameters are never replaced (the optimizer keeps them, nothing is re-registered): the
    dropped matrix is computed from the parameter and all weights are passed to the LSTM kernel as views of
    one contiguous buffer in nn.LSTM's own order, which is what cuDNN needs to use its kernel without the
    "weights are not part of single contiguous chunk of memory" compaction warning.
    """
    ws = [F.dropout(w, p, True) if name.startswith("weight_hh") else w
          for w, name in zip(layer._flat_weights, layer._flat_weights_names, strict=True)]
    flat = torch.cat([w.reshape(-1) for w in ws])
    views, at = [], 0
    for w in ws:
        views.append(flat[at: at + w.numel()].view_as(w))
        at += w.numel()
    out, h, c = torch._VF.lstm(x, (h, c), views, layer.bias, 1, 0.0, True, False, False)
    return out, h, c


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def detach_state(state: State) -> State:
    """Cut the autograd graph at a window edge (truncated BPTT), keeping the values."""
    return state[0].detach(), state[1].detach()


def build_model(cfg: ModelConfig, vocab_size: int, device: torch.device | str = "cpu") -> LSTMLanguageModel:
    return LSTMLanguageModel(vocab_size, cfg).to(device)


def resolve_device(name: str, knob: str = "train.device", fix: str = "--set train.device=cpu") -> torch.device:
    """`auto` is the GPU when one is visible, else the CPU. A CUDA device that is not there raises ConfigError
    naming `knob` and the `fix`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise ConfigError(f"{knob} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{knob} is {name!r} but no CUDA GPU is visible; use {fix}")
        index, count = torch.device(name).index, torch.cuda.device_count()
        if index is not None and index >= count:
            raise ConfigError(f"{knob} is {name!r} but only {count} CUDA GPU(s) are visible (cuda:0 to "
                              f"cuda:{count - 1})")
    return torch.device(name)
