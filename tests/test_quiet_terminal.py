"""A normal `select --target` run (the target default, LESS, on the tiny model) in a subprocess,
as a user's terminal sees it: no library warning and no library progress bar on stderr; the
library warnings the run raised are in WORKDIR/thresher.log instead."""

import json
import os
import subprocess
import sys
import textwrap

# A library warning every run raises (standing in for torch's batching-rule notice and its
# kind), so the test can tell "routed to the log" from "never raised".
RUN = textwrap.dedent("""
    import warnings
    import thresher.pipeline.models.grads as grads
    real = grads.iter_grads
    def noisy(*args, **kwargs):
        warnings.warn_explicit("There is a performance drop because we have not yet implemented "
                               "the batching rule", UserWarning, "torch/_functorch/vmap.py", 1,
                               module="torch._functorch.vmap")
        yield from real(*args, **kwargs)
    grads.iter_grads = noisy
    from thresher.pipeline.cli import main
    main()
""")

LIBRARY_MARKS = ("Warning:", "warnings.warn", "Loading weights", "it/s]", "s/it]", "batching rule")


def _run(code: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=False,
                          env=env, timeout=600)


def test_select_target_default_keeps_library_warnings_off_the_terminal(dyn_pool, tiny_lm_dir,
                                                                       tmp_path):
    target = tmp_path / "t.jsonl"
    target.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"What is {i} + {i}?"},
        {"role": "assistant", "content": f"{i} + {i} = {2 * i}."}]}) + "\n" for i in range(3)))
    work = tmp_path / "w"
    args = ["select", str(dyn_pool.path), "--target", str(target), "--budget", "5",
            "--out", str(tmp_path / "o.jsonl"), "--workdir", str(work),
            "--param", f"model={tiny_lm_dir}", "--param", "d=32", "--param", "max_tokens=128",
            "--param", "proxy_min_rows=8", "--param", "proxy_batch_size=4"]
    env = {k: v for k, v in os.environ.items() if k != "THRESHER_LOG"}
    r = _run(RUN, args, env)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 5
    shown = [m for m in LIBRARY_MARKS if m in r.stderr]
    assert not shown, f"library output on the terminal: {shown}\n{r.stderr}"
    log = (work / "thresher.log").read_text()
    assert "py.warnings" in log and "batching rule" in log           # routed, not lost
    assert "INFO thresher." in log                                    # thresher's own progress

    # THRESHER_LOG=DEBUG shows everything on the terminal again (for debugging); a fresh work
    # directory, so the gradients (and their warning) run again
    args[args.index("--workdir") + 1] = str(tmp_path / "w2")
    r = _run(RUN, args, {**env, "THRESHER_LOG": "DEBUG"})
    assert r.returncode == 0 and "batching rule" in r.stderr


def test_configure_leaves_thresher_warnings_and_library_errors_on_the_terminal(capsys):
    import logging

    from thresher.pipeline import logs

    root = logging.getLogger()
    before = list(root.handlers), root.level
    try:
        logs.configure()
        logging.getLogger("thresher.x").warning("own warning")
        logging.getLogger("somelib").warning("library warning")
        logging.getLogger("somelib").error("library error")
        err = capsys.readouterr().err
        assert "own warning" in err and "library error" in err and "library warning" not in err
    finally:
        for h in root.handlers[:]:
            if h not in before[0]:
                root.removeHandler(h)
        root.setLevel(before[1])
        logging.captureWarnings(False)
        logs._configured = False


def test_a_log_file_that_cannot_be_written_is_dropped_without_a_traceback(tmp_path, capsys):
    import logging

    from thresher.pipeline import logs

    root = logging.getLogger()
    before = list(root.handlers), root.level
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    try:
        logs.configure()
        path = logs.log_to(blocker / "work")          # its directory can never be made

        def ours():
            return [h for h in root.handlers if getattr(h, "_thresher", "") == "file"
                    and h.baseFilename == str(path)]

        assert path is not None and len(ours()) == 1
        logging.getLogger("thresher.x").info("a unit done")
        err = capsys.readouterr().err
        assert "Logging error" not in err and "Traceback" not in err
        assert ours() == []
        logging.getLogger("thresher.x").warning("still shown")
        assert "still shown" in capsys.readouterr().err
    finally:
        for h in root.handlers[:]:
            if h not in before[0]:
                root.removeHandler(h)
        root.setLevel(before[1])
        logging.captureWarnings(False)
        logs._configured = False
