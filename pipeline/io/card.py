"""Dataset cards: a README.md beside each emitted subset, in the Hugging Face dataset-card shape.

    write_card(card_dir, manifest, data_files="gsm8k.jsonl", verify=None)

The card is YAML front matter (`configs` pointing at the data files, so `datasets.load_dataset(
card_dir)` and the Hub read exactly the subset; `size_categories`; tags) and Markdown sections:
what was selected, from what (inputs and their fingerprints, rows read and quarantined), how
(method, parameters, selector, budget, seed, models), at what cost (per-stage statistics), the
verify table when one was run, and how to load it. A pure function of the manifest: the same
selection gives the same card.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from thresher.pipeline.artifacts import atomic_path

CARD = "README.md"


def size_category(n: int) -> str:
    for limit, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                         (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M")):
        if n < limit:
            return label
    return "n>10M"


def _front_matter(manifest: dict, data_files: str) -> str:
    fmt = manifest.get("format", "messages")
    meta = {
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": data_files}]}],
        "size_categories": [size_category(manifest["counts"]["selected"])],
        "tags": ["thresher", "data-selection", manifest["method"]],
        "task_categories": ["text-generation"],
        "pretty_name": manifest.get("name") or Path(manifest["output"]).name,
    }
    if fmt not in ("parquet", "hf"):
        meta["tags"].append(f"format-{fmt}")
    return "---\n" + yaml.safe_dump(meta, sort_keys=True, allow_unicode=True) + "---\n"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _cost(manifest: dict) -> str:
    stages = manifest.get("stages") or []
    if stages:
        rows = [[s.get("stage"), s.get("rows_in"), s.get("rows_out"), s.get("tokens"),
                 s.get("seconds"), s.get("device"),
                 f"{s['flops']:.3g}" if s.get("flops") else "", "yes" if s.get("cached") else "no"]
                for s in stages]
        return _table(["stage", "rows in", "rows out", "tokens", "seconds", "device", "FLOPs",
                       "cached"], rows)
    timings = manifest.get("timings") or {}
    return _table(["step", "seconds"], [[k, v] for k, v in timings.items()])


def _loading(manifest: dict, data_files: str) -> str:
    fmt = manifest.get("format", "messages")
    builder = "parquet" if fmt in ("parquet", "hf") else "json"
    return (
        "```python\nfrom datasets import load_dataset\n\n"
        f'ds = load_dataset("{builder}", data_files="{data_files}", split="train")\n'
        "# or, from this folder: load_dataset(\".\", split=\"train\")  (reads the configs above)\n"
        "```\n")


def render_card(manifest: dict, data_files: str, verify_md: str | None = None) -> str:
    c, tok = manifest["counts"], manifest.get("tokens", {})
    cfg = manifest.get("config", {})
    inputs = manifest.get("inputs", {})
    files = inputs.get("files", [])
    name = manifest.get("name") or Path(manifest["output"]).name
    parts = [
        _front_matter(manifest, data_files),
        f"# {name}\n",
        "## What this is\n",
        (f"{c['selected']} rows ({tok.get('selected', '?')} tokens, "
        f"{tok.get('selected_loss', '?')} of them response tokens) selected by **{manifest['method']}** "
        f"from {c.get('eligible', c['candidates'])} candidates under a budget of {manifest['budget']}, with thresher. "
        f"{manifest.get('summary', '')}\n"),
        f"Format: `{manifest.get('format')}` (see thresher's docs/formats.md).\n",
        "## Source data\n",
        (f"Pool `{inputs.get('pool')}` (fingerprint `{inputs.get('pool_fingerprint')}`): "
        f"{c['read']} rows read, {c['quarantined']} quarantined, {c.get('duplicate_ids', 0)} "
        "duplicate ids renamed.\n"),
        _table(["input file", "sha256"], [[f"`{f['path']}`", f"`{f['sha256'][:16]}…`"]
                                           for f in files]) + "\n" if files else "",
        "Selected rows by source:\n",
        _table(["source", "rows"], sorted((manifest.get("by_source") or {}).items())) + "\n",
        "## How it was selected\n",
        _table(["setting", "value"], [
            ["method", manifest["method"]], ["budget", manifest["budget"]],
            ["seed", manifest["seed"]],
            ["parameters", f"`{json.dumps(cfg, sort_keys=True, default=str)}`"],
            *[[f"model ({role})", f"`{ident}`"] for role, ident in
              sorted((manifest.get("models") or {}).items())],
        ]) + "\n",
        (f"Per-row reasons: `{Path(manifest.get('selection', '')).name}`; full manifest: "
        f"`{Path(manifest['output']).name}.manifest.json`.\n"),
        "## Cost\n",
        _cost(manifest) + "\n",
    ]
    if verify_md:
        parts += ["## Verification\n", verify_md.strip() + "\n"]
    parts += ["## Loading\n", _loading(manifest, data_files)]
    return "\n".join(p for p in parts if p)


def write_card(card_dir: Path | str, manifest: dict, data_files: str,
               verify_md: str | None = None) -> Path:
    """Write `card_dir/README.md` (atomically); `data_files` is relative to `card_dir`."""
    path = Path(card_dir) / CARD
    with atomic_path(path) as tmp:
        tmp.write_text(render_card(manifest, data_files, verify_md), encoding="utf-8")
    return path
