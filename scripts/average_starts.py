"""When should NT-ASGD's average start? One training run answers it for several starts at once.

    python scripts/average_starts.py --config configs/ptb-awd-gpu-asgd.toml --out runs/starts \\
        --starts 0.4,0.5,0.6,0.7,0.8 --set train.nonmono=1000 [--test] [--set KEY=VALUE ...]

Trains the config as `wordlm train` does (its own average, best/ and last/ included) and keeps beside it one
running average of the iterates for each fraction in --starts: the average that `--set train.average_after=F`
would have made, started by the same rule (the first step at which the fraction of the run that has passed, of
its steps or of its time budget, is at least F). Starting an average does not touch the training RNG, so all of
them average one and the same trajectory: the table compares the starts and nothing else, in the time of one run.
Each extra average costs one in-place lerp over the weights a step.

At the end each average, and the last raw iterate, is written as a checkpoint OUT/avg-F/ (OUT/raw/), which
`wordlm eval` and `wordlm eval --dynamic` read. Then each of them, and the run's own best/, is evaluated on the
validation text (as training validates: train.eval_batch_size streams, train.precision), and with --test on the
test text at batch 1 in fp32 (as papers report; with CUDA graphs on a GPU), best validation first (--test-top N:
only the N best). Each figure is printed, and OUT/average_starts.json rewritten, as soon as it is known, so a
call cut short keeps what it had; a table of all of them closes the output. Picking the start by validation and
reporting that start's test figure is model selection on validation, as NT-ASGD's own trigger is.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

import wordlm.train as training
from wordlm.api import LanguageModel
from wordlm.checkpoint import save_checkpoint
from wordlm.config import load_config
from wordlm.errors import WordLMError
from wordlm.model import build_model, num_parameters


class _Shadow:
    """One extra running average of the iterates, from the first step at which the run fraction reaches `start`."""

    def __init__(self, start: float):
        self.start, self.model, self.pairs, self.n, self.from_step = start, None, None, 0, None


class _StartsLoop(training._Loop):
    """The training loop with the extra averages of `starts` (set by main before training)."""

    starts: list[float] = []
    finished: list = []  # the loop of the run, for main to read the averages from after train() returns

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.dist.world > 1:
            raise WordLMError("scripts/average_starts.py runs in one process: drop --nproc")
        self.shadows = [_Shadow(f) for f in self.starts]
        _StartsLoop.finished.append(self)

    def _average_step(self) -> None:
        super()._average_step()
        fraction = self._run_fraction()
        for s in self.shadows:
            if s.model is None and fraction >= s.start:
                with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                    s.model = build_model(self.cfg.model, self.tokenizer.vocab_size, self.device)
                s.model.load_state_dict(self.model.state_dict())
                s.pairs = ([t.detach() for t in (*s.model.parameters(), *s.model.buffers())],
                           [t.detach() for t in (*self.model.parameters(), *self.model.buffers())])
                s.n, s.from_step = 1, self.step
            elif s.model is not None:  # the update of _Loop._update_average
                torch._foreach_lerp_(s.pairs[0], s.pairs[1], 1.0 / (s.n + 1))
                s.n += 1


def _evaluate(path: Path, cfg, device: str, test: bool) -> dict:
    """Validation as training validates (train.eval_batch_size streams, train.precision), or with `test` the test
    text at batch 1 in fp32, as papers report (with CUDA graphs on a GPU)."""
    lm = LanguageModel.load(path, device=device)
    if not test:
        return {"valid_ppl": lm.evaluate(cfg.data.valid, batch_size=cfg.train.eval_batch_size)["ppl"]}
    graphs = lm.device.type == "cuda" and cfg.model.decoder != "adaptive"
    return {"test_ppl": lm.evaluate(cfg.data.test, batch_size=1, precision="fp32", cuda_graphs=graphs)["ppl"]}


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    return "-" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--starts", required=True, help="comma-separated fractions of the run in [0, 1), e.g. 0.4,0.6")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override a key, as wordlm train")
    ap.add_argument("--test", action="store_true", help="also the test text at batch 1 in fp32")
    ap.add_argument("--test-top", type=int, default=0, metavar="N",
                    help="with --test: only the N best on validation (default: all)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        starts = sorted({float(f) for f in args.starts.split(",")})
    except ValueError:
        print(f"error: --starts takes fractions separated by commas, e.g. 0.4,0.6; got {args.starts!r}",
              file=sys.stderr)
        return 2
    if args.test_top < 0:
        print(f"error: --test-top must be >= 0 (0 = all), got {args.test_top}", file=sys.stderr)
        return 2
    if not starts or not all(0.0 <= f < 1.0 for f in starts):
        print(f"error: each of --starts must be in [0, 1); got {args.starts!r}", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.sets)
        _StartsLoop.starts, _StartsLoop.finished = starts, []
        original, training._Loop = training._Loop, _StartsLoop
        try:
            t0 = time.perf_counter()
            result = training.train(cfg, args.out, overwrite=args.overwrite)
            wall = time.perf_counter() - t0
        finally:
            training._Loop = original
        loop = _StartsLoop.finished[-1]
        info = {"step": result.steps, "epoch": result.epochs_done, "tokens": result.tokens,
                "num_parameters": num_parameters(result.model)}
        kw = dict(config=cfg, tokenizer=loop.tokenizer, info=info)
        # Every checkpoint first (seconds), so that a call cut short while evaluating leaves all of them to read.
        own_row = {"average": "the run's own (best/)", "from_step": None, "iterates": loop.n_averaged}
        if loop.averaged is not None:
            started = [json.loads(ln) for ln in (args.out / "metrics.jsonl").read_text().splitlines()
                       if '"averaging"' in ln]
            own_row["from_step"] = started[-1]["step"] if started else None
        models = [(own_row, args.out / "best"),
                  ({"average": "none: the last iterate (raw/)", "from_step": None, "iterates": 1},
                   save_checkpoint(args.out / "raw", model_state=result.model.state_dict(), **kw))]
        for s in loop.shadows:
            if s.model is None:
                models.append(({"average": f"from {s.start:g} (not reached)", "from_step": None, "iterates": 0}, None))
            else:
                path = save_checkpoint(args.out / f"avg-{s.start:g}", model_state=s.model.state_dict(), **kw)
                models.append(({"average": f"from {s.start:g} ({path.name}/)", "from_step": s.from_step,
                                "iterates": s.n}, path))
        summary = {"config": str(args.config), "sets": args.sets, "steps": result.steps,
                   "epochs": result.epochs_done, "train_s": round(result.elapsed_s, 1),
                   "train_wall_s": round(wall, 1), "rows": []}
        print(f"# {args.config} {' '.join('--set ' + s for s in args.sets)}: {result.steps} steps, "
              f"{result.epochs_done:g} epochs, {result.elapsed_s:.0f} s of training ({result.stop_reason})")

        def record() -> None:
            summary["eval_s"] = round(time.perf_counter() - t0 - wall, 1)
            summary["rows"] = [r for r, _ in models]
            (args.out / "average_starts.json").write_text(json.dumps(summary, indent=1) + "\n")

        # Validation first, for every average (quick), each line as soon as it is known, and the JSON with it;
        # then the test passes, best validation first, so that a call cut short keeps the ones that matter.
        print("| average | from step | iterates | valid ppl |")
        print("| --- | ---: | ---: | ---: |", flush=True)
        for row, path in models:
            if path is not None:
                row.update(_evaluate(path, cfg, str(loop.device), test=False))
            record()
            print(f"| {row['average']} | {_cell(row, 'from_step')} | {row['iterates']} | "
                  f"{_cell(row, 'valid_ppl')} |", flush=True)
        if args.test and cfg.data.test:
            ranked = sorted((m for m in models if m[1] is not None), key=lambda m: m[0]["valid_ppl"])
            for row, path in ranked[:args.test_top or None]:
                row.update(_evaluate(path, cfg, str(loop.device), test=True))
                record()
                print(f"test: {row['average']}: ppl {row['test_ppl']:.2f}", flush=True)
        print("| average | from step | iterates | valid ppl | test ppl (batch 1, fp32) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for row, _ in models:
            print(f"| {row['average']} | {_cell(row, 'from_step')} | {row['iterates']} | {_cell(row, 'valid_ppl')} | "
                  f"{_cell(row, 'test_ppl')} |")
        print(f"# evaluation: {summary['eval_s']:.0f} s")
    except WordLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
