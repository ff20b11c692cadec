"""The project's own exception types.

Every error a user can cause is a `WordLMError`; the CLI turns it into one line on stderr and a non-zero exit
code (never a traceback). Anything else escaping is a bug in wordlm.
"""

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
