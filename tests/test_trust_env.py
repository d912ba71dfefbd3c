"""Every environment failure is one `error:` line, exit 2, naming the file or setting: a bad
THRESHER_LOG, no Prefect server, a full disk or a file-size limit (also when a library dropped
the errno), a damaged cache file; and what is checked before work: targets, models, outputs."""

import errno
import json
import os
import resource
import subprocess
import sys

import numpy as np
import pytest
from conftest import run_cli
from thresher.pipeline import cli
from thresher.pipeline.io.guard import write_error


def rows(n, start=0):
    return "".join(json.dumps({"id": f"r{i}", "messages": [
        {"role": "user", "content": f"question number {i} about topic {i % 3}"},
        {"role": "assistant", "content": f"answer {i}"}]}) + "\n" for i in range(start, start + n))


def one_line(code, err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("value", ["BOGUS", "verbose", "7x"])
def test_a_bad_log_level_is_one_line(monkeypatch, capsys, value):
    monkeypatch.setenv("THRESHER_LOG", value)
    line = one_line(*run_cli(monkeypatch, capsys, ["methods"])[::2])
    assert f"THRESHER_LOG={value!r}: unknown log level" in line


def test_a_good_log_level_in_any_case_works(monkeypatch, capsys):
    monkeypatch.setenv("THRESHER_LOG", "info")
    code, out, _ = run_cli(monkeypatch, capsys, ["methods"])
    assert code == 0 and "random" in out


def test_no_prefect_server_is_one_line():
    from thresher.flows.recipe_flow import check_server

    with pytest.raises(ValueError, match=r"^PREFECT_API_URL=http://127.0.0.1:9/api: no Prefect "
                                         r"server answers \(.*\); start one with"):
        check_server("http://127.0.0.1:9/api", timeout=2)
    with pytest.raises(ValueError, match="no Prefect server answers"):
        check_server("not a url")


# ------------------------------------------------------------------ full disk, size limits

def test_a_write_error_without_errno_is_diagnosed_and_named(tmp_path, monkeypatch):
    numpy_style = OSError("11520 requested and 8128 written")
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 10, 0, 0, 10, 0,
                                                                     0, 0, 255)))
    named = write_error(numpy_style, tmp_path / "x.npy")
    assert named.errno == errno.ENOSPC and named.filename == str(tmp_path / "x.npy")
    assert cli.user_error_message(named) == f"{tmp_path / 'x.npy'}: No space left on device"
    bare = OSError(errno.EFBIG, "File too large")
    assert write_error(bare, tmp_path / "y").filename == str(tmp_path / "y")
    named_already = OSError(errno.ENOSPC, "No space left on device", "/else/where")
    assert write_error(named_already, tmp_path / "z") is named_already
    not_the_machine = OSError(errno.ENOENT, "gone")
    assert write_error(not_the_machine, tmp_path) is not_the_machine


def test_cache_writes_are_named_when_the_disk_is_full(tmp_path, monkeypatch, capsys):
    """numpy's tofile drops the errno ("N requested and M written"); the failure names the
    cache file it was writing."""
    from thresher.pipeline.io.ingest import ingest

    (tmp_path / "in.jsonl").write_text(rows(6))
    ingest([tmp_path / "in.jsonl"], tmp_path / "pool")

    def full(arr, fp, *a, **k):
        raise OSError("11520 requested and 8128 written")

    monkeypatch.setattr(np.lib.format, "write_array", lambda fp, arr, *a, **k: full(arr, fp))
    monkeypatch.setattr(os, "statvfs", lambda p: os.statvfs_result((4096, 4096, 10, 0, 0, 10, 0,
                                                                     0, 0, 255)))
    from thresher.pipeline.stage import ShardResult, Unit, write_unit

    class Run:
        def unit_prefix(self, unit):
            return tmp_path / "w" / "embed" / "k" / "units" / unit.key

    (tmp_path / "w" / "embed" / "k" / "units").mkdir(parents=True)
    with pytest.raises(OSError) as e:
        write_unit(Run(), Unit("abc"), ShardResult({"vectors": np.zeros((3, 2))}), 0.0)
    assert e.value.errno == errno.ENOSPC
    assert e.value.filename == str(tmp_path / "w" / "embed" / "k" / "units" / "abc.vectors.npy")
    assert not list((tmp_path / "w" / "embed" / "k" / "units").iterdir())   # no temporary left


