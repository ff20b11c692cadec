"""What users do with a trained model: predict, score, eval equality, plot, export, the Python API."""

import importlib.util
import json
import logging
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wordlm import load
from wordlm.cli import app

from conftest import needs_cpu_bf16, tiny_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def lm(demo_run):
    return load(demo_run)


@pytest.mark.parametrize("context, answer", [
    ("the network learns a pattern from left to", "right"),  # the grammar's only continuation
    ("the model reads the word one word at a", "time"),
    ("the layer stores the loss across time", "steps"),
    ("first the deep recurrent neural", None),  # "network" or "model": both allowed, nothing else
])
def test_predict_ranks_the_grammatical_next_word_first(lm, context, answer):
    preds = lm.predict(context, k=3)
    if answer is None:
        assert {preds[0]["word"], preds[1]["word"]} == {"network", "model"}
        assert preds[0]["prob"] + preds[1]["prob"] > 0.9
    else:
        assert preds[0]["word"] == answer and preds[0]["prob"] > 0.5, preds
    assert [p["prob"] for p in preds] == sorted((p["prob"] for p in preds), reverse=True)


def test_predict_cli_json(demo_run):
    prompt = "a model learns a pattern from left to"
    r = CliRunner().invoke(app, ["predict", str(demo_run), "--prompt", prompt, "-k", "4", "--json"])
    assert r.exit_code == 0, r.output
    preds = json.loads(r.output.strip().splitlines()[-1])
    assert len(preds) == 4 and preds[0]["word"] == "right" and set(preds[0]) >= {"word", "prob"}


def test_score_ranks_sentences_above_their_shuffles(lm):
    rng = random.Random(0)
    lines = [ln for ln in (ROOT / "data" / "tiny" / "test.txt").read_text().splitlines() if len(ln.split()) >= 5]
    wins = total = 0
    for sentence in lines[:30]:
        words = sentence.split()
        shuffles = set()
        while len(shuffles) < 4:
            s = words[:]
            rng.shuffle(s)
            if s != words:
                shuffles.add(" ".join(s))
        scored = lm.score([sentence, *shuffles])
        wins += sum(scored[0]["logprob"] > s["logprob"] for s in scored[1:])
        total += len(shuffles)
    assert wins / total > 0.97, f"{wins}/{total}"


def test_the_readme_sentence_pair(demo_run):
    r = CliRunner().invoke(app, ["score", str(demo_run), "neural why recurrent need we network do",
                                 "why do we need a recurrent neural network", "--json"])
    ranked = json.loads(r.output.strip().splitlines()[-1])
    assert ranked[0]["sentence"] == "why do we need a recurrent neural network"
    assert ranked[0]["logprob"] > ranked[1]["logprob"] + 20
    for item in ranked:
        assert set(item) >= {"sentence", "logprob", "ppl", "tokens"}
        assert item["tokens"][-1]["token"] == "<eos>"
        assert len(item["tokens"]) == len(item["sentence"].split()) + 1
        assert math.isclose(item["logprob"], sum(t["logprob"] for t in item["tokens"]), rel_tol=1e-9)


def test_score_per_token_sum_equals_eval_total(lm, tmp_path):
    sentence = "why do we need a recurrent neural network"
    f = tmp_path / "one.txt"
    f.write_text(sentence + "\n")
    report = lm.evaluate(f, batch_size=1)
    score = lm.score([sentence])[0]
    assert report["tokens"] == len(score["tokens"]) == 9
    assert report["total_nll"] == pytest.approx(-score["logprob"], rel=1e-5)


def test_score_file_and_ranking(demo_run, tmp_path):
    f = tmp_path / "s.txt"
    f.write_text("network the need\nwhy do we need a recurrent neural network\n\n")
    r = CliRunner().invoke(app, ["score", str(demo_run), "--file", str(f)])
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].endswith("why do we need a recurrent neural network")


def test_score_names_the_words_it_scored_as_unk(lm, caplog):
    # <unk> stands for every word the model never saw: a sentence of such words reads as likelier than it is, so
    # the caller is told which words were read that way (once each); an empty sentence is named by its place.
    from wordlm.errors import UsageError

    logger = logging.getLogger("wordlm")  # a CLI test's callback may have stopped it propagating to caplog's root
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level("WARNING", logger="wordlm"):
            scored = lm.score(["why do we need a zebra", "the zebra the giraffe", "why do we need <unk>"])
            assert {m.getMessage() for m in caplog.records} == {  # a set: the record may reach caplog twice
                "warning: not in the vocabulary, scored as <unk>: zebra giraffe"}
            assert [t["token"] for t in scored[0]["tokens"]][-2:] == ["<unk>", "<eos>"]
            caplog.clear()
            lm.score(["why do we need a recurrent neural network"])
            assert not caplog.records
    finally:
        logger.removeHandler(caplog.handler)
    with pytest.raises(UsageError, match=r"cannot score an empty sentence \(sentence 2 of 3\)"):
        lm.score(["why", "  ", "do"])


def test_generate_many_and_interactive(demo_run, lm):
    samples = list(lm.generate_many("the", 8, seed=3, num_samples=3))
    assert len(samples) == 8 and all(len(step) == 3 for step in samples)
    r = CliRunner().invoke(app, ["generate", str(demo_run), "--interactive", "--max-tokens", "5", "--seed", "1"],
                           input="why do we\n\n   \nthe network\n")
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith(("why do we", "the network"))]
    assert len(lines) == 2 and "error" not in r.output  # a blank line is passed over, as a shell does


