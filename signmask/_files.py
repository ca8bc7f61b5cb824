"""Files the library writes: path checks, and atomic writes that behave like ``open()``.

Every file signmask writes (tickets, plots, the demo's results, benchmark tables) goes through
:func:`write_atomic`: a temp file in the target's folder, fsync, then ``os.replace``, so a reader
sees the old file or the new one, never a partial one (a device or a pipe is written into, as
``open()`` does). Errors name the user's path, never the temp file.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path


def check_path(path) -> str | os.PathLike:
    """Return ``path`` if it is a non-empty str or ``os.PathLike``; raise ``TypeError`` otherwise."""
    if not isinstance(path, (str, os.PathLike)) or path == "":
        raise TypeError(f"path must be a non-empty str or os.PathLike, got {type(path).__name__} {path!r}")
    return path


def check_file_path(path) -> Path:
    """``path`` as a ``Path`` to write a file to (:func:`check_path`'s ``TypeError``); raise
    ``ValueError`` if it names a folder: it ends in a separator, ``.`` or ``..``, which ``Path``
    would drop or keep (``"runs/"`` becomes ``"runs"``, and a file of that name would be written)."""
    text = os.fspath(check_path(path))
    if os.path.basename(text) in ("", ".", ".."):
        raise ValueError(f"path {text!r} names a folder, not a file; give the file's name too")
    return Path(text)


def make_folder(path: Path) -> None:
    """Create the missing folders above ``path``, a symlink's followed to those of its target
    (where :func:`write_atomic` writes); raise ``NotADirectoryError`` naming the one that is a
    file instead, and other ``OSError`` naming ``path``."""
    real = Path(os.path.realpath(path))
    blocking = next((p for p in real.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise NotADirectoryError(
            f"cannot create the folder {str(real.parent)!r} of path: {str(blocking)!r} is not a folder"
        )
    try:
        real.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _about(e, path, f"cannot create its folder {str(real.parent)!r}: ") from e


def _about(error: OSError, path: str | os.PathLike, context: str = "") -> OSError:
    """``error`` as the same error about the user's ``path``: a message naming our temp file
    would leave them guessing. One without an errno is not an OS report; it stays as it is."""
    if error.errno is None:
        return error
    return OSError(error.errno, context + (error.strerror or os.strerror(error.errno)), os.fspath(path))


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temp file in the same folder, fsync and ``os.replace``:
    readers see the old file or the new one, never a partial one. A symlink is followed, as
    ``open()`` would: its target is replaced and the link stays. A device or a pipe
    (``/dev/null``, a FIFO) is written into, as ``open()`` and ``torch.save`` do: a rename would
    put a regular file in its place.

    Raises:
        IsADirectoryError: ``path`` is a folder.
        PermissionError: ``path`` is a file this process may not write (read-only), which
            ``open()`` refuses too; it is left as it is. On a read-only file system, ``open()``'s
            own ``OSError`` (``EROFS``), the file left as it is too.
        OSError: the write failed; the message names ``path`` (not the temp file), and no file is
            left behind.
    """
    given = Path(path)
    try:
        found = given.stat()  # through symlinks, as open() goes; other errors name ``path``
    except FileNotFoundError:
        found = None  # a new file, or a dangling symlink's target
    if found is not None and stat.S_ISDIR(found.st_mode):  # os.replace would name the temp file
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(given))
    if found is not None and not stat.S_ISREG(found.st_mode):
        with open(given, "wb") as f:  # its errors name ``path``
            f.write(data)
        return given
    if found is not None:
        # open() refuses a file it may not write (read-only, on a read-only file system...),
        # where the rename needs the folder's permission only: opened for writing as open()
        # would (not truncated), it raises open()'s own error, naming ``path``.
        os.close(os.open(str(given), os.O_WRONLY | getattr(os, "O_BINARY", 0)))
    path = Path(os.path.realpath(given))
    try:
        _replace_with(path, data)
    except OSError as e:
        error = _about(e, given)
        if error is e:
            raise
        raise error from e
    return given


def _replace_with(path: Path, data: bytes) -> None:
    fd, tmp = _create_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:  # closes fd whatever fails below
            if path.exists():  # a replaced file keeps its permissions, as one opened for writing
                os.chmod(tmp, path.stat().st_mode & 0o7777)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _create_beside(path: Path) -> tuple[int, str]:
    """Create a new hidden temp file in ``path``'s folder, as ``open()`` creates files: mode
    0o666 less the umask, applied by the OS (``mkstemp`` makes 0600, and reading the umask means
    setting it, which another thread creating a file meanwhile would pick up)."""
    # The temp name stays within NAME_MAX (255 bytes) whatever the length of the file's own.
    stem = path.name.encode()[:100].decode(errors="ignore")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:  # 64 random bits: a name taken already is all but impossible, but harmless
        tmp = os.path.join(path.parent, f".{stem}.{secrets.token_hex(8)}.tmp")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
