"""What a run is doing, stage by stage, with the time each stage took.

The ``cpo_jax.stages`` logger says when a slow stage starts and how long it took (model load, reference pass,
evaluation, generation, export), so that the minutes before the first step are not silent. The CLI shows it at
INFO on stderr; a library caller sees it when it configures logging.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

log = logging.getLogger("cpo_jax.stages")


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Log ``what ...`` on entry and ``what: N.N s`` when the block finishes (nothing more if it raises)."""
    log.info("%s ...", what)
    start = time.perf_counter()
    yield
    log.info("%s: %.1f s", what, time.perf_counter() - start)


def say(message: str, *args) -> None:
    """One line on the stages logger (e.g. "resuming from step 10 of 20")."""
    log.info(message, *args)
