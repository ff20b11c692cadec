"""Dynamic evaluation's speed: cuDNN's LSTM kernels against PyTorch's own, on a trained run, in one process.

cuDNN refuses an LSTM's backward pass outside training mode. wordlm's dynamic evaluation therefore puts the
nn.LSTM modules alone into training mode (their dropout off; the model's own dropouts read the model's flag,
which stays off), so the adapting passes keep cuDNN's kernels on a GPU. Before that it switched cuDNN off
for them, and PyTorch's own LSTM kernels step through time one small kernel after another. This script times
the same adapting pass (`wordlm.evaluate.dynamic_total_nll`, batch 1) both ways, the two taking turns, and
prints the median seconds of each, the ratio, and the perplexity each read (the same arithmetic, so the same
perplexity up to rounding). On a CPU both columns run the same kernels: a smoke run of the script.

    python benchmarks/dynamic.py runs/ptb-awd --text ../shared/data/ptb/valid.txt --tokens 4000
    python benchmarks/dynamic.py runs/demo --text data/tiny/valid.txt --device cpu --tokens 500   # smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from wordlm.api import LanguageModel  # noqa: E402
from wordlm.data import Streams, encode_file  # noqa: E402
from wordlm.evaluate import dynamic_total_nll, gradient_ms, perplexity  # noqa: E402


def timed_pass(lm: LanguageModel, streams: Streams, args, ms, cudnn: bool) -> tuple[float, float]:
    """Seconds and perplexity of one adapting pass over `streams`, with cuDNN on or off."""
    sync = torch.cuda.synchronize if streams.device.type == "cuda" else (lambda: None)
    with torch.backends.cudnn.flags(enabled=cudnn):
        sync()
        started = time.perf_counter()
        nll, n = dynamic_total_nll(lm.model, streams, args.seq_len, args.lr, args.decay, ms)  # .item(): synced
        return time.perf_counter() - started, perplexity(nll / n)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder (or checkpoint) that wordlm eval reads")
    ap.add_argument("--text", required=True, help="the text to adapt to (a validation split)")
    ap.add_argument("--tokens", type=int, default=4000, help="its first N tokens (default 4000)")
    ap.add_argument("--seq-len", type=int, default=20, help="tokens per update (wordlm eval's default, 20)")
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--decay", type=float, default=0.0)
    ap.add_argument("--repeat", type=int, default=2, help="turns per column; the median is printed")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    lm = LanguageModel.load(args.run, device=args.device)
    ids = encode_file(Path(args.text), lm.tokenizer).ids
    streams = Streams(ids[: args.tokens + 1], 1, args.device)
    warm = Streams(ids[: 4 * args.seq_len + 1], 1, args.device)
    ms = gradient_ms(lm.model, streams, args.seq_len, windows=50)
    for cudnn in (True, False):  # first calls (cuDNN plans, allocator growth) stay out of the timings
        timed_pass(lm, warm, args, ms, cudnn)
    seconds: dict[bool, list[float]] = {True: [], False: []}
    ppl: dict[bool, float] = {}
    for _ in range(args.repeat):
        for cudnn in (True, False):
            s, ppl[cudnn] = timed_pass(lm, streams, args, ms, cudnn)
            seconds[cudnn].append(s)
    updates = streams.num_windows(args.seq_len)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"# dynamic evaluation of {args.run} on {name}, torch {torch.__version__}: {updates} updates of "
          f"{args.seq_len} tokens (the first {streams.targets} of {Path(args.text).name}), lr {args.lr:g}, "
          f"lambda {args.decay:g}; median of {args.repeat}")
    print("| LSTM kernels | seconds | updates/s | against cuDNN | ppl |")
    print("|---|---:|---:|---:|---:|")
    base = statistics.median(seconds[True])
    for cudnn, label in ((True, "cuDNN (LSTMs alone in training mode)"), (False, "PyTorch's own (cuDNN off)")):
        s = statistics.median(seconds[cudnn])
        print(f"| {label} | {s:.2f} | {updates / s:,.0f} | {s / base:.2f}x | {ppl[cudnn]:.3f} |")
    print(json.dumps({"updates": updates, "seconds": {"cudnn": seconds[True], "native": seconds[False]},
                      "ppl": {"cudnn": ppl[True], "native": ppl[False]}}))


if __name__ == "__main__":
    main()
