"""Every file popproxy creates goes through here: exclusive, never through a symlink, 0600."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO

PRIVATE = 0o600  # anything holding mail, credentials or keys
PUBLIC = 0o644  # only for what is meant to be handed out (the CA certificate)

# O_EXCL makes the kernel refuse any existing name, a symlink (dangling or not) included;
# O_NOFOLLOW says the same again for systems where O_EXCL alone is weaker.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC
_DIRECTORY = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC
_TEMP_TRIES = 100


class Exists(FileExistsError):
    """The name is taken (by a file, a folder or a symlink) and was left alone."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(errno.EEXIST, "exists; not overwritten", os.fspath(path))


def create(path: str | os.PathLike[str], mode: int = PRIVATE) -> int:
    """Create ``path`` (it must not exist, not even as a symlink) with ``mode``; its fd."""
    try:
        fd = os.open(path, _CREATE, mode)
    except FileExistsError:
        raise Exists(path) from None
    _set_mode(fd, mode)
    return fd


def _set_mode(fd: int, mode: int) -> None:
    # The umask may have taken bits away from what was asked; put exactly ``mode`` back.
    with contextlib.suppress(OSError):
        os.fchmod(fd, mode)


class Folder:
    """An output folder opened once: files are made relative to its descriptor.

    So a folder swapped for a symlink halfway through an export cannot redirect the files
    that follow, and every name inside it is created with ``create``'s guarantees.
    """

    def __init__(self, path: str | os.PathLike[str], *, make: bool = True) -> None:
        self.path = Path(path)
        if make and not self.path.is_dir():
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fd = os.open(self.path, _DIRECTORY)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Folder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def taken(self, name: str) -> bool:
        """Whether ``name`` exists in the folder (a dangling symlink counts)."""
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def create(self, name: str, mode: int = PRIVATE) -> int:
        try:
            fd = os.open(name, _CREATE, mode, dir_fd=self.fd)
        except FileExistsError:
            raise Exists(self.path / name) from None
        _set_mode(fd, mode)
        return fd

    def temp(self, hint: str, mode: int = PRIVATE) -> tuple[int, str]:
        """A new hidden temp file (fd, name) whose name no one can guess in advance."""
        for _ in range(_TEMP_TRIES):
            name = f".{hint[:60]}.{secrets.token_hex(8)}.tmp"
            try:
                return self.create(name, mode), name
            except Exists:
                continue
        raise Exists(self.path / f".{hint}.*.tmp")

    def publish(self, temp: str, name: str, *, replace: bool = False) -> Path:
        """Give the finished ``temp`` its final ``name``, atomically.

        Without ``replace`` an existing ``name`` is never touched (``Exists``); with it,
        whatever is there is replaced by the new file (a symlink itself, never its target).
        """
        fd = self.fd
        if replace:
            os.replace(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
            return self.path / name
        try:
            # link() refuses an existing name atomically; rename() would replace it.
            os.link(temp, name, src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
        except FileExistsError:
            raise Exists(self.path / name) from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
                raise
            # A file system without hard links: check, then rename (a small race remains).
            if self.taken(name):
                raise Exists(self.path / name) from None
            os.rename(temp, name, src_dir_fd=fd, dst_dir_fd=fd)
            return self.path / name
        os.unlink(temp, dir_fd=fd)
        return self.path / name

    def discard(self, temp: str) -> None:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=self.fd)


@contextlib.contextmanager
def output_file(
    path: str | os.PathLike[str], *, replace: bool = False, mode: int = PRIVATE
) -> Iterator[IO[bytes]]:
    """A file written to a temp file beside ``path`` and published there when the block ends.

    An error inside the block leaves nothing behind; an existing ``path`` raises ``Exists``
    before any work is done (and again, race-free, at publication) unless ``replace``.
    """
    target = Path(path)
    with Folder(target.parent, make=False) as folder:
        if not replace and folder.taken(target.name):
            raise Exists(target)
        fd, temp = folder.temp(target.name, mode)
        try:
            with os.fdopen(fd, "wb", buffering=1 << 20) as f:
                yield f
            folder.publish(temp, target.name, replace=replace)
        except BaseException:
            folder.discard(temp)
            raise


def move_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Move ``src`` onto ``dst`` (replacing a file there, never writing through a symlink)."""
    try:
        os.replace(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    # Another file system: copy into a private temp file beside ``dst``, then rename.
    with output_file(dst, replace=True) as out, open(src, "rb") as f:
        while chunk := f.read(1 << 20):
            out.write(chunk)
    os.unlink(src)


def open_append(path: str | os.PathLike[str], mode: int = PRIVATE) -> int:
    """Open ``path`` to append to it: created with ``mode``, or an existing regular file of
    ours (tightened to ``mode``).  A symlink, a FIFO or someone else's file is refused."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW | _CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "is a symlink; not followed", os.fspath(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "is not a regular file", os.fspath(path))
        if st.st_uid != os.geteuid():
            raise OSError(errno.EPERM, "belongs to another user", os.fspath(path))
        if stat.S_IMODE(st.st_mode) & ~mode:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_lock(path: str | os.PathLike[str]) -> int:
    """A lock file shared between processes: created 0600 if missing, never a symlink."""
    flags = os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC
    return os.open(path, flags, PRIVATE)
