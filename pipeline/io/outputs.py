"""The outputs of one run, written as one unit and never over what the run reads.

    check_outputs([out, sidecar], inputs=[pool_dir])      # refuse before any work is done
    with OutputSet([out, sidecar, manifest], inputs=[pool_dir]) as outs:
        write_rows(rows, outs.temp(out))                   # every file goes to a temporary name
        ...
    # on success: all renamed onto their final names under a lock on the output directory,
    # the LAST path (the manifest: the unit's commit record) removed first and renamed last,
    # so a manifest on disk always describes the files beside it. On any exception (Ctrl-C
    # included) the temporaries are removed and nothing final is touched.

Where a command may write at all is `guard.py`'s question (`check_outputs`, which OutputSet
asks of its paths too). A write that fails for the machine's reasons (a full disk, a file-size
limit) is re-raised naming the output. `output_lock(dir)` is the same lock for commands that
write a directory in place (ingest's swap, train's run directory).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Self

from thresher.pipeline.io.guard import check_outputs, write_error

TMP_TAG = ".thresher-tmp-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(final: Path) -> None:
    """Remove temporaries of `final` left by runs that were killed (their process is gone)."""
    final = Path(final)
    if not final.parent.is_dir():
        return
    for p in final.parent.glob(f".{final.name}{TMP_TAG}*"):
        try:
            pid = int(p.name.rsplit(TMP_TAG, 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def temp_name(final: Path) -> Path:
    """A unique hidden sibling of `final` that names this process (for `clean_stale`)."""
    final = Path(final)
    return final.with_name(f".{final.name}{TMP_TAG}{os.getpid()}-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def output_lock(directory: Path, wait: bool = True) -> Iterator[None]:
    """An exclusive advisory lock on a directory (flock on the directory itself, so no lock file
    is left behind). `wait=False` raises ValueError when another run holds it."""
    directory = Path(directory)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise ValueError(f"{directory}: another thresher run is writing here; wait for it "
                             "to finish") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


class OutputSet:
    """Temporary names for a run's output files, renamed onto the final names together."""

    def __init__(self, finals: Iterable[Path], inputs: Iterable[Path] = (),
                 dir_outputs: Iterable[Path] = (), workdir: Path | None = None):
        """`finals`: every output, the commit record last; those also in `dir_outputs` are
        directories (an existing one is replaced whole); `workdir`: the run's artifact cache,
        where no output may land."""
        self.finals = [Path(f) for f in finals]
        if not self.finals:
            raise ValueError("OutputSet needs at least one output path")
        self.dirs = {Path(d) for d in dir_outputs}
        check_outputs([f for f in self.finals if f not in self.dirs], inputs, self.dirs,
                      workdir=workdir)
        self.temps: dict[Path, Path] = {}

    def __enter__(self) -> Self:
        for f in self.finals:
            f.parent.mkdir(parents=True, exist_ok=True)
            clean_stale(f)
        self.temps = {f: temp_name(f) for f in self.finals}
        return self

    def temp(self, final: Path) -> Path:
        """Where to write `final` during the run."""
        return self.temps[Path(final)]

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            missing = [str(f) for f, t in self.temps.items() if not t.exists()]
            if missing:
                self.abort()
                raise RuntimeError(f"outputs never written: {missing}")  # a bug, not user error
            try:
                self.commit()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()
            if isinstance(exc, OSError):
                named = write_error(exc, self.finals[0])
                if named is not exc:
                    raise named from exc

    def commit(self) -> None:
        dirs = sorted({f.parent.resolve() for f in self.finals})
        with contextlib.ExitStack() as stack:
            for d in dirs:
                stack.enter_context(output_lock(d))
            record = self.finals[-1]
            with contextlib.suppress(FileNotFoundError):
                record.unlink()  # a crash mid-commit leaves no stale record
            for f in self.finals:
                _replace(self.temps[f], f, whole_dir=f in self.dirs)

    def abort(self) -> None:
        for t in self.temps.values():
            if t.is_dir():
                shutil.rmtree(t, ignore_errors=True)
            else:
                t.unlink(missing_ok=True)


def _replace(src: Path, dst: Path, whole_dir: bool = False) -> None:
    if whole_dir and dst.is_dir():  # os.replace cannot put a directory over a non-empty one
        old = temp_name(dst)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.replace(src, dst)
    except IsADirectoryError:
        raise ValueError(f"{dst} is a directory; give a file name") from None
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise ValueError(f"{dst} is a non-empty directory; give a file name") from None
        raise


def replace_dir(tmp: Path, final: Path, is_ours) -> None:
    """Swap a finished directory `tmp` onto `final` under the output lock. An existing `final`
    is replaced only when `is_ours(final)` says it is one of our outputs (e.g. a pool)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(final.parent):
        if final.exists() or final.is_symlink():
            if not final.is_dir() or not is_ours(final):
                raise FileExistsError(f"{final} exists and is not a pool; refusing to replace it")
            old = temp_name(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
