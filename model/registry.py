"""Registry operations over model/artifact.py: find, promote, roll back and prune versions.

Versions are ordered by their manifest's created_at (then name), so "the last N" means the
N most recently published, whatever their names. Pruning never touches the CURRENT version
or the one a rollback returns to, and removes a version by renaming it to a dot-name first:
a reader either sees the complete version or none (list_versions skips dot-names), never a
half-deleted one.

A rollback returns to the version CURRENT named before (its history, model/artifact.py), not to the version
published before the current one: with canaries that may be one that never served everyone. Each rollback
goes one step further back and forgets the steps it undid, so two rollbacks in a row go back two versions
rather than bouncing between two. When the history names no version left (a registry written before it
was kept, or every step rolled back or pruned), a rollback goes to the version published just before the
current one.

`hrnn models promote|rollback|canary` hold the registry's pointer lock (current_lock) from their read of CURRENT
to their announcement: two at once take turns, so CURRENT ends at the version announced last and its history
holds every step. The other writers of CURRENT or of the version set hold it too: `hrnn quality --decide-canary`
(as promote does), `hrnn models prune` (from its read of CURRENT to its last deletion), `hrnn train` while it
publishes, a retraining run from its last look at CURRENT through its publishing and pruning, and the retraining
service while it announces what the run published.
A retraining run holds another lock of the registry for the whole run (RegistryLock).
"""
from __future__ import annotations

import fcntl
import os
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from model.artifact import (VersionInfo, current_history, current_version, existing_registry, list_versions,
                            set_current, verify, write_current_history)
from model.errors import ArtifactError, ConfigError

# A temp dir of save_version (or a retraining run's staging registry) older than this is a leftover of a
# crashed or killed publisher, not one in progress.
STALE_TEMP_S = 3600.0
STAGING_PREFIX = ".staging-"  # a retraining run's staging registry (stream/retrain_job.py)
TEMP_PREFIXES = (".tmp-", ".trash-", STAGING_PREFIX)
CURRENT_LOCK = ".current.lock"  # held by whoever moves CURRENT or deletes versions (current_lock)
# A holder announces under the lock, and an announcement to a broker that is down takes up to a minute to fail.
CURRENT_LOCK_WAIT_S = 120.0


class RegistryLock:
    """An exclusive flock on a file of the registry: one holder among all processes, dropped by release() or by
    the holder's death, so a killed holder never leaves it taken."""

    def __init__(self, registry: str | Path, name: str) -> None:
        registry = Path(registry)
        try:
            registry.mkdir(parents=True, exist_ok=True)
            # read-only: flock needs no write access, so an operator running as another user than the one who
            # made the file can take it too
            self._fd = os.open(registry / name, os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError as exc:  # a file of the registry's name (or a parent's), or no permission
            raise ConfigError(f"registry {registry} cannot hold model versions: {exc}") from None

    def acquire(self, wait_s: float = 0.0) -> bool:
        """Take the lock, waiting up to `wait_s` for its holder to let it go; False when it is still held."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.05)

    def release(self) -> None:
        os.close(self._fd)  # closing drops the flock


@contextmanager
def current_lock(registry: str | Path, wait_s: float | None = None) -> Iterator[None]:
    """Hold the registry's pointer lock: a command that reads CURRENT, moves it and announces the result does all
    three under it, else two at once could move CURRENT in one order and announce in the other. A holder that
    keeps it past `wait_s` (default CURRENT_LOCK_WAIT_S) is an ArtifactError, nothing changed."""
    reg = existing_registry(registry)  # before the lock file: it must not make a registry of a mistyped path
    wait_s = CURRENT_LOCK_WAIT_S if wait_s is None else wait_s
    lock = RegistryLock(reg, CURRENT_LOCK)
    try:
        if not lock.acquire(wait_s):
            raise ArtifactError(f"another promote, rollback, canary, prune or publish of {reg} has held its lock "
                                f"({reg / CURRENT_LOCK}) for over {wait_s:g} s: nothing was changed; run this "
                                "again once it has finished")
        yield
    finally:
        lock.release()


def ordered_versions(registry: str | Path) -> list[VersionInfo]:
    """Complete versions, oldest first (by created_at, then name)."""
    return sorted(list_versions(registry), key=lambda v: (v.created_at, v.version))


def version_path(registry: str | Path, version: str) -> Path:
    """The directory of a complete version, or ArtifactError naming the versions there are."""
    for v in list_versions(registry):
        if v.version == version:
            return v.path
    known = ", ".join(v.version for v in ordered_versions(registry)[-5:]) or "none"
    raise ArtifactError(f"no version {version!r} in {registry} (latest: {known})")


def promote(registry: str | Path, version: str) -> Path:
    """Check a version's checksums and make it the CURRENT one (any version: also a manual rollback)."""
    path = version_path(registry, version)
    verify(path)
    set_current(registry, version)
    return path


def previous_version(registry: str | Path) -> str | None:
    """The target of a rollback: the most recent version CURRENT named before that still exists (see the module
    docstring); when it names none, the version published just before the current one."""
    cur = current_version(registry)
    complete = {v.version for v in list_versions(registry)}
    for version in reversed(current_history(registry)):
        if version != cur and version in complete:
            return version
    versions = [v.version for v in ordered_versions(registry)]
    if cur not in versions:
        return None
    i = versions.index(cur)
    return versions[i - 1] if i > 0 else None


def rollback(registry: str | Path) -> str:
    """Make the previously current version current again (previous_version); returns its name."""
    prev = previous_version(registry)
    if prev is None:
        raise ArtifactError(f"{registry}: no version before {current_version(registry)!r} to roll back to")
    verify(version_path(registry, prev))
    set_current(registry, prev, remember=False)
    # CURRENT first: a crash before this leaves `prev` in the history, which the next rollback skips as current
    history = current_history(registry)
    if prev in history:
        last = max(i for i, v in enumerate(history) if v == prev)
        write_current_history(registry, history[:last])
    return prev


def prune(registry: str | Path, keep: int, *, protect: tuple[str, ...] = ()) -> list[str]:
    """Delete all but the `keep` newest versions that can serve (every file of their manifest there); the current
    one, the one a rollback returns to, and `protect` always stay. A damaged version counts for none of the
    `keep`: kept in their place, it would leave fewer versions to serve or roll back to than asked.

    Returns the names deleted. Stale temp dirs of crashed publishers are removed too.
    """
    if keep < 1:
        raise ArtifactError(f"keep must be at least 1, got {keep}")
    reg = Path(registry)
    versions = ordered_versions(reg)
    whole = [v for v in versions if v.files_present()]
    spared = {v.version for v in whole[-keep:]} | {current_version(reg), previous_version(reg)} | set(protect)
    removed = []
    for v in versions:
        if v.version in spared:
            continue
        trash = reg / f".trash-{v.version}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(v.path, trash)
        except FileNotFoundError:
            continue  # another pruner got there first
        except OSError as exc:
            raise ArtifactError(f"cannot delete {v.path} ({exc.strerror}); deleted so far: "
                                f"{', '.join(removed) or 'none'}") from None
        shutil.rmtree(trash, ignore_errors=True)
        removed.append(v.version)
    _remove_stale_temp(reg)
    return removed


def _remove_stale_temp(reg: Path) -> None:
    now = time.time()
    for d in reg.iterdir():
        if d.is_dir() and d.name.startswith(TEMP_PREFIXES):
            try:
                if now - d.stat().st_mtime > STALE_TEMP_S:
                    shutil.rmtree(d, ignore_errors=True)
            except FileNotFoundError:
                pass
