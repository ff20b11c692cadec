from pathlib import Path

import pytest

from wordlm.config import Config, load_config, parse_override
from wordlm.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_valid():
    Config.from_dict({})


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = load_config(path)
    for key in ("train", "valid", "test"):
        value = getattr(cfg.data, key)
        assert Path(value).is_absolute(), f"{path.name}: data.{key} not resolved"
    first = path.read_text().splitlines()[0]
    assert first.startswith("#"), f"{path.name} must open with a comment"


def test_paths_are_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    cfg_path = tmp_path / "sub" / "x.toml"
    cfg_path.write_text('[data]\ntrain = "../corpus/train.txt"\n')
    cfg = load_config(cfg_path)
    assert cfg.data.train == str((tmp_path / "corpus" / "train.txt").resolve())


def test_a_tilde_is_the_home_folder_in_the_file_and_in_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg_path = tmp_path / "x.toml"
    cfg_path.write_text('[data]\ntrain = "~/ptb/train.txt"\ncache_dir = "~/cache"\n')
    cfg = load_config(cfg_path, ["data.valid=~/ptb/valid.txt"])
    assert cfg.data.train == str(tmp_path / "home" / "ptb" / "train.txt")
    assert cfg.data.valid == str(tmp_path / "home" / "ptb" / "valid.txt")
    assert cfg.data.cache_dir == str(tmp_path / "home" / "cache")


def test_every_problem_is_reported_at_once():
    raw = {"train": {"lr": -1.0, "bogus": 1, "batch_size": "20"}, "model": {"dropout": 1.0},
           "tokenizer": {"kind": "bytes"}, "nope": {}}
    with pytest.raises(ConfigError) as e:
        Config.from_dict(raw)
    msg = str(e.value)
    for needle in ("train.lr must be > 0.0", "unknown key train.bogus (valid: batch_size", "train.batch_size must be "
                   "an integer", "model.dropout must be < 1.0", "tokenizer.kind must be one of word, char, "
                   "sentencepiece", "unknown section [nope]"):
        assert needle in msg
    assert len(e.value.problems) == 6


def test_tie_weights_needs_equal_sizes():
    with pytest.raises(ConfigError, match="tie_weights needs model.embedding_size == model.hidden_size"):
        Config.from_dict({"model": {"tie_weights": True, "embedding_size": 100, "hidden_size": 200}})


def test_average_after_is_a_fraction_for_nt_asgd():
    Config.from_dict({"train": {"optimizer": "ntasgd", "average_after": 0.5}})
    with pytest.raises(ConfigError, match='train.average_after averages the iterates of NT-ASGD, but '
                                          'train.optimizer is .sgd.: set train.optimizer = "ntasgd"'):
        Config.from_dict({"train": {"average_after": 0.5}})
    with pytest.raises(ConfigError, match='train.average_lr is the lr while NT-ASGD averages, but '
                       'train.optimizer is \'sgd\''):
        Config.from_dict({"train": {"average_lr": 15.0}})
    with pytest.raises(ConfigError, match="train.average_after must be < 1.0"):
        Config.from_dict({"train": {"optimizer": "ntasgd", "average_after": 1.0}})


def test_int_is_accepted_for_float_but_not_bool_for_int():
    cfg = Config.from_dict({"train": {"lr": 2}})
    assert cfg.train.lr == 2.0 and isinstance(cfg.train.lr, float)
    with pytest.raises(ConfigError, match="train.batch_size must be an integer"):
        Config.from_dict({"train": {"batch_size": True}})


def test_inf_and_nan_are_refused_and_a_key_outside_a_section_is_named(tmp_path):
    # TOML writes inf and nan; nan passes every range check (each comparison is false), so it needs its own.
    with pytest.raises(ConfigError) as e:
        Config.from_dict({"train": {"lr": float("nan"), "clip": float("inf"), "time_budget_s": float("-inf")}})
    assert sorted(e.value.problems) == ["train.clip must be a finite number, got inf",
                                        "train.lr must be a finite number, got nan",
                                        "train.time_budget_s must be a finite number, got -inf"]
    with pytest.raises(ConfigError, match="train.lr must be a finite number, got inf"):
        load_config(ROOT / "configs" / "demo.toml", ["train.lr=1e999"])
    top = tmp_path / "top.toml"
    top.write_text("lr = 1\n[train]\nepochs = 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(top)
    assert e.value.problems == ["lr = 1 is outside any section; put it under one of [data], [tokenizer], [model], "
                                "[train]"]


def test_overrides_parse_as_toml_and_win(tmp_path):
    assert parse_override("train.lr=3e-3") == ("train", "lr", 0.003)
    assert parse_override("train.device=cuda") == ("train", "device", "cuda")
    assert parse_override("model.tie_weights=true") == ("model", "tie_weights", True)
    p = tmp_path / "c.toml"
    p.write_text("[train]\nlr = 1.0\nepochs = 3\n")
    cfg = load_config(p, ["train.lr=0.5"])
    assert (cfg.train.lr, cfg.train.epochs) == (0.5, 3)
    with pytest.raises(ConfigError, match="unknown key train.lrr"):
        load_config(p, ["train.lrr=1"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(p, ["train.lr"])


def test_an_unknown_key_points_at_the_section_it_belongs_in_or_the_key_it_resembles(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("[trian]\nlr = 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.problems == ["unknown section [trian]; did you mean [train]? (sections: data, tokenizer, model, "
                                "train)"]
    p.write_text("[train]\nlr = 1.0\n")
    for override, hint in (("model.lr=1", "unknown key model.lr; it belongs in [train]: train.lr (valid: "),
                           ("data.vocab_size=9", "unknown key data.vocab_size; it belongs in [tokenizer]: "
                                                 "tokenizer.vocab_size (valid: "),
                           ("model.hiden_size=9", "unknown key model.hiden_size; did you mean model.hidden_size? "
                                                  "(valid: "),
                           ("train.epoch=3", "unknown key train.epoch; did you mean train.epochs? (valid: "),
                           ("train.bogus=1", "unknown key train.bogus (valid: ")):  # nothing close: no guess
        with pytest.raises(ConfigError) as e:
            load_config(p, [override])
        assert len(e.value.problems) == 1 and e.value.problems[0].startswith(hint), e.value.problems


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="/dev/null is not a regular file; give the path of a TOML file"):
        load_config("/dev/null")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(ROOT / "configs" / "ptb-small.toml")
    p = tmp_path / "resolved.toml"
    p.write_text(cfg.to_toml())
    assert load_config(p) == cfg


def test_a_config_saved_with_a_byte_order_mark_loads(tmp_path):
    # Windows editors start UTF-8 files with one; tomllib reads it as a stray character at line 1, column 1.
    f = tmp_path / "x.toml"
    f.write_bytes(b"\xef\xbb\xbf[train]\nlr = 0.5\n")
    assert load_config(f).train.lr == 0.5
