"""Host work per training step: what wordlm's loop adds to a raw nn.LSTM step, with the arithmetic taken away.

On a GPU a 2x650 step at batch 20 to 128 takes 7 to 9 ms whatever the batch (docs/PERFORMANCE.md): the host,
issuing operations one by one, sets the pace. This script counts that host work on any machine. The model is
the medium one's shape (2 LSTM layers, dropout 0.5, full softmax, batch 20, seq 35) shrunk to width 8 on the
shipped tiny corpus, so the operations cost almost nothing to compute and what is left is dispatch:

- ATen operations dispatched per step, counted with torch.profiler (exact; the same on any machine);
- microseconds per step on this CPU, one thread, the median of 5 runs of 600 steps, the two loops taking turns
  (noisy on a shared machine: compare within one run).

The raw step is benchmarks/gpu.py's (embedding -> nn.LSTM -> linear -> cross-entropy, clip_grad_norm_,
per-parameter SGD); wordlm is wordlm.train.train() on configs/ptb-medium.toml at the same sizes.

    python benchmarks/overhead.py        # about a minute
"""

from __future__ import annotations

import collections
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu import raw_loop, wordlm_loop  # noqa: E402

from wordlm.config import load_config  # noqa: E402
from wordlm.data import encode_file, iter_lines  # noqa: E402
from wordlm.tokenizer import fit_tokenizer  # noqa: E402

DATA, CONFIG, WIDTH, BATCH, ROUNDS = ROOT / "data" / "tiny", ROOT / "configs" / "ptb-medium.toml", 8, 20, 5


def ops_per_step(run, steps_of) -> float:
    """ATen operations per step: the difference between two run lengths, so set-up and tear-down cancel."""
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for n in (100, 200):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(n)
        counts[n] = collections.Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})
    return (sum(counts[200].values()) - sum(counts[100].values())) / (steps_of(200) - steps_of(100))


def main() -> None:
    torch.set_num_threads(1)
    cfg = load_config(CONFIG, [f"data.train={DATA / 'train.txt'}"])
    tok = fit_tokenizer(cfg.tokenizer, lambda: iter_lines(DATA / "train.txt"))
    ids = torch.from_numpy(encode_file(DATA / "train.txt", tok).ids[:].astype("int64"))
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        loops = {
            "raw step": (lambda n: raw_loop(ids, tok.vocab_size, WIDTH, BATCH, "fp32", n, cpu, False), lambda n: n),
            # wordlm_loop runs n steps plus one log interval (n // 5) of warm-up
            "wordlm": (lambda n: wordlm_loop(CONFIG, DATA, WIDTH, BATCH, "fp32", n, cpu, Path(tmp)),
                       lambda n: n + max(1, n // 5)),
        }
        ops = {name: ops_per_step(run, steps_of) for name, (run, steps_of) in loops.items()}
        us = {name: [] for name in loops}
        for _ in range(ROUNDS):
            for name, (run, _) in loops.items():
                us[name].append(BATCH * 35 / run(600) * 1e6)
    print(f"# torch {torch.__version__}, one CPU thread; {WIDTH}-wide 2-layer LSTM, batch {BATCH}, seq 35, "
          f"vocabulary {tok.vocab_size}\n")
    print(f"| loop | ATen ops per step | us per step (median of {ROUNDS}, the loops taking turns) |")
    print("| --- | ---: | ---: |")
    for name in loops:
        print(f"| {name} | {ops[name]:.1f} | {statistics.median(us[name]):,.0f} |")
    raw, own = "raw step", "wordlm"
    print(f"\nwordlm adds {ops[own] - ops[raw]:+.1f} operations and "
          f"{statistics.median(us[own]) - statistics.median(us[raw]):+,.0f} us per step")


if __name__ == "__main__":
    main()
