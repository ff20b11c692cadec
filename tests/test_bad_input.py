"""Runs every row of the bad-input table in docs/RELIABILITY.md through the CLI."""

import hashlib
import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from wordlm.cli import app
from wordlm.data import file_sha256
from wordlm.train import RunLock

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "RELIABILITY.md"


def table_rows() -> list[tuple[str, str, str, int]]:
    text = DOC.read_text().split("## Bad input", 1)[1]
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if len(cells) == 4 and cells[1].startswith("`"):
            what, command, message, code = cells
            message = message.split("` (", 1)[0]  # a remark may follow the quoted message
            rows.append((what, command.strip("`"), message.strip("`"), int(code)))
    return rows


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != ".lock"):
        h.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def places(demo_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "empty.txt").write_text("")
    (tmp / "blank.txt").write_text("   \n\n\t \n")
    (tmp / "latin1.txt").write_bytes("good line\ncaf\xe9\n".encode("latin-1"))
    (tmp / "binary.txt").write_bytes(b"abc\n\x00\x01\x02\x03")
    (tmp / "short.txt").write_text("why do we need a network\n")
    (tmp / "notoml.toml").write_text("[train\nlr = ")
    run_copy = tmp / "run"
    shutil.copytree(demo_run, run_copy, ignore=shutil.ignore_patterns(".lock"))
    corrupt = tmp / "corrupt"
    shutil.copytree(demo_run / "best", corrupt)
    (corrupt / "model.pt").write_bytes((corrupt / "model.pt").read_bytes()[:-50])
    pickled = tmp / "pickled"
    shutil.copytree(demo_run / "best", pickled)
    torch.save(torch.nn.Linear(2, 2), pickled / "model.pt")
    meta = json.loads((pickled / "meta.json").read_text())
    meta["files"].pop("model.pt")
    (pickled / "meta.json").write_text(json.dumps(meta))
    mismatch = tmp / "mismatch"
    shutil.copytree(demo_run / "best", mismatch)
    tok = json.loads((mismatch / "tokenizer.json").read_text())
    tok["itos"].append("extra")
    (mismatch / "tokenizer.json").write_text(json.dumps(tok))
    meta = json.loads((mismatch / "meta.json").read_text())
    meta["files"]["tokenizer.json"] = file_sha256(mismatch / "tokenizer.json")
    (mismatch / "meta.json").write_text(json.dumps(meta))
    lastless = tmp / "lastless"  # a run whose last/ was deleted by hand: best/ is all there is
    shutil.copytree(demo_run, lastless, ignore=shutil.ignore_patterns(".lock"))
    shutil.rmtree(lastless / "last")
    locked = tmp / "locked"
    locked.mkdir()
    own = tmp / "own"  # a folder of the user's, holding the config to train
    own.mkdir()
    (own / "config.toml").write_text("# my experiment\n" + (ROOT / "configs" / "demo.toml").read_text())
    foreign = tmp / "foreign"  # a metrics.jsonl from another tool: records without the fields wordlm writes
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n{"epoch": 1, "loss": 2.0}\n')
    return {"tmp": str(tmp / "scratch"), "cfg": str(ROOT / "configs" / "demo.toml"), "run": str(run_copy),
            "empty": str(tmp / "empty.txt"), "blank": str(tmp / "blank.txt"), "latin1": str(tmp / "latin1.txt"),
            "binary": str(tmp / "binary.txt"),
            "short": str(tmp / "short.txt"), "notoml": str(tmp / "notoml.toml"), "corrupt": str(corrupt),
            "pickled": str(pickled), "mismatch": str(mismatch), "locked": str(locked),
            "own": str(own), "foreign": str(foreign), "lastless": str(lastless)}


def test_the_table_is_there():
    assert len(table_rows()) >= 30


@pytest.mark.parametrize("what, command, message, code", table_rows(), ids=[r[0] for r in table_rows()])
def test_bad_input_row(places, what, command, message, code):
    Path(places["tmp"]).mkdir(exist_ok=True)

    def fill(s: str) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: places[m.group(1)], s)

    before = tree_digest(Path(places["run"]))
    args = [fill(a) for a in shlex.split(command)]
    if "{locked}" in command:
        with RunLock(Path(places["locked"])):
            result = CliRunner().invoke(app, args)
    else:
        result = CliRunner().invoke(app, args)
    out = result.output
    assert result.exit_code == code, out
    # Info lines (or click's usage line) may come first; the error is the first line that says so.
    first_error = next(ln for ln in out.splitlines() if ln.startswith(("error:", "Error:")))
    assert first_error.startswith(fill(message)), out
    assert "Traceback" not in out
    assert tree_digest(Path(places["run"])) == before, "a bad command changed the existing run"
