"""Where log records go: the terminal shows thresher's own warnings and errors (and progress
bars); everything else, library warnings included, goes to a log file.

    configure()                  # once, in the CLI's main: stderr at THRESHER_LOG (WARNING)
    log_to(workdir)              # a command that knows its work directory: WORKDIR/thresher.log
    route_library_logs()         # where models load (transformers imported by then)

Library warnings are Python `warnings` (torch's "batching rule" notice, deprecations) and the
records of library loggers (transformers, huggingface_hub, umap, numba...). `configure` routes
`warnings` through logging (`logging.captureWarnings`), sends transformers' records through the
root logger instead of its own stderr handler, turns off library progress bars (the weight
loading bar of transformers and huggingface_hub's download bars), and keeps every record
below ERROR whose logger is not under `thresher` off the terminal: at THRESHER_LOG=DEBUG they are shown too.
The log file takes everything at INFO and above (THRESHER_LOG=DEBUG: DEBUG), with times.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

FILE_NAME = "thresher.log"
FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class OwnRecords(logging.Filter):
    """Passes thresher's records (logger `thresher...`, or a script's `__main__`), and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.ERROR or record.name == "thresher"
                or record.name.startswith(("thresher.", "__main__")))


def _level() -> int:
    name = os.environ.get("THRESHER_LOG", "WARNING").upper()
    level = logging.getLevelName(name)
    return level if isinstance(level, int) else logging.WARNING


_configured = False


class _Terminal(logging.StreamHandler):
    """A StreamHandler on whatever `sys.stderr` is when a record comes (a command run in-process
    again, e.g. from a notebook or a test, never writes to a stream closed since)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def route_library_logs() -> None:
    """transformers' records through the root logger instead of its own stderr handler, and its
    progress bars off; only after `configure` (a program that imports thresher keeps its own
    logging setup). Called where models load (`models.resolve`), once transformers is imported."""
    hf = sys.modules.get("transformers.utils.logging")
    if not _configured or hf is None:
        return
    hf.disable_progress_bar()
    hf.disable_default_handler()
    hf.enable_propagation()


def configure() -> None:
    """The terminal handler (stderr, THRESHER_LOG's level, thresher's records only unless DEBUG),
    warnings captured into logging, library chatter and bars off. Idempotent."""
    root = logging.getLogger()
    level = _level()
    if not any(getattr(h, "_thresher", "") == "terminal" for h in root.handlers):
        handler = _Terminal()
        handler._thresher = "terminal"
        handler.setFormatter(logging.Formatter(FORMAT))
        if level > logging.DEBUG:
            handler.addFilter(OwnRecords())
        handler.setLevel(level)
        root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))       # INFO reaches the file handler, if any
    logging.captureWarnings(True)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # read when the hub is imported
    global _configured
    _configured = True
    route_library_logs()


class _LazyFile(logging.FileHandler):
    """A FileHandler that creates its directory and file at the first record, not before (a
    command that stops at a user error leaves no work directory behind)."""

    def _open(self):
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            super().emit(record)           # opening the file is not guarded by logging itself
        except OSError:
            self.handleError(record)

    def handleError(self, record: logging.LogRecord) -> None:
        """A log file that cannot be written (a read-only or full disk) is dropped without a
        traceback: the command's own writes report that failure as its one-line error."""
        logging.getLogger().removeHandler(self)


def log_to(directory: Path | str) -> Path | None:
    """Also write every record (INFO and above; DEBUG at THRESHER_LOG=DEBUG) to
    DIRECTORY/thresher.log (appended; created at the first record). Returns the file's path, or
    None without `configure` (a program that imports thresher keeps its own logging setup)."""
    if not _configured:
        return None
    path = (Path(directory) / FILE_NAME).resolve()
    root = logging.getLogger()
    for h in root.handlers[:]:
        if getattr(h, "_thresher", "") == "file":
            if Path(h.baseFilename) == path:
                return path
            root.removeHandler(h)            # one log file: the current command's
            h.close()
    handler = _LazyFile(path, encoding="utf-8", delay=True)
    handler._thresher = "file"
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.setLevel(min(_level(), logging.INFO))
    root.addHandler(handler)
    return path
