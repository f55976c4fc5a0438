"""Model announcements: the `hrnn.model-updates` topic, announcing a version, and following it.

The topic is compacted with one partition; the key is the registry id, the value JSON
`{"version", "path", "announced_at", "reason", "share"}`. A share below 1 announces a canary: the version
serves that share of the users beside the stable one (stream/canary.py); a record without it (written
before canaries) announces a full rollout. Compaction keeps the latest announcement of
every registry, so a process starting later reads the whole (small) topic from the beginning
and knows which version to serve; no consumer group is involved.

Reading the topic whole and then following it is stream/compacted.py's.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from model.errors import HRNNError
from stream.canary import ShareError, serving_share
from stream.compacted import CompactedTopicReader, ensure_table_topic
from stream.kafka_clients import ClientSettings, create_producer, produce_acknowledged
from stream.topics import MODEL_UPDATES_TOPIC

log = logging.getLogger(__name__)

REASONS = ("retrain", "promote", "rollback", "canary")


class AnnouncementError(HRNNError):
    """An announcement could not be sent, or a record on the topic is not an announcement."""


@dataclass(frozen=True)
class Announcement:
    version: str
    path: str  # the version directory as the announcer saw it
    announced_at: str  # ISO-8601 UTC
    reason: str  # one of REASONS
    registry_id: str = ""  # the record key
    share: float = 1.0  # of the users; below 1: a canary beside the stable version

    def announced_epoch_s(self) -> float | None:
        """`announced_at` in epoch seconds; None when it is not an ISO-8601 time (a record written by hand)."""
        try:
            at = datetime.fromisoformat(self.announced_at)
        except ValueError:
            return None
        return (at if at.tzinfo is not None else at.replace(tzinfo=timezone.utc)).timestamp()

    def value(self) -> bytes:
        obj = {k: v for k, v in asdict(self).items() if k != "registry_id"}
        return json.dumps(obj, sort_keys=True).encode()

    @classmethod
    def decode(cls, key: bytes | None, value: bytes | None) -> "Announcement":
        if value is None:
            raise AnnouncementError("announcement has no value (a tombstone)")
        try:
            obj = json.loads(value)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: deeply nested JSON
            raise AnnouncementError(f"announcement is not JSON: {type(exc).__name__}: {str(exc)[:200]}") from None
        if not isinstance(obj, dict):
            raise AnnouncementError("announcement must be a JSON object")
        missing = [f for f in ("version", "path") if not isinstance(obj.get(f), str) or not obj.get(f)]
        if missing:
            raise AnnouncementError(f"announcement lacks {', '.join(missing)}")
        share = obj.get("share", 1.0)
        try:
            if isinstance(share, bool) or not isinstance(share, (int, float)):
                raise ShareError("not a number")
            share = serving_share(share)
        except ShareError:
            raise AnnouncementError(f"announcement's share must be a number in (0, 1], got {share!r}") from None
        return cls(obj["version"], obj["path"], str(obj.get("announced_at", "")), str(obj.get("reason", "")),
                   key.decode("utf-8", "replace") if key else "", share)


def registry_id(registry: str | Path) -> str:
    """Default key of a registry's announcements: its absolute directory."""
    return str(Path(registry).resolve())


def registry_id_for(version_path: str | Path) -> str:
    """Default key: the absolute registry directory (the version directory's parent)."""
    return registry_id(Path(version_path).resolve().parent)


def announce(bootstrap: str, topic: str, version: str, path: str | Path, *, reason: str = "promote",
             registry_id: str | None = None, extra: ClientSettings | None = None,
             timeout_s: float = 30.0, share: float = 1.0) -> Announcement:
    """Publish that `version` (at `path`) is the one to serve (with `share` below 1: the canary serving that
    share of the users); returns what was sent once it is acknowledged."""
    if reason not in REASONS:
        raise AnnouncementError(f"reason must be one of {', '.join(REASONS)}, got {reason!r}")
    share = serving_share(share)
    ensure_table_topic(bootstrap, topic, extra=extra, timeout_s=timeout_s)
    ann = Announcement(version, str(Path(path).resolve()), datetime.now(timezone.utc).isoformat(), reason,
                       registry_id or registry_id_for(path), share)
    failure = produce_acknowledged(create_producer(bootstrap, extra), topic,
                                   [(ann.registry_id.encode(), ann.value())], timeout_s=timeout_s)
    if failure:
        raise AnnouncementError(f"announcing {version} on {topic!r} failed: {failure}")
    log.info("model version announced", extra={"version": version, "path": ann.path, "reason": reason,
                                                "share": ann.share, "registry_id": ann.registry_id, "topic": topic})
    return ann


