"""The CLI as a user meets it: exit codes, the exact lines printed, and no tracebacks."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from wordlm.cli import app

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands_without_importing_torch():
    code = ("import sys; from typer.testing import CliRunner; from wordlm.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); print(r.exit_code, 'torch' in sys.modules); print(r.output)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("0 False")
    for command in ("train", "eval", "generate", "predict", "score", "info"):
        assert command in out


def test_version():
    r = run("--version")
    assert r.exit_code == 0 and r.output.strip() == "wordlm 0.1.0"


def test_train_eval_generate_end_to_end(tmp_path):
    out = tmp_path / "run"
    r = run("train", "--config", ROOT / "configs" / "demo.toml", "--out", out, "--set", "train.max_steps=60",
            "--set", "train.eval_every=30")
    assert r.exit_code == 0, r.output
    assert "best validation: loss" in r.output
    assert (out / "best" / "meta.json").is_file() and (out / "last" / "train_state.pt").is_file()

    r = run("eval", out, "--split", "test", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output.strip().splitlines()[-1])
    assert set(report) >= {"loss", "ppl", "bits_per_token", "tokens"}
    assert 1 < report["ppl"] < 142  # better than uniform over the 142-type vocabulary
    assert report["tokens"] > 5000

    r1 = run("generate", out, "--prompt", "why do we", "--max-tokens", "12", "--seed", "5")
    r2 = run("generate", out, "--prompt", "why do we", "--max-tokens", "12", "--seed", "5")
    r3 = run("generate", out, "--prompt", "why do we", "--max-tokens", "12", "--seed", "6")
    assert r1.exit_code == 0 and r1.output.startswith("why do we ")
    assert r1.output == r2.output != r3.output
    assert len(r1.output.split()) >= 3 + 8  # 12 tokens, a few of which may be line ends


def test_eval_on_a_file_and_full_context(demo_run):
    r = run("eval", demo_run, "--data", ROOT / "data" / "tiny" / "valid.txt", "--batch-size", "1")
    assert r.exit_code == 0, r.output
    assert "ppl" in r.output and "tokens" in r.output


def test_eval_counts_the_unknown_tokens_of_the_text(demo_run, tmp_path):
    """Two words the demo model never saw, and one written <unk>, among 11 tokens (8 words, 3 line ends): the
    report says how much of the perplexity is the easy prediction of <unk>."""
    text = tmp_path / "oov.txt"
    text.write_text("why do we need zebra network\nthe giraffe <unk>\n")
    r = run("eval", demo_run, "--data", text, "--batch-size", "1", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.output.strip().splitlines()[-1])
    assert report["unk_tokens"] == 3 and report["unk_share"] == pytest.approx(3 / 11)
    r = run("eval", demo_run, "--data", text, "--batch-size", "1")
    assert "unk         3 tokens of the text are <unk> (27.27%)" in r.output
    assert f"warning: 27% of the tokens of {text} are <unk> to this model: is it the text you meant" in r.output
    r = run("eval", demo_run, "--split", "valid", "--json")  # the demo's own valid text: every word known
    assert json.loads(r.output.strip().splitlines()[-1])["unk_tokens"] == 0 and "warning" not in r.output


def test_generate_warns_on_unknown_words_and_refuses_empty_prompts(demo_run):
    r = run("generate", demo_run, "--prompt", "the zebra", "--max-tokens", "3", "--seed", "0")
    assert r.exit_code == 0
    assert "not in the vocabulary, read as <unk>: zebra" in r.output
    r = run("generate", demo_run, "--prompt", "  ")
    assert r.exit_code == 2 and r.output.startswith("error: the prompt is empty")
    r = run("generate", demo_run, "--prompt", "zebra giraffe")
    assert r.exit_code == 2 and "every word of the prompt is unknown" in r.output


@pytest.mark.parametrize("args, code, message", [
    (["train", "--config", "nope.toml"], 2, "error: config file nope.toml does not exist"),
    (["train"], 2, "error: give --config PATH"),
    (["eval", "missing_run"], 4, "error: missing_run does not exist; train a model first"),
    (["generate", "{run}", "--prompt", "the", "--top-p", "1.5"], 2, "error: --top-p must be in (0, 1]"),
    (["generate", "{run}", "--prompt", "the", "--temperature", "0"], 2, "error: --temperature must be > 0"),
])
def test_bad_input_gives_one_line_and_an_exit_code(demo_run, args, code, message):
    r = run(*[a.replace("{run}", str(demo_run)) for a in args])
    assert r.exit_code == code, r.output
    assert r.output.startswith(message), r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1


def test_config_errors_are_listed_together(tmp_path):
    r = run("train", "--config", ROOT / "configs" / "demo.toml", "--out", tmp_path / "r",
            "--set", "train.lr=-1", "--set", "model.dropout=1.5", "--set", "train.bogus=3")
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert lines[0] == "error: 3 problems in the configuration:"
    assert any("train.lr must be > 0.0, got -1" in ln for ln in lines)
    assert any("model.dropout must be < 1.0, got 1.5" in ln for ln in lines)
    assert any("unknown key train.bogus" in ln for ln in lines)
    assert not (tmp_path / "r").exists()


def test_python_m_wordlm():
    out = subprocess.run([sys.executable, "-m", "wordlm", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "wordlm 0.1.0"


def test_a_projected_lstm_on_the_cpu_shows_no_pytorch_warning(tmp_path):
    """oneDNN has no LSTM with projections, and PyTorch says so with its source path on every forward pass that
    runs one; the CLI says it once, in a line of its own. (A subprocess: pytest would catch the warning itself.)"""
    out = tmp_path / "run"
    train_cmd = [sys.executable, "-m", "wordlm", "train", "--config", str(ROOT / "configs" / "demo.toml"), "--out",
                 str(out), "--set", "model.proj_size=32", "--set", "model.embedding_size=32", "--set",
                 "train.max_steps=2"]
    proc = subprocess.run(train_cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "model.proj_size: oneDNN has no LSTM kernel with projections" in proc.stderr
    assert "UserWarning" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "wordlm", "eval", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr


def test_an_operating_system_error_is_one_line_and_exit_1(demo_run, monkeypatch):
    """What wordlm cannot foresee from the file system (no permission, a full disk) still reaches the user as one
    line naming the file, not a traceback."""
    from wordlm.api import LanguageModel

    def refused(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/some/cache/ids")

    monkeypatch.setattr(LanguageModel, "evaluate", refused)
    r = run("eval", demo_run)
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines()[-1] == ("error: /some/cache/ids: Permission denied; check the path, its "
                                                 "permissions and the free disk space")
    assert "Traceback" not in r.output


@pytest.mark.parametrize("raised, shown", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                  "tried to allocate 56800000000 bytes. Error code 12 (Cannot allocate memory)"), "52.9 GiB"),
    ("torch.OutOfMemoryError", "2.00 GiB"),
], ids=["cpu", "cuda"])
def test_out_of_memory_is_one_line_that_says_what_to_shrink(demo_run, monkeypatch, raised, shown):
    import torch

    from wordlm.api import LanguageModel

    if raised == "torch.OutOfMemoryError":
        raised = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
                                        "of 79.19 GiB of which 1.06 GiB is free.")

    def too_big(*args, **kwargs):
        raise raised

    monkeypatch.setattr(LanguageModel, "evaluate", too_big)
    r = run("eval", demo_run)
    assert r.exit_code == 1, r.output
    assert r.output.strip().splitlines()[-1] == (
        f"error: out of memory (tried to allocate {shown}); use a smaller model (model.hidden_size, "
        f"model.num_layers), batch (train.batch_size, --batch-size) or window (train.seq_len)")
    assert "Traceback" not in r.output


def test_a_bug_still_shows_its_traceback(demo_run, monkeypatch):
    """Only what the machine refuses is turned into one line: any other error is a bug in wordlm and must stay
    visible as one."""
    from wordlm.api import LanguageModel

    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch in a wordlm bug")

    monkeypatch.setattr(LanguageModel, "evaluate", bug)
    r = run("eval", demo_run)
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError) and "error:" not in r.output


def test_the_bf16_check_tells_the_truth_about_this_cpu():
    """bf16_supported says yes on the CPU exactly when wordlm's own model (two layers, dropout, tied) can take a
    bf16 autocast step here, forward and backward: on an AVX2-only CPU oneDNN has no bf16 LSTM kernel."""
    import torch

    from wordlm.config import ModelConfig
    from wordlm.evaluate import autocast, bf16_supported
    from wordlm.model import build_model

    model = build_model(ModelConfig(embedding_size=16, hidden_size=16, num_layers=2, dropout=0.2), 30)
    ids = torch.randint(0, 30, (6, 3))
    try:
        with autocast(torch.device("cpu"), "bf16"):
            loss, _ = model(ids, targets=ids, mean=True)
        loss.backward()
        ran = True
    except RuntimeError as e:
        assert "LSTM" in str(e), e  # oneDNN's refusal, not some other failure
        ran = False
    assert bf16_supported(torch.device("cpu")) == ran
    from wordlm.evaluate import _runs_bf16_lstm

    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    _runs_bf16_lstm.__wrapped__("cpu")  # the check itself, uncached, draws no number from the caller's stream
    assert torch.equal(torch.rand(3), want)


def test_bf16_on_a_cpu_without_bf16_kernels_is_one_line_and_harms_nothing(demo_run, tmp_path, monkeypatch, caplog):
    """Where the CPU has no bf16 LSTM kernel (made so here on any CPU), training in bf16 stops with one line and
    exit 2 before --overwrite clears the run; an asked-for `eval --precision bf16` is refused the same way; a run
    that trained in bf16 (on a GPU, say) is evaluated in fp32, with a note, giving the fp32 figures."""
    import shutil

    import torch

    import wordlm.evaluate
    from wordlm import load

    monkeypatch.setattr(wordlm.evaluate, "_runs_bf16_lstm", lambda device: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    run_dir = tmp_path / "run"
    shutil.copytree(demo_run, run_dir)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    r = run("train", "--config", ROOT / "configs" / "demo.toml", "--set", "train.precision=bf16",
            "--set", "train.device=cpu", "--out", run_dir, "--overwrite")
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        "error: train.precision is bf16, but this CPU (AVX2) has no bf16 LSTM kernel (oneDNN's needs AVX-512 or "
        "Arm bf16): set train.precision = \"fp32\""]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == before

    r = run("eval", run_dir, "--device", "cpu", "--precision", "bf16")
    assert r.exit_code == 2, r.output
    assert r.output.strip().splitlines() == [
        "error: --precision bf16, but this CPU (AVX2) has no bf16 LSTM kernel (oneDNN's needs AVX-512 or Arm bf16): "
        "use --precision fp32"]

    lm = load(run_dir)
    text = ROOT / "data" / "tiny" / "valid.txt"
    fp32 = lm.evaluate(text, precision="fp32")
    lm.config.train.precision = "bf16"  # as if it had trained in bf16
    logger = logging.getLogger("wordlm")  # the CLI's callback stops it propagating to caplog's root handler
    logger.addHandler(caplog.handler)
    try:
        assert lm.evaluate(text) == fp32
    finally:
        logger.removeHandler(caplog.handler)
    assert "the run trained in bf16, but this CPU (AVX2) has no bf16 LSTM kernel" in caplog.text
    assert caplog.text.rstrip().endswith("evaluating in fp32")


def test_a_gpu_without_bf16_is_named_in_the_refusal(monkeypatch):
    """On a GPU that cannot run the LSTM in bf16 (a V100, say: made so here on any machine) the one-line refusal
    names the GPU and its compute capability, not the CPU's instruction set."""
    import torch

    from wordlm.evaluate import bf16_refusal

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    assert bf16_refusal(torch.device("cuda")) == (
        "this GPU (Tesla V100-SXM2-32GB, compute capability 7.0) cannot run the LSTM in bf16 (that needs compute "
        "capability 8.0, Ampere, or later)")


