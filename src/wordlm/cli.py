"""The `wordlm` command line: each command parses its arguments, calls one plain function, and prints.

torch is imported inside the commands, so `wordlm --help` answers at once. Errors of wordlm's own types become
one line on stderr and a non-zero exit code.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import warnings
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from . import __version__
from .errors import WordLMError, options

app = typer.Typer(
    name="wordlm",
    help="Train and use next-word LSTM language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _path(value: str | Path) -> Path:
    """A path argument. An empty one (`--out "$RUN"` with RUN unset) is refused: as a Path it would be the current
    directory, where a run would write its files among the user's own."""
    if isinstance(value, Path):
        return value
    if not value.strip():
        raise typer.BadParameter("is empty; give a path (an unset shell variable?)")
    return Path(value)


def _path_option(*names: str, help: str):
    """A path option: an empty value refused (see _path), shown as <path> in --help like the other types."""
    return typer.Option(*names, parser=_path, metavar="<path>", help=help)


RunArg = Annotated[Path, typer.Argument(parser=_path, metavar="RUN",
                                        help="a run directory (uses best/) or a checkpoint directory")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"wordlm {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool | None, typer.Option("--version", callback=_version, is_eager=True,
                                                    help="print the version and exit")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="only warnings and errors on stderr")] = False,
) -> None:
    """Train and use next-word LSTM language models."""
    logger = logging.getLogger("wordlm")
    logger.handlers = [_EchoHandler()]
    side_rank = os.environ.get("RANK", "0") != "0"  # under torchrun, rank 0 tells how the run goes
    logger.setLevel(logging.WARNING if quiet or side_rank else logging.INFO)
    logger.propagate = False
    # PyTorch's note that oneDNN has no LSTM with projections comes with its source path on every command that
    # runs such a model on the CPU; training says it once in its own words (train.py), the rest need not.
    warnings.filterwarnings("ignore", message="LSTM with projections is not supported with oneDNN")


