"""AWD-LSTM's regularisers, projection, variable BPTT and NT-ASGD."""

import itertools
import json
import warnings

import pytest
import torch

from wordlm.config import ModelConfig
from wordlm.model import LSTMLanguageModel
from wordlm.train import should_average, train

from conftest import awd_like_config, tiny_config

BASE = {"embedding_size": 16, "hidden_size": 16, "num_layers": 3}
KNOBS = ["dropout_embedding", "dropout_input", "dropout_hidden", "dropout_output", "weight_drop", "dropout"]


def model(**kw) -> LSTMLanguageModel:
    torch.manual_seed(0)
    return LSTMLanguageModel(40, ModelConfig(**{**BASE, **kw}))


def same_weights(dst: LSTMLanguageModel, src: LSTMLanguageModel) -> LSTMLanguageModel:
    """Copy src's weights into dst, mapping the fused LSTM's layer i onto dst's single-layer LSTM i."""
    state = {}
    for k, v in src.state_dict().items():
        if k.startswith("lstm.") and dst.layered:
            name, layer = k[len("lstm."):].rsplit("_l", 1)
            k = f"layers.{layer}.{name}_l0"
        state[k] = v
    dst.load_state_dict(state)
    return dst


def run(m: LSTMLanguageModel, train_mode: bool, seed: int = 1) -> torch.Tensor:
    m.train(train_mode)
    torch.manual_seed(seed)
    ids = torch.randint(0, 40, (9, 4), generator=torch.Generator().manual_seed(5))
    return m(ids)[0]


@pytest.mark.parametrize("knob", KNOBS)
def test_no_op_at_zero_and_only_active_in_training(knob):
    ref = model()
    off = same_weights(model(**{knob: 0.0}), ref)
    on = same_weights(model(**{knob: 0.5}), ref)
    torch.testing.assert_close(run(off, True), run(ref, True), rtol=0, atol=0)  # p = 0: nothing changes
    torch.testing.assert_close(run(on, False), run(ref, False), rtol=1e-6, atol=1e-6)  # eval: nothing changes
    assert not torch.allclose(run(on, True), run(ref, True))  # p > 0 in training: outputs change


