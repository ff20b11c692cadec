"""Corpus files -> cached id arrays -> parallel token streams -> truncated-BPTT windows.

Each split is encoded once into a compact id array (uint16 when the vocabulary fits, else uint32) and cached on
disk under a key made of the text's SHA-256 and the tokenizer's fingerprint, so a second run memory-maps it
instead of tokenizing again. Files are streamed line by line, so memory does not grow with the corpus.

Every encoded split starts with one <eos>: the model reads the start of a text as it reads the start of any
line, and every real token of the text is a prediction target.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError
from .tokenizer import Tokenizer

CACHE_VERSION = 2  # 2: a leading byte-order mark is no longer read as part of the first word
log = logging.getLogger("wordlm")
_CHUNK_LINES = 8192


def check_text_file(path: str | Path, what: str) -> Path:
    """Fail with one clear line unless `path` is an existing, non-empty regular file."""
    if not path:
        hint = f"; set it in the config (e.g. --set {what}=path/to/file.txt)" if what.startswith("data.") else ""
        raise DataError(f"{what}: no path given{hint}")
    p = Path(path)
    if not p.exists():
        hint = f"; point it at your copy with --set {what}=PATH" if what.startswith("data.") else ""
        raise DataError(f"{what}: {p} does not exist{hint}")
    if p.is_dir():
        raise DataError(f"{what}: {p} is a directory; give the path of a text file")
    if p.stat().st_size == 0:
        raise DataError(f"{what}: {p} is empty; it needs at least a few lines of text")
    return p


def iter_lines(path: str | Path, what: str = "text", progress: bool = False) -> Iterator[str]:
    """Yield the lines of a UTF-8 file (without line ends or a leading byte-order mark), checking each for valid
    UTF-8 and NUL bytes."""
    p = check_text_file(path, what)
    offset = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=p.stat().st_size, unit="B", unit_scale=True, desc=f"reading {p.name}", leave=False)
    with open(p, "rb") as f:
        for raw in f:
            if b"\x00" in raw:
                at = offset + raw.index(b"\x00")
                raise DataError(f"{what}: {p} looks binary (NUL byte at byte offset {at}); give a UTF-8 text file")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{what}: {p} is not UTF-8 text (byte 0x{raw[e.start]:02x} at byte offset "
                                f"{offset + e.start}); convert it, e.g. iconv -t UTF-8") from None
            if offset == 0 and line.startswith("\ufeff"):  # a byte-order mark (Windows editors write one): not text
                line = line[1:]
            offset += len(raw)
            if bar is not None:
                bar.update(len(raw))
            yield line.rstrip("\r\n")
    if bar is not None:
        bar.close()


def file_sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("WORDLM_CACHE_DIR") or Path.home() / ".cache" / "wordlm")


@dataclass
class EncodedSplit:
    """One split as ids: `ids[0]` is the leading <eos>, `ids[1:]` the text's `tokens` tokens."""

    ids: np.ndarray  # (1 + tokens,) uint16/uint32, usually a read-only memmap
    tokens: int  # real tokens (each line's tokens plus its <eos>)
    words: int  # whitespace words plus one per line end: the denominator of word-level perplexity
    path: str
    sha256: str = ""  # of the text file: a resumed run tells whether its training text is the one it began on


def encode_file(path: str | Path, tokenizer: Tokenizer, cache_dir: str | Path | None = None,
                what: str = "text", progress: bool = False) -> EncodedSplit:
    """Encode a text file with `tokenizer`, reusing the on-disk cache when the text and tokenizer match."""
    p = check_text_file(path, what)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    sha = file_sha256(p)
    key = f"{sha[:24]}-{tokenizer.fingerprint()}-v{CACHE_VERSION}"
    ids_path, meta_path = cache / f"{key}.ids", cache / f"{key}.json"
    if ids_path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            ids = np.memmap(ids_path, dtype=meta["dtype"], mode="r")
            if len(ids) == meta["tokens"] + 1:
                return EncodedSplit(ids, meta["tokens"], meta["words"], str(p), sha)
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache entry is rebuilt below
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    cached = True
    try:
        cache.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=".tmp-", suffix=".ids")
    except OSError as e:
        refusal = ConfigError(f"cannot use {cache} for the token cache ({e.strerror}); set data.cache_dir or "
                              f"WORDLM_CACHE_DIR to a folder you can write to")
        if cache_dir or os.environ.get("WORDLM_CACHE_DIR"):  # a folder the user chose: say so
            raise refusal from None
        # The default folder (a read-only home, say): encode without a cache rather than not at all.
        log.warning("warning: cannot write the token cache in %s (%s); encoding %s without it (each time: set "
                    "WORDLM_CACHE_DIR to a folder you can write to)", cache, e.strerror, p)
        try:
            fd, tmp = tempfile.mkstemp(prefix="wordlm-", suffix=".ids")
        except OSError:
            raise refusal from None
        cached = False
    tokens = words = 0
    blank = True  # only blank lines so far: <eos> after <eos>, nothing for a model to learn or be scored on
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(np.array([tokenizer.eos_id], dtype=dtype).tobytes())
            batch: list[str] = []

            def flush() -> None:
                nonlocal tokens
                chunk = array("I", tokenizer.encode_lines(batch))
                tokens += len(chunk)
                out.write(np.frombuffer(chunk, dtype=np.uint32).astype(dtype).tobytes())
                batch.clear()

            for line in iter_lines(p, what, progress):
                words += len(line.split()) + 1
                blank = blank and not line.strip()
                batch.append(line)
                if len(batch) >= _CHUNK_LINES:
                    flush()
            if batch:
                flush()
            out.flush()
            os.fsync(out.fileno())
        if words == 0 or tokens == 0 or blank:
            raise DataError(f"{what}: {p} holds only blank lines; it needs at least a few lines of text")
        if not cached:
            return EncodedSplit(np.fromfile(tmp, dtype=dtype), tokens, words, str(p), sha)
        os.replace(tmp, ids_path)
        meta_path.write_text(json.dumps({"tokens": tokens, "words": words, "dtype": np.dtype(dtype).name,
                                         "source": str(p), "tokenizer": tokenizer.fingerprint()}))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return EncodedSplit(np.memmap(ids_path, dtype=dtype, mode="r"), tokens, words, str(p), sha)