class _EchoHandler(logging.Handler):
    """wordlm's log lines go, unadorned, to whatever sys.stderr is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            typer.echo(record.getMessage(), err=True)
        except BrokenPipeError:  # the log's reader went away (`wordlm train ... 2>&1 | head`): the work goes on
            pass


def _cli(fn):
    """Turn wordlm's own errors into `error: ...` on stderr and the error's exit code; what the machine refuses
    (a full disk, a missing permission, memory) into one such line and exit 1; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except WordLMError as e:
            problems = getattr(e, "problems", None)
            if problems and len(problems) > 1:
                _say(f"error: {len(problems)} problems in the configuration:", *(f"  - {p}" for p in problems))
            else:
                _say(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            _say("interrupted")
            raise typer.Exit(130) from None
        except BrokenPipeError:  # the reader went away (`wordlm generate ... | head`) with what it wanted: a
            _quiet_stdout()      # normal end, exit 0, as when the output fitted in the pipe before head exited
            raise typer.Exit(0) from None
        except RuntimeError as e:  # torch.OutOfMemoryError (a GPU) is one; the CPU allocator's is a plain one
            if not _out_of_memory(e):
                raise
            _say(f"error: out of memory{_allocation(e)}; use a smaller model (model.hidden_size, "
                 f"model.num_layers), batch (train.batch_size, --batch-size) or window (train.seq_len)")
            raise typer.Exit(1) from None
        except OSError as e:  # the file system refused (a full disk, no permission): not a bug, no traceback
            where = f"{e.filename}: " if e.filename else ""
            _say(f"error: {where}{e.strerror or e}; check the path, its permissions and the free disk space")
            raise typer.Exit(1) from None

    return wrapper


def _options(**names: str):
    """Messages from the Python API name its keywords as these options while the command runs."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with options(**names):
                return fn(*args, **kwargs)

        return wrapper

    return decorate


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that flushing what is left of it (at exit) meets no closed pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no real file behind stdout (a test runner's capture)
        pass


_RANK_ERRORS = "WORDLM_RANK_ERRORS"  # set by `train --nproc`: where each rank leaves its error lines
_RANK_DONE = "WORDLM_RANK_DONE"  # and where each rank marks that its run finished (saved, process group closed)


def _say(*lines: str) -> None:
    """An error's lines, on stderr; a rank started by `train --nproc` leaves them for the launcher instead, which
    prints each different one once (every rank usually meets the same bad input)."""
    folder = os.environ.get(_RANK_ERRORS)
    if folder and os.path.isdir(folder):
        with open(os.path.join(folder, f"rank{int(os.environ.get('RANK', '0')):05d}"), "a") as f:
            f.write("".join(line + "\n" for line in lines))
        return
    for line in lines:
        typer.echo(line, err=True)


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'s' * (n != 1)}"


def _ppl(loss: float) -> str:
    """exp(loss) to two decimals; inf where it overflows (the metrics file caps it at exp(700) to stay JSON)."""
    from .evaluate import perplexity

    return f"{perplexity(loss):.2f}"


def _out_of_memory(e: RuntimeError) -> bool:
    text = str(e)
    return type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in text or "out of memory" in text


def _allocation(e: RuntimeError) -> str:
    """' (tried to allocate 52.9 GiB)' from the allocator's message, or ''."""
    m = re.search(r"allocate (\d+) bytes", str(e))
    if m:
        return f" (tried to allocate {int(m.group(1)) / 2**30:.1f} GiB)"
    m = re.search(r"[Tt]ried to allocate ([\d.]+ [KMGT]i?B)", str(e))
    return f" (tried to allocate {m.group(1)})" if m else ""


@app.command()
@_cli
def train(
    config: Annotated[Path | None, _path_option("--config", "-c", help="TOML config (see configs/)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key: --set train.lr=0.5")] = None,
    out: Annotated[Path | None, _path_option(help="run directory (default: runs/CONFIG_NAME)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last/ checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in --out")] = False,
    progress: Annotated[bool | None, typer.Option(help="progress bar (default: when stderr is a terminal)")]
    = None,
    nproc: Annotated[int, typer.Option(min=1, help="data-parallel processes on this machine (runs torchrun)")] = 1,
) -> None:
    """Train a model: writes OUT/best/, OUT/last/, OUT/config.toml and OUT/metrics.jsonl."""
    from .config import load_config
    from .errors import CheckpointError, ConfigError

    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; choose one")
    if config is None:
        if not (resume and out is not None):
            raise ConfigError("give --config PATH (e.g. configs/demo.toml), or --out RUN --resume to continue a run")
        config = out / "config.toml"
        if not out.is_dir():
            raise CheckpointError(f"nothing to resume: {out} does not exist; start a run with --config PATH")
        if not config.is_file():
            raise CheckpointError(f"nothing to resume in {out}: it has no config.toml; give the run's --config PATH")
    cfg = load_config(config, set_ or [])  # a bad config fails here, before any process is started
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        _check_nproc(nproc, cfg.train.device)
        _torchrun(nproc)
    out = out or Path("runs") / config.stem

    from .train import train as run_training

    result = run_training(cfg, out, resume=resume, overwrite=overwrite,
                          progress=sys.stderr.isatty() if progress is None else progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for all
        typer.echo(f"{result.stop_reason}: {_count(result.steps, 'step')}, {result.epochs_done:g} epochs, "
                   f"{result.tokens:,} tokens in {result.elapsed_s:.1f}s; peak memory {result.peak_mem_mb:,.0f} MiB")
        typer.echo(f"best validation: loss {result.best_valid_loss:.4f}, ppl {_ppl(result.best_valid_loss)}")
        typer.echo(f"checkpoints: {out / 'best'}  {out / 'last'}")
        sys.stdout.flush()
    done = os.environ.get(_RANK_DONE)
    if done and os.path.isdir(done):
        open(os.path.join(done, f"rank{int(os.environ.get('RANK', '0')):05d}"), "w").close()


def _check_nproc(nproc: int, device: str) -> None:
    """Before any process starts: on GPUs each process takes one of its own; on the CPU, processes beyond the
    cores take turns."""
    import torch

    from .errors import ConfigError
    from .model import resolve_device

    if resolve_device(device).type == "cuda":
        gpus = torch.cuda.device_count()
        if nproc > gpus:
            raise ConfigError(f"--nproc {nproc} runs one process per GPU, but {gpus} GPU{'s' * (gpus != 1)} "
                              f"{'is' if gpus == 1 else 'are'} visible: use --nproc {gpus} or fewer")
    elif nproc > (os.cpu_count() or 1):
        logging.getLogger("wordlm").warning(
            "warning: --nproc %d is more processes than this machine's %d CPU cores: they will take turns on them",
            nproc, os.cpu_count() or 1)


def _torchrun(nproc: int) -> None:
    """Run this same command under torchrun with `nproc` processes, then exit with the code of the rank that
    failed first. An error every rank met is printed once, without torchrun's traceback."""
    args, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            args.append(a)
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    code = 0
    with tempfile.TemporaryDirectory(prefix="wordlm-ranks-") as tmp:
        errors, done, logs = (os.path.join(tmp, name) for name in ("errors", "done", "torchrun"))
        os.mkdir(errors)
        os.mkdir(done)
        # torchrun's own log folder: left to itself it makes a torchelastic_* folder in the temp dir per run and
        # never removes it; here it goes with the rest.
        launch = get_args_parser().parse_args(["--standalone", f"--nproc_per_node={nproc}", f"--log-dir={logs}",
                                               "-m", "wordlm", *args])
        os.environ[_RANK_ERRORS], os.environ[_RANK_DONE] = errors, done
        os.environ.setdefault("OMP_NUM_THREADS", "1")  # what torchrun would set, without its banner
        logging.disable(logging.CRITICAL)  # torchrun's own failure report: the ranks' lines below say what went wrong
        try:
            run(launch)
        except ChildFailedError as e:
            code = e.get_first_failure()[1].exitcode
            code = code if code > 0 else 128 - code  # killed by a signal: the shell's convention
            if len(os.listdir(done)) == nproc:
                # Every rank had finished: checkpoints written, process group closed, so what failed was a process
                # on its way out, not the run. (The test suite once saw a rank abort with C++'s "terminate called
                # without an active exception" in a run of a few seconds; where it happened is not known.)
                sys.stderr.write(f"warning: a process failed as it exited (exit code {code}), after every process "
                                 f"had finished the run and it was saved; the run is complete\n")
                code = 0
        except SignalException as e:
            code = 128 + int(e.sigval)
        finally:
            logging.disable(logging.NOTSET)
        said: list[str] = []
        for name in sorted(os.listdir(errors)):
            with open(os.path.join(errors, name)) as f:
                text = f.read()
            if text not in said:
                said.append(text)
                sys.stderr.write(text)
    raise typer.Exit(code)


@app.command()
@_cli
def finetune(
    run: RunArg,
    out: Annotated[Path, _path_option(help="run directory for the finetuned model")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a key of the run's config")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in --out")] = False,
    progress: Annotated[bool | None, typer.Option(help="progress bar (default: when stderr is a terminal)")]
    = None,
) -> None:
    """Continue from a run's best weights with a fresh NT-ASGD that averages from the first step, until validation
    stops improving (AWD-LSTM's finetuning: train.stop_nonmono)."""
    from .checkpoint import load_checkpoint
    from .config import Config, parse_override
    from .train import train as run_training

    ck = load_checkpoint(run)
    raw = ck.config.to_dict()
    raw["train"].update(optimizer="ntasgd", average_from_start=True, schedule="constant", stop_nonmono=True)
    for item in set_ or []:
        section, name, value = parse_override(item)
        raw.setdefault(section, {})[name] = value
    cfg = Config.from_dict(raw)
    result = run_training(cfg, out, overwrite=overwrite, init_from=ck.path,
                          progress=sys.stderr.isatty() if progress is None else progress)
    typer.echo(f"{result.stop_reason}: {_count(result.steps, 'step')}; best validation ppl "
               f"{_ppl(result.best_valid_loss)}")
    typer.echo(f"checkpoints: {out / 'best'}  {out / 'last'}")


class Split(StrEnum):
    valid = "valid"
    test = "test"


class Precision(StrEnum):
    fp32 = "fp32"
    bf16 = "bf16"


@app.command("eval")
@_cli
@_options(batch_size="--batch-size", lr="--dyn-lr", decay="--dyn-lambda", seq_len="--dyn-seq-len",
          grid_on="data.valid", device="--device", cuda_graphs="--cuda-graphs", precision="--precision")
def eval_(
    run: RunArg,
    split: Annotated[Split, typer.Option(help="which split of the run's config to read")] = Split.valid,
    data: Annotated[Path | None, _path_option(help="evaluate this text file instead of a split")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="parallel streams; 1 gives every token full context")]
    = 10,
    json_: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
    dynamic: Annotated[bool, typer.Option(help="dynamic evaluation: adapt the weights to the text as it is read "
                                          "(Krause et al. 2018)")] = False,
    dyn_lr: Annotated[float | None, typer.Option(min=0.0, help="dynamic: step size (default: grid search on "
                                                 "the valid split)")] = None,
    dyn_lambda: Annotated[float | None, typer.Option(min=0.0, help="dynamic: decay toward the trained weights "
                                                     "(default: grid search)")] = None,
    dyn_seq_len: Annotated[int, typer.Option(min=1, help="dynamic: tokens per update")] = 20,
    device: Annotated[str, typer.Option(help="auto (the GPU when one is visible), cpu, cuda or cuda:N")] = "auto",
    cuda_graphs: Annotated[bool, typer.Option(help="CUDA only: record the forward pass over a window once per "
                                              "window length and replay it (the same figures, one launch per "
                                              "window)")] = False,
    precision: Annotated[Precision | None, typer.Option(help="fp32, or bf16 autocast (default: the run's "
                                                        "train.precision; papers report fp32)")] = None,
) -> None:
    """Loss (nats/token), perplexity and bits per token, the LSTM state carried through the whole text."""
    from .api import LanguageModel
    from .errors import DataError, UsageError
    from .model import resolve_device

    if cuda_graphs and dynamic:
        raise UsageError("--cuda-graphs records the static forward pass only: drop it with --dynamic")
    if precision == Precision.bf16 and dynamic:
        raise UsageError("dynamic evaluation runs in fp32: drop --precision bf16 with --dynamic")
    lm = LanguageModel.load(run, device=resolve_device(device, knob="--device", fix="--device cpu"))
    path = data if data is not None else getattr(lm.config.data, split.value)
    if not path:
        raise DataError(f"the run's config has no data.{split.value} path; pass --data FILE")
    if dynamic:
        grid_on = lm.config.data.valid if (dyn_lr is None or dyn_lambda is None) else None
        r = lm.evaluate_dynamic(path, dyn_lr, dyn_lambda, batch_size=batch_size, seq_len=dyn_seq_len,
                                grid_on=grid_on)
    else:
        r = lm.evaluate(path, batch_size=batch_size, cuda_graphs=cuda_graphs,
                        precision=precision.value if precision else None)
    r = {"checkpoint": str(lm.path), "data": str(path), **r}
    if r.get("unk_share", 0) > 0.25:  # predicting <unk> is easy: such a perplexity flatters and says little
        logging.getLogger("wordlm").warning(
            "warning: %.0f%% of the tokens of %s are <unk> to this model: is it the text you meant (its language, "
            "its preprocessing)?", 100 * r["unk_share"], path)
    if json_:
        typer.echo(json.dumps(r))
        return
    typer.echo(f"checkpoint  {lm.path}\ndata        {path}")
    typer.echo(f"loss        {r['loss']:.4f} nats/token\nppl         {r['ppl']:.2f}\n"
               f"bits        {r['bits_per_token']:.4f} per token\ntokens      {r['tokens']:,}")
    if "word_ppl" in r:
        typer.echo(f"words       {r['words']:,}\nword ppl    {r['word_ppl']:.2f}")
    if "unk_tokens" in r:
        typer.echo(f"unk         {r['unk_tokens']:,} tokens of the text are <unk> ({r['unk_share']:.2%}): words "
                   f"the model never saw in training, or written <unk>")
    if "dynamic" in r:
        d = r["dynamic"]
        typer.echo(f"dynamic     lr {d['lr']:g}, lambda {d['decay']:g}, {d['seq_len']} tokens per update"
                   + (f" (chosen on the valid split from {len(d['grid'])} settings)" if d["grid"] else ""))


@app.command()
@_cli
@_options(prompt="--prompt", max_tokens="--max-tokens", temperature="--temperature", top_k="--top-k",
          top_p="--top-p", num_samples="--num-samples")
def generate(
    run: RunArg,
    prompt: Annotated[str, typer.Option(help="text to continue")] = "",
    max_tokens: Annotated[int, typer.Option(min=0, help="tokens to generate")] = 50,
    temperature: Annotated[float, typer.Option(help="> 0; below 1 is more conservative")] = 1.0,
    top_k: Annotated[int, typer.Option(help="sample from the k most likely tokens (0 = all)")] = 0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass in (0, 1]")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="the same seed gives the same text")] = None,
    num_samples: Annotated[int, typer.Option(min=1, help="independent samples, drawn as one batch")] = 1,
    interactive: Annotated[bool, typer.Option(help="read prompts from stdin until EOF, the model loaded once")]
    = False,
) -> None:
    """Continue a prompt, streaming the text as it is sampled."""
    from .api import LanguageModel
    from .generate import check_sampling

    check_sampling(temperature, top_k, top_p)
    lm = LanguageModel.load(run)

    def one(text: str) -> None:
        if num_samples == 1:
            pieces = lm.generate(text, max_tokens, temperature, top_k, top_p, seed)  # checks the prompt
            typer.echo(text, nl=False)
            for piece in pieces:
                typer.echo(piece, nl=False)
                sys.stdout.flush()
            typer.echo("")
            return
        outs = [text] * num_samples
        for pieces in lm.generate_many(text, max_tokens, temperature, top_k, top_p, seed, num_samples):
            outs = [o + p for o, p in zip(outs, pieces, strict=True)]
        for i, o in enumerate(outs, 1):
            typer.echo(f"--- sample {i}\n{o}")

    if not interactive:
        one(prompt)
        return
    from .errors import UsageError

    while True:
        if sys.stdin.isatty():
            typer.echo("prompt> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():  # a blank line asks for nothing, as at a shell prompt
            continue
        try:
            one(line.rstrip("\n"))
        except UsageError as e:
            typer.echo(f"error: {e}", err=True)


@app.command()
@_cli
@_options(prompt="--prompt", k="--top")
def predict(
    run: RunArg,
    prompt: Annotated[str, typer.Option(help="the context; the next word is predicted")] = "",
    k: Annotated[int, typer.Option("-k", "--top", min=1, help="how many candidates")] = 10,
    json_: Annotated[bool, typer.Option("--json", help="print a JSON list as the last line")] = False,
) -> None:
    """The k most likely next words after a prompt, with their probabilities (<unk> left out)."""
    from .api import LanguageModel

    lm = LanguageModel.load(run)
    preds = lm.predict(prompt, k)
    if json_:
        typer.echo(json.dumps(preds))
        return
    if lm.tokenizer.kind == "char":
        typer.echo("(candidates are single characters)")
    elif lm.tokenizer.kind == "sentencepiece":
        typer.echo("(whole words assembled from subword pieces by beam search; probabilities are lower bounds)")
    for rank, p in enumerate(preds, 1):
        typer.echo(f"{rank:>3}  {p['prob']:.4f}  {_shown(p['word'])}")


@app.command()
@_cli
def score(
    run: RunArg,
    sentences: Annotated[list[str] | None, typer.Argument(help="sentences to score")] = None,
    file: Annotated[Path | None, _path_option(help="also score each line of this file")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print a JSON list as the last line")] = False,
) -> None:
    """Log-probability and perplexity of sentences, ranked from most to least likely."""
    from .api import LanguageModel
    from .data import iter_lines
    from .errors import UsageError

    items = list(sentences or [])
    if file is not None:
        items += [ln for ln in iter_lines(file, "--file") if ln.strip()]
    if not items:
        raise UsageError("nothing to score; give sentences as arguments or --file FILE")
    lm = LanguageModel.load(run)
    ranked = sorted(lm.score(items), key=lambda r: -r["logprob"])
    if json_:
        typer.echo(json.dumps(ranked))
        return
    for rank, r in enumerate(ranked, 1):
        typer.echo(f"{rank:>3}  logprob {r['logprob']:9.3f}  ppl {r['ppl']:10.2f}  {r['sentence']}")
        typer.echo("     " + " ".join(f"{_shown(t['token'])}:{-t['logprob']:.2f}" for t in r["tokens"]))


def _shown(token: str) -> str:
    """A token as predict and the score breakdown print it: a space (a char model's) or sentencepiece's lone
    word-start piece as a visible mark, not a blank."""
    return token if token.strip() else "␣" * max(1, len(token))


@app.command()
@_cli
def info(
    run: RunArg,
    target_ppl: Annotated[float | None, typer.Option(
        "--target-ppl", min=1.0, help="also report when validation perplexity first reached this (time to "
        "quality)")] = None,
    json_: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Config, parameter count, vocabulary and training summary of a run or checkpoint (of a folder that holds
    only a run's metrics.jsonl, as copied from another machine, or of such a .jsonl file: the training summary)."""
    from .api import LanguageModel
    from .checkpoint import find_checkpoint
    from .errors import CheckpointError, UsageError
    from .plot import metrics_file, summarize

    lm = None
    try:
        find_checkpoint(run)
    except CheckpointError:
        if run.suffix == ".jsonl" and not run.exists():
            raise UsageError(f"{run} does not exist; give a run directory, or a metrics.jsonl file") from None
        if not metrics_file(run).is_file():
            raise
    else:
        lm = LanguageModel.load(run)
    if lm is None:
        run_dir = run
    else:
        run_dir = lm.path.parent if lm.path.name in ("best", "last", ".best.old", ".last.old") else lm.path
    history = summarize(run_dir, target_ppl)
    if lm is None:
        data = {"checkpoint": None, **history}
    else:
        data = {"checkpoint": str(lm.path), "parameters": lm.num_parameters, "vocab_size": lm.tokenizer.vocab_size,
                "tokenizer": lm.tokenizer.kind, "step": lm.meta.get("step"), "valid_loss": lm.meta.get("valid_loss"),
                "config": lm.config.to_dict(), **history}
    if json_:
        typer.echo(json.dumps(data))
        return
    if lm is None:
        typer.echo(f"checkpoint   none in {run}: the summary of its metrics.jsonl alone" if run.is_dir() else
                   f"checkpoint   none: the summary of {run} alone")
        if not history:
            typer.echo(f"history      none: {metrics_file(run)} holds no validation record yet")
    else:
        typer.echo(f"checkpoint   {lm.path}\nparameters   {lm.num_parameters:,}\n"
                   f"vocabulary   {lm.tokenizer.vocab_size:,} ({lm.tokenizer.kind})\nstep         {data['step']}")
    if history:
        typer.echo(f"history      {_count(history['steps'], 'step')}, {history['tokens']:,} tokens, "
                   f"{history['elapsed_s']:.0f}s, {_count(history['validations'], 'validation')}, "
                   f"best valid ppl {history['best_valid_ppl']:.2f} at step {history['best_step']}"
                   + (f"; validation took {history['valid_s_total']:.1f}s" if "valid_s_total" in history else "")
                   + (f"; peak memory {history['peak_mem_mb']:,.0f} MiB" if "peak_mem_mb" in history else ""))
        if "averaging" in history:
            a = history["averaging"]
            typer.echo(f"averaging    NT-ASGD's average from step {a['step']:,} (epoch {a['epoch']:g}), started by "
                       f"{a['trigger']}")
        t = history.get("target")
        if t and t["reached"]:
            typer.echo(f"target       valid ppl <= {t['ppl']:g} first at {t['elapsed_s']:.1f} s (step {t['step']}, "
                       f"epoch {t['epoch']:g}, {t['tokens']:,} tokens; valid ppl {t['valid_ppl']:.2f})")
        elif t:
            typer.echo(f"target       valid ppl <= {t['ppl']:g} not reached")
    elif target_ppl is not None:
        typer.echo(f"target       valid ppl <= {target_ppl:g} not reached (no validation recorded)")
    if lm is None:
        return
    typer.echo("config:")
    typer.echo("\n".join("  " + ln if ln and not ln.startswith("[") else ln for ln in lm.config.to_toml().splitlines()))


@app.command()
@_cli
def plot(
    run: Annotated[Path, typer.Argument(parser=_path, metavar="RUN", help="a run directory (with metrics.jsonl), "
                                        "or a metrics .jsonl file")],
    out: Annotated[Path | None, _path_option(help="PNG to write (default: RUN/curves.png; beside a file "
                                             "X.metrics.jsonl, X.png)")] = None,
) -> None:
    """A PNG of training and validation loss/perplexity against tokens seen and wall time."""
    from .plot import plot_run

    typer.echo(f"wrote {plot_run(run, out)}")


@app.command()
@_cli
def export(
    run: RunArg,
    out: Annotated[Path, _path_option(help="file to write, e.g. model.pt2")],
) -> None:
    """Write a standalone next-token step (torch.export) that runs without wordlm installed."""
    from .api import LanguageModel
    from .export import export_model

    path = export_model(LanguageModel.load(run), out)
    typer.echo(f"wrote {path} (load it with torch.export.load; see `python -c 'import wordlm.export; "
               f"help(wordlm.export)'`)")
