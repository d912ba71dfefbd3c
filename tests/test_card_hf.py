"""Emitted subsets load unchanged with `datasets`; each gets a Hugging Face-shaped dataset card."""

import json

import pytest
import yaml
from thresher.pipeline.io.card import render_card, write_card
from thresher.pipeline.io.writers import HF_DATA
from thresher.pipeline.select import run_select

datasets = pytest.importorskip("datasets")   # in the dev extra, so `make test` always has it


def _front_matter(text):
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


@pytest.mark.parametrize("fmt, name, builder", [("messages", "sub.jsonl", "json"),
                                                ("sharegpt", "sub.jsonl", "json"),
                                                ("parquet", "sub.parquet", "parquet")])
def test_subset_files_load_with_datasets_and_cards_point_at_them(tmp_path, sample_pool, fmt,
                                                                 name, builder):
    folder = tmp_path / "subset"
    out = folder / name
    m = run_select(sample_pool.path, "random", "25", out, fmt=fmt, seed=3,
                   workdir=tmp_path / "work")
    card = write_card(folder, m, data_files=name)
    ds = datasets.load_dataset(builder, data_files=str(out), split="train",
                               cache_dir=str(tmp_path / "hf-cache"))
    chosen = [json.loads(line)["id"] for line in out.read_text().splitlines()] \
        if builder == "json" else run_ids(out)
    assert ds["id"] == chosen and len(ds) == 25
    if fmt == "messages":
        chat = [r for r in ds if r["messages"]]
        assert chat and all(t["role"] in ("system", "user", "assistant", "tool")
                            for r in chat for t in r["messages"])
    meta = _front_matter(card.read_text())
    assert meta["configs"][0]["data_files"] == [{"split": "train", "path": name}]
    assert meta["size_categories"] == ["n<1K"]
    # the card's own configs make the folder loadable as a dataset, reading only the subset
    again = datasets.load_dataset(str(folder), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert again["id"] == chosen


def run_ids(path):
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=["id"])["id"].to_pylist()


def test_hf_format_is_a_dataset_directory(tmp_path, sample_pool):
    out = tmp_path / "gsm-hf"
    m = run_select(sample_pool.path, "random", "12", out, fmt="hf", seed=1,
                   workdir=tmp_path / "work")
    assert (out / "README.md").read_text() == render_card(m, HF_DATA)   # the card, in the unit
    assert (out / HF_DATA).exists()
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert ds["id"] == run_ids(out / HF_DATA) and len(ds) == 12
    # a rerun replaces the directory it wrote, and refuses a folder it did not write
    run_select(sample_pool.path, "random", "5", out, fmt="hf", seed=1, workdir=tmp_path / "work")
    assert len(run_ids(out / HF_DATA)) == 5
    (tmp_path / "mine" / "data").mkdir(parents=True)
    (tmp_path / "mine" / HF_DATA).write_bytes((out / HF_DATA).read_bytes())  # no manifest beside
    with pytest.raises(ValueError, match="was not written by thresher"):
        run_select(sample_pool.path, "random", "5", tmp_path / "mine", fmt="hf",
                   workdir=tmp_path / "work")


def test_card_sections_say_what_from_what_how_and_cost():
    manifest = {
        "method": "rds", "summary": "RDS+ toward targets.", "budget": "64", "seed": 0,
        "format": "messages", "output": "/o/gsm8k/gsm8k.jsonl",
        "selection": "/o/gsm8k/gsm8k.jsonl.selection.parquet",
        "config": {"method": {"k": 5}}, "models": {"lm": "smollm2@abc"},
        "inputs": {"pool": "/o/pool", "pool_fingerprint": "f00",
                   "files": [{"path": "/d/a.jsonl", "sha256": "ab" * 32}]},
        "counts": {"read": 10, "quarantined": 1, "duplicate_ids": 0, "candidates": 9,
                   "selected": 4},
        "tokens": {"selected": 400, "selected_loss": 100},
        "by_source": {"gsm8k": 4},
        "stages": [{"stage": "forward", "rows_in": 9, "rows_out": 9, "tokens": 900,
                    "seconds": 1.5, "device": "cpu", "flops": 1.2e12, "cached": False}],
    }
    text = render_card(manifest, "gsm8k.jsonl", verify_md="| run | loss |\n|---|---|\n| rds | 1.0 |")
    for needle in ("# gsm8k.jsonl", "4 rows (400 tokens", "by **rds** from 9 candidates",
                   "/d/a.jsonl", "10 rows read, 1 quarantined", "| forward | 9 | 9 | 900 | 1.5 | cpu | 1.2e+12 | no |",
                   "## Verification", "| rds | 1.0 |", 'load_dataset("json", data_files="gsm8k.jsonl"',
                   "smollm2@abc"):
        assert needle in text, needle
    assert text == render_card(manifest, "gsm8k.jsonl", verify_md="| run | loss |\n|---|---|\n| rds | 1.0 |")
    assert "## Verification" not in render_card(manifest, "gsm8k.jsonl")
