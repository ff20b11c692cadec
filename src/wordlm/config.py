"""Typed configuration: code defaults, then a TOML file, then dotted `--set` overrides.

No torch here, so `wordlm --help` and config checks stay instant. Every key lives in one dataclass field whose
metadata carries its help text and allowed range; `validate` collects *all* problems and `ConfigError` reports
them together, each naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import ConfigError


def _opt(default: Any, help: str, **rules: Any) -> Any:
    """A config field: default, one-line help, and rules (min, max, min_excl, max_excl, choices)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


@dataclass
class DataConfig:
    train: str = _opt("", "training text (UTF-8, one sentence or paragraph per line)")
    valid: str = _opt("", "validation text; drives checkpoint selection, lr decay and early stopping")
    test: str = _opt("", "test text, read only by `wordlm eval --split test`")
    cache_dir: str = _opt("", "where encoded id arrays are cached; '' = $WORDLM_CACHE_DIR or ~/.cache/wordlm")


@dataclass
class TokenizerConfig:
    kind: str = _opt("word", "word: whitespace words + <eos>; char; sentencepiece: subwords",
                     choices=("word", "char", "sentencepiece"))
    vocab_size: int = _opt(0, "cap on the vocabulary (0 = no cap for word/char; required for sentencepiece)",
                           min=0)
    min_freq: int = _opt(1, "word/char: types seen fewer times in train become <unk>", min=1)
    lowercase: bool = _opt(False, "lowercase all text before tokenizing")
    sp_model_type: str = _opt("unigram", "sentencepiece algorithm", choices=("unigram", "bpe"))
    sp_character_coverage: float = _opt(1.0, "sentencepiece: share of characters covered", min_excl=0.0, max=1.0)


@dataclass
class ModelConfig:
    embedding_size: int = _opt(200, "word embedding width", min=1)
    hidden_size: int = _opt(200, "LSTM hidden width", min=1)
    num_layers: int = _opt(2, "stacked LSTM layers", min=1)
    dropout: float = _opt(0.0, "dropout on embeddings, between LSTM layers and before the decoder", min=0.0,
                          max_excl=1.0)
    tie_weights: bool = _opt(False, "share the embedding and decoder matrix (needs embedding_size == hidden_size)")
    init_range: float = _opt(0.1, "weights start uniform in [-init_range, init_range] (Zaremba et al. 2014)",
                             min_excl=0.0)
    lstm_init: str = _opt("uniform", "uniform: the LSTM's weights too start in [-init_range, init_range] (Zaremba); "
                          "pytorch: nn.LSTM's own uniform in +-1/sqrt(hidden_size) (AWD-LSTM)",
                          choices=("uniform", "pytorch"))
    proj_size: int = _opt(0, "LSTM output projection (nn.LSTM proj_size); tying then needs embedding_size == "
                          "proj_size (0 = no projection)", min=0)
    last_hidden_size: int = _opt(0, "width of the last LSTM layer (0 = hidden_size); AWD-LSTM's 400 lets a 400-d "
                                 "embedding tie (one nn.LSTM per layer then)", min=0)
    dropout_embedding: float = _opt(0.0, "AWD-LSTM: drop whole word rows of the embedding matrix", min=0.0,
                                    max_excl=1.0)
    dropout_input: float = _opt(0.0, "AWD-LSTM: variational (locked) dropout on the embeddings", min=0.0,
                                max_excl=1.0)
    dropout_hidden: float = _opt(0.0, "AWD-LSTM: variational dropout between LSTM layers", min=0.0, max_excl=1.0)
    dropout_output: float = _opt(0.0, "AWD-LSTM: variational dropout on the last LSTM output", min=0.0,
                                 max_excl=1.0)
    weight_drop: float = _opt(0.0, "AWD-LSTM: DropConnect on the hidden-to-hidden matrices", min=0.0,
                              max_excl=1.0)
    decoder: str = _opt("full", "full softmax, or adaptive (Grave et al. 2017): frequent words in a small head, "
                        "rare ones in cheaper tail clusters; much faster for large vocabularies",
                        choices=("full", "adaptive"))
    adaptive_cutoffs: list[int] = _opt([2000, 10000], "adaptive: word ranks where the head and each tail "
                                       "cluster end (cutoffs at or past the vocabulary size are dropped)")
    adaptive_div_value: float = _opt(4.0, "adaptive: each tail cluster's width is divided by this", min_excl=1.0)


