"""File safety, written once: sha256, fsync, atomic folders, manifests, one folder hasher.

Every folder tunesmith promises not to lose or half-write (checkpoints, ``final/``,
exports, the embedded model's cache) is written into ``.tmp-NAME-<random>`` beside its
final name, fsynced, and moved into place by one ``os.rename``: a name only ever points
at a complete folder. A manifest lists every file's sha256 and size, so a reader can tell
a complete folder from a damaged one before trusting it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


# ---------------------------------------------------------------- hashing


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):  # 1 MiB reads keep memory flat on multi-GB shards
            h.update(chunk)
    return h.hexdigest()


def folder_hash(folder: str | os.PathLike, files: Iterable[Path] | None = None) -> str:
    """sha256 over ``files`` (default: every file below ``folder``, sorted): each file's
    path relative to ``folder``, then its bytes. The identity of a folder's content, for
    lineage keys and base-model checks. ``export/reload_check.py`` repeats the definition
    for weight files, since that script must not import tunesmith."""
    folder = Path(folder)
    chosen = sorted(files) if files is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in chosen:
        h.update(f.relative_to(folder).as_posix().encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


def weights_hash(folder: str | os.PathLike) -> str:
    """``folder_hash`` of a model folder's weight files (safetensors, else .bin)."""
    folder = Path(folder)
    return folder_hash(folder, sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")))


def file_table(folder: str | os.PathLike, skip: Iterable[str] = (), size_key: str = "size") -> dict[str, dict]:
    """``{relative path: {"sha256", size_key}}`` of every file below ``folder`` but ``skip``."""
    folder = Path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    skipped = set(skip)
    return {n: {"sha256": sha256_file(folder / n), size_key: (folder / n).stat().st_size}
            for n in names if n not in skipped}


# ---------------------------------------------------------------- durable writes


def fsync(path: str | os.PathLike) -> None:
    # Works on files and folders alike; a new or renamed entry is durable only once its
    # folder is flushed too. Flushes a file's pages whichever descriptor wrote them.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any, **kw: Any) -> None:
    path.write_text(json.dumps(obj, **kw) + "\n", encoding="utf-8")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float as None, so that ``json.dumps(allow_nan=False)``
    writes strict JSON: ``NaN`` and ``Infinity`` are not JSON, and strict readers
    (browsers, jq, most languages) refuse the whole file."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def dumps(obj: Any, **kw: Any) -> str:
    """Strict JSON text of ``obj`` (see ``strict``)."""
    return json.dumps(strict(obj), allow_nan=False, **kw)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The records of a JSON-lines log, leaving out a torn last line (what a kill during a
    write leaves behind); a damaged line elsewhere is an error, since it means the file was
    edited or corrupted rather than cut short."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except ValueError:
            if i == len(lines) - 1:
                break  # cut short by a kill: the lines before it are whole
            raise TunesmithError(f"{path}:{i + 1}: not a JSON line; the log is damaged — delete the line or the "
                                 f"file (it is rewritten from the checkpoints on --resume)") from None
    return out


def _no_space(e: BaseException) -> bool:
    """A write failed because the device is full (safetensors reports it as its own error)."""
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename: a crash leaves the old file or the new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are ordinary files
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync(path.parent)


class LineWriter:
    """JSON lines streamed to a hidden file beside ``path``; ``commit`` puts it in place in one
    rename (``abort`` deletes it): a crash or a refusal midway never leaves half a file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".tmp-{self.path.name}-", dir=self.path.parent)
        self.f = os.fdopen(fd, "w", encoding="utf-8", newline="\n")
        self.lines = 0

    def write(self, obj: Any) -> None:
        self.f.write(obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False) + "\n")
        self.lines += 1

    def commit(self) -> Path:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)
        fsync(self.path.parent)
        return self.path

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


def recover(parent: Path, name_re: str) -> None:
    """Undo what a crash left beside ``parent/<name>``: unfinished ``.tmp-`` folders are
    dropped; an ``.old-`` copy whose replacement never arrived is put back."""
    for p in sorted(parent.iterdir()):
        m = re.fullmatch(rf"\.(tmp|old)-({name_re})-[a-z0-9_]+", p.name)
        if not m or not p.is_dir():
            continue
        if m[1] == "old" and not (parent / m[2]).exists():
            os.rename(p, parent / m[2])
        else:
            shutil.rmtree(p, ignore_errors=True)


def remove_dir(path: Path) -> None:
    # Rename first: a crash mid-rmtree then leaves a .tmp- folder, never a half folder.
    doomed = path.with_name(f".tmp-{path.name}-{secrets.token_hex(4)}")
    os.rename(path, doomed)
    shutil.rmtree(doomed)


@contextlib.contextmanager
def atomic_dir(final_path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside ``final_path``; on success fsync it and rename
    it to ``final_path`` (replacing an existing one); on any exception remove it."""
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover(final.parent, re.escape(final.name))
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; these are ordinary folders
    try:
        yield tmp
        for dirpath, _, names in os.walk(tmp):
            for path in (dirpath, *(os.path.join(dirpath, f) for f in names)):
                fsync(path)
        old = None
        if final.exists():
            # No portable atomic swap of folders: move the old one aside, rename, drop it.
            # A crash between the two renames leaves .old-NAME, which readers still find
            # and the next save renames back.
            old = final.with_name(f".old-{final.name}-{secrets.token_hex(4)}")
            os.rename(final, old)
        try:
            os.rename(tmp, final)
        except BaseException:
            if old is not None:
                os.rename(old, final)
            raise
        fsync(final.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)  # the save succeeded; recover drops leftovers
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e):
            raise TunesmithError(f"no space left on the device while writing {final}; free some space and run the "
                                 f"command again (what was saved before is intact)") from None
        raise


