"""wordlm against a plain PyTorch training loop, measured in one run: `make bench` (or python benchmarks/bench.py).

Each row runs in its own subprocess (so its peak resident memory is its own) and prints one JSON line; the parent
prints the table. The plain loop is the `word_language_model` example's approach: embedding -> nn.LSTM -> linear
-> cross-entropy over the full vocabulary, fp32, SGD, gradient clipping, the hidden state detached between
windows. wordlm runs its real training loop (`wordlm.train.train`) on configs/bench-{ptb,wt2}.toml, and its
tokens/s is read from the metrics.jsonl that loop writes, first interval (warm-up) excluded.

    python benchmarks/bench.py                  # the throughput table (a few minutes on 2 cores)
    python benchmarks/bench.py --budget 120     # also: validation perplexity after 120 s of training each
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
CORPORA = {"10k": ("ptb", "bench-ptb.toml"), "33k": ("wikitext-2", "bench-wt2.toml")}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def corpus_paths(vocab: str) -> dict[str, str]:
    d = SHARED / CORPORA[vocab][0]
    if not (d / "train.txt").is_file():
        sys.exit(f"bench: {d}/train.txt not found; the benchmarks read ../shared/data (see its README)")
    return {s: str(d / f"{s}.txt") for s in ("train", "valid", "test")}


def cpu_bf16() -> bool:
    import torch

    from wordlm.evaluate import bf16_supported

    return bf16_supported(torch.device("cpu"))


def load_config(vocab: str, overrides: list[str], config: str | None = None):
    """A shipped config with `overrides`; in fp32 on a CPU without bf16 kernels (the table's header says so)."""
    from wordlm.config import load_config as load

    cfg = load(ROOT / "configs" / (config or CORPORA[vocab][1]), overrides)
    if cfg.train.precision == "bf16" and not cpu_bf16():
        cfg.train.precision = "fp32"
    return cfg


def encoded(vocab: str, cfg):
    """Tokenizer and train/valid ids for `vocab`, through wordlm's own cache (tokenizing is not timed here)."""
    from wordlm.data import encode_file, iter_lines
    from wordlm.tokenizer import fit_tokenizer

    tok = fit_tokenizer(cfg.tokenizer, lambda: iter_lines(cfg.data.train))
    return tok, encode_file(cfg.data.train, tok), encode_file(cfg.data.valid, tok)


# --- the plain loop ----------------------------------------------------------------------------------------------
def plain_model(vocab_size: int):
    import torch
    from torch import nn

    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Embedding(vocab_size, 200)
            self.rnn = nn.LSTM(200, 200, 2, dropout=0.2)
            self.drop = nn.Dropout(0.2)
            self.decoder = nn.Linear(200, vocab_size)
            for p in self.parameters():
                nn.init.uniform_(p, -0.1, 0.1)

        def forward(self, x, hidden):
            out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
            return self.decoder(self.drop(out)), hidden

    torch.manual_seed(0)
    return Plain()


def plain_train(vocab: str, steps: int, budget_s: float = 0.0) -> dict:
    """The word_language_model example's loop: batchify, get_batch, repackage_hidden, SGD lr 20, clip 0.25."""
    import numpy as np
    import torch
    from torch import nn

    cfg = load_config(vocab, [])
    tok, train_split, valid_split = encoded(vocab, cfg)
    V = tok.vocab_size
    ids = torch.from_numpy(np.asarray(train_split.ids).astype(np.int64))
    B, T = 20, 35
    nb = ids.numel() // B
    data = ids[: nb * B].view(B, nb).t().contiguous()  # batchify: (rows, B)
    model = plain_model(V)
    crit = nn.CrossEntropyLoss()
    lr, hidden = 20.0, None
    times, i, t_start = [], 0, time.perf_counter()
    warmup = 3
    for step in range(10**9):
        if i + 1 >= nb:
            i, hidden = 0, None
        seq = min(T, nb - 1 - i)
        x, y = data[i: i + seq], data[i + 1: i + 1 + seq]
        i += seq
        t0 = time.perf_counter()
        if hidden is not None:
            hidden = tuple(h.detach() for h in hidden)  # repackage_hidden
        model.zero_grad()
        out, hidden = model(x, hidden)
        loss = crit(out.view(-1, V), y.reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        loss.item()  # the example logs every step's loss
        times.append((time.perf_counter() - t0, x.numel()))
        if budget_s and time.perf_counter() - t_start >= budget_s:
            break
        if not budget_s and step + 1 >= warmup + steps:
            break
    measured = times[warmup:] if not budget_s else times
    tok_s = sum(n for _, n in measured) / sum(t for t, _ in measured)
    result = {"tokens_per_s": tok_s, "steps": len(times), "tokens": sum(n for _, n in times)}
    if budget_s:
        result["valid_ppl"] = plain_eval(model, valid_split, V)
    return result


def plain_eval(model, split, V) -> float:
    import math

    import torch
    import torch.nn.functional as F

    from wordlm.data import Streams

    model.eval()
    s, total, hidden = Streams(split.ids, 10), 0.0, None
    with torch.no_grad():
        for row in range(0, s.rows - 1, 35):
            x, y = s.window(row, 35)
            out, hidden = model(x, hidden)
            total += F.cross_entropy(out.view(-1, V), y.reshape(-1), reduction="sum").item()
    return math.exp(total / s.targets)


# --- wordlm -----------------------------------------------------------------------------------------------------
def wordlm_train(vocab: str, steps: int, budget_s: float = 0.0, overrides: tuple[str, ...] = (),
                 config: str | None = None) -> dict:
    from wordlm.train import train

    cfg = load_config(vocab, [*overrides], config)
    encoded(vocab, cfg)  # warm the cache: tokenizing is measured in its own row
    log_every = 10
    with tempfile.TemporaryDirectory() as tmp:
        if budget_s:
            # Train for the wall-clock budget: a step count from a short calibration run, then a cosine over it.
            calib = wordlm_train(vocab, 30, overrides=overrides)
            n = int(budget_s * calib["tokens_per_s"] / (cfg.train.batch_size * cfg.train.seq_len))
            cfg = load_config(vocab, [*overrides, f"train.max_steps={n}", "train.epochs=0", "train.eval_every=0",
                                      "train.log_every=50"])
            t0 = time.perf_counter()
            result = train(cfg, Path(tmp) / "run")
            wall = time.perf_counter() - t0
            recs = [json.loads(ln) for ln in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            train_s = max(r["elapsed_s"] for r in recs if r["event"] == "train")
            return {"valid_ppl": recs[-1]["valid_ppl"], "steps": result.steps, "tokens": result.tokens,
                    "train_s": train_s, "wall_s": wall}
        cfg = load_config(vocab, [*overrides, f"train.max_steps={steps + log_every}", "train.epochs=0",
                                  f"train.log_every={log_every}", "train.eval_every=0"], config)
        small_valid = Path(tmp) / "valid.txt"  # the closing validation is not what is measured here
        with open(cfg.data.valid, encoding="utf-8") as f:
            small_valid.write_text("".join(f.readline() for _ in range(50)))
        cfg.data.valid = str(small_valid)
        train(cfg, Path(tmp) / "run")
        recs = [json.loads(ln) for ln in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in recs if r["event"] == "train"]
    # Each record's tokens_per_s covers the interval since the one before; the first interval is the warm-up.
    intervals = [(b["tokens"] - a["tokens"], b["tokens_per_s"]) for a, b in zip(tr, tr[1:], strict=False)]
    seconds = sum(n / rate for n, rate in intervals)
    return {"tokens_per_s": sum(n for n, _ in intervals) / seconds, "steps": steps}


def wordlm_use(vocab: str) -> dict:
    """Evaluation, generation and latency with the bench model (untrained weights: speed does not depend on them)."""

    from wordlm.data import Streams
    from wordlm.evaluate import total_nll
    from wordlm.generate import continue_ids
    from wordlm.model import build_model

    cfg = load_config(vocab, [])
    tok, _, valid = encoded(vocab, cfg)
    model = build_model(cfg.model, tok.vocab_size).eval()
    streams = Streams(valid.ids, 10)
    t0 = time.perf_counter()
    total_nll(model, streams, 35, cfg.train.precision)
    eval_tok_s = streams.targets / (time.perf_counter() - t0)
    out = {"eval_tokens_per_s": eval_tok_s}
    for n, name in ((1, "gen1"), (32, "gen32")):
        steps = 200
        gen = continue_ids(model, [tok.eos_id], steps, seed=0, num_samples=n)
        next(gen)
        t0 = time.perf_counter()
        for _ in gen:
            pass
        dt = time.perf_counter() - t0
        out[f"{name}_tokens_per_s"] = (steps - 1) * n / dt
        if n == 1:
            out["next_token_ms"] = dt / (steps - 1) * 1000
    return out


def tokenizers() -> dict:
    from wordlm.data import encode_file, iter_lines
    from wordlm.tokenizer import SentencePieceTokenizer, WordTokenizer

    path = SHARED / "wikitext-2" / "train.txt"
    mb = path.stat().st_size / 1e6
    out = {"corpus_mb": mb}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        word = WordTokenizer.fit(iter_lines(path))
        out["word_fit_mb_s"] = mb / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        encode_file(path, word, tmp)
        out["word_encode_mb_s"] = mb / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        split = encode_file(path, word, tmp)
        int(split.ids[-1])
        out["cache_load_s"] = time.perf_counter() - t0
        lines = [ln for _, ln in zip(range(20000), iter_lines(path), strict=False)]
        sp = SentencePieceTokenizer.fit(lines, vocab_size=8000)
        t0 = time.perf_counter()
        encode_file(path, sp, tmp)
        out["sp_encode_mb_s"] = mb / (time.perf_counter() - t0)
    return out


def one(name: str, args) -> dict:
    os.environ.setdefault("WORDLM_CACHE_DIR", str(Path(tempfile.gettempdir()) / "wordlm-bench-cache"))
    kind, _, vocab = name.partition(":")
    if kind == "plain":
        r = plain_train(vocab, args.steps, args.budget)
    elif kind == "wordlm":
        r = wordlm_train(vocab, args.steps, args.budget)
    elif kind == "wordlm-fp32-full":  # wordlm's loop with the plain model's settings: the loop's own overhead
        r = wordlm_train(vocab, args.steps, 0, ("model.decoder=full", "train.precision=fp32"))
    elif kind == "ptb-small":  # configs/ptb-small.toml (2x200, no dropout, SGD, full softmax, fp32) at the plain
        r = wordlm_train("10k", args.steps, 0, ("train.seq_len=35",), "ptb-small.toml")  # loop's 35-step window
    elif kind == "config":  # any config's training speed: --one config:ptb-medium.toml
        r = wordlm_train("10k", args.steps, 0, (), vocab)
    elif kind == "use":
        r = wordlm_use(vocab)
    elif kind == "tokenizers":
        r = tokenizers()
    else:
        raise SystemExit(f"unknown row {name}")
    r["peak_rss_mb"] = peak_rss_mb()
    return r


def run_row(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--budget", str(args.budget)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench row {name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="timed training steps per row")
    ap.add_argument("--budget", type=float, default=0.0, help="seconds of training for the time-to-quality rows")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps < 10:
        ap.error(f"--steps must be at least 10 (wordlm's rows are read from log records 10 steps apart), "
                 f"got {args.steps}")
    if args.one:
        print(json.dumps(one(args.one, args)))
        return
    import torch

    print(f"# machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# command: python benchmarks/bench.py --steps {args.steps}" + (f" --budget {args.budget:g}"
                                                                            if args.budget else ""))
    if not cpu_bf16():
        from wordlm.evaluate import bf16_refusal

        print(f"# bf16 left out: {bf16_refusal(torch.device('cpu'))}; the bench configs' rows run in fp32, "
              f"not as in docs/PERFORMANCE.md")
    if args.budget:
        print(f"\n## validation perplexity after {args.budget:g} s of training (2x200, batch 20, seq 35)\n")
        print("| vocab | plain loop: steps | plain: valid ppl | wordlm: steps | wordlm: valid ppl |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for vocab in CORPORA:
            p, w = run_row(f"plain:{vocab}", args), run_row(f"wordlm:{vocab}", args)
            print(f"| {vocab} | {p['steps']} | {p['valid_ppl']:.1f} | {w['steps']} | {w['valid_ppl']:.1f} |")
        return
    print("\n## training throughput (2x200 LSTM, batch 20, seq 35)\n")
    print("| vocab | plain loop tok/s | wordlm, plain settings tok/s | wordlm tok/s | speed-up | peak RSS plain / "
          "wordlm (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    plain = {}
    for vocab in CORPORA:
        p = plain[vocab] = run_row(f"plain:{vocab}", args)
        f = run_row(f"wordlm-fp32-full:{vocab}", args)
        w = run_row(f"wordlm:{vocab}", args)
        print(f"| {vocab} | {p['tokens_per_s']:,.0f} | {f['tokens_per_s']:,.0f} | {w['tokens_per_s']:,.0f} | "
              f"{w['tokens_per_s'] / p['tokens_per_s']:.2f}x | {p['peak_rss_mb']:.0f} / {w['peak_rss_mb']:.0f} |")
    p, z = plain["10k"], run_row("ptb-small:10k", args)
    print(f"\nconfigs/ptb-small.toml at 35-step windows (the same model as the plain loop's, without dropout): "
          f"{z['tokens_per_s']:,.0f} tok/s vs plain {p['tokens_per_s']:,.0f} tok/s "
          f"({z['tokens_per_s'] / p['tokens_per_s']:.2f}x)")
    print("\n## evaluation and generation (the bench configs' models)\n")
    print("| vocab | eval tok/s | generate tok/s (1 stream) | generate tok/s (32 streams) | next-token latency | "
          "peak RSS (MB) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for vocab in CORPORA:
        u = run_row(f"use:{vocab}", args)
        print(f"| {vocab} | {u['eval_tokens_per_s']:,.0f} | {u['gen1_tokens_per_s']:,.0f} | "
              f"{u['gen32_tokens_per_s']:,.0f} | {u['next_token_ms']:.2f} ms | {u['peak_rss_mb']:.0f} |")
    t = run_row("tokenizers", args)
    print(f"\n## tokenizers (WikiText-2 train, {t['corpus_mb']:.1f} MB)\n")
    print("| word: count vocabulary | word: encode + cache | sentencepiece (8k unigram): encode + cache | "
          "cache load | peak RSS (MB) |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    print(f"| {t['word_fit_mb_s']:.1f} MB/s | {t['word_encode_mb_s']:.1f} MB/s | {t['sp_encode_mb_s']:.1f} MB/s | "
          f"{t['cache_load_s'] * 1000:.1f} ms | {t['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
