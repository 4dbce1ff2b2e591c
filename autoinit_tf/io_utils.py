"""Safe file publishing: never the input, never over an existing name unless asked, nothing half-written.

* :func:`same_or_inside` compares real paths (symbolic links resolved), so a link to the input, or
  a path through a linked directory, is recognised as the input.
* Outputs are written to a temporary name beside the target, ``.tmp-autoinit-<pid>-*``, then
  published by :func:`publish`: without ``overwrite`` by an operation that fails when the name
  exists (``os.link`` for a file, ``os.mkdir`` + rename for a directory), so of two concurrent
  writers exactly one wins; with ``overwrite`` by ``os.replace``.
* :func:`clean_stale_temps` removes the temporary files of earlier runs that were killed
  (their process is gone), the next time a run writes into that directory.
* :data:`ABORT` is set by the command-line signal handlers (SIGINT, SIGTERM); :func:`publish`
  checks it last, so an interrupt that a backend library swallowed still stops the publication.
* :func:`temporary` makes a temporary and owns its removal with no gap between the two: a signal that
  arrives while the file is being created is held until the ``try`` that removes it has begun.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import time

TEMP_PREFIX = ".tmp-autoinit-"
_TEMP_PATTERN = re.compile(r"^\.tmp-autoinit-(?:(\d+)-)?")
#: An untagged temp (an older version's) counts as stale after this long.
_UNTAGGED_STALE_S = 3600.0


class Interrupted(BaseException):
    """A SIGINT or SIGTERM arrived: stop, remove temporaries, publish nothing."""

    def __init__(self, signum):
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class _AbortFlag:
    """The first signal received (None: none); set by signal handlers, read before publishing. While
    ``holding`` is above zero the handlers only record the signal (`temporary`)."""

    def __init__(self):
        self.signum = None
        self.holding = 0

    def check(self):
        if self.signum is not None:
            raise Interrupted(self.signum)


ABORT = _AbortFlag()


def install_signal_handlers():
    """SIGINT and SIGTERM set :data:`ABORT` and raise :class:`Interrupted` (main thread only)."""

    def handler(signum, frame):
        ABORT.signum = signum
        if not ABORT.holding:
            raise Interrupted(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)
    return previous


def real(path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def same_or_inside(output, source) -> bool:
    """True when ``output`` (resolved) is ``source`` (resolved), or lies inside a ``source`` directory."""
    out, src = real(output), real(source)
    if out == src:
        return True
    if os.path.exists(output) and os.path.exists(source):
        try:
            if os.path.samefile(output, source):
                return True
        except OSError:
            pass
    return os.path.isdir(src) and os.path.commonpath([out, src]) == src


def temp_path(directory, suffix="", folder=False) -> str:
    """A new temporary file (or directory) in ``directory`` tagged with this process id."""
    prefix = f"{TEMP_PREFIX}{os.getpid()}-"
    if folder:
        return tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=directory)
    fd, path = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)  # the published file gets ordinary permissions, not mkstemp's 0600
    return path


@contextlib.contextmanager
def temporary(directory, suffix="", folder=False):
    """A new `temp_path`, removed when the block ends however it ends. A SIGINT / SIGTERM arriving while the
    file is created is held (`ABORT.holding`) and raised inside the block's ``try``, so it cannot leave the
    temporary behind (a signal right after ``mkstemp`` did, under load)."""
    ABORT.holding += 1
    try:
        path = temp_path(directory, suffix=suffix, folder=folder)
    except BaseException:
        ABORT.holding -= 1
        raise
    try:
        ABORT.holding -= 1
        ABORT.check()
        yield path
    finally:
        if os.path.lexists(path):
            remove(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(directory) -> list:
    """Remove ``.tmp-autoinit-*`` entries of runs that no longer exist; returns what was removed."""
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    now = time.time()
    for name in names:
        m = _TEMP_PATTERN.match(name)
        if not m:
            continue
        path = os.path.join(directory, name)
        pid = m.group(1)
        if pid is not None:
            if int(pid) == os.getpid() or _alive(int(pid)):
                continue
        else:
            try:
                if now - os.lstat(path).st_mtime < _UNTAGGED_STALE_S:
                    continue
            except OSError:
                continue
        remove(path)
        removed.append(path)
    return removed


def remove(path):
    """Remove a file, link or directory tree; no error if it is gone."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def publish(tmp, target, *, overwrite=False):
    """Move the finished temporary ``tmp`` to ``target`` atomically.

    Without ``overwrite`` the operation fails with ``FileExistsError`` when ``target`` exists
    (also when another process created it after any earlier check); ``tmp`` is removed on
    every failure. :data:`ABORT` is checked first.
    """
    tmp, target = os.fspath(tmp), os.fspath(target)
    try:
        ABORT.check()
        if overwrite:
            if os.path.isdir(tmp) and os.path.isdir(target) and not os.path.islink(target):
                old = temp_path(os.path.dirname(os.path.abspath(target)), folder=True)
                os.rmdir(old)
                os.replace(target, old)
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old, target)
                    raise
                remove(old)
            else:
                os.replace(tmp, target)
        elif os.path.isdir(tmp):
            os.mkdir(target)  # the exclusive claim: fails if the name exists
            try:
                os.replace(tmp, target)  # a directory onto the empty one we just made
            except BaseException:
                os.rmdir(target)
                raise
        else:
            try:
                os.link(tmp, target)  # exclusive: fails if the name exists
            except FileExistsError:
                raise
            except OSError:
                # no hard links on this file system: claim the name exclusively, then replace it
                fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                os.close(fd)
                os.replace(tmp, target)
            else:
                os.unlink(tmp)
    finally:
        if os.path.lexists(tmp):
            remove(tmp)


def atomic_write_text(path, text: str, *, overwrite=True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def atomic_write_bytes(path, data: bytes, *, overwrite=True) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    with temporary(directory) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
        publish(tmp, path, overwrite=overwrite)
