"""GPU training throughput: wordlm's training loop against a raw nn.LSTM step, measured in one process.

The model is the medium one of Zaremba et al. (2x650 LSTM, 10,000-word Penn Treebank vocabulary, dropout 0.5,
untied, full softmax), at batch 20 in fp32 and at batch 128 in bf16 autocast, sequence length 35.

- raw step: embedding -> nn.LSTM -> linear -> cross-entropy, backward, clip_grad_norm_, a per-parameter SGD
  update, as the word_language_model example does it, but with no host sync at all: the steps are timed with
  CUDA events around the whole run. This is the ceiling a training loop can approach.
- example loop: the same step plus the example's `loss.item()` every step (one host sync per step).
- wordlm: wordlm.train.train() on configs/ptb-medium.toml with the same batch and precision; its tokens/s is
  read from the metrics.jsonl that loop writes (the first log interval, the warm-up, excluded);
- wordlm, cuda_graphs: the same with train.cuda_graphs = true (the step recorded once, then replayed).

With --repeat N every column is measured N times, the columns taking turns, and the median is printed (the
spread goes to the JSON lines): on the H200, two columns measured one after the other once differed by 7%
where they should not have differed at all.

    python benchmarks/gpu.py --data ../shared/data/ptb           # about a minute on one H200
    python benchmarks/gpu.py --device cpu --steps 3 --hidden 64  # a smoke run of the script itself
    python benchmarks/gpu.py --profile 100                         # where the gap between the two goes
    python benchmarks/gpu.py --validation                          # a validation pass, eager vs recorded
    python benchmarks/gpu.py --config configs/ptb-awd-gpu.toml --batch-sweep 20,40,80   # a config's own model:
                                     # ms per step and epochs per budget at each batch size (about 40 s)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from wordlm.config import load_config  # noqa: E402
from wordlm.data import Streams, encode_file, iter_lines  # noqa: E402
from wordlm.evaluate import autocast, bf16_refusal, bf16_supported, total_nll  # noqa: E402
from wordlm.tokenizer import fit_tokenizer  # noqa: E402
from wordlm.train import train  # noqa: E402

SEQ = 35


def precisions(device: torch.device) -> tuple[str, ...]:
    """fp32 and bf16, or fp32 alone on a CPU without bf16 kernels (a smoke run there; `note` says so)."""
    return ("fp32", "bf16") if bf16_supported(device) else ("fp32",)


def note(device: torch.device) -> str:
    """The header line that says bf16 was left out, if it was."""
    return "" if bf16_supported(device) else f"# bf16 left out: {bf16_refusal(device)}\n"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class Plain(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.encoder = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, 2, dropout=0.5)
        self.drop = nn.Dropout(0.5)
        self.decoder = nn.Linear(hidden, vocab)
        for p in self.parameters():
            nn.init.uniform_(p, -0.05, 0.05)

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return self.decoder(self.drop(out)), hidden


def raw_loop(ids: torch.Tensor, vocab: int, hidden: int, batch: int, precision: str, steps: int,
             device: torch.device, item_every_step: bool) -> float:
    """Tokens/s of the plain step over `steps` steps after a warm-up."""
    torch.manual_seed(0)
    model = Plain(vocab, hidden).to(device)
    crit = nn.CrossEntropyLoss()
    n = ids.numel() // batch
    data = ids[: n * batch].view(batch, n).t().contiguous().to(device)
    state, i, lr = None, 0, 20.0
    warmup = 10

    def step():
        nonlocal state, i
        if i + SEQ + 1 >= n:
            i, state = 0, None
        x, y = data[i: i + SEQ], data[i + 1: i + 1 + SEQ]
        i += SEQ
        if state is not None:
            state = tuple(h.detach() for h in state)
        model.zero_grad()
        with autocast(device, precision):
            out, state = model(x, state)
            loss = crit(out.view(-1, vocab).float(), y.reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-lr)
        if item_every_step:
            loss.item()

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch * SEQ / (time.perf_counter() - t0)


def wordlm_loop(config: Path, data: Path, hidden: int, batch: int, precision: str, steps: int,
                device: torch.device, tmp: Path, graphs: bool = False) -> float:
    log_every = max(1, steps // 5)
    small_valid = tmp / "valid-head.txt"  # the closing validation is not what is measured
    with open(data / "valid.txt", encoding="utf-8") as f:
        small_valid.write_text("".join(f.readline() for _ in range(20)))
    cfg = load_config(config, [
        f"data.train={data / 'train.txt'}", f"data.valid={small_valid}", f"data.test={data / 'test.txt'}",
        f"model.embedding_size={hidden}", f"model.hidden_size={hidden}", f"train.batch_size={batch}",
        f"train.precision={precision}", f"train.device={device.type}", "train.epochs=0",
        "train.eval_every=1000000",  # no validation (and checkpoint) at an epoch boundary inside the timed steps
        f"train.max_steps={steps + log_every}", f"train.log_every={log_every}", "train.save_every=0",
        f"train.cuda_graphs={'true' if graphs else 'false'}"])
    out = tmp / f"run-{batch}-{precision}"
    train(cfg, out, overwrite=True)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    tr = [r for r in recs if r["event"] == "train"]
    intervals = [(b["tokens"] - a["tokens"], b["tokens_per_s"]) for a, b in zip(tr, tr[1:], strict=False)]
    return sum(n for n, _ in intervals) / sum(n / rate for n, rate in intervals)


def batch_sweep_rows(config: Path, data: Path, batches: list[int], steps: int, device: torch.device,
                     overrides: list[str], tmp: Path) -> list[dict]:
    """A config's own model and recipe (cuda_graphs and precision as the config says, on CUDA), trained for
    `steps` timed steps at each batch size with fixed-length windows (train.variable_bptt off: one recording),
    no validation inside the timed steps. Each row: tokens/s and ms per step of the log intervals after the
    first (the warm-up and recording), and what the config's time budget would hold at that pace."""
    log_every = max(1, steps // 5)
    small_valid = tmp / "valid-head.txt"
    with open(data / "valid.txt", encoding="utf-8") as f:
        small_valid.write_text("".join(f.readline() for _ in range(20)))
    rows = []
    for batch in batches:
        cfg = load_config(config, [
            f"data.train={data / 'train.txt'}", f"data.valid={small_valid}", f"data.test={data / 'test.txt'}",
            *overrides, f"train.batch_size={batch}", f"train.device={device.type}", "train.epochs=0",
            "train.variable_bptt=false", "train.eval_every=1000000", "train.time_budget_s=0",
            f"train.max_steps={steps + log_every}", f"train.log_every={log_every}", "train.save_every=0",
            *([] if device.type == "cuda" else ["train.cuda_graphs=false"])])
        budget = load_config(config, [*overrides, "train.cuda_graphs=false"]).train.time_budget_s
        out = tmp / f"sweep-{batch}"
        train(cfg, out, overwrite=True)
        recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        tr = [r for r in recs if r["event"] == "train"]
        intervals = [(b["tokens"] - a["tokens"], b["tokens_per_s"]) for a, b in zip(tr, tr[1:], strict=False)]
        tok_s = sum(n for n, _ in intervals) / sum(n / rate for n, rate in intervals)
        tokens_per_step = batch * cfg.train.seq_len
        train_tokens = tr[-1]["tokens"] / tr[-1]["epoch"]
        row = {"batch": batch, "tokens_per_s": tok_s, "ms_per_step": tokens_per_step / tok_s * 1000,
               "cuda_graphs": cfg.train.cuda_graphs, "precision": cfg.train.precision, "budget_s": budget}
        if budget:
            row["steps_in_budget"] = budget * tok_s / tokens_per_step
            row["epochs_in_budget"] = budget * tok_s / train_tokens
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def suggest_batch(rows: list[dict], keep: float = 0.6) -> int:
    """The batch for a time-budgeted run: the smallest one that keeps at least `keep` of the largest batch's
    tokens/s. Why 0.6: the AWD recipe at batch 40, with 0.70 of batch 80's tokens/s on an H100, read test 61.25
    in 507 s where batch 80 read 64.09 in 521 s (docs/RESULTS.md); its rule was then 0.7, and batch 40's 0.698
    missed it. Batch 20 (0.46 of batch 80's tokens/s on an H100 and on an H200), which the rule leaves out, read
    test 63.00 in a 519 s budget on an H200, worse than batch 40."""
    top = max(rows, key=lambda r: r["batch"])
    ok = [r["batch"] for r in rows if r["tokens_per_s"] >= keep * top["tokens_per_s"]]
    return min(ok)


def use_rows(config: Path, data: Path, hidden: int, device: torch.device) -> dict:
    """Evaluation tokens/s (valid, batch 10) and one-stream next-token latency of the untrained 2x650 model."""
    from wordlm.generate import continue_ids
    from wordlm.model import build_model

    cfg = load_config(config, [f"model.embedding_size={hidden}", f"model.hidden_size={hidden}"])
    tok = fit_tokenizer(cfg.tokenizer, lambda: iter_lines(data / "train.txt"))
    model = build_model(cfg.model, tok.vocab_size, device).eval()
    streams = Streams(encode_file(data / "valid.txt", tok).ids, 10, device)
    out = {}
    for precision in precisions(device):
        total_nll(model, streams, SEQ, precision)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        total_nll(model, streams, SEQ, precision)
        sync(device)
        out[f"eval_{precision}_tokens_per_s"] = streams.targets / (time.perf_counter() - t0)
    gen = continue_ids(model, [tok.eos_id], 201, seed=0)
    next(gen)
    t0 = time.perf_counter()
    for _ in gen:
        pass
    out["next_token_ms"] = (time.perf_counter() - t0) / 200 * 1000
    return out


class _RunAgain:
    """Off CUDA (a smoke run of the script): a "recording" that runs the window's Python again on each replay."""

    eager = staticmethod(contextlib.nullcontext)

    @staticmethod
    def capture(fn):
        return fn


def validation_rows(config: Path, data: Path, hidden: int, device: torch.device, repeat: int = 3) -> list[dict]:
    """Validation as training runs it (the valid split at 20 streams, ptb-medium-gpu's eval_batch_size), eager
    (evaluate.total_nll) against train.cuda_graphs' recorded windows, seconds per pass (median of `repeat`, the
    two taking turns), and how far apart their perplexities are."""
    import math

    from wordlm.graphs import CudaGraphs, RecordedEvaluation
    from wordlm.model import build_model

    cfg = load_config(config, [f"model.embedding_size={hidden}", f"model.hidden_size={hidden}"])
    tok = fit_tokenizer(cfg.tokenizer, lambda: iter_lines(data / "train.txt"))
    model = build_model(cfg.model, tok.vocab_size, device)
    streams = Streams(encode_file(data / "valid.txt", tok).ids, 20, device)
    rows = []
    for precision in precisions(device):
        recorded = RecordedEvaluation(CudaGraphs() if device.type == "cuda" else _RunAgain())
        for _ in range(2):  # warm-up; the second pass records the window lengths
            total_nll(model, streams, SEQ, precision)
            recorded.total_nll(model, streams, SEQ, precision)
        times: dict = {"eager": [], "recorded": []}
        nll = {}
        for _ in range(repeat):
            for name, run in (("eager", total_nll), ("recorded", recorded.total_nll)):
                t0 = time.perf_counter()
                nll[name], n = run(model, streams, SEQ, precision)  # ends with a host read: the pass is done
                times[name].append(time.perf_counter() - t0)
        eager, rec = statistics.median(times["eager"]), statistics.median(times["recorded"])
        rows.append({"precision": precision, "tokens": n, "eager_s": eager, "recorded_s": rec,
                     "ppl_eager": math.exp(nll["eager"] / n), "ppl_recorded": math.exp(nll["recorded"] / n),
                     "times": times})
    return rows


def profile(args, device: torch.device) -> None:
    """Where a step's time goes, raw step against wordlm's loop: operators by total device (or CPU) time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cfg = load_config(args.config, [f"data.train={args.data / 'train.txt'}"])
    tok = fit_tokenizer(cfg.tokenizer, lambda: iter_lines(args.data / "train.txt"))
    ids = torch.from_numpy(encode_file(args.data / "train.txt", tok).ids[:].astype("int64"))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with tempfile.TemporaryDirectory() as tmp:
        for name, run in (("raw step", lambda: raw_loop(ids, tok.vocab_size, args.hidden, 20, "fp32", args.profile,
                                                          device, False)),
                          ("wordlm", lambda: wordlm_loop(args.config, args.data, args.hidden, 20, "fp32",
                                                         args.profile, device, Path(tmp)))):
            run()  # warm: cuDNN plans, the id cache
            with torch_profile(activities=activities) as prof:
                run()
            print(f"\n## {name}: {args.profile} steps (plus warm-up and, for wordlm, its setup)\n")
            print(prof.key_averages().table(sort_by=sort, row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "ptb")
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "ptb-medium.toml")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per row")
    ap.add_argument("--hidden", type=int, default=650)
    ap.add_argument("--repeat", type=int, default=1, help="measure every column N times, in turns; print medians")
    ap.add_argument("--no-graphs", action="store_true", help="leave out the cuda_graphs column")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--validation", action="store_true",
                    help="instead of the table: time one validation pass, eager against cuda_graphs' recording")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="instead of the table: profile N steps of the raw step and of wordlm's loop at batch 20 "
                         "and print where the time goes (the per-step gap between the two)")
    ap.add_argument("--batch-sweep", metavar="B,B,...",
                    help="instead of the table: --config's own model at these batch sizes (ms per step, epochs in "
                         "the config's time budget)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="with --batch-sweep: a config override (a smoke run: --set model.hidden_size=32 ...)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.profile:
        return profile(args, device)
    if args.batch_sweep:
        name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
        batches = [int(b) for b in args.batch_sweep.split(",")]
        print(f"# device: {name}; torch {torch.__version__}; {args.config.name} {' '.join(args.set)}; "
              f"{args.steps} timed steps per batch size, fixed windows\n")
        with tempfile.TemporaryDirectory() as tmp:
            rows = batch_sweep_rows(args.config, args.data, batches, args.steps, device, args.set, Path(tmp))
        print("\n| batch | tokens/s | ms per step | steps in the budget | epochs in the budget |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for r in rows:
            print(f"| {r['batch']} | {r['tokens_per_s']:,.0f} | {r['ms_per_step']:.2f} | "
                  f"{r.get('steps_in_budget', 0):,.0f} | {r.get('epochs_in_budget', 0):.1f} |")
        print(f"\n(budget: train.time_budget_s = {rows[0]['budget_s']:g} s, validation and recordings not counted; "
              f"cuda_graphs {rows[0]['cuda_graphs']}, {rows[0]['precision']})")
        print(f"suggested batch: {suggest_batch(rows)} (the smallest with at least 0.6 of the largest batch's "
              f"tokens/s)")
        return
    if args.validation:
        name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
        print(f"# device: {name}; torch {torch.__version__}; validation, {args.hidden}x2, "
              f"20 streams, windows of {SEQ}\n{note(device)}")
        print("| precision | tokens | eager pass | recorded pass | eager / recorded | valid ppl eager | recorded |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in validation_rows(args.config, args.data, args.hidden, device):
            print(f"| {r['precision']} | {r['tokens']:,} | {r['eager_s'] * 1000:.1f} ms | "
                  f"{r['recorded_s'] * 1000:.1f} ms | {r['eager_s'] / r['recorded_s']:.2f}x | "
                  f"{r['ppl_eager']:.4f} | {r['ppl_recorded']:.4f} |")
            print(json.dumps(r), flush=True)
        return
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"# device: {name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"# command: python benchmarks/gpu.py --data {args.data} --steps {args.steps} --repeat {args.repeat}"
          + (f" --device {args.device} --hidden {args.hidden}" if args.device != "cuda" or args.hidden != 650 else ""))
    print(note(device), end="")
    cfg = load_config(args.config, [f"data.train={args.data / 'train.txt'}"])
    tok = fit_tokenizer(cfg.tokenizer, lambda: iter_lines(args.data / "train.txt"))
    ids = torch.from_numpy(encode_file(args.data / "train.txt", tok).ids[:].astype("int64"))
    columns = {
        "raw": lambda b, p, tmp: raw_loop(ids, tok.vocab_size, args.hidden, b, p, args.steps, device, False),
        "example": lambda b, p, tmp: raw_loop(ids, tok.vocab_size, args.hidden, b, p, args.steps, device, True),
        "wordlm": lambda b, p, tmp: wordlm_loop(args.config, args.data, args.hidden, b, p, args.steps, device, tmp),
        "graphs": lambda b, p, tmp: wordlm_loop(args.config, args.data, args.hidden, b, p, args.steps, device, tmp,
                                                graphs=True),
    }
    if args.no_graphs or device.type != "cuda":
        del columns["graphs"]
    rows, kinds = [], precisions(device)
    with tempfile.TemporaryDirectory() as tmp:
        for batch, precision in ((20, "fp32"), (128, "bf16")):
            if precision not in kinds:
                continue
            runs = {name: [] for name in columns}
            for _ in range(args.repeat):
                for name, measure in columns.items():
                    runs[name].append(measure(batch, precision, Path(tmp)))
            r = {"batch": batch, "precision": precision, **{k: statistics.median(v) for k, v in runs.items()},
                 "runs": runs}
            rows.append(r)
            print(json.dumps(r), flush=True)
    use = use_rows(args.config, args.data, args.hidden, device)
    print(f"\n## training tokens/s, {args.hidden}x2 LSTM, 10k vocabulary, seq {SEQ}\n")
    graphs = "graphs" in columns
    print(f"(median of {args.repeat} run(s) per cell, the columns taking turns)\n")
    print("| batch | precision | raw step (no sync) | example loop (.item() per step) | wordlm | wordlm / raw |"
          + (" wordlm, cuda_graphs | cuda_graphs / raw |" if graphs else ""))
    print("| ---: | --- | ---: | ---: | ---: | ---: |" + (" ---: | ---: |" if graphs else ""))
    for r in rows:
        print(f"| {r['batch']} | {r['precision']} | {r['raw']:,.0f} | {r['example']:,.0f} | {r['wordlm']:,.0f} | "
              f"{r['wordlm'] / r['raw']:.2f}x |"
              + (f" {r['graphs']:,.0f} | {r['graphs'] / r['raw']:.2f}x |" if graphs else ""))
    evals = ", ".join(f"{use[f'eval_{p}_tokens_per_s']:,.0f} tok/s {p}" for p in kinds)
    print(f"\nevaluation (valid, batch 10): {evals}; next-token latency (one stream): {use['next_token_ms']:.2f} ms")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows, **use}, indent=1))


if __name__ == "__main__":
    main()
