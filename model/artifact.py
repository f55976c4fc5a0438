"""Model versions on disk: `<registry>/<version>/` and the registry pointer.

A version directory holds weights.pt (a state_dict, loaded with weights_only=True),
config.json (every hyperparameter), items.json (the item index), metrics.json and
manifest.json (sha256 of every file). It is written under a temporary name and renamed
into place, and the registry's CURRENT pointer is replaced atomically afterwards, so a
reader never sees a half-written version. CURRENT.history lists the versions CURRENT named
before, oldest first: what a rollback returns to (model/registry.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import secrets
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from model.config import DataConfig, HRNNConfig, field_names, load_config, read_json, shown_path, to_dict
from model.errors import ArtifactError
from model.network import HRNN, WINDOW_OFFSET

POINTER = "CURRENT"
HISTORY = "CURRENT.history"
HISTORY_MAX = 100  # entries kept: far more rollbacks than anyone runs in a row
# What save_version writes into every version: a manifest that does not list one of them vouches for nothing about
# it, and a changed copy would serve unchecked.
REQUIRED_FILES = ("weights.pt", "config.json", "items.json", "metrics.json")


@dataclass
class VersionInfo:
    version: str
    path: Path
    created_at: str
    metrics: dict[str, Any]
    current: bool
    files: dict[str, Any] | None = None  # the manifest's, file name -> sha256 (None: it has none of that shape)

    def files_present(self) -> bool:
        """Every file the manifest lists is there (a cheap check: verify() also reads each checksum)."""
        return self.files is not None and all((self.path / str(name)).is_file() for name in self.files)


@dataclass
class LoadedModel:
    version: str
    path: Path
    model: HRNN
    config: HRNNConfig
    data_config: DataConfig
    item_ids: list[str]
    event_types: list[str]
    metrics: dict[str, Any]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _atomic_write(path: Path, text: str) -> None:
    # made with the umask's modes, not mkstemp's 0600: a worker running as another user must read CURRENT
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only file system refuses even the unlink of a file never made (EROFS, not ENOENT)
            pass
        raise ArtifactError(f"cannot write {path} ({exc.strerror or exc})") from None


def new_version_name() -> str:
    now = datetime.now(timezone.utc)
    return now.strftime("v%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"


def save_version(registry: str | Path, model: HRNN, config: HRNNConfig, data_config: DataConfig,
                 item_ids: list[str], event_types: list[str], metrics: dict[str, Any] | None = None,
                 *, version: str | None = None, make_current: bool = True,
                 extras: Callable[[Path], None] | None = None, holdout: str | None = None) -> Path:
    """Write a complete version, rename it into place, then (optionally) point CURRENT at it.

    `holdout`: the protocol whose test events training held out, kept in config.json beside the settings, so
    `hrnn train --config config.json` holds out the same events again (model/cli_common.py config_holdout).

    `extras(dir)` may add files (plots, reports) before the manifest is written; they are checksummed too.
    """
    reg = Path(registry)
    try:
        reg.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ArtifactError(f"cannot create the registry {reg} ({exc.strerror})") from None
    version = version or new_version_name()
    final = reg / version
    if final.exists():
        raise ArtifactError(f"version {version} already exists in {reg}")
    tmp = reg / f".tmp-{version}-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()  # the umask's modes, not mkdtemp's 0700: workers may run as another user than the trainer
    except OSError as exc:
        raise ArtifactError(f"cannot write to the registry {reg} ({exc.strerror})") from None
    try:
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "weights.pt")
        _write_json(tmp / "config.json", {"version": version, "n_items": len(item_ids),
                                          **({"holdout": holdout} if holdout else {}),
                                          "hrnn": to_dict(config), "data": to_dict(data_config)})
        _write_json(tmp / "items.json", {"item_ids": list(item_ids), "event_types": list(event_types)})
        _write_json(tmp / "metrics.json", metrics or {})
        if extras is not None:
            extras(tmp)
        names = sorted(p.name for p in tmp.iterdir() if p.is_file())
        manifest = {"version": version, "created_at": datetime.now(timezone.utc).isoformat(),
                    "files": {name: _sha256(tmp / name) for name in names}}
        _write_json(tmp / "manifest.json", manifest)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if make_current:
        set_current(reg, version)
    return final


def set_current(registry: str | Path, version: str, *, remember: bool = True) -> None:
    """Point CURRENT at a complete version. The version it named before goes on the pointer's history (what a
    rollback returns to), unless `remember` is False: a rollback moves back along that history itself."""
    reg = Path(registry)
    if not (reg / version / "manifest.json").exists():
        raise ArtifactError(f"no complete version {version!r} in {reg}")
    before = _pointer(reg)
    if remember and before is not None and before != version:
        # history first: a crash before CURRENT moves leaves an entry naming the current version, which a
        # rollback skips; the other order would lose the version a rollback should return to
        history = current_history(reg)
        if history[-1:] != [before]:
            write_current_history(reg, [*history, before])
    _atomic_write(reg / POINTER, version + "\n")


def _read_pointer_file(path: Path) -> str:
    """CURRENT or its history as text ('' when missing); any other failure to read it is an ArtifactError."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise ArtifactError(f"{path} cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path} is not UTF-8 text: it holds version names, one per line") from None


