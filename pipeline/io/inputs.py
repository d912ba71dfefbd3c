"""Which files an ingest reads: named files, directories walked, globs; each file read once.

    found = walk_inputs([Path("data"), Path("extra/*.jsonl.gz")], exclude=[Path("data/pool")])
    found.files      # supported files, in order: sorted by name within each directory
    found.skipped    # [{"path", "reason"}]: every file found and not read, and why

A directory walk follows links but never enters a directory it has entered already (by device
and inode), so a link cycle (`s -> .`) ends; a file reached twice (a hard link, a symlink, a
file named and also inside a named directory) is read once. Nothing found is skipped silently:
an unsupported type, a thresher sidecar, a hidden entry, a second name of a file already read,
and this run's own outputs (`exclude`: the pool being written, a recipe's folders) are listed
with their reason. A pool directory contributes its shards only. Thresher's own work
directories and temporaries (hidden, named by thresher) are passed over without a word.
"""

from __future__ import annotations

import glob
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from thresher.pipeline.io.guard import WORKDIR_NAME, is_pool, protected, real
from thresher.pipeline.io.outputs import TMP_TAG
from thresher.pipeline.io.readers import SIDECARS, SUFFIXES, file_type, suffixes

EXAMPLES = 20                 # skipped paths kept per reason in pool.json


@dataclass
class Found:
    files: list[Path] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    _seen: set = field(default_factory=set, repr=False)       # (dev, ino) of files taken
    _entered: set = field(default_factory=set, repr=False)    # (dev, ino) of directories
    _first: dict = field(default_factory=dict, repr=False)    # (dev, ino) -> first path

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append({"path": str(path), "reason": reason})

    def take(self, path: Path) -> None:
        st = path.stat()
        key = (st.st_dev, st.st_ino)
        if key in self._seen:
            self.skip(path, f"the same file as {self._first[key]} (read once)")
            return
        self._seen.add(key)
        self._first[key] = path
        self.files.append(path)

    def summary(self) -> dict:
        """For pool.json: how many were skipped, by reason, and the first paths of each."""
        by = Counter(_kind(s["reason"]) for s in self.skipped)
        examples: list[dict] = []
        per: Counter = Counter()
        for s in self.skipped:
            k = _kind(s["reason"])
            if per[k] < EXAMPLES:
                per[k] += 1
                examples.append(s)
        return {"count": len(self.skipped), "by_reason": dict(sorted(by.items())),
                "examples": examples}


def _kind(reason: str) -> str:
    """A reason without its file-specific tail, to count by."""
    return reason.split(" (")[0].split(" as ")[0]


def _unsupported(path: Path) -> str | None:
    """Why a file found in a directory is not read, or None when it is."""
    name = path.name.lower()
    if name.endswith(SIDECARS):
        return "a thresher sidecar (not rows)"
    suffix, _ = suffixes(path)
    if suffix not in SUFFIXES:
        return f"unsupported type {suffix}" if suffix else "unsupported type: no extension"
    return None


def _ours(name: str) -> bool:
    return name == WORKDIR_NAME or TMP_TAG in name


class _Walk:
    def __init__(self, found: Found, exclude: list[Path]):
        self.found, self.exclude = found, exclude

    def excluded(self, p: Path) -> bool:
        r = real(p)
        return any(r == e or r.is_relative_to(e) for e in self.exclude)

    def dir(self, root: Path) -> None:
        st = root.stat()
        key = (st.st_dev, st.st_ino)
        if key in self.found._entered:
            self.found.skip(root, "a directory already read (a link cycle or a second name)")
            return
        self.found._entered.add(key)
        if is_pool(root):
            for shard in sorted((root / "shards").glob("*.parquet")):
                self.found.take(shard)
            return
        try:
            entries = sorted(os.scandir(root), key=lambda e: e.name)
        except OSError as e:          # permission denied, gone meanwhile: listed, not fatal
            self.found.skip(root, f"an unreadable directory ({e.strerror})")
            return
        for entry in entries:
            self.entry(Path(entry.path), entry.name)

    def matched(self, p: Path) -> None:
        """A file a glob matched: like a file found in a directory, but never a pool's own
        files (pool.json, its quarantine: its rows are its shards) nor a cache's."""
        hit = protected(p, itself=False)
        if hit is not None:
            self.found.skip(p, f"inside the {hit[1]} {hit[0]} (not rows)")
        else:
            self.entry(p, p.name)

    def entry(self, p: Path, name: str) -> None:
        if name.startswith("."):
            if not _ours(name):
                self.found.skip(p, "hidden (not read)")
            return
        if self.excluded(p):
            self.found.skip(p, "an output of this run (never read as input)")
            return
        if p.is_dir():
            self.dir(p)
        elif p.is_file():
            why = _unsupported(p)
            if why:
                self.found.skip(p, why)
            else:
                self.found.take(p)
        else:
            self.found.skip(p, "not a regular file (a broken link, a socket...)")


def walk_inputs(sources: list[Path | str], exclude: list[Path | str] = ()) -> Found:
    """Files named directly (an unsupported type is an error), every supported file under named
    directories, and glob patterns (`data/*.jsonl.gz`, `data/**/*.json`); see the module doc."""
    found = Found()
    walk = _Walk(found, [real(e) for e in exclude])
    for src in map(Path, sources):
        if src.exists() and walk.excluded(src):
            found.skip(src, "an output of this run (never read as input)")
        elif src.is_dir():
            before = len(found.files)
            walk.dir(src)
            if len(found.files) == before and not _read_before(found, src):
                raise ValueError(f"{src}: directory holds no {'/'.join(sorted(SUFFIXES))} files"
                                 + _found_instead(found, src))
        elif src.is_file():
            file_type(src)
            found.take(src)
        elif glob.has_magic(str(src)):
            matched = sorted(Path(p) for p in glob.glob(str(src), recursive=True))
            before = len(found.files)
            for p in matched:
                if p.is_file():
                    walk.matched(p)
            if len(found.files) == before:
                raise FileNotFoundError(f"{src}: the pattern matches no supported file")
        else:
            raise FileNotFoundError(f"{src}: no such file or directory")
    return found


def _read_before(found: Found, src: Path) -> bool:
    """Whether `src` only gave files already read (named twice): not an empty directory."""
    s = str(src)
    return any(x["path"].startswith(s) and x["reason"].startswith(("the same file",
                                                                   "a directory already"))
               for x in found.skipped)


def _found_instead(found: Found, src: Path) -> str:
    s = str(src)
    names = [Path(x["path"]).name for x in found.skipped if x["path"].startswith(s)]
    return f" (found only: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})" \
        if names else ""


def expand_inputs(sources: list[Path | str], exclude: list[Path | str] = ()) -> list[Path]:
    """The files `walk_inputs` would read."""
    return walk_inputs(sources, exclude).files


def describe_skipped(skipped: list[dict], names: int = 3) -> str:
    """One line: how many files were not read, by reason, with a few names each."""
    groups: dict[str, list[str]] = {}
    for s in skipped:
        groups.setdefault(_kind(s["reason"]), []).append(Path(s["path"]).name)
    parts = [f"{len(v)} {k} ({', '.join(v[:names])}{', ...' if len(v) > names else ''})"
             for k, v in groups.items()]
    return f"{len(skipped)} found and not read: " + "; ".join(parts)