def test_weight_drop_keeps_the_parameters_and_warns_nothing():
    m = model(weight_drop=0.5)
    params = dict(m.named_parameters())
    ids = {n: id(p) for n, p in params.items()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    before = params["layers.0.weight_hh_l0"].detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        m.train()
        nll, _ = m(torch.randint(0, 40, (6, 2)), None, torch.randint(0, 40, (6, 2)))
        nll.mean().backward()
        opt.step()
    assert {n: id(p) for n, p in m.named_parameters()} == ids  # the optimizer's tensors are the model's
    assert params["layers.0.weight_hh_l0"].grad is not None
    assert not torch.equal(params["layers.0.weight_hh_l0"], before)  # the raw matrix is what trains
    # Dropped entries get no gradient: DropConnect, not dropout on activations.
    assert (params["layers.0.weight_hh_l0"].grad == 0).float().mean() > 0.3


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")  # torch's, on a CPU
def test_projection_and_tying():
    m = LSTMLanguageModel(40, ModelConfig(embedding_size=8, hidden_size=16, num_layers=2, proj_size=8,
                                          tie_weights=True))
    logits, (h, c) = m(torch.randint(0, 40, (5, 3)))
    assert logits.shape == (5, 3, 40) and h.shape == (2, 3, 8) and c.shape == (2, 3, 16)
    assert m.decoder.weight is m.embedding.weight


def test_ar_tar_add_a_term_in_training_only():
    m = model(dropout_output=0.2)
    m.ar_alpha, m.tar_beta = 2.0, 1.0
    run(m, True)
    assert m.reg_loss is not None and m.reg_loss.item() > 0
    run(m, False)
    assert m.reg_loss is None


def test_nt_asgd_trigger_on_scripted_validations():
    # Non-monotone, as AWD-LSTM's code: the newest loss must be worse than the best of the losses before it,
    # leaving out the `nonmono` just before it.
    assert not should_average([5.0, 4.0, 3.9], nonmono=2)
    assert not should_average([5.0, 4.0, 3.9, 3.95], nonmono=2)  # worse than 3.9, but 3.9 is too recent
    assert not should_average([5.0, 4.0, 3.9, 3.95, 3.98], nonmono=2)  # 3.9 is still one of the 2 left out
    assert should_average([5.0, 4.0, 3.9, 3.95, 4.1], nonmono=2)  # worse than min(5.0, 4.0)
    assert not should_average([5.0, 4.0, 4.2], nonmono=1)  # one bad evaluation does not switch
    assert should_average([5.0, 4.0, 4.2, 4.3], nonmono=1)  # worse than min(5.0, 4.0)
    # the paper's nonmono = 5: the first possible switch is at the 7th validation
    assert not should_average([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], nonmono=5)
    assert should_average([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], nonmono=5)


def test_nt_asgd_switches_when_expected_in_training(small_corpus, tmp_path, monkeypatch):
    # The switch is due at the 6th validation (2.6 > min(3.0, 2.5, 2.4)), not at the 5th: 2.48 is worse than
    # 2.4, but 2.4 is one of the two validations just before it. After the switch each validation reads the
    # average and the raw iterate.
    scripted = itertools.chain([3.0, 2.5, 2.4, 2.45, 2.48, 2.6], itertools.repeat(2.3))
    import wordlm.train as train_module

    monkeypatch.setattr(train_module, "total_nll", lambda *a, **k: (next(scripted) * 100, 100))
    train(tiny_config(small_corpus, optimizer="ntasgd", nonmono=2, eval_every=3, max_steps=24, epochs=0,
                      schedule="constant"), tmp_path / "run")
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    valid_steps = [r["step"] for r in recs if r["event"] == "valid"]
    assert [r["step"] for r in recs if r["event"] == "averaging"] == [valid_steps[5]] == [18]
    from wordlm.checkpoint import load_checkpoint

    last = load_checkpoint(tmp_path / "run", prefer="last", train_state=True)
    assert last.train_state["n_averaged"] == 24 - 18  # every step after the switch
    assert not torch.equal(last.train_state["raw_model"]["decoder.weight"], last.model_state["decoder.weight"])


@pytest.mark.parametrize("stop", [True, False])
def test_stop_nonmono_ends_training_at_awd_lstms_test(small_corpus, tmp_path, monkeypatch, stop):
    # AWD-LSTM's finetuning averages from its first step and ends at the same non-monotone test that starts the
    # average in training: on these validations at the 6th, not at the 5th. (Each validation reads the average,
    # then the raw iterate: 9.9 is the raw one's, which the test leaves aside.)
    averaged = itertools.chain([3.0, 2.5, 2.4, 2.45, 2.48, 2.6], itertools.repeat(2.3))
    scripted = itertools.chain.from_iterable((a, 9.9) for a in averaged)
    import wordlm.train as train_module

    monkeypatch.setattr(train_module, "total_nll", lambda *a, **k: (next(scripted) * 100, 100))
    result = train(tiny_config(small_corpus, optimizer="ntasgd", average_from_start=True, stop_nonmono=stop,
                               nonmono=2, eval_every=3, max_steps=30, epochs=0, schedule="constant"),
                   tmp_path / "run")
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    valid_steps = [r["step"] for r in recs if r["event"] == "valid"]
    if stop:
        assert result.steps == 18 and valid_steps == [3, 6, 9, 12, 15, 18]
        assert result.stop_reason == "early stop: validation worse than the best before the last 2 (train.stop_nonmono)"
    else:
        assert result.steps == 30 and valid_steps[-1] == 30 and result.stop_reason == "finished"


def test_average_after_starts_the_average_at_its_fraction_of_the_run(small_corpus, tmp_path):
    # A budgeted run cannot wait for the validation trigger: average_after = 0.5 of 20 steps starts the mean at
    # step 10, whose weights are the first in it. Validation after that also reads the raw iterate.
    train(tiny_config(small_corpus, optimizer="ntasgd", average_after=0.5, eval_every=4, max_steps=20, epochs=0,
                      schedule="constant", nonmono=50), tmp_path / "run")
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    [switch] = [r for r in recs if r["event"] == "averaging"]
    assert switch["step"] == 10 and "average_after" in switch["trigger"]
    valid = [r for r in recs if r["event"] == "valid"]
    assert [r["step"] for r in valid if "raw_valid_ppl" not in r] == [4, 8]
    after = [r for r in valid if "raw_valid_ppl" in r]
    assert [r["step"] for r in after] == [12, 16, 20]
    assert all(r["raw_valid_ppl"] != r["valid_ppl"] for r in after)  # the mean is not the last iterate
    from wordlm.checkpoint import load_checkpoint

    last = load_checkpoint(tmp_path / "run", prefer="last", train_state=True)
    assert last.train_state["n_averaged"] == 20 - 10 + 1


def test_average_lr_is_the_rate_once_the_average_starts_and_after_a_resume(small_corpus, tmp_path):
    # train.average_lr: steps 1 to 10 at train.lr, every step after the switch (at step 10) at 0.25; a run
    # resumed after the switch goes on at 0.25, and a run without it keeps train.lr throughout.
    from dataclasses import replace

    def lrs(run):
        recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["lr"]) for r in recs if r["event"] == "train"]

    kw = dict(optimizer="ntasgd", average_after=0.5, eval_every=4, max_steps=20, epochs=0, schedule="constant",
              nonmono=50)
    train(tiny_config(small_corpus, average_lr=0.25, **kw), tmp_path / "run")
    assert lrs(tmp_path / "run") == [(s, 1.0 if s <= 10 else 0.25) for s in range(1, 21)]
    cut = tiny_config(small_corpus, average_lr=0.25, **{**kw, "max_steps": 14})
    train(cut, tmp_path / "cut")
    train(replace(cut, train=replace(cut.train, max_steps=20)), tmp_path / "cut", resume=True)
    assert lrs(tmp_path / "cut")[-6:] == [(s, 0.25) for s in range(15, 21)]
    train(tiny_config(small_corpus, **kw), tmp_path / "plain")
    assert {lr for _, lr in lrs(tmp_path / "plain")} == {1.0}


