"""Progress of long jobs: a caller's callback, or a bar (tqdm when installed, else a line on stderr)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def reporter(progress, total: int, initial: int = 0, desc: str = "embedding"
             ) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """(report(newly_done, total), finish()) for embed()'s and classify()'s `progress` argument (and the CLI's
    bar, which starts at `initial` when it resumes); `desc` names the work on the bar."""
    if progress is None or progress is False:
        return (lambda done, n: None), (lambda: None)
    if callable(progress):
        state = {"done": initial}

        def forward(done: int, n: int) -> None:
            state["done"] += done
            progress(state["done"], n)

        return forward, (lambda: None)
    try:
        from tqdm import tqdm
    except ImportError:
        return _plain(total, initial, desc)
    bar = tqdm(total=total, initial=initial, unit="input", desc=desc)
    return (lambda done, n: bar.update(done)), bar.close


def _plain(total: int, initial: int, desc: str):
    state = {"done": initial, "shown": 0.0}

    def update(done: int, n: int) -> None:
        state["done"] += done
        now = time.monotonic()
        if now - state["shown"] >= 1 or state["done"] == total:
            state["shown"] = now
            print(f"\r{desc}: {state['done']}/{total}", end="", file=sys.stderr, flush=True)

    return update, (lambda: print(file=sys.stderr) if total else None)
