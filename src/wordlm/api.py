"""The Python API: load a trained model and use it. The CLI is a thin shell over this class.

    from wordlm import load
    lm = load("runs/demo")
    lm.predict("why do we need a", k=5)
    lm.score(["why do we need a recurrent neural network", "neural why recurrent need we network do"])
    print("".join(lm.generate("the network", max_tokens=20, seed=0)))
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .checkpoint import load_checkpoint
from .config import Config
from .data import Streams, encode_file
from .errors import DataError, UsageError, arg
from .evaluate import bf16_refusal, bf16_supported, eval_window, perplexity, report, total_nll
from .generate import check_sampling, continue_ids, read_context
from .model import build_model, num_parameters, resolve_device
from .tokenizer import Tokenizer

log = logging.getLogger("wordlm")

# Dynamic evaluation's step sizes. The grid starts with three of them, higher for longer updates, and moves
# on (up or down) from its best one while that is at the edge of what was tried and it keeps improving.
DYN_LRS = (1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3)


def dyn_grid_start(seq_len: int) -> tuple[float, ...]:
    """The grid's first three step sizes for updates of `seq_len` tokens: 1e-6 to 1e-5 for 5 tokens, one rung
    up the ladder for each doubling (1e-5 to 1e-4 for 20). Measured on two medium PTB models (docs/RESULTS.md):
    the best was 1e-5 with 5 tokens, 3e-5 and 1e-4 with 20."""
    centre = min(max(1 + round(math.log2(max(seq_len, 1) / 5)), 1), len(DYN_LRS) - 2)
    return DYN_LRS[centre - 1: centre + 2]


class LanguageModel:
    def __init__(self, model, tokenizer: Tokenizer, config: Config, path: Path, meta: dict):
        self.model, self.tokenizer, self.config, self.path, self.meta = model, tokenizer, config, path, meta
        self.model.eval()

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", prefer: str = "best") -> LanguageModel:
        """`device`: cpu, cuda, cuda:N, or auto (the GPU when one is visible)."""
        if not isinstance(device, torch.device):
            device = resolve_device(device, knob="device", fix="device='cpu'")
        ckpt = load_checkpoint(path, prefer=prefer)
        model = build_model(ckpt.config.model, ckpt.tokenizer.vocab_size)
        model.load_state_dict(ckpt.model_state)
        return cls(model.to(device), ckpt.tokenizer, ckpt.config, ckpt.path, ckpt.meta)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_parameters(self) -> int:
        return num_parameters(self.model)

    # --- text -> ids ---------------------------------------------------------------------------------------
    def context_ids(self, prompt: str, allow_empty: bool = False) -> list[int]:
        """<eos> (the start of a line) followed by the prompt's tokens; warns about unknown words."""
        if not prompt.strip() and not allow_empty:
            raise UsageError(f"the prompt is empty; give some text to condition on, e.g. {arg('prompt', 'the')}")
        ids = self.tokenizer.encode_line(prompt)
        unknown = self.tokenizer.unknown_words(prompt)
        if unknown:
            if len(unknown) == len(prompt.split()) and self.tokenizer.kind == "word":
                raise UsageError(f"every word of the prompt is unknown to the model ({' '.join(unknown[:5])}); "
                                 f"use words that occur in its training text")
            log.warning("warning: not in the vocabulary, read as <unk>: %s", " ".join(unknown[:10]))
        return [self.tokenizer.eos_id, *ids]

    # --- uses ----------------------------------------------------------------------------------------------
    def _streams(self, path: str | Path, batch_size: int):
        if batch_size < 1:
            raise UsageError(f"{arg('batch_size')} must be >= 1, got {batch_size}")
        split = encode_file(path, self.tokenizer, self.config.data.cache_dir or None, what="text to evaluate")
        try:
            return split, Streams(split.ids, batch_size, self.device)
        except DataError as e:  # too short for the streams: name the file and the flag to change
            raise DataError(f"{path}: {e} ({arg('batch_size')})") from None

    def evaluate(self, path: str | Path, batch_size: int = 10, seq_len: int | None = None,
                 cuda_graphs: bool = False, precision: str | None = None) -> dict:
        """Loss, perplexity, bits per token on a text file, the state carried through the whole text, read in
        windows of `seq_len` tokens per stream (default: evaluate.eval_window's choice; the figures do not
        depend on it). With `cuda_graphs` (a CUDA device only) the forward pass over a window is recorded once per
        window length and replayed along the text: the same figures, without launching each operation of each
        window from Python. `precision`: fp32 or bf16 (autocast); by default the run's train.precision."""
        from .graphs import CudaGraphs, NotRecordable, RecordedEvaluation

        if precision not in (None, "fp32", "bf16"):
            raise UsageError(f"{arg('precision')} must be fp32 or bf16, got {precision!r}")
        if precision == "bf16" and not bf16_supported(self.device):
            raise UsageError(f"{arg('precision', 'bf16')}, but {bf16_refusal(self.device)}: use "
                             f"{arg('precision', 'fp32')}")
        if precision is None:
            precision = self.config.train.precision
            if precision == "bf16" and not bf16_supported(self.device):
                log.warning("the run trained in bf16, but %s: evaluating in fp32", bf16_refusal(self.device))
                precision = "fp32"

        if cuda_graphs and self.config.model.decoder == "adaptive":
            raise UsageError(f"{arg('cuda_graphs', True)} cannot record the adaptive softmax (its shapes depend on "
                             f"the targets): drop it")
        if cuda_graphs and not CudaGraphs.supports(self.device):
            raise UsageError(f"{arg('cuda_graphs', True)} needs a CUDA device and the model is on {self.device}: "
                             f"drop it or use {arg('device', 'cuda')}")
        if seq_len is not None and seq_len < 1:
            raise UsageError(f"{arg('seq_len')} must be >= 1, got {seq_len}")
        split, streams = self._streams(path, batch_size)
        if seq_len is None:
            seq_len = eval_window(batch_size, self.tokenizer.vocab_size, self.config.train.seq_len)
        if cuda_graphs:
            try:
                nll, n = RecordedEvaluation(CudaGraphs()).total_nll(self.model, streams, seq_len, precision)
            except NotRecordable as e:
                raise UsageError(f"{arg('cuda_graphs', True)}: the forward pass could not be recorded as a CUDA "
                                 f"graph ({e}); drop it") from None
        else:
            nll, n = total_nll(self.model, streams, seq_len, precision)
        out = report(nll, n, split, subword=self.tokenizer.kind != "word", unk_id=self.tokenizer.unk_id)
        out["total_nll"], out["precision"] = nll, precision
        return out

    def evaluate_dynamic(self, path: str | Path, lr: float | None = None, decay: float | None = None,
                         batch_size: int = 1, seq_len: int = 20, grid_on: str | Path | None = None,
                         grid_tokens: int = 10000, ms_windows: int = 500) -> dict:
        """Dynamic evaluation (Krause et al. 2018): the weights adapt to `path` as it is read.

        With `grid_on` (a validation text), lr and decay are chosen on its first `grid_tokens` tokens from a
        small grid (values given explicitly are kept fixed). The gradient scale comes from `ms_windows` windows
        of the training text (or the validation text when the training text is not there).
        """
        from .evaluate import dynamic_total_nll, gradient_ms

        if seq_len < 1:
            raise UsageError(f"{arg('seq_len')} must be >= 1, got {seq_len}")
        grid_on = grid_on or None  # a config's empty data.valid: no validation text
        if grid_on is None and (lr is None or decay is None):  # refused before the slow passes
            raise UsageError(f"give {arg('lr')} and {arg('decay')}, or a validation text ({arg('grid_on')}) for "
                             f"the grid search to choose them on")
        for keyword, v in (("lr", lr), ("decay", decay)):
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise UsageError(f"{arg(keyword)} must be a finite number >= 0, got {v}")
        ms_path = self.config.data.train if Path(self.config.data.train or "/nonexistent").is_file() else grid_on
        if ms_path is None:
            raise UsageError(f"dynamic evaluation needs the training text (data.train) or a validation text "
                             f"({arg('grid_on')})")
        searching = grid_on is not None and (lr is None or decay is None)
        split, streams = self._streams(path, batch_size)  # a bad text fails here, before the slow passes
        _, ms_streams = self._streams(ms_path, batch_size)
        grid_split = self._streams(grid_on, batch_size)[0] if searching else None
        started = time.perf_counter()
        ms = gradient_ms(self.model, ms_streams, seq_len, ms_windows)
        log.info("dynamic: gradient scale from %d windows of %s (%.1fs)", ms_windows, Path(ms_path).name,
                 time.perf_counter() - started)
        chosen = {"lr": lr, "decay": decay}
        grid = []
        if searching:
            grid_streams = Streams(grid_split.ids[: grid_tokens + 1], batch_size, self.device)
            # RMS-normalised steps are large where gradients are rare (about half the weights of a PTB model
            # have an RMS gradient under 1e-6): useful step sizes are small. On the first 10,000 validation
            # tokens of a ptb-medium-gpu model with 5-token updates (docs/RESULTS.md): 1e-6 -2.3%, 3e-6 -6.0%,
            # 1e-5 -11.8%, 3e-5 -4.4% against static, each best without decay (1e-3 and 1e-2 were slightly
            # worse); with 20-token updates the best was 3e-5 or 1e-4.
            lrs = [lr] if lr is not None else list(dyn_grid_start(seq_len))
            decays = [decay] if decay is not None else [0.0, 1e-3]

            def point(a: float, d: float) -> dict:
                started = time.perf_counter()
                nll, n = dynamic_total_nll(self.model, grid_streams, seq_len, a, d, ms)
                grid.append({"lr": a, "decay": d, "ppl": perplexity(nll / n)})
                log.info("dynamic: lr %g, lambda %g: ppl %.2f on the first %d tokens of %s (%.1fs)", a, d,
                         grid[-1]["ppl"], n, Path(grid_on).name, time.perf_counter() - started)
                return grid[-1]

            for a in lrs:
                for d in decays:
                    point(a, d)
            best = min(grid, key=lambda g: (math.isnan(g["ppl"]), g["ppl"]))  # a diverged point never wins
            # The best step size at an edge of what was tried: go on along the ladder while it improves.
            for up in (True, False):
                while lr is None and best["lr"] == (max if up else min)(g["lr"] for g in grid):
                    rungs = [a for a in DYN_LRS if (a > best["lr"] if up else a < best["lr"])]
                    if not rungs:
                        break
                    nxt = point(min(rungs) if up else max(rungs), best["decay"])
                    if not nxt["ppl"] < best["ppl"]:  # also when it diverged (nan)
                        break
                    best = nxt
            chosen = {"lr": best["lr"], "decay": best["decay"]}
            if Path(grid_on).resolve() == Path(path).resolve():  # e.g. wordlm eval RUN --dynamic on the valid split
                n = grid_streams.targets
                log.warning("warning: lr and lambda were chosen on %s tokens of %s, the text evaluated here, so "
                            "this perplexity is optimistic; evaluate another text (--split test) for a fair figure",
                            f"all {n:,}" if n >= len(grid_split.ids) - 1 else f"the first {n:,}", Path(path).name)
        log.info("dynamic: lr %g, lambda %g over %s (%d updates of %d tokens)", chosen["lr"], chosen["decay"],
                 Path(path).name, math.ceil((len(split.ids) - 1) // batch_size / seq_len), seq_len)
        nll, n = dynamic_total_nll(self.model, streams, seq_len, chosen["lr"], chosen["decay"], ms)
        if not nll / n <= math.log(self.tokenizer.vocab_size):  # worse than a uniform guess, or nan
            log.warning("warning: dynamic evaluation diverged at lr %g (perplexity %s, above the vocabulary's %d, "
                        "which a uniform guess gets): use a smaller %s, or leave it out to choose one on the "
                        "validation split", chosen["lr"], f"{perplexity(nll / n):.4g}", self.tokenizer.vocab_size,
                        arg("lr"))
        out = report(nll, n, split, subword=self.tokenizer.kind != "word", unk_id=self.tokenizer.unk_id)
        return {**out, "total_nll": nll, "dynamic": {**chosen, "batch_size": batch_size, "seq_len": seq_len,
                                                     "grid": grid, "grid_on": str(grid_on) if grid else None}}

    def generate(self, prompt: str, max_tokens: int = 50, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None) -> Iterator[str]:
        """Stream the continuation of `prompt` as text pieces (words with their spacing, or characters)."""
        if max_tokens < 0:
            raise UsageError(f"{arg('max_tokens')} must be >= 0, got {max_tokens}")
        return (pieces[0] for pieces in self.generate_many(prompt, max_tokens, temperature, top_k, top_p, seed))

    def generate_many(self, prompt: str, max_tokens: int, temperature: float = 1.0, top_k: int = 0,
                      top_p: float = 1.0, seed: int | None = None, num_samples: int = 1) -> Iterator[list[str]]:
        """Like generate, for `num_samples` independent samples drawn side by side (one batch).

        Arguments and the prompt are checked here, before the first piece is asked for."""
        check_sampling(temperature, top_k, top_p)
        if num_samples < 1:
            raise UsageError(f"{arg('num_samples')} must be >= 1, got {num_samples}")
        ctx = self.context_ids(prompt)
        steps = continue_ids(self.model, ctx, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                             seed=seed, num_samples=num_samples)
        return self._pieces(steps, num_samples, at_line_start=not prompt.strip())

    def _pieces(self, steps: Iterator, n: int, at_line_start: bool) -> Iterator[list[str]]:
        tok, fresh = self.tokenizer, [at_line_start] * n
        for step in steps:
            out = []
            for j, i in enumerate(step.tolist()):
                if i == tok.eos_id:
                    out.append("\n")
                    fresh[j] = True
                    continue
                text = tok.token_text(i)
                if tok.kind == "word" and not fresh[j]:
                    text = " " + text
                elif tok.kind == "sentencepiece" and fresh[j]:
                    text = text.lstrip(" ")
                fresh[j] = False
                out.append(text)
            yield out

    def predict(self, prompt: str, k: int = 10) -> list[dict]:
        """The k most likely next words after `prompt`, most likely first (<unk> left out).

        Word tokenizer: exact next-token probabilities. Sentencepiece: whole words assembled from pieces by a
        beam search (a word ends where the next piece starts a new word or the line ends); each probability
        sums the paths the beam found, so it is a lower bound. Char tokenizer: single characters.
        """
        if k < 1:
            raise UsageError(f"{arg('k')} must be >= 1, got {k}")
        logp, state = read_context(self.model, self.context_ids(prompt, allow_empty=True))
        if self.tokenizer.kind == "sentencepiece":
            return self._predict_words(logp, state, k)
        logp = logp.clone()
        logp[self.tokenizer.unk_id] = -math.inf
        top = torch.topk(logp, min(k, logp.numel() - 1))
        out = []
        for lp, i in zip(top.values.tolist(), top.indices.tolist(), strict=True):
            word = "<eos>" if i == self.tokenizer.eos_id else self.tokenizer.token_text(i)
            out.append({"word": word, "prob": math.exp(lp), "logprob": lp})
        return out

    @torch.no_grad()
    def _predict_words(self, logp: torch.Tensor, state, k: int, max_pieces: int = 4) -> list[dict]:
        tok, V = self.tokenizer, self.tokenizer.vocab_size
        starts = torch.tensor([tok.token_text(i).startswith(" ") for i in range(V)], device=logp.device)
        starts[tok.unk_id] = False
        ends = starts.clone()  # the next token after a finished word begins a new word or ends the line
        ends[tok.eos_id] = True
        cont = ~starts
        cont[tok.eos_id] = cont[tok.unk_id] = False
        width = 2 * k
        words: dict[str, float] = {}
        # A beam entry: pieces so far, their log-probability, the next-token distribution, the LSTM state.
        beam = [([], 0.0, logp, state)]
        for depth in range(max_pieces):
            cands = []
            for pieces, lp, dist, st in beam:
                word = tok.sp.decode(pieces) if pieces else ""
                if word.strip():  # not the lone word-start piece on its own: that is no word
                    p_end = torch.logsumexp(dist.masked_fill(~ends, -math.inf), 0).item()
                    words[word] = float(np.logaddexp(words.get(word, -math.inf), lp + p_end))
                allowed = starts if depth == 0 else cont
                top = torch.topk(dist.masked_fill(~allowed, -math.inf), width)
                cands += [(pieces + [i], lp + v, st) for v, i in zip(top.values.tolist(), top.indices.tolist(),
                                                                    strict=True) if v > -math.inf]
            cands = sorted(cands, key=lambda c: -c[1])[:width]
            if not cands:
                break
            ids = torch.tensor([[c[0][-1] for c in cands]], device=self.device)
            h = torch.cat([c[2][0] for c in cands], 1)
            cst = torch.cat([c[2][1] for c in cands], 1)
            logits, (h, cst) = self.model(ids, (h, cst))
            dists = logits[0].float().log_softmax(-1)
            beam = [(c[0], c[1], dists[j], (h[:, j:j + 1], cst[:, j:j + 1])) for j, c in enumerate(cands)]
        best = sorted(words.items(), key=lambda kv: -kv[1])[:k]
        return [{"word": w, "prob": math.exp(lp), "logprob": lp} for w, lp in best]

    @torch.no_grad()
    def score(self, sentences: list[str] | str) -> list[dict]:
        """Log-probability of each sentence as one line: its tokens then <eos>, read from a fresh state. A single
        string is one sentence."""
        if isinstance(sentences, str):  # not its characters, one by one
            sentences = [sentences]
        results, unknown = [], {}  # a dict: each word once, in the order met
        for i, s in enumerate(sentences, 1):
            if not s.strip():
                raise UsageError(f"cannot score an empty sentence (sentence {i} of {len(sentences)})")
            unknown.update(dict.fromkeys(self.tokenizer.unknown_words(s)))
            ids = [self.tokenizer.eos_id, *self.tokenizer.encode_line(s), self.tokenizer.eos_id]
            x = torch.tensor(ids[:-1], device=self.device).unsqueeze(1)
            y = torch.tensor(ids[1:], device=self.device).unsqueeze(1)
            nll, _ = self.model.nll(x, y, self.model.init_state(1))
            lps = (-nll[:, 0].double()).tolist()
            toks = [{"token": "<eos>" if i == self.tokenizer.eos_id else self.tokenizer.token_text(i),
                     "logprob": lp} for i, lp in zip(ids[1:], lps, strict=True)]
            total = sum(lps)
            results.append({"sentence": s, "logprob": total, "ppl": math.exp(-total / len(lps)),
                            "tokens": toks})
        if unknown:  # <unk> stands for every unseen word at once: such a sentence's probability flatters it
            log.warning("warning: not in the vocabulary, scored as <unk>: %s%s", " ".join(list(unknown)[:10]),
                        f" (and {len(unknown) - 10} more)" if len(unknown) > 10 else "")
        return results
