"""Canary serving: a new model version serves a share of the users while the stable one serves the rest.

A user's side is a pure function of the user id, the canary version and the share (`in_canary`), so every
worker of the group, and every restart, puts a user on the same side, and a user sees one version's lists
for the whole canary. The hash is salted with the canary version: each canary is tried on another random
set of users, while raising one canary's share only adds users (the set at 5% lies within the set at 20%).

The two versions serve over the same hours to disjoint random sets of users, so `hrnn quality` read over
that time compares them as an experiment, not as one day against another; `decide` turns that comparison
into promote, end or wait (`hrnn quality --decide-canary`).

That judge runs again and again (a daily job) on a growing experiment, and stops at the first answer. A
plain 95% interval, looked at every day, is wrong far more often than 5% of the time over the canary's
life; so `decide` uses by default an anytime-valid interval (a confidence sequence: Waudby-Smith, Arbour,
Sinha, Kennedy and Ramdas, "Time-uniform central limit theory and asymptotic confidence sequences", 2024,
Theorem 2.2), which covers the true difference at every look at once with about 95% probability, at the
price of a wider interval at any one look (`bench/canary_peeking.py` measures both).
"""
from __future__ import annotations

import hashlib
import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from model.errors import HRNNError
from stream.quality import Z95

if TYPE_CHECKING:
    from model.inference import Recommender
    from stream.quality import Comparison

_BUCKETS = 1 << 32
T = TypeVar("T")
ALPHA = 0.05
PLANNED_USERS = 2000  # where the anytime interval is narrowest; it widens slowly on either side


class ShareError(HRNNError):
    """A canary share outside (0, 1)."""


def check_share(share: float) -> float:
    """`share` itself if it is a canary share (strictly between 0 and 1), else ShareError."""
    if not 0.0 < share < 1.0:
        raise ShareError(f"a canary's share of users must lie strictly between 0 and 1, got {share!r} "
                         "(to serve a version to everyone, promote it)")
    return share


def serving_share(share: float) -> float:
    """`share` of a version's announcement or request: 1 (everyone) or a canary share, else ShareError."""
    return 1.0 if share == 1.0 else check_share(share)


def _bucket(user_id: str, canary_version: str) -> int:
    digest = hashlib.blake2b(user_id.encode(), digest_size=4, key=canary_version.encode()[:64]).digest()
    return int.from_bytes(digest, "big")


def in_canary(user_id: str, canary_version: str, share: float) -> bool:
    """Whether `user_id` is served by the canary `canary_version` at `share`."""
    return _bucket(user_id, canary_version) < share * _BUCKETS


def split_as_canary(version: str, its_users: Iterable[str], other_users: Iterable[str]) -> bool:
    """Whether two disjoint sets of users lie on the sides `version`, as a canary, puts users on at some share:
    all of `its_users` hash below all of `other_users` (by `version`'s key). Sets that were not split by that
    hash pass by chance once in C(n, k) (k of n users): for a canary of 5 users among 50, once in two million."""
    mine, others = [_bucket(u, version) for u in its_users], [_bucket(u, version) for u in other_users]
    return bool(mine) and bool(others) and max(mine) < min(others)


# Below it, users split as much like a canary's as `canary_split_chance` measures were not split at random.
SPLIT_CHANCE = 1e-6


def canary_split_chance(version: str, its_users: Iterable[str], other_users: Iterable[str]) -> float:
    """How likely two sides of users drawn at random (as many on each) look at least this much split by
    `version`'s canary hash: as many of `its_users` hashing below all of `other_users`, and as many of those
    above all of `its_users`. A share raised (or lowered) mid-way leaves users of the range between its shares
    on either side, by when they were active, so `split_as_canary` fails for the real canary; but by its key
    the users below its smaller share are still all its, and those above its larger share all the other's,
    while by another key the sides interleave from end to end. 1/C(n, k) for a split at one share; 1 when a
    side is empty."""
    mine = sorted(_bucket(u, version) for u in its_users)
    others = sorted(_bucket(u, version) for u in other_users)
    if not mine or not others:
        return 1.0
    below = bisect_left(mine, others[0])  # of its users, those below every other user
    above = len(others) - bisect_right(others, mine[-1])  # of the others, those above every one of its users
    n, k = len(mine) + len(others), len(mine)
    return math.exp(_log_comb(n - below - above, k - below) - _log_comb(n, k))


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


