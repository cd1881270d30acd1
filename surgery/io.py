"""Writing outputs safely: every output directory is built in a temporary directory beside its
target and renamed into place, under a lock that a second writer cannot take.

The rules, checked before any work starts:
- an existing target is replaced only with `force`, and only when it is empty or surgery wrote it
  (it holds `surgery.json`); never when it is a source of the run, holds a source, lies inside
  one, or is the working directory or one of its parents;
- the lock (`.NAME.lock` beside the target, `flock`) is held from the check to the rename, so two
  writers never both "win": the second gets one line;
- temporary directories (`.NAME.tmp-*`) that a killed writer left are removed by the next writer
  of that target (holding the lock proves their owner is gone); SIGTERM cleans up at once;
- outputs get the permissions the umask allows, like any file the user creates.

`fault_point` is the hook the fault-injection tests use to kill a writer at each write boundary.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from surgery.errors import OutputBusy, OutputExists, SurgeryError, UnsafeOutput

log = logging.getLogger(__name__)

MARKER = "surgery.json"  # every output surgery writes holds one; --force replaces only those
FAULT_ENV = "SURGERY_FAULT"  # NAME or NAME:N: SIGKILL this process the N-th time it reaches NAME
STOP_ENV = "SURGERY_FAULT_STOP"  # NAME or NAME:N: SIGSTOP this process there (a writer held mid-write)
TRACE_ENV = "SURGERY_FAULT_TRACE"  # a file that collects every point reached, as NAME:N lines
_hits: Counter[str] = Counter()
_held: set[Path] = set()  # targets this process has locked (save inside a reserved command)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _umask()


def fault_point(name: str) -> None:
    """Kill this process with SIGKILL here when SURGERY_FAULT names this point, or stop it
    (SIGSTOP, to hold a writer mid-write) when SURGERY_FAULT_STOP does. Tests only."""
    spec, stop, trace = os.environ.get(FAULT_ENV), os.environ.get(STOP_ENV), os.environ.get(TRACE_ENV)
    if not (spec or stop or trace):
        return
    _hits[name] += 1
    hit = f"{name}:{_hits[name]}"
    first = name if _hits[name] == 1 else None
    if trace:
        with open(trace, "a") as f:
            f.write(hit + "\n")
    if spec and spec in (hit, first):
        os.kill(os.getpid(), signal.SIGKILL)
    if stop and stop in (hit, first):
        os.kill(os.getpid(), signal.SIGSTOP)


def terminate_cleanly() -> None:
    """Turn SIGTERM into SystemExit(143), so `finally` blocks remove temporary directories."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, handler)


