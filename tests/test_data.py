import numpy as np
import pytest
import torch

from wordlm.data import Streams, encode_file, iter_lines
from wordlm.errors import ConfigError, DataError
from wordlm.tokenizer import WordTokenizer


def test_stream_layout_on_a_hand_made_sequence():
    # The diagram in data.Streams: ids a..x (0..23), 4 streams of 6 rows.
    s = Streams(np.arange(24, dtype=np.uint16), batch_size=4)
    assert (s.rows, s.targets, s.num_windows(2)) == (6, 20, 3)
    x, y = s.window(0, 2)
    assert x.tolist() == [[0, 6, 12, 18], [1, 7, 13, 19]]
    assert y.tolist() == [[1, 7, 13, 19], [2, 8, 14, 20]]
    x, y = s.window(4, 2)  # the last window is shorter
    assert x.tolist() == [[4, 10, 16, 22]] and y.tolist() == [[5, 11, 17, 23]]
    assert x.dtype == y.dtype == torch.int64


def test_windows_cover_every_target_once():
    s = Streams(np.arange(103, dtype=np.uint32), batch_size=5)  # 3 tokens dropped: 103 = 5 * 20 + 3
    seen = []
    for row in range(0, s.rows - 1, 7):
        _, y = s.window(row, 7)
        seen += y.flatten().tolist()
    assert sorted(seen) == sorted(set(range(100)) - {0, 20, 40, 60, 80})
    assert len(seen) == s.targets


def _device_path(s):
    """The device's way of reading windows (a grid tensor, rotated whole), taken on the CPU."""
    s._grid_t = s._unrotated_t = torch.from_numpy(s._grid.astype(np.int32))
    return s


@pytest.mark.parametrize("path", ["host", "device"])
def test_rotated_streams_read_each_stream_from_its_shift_round_to_its_start(path):
    # ids 0..23 in 4 streams of 6 (the diagram in data.Streams); stream 0 from its token 2, stream 2 from 5,
    # stream 3 from 7 = 1 (mod 6), stream 1 as it was.
    s = Streams(np.arange(24, dtype=np.uint16), batch_size=4)
    s = _device_path(s) if path == "device" else s
    s.rotate(np.array([2, 0, 5, 7]))
    x, y = s.window(0, 5)  # the whole epoch in one window
    assert x.t().tolist() == [[2, 3, 4, 5, 0], [6, 7, 8, 9, 10], [17, 12, 13, 14, 15], [19, 20, 21, 22, 23]]
    assert y.t().tolist() == [[3, 4, 5, 0, 1], [7, 8, 9, 10, 11], [12, 13, 14, 15, 16], [20, 21, 22, 23, 18]]
    x2, y2 = s.window(3, 2)  # a window past the seam reads the same tokens as the whole one did there
    assert torch.equal(x2, x[3:5]) and torch.equal(y2, y[3:5]) and x2.dtype == y2.dtype == x.dtype
    s.rotate(None)  # back to the plain layout
    assert s.window(0, 2)[0].tolist() == [[0, 6, 12, 18], [1, 7, 13, 19]]
    s.rotate(np.zeros(4))
    assert s.shifts is None and s.window(4, 2)[1].tolist() == [[5, 11, 17, 23]]
    with pytest.raises(ValueError, match="one shift per stream: 4 expected"):
        s.rotate(np.array([1, 2]))


def test_a_rotated_epoch_reads_every_stream_whole_and_the_two_paths_agree():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50_000, 1003).astype(np.uint32)
    host, device = Streams(ids, batch_size=7), _device_path(Streams(ids, batch_size=7))
    shifts = rng.integers(0, host.rows, 7)
    host.rotate(shifts)
    device.rotate(shifts)
    xs, ys = [], []
    for row in range(0, host.rows - 1, 9):
        (x, y), (xd, yd) = host.window(row, 9), device.window(row, 9)
        assert torch.equal(x, xd) and torch.equal(y, yd)
        xs.append(x)
        ys.append(y)
    x, y = torch.cat(xs), torch.cat(ys)
    assert torch.equal(x[1:], y[:-1])  # each stream one unbroken read, window after window
    grid = ids[: 7 * host.rows].reshape(7, host.rows)
    for b in range(7):  # stream b's text, rotated: all of it once, the seam between its last and first token
        assert np.concatenate([x[:, b].numpy(), y[-1:, b].numpy()]).tolist() == np.roll(grid[b], -shifts[b]).tolist()


def test_too_short_for_the_batch():
    with pytest.raises(DataError, match="too short for 20 streams"):
        Streams(np.arange(30, dtype=np.uint16), batch_size=20)


