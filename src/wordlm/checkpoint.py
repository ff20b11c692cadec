"""The on-disk checkpoint: a directory of plain data, written atomically, loaded without running code.

    CKPT/
      meta.json         format version, step, validation loss, and a SHA-256 of every other file (written last)
      config.json       the fully resolved config
      tokenizer.json    the tokenizer (vocabulary, or the sentencepiece model in base64)
      model.pt          the model's state_dict (tensors only)
      train_state.pt    optimizer, schedule, step, epoch, data position, LSTM state, RNG states (last/ only)

Tensors are loaded with `torch.load(weights_only=True)`, which refuses pickled objects, so a shared checkpoint
cannot run code. A save writes a temporary directory, fsyncs it, then swaps it in by rename; if the process dies
between the two renames the previous checkpoint is still there as `.NAME.old`, and loading falls back to it.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import SECTIONS, Config
from .data import file_sha256
from .errors import CheckpointError, ConfigError
from .tokenizer import Tokenizer, tokenizer_from_state

log = logging.getLogger("wordlm")

FORMAT_VERSION = 1
ARCH_KEYS = ("model", "tokenizer")  # sections that must match to resume or reuse weights


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, model_state: dict, train_state: dict | None, config: Config, tokenizer: Tokenizer,
                 info: dict | None) -> None:
    """Every file of a checkpoint into `tmp`, fsynced, meta.json (with the other files' checksums) last."""
    tmp.mkdir()
    files = {"model.pt": model_state, "train_state.pt": train_state}
    for name, obj in files.items():
        if obj is not None:
            torch.save(obj, tmp / name)
    (tmp / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    (tmp / "tokenizer.json").write_text(json.dumps(tokenizer.to_state()))
    digests = {}
    for f in sorted(tmp.iterdir()):
        _fsync(f)
        digests[f.name] = file_sha256(f)
    meta = {"format_version": FORMAT_VERSION, "wordlm_version": __version__, "saved_at": time.time(),
            "files": digests, **(info or {})}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    _fsync(tmp / "meta.json")
    _fsync(tmp)


def save_checkpoint(path: str | Path, *, model_state: dict, config: Config, tokenizer: Tokenizer,
                    train_state: dict | None = None, info: dict | None = None) -> Path:
    """Write a checkpoint directory atomically. `info` (step, valid_loss, ...) goes into meta.json."""
    final = Path(path)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp, old = parent / f".{final.name}.tmp", parent / f".{final.name}.old"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write_files(tmp, model_state, train_state, config, tokenizer, info)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            free = f"{shutil.disk_usage(parent).free / 2**20:,.0f} MiB free there"
        except OSError:
            free = "free space unknown"
        kept = f"; the previous {final.name}/ is kept" if final.exists() else ""
        raise CheckpointError(f"cannot write the checkpoint {final} ({free}: {e}){kept}; free some disk space "
                              f"or check its permissions, then continue with --resume") from None
    # Swap in: keep the previous good copy as .old until the new one has its final name.
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync(parent)
    if old.exists():
        shutil.rmtree(old)
    return final


def _is_checkpoint(p: Path) -> bool:
    return (p / "meta.json").is_file()


def find_checkpoint(path: str | Path, prefer: str = "best") -> Path:
    """A checkpoint directory itself, or inside a run directory: `prefer` (best/last), then the other."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist; train a model first, e.g. "
                              f"wordlm train --config configs/demo.toml --out {p}")
    if not p.is_dir():
        raise CheckpointError(f"{p} is a file; give a run directory (with best/ or last/) or a checkpoint directory")
    if _is_checkpoint(p):
        return p
    order = [prefer, "last" if prefer == "best" else "best"]
    for name in order:
        for cand in (p / name, p / f".{name}.old"):
            if _is_checkpoint(cand):
                if name != prefer and (p / prefer).is_dir():  # wordlm writes whole checkpoints: this is damage
                    log.warning("warning: %s is incomplete (no meta.json); using %s", p / prefer, cand)
                return cand
    raise CheckpointError(f"no checkpoint in {p} (looked for {p / order[0]} and {p / order[1]}); train one with: "
                          f"wordlm train --config configs/demo.toml --out {p}")


@dataclass
class Checkpoint:
    path: Path
    meta: dict
    config: Config
    tokenizer: Tokenizer
    model_state: dict
    train_state: dict | None


def _load_tensors(f: Path) -> Any:
    try:
        return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"refusing to load {f}: it holds pickled Python objects, which could run code "
                              f"when loaded; wordlm loads tensors only ({first[:120]})") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{f} is corrupt or truncated ({type(e).__name__}); "
                              f"use another checkpoint, e.g. the run's last/ or best/") from None


def _read_json(f: Path) -> Any:
    try:
        return json.loads(f.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{f} is missing; the checkpoint is incomplete") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{f} is corrupt (not valid JSON)") from None


def _stamp(d: Path) -> tuple[int, int] | None:
    """What identifies the copy of a checkpoint at `d`: its meta.json's inode and time (None when not there)."""
    try:
        st = (d / "meta.json").stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def load_checkpoint(path: str | Path, prefer: str = "best", train_state: bool = False,
                    verify: bool = True) -> Checkpoint:
    """Load a checkpoint (see find_checkpoint); tensors stay on the CPU.

    Training swaps a new copy in under the same name while others may read it (`wordlm eval RUN` of a run in
    progress): a read that the swap overtook (its files gone, or the copy changed under it) is done again on the
    new copy, rather than failing as damaged or, worse, mixing the old meta.json with the new weights."""
    for attempt in range(3):
        d = find_checkpoint(path, prefer)
        before = _stamp(d)
        try:
            ck = _read_checkpoint(d, train_state, verify)
        except (CheckpointError, OSError):
            if attempt < 2 and _stamp(d) != before:
                time.sleep(0.05)
                continue
            raise
        if _stamp(d) == before:
            return ck
        time.sleep(0.05)
    raise CheckpointError(f"{d} was replaced each time it was read; try again (is a training process writing it "
                          f"very often? see train.save_every and train.eval_every)")


def _read_checkpoint(d: Path, train_state: bool, verify: bool) -> Checkpoint:
    meta = _read_json(d / "meta.json")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{d} has checkpoint format {version}, this wordlm reads format {FORMAT_VERSION}; "
                              f"use the wordlm version that wrote it ({meta.get('wordlm_version', 'unknown')})")
    if verify:
        for name, digest in meta.get("files", {}).items():
            f = d / name
            if not f.is_file():
                raise CheckpointError(f"{f} is missing; the checkpoint is incomplete")
            if file_sha256(f) != digest:
                raise CheckpointError(f"{f} does not match its checksum in meta.json: the file is corrupt")
    raw = _read_json(d / "config.json")
    try:
        config = Config.from_dict({k: v for k, v in raw.items() if k in SECTIONS})
    except ConfigError as e:
        raise CheckpointError(f"{d / 'config.json'} is not a valid config: {e}") from None
    tokenizer = tokenizer_from_state(_read_json(d / "tokenizer.json"))
    model_state = _load_tensors(d / "model.pt")
    ts = None
    if train_state:
        if not (d / "train_state.pt").is_file():
            raise CheckpointError(f"{d} holds no training state (best/ keeps weights only); resume from last/")
        ts = _load_tensors(d / "train_state.pt")
    emb = model_state.get("embedding.weight")
    if emb is None or emb.shape[0] != tokenizer.vocab_size:
        rows = None if emb is None else emb.shape[0]
        raise CheckpointError(f"{d}: the model has {rows} embedding rows but the tokenizer has "
                              f"{tokenizer.vocab_size} types; the checkpoint's files do not belong together")
    return Checkpoint(d, meta, config, tokenizer, model_state, ts)


def arch_differences(a: Config, b: Config) -> list[str]:
    """Keys of the architecture sections (model, tokenizer) on which two configs disagree."""
    da, db = a.to_dict(), b.to_dict()
    return [f"{s}.{k}: {da[s][k]!r} vs {db[s][k]!r}" for s in ARCH_KEYS for k in da[s] if da[s][k] != db[s][k]]