def test_average_after_starts_mid_run_with_the_awd_recipe(small_corpus, tmp_path):
    # Between two training steps the model holds the last forward's AR/TAR term, which a deep copy of the live
    # model (what AveragedModel makes) cannot copy: the switch must work there, with every regulariser on.
    cfg = awd_like_config(small_corpus, optimizer="ntasgd", average_after=0.5, nonmono=50, schedule="constant",
                          eval_every=10)
    result = train(cfg, tmp_path / "run")
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    [switch] = [r for r in recs if r["event"] == "averaging"]
    assert switch["step"] == (result.steps + 1) // 2
    assert all("raw_valid_ppl" in r for r in recs if r["event"] == "valid" and r["step"] > switch["step"])
    assert result.best_valid_ppl < 18  # as without averaging (15.1)


def test_when_the_average_starts_does_not_change_the_raw_iterates(small_corpus, tmp_path):
    # Starting the average builds a second model; its initialisation must not draw from the training RNG, or
    # every dropout mask after the switch would depend on when averaging began, and two runs that differ only
    # in their averaging start could not be compared iterate for iterate.
    from wordlm.checkpoint import load_checkpoint

    raw = {}
    for after in (0.25, 0.75):
        cfg = awd_like_config(small_corpus, optimizer="ntasgd", average_after=after, nonmono=50,
                              schedule="constant", eval_every=0, max_steps=16)
        train(cfg, tmp_path / str(after))
        last = load_checkpoint(tmp_path / str(after), prefer="last", train_state=True)
        raw[after] = last.train_state["raw_model"]
        assert last.train_state["n_averaged"] == 16 - int(16 * after) + 1
    for name, value in raw[0.25].items():
        assert torch.equal(value, raw[0.75][name]), name


def test_the_run_fraction_follows_steps_or_the_time_budget():
    from types import SimpleNamespace

    from wordlm.train import _Loop

    def frac(step, total, elapsed, budget):
        return _Loop._run_fraction(SimpleNamespace(step=step, total_steps=total, elapsed=elapsed,
                                                   tc=SimpleNamespace(time_budget_s=budget)))

    assert frac(5, 20, 0.0, 0.0) == 0.25
    assert frac(5, 1 << 62, 30.0, 120.0) == 0.25  # only a time budget
    assert frac(5, 10, 30.0, 120.0) == 0.5  # whichever limit is nearer
    assert frac(1, 10, 90.0, 120.0) == 0.75


