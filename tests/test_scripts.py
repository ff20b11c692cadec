"""The GPU session's scripts, run on the CPU with tiny models: a device call is too scarce to find out there
that a script broke (benchmarks/gpu.py's modes and scripts/gpu_session.sh's wiring; data/tiny as the corpus)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--device", "cpu", "--data", str(ROOT / "data" / "tiny")]
AWD_SMALL = ["--set", "model.hidden_size=16", "--set", "model.embedding_size=8", "--set", "model.last_hidden_size=8",
             "--set", "train.precision=fp32"]


def run(args: list[str], **env) -> str:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # the script's python3: ours
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PATH": path, **env})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


@pytest.mark.parametrize("mode, expect", [
    (["--config", "configs/demo.toml", "--steps", "3", "--hidden", "16"], "| 20 | fp32 |"),
    (["--config", "configs/demo.toml", "--validation", "--hidden", "16"], "| fp32 | 5,620 |"),
    (["--config", "configs/ptb-awd-gpu.toml", "--batch-sweep", "2,4", "--steps", "5", *AWD_SMALL], "| 4 | "),
], ids=["table", "validation", "batch-sweep"])
def test_gpu_benchmark_modes_run(mode, expect):
    out = run([sys.executable, "benchmarks/gpu.py", *TINY, *mode])
    assert expect in out
    if "--validation" in mode:  # bf16 too, where the CPU runs it (an AVX2-only CPU does not: the table says so)
        assert ("| bf16 | 5,620 |" in out) != ("# bf16 left out: this CPU" in out), out


def test_gpu_session_script_wires_its_parts(tmp_path):
    subprocess.run(["bash", "-n", "scripts/gpu_session.sh"], cwd=ROOT, check=True)
    out = tmp_path / "out"
    # LIMIT=30 leaves the awd part no time to train: it only reports the batch it would have used
    run(["bash", "scripts/gpu_session.sh"], PARTS="awdbatch awd", GRAPHS="false", DATA=str(ROOT / "data" / "tiny"),
        OUT=str(out), RUNS=str(tmp_path / "runs"), AWD_BATCHES="2,4", AWD_BATCH="auto", LIMIT="30",
        BENCH_SETS=" ".join(["--device cpu", *AWD_SMALL]))
    log = (out / "session.log").read_text()
    assert "training runs use train.cuda_graphs=false" in log
    rows = [ln for ln in log.splitlines() if ln.startswith(("| 2 |", "| 4 |"))]
    assert len(rows) == 2, log
    suggested = next(ln for ln in log.splitlines() if ln.startswith("suggested batch: ")).split()[2]
    assert suggested in ("2", "4") and f"AWD_BATCH=auto: {suggested}" in log
    assert "no time left for the AWD run" in log


def test_gpu_session_fast_part_trains_the_60s_recipe_per_seed(tmp_path):
    # The shipped 79.4-in-60-s config with each seed of SEEDS, then its test pass and time to target (here a
    # tiny model for 2 s on data/tiny).
    out = tmp_path / "out"
    run(["bash", "scripts/gpu_session.sh"], PARTS="fast", GRAPHS="false", DATA=str(ROOT / "data" / "tiny"),
        OUT=str(out), RUNS=str(tmp_path / "runs"), SEEDS="7", LIMIT="200",
        EXTRA="--set model.hidden_size=16 --set model.embedding_size=16 --set train.device=cpu "
              "--set train.time_budget_s=2 --set train.precision=fp32")  # wiring, not bf16 (not on every CPU)
    log = (out / "session.log").read_text()
    assert "train fast60-seed7 (configs/ptb-medium-gpu-60s.toml --set train.seed=7" in log
    assert '"tokens": 5623' in log, log  # the test pass, over data/tiny's test text
    assert "target       valid ppl <= 79.4" in log
    assert (out / "metrics-fast60-seed7.jsonl").exists()


def test_gpu_session_awd_part_trains_the_averaging_recipe(tmp_path):
    # The next AWD attempt (configs/ptb-awd-gpu-asgd.toml) for what LIMIT leaves (AWD_SETS, last on the command
    # line, cuts it to 4 s of a tiny model here): NT-ASGD's average must start, and the test pass must follow.
    out = tmp_path / "out"
    # DYNAMIC=1: the dynamic evaluation after the test pass, in the same call (the next AWD call's plan)
    run(["bash", "scripts/gpu_session.sh"], PARTS="awd", GRAPHS="false", DATA=str(ROOT / "data" / "tiny"),
        OUT=str(out), RUNS=str(tmp_path / "runs"), LIMIT="120", AWD_SETS="--set train.time_budget_s=4",
        EXTRA=" ".join(["--set train.device=cpu", *AWD_SMALL, "--set train.batch_size=4"]),
        DYNAMIC="1", DYN_LIMIT="40", DYN_ARGS="--dyn-lr 1e-4 --dyn-lambda 0")
    log = (out / "session.log").read_text()
    assert "train awd-gpu (configs/ptb-awd-gpu-asgd.toml --set train.time_budget_s=" in log
    assert '"tokens": 5623' in log, log
    assert "dynamic evaluation awd-gpu (test, batch 1)" in log and '"dynamic": {"lr": 0.0001' in log, log
    recs = (out / "metrics-awd-gpu.jsonl").read_text()
    assert '"trigger": "train.average_after = 0.7"' in recs or '"trigger": "validation' in recs
    assert '"raw_valid_ppl"' in recs


def test_gpu_session_starts_part_reads_each_averaging_start(tmp_path):
    # The AWD recipe once with scripts/average_starts.py (30 steps of a tiny model here, not a time budget, so the
    # starts do not depend on the machine's speed): a table row for the run's own average (the config's: from 0.7,
    # the trigger off), the last iterate and each of STARTS, each with its validation figure, and with
    # STARTS_TEST_TOP=3 the 3 best with their test one.
    out = tmp_path / "out"
    run(["bash", "scripts/gpu_session.sh"], PARTS="starts", GRAPHS="false", DATA=str(ROOT / "data" / "tiny"),
        OUT=str(out), RUNS=str(tmp_path / "runs"), LIMIT="120", STARTS="0.3,0.8", STARTS_EVAL="60", STARTS_TEST_TOP="3",
        AWD_SETS="--set train.time_budget_s=0 --set train.max_steps=30",
        EXTRA=" ".join(["--set train.device=cpu", *AWD_SMALL, "--set train.batch_size=4"]))
    log = (out / "session.log").read_text()
    assert "averages from 0.3,0.8; the run's own: the config's" in log
    table = log[log.rindex("| average |"):].splitlines()[2:6]  # the closing table, after each figure's own line
    assert [r.split(" | ")[0] for r in table] == ["| the run's own (best/)", "| none: the last iterate (raw/)",
                                                  "| from 0.3 (avg-0.3/)", "| from 0.8 (avg-0.8/)"], log
    assert [r.split(" | ")[1:3] for r in table] == [["21", "10"], ["-", "1"], ["9", "22"], ["24", "7"]], log
    assert all(r.split(" | ")[3] != "-" for r in table), log
    tested = [r for r in table if not r.endswith("| - |")]  # STARTS_TEST_TOP=3 of the 4: the best on validation
    assert len(tested) == 3 and log.count("\ntest: ") == 3, log
    worst = max(table, key=lambda r: float(r.split(" | ")[3]))
    assert worst.endswith("| - |"), log
    assert '"trigger": "train.average_after = 0.7"' in (out / "metrics-starts.jsonl").read_text()
    assert (out / "average_starts.json").exists()


def test_suggested_batch_is_the_smallest_keeping_60_percent_of_the_throughput():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from gpu import suggest_batch
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))

    def rows(*rates):
        return [{"batch": b, "tokens_per_s": r} for b, r in zip((20, 40, 80), rates, strict=True)]

    assert suggest_batch(rows(100, 200, 400)) == 80  # latency-bound: a smaller batch only loses tokens/s
    assert suggest_batch(rows(200, 300, 400)) == 40  # 0.75 of batch 80's
    assert suggest_batch(rows(290, 390, 400)) == 20
    assert suggest_batch(rows(239, 241, 400)) == 40  # 0.5975 misses, 0.6025 makes it
    assert suggest_batch(rows(158_488, 240_716, 344_869)) == 40  # the H100's sweep of the AWD model
    assert suggest_batch(rows(160_336, 240_343, 351_982)) == 40  # the H200's (batch 20 there: test 63.00 > 61.25)


def test_dynamic_benchmark_times_both_kernels_and_reads_one_perplexity(demo_run):
    # benchmarks/dynamic.py on the CPU: both columns run the same kernels there, so they must read the same ppl
    import json

    out = run([sys.executable, "benchmarks/dynamic.py", str(demo_run), "--text", str(ROOT / "data" / "tiny" /
               "valid.txt"), "--device", "cpu", "--tokens", "200", "--repeat", "1"])
    assert "| cuDNN (LSTMs alone in training mode) |" in out and "| PyTorch's own (cuDNN off) |" in out
    rec = json.loads(out.splitlines()[-1])
    assert rec["updates"] == 10 and rec["ppl"]["cudnn"] == rec["ppl"]["native"], rec


def test_gpu_session_dyn_part_evaluates_an_earlier_run_dynamically(demo_run, tmp_path):
    # The second call of a GPU session: the kernel benchmark, then wordlm eval --dynamic on a run already there
    out = tmp_path / "out"
    run(["bash", "scripts/gpu_session.sh"], PARTS="dyn", GRAPHS="false", DATA=str(ROOT / "data" / "tiny"),
        OUT=str(out), DYN_RUN=str(demo_run), LIMIT="100", DYN_BENCH="--device cpu --repeat 1",
        DYN_BENCH_TOKENS="200", DYN_ARGS="--dyn-lr 1e-4 --dyn-lambda 0")
    log = (out / "session.log").read_text()
    assert "| PyTorch's own (cuDNN off) |" in log, log
    assert '"dynamic": {"lr": 0.0001, "decay": 0.0' in log, log


def test_tf32_rounding_of_the_probe():
    # TF32 keeps 10 of fp32's 23 mantissa bits: 1 + 2**-11 is half a TF32 step above 1
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from tf32_probe import to_tf32
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    x = torch.tensor([1.0, 1 + 2**-11, -(1 + 2**-11), 1 + 2**-10, 3 * 2**-20, 1 + 2**-11 - 2**-23])
    assert to_tf32(x, nearest=True).tolist() == [1.0, 1 + 2**-10, -(1 + 2**-10), 1 + 2**-10, 3 * 2**-20, 1.0]
    assert to_tf32(x, nearest=False).tolist() == [1.0, 1.0, -1.0, 1 + 2**-10, 3 * 2**-20, 1.0]


def test_tf32_probe_emulates_the_lstm_that_wordlm_evaluates(demo_run):
    import json

    out = run([sys.executable, "benchmarks/tf32_probe.py", str(demo_run), "--data",
               str(ROOT / "data" / "tiny" / "test.txt")])
    assert out.count("\n| ") == 6, out  # the table: its header, its rule and four rows
    ppl = json.loads(out.splitlines()[-1])["ppl"]
    assert ppl["ieee"] == pytest.approx(ppl["wordlm"], rel=1e-5)  # the step-by-step LSTM computes nn.LSTM's
    for key in ("tf32_nearest", "tf32_truncated"):  # rounded inputs: close to it, not equal
        assert ppl[key] == pytest.approx(ppl["wordlm"], rel=1e-2) and ppl[key] != ppl["ieee"], out


def test_gpu_session_ieee_part_runs_its_test(tmp_path):
    # On the CPU the GPU test is skipped; the log must still show that it ran and how it ended
    out = tmp_path / "out"
    run(["bash", "scripts/gpu_session.sh"], PARTS="ieee", GRAPHS="false", DATA=str(ROOT / "data" / "tiny"),
        OUT=str(out), RUNS=str(tmp_path / "runs"), LIMIT="60")
    log = (out / "session.log").read_text()
    assert "GPU test: fp32 evaluation is IEEE in cuDNN's LSTM" in log and "1 skipped" in log, log


def test_average_starts_keeps_the_averages_that_average_after_would_make(tmp_path):
    # One run with extra averages from 0.25 and 0.5 of it, its own average from 0.5: the extra average from 0.5
    # must be the run's own, bit for bit (the same rule, the same trajectory), and the one from 0.25 another.
    import importlib.util
    import json

    import torch

    from wordlm.checkpoint import load_checkpoint

    spec = importlib.util.spec_from_file_location("average_starts", ROOT / "scripts" / "average_starts.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "run"
    sets = ["model.hidden_size=16", "model.embedding_size=16", "model.dropout=0.3", "train.optimizer=ntasgd",
            "train.lr=5", "train.schedule=constant", "train.average_after=0.5", "train.nonmono=1000",
            "train.epochs=0", "train.max_steps=40", "train.eval_every=20"]
    argv = ["--config", str(ROOT / "configs" / "demo.toml"), "--out", str(out), "--starts", "0.5,0.25", "--test"]
    assert script.main([*argv, *(a for s in sets for a in ("--set", s))]) == 0
    summary = json.loads((out / "average_starts.json").read_text())
    rows = {r["average"].split(" (")[0]: r for r in summary["rows"]}
    assert [rows["from 0.25"]["from_step"], rows["from 0.5"]["from_step"]] == [10, 20]
    assert [rows["from 0.25"]["iterates"], rows["from 0.5"]["iterates"]] == [31, 21]
    assert all("valid_ppl" in r and "test_ppl" in r for r in summary["rows"])
    last = load_checkpoint(out / "last", train_state=True)
    half = load_checkpoint(out / "avg-0.5").model_state
    quarter = load_checkpoint(out / "avg-0.25").model_state
    raw = load_checkpoint(out / "raw").model_state
    for name, value in last.model_state.items():
        assert torch.equal(half[name], value), name
        assert torch.equal(raw[name], last.train_state["raw_model"][name]), name
    assert not torch.equal(quarter["decoder.weight"], half["decoder.weight"])
    assert rows["from 0.5"]["valid_ppl"] == rows["the run's own"]["valid_ppl"]
    assert script.main([*argv, "--starts", "0.5,1.5"]) == 2  # a fraction outside [0, 1): refused
    assert script.main([*argv, "--test-top", "-1"]) == 2