@dataclass
class TrainConfig:
    batch_size: int = _opt(20, "parallel token streams per step", min=1)
    seq_len: int = _opt(35, "truncated-BPTT window length (tokens)", min=1)
    optimizer: str = _opt("sgd", "sgd, adamw, or ntasgd (SGD, then iterate averaging once validation stops "
                          "improving: AWD-LSTM's NT-ASGD)", choices=("sgd", "adamw", "ntasgd"))
    lr: float = _opt(1.0, "peak learning rate", min_excl=0.0)
    momentum: float = _opt(0.0, "SGD momentum", min=0.0, max_excl=1.0)
    weight_decay: float = _opt(0.0, "L2 (sgd) or decoupled (adamw) weight decay", min=0.0)
    schedule: str = _opt("plateau", "plateau: divide lr by lr_decay when valid stops improving; step: multiply "
                         "by lr_decay each epoch from decay_start_epoch; cosine: warmup then cosine to min_lr; "
                         "constant", choices=("plateau", "step", "cosine", "constant"))
    lr_decay: float = _opt(4.0, "plateau: divisor; step: multiplier per epoch", min_excl=0.0)
    decay_start_epoch: int = _opt(1, "step schedule: first epoch (1-based) whose lr is decayed", min=1)
    warmup_steps: int = _opt(0, "cosine: linear warmup steps", min=0)
    min_lr: float = _opt(0.0, "cosine: final learning rate", min=0.0)
    epochs: int = _opt(1, "passes over the training text (0 = only max_steps limits)", min=0)
    max_steps: int = _opt(0, "stop after this many optimizer steps (0 = no limit)", min=0)
    time_budget_s: float = _opt(0.0, "stop after this many seconds of training, validation included (0 = no "
                                "limit); a cosine schedule then anneals over the time as well as the steps", min=0.0)
    clip: float = _opt(5.0, "clip the global gradient norm to this (0 = off)", min=0.0)
    seed: int = _opt(1111, "seed for torch and python RNGs", min=0)
    device: str = _opt("auto", "auto (cuda if available), cpu, cuda or cuda:N")
    precision: str = _opt("fp32", "fp32 or bf16 autocast (on a CPU, bf16 needs AVX-512 or Arm bf16)",
                          choices=("fp32", "bf16"))
    tf32: bool = _opt(True, "fp32 training on a CUDA GPU (Ampere or later): let cuDNN's LSTM use TF32 tensor "
                      "cores (PyTorch's default; the products' inputs rounded to a 10-bit mantissa); false: IEEE "
                      "fp32 throughout, as the papers' GPUs computed. wordlm eval and validation are IEEE fp32 in fp32")
    num_threads: int = _opt(0, "CPU threads for torch (0 = torch's default)", min=0)
    compile: bool = _opt(False, "torch.compile the training step's forward (costs ~20 s at start; measured +15% "
                         "tokens/s on the CPU bench model)")
    cuda_graphs: bool = _opt(False, "CUDA only: record the training step as a CUDA graph (once per window length) "
                             "and replay it: one launch per step instead of hundreds; validation's forward pass "
                             "is recorded too; one process only")
    eval_every: int = _opt(0, "validate every N steps (0 = at the end of each epoch)", min=0)
    eval_batch_size: int = _opt(10, "streams used for validation", min=1)
    log_every: int = _opt(100, "steps between metrics.jsonl train records (the only host syncs)", min=1)
    save_every: int = _opt(0, "also write last/ every N steps (0 = only at each validation)", min=0)
    patience: int = _opt(0, "stop after this many validations without improvement (0 = never)", min=0)
    skip_nonfinite: bool = _opt(True, "skip steps whose loss or gradient is NaN/inf (decided on the device: no "
                                "host sync)")
    max_nonfinite: int = _opt(5, "stop after this many non-finite steps in a row", min=1)
    nonmono: int = _opt(5, "ntasgd: start averaging when a validation is worse than the best of those before "
                        "it, leaving out the nonmono just before it", min=1)
    average_from_start: bool = _opt(False, "ntasgd: average from the first step (finetuning)")
    stop_nonmono: bool = _opt(False, "stop when a validation is worse than the best of those before it, leaving "
                              "out the train.nonmono just before it: how AWD-LSTM's finetuning ends (wordlm "
                              "finetune sets it)")
    average_after: float = _opt(0.0, "ntasgd: also start averaging once this fraction of the run (of its steps, or "
                                "of train.time_budget_s) has passed, if validation has not started it sooner (0 = "
                                "off): in a time budget the validation trigger can come late or never",
                                min=0.0, max_excl=1.0)
    average_lr: float = _opt(0.0, "ntasgd: the lr once the average has started (0 = the schedule's rate goes on, "
                             "as in AWD-LSTM); variable BPTT scales it as it scales train.lr (on a shrunk AWD "
                             "model, 15 and 7.5 read worse than 30: docs/RESULTS.md)", min=0.0)
    ar_alpha: float = _opt(0.0, "activation regularisation: alpha * mean(dropped last-layer output^2)", min=0.0)
    tar_beta: float = _opt(0.0, "temporal activation regularisation: beta * mean((h_t - h_{t-1})^2)", min=0.0)
    variable_bptt: bool = _opt(False, "draw each window's length around seq_len (AWD-LSTM), lr scaled by "
                               "length / seq_len")
    partial_shuffle: bool = _opt(False, "rotate each training stream by a random offset every epoch (Press 2019): "
                                 "the windows and their neighbours in a batch change, the text's order is kept "
                                 "but for one seam a stream")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "tokenizer": TokenizerConfig,
    "model": ModelConfig,
    "train": TrainConfig,
}


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @classmethod
    def from_dict(cls, raw: dict[str, Any], base_dir: str | Path | None = None) -> Config:
        """Build and validate; `base_dir` anchors relative data paths. Raises ConfigError listing all problems."""
        cfg, problems = _build(raw)
        if base_dir is not None:
            _resolve_paths(cfg, Path(base_dir))
        problems += validate(cfg)
        if problems:
            raise ConfigError(problems)
        return cfg

    def to_toml(self) -> str:
        lines: list[str] = []
        for name, values in self.to_dict().items():
            lines.append(f"[{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            lines.append("")
        return "\n".join(lines)


def all_keys() -> list[str]:
    return [f"{s}.{f.name}" for s, c in SECTIONS.items() for f in dataclasses.fields(c)]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(v)  # a JSON string or list of numbers is valid TOML too


def _type_name(t: type) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    return names.get(t, "a list of integers")


def _coerce(value: Any, t: type) -> tuple[bool, Any]:
    if t == list[int]:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        return ok, list(value) if ok else value
    if t is bool:
        return isinstance(value, bool), value
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if t is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    return isinstance(value, str), value


def _suggest(section: str, key: str) -> str:
    """For an unknown key: the same key in another section (`model.lr` for train.lr), or a close spelling."""
    elsewhere = [s for s, cls in SECTIONS.items() if key in {f.name for f in dataclasses.fields(cls)}]
    if elsewhere:
        return f"; it belongs in [{elsewhere[0]}]: {elsewhere[0]}.{key}"
    close = difflib.get_close_matches(key, [f.name for f in dataclasses.fields(SECTIONS[section])], n=1)
    return f"; did you mean {section}.{close[0]}?" if close else ""


def _build(raw: dict[str, Any]) -> tuple[Config, list[str]]:
    cfg, problems = Config(), []
    for section, values in raw.items():
        if section not in SECTIONS and not isinstance(values, dict):
            problems.append(f"{section} = {values!r} is outside any section; put it under one of "
                            f"{', '.join(f'[{s}]' for s in SECTIONS)}")
            continue
        if section not in SECTIONS:
            close = difflib.get_close_matches(section, SECTIONS, n=1)
            hint = f"; did you mean [{close[0]}]?" if close else ""
            problems.append(f"unknown section [{section}]{hint} (sections: {', '.join(SECTIONS)})")
            continue
        if not isinstance(values, dict):
            problems.append(f"[{section}] must be a table of keys")
            continue
        target = getattr(cfg, section)
        hints = get_type_hints(type(target))
        names = [f.name for f in dataclasses.fields(target)]
        for key, value in values.items():
            if key not in names:
                problems.append(f"unknown key {section}.{key}{_suggest(section, key)} (valid: {', '.join(names)})")
                continue
            ok, value = _coerce(value, hints[key])
            if not ok:
                problems.append(f"{section}.{key} must be {_type_name(hints[key])}, got {value!r}")
                continue
            setattr(target, key, value)
    return cfg, problems


def _resolve_paths(cfg: Config, base: Path) -> None:
    """Data paths: ~ is the home folder (a TOML string or `--set data.train=~/x` gets no shell's expansion);
    relative ones are relative to `base`."""
    for key in ("train", "valid", "test"):
        value = os.path.expanduser(getattr(cfg.data, key))
        if value and not os.path.isabs(value):
            value = str((base / value).resolve())
        setattr(cfg.data, key, value)
    cfg.data.cache_dir = os.path.expanduser(cfg.data.cache_dir)


def validate(cfg: Config) -> list[str]:
    """Every range, choice and cross-field problem, as messages naming the key and what is allowed."""
    problems = []
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            v, m, key = getattr(obj, f.name), f.metadata, f"{section}.{f.name}"
            if isinstance(v, float) and not math.isfinite(v):  # TOML's inf and nan: no knob means either
                problems.append(f"{key} must be a finite number, got {v!r}")
                continue
            if "choices" in m and v not in m["choices"]:
                problems.append(f"{key} must be one of {', '.join(m['choices'])}, got {v!r}")
            if "min" in m and v < m["min"]:
                problems.append(f"{key} must be >= {m['min']}, got {v!r}")
            if "max" in m and v > m["max"]:
                problems.append(f"{key} must be <= {m['max']}, got {v!r}")
            if "min_excl" in m and v <= m["min_excl"]:
                problems.append(f"{key} must be > {m['min_excl']}, got {v!r}")
            if "max_excl" in m and v >= m["max_excl"]:
                problems.append(f"{key} must be < {m['max_excl']}, got {v!r}")
    m, t, tok = cfg.model, cfg.train, cfg.tokenizer
    out_size = m.proj_size or m.last_hidden_size or m.hidden_size
    if m.tie_weights and m.embedding_size != out_size:
        which = ("model.proj_size" if m.proj_size else "model.last_hidden_size" if m.last_hidden_size
                 else "model.hidden_size")
        problems.append(f"model.tie_weights needs model.embedding_size == {which} "
                        f"(got {m.embedding_size} and {out_size}); make them equal or set tie_weights = false")
    if m.proj_size and m.last_hidden_size:
        problems.append("model.proj_size and model.last_hidden_size are two ways to narrow the LSTM's output: set "
                        "one of them to 0")
    if m.proj_size and m.proj_size >= m.hidden_size:
        problems.append(f"model.proj_size must be smaller than model.hidden_size ({m.hidden_size}), "
                        f"got {m.proj_size}")
    if m.decoder == "adaptive":
        if m.tie_weights:
            problems.append("model.tie_weights is not available with model.decoder = \"adaptive\"; set one of them "
                            "differently")
        cuts = m.adaptive_cutoffs
        if not cuts or any(c <= 0 for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:], strict=False)):
            problems.append(f"model.adaptive_cutoffs must be increasing positive integers, got {cuts!r}")
    if t.epochs == 0 and t.max_steps == 0 and t.time_budget_s == 0:
        problems.append("train.epochs, train.max_steps and train.time_budget_s are all 0: set at least one of them")
    if tok.kind == "sentencepiece" and tok.vocab_size < 8:
        problems.append(f"tokenizer.vocab_size must be >= 8 for sentencepiece, got {tok.vocab_size}")
    if t.device != "auto" and t.device != "cpu" and not (t.device == "cuda" or t.device.startswith("cuda:")):
        problems.append(f"train.device must be auto, cpu, cuda or cuda:N, got {t.device!r}")
    if t.cuda_graphs and m.decoder == "adaptive":
        problems.append("train.cuda_graphs cannot record the adaptive softmax (its shapes depend on the targets): "
                        "set model.decoder = \"full\" or train.cuda_graphs = false")
    if t.cuda_graphs and t.compile:
        problems.append("train.cuda_graphs and train.compile are exclusive: set one of them to false")
    if t.cuda_graphs and t.device == "cpu":
        problems.append("train.cuda_graphs needs a CUDA device, but train.device is cpu: set train.cuda_graphs = "
                        "false")
    if t.average_after and t.optimizer != "ntasgd":
        problems.append(f"train.average_after averages the iterates of NT-ASGD, but train.optimizer is "
                        f"{t.optimizer!r}: set train.optimizer = \"ntasgd\" or train.average_after = 0")
    if t.average_lr and t.optimizer != "ntasgd":
        problems.append(f"train.average_lr is the lr while NT-ASGD averages, but train.optimizer is "
                        f"{t.optimizer!r}: set train.optimizer = \"ntasgd\" or train.average_lr = 0")
    if t.lr > 0 and t.min_lr > t.lr:  # a bad lr is reported once, above
        problems.append(f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
    return problems


def parse_override(item: str) -> tuple[str, str, Any]:
    """'train.lr=3e-3' -> ('train', 'lr', 0.003). Values parse as TOML, else stay strings."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value, e.g. train.lr=0.5")
    key, raw = item.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(f"override key {key!r} must be section.key (valid: {', '.join(all_keys())})")
    section, name = key.split(".")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return section, name, value


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist (shipped configs are in configs/)")
    if not p.is_file():
        kind = "a directory" if p.is_dir() else "not a regular file"
        raise ConfigError(f"config path {p} is {kind}; give the path of a TOML file")
    try:
        return tomllib.loads(p.read_text(encoding="utf-8-sig"))  # a byte-order mark (Windows editors) is not TOML
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid TOML: {e}") from None


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults <- TOML file <- overrides. Data paths in the file are relative to the file; in overrides, to cwd."""
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    cfg, problems = _build(raw)
    if path is not None:
        _resolve_paths(cfg, Path(path).resolve().parent)
    over: dict[str, dict[str, Any]] = {}
    for item in overrides:
        section, name, value = parse_override(item)
        over.setdefault(section, {})[name] = value
    cfg_over, problems_over = _build({s: {**dataclasses.asdict(getattr(cfg, s)), **v} if s in SECTIONS else v
                                      for s, v in over.items()})
    for s in over:
        if s in SECTIONS:
            setattr(cfg, s, getattr(cfg_over, s))
    if "data" in over:
        _resolve_paths(cfg, Path.cwd())  # override paths are relative to where the command runs
    problems += problems_over + validate(cfg)
    if problems:
        raise ConfigError(problems)
    return cfg
