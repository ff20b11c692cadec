"""The project's own exception types.

Every error a user can cause is a `WordLMError`; the CLI turns it into one line on stderr and a non-zero exit
code (never a traceback). Anything else escaping is a bug in wordlm.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path


class WordLMError(Exception):
    """Base class: a problem the user can fix. `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(WordLMError):
    """The configuration is invalid. Holds every problem found, not just the first."""

    exit_code = 2

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class DataError(WordLMError):
    """A corpus file is missing, empty, not UTF-8 text, or too short."""

    exit_code = 3


class CheckpointError(WordLMError):
    """A checkpoint is missing, corrupt, unsafe, or does not match what is asked of it."""

    exit_code = 4


class RunLockedError(WordLMError):
    """Another training process holds the run directory."""

    exit_code = 5


class TrainingInterrupted(WordLMError):
    """Training stopped on SIGINT/SIGTERM after writing `last/`."""

    exit_code = 130


class NonFiniteLossError(WordLMError):
    """Too many non-finite steps in a row: training stopped, the last good checkpoint is kept."""

    exit_code = 6


class UsageError(WordLMError):
    """A bad argument to a command (empty prompt, top-p out of range, ...)."""

    exit_code = 2


def check_out_file(out: Path, example: str) -> None:
    """A command is about to write the file `out`: refuse a directory, or a folder that is not there, before
    any slow work."""
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; give a file name such as {example}")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: the folder {out.parent} does not exist; create it first or write "
                         f"elsewhere")


# The command line's options for the Python API's keywords, while a CLI command runs (see `options`).
_OPTIONS: ContextVar[tuple[tuple[str, str], ...]] = ContextVar("wordlm_options", default=())
_UNSET = object()


@contextmanager
def options(**names: str) -> Iterator[None]:
    """Within it, messages name the keywords given here as these command-line options: a CLI command wraps the
    API calls it makes, so that `lm.evaluate_dynamic(..., lr=inf)` says `lr` and `wordlm eval --dyn-lr inf`
    says `--dyn-lr`, from the one check."""
    token = _OPTIONS.set((*_OPTIONS.get(), *names.items()))
    try:
        yield
    finally:
        _OPTIONS.reset(token)


def arg(keyword: str, value: object = _UNSET) -> str:
    """An argument as the caller wrote it: `lr` or `lr=0.1` from Python, `--dyn-lr` or `--dyn-lr 0.1` (a flag
    alone for True) inside `options(lr="--dyn-lr")`."""
    flag = dict(_OPTIONS.get()).get(keyword)
    if value is _UNSET:
        return flag or keyword
    if flag is None:
        return f"{keyword}={value!r}"
    return flag if value is True else f"{flag} {value}"
