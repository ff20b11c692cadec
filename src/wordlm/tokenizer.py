"""Tokenizers: text <-> token ids. Fitted on the training split only, saved as plain JSON inside checkpoints.

Every line of text ends in the `<eos>` token, so "line breaks" are something the model predicts. Words (or
characters) the vocabulary lacks map to `<unk>`. The vocabulary is built from the *train* split alone: valid and
test text can contain unknown words, which is exactly what a user's text will contain too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator

from .errors import CheckpointError

UNK, EOS = "<unk>", "<eos>"


class Tokenizer:
    kind: str
    lowercase: bool
    eos_id: int
    unk_id: int

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode_line(self, line: str) -> list[int]:
        """Token ids of one line, without its <eos>."""
        raise NotImplementedError

    def encode_lines(self, lines: list[str]) -> list[int]:
        """Ids of some lines: each line's tokens followed by <eos>."""
        out: list[int] = []
        for line in lines:
            out += self.encode_line(line)
            out.append(self.eos_id)
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of a text: each line's tokens followed by <eos>."""
        return self.encode_lines(text.splitlines())

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

    def token_text(self, i: int) -> str:
        """How token `i` reads on its own (a word, a character, or a piece)."""
        raise NotImplementedError

    def to_state(self) -> dict:
        raise NotImplementedError

    def fingerprint(self) -> str:
        blob = json.dumps(self.to_state(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def unknown_words(self, text: str) -> list[str]:
        """Whitespace words of `text` that would become <unk> (empty for sentencepiece)."""
        return []

    def _norm(self, line: str) -> str:
        return line.lower() if self.lowercase else line


class _VocabTokenizer(Tokenizer):
    """Shared by the word and char tokenizers: a list of types, specials first."""

    def __init__(self, itos: list[str], lowercase: bool = False):
        if itos[:2] != [UNK, EOS]:
            raise CheckpointError(f"{self.kind} tokenizer vocabulary must start with {UNK}, {EOS}")
        self.itos = itos
        self.stoi = {s: i for i, s in enumerate(itos)}
        self.lowercase = lowercase
        self.unk_id, self.eos_id = 0, 1

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @classmethod
    def fit(cls, lines: Iterable[str], vocab_size: int = 0, min_freq: int = 1, lowercase: bool = False):
        counts: Counter[str] = Counter()
        for line in lines:
            counts.update(cls._split(line.lower() if lowercase else line))
        # The corpus may spell the unknown token itself (PTB does): it is our <unk>, not a new type.
        counts.pop(UNK, None)
        counts.pop(EOS, None)
        # Most frequent first, ties broken alphabetically, so the vocabulary is deterministic.
        kept = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_freq]
        if vocab_size:
            kept = kept[: max(vocab_size - 2, 0)]
        return cls([UNK, EOS, *kept], lowercase)

    @staticmethod
    def _split(line: str) -> list[str]:
        raise NotImplementedError

    def encode_line(self, line: str) -> list[int]:
        get = self.stoi.get
        return [get(t, 0) for t in self._split(self._norm(line))]

    def token_text(self, i: int) -> str:
        return self.itos[i]

    def to_state(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase, "itos": self.itos}


class WordTokenizer(_VocabTokenizer):
    kind = "word"

    @staticmethod
    def _split(line: str) -> list[str]:
        return line.split()

    def decode(self, ids: Iterable[int]) -> str:
        out, line = [], []
        for i in ids:
            if i == self.eos_id:
                out.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.itos[i])
        return "".join(out) + " ".join(line)

    def unknown_words(self, text: str) -> list[str]:
        return [w for w in self._norm(text).split() if w not in self.stoi]


class CharTokenizer(_VocabTokenizer):
    kind = "char"

    @staticmethod
    def _split(line: str) -> list[str]:
        return list(line)

    def decode(self, ids: Iterable[int]) -> str:
        return "".join("\n" if i == self.eos_id else self.itos[i] for i in ids)

    def unknown_words(self, text: str) -> list[str]:
        return sorted({c for c in self._norm(text) if c not in self.stoi})