def _pointer(reg: Path) -> str | None:
    """CURRENT's text as written, malformed or not: what set_current replaces (moving it is the repair)."""
    return _read_pointer_file(reg / POINTER).strip() or None


def check_pointer_files(registry: str | Path) -> None:
    """Raise ArtifactError now if CURRENT or its history cannot be read, so publishing could not move CURRENT:
    `hrnn train` checks before the training, not after it."""
    _pointer(Path(registry))
    current_history(registry)


def current_history(registry: str | Path) -> list[str]:
    """The versions CURRENT named before, oldest first; empty for a registry written before it was kept."""
    text = _read_pointer_file(Path(registry) / HISTORY)
    return [line.strip() for line in text.splitlines() if line.strip()]


def write_current_history(registry: str | Path, versions: list[str]) -> None:
    _atomic_write(Path(registry) / HISTORY, "".join(v + "\n" for v in versions[-HISTORY_MAX:]))


def current_version(registry: str | Path) -> str | None:
    """The version CURRENT names (None: none yet). Only the name of a directory of the registry is one: a path
    ('v1/', '../other/v1') would serve a version that the registry's commands, comparing names, do not see as
    current, and so could prune."""
    path = Path(registry) / POINTER
    version = _pointer(Path(registry))
    if version is not None and (version.startswith(".") or any(c in version for c in "/\\\0")):
        raise ArtifactError(f"{path} holds {version!r}, which is no version name (a directory of the registry, "
                            f"such as v20260101T000000000Z): point it at one with `hrnn models promote {registry} "
                            "VERSION`")
    return version


def current_written_at(registry: str | Path) -> float | None:
    """When CURRENT was last moved (epoch seconds, the file's mtime); None when there is none yet. An announcement
    older than this names a version the registry has moved away from since (stream/hotswap.py)."""
    try:
        return (Path(registry) / POINTER).stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ArtifactError(f"{Path(registry) / POINTER} cannot be read ({exc.strerror or exc})") from None


def latest_version_dir(registry: str | Path) -> Path:
    version = current_version(registry)
    if version is None:
        raise ArtifactError(f"registry {registry} has no current version (train one with `hrnn train`)")
    if not (Path(registry) / version).is_dir():
        raise ArtifactError(f"{Path(registry) / POINTER} names {version!r}, which is not in the registry: point it "
                            f"at a version with `hrnn models promote {registry} VERSION` (`hrnn models list` "
                            "lists them)")
    return Path(registry) / version


def existing_registry(registry: str | Path) -> Path:
    """The registry's directory, or an ArtifactError saying why it is none (a mistyped path is never made one)."""
    reg = Path(registry)
    try:
        if reg.is_dir():
            return reg
        why = "is not a directory" if reg.exists() else "does not exist"
    except OSError as exc:  # a name too long, a folder not searchable: is_dir() raises rather than say False
        why = f"cannot be read ({exc.strerror or exc})"
    raise ArtifactError(f"registry {shown_path(reg)} {why}")


