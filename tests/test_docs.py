"""The documentation: a short README whose links resolve, a docs site that builds with no broken
link or anchor (mkdocs --strict), and the Python API's worked example run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    assert links, "the README links to the docs"
    missing = [link for link in links if not (ROOT / link).exists()]
    assert not missing, missing


def test_docs_site_builds_strict(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                        "docs/mkdocs.yml", "-d", str(tmp_path / "site")],
                       cwd=ROOT, capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    pages = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {"index.html", "python-api/index.html", "architecture/index.html"} <= pages


def test_python_api_worked_example(tmp_path, monkeypatch, tiny_embedder, tiny_lm_dir):
    page = (ROOT / "docs" / "python-api.md").read_text()
    code = re.search(r"## A worked example.*?```python\n(.*?)```", page, re.DOTALL).group(1)
    code = (code.replace('"all-minilm-l6-v2"', repr(str(tiny_embedder)))
                .replace('"smollm2-135m-instruct"', repr(str(tiny_lm_dir)))
                .replace('OUT = "out/api"', f"OUT = {str(tmp_path / 'api')!r}"))
    assert str(tmp_path) in code and str(tiny_embedder) in code
    monkeypatch.chdir(ROOT)                    # the example's paths are the repository's
    exec(compile(code, "python-api.md", "exec"), {})  # noqa: S102 (our own docs)
    assert (tmp_path / "api" / "random.html").exists()
    assert (tmp_path / "api" / "dedup.parquet.manifest.json").exists()
