"""File permissions of what cpo_jax writes: the process's umask, as for any ordinary file.

Writers that stage a directory or a file and rename it into place use :mod:`tempfile` (``mkdtemp``: 0700, ``mkstemp``:
0600), and safetensors writes its files 0600. Left as they are, an exported model on a shared machine would be
readable by its owner only. :func:`apply_umask` gives each written file ``0666 & ~umask`` and each directory
``0777 & ~umask``, the modes ``open()`` and ``mkdir()`` would have given them.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (a file, or a directory and everything under it) the modes the umask implies."""
    mask = current_umask()
    path = Path(path)
    if path.is_file():
        path.chmod(0o666 & ~mask)
        return
    path.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            Path(root, name).chmod(0o777 & ~mask)
        for name in files:
            Path(root, name).chmod(0o666 & ~mask)
