"""Reading what a run recorded: a manifest (JSON object) and the paths it names.

    m = read_manifest(Path("out/rds.jsonl.manifest.json"))
    pool = recorded_path(m["inputs"]["pool"], manifest_path, m.get("output"))
"""

from __future__ import annotations

import json
from pathlib import Path


def recorded_path(recorded: str, manifest_path: Path, output: str | None) -> Path:
    """A path a manifest recorded. Manifests record absolute paths; older ones recorded paths
    relative to the directory `select` ran in: that directory is the manifest's folder with the
    recorded output's parent folders stripped off (never the current directory, which may hold
    another pool of the same name; the current directory is the last resort)."""
    p = Path(recorded)
    if p.is_absolute():
        return p
    if output is not None and not Path(output).is_absolute():
        base = manifest_path.resolve().parent
        for _ in Path(output).parent.parts:
            base = base.parent
    else:
        base = manifest_path.resolve().parent
    return base / p if (base / p).exists() else p


def read_manifest(path: Path) -> dict:
    """A selection manifest (JSON object), or ValueError naming the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a thresher manifest ({str(e).splitlines()[0]})") from None
    if isinstance(data, dict):
        return data
    raise ValueError(f"{path}: not a thresher manifest (a JSON {type(data).__name__})")