def test_a_mapping_reserves_its_blocks_before_writing(tmp_path, monkeypatch):
    """Writing a sparse mapping on a full disk is SIGBUS (the process dies, no message);
    reserving the blocks first turns it into an OSError naming the file."""
    from thresher.pipeline.io.memmap import reserved_memmap

    out = reserved_memmap(tmp_path / "ok.npy", np.float16, (10, 4))
    assert out.shape == (10, 4) and os.stat(tmp_path / "ok.npy").st_blocks > 0

    def no_room(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(OSError) as e:
        reserved_memmap(tmp_path / "big.npy", np.float16, (1000, 64))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "big.npy")


def _limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 * 1024, resource.RLIM_INFINITY))


def test_a_file_size_limit_is_one_line_naming_the_output(tmp_path):
    """`ulimit -f`: Python ignores SIGXFSZ, so each write fails with EFBIG (pyarrow and the
    spill file used to end in a traceback)."""
    (tmp_path / "in.jsonl").write_text(rows(2000))
    r = subprocess.run([sys.executable, "-m", "thresher.pipeline.cli", "ingest",
                        str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "pool")],
                       capture_output=True, text=True, preexec_fn=_limit_file_size, timeout=120,
                       check=False)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"error: {tmp_path / 'pool'}: File too large"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]     # no temporary left


# ------------------------------------------------------------------ damaged cache files

@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_embedder):
    """A pool and a semdedup selection whose embeddings and k-means are cached."""
    from thresher.pipeline.io.ingest import ingest
    from thresher.pipeline.select import run_select

    d = tmp_path_factory.mktemp("cache")
    (d / "in.jsonl").write_text(rows(24))
    ingest([d / "in.jsonl"], d / "pool", rows_per_shard=8)
    params = {"embedder": tiny_embedder, "k": 2, "eps": 0.01}
    run_select(d / "pool", "semdedup", "50%", d / "o.jsonl", params=params)
    return d, params