def test_encode_file_caches_and_reuses(tmp_path, monkeypatch):
    f = tmp_path / "t.txt"
    f.write_text("a b c\nb c\n")
    tok = WordTokenizer.fit(["a b c"])
    first = encode_file(f, tok, tmp_path / "cache")
    assert first.ids.tolist() == [tok.eos_id, *tok.encode("a b c\nb c\n")]
    assert (first.tokens, first.words) == (7, 7) and first.ids.dtype == np.uint16

    def boom(*a, **k):
        raise AssertionError("tokenized again although the cache holds this text")

    monkeypatch.setattr(tok, "encode_lines", boom)
    again = encode_file(f, tok, tmp_path / "cache")
    assert isinstance(again.ids, np.memmap) and again.ids.tolist() == first.ids.tolist()
    f.write_text("c c\n")  # new content -> new key -> tokenized again
    with pytest.raises(AssertionError, match="tokenized again"):
        encode_file(f, tok, tmp_path / "cache")


def test_large_vocabularies_use_uint32(tmp_path):
    words = [f"w{i}" for i in range(70000)]
    f = tmp_path / "t.txt"
    f.write_text(" ".join(words) + "\n")
    tok = WordTokenizer.fit([" ".join(words)])
    split = encode_file(f, tok, tmp_path / "cache")
    assert split.ids.dtype == np.uint32 and int(split.ids[-2]) == tok.stoi["w69999"]


def test_bad_files_are_named_with_the_problem(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"hello\nab\xffc\n")
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte 0xff at byte offset 8\)"):
        list(iter_lines(bad, "data.train"))
    nul = tmp_path / "bin.txt"
    nul.write_bytes(b"ok\n\x00\x01\x02")
    with pytest.raises(DataError, match="looks binary"):
        list(iter_lines(nul, "data.train"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        list(iter_lines(empty, "data.train"))
    with pytest.raises(DataError, match="is a directory"):
        list(iter_lines(tmp_path, "data.train"))
    with pytest.raises(DataError, match="does not exist"):
        list(iter_lines(tmp_path / "nope.txt", "data.train"))


def test_a_byte_order_mark_and_windows_line_ends_are_not_text(tmp_path):
    # Windows editors save UTF-8 with a byte-order mark and CRLF line ends: neither may become part of a word.
    plain, windows = tmp_path / "plain.txt", tmp_path / "windows.txt"
    plain.write_bytes(b"the cat sat\nthe dog\n")
    windows.write_bytes(b"\xef\xbb\xbfthe cat sat\r\nthe dog\r\n")
    assert list(iter_lines(windows)) == list(iter_lines(plain)) == ["the cat sat", "the dog"]
    tok = WordTokenizer.fit(iter_lines(windows))
    assert sorted(w for w in tok.itos if not w.startswith("<")) == ["cat", "dog", "sat", "the"]
    assert encode_file(windows, tok, tmp_path / "cache").ids.tolist() == \
        encode_file(plain, tok, tmp_path / "cache").ids.tolist()
    # a mark anywhere but at the very start is the text's own (U+FEFF as a zero-width no-break space)
    inner = tmp_path / "inner.txt"
    inner.write_bytes(b"a\n\xef\xbb\xbfb\n")
    assert list(iter_lines(inner)) == ["a", "\ufeffb"]


def test_an_unwritable_default_cache_is_a_warning_and_a_chosen_one_an_error(tmp_path, monkeypatch, caplog):
    import logging
    import tempfile

    f = tmp_path / "t.txt"
    f.write_text("a b c\nb c\n")
    tok = WordTokenizer.fit(["a b c"])
    expected = encode_file(f, tok, tmp_path / "cache").ids.tolist()
    blocker = tmp_path / "file"  # a home under which no folder can be made (whoever runs the tests)
    blocker.write_text("")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(logging.getLogger("wordlm"), "propagate", True)  # the CLI's callback may have stopped it
    monkeypatch.delenv("WORDLM_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(blocker))
    split = encode_file(f, tok)  # the default ~/.cache/wordlm: encoded all the same, in memory
    assert split.ids.tolist() == expected and (split.tokens, split.words) == (7, 7)
    assert "cannot write the token cache" in caplog.text
    assert list(scratch.iterdir()) == []  # its scratch file is gone
    with pytest.raises(ConfigError, match="cannot use .* for the token cache"):
        encode_file(f, tok, blocker / "cache")  # a folder the user chose
    monkeypatch.setenv("WORDLM_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(ConfigError, match="cannot use .* for the token cache"):
        encode_file(f, tok)