class SentencePieceTokenizer(Tokenizer):
    """Subwords from the sentencepiece library; its serialized model travels inside the checkpoint."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, lowercase: bool = False):
        import sentencepiece as spm

        self.model_proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.lowercase = lowercase
        self.unk_id, self.eos_id = self.sp.unk_id(), self.sp.eos_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @classmethod
    def fit(cls, lines: Iterable[str], vocab_size: int, model_type: str = "unigram",
            character_coverage: float = 1.0, lowercase: bool = False) -> SentencePieceTokenizer:
        import io

        import sentencepiece as spm

        from .errors import ConfigError, DataError

        read = [0]  # the non-blank lines given to the trainer

        def sentences() -> Iterator[str]:
            for line in lines:
                line = line.strip()
                if line:
                    read[0] += 1
                    yield line.lower() if lowercase else line

        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_writer=model, vocab_size=vocab_size,
                model_type=model_type, character_coverage=character_coverage,
                unk_id=0, eos_id=1, bos_id=-1, pad_id=-1, hard_vocab_limit=False,
                input_sentence_size=2_000_000, shuffle_input_sentence=True, num_threads=2,
                minloglevel=2,
            )
        except RuntimeError as e:
            few = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(e))
            if few:  # say it in the config's words, without sentencepiece's source location and flag names
                raise ConfigError(f"tokenizer.vocab_size is {few[1]}, but sentencepiece needs at least {few[2]} "
                                  f"for this training text (each of its characters, <unk> and <eos>): raise "
                                  f"tokenizer.vocab_size, or lower tokenizer.sp_character_coverage to leave out "
                                  f"rare characters") from None
            if not read[0]:
                raise DataError("data.train holds only blank lines; it needs at least a few lines of text") from None
            raise DataError(f"sentencepiece could not train on the training text: {e}") from None
        return cls(model.getvalue(), lowercase)

    def encode_line(self, line: str) -> list[int]:
        return self.sp.encode(self._norm(line))

    def encode_lines(self, lines: list[str]) -> list[int]:
        out: list[int] = []
        for ids in self.sp.encode([self._norm(line) for line in lines]):  # one batch call: far faster
            out += ids
            out.append(self.eos_id)
        return out

    def decode(self, ids: Iterable[int]) -> str:
        out, cur = [], []
        for i in ids:
            if i == self.eos_id:
                out.append(self.sp.decode(cur) + "\n")
                cur = []
            else:
                cur.append(i)
        return "".join(out) + self.sp.decode(cur)

    def token_text(self, i: int) -> str:
        return "\n" if i == self.eos_id else self.sp.id_to_piece(i).replace("\u2581", " ")

    def to_state(self) -> dict:
        return {"kind": self.kind, "lowercase": self.lowercase,
                "model": base64.b64encode(self.model_proto).decode("ascii")}


def fit_tokenizer(cfg, lines_factory) -> Tokenizer:
    """Fit the tokenizer `cfg` (a TokenizerConfig) asks for on the lines that `lines_factory()` yields."""
    if cfg.kind == "word":
        return WordTokenizer.fit(lines_factory(), cfg.vocab_size, cfg.min_freq, cfg.lowercase)
    if cfg.kind == "char":
        return CharTokenizer.fit(lines_factory(), cfg.vocab_size, cfg.min_freq, cfg.lowercase)
    return SentencePieceTokenizer.fit(lines_factory(), cfg.vocab_size, cfg.sp_model_type,
                                      cfg.sp_character_coverage, cfg.lowercase)


def tokenizer_from_state(state: dict) -> Tokenizer:
    try:
        kind = state["kind"]
        if kind == "word":
            return WordTokenizer(list(state["itos"]), bool(state["lowercase"]))
        if kind == "char":
            return CharTokenizer(list(state["itos"]), bool(state["lowercase"]))
        if kind == "sentencepiece":
            return SentencePieceTokenizer(base64.b64decode(state["model"]), bool(state["lowercase"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"tokenizer state is damaged ({type(e).__name__}: {e})") from None
    raise CheckpointError(f"unknown tokenizer kind {kind!r} (known: word, char, sentencepiece)")