def test_each_rank_checks_bf16_on_its_own_gpu(monkeypatch):
    """Under torchrun each rank trains on the GPU of its local rank, so that is the device whose bf16 support
    is checked (not GPU 0 from every rank); the CPU stays the CPU."""
    import torch

    from wordlm.train import Distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    dist = Distributed()
    assert dist.device(torch.device("cuda")) == torch.device("cuda", 1)
    assert dist.device(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert Distributed().device(torch.device("cuda")) == torch.device("cuda")


def test_a_perplexity_past_a_floats_range_prints_as_inf():
    """The metrics file caps perplexity at exp(700) so that it stays JSON; what the user reads says inf, not a
    300-digit number."""
    import math

    from wordlm.cli import _ppl

    assert _ppl(math.log(20.0)) == "20.00"
    assert _ppl(800.0) == _ppl(math.inf) == "inf"
    assert _ppl(math.nan) == "nan"


def test_the_score_breakdown_shows_a_whitespace_token_as_a_visible_mark():
    # A character model's space, or sentencepiece's lone word-start piece, printed as itself reads as nothing.
    from wordlm.cli import _shown

    assert [_shown(t) for t in (" ", "  ", " rec", "a", "<eos>")] == ["\u2423", "\u2423\u2423", " rec", "a", "<eos>"]