def list_versions(registry: str | Path) -> list[VersionInfo]:
    reg = existing_registry(registry)
    cur = _pointer(reg)  # as written: a malformed CURRENT marks no version, and `models promote` still finds them
    out = []
    try:
        dirs = sorted(p for p in reg.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise ArtifactError(f"registry {reg} cannot be listed ({exc.strerror})") from None
    for d in dirs:
        try:
            manifest = read_json(d / "manifest.json")
            metrics = read_json(d / "metrics.json")
        except PermissionError as exc:  # a version there, but not for this user: saying none would mislead
            raise ArtifactError(f"{d} cannot be read ({exc.strerror}): the registry's files must be readable by "
                                "every user that serves or manages it") from None
        except (OSError, ValueError):
            continue  # not a complete version
        if not isinstance(manifest, dict) or not isinstance(metrics, dict) \
                or not isinstance(manifest.get("created_at", ""), str):
            continue  # not a version this code wrote: as unreadable as a missing manifest
        files = manifest.get("files")
        out.append(VersionInfo(d.name, d, manifest.get("created_at", ""), metrics, d.name == cur,
                               files if isinstance(files, dict) else None))
    return out


def _is_file_name(name: str) -> bool:
    """A name of a file in the version directory itself, not a path to one elsewhere."""
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def verify(path: str | Path) -> dict[str, Any]:
    """Check the manifest's checksums, and that it lists every file a version holds; return the manifest."""
    d = Path(path)
    try:
        manifest = read_json(d / "manifest.json")
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{d}: manifest.json unreadable ({exc})") from None
    files = manifest.get("files", {}) if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise ArtifactError(f"{d}: manifest.json is not a version manifest (expected a JSON object whose \"files\" "
                            "maps each file name to its sha256)")
    odd = [name for name in files if not _is_file_name(name)]
    if odd:
        raise ArtifactError(f"{d}: manifest.json lists {odd[0]!r}, which is no file name of the version directory")
    unlisted = [name for name in REQUIRED_FILES if name not in files]
    if unlisted:
        raise ArtifactError(f"{d}: manifest.json does not list {', '.join(unlisted)} (the files of every version, "
                            "each with its sha256)")
    for name, digest in files.items():
        f = d / name
        if not f.exists():
            raise ArtifactError(f"{d}: {name} is missing")
        try:
            actual = _sha256(f)
        except OSError as exc:
            raise ArtifactError(f"{d}: {name} unreadable ({exc})") from None
        if actual != digest:
            raise ArtifactError(f"{d}: checksum mismatch for {name}")
    return manifest


def version_settings(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The HRNN and data settings a version was trained with, as its config.json holds them (OSError, ValueError,
    KeyError or TypeError where it cannot be read so)."""
    cfg = read_json(Path(path) / "config.json")
    # versions written before window_profile existed were trained without it
    return {"window_profile": False, **cfg["hrnn"]}, dict(cfg["data"])


def _refuse_unknown_settings(d: Path, hrnn: dict[str, Any], data: dict[str, Any]) -> None:
    """A setting this build does not know (a version from a newer trainer) would be dropped, and the version
    served otherwise than it was trained and evaluated: refused, as `hrnn train --config` refuses it."""
    unknown = sorted(set(hrnn) - field_names(HRNNConfig)) + sorted(set(data) - field_names(DataConfig))
    if unknown:
        raise ArtifactError(f"{d}: config.json has settings this build does not know ({', '.join(unknown)}): a "
                            "version trained by a newer release is served by that release")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_lines(exc: BaseException, n: int) -> str:
    """An exception's first n non-empty lines on one line, without terminal colours (torch adds them): a refusal
    goes to a one-line log record and a CLI error. Says so when the exception has no message."""
    lines = [line.strip() for line in _ANSI.sub("", str(exc)).splitlines() if line.strip()]
    return "; ".join(lines[:n]) or "no message (the file is empty or cut short?)"


def load_version(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load and validate a version: checksums, config, item index and weight shapes."""
    d = Path(path)
    manifest = verify(d)
    try:
        hrnn, data = version_settings(d)
        _refuse_unknown_settings(d, hrnn, data)
        items = read_json(d / "items.json")
        metrics = read_json(d / "metrics.json")
        config = load_config(HRNNConfig, file_values=hrnn, validate=False)
        config.validate(published=True)
        data_config = load_config(DataConfig, file_values=data)
        state = torch.load(d / "weights.pt", map_location="cpu", weights_only=True)
        item_ids = [str(i) for i in items["item_ids"]]
        event_types = list(items.get("event_types", []))
    # TypeError, AttributeError: a file that is JSON but not of the shape written (a list for an object...);
    # EOFError, UnpicklingError: a weights.pt that is empty, cut short, or pickles more than tensors
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, EOFError,
            pickle.UnpicklingError) as exc:
        raise ArtifactError(f"{d}: cannot read version ({type(exc).__name__}: {_first_lines(exc, 1)})") from None
    model = HRNN(len(item_ids), config)
    # versions written before rank calibration have no window offset; they were served without one
    state = {**{k: v for k, v in model.state_dict().items() if k == WINDOW_OFFSET}, **state}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        # torch's first line only says there are errors; the next ones name each tensor and both shapes
        raise ArtifactError(f"{d}: weights do not fit the config/item index: {_first_lines(exc, 4)}") from None
    model.to(device).eval()
    return LoadedModel(manifest.get("version", d.name), d, model, config, data_config, item_ids, event_types,
                       metrics)

