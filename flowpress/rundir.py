"""Run directories: one writer at a time, written aside and swapped in, checked before trusted.

- `run_lock`: a lock per run name (runs/.<name>.lock); a second writer is told who holds it.
- `staged_run`: a run is written into runs/.<name>.partial and renamed into place when complete;
  the swap restores the previous run if it fails halfway, so one of them is always whole.
- `read_manifest` / `verify_run`: every command that reads a run checks the sha256 of what it
  reads against manifest.json first; `record_outputs` updates the hashes of the files a stage
  wrote, and only those.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flowpress import files
from flowpress.errors import FlowpressError
from flowpress.files import sha256_file
from flowpress.ranks import dist_info, lost_peer

MANIFEST = "manifest.json"
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def write_error(err: OSError, what: str) -> FlowpressError | None:
    """The one-line error for a failed write (full disk, read-only or unwritable directory)."""
    if err.errno not in WRITE_ERRNOS:
        return None
    where = err.filename or what
    return FlowpressError(
        f"{where}: cannot write ({os.strerror(err.errno or 0)}); free space or make the directory writable, "
        "or pass another --runs directory"
    )


@contextmanager
def run_lock(final: Path, command: str = "") -> Iterator[None]:
    """Hold runs/.<name>.lock while a command writes runs/<name>; a second writer raises
    FlowpressError naming the holder (pid, host, command, start time)."""
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, str(final.parent)) or err from None
    path = final.with_name(f".{final.name}.lock")
    while True:
        try:
            handle = open(path, "a+")  # noqa: SIM115 - held until the context ends
        except OSError as err:
            raise write_error(err, str(path)) or err from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise FlowpressError(
                f"{final}: another flowpress command is writing this run ({holder}); wait for it to end or stop it"
            ) from None
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file between our open and lock: take the new one
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, `{command or ' '.join(sys.argv)}`, since {started}")
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


@contextmanager
def staged_run(final: Path) -> Iterator[Path]:
    """Yield a temporary directory beside `final`; on success it replaces `final`, on error it is
    removed and `final` is left as it was.  Call inside run_lock."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    old = final.with_name(f".{final.name}.old")
    if old.exists() and not final.exists():  # a swap interrupted between its two renames
        old.rename(final)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    except OSError as err:
        raise write_error(err, str(tmp)) or err from None
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        tmp.rename(final)
    except BaseException as err:
        if old.exists() and not final.exists():
            old.rename(final)
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and (mapped := write_error(err, str(tmp))) is not None:
            raise mapped from None
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def reported_failures(final: Path, stage: Callable[[], str | None]) -> Iterator[None]:
    """An unexpected exception in the block (a bug, a library's error, out of memory) becomes one
    FlowpressError naming the stage `stage()` says failed, its traceback written to
    runs/.<name>.failed/error.log (kept for the user; the run directory is left as it was).
    FlowpressError and writes that write_error maps pass through as they are."""
    final = Path(final)
    failed = final.with_name(f".{final.name}.failed")
    rank = dist_info().rank
    if rank == 0:  # under torchrun the other ranks keep their own log beside rank 0's
        shutil.rmtree(failed, ignore_errors=True)
    try:
        yield
    except FlowpressError:
        raise
    except Exception as err:
        if (stopped := lost_peer(err)) is not None:
            raise stopped from err
        if isinstance(err, OSError) and (mapped := write_error(err, str(final))) is not None:
            raise mapped from None
        where = stage() or "setup"
        log = failed / ("error.log" if rank == 0 else f"error.rank{rank}.log")
        try:
            failed.mkdir(parents=True, exist_ok=True)
            log.write_text(f"stage: {where}\n" + "".join(traceback.format_exception(err)))
            kept = f"the traceback is in {log}"
        except OSError:
            kept = "the traceback could not be written"
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise FlowpressError(
            f"{final.name}: stage '{where}' failed with {type(err).__name__}"
            + (f" ({reason})" if reason else "")
            + f"; {kept}; the run directory was not replaced; report it with the recipe or the model's config"
        ) from err


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by relative path."""
    root = Path(root)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def write_json(path: Path, data: Any) -> None:
    """files.write_json, a failed write (full disk, read-only directory) as one line."""
    try:
        files.write_json(path, data)
    except OSError as err:
        raise write_error(err, str(path)) or err from None


def read_manifest(run: Path, fix: str = "rerun `make quantize RECIPE=...`") -> dict[str, Any]:
    """A finished run's manifest.json, or one line saying why there is none to trust."""
    path = Path(run) / MANIFEST
    if not path.is_file():
        raise FlowpressError(f"{run}: no finished run (no {MANIFEST}); {fix}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FlowpressError(f"{path}: not valid JSON ({err}); the run cannot be trusted: {fix}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("outputs"), dict):
        raise FlowpressError(f"{path}: no table of output hashes; the run cannot be trusted: {fix}")
    return manifest


def verify_run(
    run: Path, manifest: dict[str, Any], skip: Iterable[str] = (), fix: str = "rerun `make quantize RECIPE=...`"
) -> None:
    """Check every file manifest.json records (but `skip`) against its sha256; one line naming
    the first missing, changed or unrecorded file."""
    run = Path(run)
    outputs: dict[str, str] = manifest["outputs"]
    skipped = set(skip)
    present = {name: digest for name, digest in outputs.items() if name not in skipped and (run / name).is_file()}
    for name, digest in present.items():  # a changed file first: it says more than a missing one
        if sha256_file(run / name) != digest:
            raise FlowpressError(f"{run / name}: changed since it was written (sha256 differs from {MANIFEST}); {fix}")
    for name in outputs:
        if name not in skipped and name not in present:
            raise FlowpressError(f"{run / name}: missing, though {MANIFEST} records it; the run is incomplete: {fix}")
    for path in sorted(run.rglob("*")):
        name = str(path.relative_to(run))
        if path.is_file() and name != MANIFEST and name not in outputs and name not in skipped:
            raise FlowpressError(f"{path}: not recorded in {MANIFEST}; remove it or {fix}")


def verify_inputs(recorded: dict[str, str], root: Path, what: str, fix: str) -> None:
    """Check a directory the run read (the model checkpoint) against the hashes the run recorded."""
    current = tree_hashes(Path(root)) if Path(root).is_dir() else {}
    for name in sorted(set(recorded) | set(current)):
        if recorded.get(name) != current.get(name):
            state = "missing" if name not in current else "new" if name not in recorded else "changed"
            raise FlowpressError(f"{Path(root) / name}: the {what} {state} since this run was made; {fix}")


def record_outputs(run: Path, manifest: dict[str, Any], written: Iterable[str]) -> dict[str, Any]:
    """manifest with the sha256 of the files a stage wrote (relative names) updated, and nothing
    else; a written name that no longer exists is dropped."""
    outputs = dict(manifest["outputs"])
    for name in written:
        path = Path(run) / name
        if path.is_file():
            outputs[name] = sha256_file(path)
        else:
            outputs.pop(name, None)
    return {**manifest, "outputs": dict(sorted(outputs.items()))}