class Streams:
    """A split laid out as `batch_size` parallel streams, read in windows for truncated BPTT.

    The id sequence is cut into B contiguous pieces, one per stream, and each step reads the next `seq_len`
    rows; the target is the input shifted by one token. With ids a..x and B = 4 (S = 6 tokens per stream):

        ids   a b c d e f | g h i j k l | m n o p q r | s t u v w x
                                  stream (column):  0 1 2 3
        rows (time) ->            row 0             a g m s    window 0 (seq_len 2): input rows 0-1,
                                  row 1             b h n t                          target rows 1-2
                                  row 2             c i o u    window 1: input rows 2-3, target rows 3-4
                                  row 3             d j p v
                                  row 4             e k q w    window 2: input row 4, target row 5
                                  row 5             f l r x    (the last window is shorter)

    Column j is one unbroken stretch of text, so the LSTM state left at the end of one window is exactly the
    context of the next: training carries it forward (detached, so gradients stop at the window edge: truncated
    BPTT) and evaluation carries it through the whole text. The last `len(ids) mod B` tokens are dropped.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, device: torch.device | str = "cpu"):
        self.batch_size = batch_size
        self.rows = len(ids) // batch_size  # S: tokens per stream
        if self.rows < 2:
            n = len(ids) - 1
            raise DataError(f"text of {n} token{'s' * (n != 1)} is too short for {batch_size} streams "
                            f"(each needs at least 2 tokens); use a longer text or a smaller batch size")
        self.device = torch.device(device)
        grid = np.asarray(ids[: self.rows * batch_size]).reshape(batch_size, self.rows)  # (B, S), a view
        # On a GPU the whole grid moves once (int32: half the bytes of int64); on the CPU windows are cut
        # straight from the (possibly memory-mapped) array, so nothing is copied up front.
        self._grid_t = (torch.from_numpy(grid.astype(np.int32)).to(self.device)
                        if self.device.type != "cpu" else None)
        self._grid = grid
        self._unrotated_t = self._grid_t
        self.shifts: np.ndarray | None = None  # each stream's rotation (`rotate`); None: the layout above

    def rotate(self, shifts: np.ndarray | None) -> None:
        """Partial shuffling (Press 2019): stream b reads its own text from its token `shifts[b]` on, and after
        its last token goes on from its first. Each stream keeps its text in order but for that one seam, and
        the windows fall at other tokens, beside other streams' tokens, each time the shifts change (wordlm
        draws new ones every epoch under train.partial_shuffle). None puts the streams back as they were."""
        if shifts is not None:
            shifts = np.asarray(shifts, dtype=np.int64) % self.rows
            if shifts.shape != (self.batch_size,):
                raise ValueError(f"one shift per stream: {self.batch_size} expected, {shifts.shape} given")
            if not shifts.any():
                shifts = None
        self.shifts = shifts
        if self._unrotated_t is not None:  # on a device: rotate the grid there once, so windows stay slices
            if shifts is None:
                self._grid_t = self._unrotated_t
            else:
                grid, rows = torch.empty_like(self._unrotated_t), self.rows
                for b, k in enumerate(shifts.tolist()):  # two copies a stream, no index of the grid's size
                    grid[b, : rows - k] = self._unrotated_t[b, k:]
                    grid[b, rows - k:] = self._unrotated_t[b, :k]
                self._grid_t = grid

    @property
    def targets(self) -> int:
        """Prediction targets in one full pass: every row but the first, in every stream."""
        return (self.rows - 1) * self.batch_size

    def num_windows(self, seq_len: int) -> int:
        return -(-(self.rows - 1) // seq_len)

    def window(self, row: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and target of the window starting at `row`: two (T, B) int64 tensors, T <= seq_len."""
        t = min(seq_len, self.rows - 1 - row)
        if self._grid_t is not None:
            w = self._grid_t[:, row: row + t + 1].t().long()  # (T+1, B)
        elif self.shifts is not None:  # the CPU's rotated read: only this window's tokens are gathered
            at = (np.arange(row, row + t + 1)[:, None] + self.shifts[None, :]) % self.rows  # (T+1, B)
            w = torch.from_numpy(self._grid[np.arange(self.batch_size)[None, :], at].astype(np.int64))
        else:
            w = torch.from_numpy(np.ascontiguousarray(self._grid[:, row: row + t + 1].T).astype(np.int64))
        return w[:-1], w[1:]