@dataclass(frozen=True)
class Serving:
    """What serves one batch: the stable version, and a canary with its share of users or none."""

    stable: Recommender
    canary: Recommender | None = None
    share: float = 0.0

    @property
    def shares(self) -> dict[str, float]:
        """version -> share of users it serves."""
        if self.canary is None:
            return {self.stable.version: 1.0}
        return {self.stable.version: 1.0 - self.share, self.canary.version: self.share}

    def split(self, items: Sequence[T], user_of: Callable[[T], str]) -> list[tuple[Recommender, list[T]]]:
        """`items` grouped by the version serving their user, order kept within a group; no empty group."""
        if self.canary is None:
            return [(self.stable, list(items))] if items else []
        version, share = self.canary.version, self.share
        stable: list[T] = []
        canary: list[T] = []
        for x in items:
            (canary if in_canary(user_of(x), version, share) else stable).append(x)
        return [(m, g) for m, g in ((self.stable, stable), (self.canary, canary)) if g]


def anytime_z(users: int, planned_users: int = PLANNED_USERS, alpha: float = ALPHA) -> float:
    """The multiple of the standard error that makes the asymptotic confidence sequence after `users`
    independent users (Theorem 2.2 of the paper above, with rho tuned for `planned_users`): 3.04 there
    for alpha 0.05, against 1.96 for a single look."""
    if users < 1 or planned_users < 1:
        raise ValueError(f"users and planned_users must be >= 1, got {users} and {planned_users}")
    log_a = -2 * math.log(alpha)
    t_rho2 = users * (log_a + math.log(log_a + 1)) / planned_users
    return math.sqrt(2 * (t_rho2 + 1) / t_rho2 * math.log(math.sqrt(t_rho2 + 1) / alpha))


@dataclass(frozen=True)
class Decision:
    action: str  # "promote" | "end" | "wait"
    reason: str


@dataclass(frozen=True)
class Rule:
    """How `decide` judges a canary."""

    max_loss: float = 0.01  # the largest loss of a metric (absolute) a promotion may risk
    # On each side, before any decision, end as well as promote: the interval is asymptotic and its per-user
    # standard error is badly underestimated on a few users (0 when all of a handful missed), so on a tiny
    # side it would end an equal canary far more often than its 95% says.
    min_users: int = 100
    anytime: bool = True  # False: the plain 95% interval, right only for one look at a size fixed in advance
    planned_users: int = PLANNED_USERS


def decide(comparison: Comparison | None, rule: Rule = Rule()) -> Decision:
    """What to do with a canary, from its comparison with the stable version (candidate = the canary).

    Neither end nor promote before `min_users` users on each side: the intervals' standard errors are only
    right on many users (on a handful, all of whom missed, one is 0).
    end      it did worse on some metric: the whole interval of the difference lies below 0
    promote  on every metric the interval rules out a loss larger than `max_loss` (absolute): a
             non-inferiority test, so "no difference shown" is not enough
    wait     neither yet: more users will narrow the intervals"""
    if comparison is None:
        return Decision("wait", "the canary has not served side by side with the stable version yet")
    max_loss, min_users = rule.max_loss, rule.min_users
    users = min(e.users for pair in comparison.metrics.values() for e in pair)
    if users < min_users:
        return Decision("wait", f"{users} users on the smaller side, {min_users} needed before the canary is "
                                "ended or promoted")
    kind = "anytime 95%" if rule.anytime else "95%"
    z = anytime_z(comparison.users, rule.planned_users) if rule.anytime else Z95
    bounds = {m: (d - z * se, d + z * se) for m, (d, se) in
              ((m, comparison.difference_se(m)) for m in comparison.metrics)}
    worse = [m for m, (_, high) in bounds.items() if high < 0]
    if worse:
        return Decision("end", f"worse than the stable version beyond the {kind} interval on {', '.join(worse)}")
    short = {m: low for m, (low, _) in bounds.items() if not low > -max_loss}
    if short:
        return Decision("wait", "a loss larger than the allowed {:g} is not ruled out yet by the {} interval on {}"
                        .format(max_loss, kind, ", ".join(f"{m} (it reaches {b:+.4f})" for m, b in short.items())))
    return Decision("promote", f"no loss larger than {max_loss:g} on any metric ({kind} lower bounds: "
                    + ", ".join(f"{m} {low:+.4f}" for m, (low, _) in bounds.items()) + f"), {users}+ users per side")
