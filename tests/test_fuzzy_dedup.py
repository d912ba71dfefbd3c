"""Fuzzy dedup: the compiled kernels against plain-Python restatements of DataTrove's code, LSH
banding against brute force, clusters and keep rules on a planted pool, hostile inputs."""

from __future__ import annotations

import json
import re
import unicodedata

import numpy as np
import polars as pl
import pytest
import regex
import spacy
import xxhash
from thresher.pipeline.artifacts import ArtifactStore
from thresher.pipeline.io.ingest import ingest
from thresher.pipeline.io.pool import Pool
from thresher.pipeline.plan import run_stage
from thresher.pipeline.select import run_select
from thresher.pipeline.stages import ngram_kernels as K
from thresher.pipeline.stages.lsh import MinHashClusters, band_edges, union_find
from thresher.pipeline.stages.minhash import MinHashSignatures, permutations, sign_texts
from thresher.pipeline.stages.textnorm import PUNCTUATION, SPLITS, normalise

# -- plain-Python restatements of DataTrove's MinHash path (utils/text.py, dedup/minhash.py) ---

_NUM = regex.compile(r"\p{Nd}+([.,،٫⎖⎗⎘]{1}\p{Nd}+)?")
_TRANS = str.maketrans(PUNCTUATION, " " * len(PUNCTUATION))
_SPACY = spacy.blank("en").tokenizer        # DataTrove's English word tokenizer (SpaCyTokenizer)


def simplify_text(text: str) -> str:
    text = _NUM.sub("0", text.lower()).translate(_TRANS)
    text = re.sub(r"\s+", " ", text.strip())
    text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
    return text.strip()


def reference_signature(text: str, n_gram=5, n_hash=112, seed=1) -> np.ndarray | None:
    words = [t.text.strip() for t in _SPACY(simplify_text(text)) if t.text.strip()]
    grams = [" ".join(words[i:i + n_gram]) for i in range(len(words) - n_gram + 1)]
    if not grams:
        return None
    x = np.array([xxhash.xxh64_intdigest(g.encode()) for g in grams], np.uint64).reshape(-1, 1)
    a, b = permutations(n_hash, seed)
    return ((x * a + b) % np.uint64((1 << 61) - 1)).min(axis=0)


