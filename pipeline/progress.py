"""One progress bar per stage, the same for every stage: its total in rows (or tokens) and an
ETA on stderr; silent when stderr is not a terminal (tqdm's `disable=None`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tqdm import tqdm


@contextlib.contextmanager
def stage_bar(stage: str, total: int, unit: str = "rows") -> Iterator[tqdm]:
    with tqdm(total=total, desc=stage, unit=f" {unit}", disable=None, leave=False,
              dynamic_ncols=True) as bar:
        yield bar