def _inside(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def ours(directory: Path) -> bool:
    """True for an empty directory or one that surgery wrote (it holds surgery.json)."""
    return (
        directory.is_dir()
        and not directory.is_symlink()
        and ((directory / MARKER).is_file() or not any(directory.iterdir()))
    )


def hidden_name(out: Path, kind: str) -> str:
    """`.NAME.KIND` beside `out` (lock, tmp-, old-), kept under the 255-byte name limit: a long
    name is shortened and made unique by a hash of the whole."""
    name = out.name
    if len(name.encode()) > 200:
        name = name[:100] + "-" + hashlib.sha1(name.encode()).hexdigest()[:12]
    return f".{name}.{kind}"


def check_target(out: Path, force: bool, sources: Iterable[str | Path] = ()) -> None:
    """Everything that can be known about an output before work starts; one line otherwise."""
    out = Path(out)
    if not str(out).strip():
        raise UnsafeOutput("the output directory is empty; name one with -o")
    try:
        _check_target(out, force, sources)
    except OSError as err:  # a name too long, a loop of links, ...
        raise UnsafeOutput(f"cannot use {out} as an output: {err.strerror}; choose another output") from None
    except (OutputExists, UnsafeOutput):
        clear_stale_lock(out)  # a killed writer's lock file must not outlive the refusal
        raise


def clear_stale_lock(out: Path) -> None:
    """Remove the lock file beside `out` if no process holds it (its writer was killed)."""
    path = out.parent / hidden_name(out, "lock")
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_target(out: Path, force: bool, sources: Iterable[str | Path]) -> None:
    target = out.resolve()
    if _inside(Path.cwd().resolve(), target):
        raise UnsafeOutput(f"{out} is the working directory or one of its parents; write to a new directory")
    for source in sources:
        src = Path(source).resolve()
        if _inside(src, target):
            raise UnsafeOutput(f"{out} is the source {source} or holds it; write to another directory")
        if _inside(target, src):
            raise UnsafeOutput(f"{out} is inside the source {source}; write to another directory")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise OutputExists(f"{out} already exists; pass --force to overwrite it or choose another output")
    if out.is_symlink() or not out.is_dir():
        raise UnsafeOutput(
            f"{out} is {'a symbolic link' if out.is_symlink() else 'a file'}, not a directory surgery wrote; "
            "--force will not replace it: remove it yourself or choose another output"
        )
    if not ours(out):
        raise UnsafeOutput(
            f"{out} is not empty and was not written by surgery (no {MARKER}); --force will not replace it: "
            "remove it yourself or choose another output"
        )


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p, returning the directories created (to remove again if the write fails)."""
    missing = []
    for p in [directory, *directory.parents]:
        if p.exists():
            break
        missing.append(p)
    try:
        for p in reversed(missing):
            p.mkdir()
    except OSError as err:
        _remove_empty(missing)
        raise UnsafeOutput(f"cannot create {directory}: {err.strerror}; choose another output") from None
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for p in directories:  # deepest first
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on `.NAME.lock` beside `out`; removed again on release."""
    path = out.parent / hidden_name(out, "lock")
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise UnsafeOutput(f"cannot write in {out.parent}: {err.strerror}; choose another output") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusy(
                f"another surgery process is writing {out}; wait for it to finish or choose another output"
            ) from None
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                break  # the file we locked is still the lock file (not one a finishing writer removed)
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def remove_stale(out: Path) -> None:
    """Remove what killed writers of `out` left beside it; call only while holding its lock."""
    prefixes = (hidden_name(out, "tmp-"), hidden_name(out, "old-"))
    for p in out.parent.iterdir():
        if p.name.startswith(prefixes) and p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def reserve(out: str | Path, force: bool = False, sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Check `out`, create its parent and hold its lock for the block: the whole of a command that
    writes `out`, so a second writer is refused before either does any work. Re-entrant within
    one process (a `save` inside a reserved command)."""
    out = Path(out)
    key = out.resolve()
    if key in _held:
        yield out
        return
    check_target(out, force, sources)
    created = _make_parents(out.parent)
    try:
        with _lock(out):
            _held.add(key)
            try:
                check_target(out, force, sources)  # again, now that no other writer can change it
                remove_stale(out)
                yield out
            finally:
                _held.discard(key)
    except BaseException:
        _remove_empty(created)
        raise


@contextlib.contextmanager
def atomic_file(out: Path, check: Callable[[Path], None]) -> Iterator[Path]:
    """Write the single output file `out`: `check(out)` refuses what may not be replaced (again
    under the lock, so two writers cannot both pass it), missing parents are created (and removed
    again on failure), the content goes to `.NAME.tmp-file` beside it (which the next writer
    removes if this one is killed) and is renamed into place with the umask's modes. A file system
    error is one line."""
    out = Path(out)
    check(out)
    created = _make_parents(out.parent)
    try:
        with _lock(out):
            check(out)
            tmp = out.parent / hidden_name(out, "tmp-file")
            tmp.unlink(missing_ok=True)  # a killed writer's
            try:
                yield tmp
                os.chmod(tmp, 0o666 & ~UMASK)
                os.replace(tmp, out)
            except OSError as err:
                raise UnsafeOutput(f"cannot write {out}: {os_reason(err)}; choose another output") from None
            finally:
                tmp.unlink(missing_ok=True)
    except BaseException:
        _remove_empty(created)
        raise


def os_reason(err: OSError) -> str:
    """A file system error in words: its strerror, or for numpy's short write (no errno: "N
    requested and M written") what it means, a full disk."""
    import re

    if err.strerror:
        return err.strerror
    short = re.fullmatch(r"(\d+) requested and (\d+) written", str(err))
    if short:
        return f"No space left on device (a short write: {short[2]} of {short[1]} bytes)"
    return str(err) or type(err).__name__


def permit(directory: Path) -> None:
    """Give a finished output the modes the umask allows, as if the user had created each file
    (libraries write some files through private temporaries, mode 0600)."""
    os.chmod(directory, 0o777 & ~UMASK)
    for path in directory.rglob("*"):
        if not path.is_symlink():
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~UMASK)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        return libc.renameat2(at_fdcwd, bytes(a), at_fdcwd, bytes(b), rename_exchange) == 0
    except (AttributeError, OSError):
        return False


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, sources: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; rename it to `out` only if the block succeeds.
    An existing `out` (allowed by `force` and the rules above) is swapped out atomically."""
    from safetensors import SafetensorError

    out = Path(out)
    with reserve(out, force, sources):
        check_target(out, force, sources)
        tmp = Path(tempfile.mkdtemp(prefix=hidden_name(out, "tmp-"), dir=out.parent))
        try:
            try:
                yield tmp
            except (OSError, SafetensorError) as err:
                reason = os_reason(err) if isinstance(err, OSError) else str(err).splitlines()[0]
                raise UnsafeOutput(f"could not write {out}: {reason}; nothing was written") from None
            if not (tmp / MARKER).exists():
                (tmp / MARKER).write_text('{"written_by": "surgery"}\n')
            permit(tmp)
            fault_point("before-rename")
            if out.exists():
                if not _exchange(tmp, out):
                    trash = Path(tempfile.mkdtemp(prefix=hidden_name(out, "old-"), dir=out.parent))
                    out.rename(trash / "old")
                    tmp.rename(out)
                    shutil.rmtree(trash, ignore_errors=True)
            else:
                tmp.rename(out)
            fault_point("after-rename")
        except OSError as err:
            if err.errno in (errno.EBUSY, errno.EXDEV, errno.ENOTEMPTY, errno.EISDIR):
                raise UnsafeOutput(f"cannot replace {out}: {err.strerror}; choose another output") from None
            raise UnsafeOutput(f"could not write {out}: {err.strerror or err}; nothing was written") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # after an exchange: the old output


def write_all(fout: Any, data: bytes | memoryview) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += fout.write(view[done:])


CHUNK = 64 << 20  # bytes per copy call: progress moves, and a kill stops within one chunk


def copy_range(fin: Any, fout: Any, offset: int, count: int, bar: Any = None) -> str:
    """Append `count` bytes of `fin` from `offset` to `fout`: in the kernel where it can
    (copy_file_range: no user-space copy, no page faults; a server-side copy on NFS, shared
    extents on XFS), else through a bounded buffer. Returns which ("kernel copy" or "copy")."""
    if hasattr(os, "copy_file_range"):
        try:
            while count:
                done = os.copy_file_range(fin.fileno(), fout.fileno(), min(count, CHUNK), offset)
                if done == 0:
                    raise SurgeryError(f"{fin.name} ended early; is the checkpoint complete?")
                offset, count = offset + done, count - done
                if bar is not None:
                    bar.update(done)
            return "kernel copy"
        except OSError:  # across file systems (EXDEV), or a kernel without it: the rest by buffer
            pass
    fin.seek(offset)
    while count:
        chunk = fin.read(min(count, CHUNK))
        if not chunk:
            raise SurgeryError(f"{fin.name} ended early; is the checkpoint complete?")
        write_all(fout, chunk)
        count -= len(chunk)
        if bar is not None:
            bar.update(len(chunk))
    return "copy"


FICLONE = 0x40049409  # linux/fs.h: share the source's extents, copy on write


def clone_file(src: Path, dst: Path) -> str:
    """Copy a file as cheaply as the file systems allow, never sharing what a later write could
    change: a copy-on-write clone (btrfs, XFS, bcachefs: instant at any size, and a write to
    either file afterwards copies only the blocks written), else a kernel copy, else a buffered
    one (across file systems). Never a hard link or a symlink, which would make an in-place write
    to the output rewrite the source. Returns how it copied: "reflink", "kernel copy" or "copy"."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        try:
            fcntl.ioctl(fout.fileno(), FICLONE, fin.fileno())
            return "reflink"
        except OSError:  # EOPNOTSUPP (ext4, tmpfs), EXDEV (another file system)
            pass
        size = os.fstat(fin.fileno()).st_size
        if size < CHUNK:  # a bar only where a copy takes long enough to watch
            return copy_range(fin, fout, 0, size)
        with bytes_progress(size, f"copying {src.name}") as bar:
            return copy_range(fin, fout, 0, size, bar)


QUIET = False  # `surgery --quiet`: no progress bars at all
LOG_EVERY = 60.0  # seconds between progress lines where no bar can show


class LoggedProgress:
    """Progress where a bar cannot show (stderr is a log file: nohup, CI, a scheduler): one line on
    the `surgery` log at most every LOG_EVERY seconds, with the count, rate, ETA and the last
    postfix, so `tail -f` tells where a long job is. Work shorter than that logs nothing. Has the
    part of tqdm's interface the callers use."""

    def __init__(
        self, total: float, desc: str, unit: str = "it", unit_scale: bool = False, unit_divisor: int = 1000, **_: Any
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.unit_scale, self.unit_divisor = unit_scale, unit_divisor  # as tqdm's: bytes pass 1024
        self.n, self.postfix, self.disable = 0, "", False
        self.start = self.last = time.monotonic()

    def __enter__(self) -> LoggedProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def size(self, n: float) -> str:
        from tqdm import tqdm

        return tqdm.format_sizeof(n, self.unit, self.unit_divisor) if self.unit_scale else f"{n:g}"

    def line(self, elapsed: float) -> str:
        """One line, such as `finetune: 40/200 step, 9.6 s/step, 25:36 left (loss 1.234)`."""
        from tqdm import tqdm

        rate = self.n / elapsed if elapsed > 0 else 0.0
        done = f"{self.size(self.n)}/{self.size(self.total)}" + ("" if self.unit_scale else f" {self.unit}")
        if self.unit_scale:
            speed = f"{self.size(rate)}/s"
        else:
            speed = f"{1 / rate:.3g} s/{self.unit}" if 0 < rate < 1 else f"{rate:.3g} {self.unit}/s"
        eta = tqdm.format_interval((self.total - self.n) / rate) if rate > 0 else "?"
        return f"{self.desc}: {done}, {speed}, {eta} left" + (f" ({self.postfix})" if self.postfix else "")

    def update(self, n: float = 1) -> None:
        self.n += n
        now = time.monotonic()
        if not self.disable and now - self.last >= LOG_EVERY:
            self.last = now
            log.info("%s", self.line(now - self.start))

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """Shown from the next update on (callers set it first, then update)."""
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass


def progress(total: float, desc: str, unit: str = "it", **kwargs: Any) -> Any:
    """A progress bar with rate and ETA on stderr for long work, never under `--quiet`. On a
    terminal it is tqdm's bar, in a notebook tqdm's widget; elsewhere (a log file, tests) a line a
    minute, and nothing for short work, so logs and tests stay clean."""
    from tqdm.auto import tqdm
    from tqdm.autonotebook import tqdm as chosen
    from tqdm.std import tqdm as plain

    if not QUIET and chosen is plain and not sys.stderr.isatty():
        return LoggedProgress(total, desc, unit, **kwargs)
    return tqdm(
        total=total, desc=desc, unit=unit, disable=True if QUIET else None, leave=False, dynamic_ncols=True, **kwargs
    )


def bytes_progress(total: int, desc: str) -> Any:
    return progress(total, desc, unit="B", unit_scale=True, unit_divisor=1024)