def latest_announcement(bootstrap: str, topic: str, registry_id: str, *, extra: ClientSettings | None = None,
                        timeout_s: float = 30.0) -> Announcement | None:
    """The registry's latest announcement on `topic` (None if it has none), read once."""
    with AnnouncementWatcher(bootstrap, topic, registry_id=registry_id, extra=extra) as watcher:
        if not watcher.wait_caught_up(timeout_s):
            raise AnnouncementError(f"could not read {topic!r} on {bootstrap}: "
                                    f"{watcher.error or f'not read to its end within {timeout_s:g} s'}")
        return watcher.latest


def latest_canary(bootstrap: str, topic: str, registry_id: str, *, extra: ClientSettings | None = None,
                  timeout_s: float = 30.0) -> Announcement | None:
    """The registry's latest announcement if it announces a canary (one serving now), else None."""
    ann = latest_announcement(bootstrap, topic, registry_id, extra=extra, timeout_s=timeout_s)
    return ann if ann is not None and ann.share < 1.0 else None


Callback = Callable[[Announcement], None]


class AnnouncementWatcher(CompactedTopicReader):
    """Follows the announcements topic on a background thread.

    `on_announcement` gets, once caught up, the latest announcement present at start (if any),
    then every new one in order; history older than the latest is never replayed, so a
    starting worker does not walk through old versions. With `registry_id`, other keys are ignored.
    A tombstone on a registry's key retires its announcement: `latest` is None again, and nothing is delivered
    for it (a running worker keeps what it serves; one starting serves the registry's CURRENT).
    """

    thread_name = "hrnn-announcement-watcher"

    def __init__(self, bootstrap: str, topic: str = MODEL_UPDATES_TOPIC, *, registry_id: str | None = None,
                 on_announcement: Callback | None = None, extra: ClientSettings | None = None,
                 poll_timeout_s: float = 0.5, create_topic: bool = True) -> None:
        super().__init__(bootstrap, topic, extra=extra, poll_timeout_s=poll_timeout_s, create_topic=create_topic)
        self.registry_id, self.on_announcement = registry_id, on_announcement
        self.received = 0  # valid announcements read (matching registry_id); `malformed`: see the base class
        self._latest: Announcement | None = None
        self._news: list[Announcement | str] = []  # a str: the registry id whose key a tombstone retired
        self._changed = threading.Condition()

    @property
    def latest(self) -> Announcement | None:
        return self._latest

    def wait_for(self, version: str, timeout_s: float) -> Announcement | None:
        """Block until the latest announcement names `version`; None at the deadline."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._latest is None or self._latest.version != version:
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None:
                    return None
                self._changed.wait(min(left, 0.5))
            return self._latest

    def _take(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        if value is None:
            retired = key.decode("utf-8", "replace") if key else None
            if retired is not None and self.registry_id in (None, retired):
                self._news.append(retired)
            return
        ann = self._decode(key, value, offset)
        if ann is not None:
            self._news.append(ann)

    def _polled(self, caught_up_now: bool) -> None:
        news, self._news = self._news, []
        if news:
            self._set_latest(_after(self._latest, news))
        if caught_up_now:
            log.info("announcement watcher caught up", extra={
                "topic": self.topic, "latest_version": self._latest.version if self._latest else None})
            if self._latest is not None:
                self._deliver(self._latest)
        elif self.caught_up:
            for ann in news:
                if isinstance(ann, Announcement):
                    self._deliver(ann)

    def _decode(self, key: bytes | None, value: bytes, offset: int) -> Announcement | None:
        try:
            ann = Announcement.decode(key, value)
        except AnnouncementError as exc:
            self.malformed += 1
            log.warning("skipping a malformed announcement: %s", exc, extra={"topic": self.topic, "offset": offset})
            return None
        if self.registry_id is not None and ann.registry_id != self.registry_id:
            return None
        self.received += 1
        return ann

    def _set_latest(self, ann: Announcement) -> None:
        with self._changed:
            self._latest = ann
            self._changed.notify_all()

    def _deliver(self, ann: Announcement) -> None:
        if self.on_announcement is None:
            return
        try:
            self.on_announcement(ann)
        except Exception:  # a faulty callback must not stop the watcher
            log.exception("announcement callback failed", extra={"version": ann.version})


def _after(latest: Announcement | None, news: list[Announcement | str]) -> Announcement | None:
    """The latest announcement once `news` is applied in order: a str (a tombstone's registry id) retires the
    announcement of that registry, so there is none until the next one."""
    for item in news:
        if isinstance(item, Announcement):
            latest = item
        elif latest is not None and latest.registry_id == item:
            latest = None
    return latest
