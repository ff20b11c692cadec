import pytest

from wordlm.errors import CheckpointError
from wordlm.tokenizer import (
    EOS,
    UNK,
    CharTokenizer,
    SentencePieceTokenizer,
    WordTokenizer,
    tokenizer_from_state,
)

TRAIN = ["the cat sat on the mat", "the dog sat", "a cat ran"]


def test_word_round_trip_and_eos():
    tok = WordTokenizer.fit(TRAIN)
    text = "the cat sat\na dog ran on the mat\n"
    ids = tok.encode(text)
    assert ids.count(tok.eos_id) == 2
    assert ids[3] == tok.eos_id
    assert tok.decode(ids) == text


def test_word_vocabulary_comes_from_train_only_and_unknowns_map_to_unk():
    tok = WordTokenizer.fit(TRAIN)
    assert tok.itos[:2] == [UNK, EOS]
    assert "zebra" not in tok.stoi
    ids = tok.encode_line("the zebra sat")
    assert ids[1] == tok.unk_id and ids[0] != tok.unk_id
    assert tok.unknown_words("the zebra sat") == ["zebra"]


def test_word_frequency_order_and_caps():
    tok = WordTokenizer.fit(TRAIN)
    assert tok.itos[2:5] == ["the", "cat", "sat"]  # by count (3, 2, 2), ties alphabetical
    assert WordTokenizer.fit(TRAIN, min_freq=2).itos == [UNK, EOS, "the", "cat", "sat"]
    assert WordTokenizer.fit(TRAIN, vocab_size=4).itos == [UNK, EOS, "the", "cat"]


def test_corpus_unk_token_is_the_tokenizers_unk():
    tok = WordTokenizer.fit(["a <unk> b", "<unk> a"])
    assert tok.vocab_size == 4  # <unk>, <eos>, a, b
    assert tok.encode_line("<unk>") == [tok.unk_id]


def test_lowercase():
    tok = WordTokenizer.fit(["The Cat"], lowercase=True)
    assert tok.encode_line("THE cat") == tok.encode_line("the CAT")


def test_char_round_trip():
    tok = CharTokenizer.fit(TRAIN)
    text = "the cat ran\na mat\n"
    assert tok.decode(tok.encode(text)) == text
    assert tok.unknown_words("zq") == ["q", "z"]


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_round_trip_and_state(model_type):
    lines = [f"the {w} sat on the {v} today" for w in ("cat", "dog", "bird", "cow") for v in ("mat", "rug")] * 20
    tok = SentencePieceTokenizer.fit(lines, vocab_size=40, model_type=model_type)
    text = "the cat sat on the rug today\nthe dog sat\n"
    ids = tok.encode(text)
    assert ids.count(tok.eos_id) == 2
    assert tok.decode(ids) == text
    again = tokenizer_from_state(tok.to_state())
    assert again.encode(text) == ids and again.fingerprint() == tok.fingerprint()


def test_state_round_trip_and_bad_state():
    tok = WordTokenizer.fit(TRAIN)
    again = tokenizer_from_state(tok.to_state())
    assert again.itos == tok.itos and again.fingerprint() == tok.fingerprint()
    with pytest.raises(CheckpointError, match="unknown tokenizer kind"):
        tokenizer_from_state({"kind": "bytes"})
    with pytest.raises(CheckpointError, match="damaged"):
        tokenizer_from_state({"kind": "word"})