def test_info(demo_run):
    r = CliRunner().invoke(app, ["info", str(demo_run), "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output.strip().splitlines()[-1])
    assert data["parameters"] == 150414 - 142 * 128 + 142 * 128  # tied: one matrix
    assert data["vocab_size"] == 142 and data["validations"] >= 1 and data["best_valid_ppl"] < 20
    assert data["peak_mem_mb"] > 50  # the training process's peak RSS, from its train records


def test_info_reports_the_time_to_a_target_perplexity(demo_run):
    valid = [json.loads(ln) for ln in (demo_run / "metrics.jsonl").read_text().splitlines()]
    valid = [r for r in valid if r["event"] == "valid"]
    second = sorted(r["valid_ppl"] for r in valid)[-2]  # reached, but not at the first validation
    first_hit = next(r for r in valid if r["valid_ppl"] <= second)
    r = CliRunner().invoke(app, ["info", str(demo_run), "--json", "--target-ppl", str(second)])
    assert r.exit_code == 0, r.output
    target = json.loads(r.output.strip().splitlines()[-1])["target"]
    assert target["reached"] and (target["step"], target["elapsed_s"]) == (first_hit["step"], first_hit["elapsed_s"])
    r = CliRunner().invoke(app, ["info", str(demo_run), "--target-ppl", "1.0"])
    assert r.exit_code == 0 and "valid ppl <= 1 not reached" in r.output
    r = CliRunner().invoke(app, ["info", str(demo_run), "--target-ppl", str(second)])
    assert f"first at {first_hit['elapsed_s']:.1f} s (step {first_hit['step']}" in r.output


def test_info_summarises_a_folder_that_holds_only_a_runs_metrics(demo_run, tmp_path):
    # The curve of a run on another machine, copied back without its checkpoints (as docs/results/ holds them).
    (tmp_path / "metrics.jsonl").write_bytes((demo_run / "metrics.jsonl").read_bytes())
    whole = json.loads(CliRunner().invoke(app, ["info", str(demo_run), "--json", "--target-ppl", "20"]).output
                       .strip().splitlines()[-1])
    r = CliRunner().invoke(app, ["info", str(tmp_path), "--json", "--target-ppl", "20"])
    assert r.exit_code == 0, r.output
    alone = json.loads(r.output.strip().splitlines()[-1])
    assert alone["checkpoint"] is None and "parameters" not in alone
    for key in ("steps", "tokens", "validations", "best_valid_ppl", "best_step", "target"):
        assert alone[key] == whole[key]
    r = CliRunner().invoke(app, ["info", str(tmp_path), "--target-ppl", "20"])
    assert r.exit_code == 0 and f"checkpoint   none in {tmp_path}" in r.output and "target       valid ppl" in r.output
    assert "averaging" not in r.output  # the demo trains with AdamW
    # NT-ASGD's switch, as a run records it, is in the summary and its line
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"event": "averaging", "step": 300, "epoch": 4.0, "trigger": "train.average_after = 0.7"})
                + "\n")
    r = CliRunner().invoke(app, ["info", str(tmp_path), "--json"])
    assert json.loads(r.output.strip().splitlines()[-1])["averaging"] == {
        "step": 300, "epoch": 4.0, "trigger": "train.average_after = 0.7"}
    r = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert "averaging    NT-ASGD's average from step 300 (epoch 4), started by train.average_after = 0.7" in r.output
    (tmp_path / "metrics.jsonl").write_text('{"event": "train", "step": 1, "tokens": 8, "loss": 5.0, "ppl": 148.4, '
                                            '"elapsed_s": 0.1}\n')  # no validation yet: said, not left blank
    r = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 0 and f"history      none: {tmp_path / 'metrics.jsonl'} holds no validation record yet" \
        in r.output, r.output
    (tmp_path / "metrics.jsonl").unlink()  # neither a checkpoint nor metrics: the error it always was
    r = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert r.exit_code == 4 and r.output.startswith(f"error: no checkpoint in {tmp_path}")