def _vocab(n: int) -> list[str]:
    """n distinct lowercase words (digits would all normalise to 0)."""
    return ["".join(chr(97 + (i // 26 ** k) % 26) for k in range(4)) for i in range(n)]


TRICKY = [
    "Hello, World! It's 3.14 o'clock; 1,000,000 people, 1.2.3 and ١٢٣٫٤ ok",
    "ΟΔΟΣ ΚΑΙ ΣΑΣ σας Σ", "İstanbul İİ", "a ́ b", "́ leading mark", "Straße ﬁne ＡＢＣ",
    "tabs\tand\nnew\r\nlines\x00\x1f and \x85 nel \u00a0 nbsp", "I cannot say, dont ask. Gonna go",
    "中文测试文本，这是一个句子。", "한국어 텍스트", "emoji 😀😀 ★★ ‘quoted’ £10m 5km",
    "", "   ", "!!!!", "x" * 1000, "Prices: £10m, €5bn or 3$; it is 20°C, 5km away, 3kg ‘ok’ ®™ wmp3g",
]


def test_xxh64_kernel_matches_xxhash():
    rng = np.random.default_rng(0)
    for n in [0, 1, 3, 4, 7, 8, 9, 31, 32, 33, 64, 100, 1001]:
        data = rng.integers(0, 256, n, dtype=np.uint8)
        assert int(K.xxh64(data, 0, n)) == xxhash.xxh64_intdigest(data.tobytes()), n


def test_normalise_is_datatrove_simplify_text():
    assert normalise(TRICKY, cjk_chars=False) == [simplify_text(t) for t in TRICKY]
    assert normalise(["ΟΔΟΣ"])[0] == "οδος"            # Python's final sigma
    assert normalise(["中文测试，这是"])[0] == "中 文 测 试 这 是"   # CJK: character tokens
    assert normalise(["中文 and many more english words here"])[0] == \
        "中文 and many more english words here"       # under 30% CJK: words


def test_contraction_table_is_spacys():
    """SPLITS holds exactly the lowercase alphabetic special cases of spaCy's English tokenizer
    that it splits (the kernels apply them without calling spaCy)."""
    rules = {k: [t[65] for t in v] for k, v in _SPACY.rules.items()
             if re.fullmatch(r"[a-z]+", k) and len(v) > 1}
    assert {k: "|".join(v) for k, v in rules.items()} == {e.replace("|", ""): e for e in SPLITS}


def test_signatures_are_datatrove_signatures():
    texts = [t for t in TRICKY if len(simplify_text(t).split()) >= 5] + [
        "the quick brown fox jumps over the lazy dog " * 3, "We cannot stop; we gotta go now, ok?"]
    sig, _, _ = sign_texts(texts, MinHashSignatures(cjk_chars=False))
    for i, text in enumerate(texts):
        ref = reference_signature(text)
        assert ref is not None and np.array_equal(sig[i], ref), text
    short, n_short, _ = sign_texts(["two words", ""], MinHashSignatures())
    assert (short == K.EMPTY).all() and n_short.tolist() == [2, 0]
    # other bands x rows and seeds follow the same draw
    sig2, _, _ = sign_texts(texts[-1:], MinHashSignatures(bands=20, rows=13, seed=7, cjk_chars=False))
    assert np.array_equal(sig2[0], reference_signature(texts[-1], n_hash=260, seed=7))


def test_threads_do_not_change_signatures():
    texts = [f"document {i} " + "some shared words here and there " * (i % 7 + 1) for i in range(300)]
    one = sign_texts(texts, MinHashSignatures(), threads=1)
    two = sign_texts(texts, MinHashSignatures(), threads=2)
    assert all(np.array_equal(x, y) for x, y in zip(one, two))


def test_estimated_jaccard_tracks_exact_jaccard():
    rng = np.random.default_rng(1)
    words = _vocab(5000)
    base = [words[i] for i in rng.integers(0, 5000, 600)]
    for e in (0.02, 0.05, 0.1, 0.2):
        copy = [w if rng.random() > e else "x" + w for w in base]
        sa = {" ".join(base[i:i + 5]) for i in range(len(base) - 4)}
        sb = {" ".join(copy[i:i + 5]) for i in range(len(copy) - 4)}
        exact = len(sa & sb) / len(sa | sb)
        sig, _, _ = sign_texts([" ".join(base), " ".join(copy)], MinHashSignatures())
        est = (sig[0] == sig[1]).mean()
        assert abs(est - exact) < 0.12, (e, est, exact)   # 112 hashes: sd <= 0.05


def _pool(tmp_path, rows, per_shard=40):
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ingest([tmp_path / "in.jsonl"], tmp_path / "pool", rows_per_shard=per_shard)
    return Pool(tmp_path / "pool")


def _doc(rng, vocab, n=300):
    return " ".join(vocab[i] for i in rng.integers(0, len(vocab), n))


def _planted(tmp_path):
    """60 unrelated documents; d1 and d2 copy d0 with 0.5% and 1.2% of words changed (J ~0.95, 0.89);
    d3 copies d0 with 40% changed (J ~0.05); short rows s0/s1 equal after normalisation; a row
    of punctuation only; each document gets a `quality` field."""
    rng = np.random.default_rng(0)
    vocab = _vocab(3000)
    docs = [_doc(rng, vocab) for _ in range(60)]

    def mutate(text, e):
        return " ".join(w if rng.random() > e else "zz" + w for w in text.split())

    rows = [{"id": f"u{i}", "text": t, "quality": i % 5} for i, t in enumerate(docs)]
    rows += [{"id": "d1", "text": mutate(docs[0], 0.005) + " and a longer tail", "quality": 9},
             {"id": "d2", "text": mutate(docs[0], 0.012), "quality": 1},
             {"id": "d3", "text": mutate(docs[0], 0.4), "quality": 1},
             {"id": "s0", "text": "Short row!"}, {"id": "s1", "text": "short   ROW"},
             {"id": "p", "text": "?!?! ... ---"}]
    return _pool(tmp_path, rows)


def test_band_edges_equal_brute_force(tmp_path):
    pool = _planted(tmp_path)
    store = ArtifactStore(tmp_path / "w")
    stage = MinHashSignatures()
    sigs = run_stage(stage, pool, store)
    n_tokens = np.concatenate([np.load(f) for f in sigs.files("n_tokens.npy")])
    for band in (0, 5, 13):
        got = {tuple(e) for e in band_edges(sigs, band).tolist()}
        keys = np.concatenate([np.load(f)[band] for f in sigs.files("keys.npy")])
        want = set()
        for key in set(keys[n_tokens >= 5].tolist()):
            members = sorted(np.flatnonzero((keys == key) & (n_tokens >= 5)).tolist())
            want |= {(members[0], m) for m in members[1:]}
        assert got == want


def test_union_find_roots_are_lowest_rows():
    root = union_find(7, np.array([5, 3, 6, 1]), np.array([3, 1, 4, 0]))
    assert root.tolist() == [0, 0, 2, 0, 4, 0, 4]


def test_clusters_and_keep_rules(tmp_path):
    pool = _planted(tmp_path)
    clusters = run_stage(MinHashClusters(), pool, ArtifactStore(tmp_path / "w"))
    f = clusters.frame().to_pandas().set_index("id")
    assert f.loc["d1", "dup_cluster_id"] == "u0" and f.loc["d2", "dup_cluster_id"] == "u0"
    assert f.loc["u0", "dup_cluster_size"] == 3
    assert f.loc["d3", "dup_cluster_size"] == 1                 # J ~0.05: not a duplicate
    assert (f.loc[[f"u{i}" for i in range(1, 60)], "dup_cluster_size"] == 1).all()
    assert f.loc["s1", "dup_cluster_id"] == "s0" and f.loc["s1", "dup_check"] == "exact"
    assert f.loc["p", "dup_check"] == "none" and f.loc["p", "dup_cluster_size"] == 1
    pairs = clusters.pairs()
    assert {("u0", "d1"), ("u0", "d2")} <= set(zip(pairs["id_a"], pairs["id_b"]))
    assert (pairs["jaccard"] >= 0.7).all()

    kept = {}
    for rule in ("first", "longest", "quality"):
        out = tmp_path / f"{rule}.jsonl"
        m = run_select(pool.path, "fuzzy-dedup", "100%", out, workdir=tmp_path / "w",
                       params={"keep": rule})
        sel = pl.read_parquet(f"{out}.selection.parquet")
        kept[rule] = set(sel["id"]) & {"u0", "d1", "d2"}
        assert m["counts"]["selected"] == pool.n_rows - 3        # d1/d2 or u0..., and s1
        assert m["config"]["method"]["removed"] == 3
    assert kept == {"first": {"u0"}, "longest": {"d1"}, "quality": {"d1"}}
    scores = pl.read_parquet(m["scores"]).filter(~pl.col("keep"))
    assert set(scores["id"]) == {"u0", "d2", "s1"}
    assert scores.filter(pl.col("id") == "u0")["reason"][0] == \
        "near-duplicate of d1 (cluster of 3, keep=quality)"
    with pytest.raises(ValueError, match="no row has a field 'nope'"):
        run_select(pool.path, "fuzzy-dedup", "100%", tmp_path / "x.jsonl", workdir=tmp_path / "w",
                   params={"keep": "nope"})
    with pytest.raises(ValueError, match="bands must be a positive integer"):
        run_select(pool.path, "fuzzy-dedup", "100%", tmp_path / "x.jsonl", params={"bands": "0"})


def test_the_check_stops_chains(tmp_path):
    """M is half of A and half of B (J ~0.33 with each). With loose bands (56 x 2, every such
    pair a candidate) and no check, A-M-B is one cluster of unrelated A and B; the 0.7 check
    keeps all three apart."""
    rng = np.random.default_rng(5)
    vocab = _vocab(3000)
    a, b = _doc(rng, vocab).split(), _doc(rng, vocab).split()
    rows = [{"id": "A", "text": " ".join(a)}, {"id": "M", "text": " ".join(a[:150] + b[150:])},
            {"id": "B", "text": " ".join(b)}]
    pool = _pool(tmp_path, rows)
    store = ArtifactStore(tmp_path / "w")
    sigs = MinHashSignatures(bands=56, rows=2)
    loose = run_stage(MinHashClusters(signatures=sigs, threshold=0.0), pool, store)
    strict = run_stage(MinHashClusters(signatures=sigs, threshold=0.7), pool, store)
    assert loose.frame()["dup_cluster_size"].to_list() == [3, 3, 3]
    assert strict.frame()["dup_cluster_size"].to_list() == [1, 1, 1]
    assert strict.dir.info()["pairs_rejected"] == strict.dir.info()["candidate_pairs"] == 2


def test_hostile_inputs_get_annotations(tmp_path):
    rng = np.random.default_rng(3)
    vocab = _vocab(26 ** 4)
    big = " ".join(vocab[i] for i in rng.integers(0, len(vocab), 2_100_000))     # ~10 MB
    rows = [{"id": "big", "text": big}, {"id": "big2", "text": big + " tail words here now"},
            {"id": "one", "text": "a" * 100_000},
            {"id": "junk", "text": bytes(rng.integers(0, 256, 5000, dtype=np.uint8)).decode("latin-1")},
            {"id": "mixed", "text": "Hello мир 世界 مرحبا 123 こんにちは " * 20},
            {"id": "ws", "text": " \n\t "}, {"id": "empty", "text": ""}]
    assert len(big) > 10_000_000
    pool = _pool(tmp_path, rows)
    assert pool.n_rows == 5 and pool.info["quarantined"] == 2   # whitespace and empty: counted
    out = tmp_path / "o.jsonl"
    m = run_select(pool.path, "fuzzy-dedup", "100%", out, workdir=tmp_path / "w")
    scores = pl.read_parquet(m["scores"]).to_pandas().set_index("id")
    assert len(scores) == 5
    assert scores.loc["big2", "dup_cluster_id"] == "big"
    assert scores.loc["one", "dup_check"] == "exact"            # one token
    assert set(scores["dup_check"]) <= {"minhash", "exact", "none"}
    assert m["counts"]["selected"] + m["config"]["method"]["removed"] == pool.n_rows


def test_signatures_resume_per_shard_and_bands_per_file(tmp_path):
    """A run that lost one shard's signatures (killed) recomputes that shard alone; the
    clusters stage keeps no band files once complete."""
    pool = _planted(tmp_path)
    assert len(pool.shards) >= 2
    kw = {"workdir": tmp_path / "w"}
    first = run_select(pool.path, "fuzzy-dedup", "100%", tmp_path / "a.jsonl", **kw)
    sigs = next(s for s in first["stages"] if s["stage"] == "minhash")
    assert sigs["units_computed"] == len(pool.shards)
    next((tmp_path / "w" / "minhash").glob("*/units/*.done.json")).unlink()
    for done in (tmp_path / "w").glob("minhash*/*/_COMPLETE.json"):     # as if killed
        done.unlink()
    again = run_select(pool.path, "fuzzy-dedup", "100%", tmp_path / "b.jsonl", **kw)
    redo = next(s for s in again["stages"] if s["stage"] == "minhash")
    assert redo["units_computed"] == 1 and redo["units_cached"] == len(pool.shards) - 1
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    assert not list((tmp_path / "w" / "minhash_clusters").glob("*/band_*.npy"))