# ---------------------------------------------------------------- manifests


def write_manifest(folder: str | os.PathLike, extra: dict | None = None) -> dict:
    """Write ``manifest.json`` listing sha256 and size of every other file under ``folder``."""
    folder = Path(folder)
    manifest = {"format_version": MANIFEST_VERSION, **(extra or {}), "files": file_table(folder, skip=[MANIFEST])}
    write_json(folder / MANIFEST, manifest)
    return manifest


def manifest_problem(folder: Path, full: bool) -> tuple[dict | None, str | None]:
    """``(manifest, first thing wrong with folder)``; sizes only unless ``full`` (sha256)."""
    try:
        manifest = read_json(folder / MANIFEST)
    except FileNotFoundError:
        return None, f"{MANIFEST} is missing (the save never finished)"
    except (OSError, ValueError):
        return None, f"{MANIFEST} is unreadable"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        return None, f"{MANIFEST} has no file list"
    if not isinstance(manifest.get("format_version", 0), int):
        return None, f"{MANIFEST} is malformed (format_version)"
    if manifest.get("format_version", 0) > MANIFEST_VERSION:
        return None, f"it was written by a newer tunesmith (format {manifest['format_version']})"
    for name, want in manifest["files"].items():
        if not (isinstance(want, dict) and isinstance(want.get("size"), int) and isinstance(want.get("sha256"), str)):
            return None, f"{MANIFEST} is malformed (its entry for {name})"
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return None, f"{MANIFEST} is malformed (it lists {name}, outside the folder)"
        path = folder / name
        if not path.is_file():
            return manifest, f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return manifest, f"{name} has {path.stat().st_size} bytes where {MANIFEST} says {want['size']}"
        if full and sha256_file(path) != want["sha256"]:
            return manifest, f"{name} is corrupted (its sha256 differs from {MANIFEST})"
    return manifest, None


def verify_manifest(folder: str | os.PathLike, *, kind: str = "folder", fix: str = "write it again") -> dict:
    """Check every file's size and sha256 against ``manifest.json``; return the manifest.

    Raises TunesmithError "<kind> <folder>: <what is wrong>; <fix>".
    """
    manifest, problem = manifest_problem(Path(folder), full=True)
    if problem:
        raise TunesmithError(f"{kind} {folder}: {problem}; {fix}")
    return manifest


# ---------------------------------------------------------------- one writer per folder

LOCK = ".tunesmith.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class FolderLock:
    """An advisory lock: one tunesmith writer per run or pipeline folder.

    ``FOLDER/.tunesmith.lock`` is created with O_EXCL (atomic on local file systems) and
    holds the holder's pid, host, start time and command. A second writer is refused in
    one sentence naming the holder; a lock whose pid is gone on this host (a killed run)
    is taken over with a message. A lock from another host is never taken over: that
    process cannot be seen from here. Re-entrant within one process.
    """

    _held: dict[str, int] = {}  # lock path → depth, in this process

    def __init__(self, folder: str | os.PathLike, what: str = "run folder"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "command": " ".join(sys.argv)[:200]}
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(me, f)
        return True

    def acquire(self) -> FolderLock:
        from tunesmith import console

        key = str(self.path.resolve())
        if self._held.get(key):
            self._held[key] += 1
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            if self._create():
                self._held[key] = 1
                return self
            h = self.holder()
            if h is None:  # a lock file being written this instant, or torn by a crash: look again
                time.sleep(0.2)
                h = self.holder()
            here = h is not None and h.get("host") == socket.gethostname()
            if h is None or (here and not _alive(int(h.get("pid", -1)))):
                who = f"pid {h['pid']}, started {h.get('started')}" if h else "an unreadable lock"
                console.warn(f"taking over the stale lock of {self.what} {self.folder} ({who}: that process is "
                             f"gone)")
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            raise TunesmithError(
                f"{self.what} {self.folder} is in use by pid {h.get('pid')} on {h.get('host')} since "
                f"{h.get('started')} (`{h.get('command')}`); wait for it to finish or stop it — one writer per folder")
        raise TunesmithError(f"could not lock {self.what} {self.folder}: another process keeps taking it; "
                             f"make sure only one tunesmith command writes there")

    def release(self) -> None:
        key = str(self.path.resolve())
        depth = self._held.get(key, 0)
        if depth > 1:
            self._held[key] = depth - 1
            return
        self._held.pop(key, None)
        h = self.holder()
        if h is not None and h.get("pid") == os.getpid() and h.get("host") == socket.gethostname():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