def test_info_and_plot_read_a_curve_file_as_docs_results_keeps_them(tmp_path):
    # docs/results/X.metrics.jsonl is a run's metrics.jsonl under its own name: info and plot read it as it is,
    # and plot writes X.png beside it (they used to want it copied into a folder as metrics.jsonl first).
    import shutil

    curve = tmp_path / "ptb-small-cpu.metrics.jsonl"
    shutil.copyfile(ROOT / "docs" / "results" / curve.name, curve)
    (tmp_path / "folder").mkdir()
    shutil.copyfile(curve, tmp_path / "folder" / "metrics.jsonl")
    as_file = CliRunner().invoke(app, ["info", str(curve), "--json", "--target-ppl", "130"])
    assert as_file.exit_code == 0, as_file.output
    in_folder = CliRunner().invoke(app, ["info", str(tmp_path / "folder"), "--json", "--target-ppl", "130"])
    summary = json.loads(as_file.output.strip().splitlines()[-1])
    assert summary == json.loads(in_folder.output.strip().splitlines()[-1])
    assert summary["validations"] == 13 and summary["target"]["reached"]
    r = CliRunner().invoke(app, ["info", str(curve)])
    assert r.output.startswith(f"checkpoint   none: the summary of {curve} alone\nhistory      17,264 steps"), \
        r.output
    r = CliRunner().invoke(app, ["info", str(tmp_path / "none.metrics.jsonl")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: {tmp_path / 'none.metrics.jsonl'} does not exist; give a run directory, or a metrics.jsonl file"]
    r = CliRunner().invoke(app, ["info", str(ROOT / "configs" / "demo.toml")])  # any other file: as before
    assert r.exit_code == 4 and "is a file; give a run directory" in r.output
    if importlib.util.find_spec("matplotlib"):
        r = CliRunner().invoke(app, ["plot", str(curve)])
        assert r.exit_code == 0 and r.output == f"wrote {tmp_path / 'ptb-small-cpu.png'}\n", r.output
        assert (tmp_path / "ptb-small-cpu.png").stat().st_size > 10_000


def test_info_reads_a_run_whose_metrics_end_in_half_a_record(demo_run, tmp_path):
    """`wordlm info` while training writes (or after a kill mid-write): a last line that is half a record is
    left out quietly; a damaged line before it is left out with a warning naming it; the rest is reported."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns(".lock"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    best = min(json.loads(ln)["valid_ppl"] for ln in lines if '"valid"' in ln)
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"event": "valid", "step": 9')
    r = CliRunner().invoke(app, ["info", str(run), "--json"])
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output and json.loads(r.output.strip().splitlines()[-1])["best_valid_ppl"] == best
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    r = CliRunner().invoke(app, ["info", str(run), "--json"])
    assert r.exit_code == 0, r.output
    assert f"warning: {run / 'metrics.jsonl'}: 1 line skipped (line 2: not a JSON record)" in r.output
    assert json.loads(r.output.strip().splitlines()[-1])["best_valid_ppl"] == best
    # records without the numbers info and plot read (a file edited by hand, or another tool's) are left out
    # too, with one warning for all of them: plot used to end in a KeyError traceback
    (run / "metrics.jsonl").write_text("\n".join([lines[0], '{"event": "train", "step": 1}', '{"event": "valid"}',
                                                  *lines[1:]]) + "\n")
    r = CliRunner().invoke(app, ["info", str(run), "--json"])
    assert r.exit_code == 0, r.output
    assert f"{run / 'metrics.jsonl'}: 2 lines skipped (line 2: a train record without a number for 'tokens')" \
        in r.output
    assert json.loads(r.output.strip().splitlines()[-1])["best_valid_ppl"] == best
    pytest.importorskip("matplotlib")
    r = CliRunner().invoke(app, ["plot", str(run)])
    assert r.exit_code == 0 and (run / "curves.png").is_file(), r.output
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n{"event": "valid", "step": 1}\n')
    r = CliRunner().invoke(app, ["plot", str(run), "--out", str(tmp_path / "c.png")])
    assert r.exit_code == 2 and "has no train or valid records yet" in r.output, r.output


def test_plot_writes_a_non_blank_png(demo_run, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    out = tmp_path / "curves.png"
    r = CliRunner().invoke(app, ["plot", str(demo_run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    img = matplotlib.image.imread(out)
    assert img.shape[0] >= 300 and img.shape[1] >= 600
    assert img[..., :3].std() > 0.05  # curves and text, not a blank canvas


def test_plot_draws_an_nt_asgd_runs_raw_iterate_and_where_its_average_began(small_corpus, tmp_path, demo_run):
    from wordlm.plot import curves, read_metrics
    from wordlm.train import train

    train(tiny_config(small_corpus, optimizer="ntasgd", average_after=0.5, eval_every=4, max_steps=20, epochs=0,
                      schedule="constant", nonmono=50), tmp_path / "run")
    recs = read_metrics(tmp_path / "run")
    drawn = curves(recs)
    assert list(drawn["ppl"]) == ["train", "valid", "valid, raw iterate"]
    after = [r for r in recs if r["event"] == "valid" and "raw_valid_ppl" in r]  # validations at steps 12, 16, 20
    assert drawn["ppl"]["valid, raw iterate"] == ([r["elapsed_s"] for r in after], [r["raw_valid_ppl"] for r in after])
    assert drawn["loss"]["valid, raw iterate"][1] == pytest.approx([math.log(r["raw_valid_ppl"]) for r in after])
    at_switch = next(r for r in recs if r["event"] == "train" and r["step"] == 10)  # the average began at step 10
    assert drawn["averaging"] == (at_switch["tokens"], at_switch["elapsed_s"])
    plain = curves(read_metrics(demo_run))  # a run without averaging draws train and valid alone
    assert list(plain["ppl"]) == ["train", "valid"] and plain["averaging"] is None
    if importlib.util.find_spec("matplotlib"):
        r = CliRunner().invoke(app, ["plot", str(tmp_path / "run")])
        assert r.exit_code == 0 and (tmp_path / "run" / "curves.png").stat().st_size > 10_000, r.output


def test_plot_without_metrics(tmp_path):
    r = CliRunner().invoke(app, ["plot", str(tmp_path)])
    assert r.exit_code == 2 and r.output.startswith("error:") and "metrics.jsonl does not exist" in r.output


EXPORTED = """
import json, sys
sys.modules["wordlm"] = None  # prove the file runs without the package
import torch
files = {"tokenizer.json": "", "wordlm.json": ""}
step = torch.export.load(sys.argv[1], extra_files=files).module()
meta, tok = json.loads(files["wordlm.json"]), json.loads(files["tokenizer.json"])
stoi = {w: i for i, w in enumerate(tok["itos"])}
ids = [meta["eos_id"]] + [stoi[w] for w in sys.argv[2].split()]
h, c = torch.zeros(meta["num_layers"], 1, meta["h_size"]), torch.zeros(meta["num_layers"], 1, meta["c_size"])
for i in ids:
    logprobs, h, c = step(torch.tensor([[i]]), h, c)
print(json.dumps(logprobs[0].tolist()))
"""


def test_exported_model_matches_without_wordlm(demo_run, lm, tmp_path):
    out = tmp_path / "demo.pt2"
    r = CliRunner().invoke(app, ["export", str(demo_run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    script = tmp_path / "run_exported.py"
    script.write_text(EXPORTED)
    prompt = "why do we need a recurrent"
    proc = subprocess.run([sys.executable, str(script), str(out), prompt], capture_output=True, text=True,
                          check=True, cwd=tmp_path)
    exported = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    from wordlm.generate import read_context

    original, _ = read_context(lm.model, lm.context_ids(prompt))
    torch.testing.assert_close(exported, original, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")  # torch's, on a CPU
@pytest.mark.parametrize("shape", [{"proj_size": 4}, {"last_hidden_size": 4}], ids=["proj", "narrow-last"])
def test_a_model_with_a_narrower_output_exports_too(small_corpus, tmp_path, shape):
    from wordlm.generate import read_context
    from wordlm.train import train

    from conftest import tiny_config

    cfg = tiny_config(small_corpus, epochs=1)
    cfg.model.num_layers, cfg.model.embedding_size, cfg.model.tie_weights = 2, 4, True
    for k, v in shape.items():
        setattr(cfg.model, k, v)
    train(cfg, tmp_path / "run")
    out = tmp_path / "m.pt2"
    r = CliRunner().invoke(app, ["export", str(tmp_path / "run"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    script = tmp_path / "run_exported.py"
    script.write_text(EXPORTED)
    proc = subprocess.run([sys.executable, str(script), str(out), "the cat sees"], capture_output=True, text=True,
                          check=True, cwd=tmp_path)
    exported = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    trained = load(tmp_path / "run")
    original, _ = read_context(trained.model, trained.context_ids("the cat sees"))
    torch.testing.assert_close(exported, original, atol=1e-5, rtol=0)


def test_sentencepiece_predict_assembles_whole_words(tmp_path):
    from wordlm.config import load_config
    from wordlm.train import train

    cfg = load_config(ROOT / "configs" / "demo.toml", ["tokenizer.kind=sentencepiece", "tokenizer.vocab_size=120",
                                                       "train.epochs=3"])
    train(cfg, tmp_path / "sp")
    sp = load(tmp_path / "sp")
    preds = sp.predict("the network learns a pattern from left to", k=3)
    assert preds[0]["word"] == "right" and preds[0]["prob"] > 0.5, preds
    # sentencepiece's lone word-start piece followed by the next word's start is an empty word, not a candidate
    # (a barely trained model ranks that path high: it used to be listed second here, as "")
    cfg = load_config(ROOT / "configs" / "demo.toml", ["tokenizer.kind=sentencepiece", "tokenizer.vocab_size=200",
                                                       "train.max_steps=30"])
    train(cfg, tmp_path / "sp30")
    sp30 = load(tmp_path / "sp30")
    assert any(sp30.tokenizer.token_text(i) == " " for i in range(sp30.tokenizer.vocab_size))  # the lone piece
    for model in (sp, sp30):
        for prompt in ("why do we", "the", ""):
            preds = model.predict(prompt, k=30)
            assert len(preds) == 30 and all(p["word"].strip() for p in preds), preds
    report = sp.evaluate(ROOT / "data" / "tiny" / "test.txt")
    assert report["words"] > 0 and report["word_ppl"] > report["ppl"]  # fewer words than pieces
    assert torch.isfinite(torch.tensor(report["word_ppl"]))


def test_dynamic_evaluation_with_lr_0_equals_static_exactly(lm):
    from wordlm.data import Streams, encode_file
    from wordlm.evaluate import dynamic_total_nll, gradient_ms, total_nll

    split = encode_file(ROOT / "data" / "tiny" / "valid.txt", lm.tokenizer)
    streams = Streams(split.ids, 1)
    ms = gradient_ms(lm.model, streams, 5, windows=20)
    static = total_nll(lm.model, streams, 5)
    before = [p.detach().clone() for p in lm.model.parameters()]
    assert dynamic_total_nll(lm.model, streams, 5, lr=0.0, decay=0.0, ms=ms) == static
    assert dynamic_total_nll(lm.model, streams, 5, lr=0.0, decay=0.5, ms=ms) == static  # theta stays theta0
    tiny = dynamic_total_nll(lm.model, streams, 5, lr=1e-9, decay=0.0, ms=ms)
    assert tiny[0] == pytest.approx(static[0], rel=1e-6)  # the adapting path scores like the static one
    adapted = dynamic_total_nll(lm.model, streams, 5, lr=1e-3, decay=0.0, ms=ms)
    assert adapted[0] != static[0]
    assert all(torch.equal(a, b) for a, b in zip(before, lm.model.parameters(), strict=True))  # restored


@pytest.mark.parametrize("layered", [False, True], ids=["fused-lstm", "awd-layers"])
def test_dynamic_evaluation_adapts_with_every_dropout_off_and_puts_the_modes_back(layered):
    # On a GPU the adapting passes put the nn.LSTM modules (only them) into training mode, which cuDNN's backward
    # pass needs: their own between-layer dropout must stay off, as must the model's dropouts and weight drop.
    # On the CPU a dropout left on draws a new mask per pass, so two passes would differ.
    from wordlm.config import ModelConfig
    from wordlm.data import Streams
    from wordlm.evaluate import dynamic_total_nll, gradient_ms
    from wordlm.model import LSTMLanguageModel

    torch.manual_seed(0)
    knobs = dict(dropout_hidden=0.5, weight_drop=0.5, dropout_input=0.5, dropout_output=0.5) if layered else {}
    model = LSTMLanguageModel(30, ModelConfig(embedding_size=8, hidden_size=8, num_layers=2, dropout=0.5, **knobs))
    assert (model.lstm is None) == layered
    model.eval()
    lstms = [m for m in model.modules() if isinstance(m, torch.nn.LSTM)]
    streams = Streams(torch.randint(0, 30, (200,)), 1)
    ms = gradient_ms(model, streams, 5, windows=10)
    assert all(torch.equal(a, b) for a, b in zip(ms, gradient_ms(model, streams, 5, windows=10), strict=True))
    first = dynamic_total_nll(model, streams, 5, lr=1e-3, decay=0.0, ms=ms)
    assert dynamic_total_nll(model, streams, 5, lr=1e-3, decay=0.0, ms=ms) == first
    assert not model.training and not any(m.training for m in lstms)
    assert [m.dropout for m in lstms] == [0.0 if layered else 0.5] * len(lstms)
    model.train()
    gradient_ms(model, streams, 5, windows=2)
    assert model.training and all(m.training for m in lstms)  # a model in training mode is left in it


def test_dynamic_evaluation_takes_krause_et_al_s_step(lm):
    # Krause et al. (2018), RMS with a global prior: both terms of an update read the weights before it,
    #   theta <- theta + min(1, decay * rms / mean(rms)) * (theta0 - theta) - lr * g / (rms + eps).
    # Three windows, so that the third is scored after two updates (the first starts at theta0, where the pull
    # is zero); with decay 0.5 the pull applied after the step instead reads 0.5% apart.
    import copy

    from wordlm.data import Streams, encode_file
    from wordlm.evaluate import dynamic_total_nll, gradient_ms

    split = encode_file(ROOT / "data" / "tiny" / "valid.txt", lm.tokenizer)
    streams = Streams(split.ids[:16], 1)  # targets 1..15: windows at rows 0, 5 and 10
    ms = gradient_ms(lm.model, Streams(split.ids, 1), 5, windows=20)
    lr, decay, eps = 3e-3, 0.5, 1e-5
    got, n = dynamic_total_nll(lm.model, streams, 5, lr, decay, ms, eps)

    model = copy.deepcopy(lm.model).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    theta0 = [p.detach().clone() for p in params]
    rms = [m.sqrt() for m in ms]
    mean_rms = torch.cat([r.flatten() for r in rms]).mean()
    state, want, windows = model.init_state(1), 0.0, 0
    for row in range(0, streams.rows - 1, 5):
        x, y = streams.window(row, 5)
        nll, state = model(x, (state[0].detach(), state[1].detach()), y)
        want += nll.double().sum().item()
        grads = torch.autograd.grad(nll.mean(), params)
        with torch.no_grad():
            for p, g, p0, r in zip(params, grads, theta0, rms, strict=True):
                p += torch.clamp(decay * r / mean_rms, max=1.0) * (p0 - p) - lr * g / (r + eps)
        windows += 1
    assert windows == 3 and n == 15
    assert got == pytest.approx(want, rel=1e-6)


def test_dynamic_evaluation_cli_chooses_by_grid(demo_run):
    r = CliRunner().invoke(app, ["eval", str(demo_run), "--split", "test", "--dynamic", "--dyn-lambda", "0",
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    grid = out["dynamic"]["grid"]
    assert [g["lr"] for g in grid[:3]] == [1e-5, 3e-5, 1e-4] and out["dynamic"]["decay"] == 0  # 20 tokens
    assert out["dynamic"]["lr"] == min(grid, key=lambda g: g["ppl"])["lr"]
    # a long evaluation says what it is doing: each grid point's result as it comes, then the pass it chose
    logged = [line for line in r.stderr.splitlines() if line.startswith("dynamic: ")]
    assert len(logged) == 1 + len(grid) + 1, r.stderr
    assert all(f"ppl {g['ppl']:.2f}" in line for g, line in zip(grid, logged[1:-1], strict=True))
    assert logged[-1].startswith(f"dynamic: lr {out['dynamic']['lr']:g}, lambda 0 over test.txt")


def test_dynamic_grid_starts_higher_for_longer_updates():
    from wordlm.api import dyn_grid_start

    assert dyn_grid_start(5) == dyn_grid_start(1) == (1e-6, 3e-6, 1e-5)
    assert dyn_grid_start(10) == (3e-6, 1e-5, 3e-5) and dyn_grid_start(20) == (1e-5, 3e-5, 1e-4)
    assert dyn_grid_start(10_000) == (1e-4, 3e-4, 1e-3)  # the ladder's top three


@pytest.mark.parametrize("seq_len, best_lr, tried", [
    (5, 1e-4, [3e-5, 1e-4, 3e-4]),  # best above the grid: up the ladder until a step does worse
    (5, 3e-6, []),  # best inside the grid: nothing more
    (5, 1e-2, [3e-5, 1e-4, 3e-4, 1e-3]),  # never past the ladder's top
    (5, "nan", [3e-5]),  # a step that diverges ends the climb
    (20, 3e-6, [3e-6, 1e-6]),  # best below the grid: down the ladder
    (20, 1e-8, [3e-6, 1e-6]),  # never past the ladder's foot
])
def test_dynamic_grid_moves_while_its_best_step_is_at_an_edge(lm, monkeypatch, seq_len, best_lr, tried):
    """A best step size at an edge of the grid is followed along the ladder (scripted perplexities: a bowl
    around `best_lr` in log10)."""
    import wordlm.evaluate
    from wordlm.api import dyn_grid_start

    def scripted(model, streams, seq_len, lr, decay, ms):
        if best_lr == "nan":
            ppl = math.nan if lr > 1e-5 else 100 - lr * 1e6
        else:
            ppl = 100 + (math.log10(lr) - math.log10(best_lr)) ** 2 + decay
        return math.log(ppl) * 1000, 1000

    monkeypatch.setattr(wordlm.evaluate, "dynamic_total_nll", scripted)
    text = ROOT / "data" / "tiny" / "valid.txt"
    out = lm.evaluate_dynamic(text, grid_on=text, ms_windows=2, seq_len=seq_len)
    grid = out["dynamic"]["grid"]
    assert [(g["lr"], g["decay"]) for g in grid[:6]] == [(a, d) for a in dyn_grid_start(seq_len) for d in (0, 1e-3)]
    assert [g["lr"] for g in grid[6:]] == pytest.approx(tried) and all(g["decay"] == 0 for g in grid[6:])
    finite = [g for g in grid if not math.isnan(g["ppl"])]
    assert out["dynamic"]["lr"] == min(finite, key=lambda g: g["ppl"])["lr"]


def test_evaluation_windows_change_speed_not_figures(lm):
    # `wordlm eval` reads long windows (fewer fixed costs per token); the state is carried between windows, so
    # the figures are those of the training window's length.
    from wordlm.evaluate import eval_window

    text = ROOT / "data" / "tiny" / "valid.txt"
    assert eval_window(1, 10_000) == 400 and eval_window(20, 10_000) == 35 and eval_window(1, 100) == 1000
    for streams in (1, 4):
        chosen = eval_window(streams, lm.tokenizer.vocab_size, lm.config.train.seq_len)
        assert chosen > lm.config.train.seq_len
        default = lm.evaluate(text, batch_size=streams)
        short = lm.evaluate(text, batch_size=streams, seq_len=lm.config.train.seq_len)
        assert default["tokens"] == short["tokens"]
        assert default["total_nll"] == pytest.approx(short["total_nll"], rel=1e-9)


@needs_cpu_bf16
def test_eval_precision_defaults_to_the_runs_and_can_be_chosen(demo_run, lm):
    """`wordlm eval --precision`: the run's train.precision unless told (the demo trains in fp32); bf16 autocast
    reads close to fp32 but not bit for bit, so the figure says which it is."""
    text = ROOT / "data" / "tiny" / "valid.txt"
    fp32, bf16 = lm.evaluate(text, precision="fp32"), lm.evaluate(text, precision="bf16")
    assert lm.config.train.precision == "fp32" and lm.evaluate(text) == fp32
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert bf16["total_nll"] != fp32["total_nll"] and bf16["ppl"] == pytest.approx(fp32["ppl"], rel=0.01)
    r = CliRunner().invoke(app, ["eval", str(demo_run), "--precision", "bf16", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["total_nll"] == pytest.approx(bf16["total_nll"], rel=1e-12)
    r = CliRunner().invoke(app, ["eval", str(demo_run), "--precision", "bf16", "--dynamic"])
    assert r.exit_code == 2 and "dynamic evaluation runs in fp32" in r.output


def test_dynamic_grid_never_chooses_a_diverged_point(lm, monkeypatch):
    import wordlm.evaluate

    def scripted(model, streams, seq_len, lr, decay, ms):  # the first point diverges; 3e-6 is best
        ppl = math.nan if (lr, decay) == (1e-6, 0.0) else 100 + (math.log10(lr) - math.log10(3e-6)) ** 2
        return math.log(ppl) * 1000, 1000

    monkeypatch.setattr(wordlm.evaluate, "dynamic_total_nll", scripted)
    text = ROOT / "data" / "tiny" / "valid.txt"
    assert lm.evaluate_dynamic(text, grid_on=text, ms_windows=2, seq_len=5)["dynamic"]["lr"] == 3e-6


def test_dynamic_evaluation_says_when_its_grid_read_the_text_it_scores(lm, monkeypatch, caplog):
    # lr and lambda tuned on the first 10,000 tokens of the evaluated text flatter its figure: a warning says so,
    # and the JSON names the text the grid read (None when nothing was tuned)
    import wordlm.evaluate

    monkeypatch.setattr(wordlm.evaluate, "dynamic_total_nll", lambda *a: (math.log(50.0) * 100, 100))
    valid, test = ROOT / "data" / "tiny" / "valid.txt", ROOT / "data" / "tiny" / "test.txt"
    with caplog.at_level("WARNING", logger="wordlm"):
        fair = lm.evaluate_dynamic(test, grid_on=valid, ms_windows=2)
    assert fair["dynamic"]["grid_on"] == str(valid) and "optimistic" not in caplog.text
    with caplog.at_level("WARNING", logger="wordlm"):
        same = lm.evaluate_dynamic(ROOT / "data" / ".." / "data" / "tiny" / "valid.txt", grid_on=valid, ms_windows=2)
    assert same["dynamic"]["grid_on"] == str(valid)
    assert "chosen on all 5,657 tokens of valid.txt, the text evaluated here" in caplog.text, caplog.text
    assert "optimistic" in caplog.text
    assert lm.evaluate_dynamic(valid, 1e-4, 0.0, grid_on=valid, ms_windows=2)["dynamic"]["grid_on"] is None


def test_dynamic_evaluation_refuses_non_finite_settings_and_reports_divergence(lm, monkeypatch, caplog):
    import wordlm.evaluate
    from wordlm.errors import UsageError

    text = ROOT / "data" / "tiny" / "valid.txt"
    for lr, decay, flag in ((math.inf, 0.0, "lr"), (1e-4, math.nan, "decay")):
        with pytest.raises(UsageError, match=f"{flag} must be a finite number >= 0"):
            lm.evaluate_dynamic(text, lr, decay)

    def blown_up(model, streams, seq_len, lr, decay, ms):  # 5,000 nats a token: exp() of it overflows a float
        return 5000.0 * 100, 100

    monkeypatch.setattr(wordlm.evaluate, "dynamic_total_nll", blown_up)
    with caplog.at_level("WARNING", logger="wordlm"):
        r = lm.evaluate_dynamic(text, 1e6, 0.0, ms_windows=2)
    assert r["ppl"] == math.inf and r["loss"] == 5000.0  # once an OverflowError's traceback
    assert [m.getMessage() for m in caplog.records] == [
        "warning: dynamic evaluation diverged at lr 1e+06 (perplexity inf, above the vocabulary's 142, which a "
        "uniform guess gets): use a smaller lr, or leave it out to choose one on the validation split"]
    monkeypatch.setattr(wordlm.evaluate, "dynamic_total_nll", lambda *a: (math.log(50.0) * 100, 100))
    caplog.clear()
    with caplog.at_level("WARNING", logger="wordlm"):
        assert lm.evaluate_dynamic(text, 1e-4, 0.0, ms_windows=2)["ppl"] == pytest.approx(50.0)
    assert not caplog.records


def test_the_python_api_checks_its_arguments(lm):
    """What the CLI's options check, the Python API checks too: one UsageError, no stray ValueError or silently
    empty result."""
    from wordlm.errors import UsageError

    one = lm.score("why do we need a recurrent neural network")  # a string is one sentence, not its characters
    assert len(one) == 1 and one == lm.score(["why do we need a recurrent neural network"])
    text = ROOT / "data" / "tiny" / "valid.txt"
    with pytest.raises(UsageError, match="seq_len must be >= 1, got 0"):
        lm.evaluate(text, seq_len=0)
    # named as the keywords the caller wrote, not as the command line's options
    for call, message in ((lambda: lm.evaluate_dynamic(text, 1e-4, 0.0, seq_len=0), "seq_len must be >= 1, got 0"),
                          (lambda: lm.generate_many("why", 3, num_samples=0), "num_samples must be >= 1, got 0"),
                          (lambda: lm.generate("why", max_tokens=-1), "max_tokens must be >= 0, got -1"),
                          (lambda: lm.generate("why", top_p=0.0), "top_p must be in (0, 1], got 0.0"),
                          (lambda: lm.predict("why", k=0), "k must be >= 1, got 0"),
                          (lambda: lm.evaluate(text, batch_size=0), "batch_size must be >= 1, got 0")):
        with pytest.raises(UsageError) as e:
            call()
        assert str(e.value) == message


        with pytest.raises(UsageError) as e:
            call()
        assert str(e.value) == message


def test_dynamic_evaluation_refuses_a_missing_grid_text_before_its_slow_passes(lm, tmp_path, monkeypatch):
    import wordlm.evaluate
    from wordlm.errors import DataError, UsageError

    def no_slow_pass(*args, **kwargs):
        raise AssertionError("the gradient-scale pass ran before the arguments were checked")

    monkeypatch.setattr(wordlm.evaluate, "gradient_ms", no_slow_pass)
    text = ROOT / "data" / "tiny" / "test.txt"
    with pytest.raises(DataError, match=f"text to evaluate: {tmp_path}/none.txt does not exist"):
        lm.evaluate_dynamic(text, grid_on=tmp_path / "none.txt")
    with pytest.raises(UsageError, match="give lr and decay, or a validation text"):
        lm.evaluate_dynamic(text, lr=1e-4, grid_on="")  # an empty data.valid is no validation text


def test_api_messages_name_keywords_and_the_cli_s_name_its_options(lm, demo_run, tmp_path, monkeypatch):
    """One check serves both: the Python caller reads the keyword it wrote (`lr`), the command line's user the
    option they typed (`--dyn-lr`), for each refusal the CLI does not make itself first."""
    import wordlm.evaluate
    from wordlm.api import LanguageModel
    from wordlm.errors import DataError, UsageError

    monkeypatch.setattr(wordlm.evaluate, "_runs_bf16_lstm", lambda device: False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    no_bf16 = "this CPU (AVX2) has no bf16 LSTM kernel (oneDNN's needs AVX-512 or Arm bf16)"
    text, short = ROOT / "data" / "tiny" / "valid.txt", tmp_path / "short.txt"
    short.write_text("why do we need\n")
    load_as_is = LanguageModel.load

    def without_valid(cls, *args, **kwargs):
        m = load_as_is(*args, **kwargs)
        m.config.data.valid = ""
        return m

    cases = [  # (API call, its message; CLI arguments, their message)
        (lambda: lm.evaluate(text, precision="bf16"), f"precision='bf16', but {no_bf16}: use precision='fp32'",
         ["eval", demo_run, "--precision", "bf16", "--device", "cpu"],
         f"--precision bf16, but {no_bf16}: use --precision fp32"),
        (lambda: lm.evaluate(text, cuda_graphs=True),
         "cuda_graphs=True needs a CUDA device and the model is on cpu: drop it or use device='cuda'",
         ["eval", demo_run, "--cuda-graphs", "--device", "cpu"],
         "--cuda-graphs needs a CUDA device and the model is on cpu: drop it or use --device cuda"),
        (lambda: lm.evaluate_dynamic(text, math.nan, 0.0), "lr must be a finite number >= 0, got nan",
         ["eval", demo_run, "--dynamic", "--dyn-lr", "inf", "--dyn-lambda", "0"],
         "--dyn-lr must be a finite number >= 0, got inf"),
        (lambda: lm.evaluate_dynamic(text, 1e-4), "give lr and decay, or a validation text (grid_on) for the grid "
         "search to choose them on", ["eval", demo_run, "--data", text, "--dynamic", "--dyn-lr", "1e-4", "--no-valid"],
         "give --dyn-lr and --dyn-lambda, or a validation text (data.valid) for the grid search to choose them on"),
        (lambda: lm.evaluate(short, batch_size=4), f"{short}: text of 5 tokens is too short for 4 streams (each "
         "needs at least 2 tokens); use a longer text or a smaller batch size (batch_size)",
         ["eval", demo_run, "--data", short, "--batch-size", "4"], f"{short}: text of 5 tokens is too short for 4 "
         "streams (each needs at least 2 tokens); use a longer text or a smaller batch size (--batch-size)"),
        (lambda: list(lm.generate(" ")), "the prompt is empty; give some text to condition on, e.g. prompt='the'",
         ["generate", demo_run, "--prompt", " "], "the prompt is empty; give some text to condition on, e.g. "
         "--prompt the"),
        (lambda: lm.generate("why", temperature=0.0), "temperature must be > 0, got 0.0 (use top_k=1 for greedy "
         "decoding)", ["generate", demo_run, "--prompt", "why", "--temperature", "0"],
         "--temperature must be > 0, got 0.0 (use --top-k 1 for greedy decoding)"),
    ]
    for call, message, argv, cli_message in cases:
        with pytest.raises((UsageError, DataError)) as e:
            call()
        assert str(e.value) == message
        if "--no-valid" in argv:  # a run whose config names no validation text: the CLI has no grid to offer
            argv.remove("--no-valid")
            monkeypatch.setattr(LanguageModel, "load", classmethod(without_valid))
        r = CliRunner().invoke(app, [str(a) for a in argv])
        monkeypatch.setattr(LanguageModel, "load", load_as_is)
        assert r.exit_code in (2, 3) and r.output.strip().splitlines() == [f"error: {cli_message}"], r.output


def test_a_reader_that_stops_early_ends_the_command_quietly_with_exit_0(demo_run):
    # `wordlm generate ... | head -c 10`: once the reader has gone, the next write meets a closed pipe. That is the
    # reader's choice, not a failure: exit 0 and nothing on stderr, as when all the output fitted in the pipe
    # before the reader left (it used to be exit 1 or 0 depending on which came first).
    proc = subprocess.Popen([sys.executable, "-m", "wordlm", "generate", str(demo_run), "--prompt", "the",
                             "--max-tokens", "4000", "--seed", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(10)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and b"Error" not in err and b"Traceback" not in err, err.decode()


def test_a_log_reader_that_goes_away_does_not_stop_the_work(monkeypatch):
    # `wordlm train ... 2>&1 | head`: log lines meet a closed pipe; training must go on (and end with exit 0
    # once its checkpoints are written), not die in the middle of a run
    import logging

    from wordlm.cli import _EchoHandler

    class Closed:
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stderr", Closed())
    _EchoHandler().emit(logging.LogRecord("wordlm", logging.INFO, __file__, 1, "epoch 3: valid ppl 120", None, None))