def test_the_nt_asgd_average_equals_pytorchs_averaged_model(small_corpus, tmp_path, monkeypatch):
    # wordlm keeps the running mean itself (AveragedModel.update_parameters syncs the host three times a step
    # on a GPU); a reference AveragedModel fed the same iterates must end with the same weights.
    from torch.optim.swa_utils import AveragedModel

    import wordlm.train as train_module
    from wordlm.checkpoint import load_checkpoint

    ref = {}
    own = train_module._Loop._update_average

    def both(self):
        ref.setdefault("avg", AveragedModel(self.model, use_buffers=True)).update_parameters(self.model)
        own(self)

    monkeypatch.setattr(train_module._Loop, "_update_average", both)
    train(tiny_config(small_corpus, optimizer="ntasgd", average_from_start=True, max_steps=12, epochs=0),
          tmp_path / "run")
    last = load_checkpoint(tmp_path / "run", prefer="last", train_state=True)
    assert last.train_state["n_averaged"] == 12 == int(ref["avg"].n_averaged)
    for name, value in ref["avg"].module.state_dict().items():
        torch.testing.assert_close(last.model_state[name], value, rtol=1e-6, atol=1e-7)
    assert not torch.equal(last.model_state["decoder.weight"], last.train_state["raw_model"]["decoder.weight"])


def test_variable_bptt_varies_window_lengths(small_corpus, tmp_path, monkeypatch):
    from wordlm.data import Streams

    lengths = []
    window = Streams.window

    def spy(self, row, seq_len):
        x, y = window(self, row, seq_len)
        if self.batch_size == 4:
            lengths.append(x.shape[0])
        return x, y

    monkeypatch.setattr(Streams, "window", spy)
    train(tiny_config(small_corpus, seq_len=12, variable_bptt=True, epochs=3), tmp_path / "run")
    assert len(set(lengths)) > 3
    assert sum(n < 5 for n in lengths) <= 3  # only where an epoch's text runs out (3 epochs)


def test_finetune_starts_from_the_weights_with_averaging(small_corpus, tmp_path):
    from typer.testing import CliRunner

    from wordlm.checkpoint import load_checkpoint
    from wordlm.cli import app

    train(tiny_config(small_corpus, epochs=2), tmp_path / "base")
    r = CliRunner().invoke(app, ["finetune", str(tmp_path / "base"), "--out", str(tmp_path / "ft"), "--set",
                                 "train.epochs=1", "--set", "train.lr=0.5"])
    assert r.exit_code == 0, r.output
    ft = load_checkpoint(tmp_path / "ft", prefer="last", train_state=True)
    assert ft.config.train.optimizer == "ntasgd" and ft.train_state["n_averaged"] == ft.meta["step"]
    assert ft.config.train.stop_nonmono  # it ends when validation stalls, as AWD-LSTM's finetune.py does
    recs = [json.loads(ln) for ln in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    valids = [r for r in recs if r["event"] == "valid"]
    base_best = load_checkpoint(tmp_path / "base").meta["valid_loss"]
    # Its first validation reads the weights it starts from: the base run's best, to the last digit.
    assert valids[0]["step"] == 0 and valids[0]["start"] and valids[0]["valid_loss"] == pytest.approx(base_best)
    assert len(valids) > 1 and "start" not in valids[1]


def test_finetune_keeps_its_starting_weights_as_best_until_it_beats_them(small_corpus, tmp_path, monkeypatch):
    # AWD-LSTM's finetune.py saves only a validation better than the starting model's. Scripted: the start reads
    # 2.0, every later average 2.5 (then 9.9 for the raw iterate), so best/ stays the weights it began with.
    from wordlm.checkpoint import load_checkpoint
    from wordlm.cli import finetune

    train(tiny_config(small_corpus, epochs=1), tmp_path / "base")
    import wordlm.train as train_module

    scripted = itertools.chain([2.0], itertools.cycle([2.5, 9.9]))
    monkeypatch.setattr(train_module, "total_nll", lambda *a, **k: (next(scripted) * 100, 100))
    finetune(tmp_path / "base", tmp_path / "ft", ["train.epochs=0", "train.max_steps=12", "train.eval_every=4"],
             progress=False)
    best = load_checkpoint(tmp_path / "ft")
    base = load_checkpoint(tmp_path / "base")
    assert best.meta["step"] == 0 and best.meta["valid_loss"] == 2.0
    assert all(torch.equal(best.model_state[k], v) for k, v in base.model_state.items())
    last = load_checkpoint(tmp_path / "ft", prefer="last")
    assert last.meta["step"] == 12 and not torch.equal(last.model_state["decoder.weight"],
                                                       base.model_state["decoder.weight"])