def _damage(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


DAMAGE = [("embed/*/embeddings.npy", False), ("embed/*/units/*.vectors.npy", True),
          ("embed/*/_COMPLETE.json", False), ("kmeans/*/labels.npy", False)]


@pytest.mark.parametrize("pattern, reassemble", DAMAGE, ids=[p for p, _ in DAMAGE])
def test_a_damaged_cache_file_is_named_with_the_way_out(cached, monkeypatch, capsys, pattern,
                                                        reassemble):
    d, params = cached
    work = d / ".thresher-work"
    target = min(work.glob(pattern))
    marker = next(work.glob("embed/*/_COMPLETE.json"))
    done = marker.read_bytes()
    data = _damage(target)
    if reassemble:
        marker.unlink()          # the shard files are read again to assemble the matrix
    try:
        args = ["select", str(d / "pool"), "--method", "semdedup", "--budget", "50%", "--out",
                str(d / "o2.jsonl"), *[a for k, v in params.items() for a in ("--param", f"{k}={v}")]]
        line = one_line(*run_cli(monkeypatch, capsys, args)[::2])
        assert line.startswith(f"error: {target}: damaged cache file of the {pattern.split('/')[0]}"
                               " stage (")
        assert f"delete {work / pattern.split('/')[0]} to clear that stage's cache" in line
        assert not (d / "o2.jsonl").exists()
    finally:
        target.write_bytes(data)
        marker.write_bytes(done)


def test_a_cache_file_holding_pickles_is_named_not_loaded(cached, monkeypatch, capsys):
    d, params = cached
    target = next((d / ".thresher-work").glob("embed/*/embeddings.npy"))
    data = target.read_bytes()
    np.save(target, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    try:
        args = ["select", str(d / "pool"), "--method", "semdedup", "--budget", "50%", "--out",
                str(d / "o3.jsonl"), *[a for k, v in params.items() for a in ("--param", f"{k}={v}")]]
        line = one_line(*run_cli(monkeypatch, capsys, args)[::2])
        assert f"{target}: damaged cache file" in line and "pickled objects" in line
    finally:
        target.write_bytes(data)


# ------------------------------------------------------------------ fail before work

@pytest.fixture
def small(tmp_path):
    from thresher.pipeline.io.ingest import ingest

    (tmp_path / "in.jsonl").write_text(rows(6))
    ingest([tmp_path / "in.jsonl"], tmp_path / "pool")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bad.jsonl").write_text('{"messages": "no list"}\n{bad json\n')
    (tmp_path / "tdir").mkdir()
    return tmp_path


BEFORE_WORK = [
    (["--target", "{d}/missing.jsonl"], "--target {d}/missing.jsonl: no such file"),
    (["--target", "{d}/empty.jsonl"], "--target {d}/empty.jsonl: no usable rows (the file is empty)"),
    (["--target", "{d}/bad.jsonl"], ("--target {d}/bad.jsonl: no usable rows (2 unusable, e.g. "
                                     "line 1: 'messages' is a string that is not JSON")),
    (["--target", "{d}/tdir"], "--target {d}/tdir: is a directory; give a file"),
    (["--target", "{d}/in.jsonl", "--param", "model=no-such-model-x"], "unknown model 'no-such-model-x'"),
]


@pytest.mark.parametrize("dry", [False, True], ids=["run", "dry-run"])
@pytest.mark.parametrize("extra, message", BEFORE_WORK, ids=[m.split(":")[0] for _, m in BEFORE_WORK])
def test_targets_and_models_are_checked_before_any_stage(small, monkeypatch, capsys, extra,
                                                         message, dry):
    from thresher.pipeline import plan

    monkeypatch.setattr(plan.Plan, "run", lambda *a: pytest.fail("a stage ran"))
    args = ["select", str(small / "pool"), "--method", "rds", "--budget", "3", "--out",
            str(small / "o.jsonl"), *[a.format(d=small) for a in extra]]
    line = one_line(*run_cli(monkeypatch, capsys, args + (["--dry-run"] if dry else []))[::2])
    assert message.format(d=small) in line
    assert not (small / ".thresher-work").exists() and not (small / "o.jsonl").exists()


def test_a_read_only_output_disk_is_one_line_and_the_inputs_are_untouched(tmp_path, monkeypatch,
                                                                          capsys):
    """Every write under RO/ fails as a read-only file system does (EROFS at open and mkdir;
    file modes cannot stand in for it: the suite may run as root)."""
    import builtins

    from thresher.pipeline.io.ingest import ingest

    (tmp_path / "in.jsonl").write_text(rows(6))
    ingest([tmp_path / "in.jsonl"], tmp_path / "pool")
    ro = tmp_path / "ro"
    ro.mkdir()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def refuse(path):
        if str(os.fspath(path)).startswith(str(ro)):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def ro_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *a, **k)

    def ro_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def ro_mkdir(path, *a, **k):
        refuse(path)
        return real_mkdir(path, *a, **k)

    monkeypatch.setattr(builtins, "open", ro_open)
    monkeypatch.setattr(os, "open", ro_os_open)
    monkeypatch.setattr(os, "mkdir", ro_mkdir)
    code, _, err = run_cli(monkeypatch, capsys, [
        "select", str(tmp_path / "pool"), "--method", "random", "--budget", "3",
        "--out", str(ro / "subset.jsonl"), "--workdir", str(tmp_path / "work")])
    line = one_line(code, err)
    assert str(ro) in line and "read-only" in line.lower(), line
    assert list(ro.iterdir()) == []
    assert {p: p.read_bytes() for p in before} == before       # the pool and input unchanged
