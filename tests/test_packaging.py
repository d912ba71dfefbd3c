"""`thresher.selectors` maps to the project folder while `import selectors` stays the stdlib."""

import subprocess
import sys

from conftest import ROOT


def _run(code: str, cwd) -> str:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def test_stdlib_selectors_from_root_and_tests():
    for cwd in (ROOT, ROOT / "tests"):
        out = _run("import selectors, asyncio; print(selectors.__file__); print(hasattr(selectors, 'DefaultSelector'))", cwd)
        path, has_default = out.splitlines()
        assert str(ROOT) not in path
        assert has_default == "True"


def test_thresher_namespace_maps_the_folders():
    out = _run("import thresher.selectors.random_sample as r, thresher.pipeline.cli as c, "
               "thresher.scoring.random_baseline as s; print(r.__file__); print(c.__file__); print(s.__file__)", ROOT / "tests")
    files = out.splitlines()
    assert files[0] == str(ROOT / "selectors" / "random_sample.py")
    assert files[1] == str(ROOT / "pipeline" / "cli.py")
    assert files[2] == str(ROOT / "scoring" / "random_baseline.py")


def test_no_init_in_selectors_folder():
    assert not (ROOT / "selectors" / "__init__.py").exists()
