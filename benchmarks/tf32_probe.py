"""How much TF32 in cuDNN's LSTM moves a trained model's test perplexity, emulated on a CPU.

On an Ampere or later GPU PyTorch lets cuDNN compute nn.LSTM's products in TF32 unless told otherwise: the inputs
of each product (the layer's input and its weights, the previous output and the recurrent weights) are rounded
to a 10-bit mantissa, the sums are kept in fp32. The decoder's matmul stays IEEE fp32 (cuBLAS's default). wordlm
evaluated that way on GPUs until train.tf32 existed; it now evaluates in IEEE fp32 everywhere. This reads a
trained run's text at one stream (the papers' full context) four ways and prints the perplexities:

- wordlm: `wordlm eval RUN --data TEXT --batch-size 1` as the CLI computes it (nn.LSTM, IEEE fp32, this CPU);
- emulated IEEE: the LSTM written out step by step, no rounding (checks the emulation against the line above);
- emulated TF32, rounded to nearest: the products' inputs rounded to TF32 as NVIDIA's conversion does;
- emulated TF32, truncated: the low 13 bits dropped instead (a tensor core fed fp32 ignores them).

Which of the two roundings a cuDNN kernel does is not documented, so both are shown. A model with one fused
nn.LSTM and no projection only (the Zaremba configs, ptb-small to ptb-large):

    python benchmarks/tf32_probe.py RUN --data ../shared/data/ptb/test.txt
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from wordlm import load  # noqa: E402
from wordlm.data import encode_file  # noqa: E402


def to_tf32(x: torch.Tensor, nearest: bool) -> torch.Tensor:
    """fp32 values with the 13 low mantissa bits cleared: rounded to nearest (ties away from zero), or cut."""
    bits = x.contiguous().view(torch.int32)
    if nearest:
        bits = bits + 0x1000
    return (bits & -0x2000).view(torch.float32)  # -0x2000 is 0xFFFFE000 in two's complement


@torch.no_grad()
def lstm_layer(x: torch.Tensor, w_ih, w_hh, b_ih, b_hh, rnd) -> torch.Tensor:
    """One LSTM layer over x (T, D) from a zero state, gates in nn.LSTM's order (i, f, g, o); `rnd` is applied to
    every product's inputs."""
    hidden = w_hh.shape[1]
    pre = rnd(x) @ rnd(w_ih).T + b_ih + b_hh  # (T, 4H): the input products, all steps at once as cuDNN does
    w_hh_t = rnd(w_hh).T.contiguous()
    h = x.new_zeros(1, hidden)
    c = x.new_zeros(1, hidden)
    out = x.new_empty(x.shape[0], hidden)
    for t in range(x.shape[0]):
        gates = torch.addmm(pre[t: t + 1], rnd(h), w_hh_t)
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        out[t] = h[0]
    return out


@torch.no_grad()
def emulated_nll(model, ids: torch.Tensor, rnd) -> float:
    """Summed NLL (nats) of ids[1:] given everything before, one stream, state never reset."""
    lstm = model.lstm
    x = model.embedding(ids[:-1])
    for layer in range(lstm.num_layers):
        x = lstm_layer(x, *(getattr(lstm, f"{n}_l{layer}") for n in ("weight_ih", "weight_hh", "bias_ih",
                                                                     "bias_hh")), rnd)
    total = 0.0
    for at in range(0, x.shape[0], 4096):  # the decoder in IEEE fp32, in slices to bound the logits' memory
        logits = model.decoder(x[at: at + 4096])
        total += F.cross_entropy(logits.double(), ids[1 + at: 1 + at + 4096], reduction="sum").item()
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run directory or checkpoint (one fused nn.LSTM, no projection)")
    ap.add_argument("--data", required=True, help="the text to read (a test split)")
    args = ap.parse_args()
    lm = load(args.run)
    model = lm.model.eval()
    if model.lstm is None or model.lstm.proj_size or model.decoder is None:
        sys.exit(f"{args.run}: this probe emulates one fused nn.LSTM without projection and a full softmax; "
                 f"use a Zaremba-style run (configs/ptb-small.toml, ptb-medium, ptb-large)")
    ids = torch.tensor(encode_file(args.data, lm.tokenizer).ids, dtype=torch.long)
    targets = len(ids) - 1
    print(f"# {args.run}: {lm.num_parameters:,} parameters; {args.data}: {targets:,} targets at batch 1; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| computation | test ppl | against wordlm | seconds |")
    print("| --- | ---: | ---: | ---: |")
    t0 = time.perf_counter()
    base = lm.evaluate(args.data, batch_size=1)["ppl"]
    print(f"| wordlm eval, batch 1 (nn.LSTM, IEEE fp32) | {base:.3f} | - | {time.perf_counter() - t0:.0f} |",
          flush=True)
    ppls = {"wordlm": base}
    for key, name, rnd in (("ieee", "emulated IEEE fp32", lambda t: t),
                           ("tf32_nearest", "emulated TF32, rounded to nearest", lambda t: to_tf32(t, True)),
                           ("tf32_truncated", "emulated TF32, truncated", lambda t: to_tf32(t, False))):
        t0 = time.perf_counter()
        ppls[key] = ppl = math.exp(emulated_nll(model, ids, rnd) / targets)
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.3f}% | {time.perf_counter() - t0:.0f} |",
              flush=True)
    print(json.dumps({"targets": targets, "ppl": ppls}))  # the figures unrounded, for scripts


if __name__ == "__main__":
    main()
