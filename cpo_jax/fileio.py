"""File permissions of what cpo_jax writes: the process's umask, as for any ordinary file.

Writers that stage a directory or a file and rename it into place use :mod:`tempfile` (``mkdtemp``: 0700, ``mkstemp``:
0600), and safetensors writes its files 0600. Left as they are, an exported model on a shared machine would be
readable by its owner only. :func:`apply_umask` gives each written file ``0666 & ~umask`` and each directory
``0777 & ~umask``, the modes ``open()`` and ``mkdir()`` would have given them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
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


def assemble_directory(dst: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Build the directory ``dst`` in a temporary sibling with ``write(tmp)``, give it the umask's modes, and move it
    into place once complete (replacing an existing ``dst``), so a crash never leaves a half-written ``dst``."""
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        write(tmp)
        apply_umask(tmp)  # mkdtemp made it 0700 (and safetensors writes its files 0600)
        if dst.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
            os.replace(dst, old / dst.name)
            os.replace(tmp, dst)
            shutil.rmtree(old)
        else:
            os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
