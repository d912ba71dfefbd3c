"""The output guard: where a command may write, checked before it does any work.

Every writer (select, report, verify, train, prune, qtuning-masks, ingest, a recipe and each of
its steps, and the work directory) asks the same questions of each path it will write:

    check_outputs([out, sidecar, manifest], inputs=[pool_dir, *targets], workdir=store_root)
    check_workdir(workdir)                       # --workdir: not in a pool, not someone's folder
    check_replace_dir(out, OWN_HF_FILES, record)  # a directory replaced whole (--format hf)
    check_writes_into(out, names, record)        # fixed file names written into a directory
    check_replace_file(out, is_report, "a thresher report")   # a file of a known kind

The rules (docs/trust.md):
  1. an output is never an input (the same file, by hard link or symlink too), never lies inside
     an input directory, and a directory output never holds an input file;
  2. an output never lies inside a pool (a directory with pool.json and shards/) nor inside a
     work directory's cache (`.thresher-work`, an artifact directory with _SPEC.json or
     _COMPLETE.json, a per-shard cache directory), whether or not this command reads them;
     only `ingest` replaces a pool, and only a pool;
  3. a directory is replaced whole only when thresher wrote it (its commit record is beside it)
     and it holds nothing else; fixed file names are written into an existing directory only
     when the commit record of the same command is there, and a report over an existing file
     only when that file is a thresher report; otherwise the command is refused, naming what
     it found; nothing is ever deleted to make room;
  4. a file output that names a directory (an existing one, or `dir/`) is refused.
Each refusal is a ValueError whose one line names the option and the path.

`write_error(e, path)` turns a failed write (a full disk, a file-size limit, also when a library
dropped the errno: numpy's "requested and written") into an OSError naming the path.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable, Iterable
from pathlib import Path

from thresher.pipeline.logs import FILE_NAME as LOG_FILE

WORKDIR_NAME = ".thresher-work"
CACHE_MARKERS = ("_SPEC.json", "_COMPLETE.json")   # artifacts.py: every artifact directory


def real(p: Path | str) -> Path:
    return Path(os.path.realpath(Path(p).expanduser()))


def same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and symlinks included
    except OSError:
        return False


def is_pool(d: Path) -> bool:
    return (d / "pool.json").is_file() and (d / "shards").is_dir()


def _is_cache(d: Path) -> bool:
    if d.name == WORKDIR_NAME or any((d / m).is_file() for m in CACHE_MARKERS):
        return True
    return d.name == "units" and next(d.glob("*.done.json"), None) is not None


def protected(path: Path, itself: bool = True) -> tuple[Path, str] | None:
    """The nearest pool or work-directory cache at (when `itself`) or above `path`, as
    (directory, "pool" | "work directory cache"); None when `path` lies in neither."""
    p = real(path)
    for d in ([p] if itself else []) + list(p.parents):
        if not d.is_dir():
            continue
        if is_pool(d):
            return d, "pool"
        if _is_cache(d):
            return d, "work directory cache"
    return None


def file_output(out: Path | str, option: str = "--out") -> Path:
    """A file output as given on the command line: `dir/` (a trailing separator) names a
    directory, not a file."""
    text = os.fspath(out)
    if text.endswith(("/", os.sep)) and text.rstrip("/" + os.sep):
        raise ValueError(f"{option} {text}: ends with '/', so it names a directory; give a file "
                         f"name, e.g. {text.rstrip('/' + os.sep)}/subset.jsonl")
    return Path(text)


def check_outputs(outputs: Iterable[Path], inputs: Iterable[Path] = (),
                  dir_outputs: Iterable[Path] = (), *, workdir: Path | None = None,
                  pools: Iterable[Path] = (), label: str = "--out", cache: bool = False) -> None:
    """Raise ValueError when writing `outputs` (files) or `dir_outputs` (directories) breaks a
    rule of the module doc. `pools`: directory outputs that are pools `ingest` replaces (only
    what lies above them is checked); `workdir`: the command's own artifact cache; `cache`:
    a stage writing inside its own artifact directory (a target set's pool), which may."""
    ins = [(Path(i), real(i)) for i in inputs]
    pool_outs = [real(p) for p in pools]
    outs = [(Path(o), False) for o in outputs] + [(Path(o), True) for o in dir_outputs]
    work = real(workdir) if workdir is not None else None
    for out, is_dir in outs:
        r = real(out)
        if not is_dir and r.is_dir():
            raise ValueError(f"{label} {out} is a directory; give a file name")
        for given, rin in ins:
            if r == rin or same_file(r, rin):
                raise ValueError(f"{label} {out} is the input {given}; refusing to overwrite "
                                 "what this command reads")
            if rin.is_dir() and r.is_relative_to(rin):
                raise ValueError(f"{label} {out} lies inside the input {given}; write it "
                                 "elsewhere")
            if is_dir and rin.is_relative_to(r):
                raise ValueError(f"{label} {out} would replace a directory holding the input "
                                 f"{given}")
        if work is not None and r.is_relative_to(work):
            raise ValueError(f"{label} {out} lies inside the work directory {workdir}; write it "
                             "elsewhere")
        hit = protected(r, itself=is_dir and r not in pool_outs)
        if hit is not None and not (cache and hit[1] != "pool"):
            where, what = hit
            if what == "pool":
                raise ValueError(f"{label} {out} lies inside the pool {where}; only `thresher "
                                 "ingest` writes a pool: write it elsewhere")
            raise ValueError(f"{label} {out} lies inside the {what} {where}; write it elsewhere")


def check_workdir(workdir: Path, inputs: Iterable[Path] = (), label: str = "--workdir") -> None:
    """A work directory is new, or an existing one; never inside a pool or another cache, never
    an input file, and never a folder of someone's files (its stage folders would land there)."""
    w = Path(workdir)
    r = real(w)
    if r.exists() and not r.is_dir():
        raise ValueError(f"{label} {w} is a file; give a directory")
    for i in inputs:
        if same_file(r, i):
            raise ValueError(f"{label} {w} is the input {i}")
    hit = protected(r, itself=False)
    if hit is None and is_pool(r):
        hit = r, "pool"
    if hit is not None:
        raise ValueError(f"{label} {w} lies inside the {hit[1]} {hit[0]}; give a directory of "
                         f"its own (default: {WORKDIR_NAME} beside the pool)")
    if r.is_dir() and r.name != WORKDIR_NAME and not _holds_artifacts(r):
        foreign = sorted(p.name for p in r.iterdir())
        if foreign:
            raise ValueError(f"{label} {w} holds files that are not thresher's cache ("
                             f"{_some(foreign)}); give a new or empty directory, or an "
                             "existing work directory")


def _holds_artifacts(d: Path) -> bool:
    """Whether every entry of `d` is a stage folder of artifact directories (a work directory;
    the CLI's log file beside them)."""
    entries = [e for e in d.iterdir() if not (e.name == LOG_FILE and e.is_file())]
    return bool(entries) and all(
        e.is_dir() and all(k.is_dir() and (any((k / m).exists() for m in CACHE_MARKERS)
                                           or (k / "units").is_dir()) for k in e.iterdir())
        for e in entries)


def _some(names: list[str], n: int = 3) -> str:
    more = f" and {len(names) - n} more" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _files_under(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if not p.is_dir())


def check_replace_dir(out: Path, own: Iterable[str], record: Path, label: str = "--out") -> None:
    """`out` may be replaced whole only when it is missing or empty, or when thresher wrote it:
    `record` (its commit record, e.g. the manifest beside it) exists and `out` holds only the
    files in `own` (paths relative to `out`)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{label} {out} is a file, not a dataset directory; give a new name")
    files = _files_under(out)
    if not files:
        return
    foreign = [f for f in files if f not in set(own)]
    if foreign:
        raise ValueError(f"{label} {out} holds files thresher did not write ({_some(foreign)}); "
                         "refusing to replace it: give a new directory (nothing was changed)")
    if not Path(record).exists():
        raise ValueError(f"{label} {out} exists and was not written by thresher (no "
                         f"{Path(record).name} beside it); refusing to replace it: give a new "
                         "directory")


def check_writes_into(directory: Path, names: Iterable[str], record: str | tuple[str, ...],
                      label: str = "--out") -> None:
    """Writing the files `names` (globs allowed) into `directory`: a name that exists already is
    overwritten only when `directory/record` (the commit record of an earlier run of the same
    command; any of several) exists too; otherwise the command is refused."""
    d = Path(directory)
    records = (record,) if isinstance(record, str) else record
    if not d.is_dir() or any((d / r).exists() for r in records):
        return
    found = sorted({p.name for n in names for p in d.glob(n)})
    if found:
        raise ValueError(f"{label} {d} holds {_some(found)}, which thresher did not write (no "
                         f"{records[0]} there); refusing to overwrite: give a new directory")


def check_replace_file(out: Path, ours: Callable[[Path], bool], what: str,
                       label: str = "--out") -> None:
    """A file output that exists is overwritten only when it is `what` (`ours(out)`): a file of
    the same kind thresher wrote before, never someone's data at that name."""
    out = Path(out)
    if out.is_file() and out.stat().st_size and not ours(out):
        raise ValueError(f"{label} {out} exists and is not {what}; refusing to overwrite it: "
                         "give a new file name")


# ------------------------------------------------------------------ failed writes

_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO}


def _diagnose(path: Path) -> int | None:
    """The errno of a write that failed without one: a full file system or a file-size limit."""
    at = Path(path)
    while not at.exists() and at != at.parent:
        at = at.parent
    try:
        st = os.statvfs(at)
        if st.f_bavail * st.f_frsize < (1 << 20):
            return errno.ENOSPC
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return errno.EFBIG
    return None


def write_error(e: OSError, path: Path | str) -> OSError:
    """`e` (raised while writing `path`) as an OSError that names `path` and its cause; `e`
    itself when it names a file already or is not about the machine's state."""
    code = e.errno
    if code is None and "written" in str(e):     # numpy's tofile: "N requested and M written"
        code = _diagnose(Path(path))
    if code not in _WRITE_ERRNOS or (e.filename is not None and e.errno is not None):
        return e
    return OSError(code, os.strerror(code), str(path))
