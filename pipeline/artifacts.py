"""Artifact store: stage outputs keyed by inputs + configuration, written atomically, resumable.

    store = ArtifactStore(workdir)
    out = store.dir("embed", inputs=[pool.fingerprint], config={"model": ..., "part": ...})
    with out.writing("embeddings.npy") as tmp:
        np.save(tmp, ...)                 # becomes visible only when the block exits cleanly
    out.complete({"rows": n})            # marks the whole output done

Stages (`pipeline/stage.py`) use one such directory for their pool-level output and a shared
`<stage>/<config key>/units/` directory for unit files keyed by their content.

The directory is `workdir/<stage>/<key>`, key = sha256 of the stage name, the input
fingerprints and the canonical JSON of the configuration, so a change to any of them gives a
fresh directory and an unchanged rerun finds the finished one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DONE = "_COMPLETE.json"


def config_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def file_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto `final` only if the block succeeds. A write
    that fails for the machine's reasons (disk full, file-size limit) is raised naming `final`."""
    from thresher.pipeline.io.guard import write_error

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, final)
    except OSError as e:
        named = e
        if e.filename is not None and Path(e.filename) == tmp:   # name the file being written
            named = OSError(e.errno, e.strerror, str(final))
        named = write_error(named, final)
        if named is e:
            raise
        raise named from e
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_json_atomic(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class ArtifactDir:
    def __init__(self, root: Path, name: str, key: str, description: dict, create: bool = True):
        self.name, self.key, self.dir = name, key, root / name / key
        if not create:                  # a dry run looks, and leaves nothing behind
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        spec = self.dir / "_SPEC.json"
        if not spec.exists():
            write_json_atomic(spec, description)

    def path(self, name: str) -> Path:
        return self.dir / name

    def has(self, name: str) -> bool:
        return (self.dir / name).exists()

    def writing(self, name: str):
        return atomic_path(self.dir / name)

    @property
    def done(self) -> bool:
        return (self.dir / DONE).exists()

    def complete(self, info: dict | None = None) -> None:
        write_json_atomic(self.dir / DONE, info or {})

    def info(self) -> dict:
        return json.loads((self.dir / DONE).read_text())

    def save_array(self, name: str, arr) -> Path:
        """Save one array here as `name` (.npy), atomically."""
        import numpy as np

        with self.writing(name) as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
        return self.path(name)

    def concat_arrays(self, parts: list[Path], name: str) -> tuple[int, int]:
        """Stack per-shard `.npy` matrices (in the order given) into one `.npy` here, streamed
        through a memory map so the whole matrix is never in RAM; returns its shape."""
        import numpy as np
        from thresher.pipeline.io.memmap import reserved_memmap

        arrays = [np.load(p, mmap_mode="r") for p in parts]
        n = sum(a.shape[0] for a in arrays)
        d = arrays[0].shape[1] if arrays else 0
        dtype = arrays[0].dtype if arrays else np.float16
        with self.writing(name) as tmp:
            out = reserved_memmap(tmp, dtype, (n, d))
            at = 0
            for a in arrays:
                out[at:at + a.shape[0]] = a
                at += a.shape[0]
            out.flush()
            del out
        return n, d


class ArtifactStore:
    def __init__(self, workdir: Path | str, read_only: bool = False):
        """read_only: for dry runs, which only ask what is cached: no directory is created."""
        self.root, self.read_only = Path(workdir), read_only
        if not read_only:
            self.root.mkdir(parents=True, exist_ok=True)

    def dir(self, name: str, inputs: list[str], config: dict) -> ArtifactDir:
        """The directory of one stage output: name/key, key = hash(name, inputs, config)."""
        key = config_key(name, list(inputs), config)
        return ArtifactDir(self.root, name, key, {"stage": name, "inputs": inputs, "config": config},
                           create=not self.read_only)
