"""The docs name the tests that back their claims; each name must be a test that exists."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_the_docs_name_exists():
    defined = {m for f in (ROOT / "tests").glob("*.py") for m in re.findall(r"def (test_\w+)", f.read_text())}
    files = {f.stem for f in (ROOT / "tests").glob("test_*.py")}
    docs = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    missing = {(doc.name, name) for doc in docs for name in re.findall(r"\btest_\w+", doc.read_text())
               if name not in defined and name not in files}
    assert not missing, sorted(missing)
