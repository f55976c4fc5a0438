"""`hrnn quality`: each recommendation judged by its user's next event, per model version."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from model.events import Event, encode_event
from stream.cli_quality import print_report
from stream.kafka_clients import Record
from stream.quality import (REFERENCE, Judge, QualityReport, Verdicts, bucket_ms_for, plot_quality, quality_worker,
                            with_gaps)
from stream.records import (Recommendation, ScoredItem, decode_recommendation, encode_recommendation,
                            repartition_headers)
from worker_testkit import make_events, make_registry, produce, records_of, resign, running, settings_for, wait_until

HRNN = str(Path(sys.executable).with_name("hrnn"))
LOG = "01" * 16
T0 = 1_700_000_000_000


def _event(p: int, offset: int, user: str, item: str, key: str | None = None) -> Record:
    value = encode_event(Event(user, item, "click", T0 + offset * 1000))
    return Record("ev", p, offset, (key or user).encode(), value, None)


def _rec(p: int, offset: int, items: list[str], *, session: str = "s1", version: str = "v1", emitted: int = 0,
         log: str | None = LOG, user: str = "u1") -> Record:
    value = encode_recommendation(Recommendation(
        user_id=user, items=[ScoredItem(i, 1.0 / n) for n, i in enumerate(items, 1)], model_version=version,
        session_id=session, event_id=None, source_partition=p, source_offset=offset, event_timestamp=T0,
        emitted_at=T0 + emitted, source_topic="ev", source_log=log))
    return Record("rec", 0, 0, user.encode(), value, None)


def _report(events: list[Record], recs: list[Record], bounds=None, ks=(1, 5, 20), judged_from=None) -> QualityReport:
    bounds = bounds or {p: (0, 100) for p in {e.partition for e in events}}
    judge = Judge(bounds, "ev", LOG, depth=max(ks), judged_from=judged_from)
    for r in events:
        judge.add_event(r)
    for r in recs:
        judge.add_recommendation(r)
    return QualityReport("ev", "rec", list(ks), None, judge.verdicts(), judge.pending, LOG)


def _row(report: QualityReport, name: str, kind: str = "all") -> dict:
    return next(r for r in report.rows() if r["name"] == name and r["kind"] == kind)


def test_a_recommendation_is_judged_by_the_rank_of_its_users_next_item():
    events = [_event(0, 0, "u1", "a"), _event(0, 1, "u2", "x"), _event(0, 2, "u1", "b"), _event(0, 3, "u1", "c")]
    recs = [_rec(0, 0, ["b", "z"]), _rec(0, 1, ["x"], user="u2"), _rec(0, 2, ["z", "y", "c"]),
            _rec(0, 3, ["a"], session="s2")]
    report = _report(events, recs)
    row = _row(report, "v1")
    assert row["judged"] == 2 and report.pending == 2  # u2's only event and u1's last await a next event
    assert (row["recall@1"], row["recall@5"]) == (0.5, 1.0)
    assert row["mrr@20"] == pytest.approx((1 + 1 / 3) / 2)
    # 0 -> 2 stayed in session s1; 2 -> 3 opened s2
    assert _row(report, "v1", "same session")["judged"] == 1 and _row(report, "v1", "same session")["recall@1"] == 1
    assert _row(report, "v1", "next session")["judged"] == 1 and _row(report, "v1", "next session")["recall@1"] == 0


def test_the_reference_ranks_the_users_own_distinct_items_newest_first():
    events = [_event(0, o, "u1", item) for o, item in enumerate(["a", "b", "a", "c", "b"])]
    recs = [_rec(0, o, []) for o in range(5)]
    report = _report(events, recs)
    ref = _row(report, REFERENCE)
    # next items b (not seen), a (rank 2 of [b, a]), c (unseen), b (rank 3 of [c, a, b])
    assert ref["judged"] == 4 and ref["recall@1"] == 0 and ref["recall@5"] == 0.5
    assert ref["mrr@20"] == pytest.approx((1 / 2 + 1 / 3) / 4)
    assert _row(report, "v1")["recall@20"] == 0  # empty lists hit nothing


def test_a_replayed_answer_is_judged_once_and_other_logs_and_offsets_outside_the_window_not_at_all():
    events = [_event(0, o, "u1", item) for o, item in zip(range(10, 14), "abcd")]
    recs = [_rec(0, 10, ["b"]), _rec(0, 10, ["z"]),  # a replay's second answer does not count again
            _rec(0, 11, ["c"], log="02" * 16),  # the answer to a deleted log of the same name
            _rec(0, 9, ["a"]), _rec(0, 20, ["a"]),  # offsets outside those read
            _rec(0, 12, ["d", "c"])]
    report = _report(events, recs, bounds={0: (10, 14)})
    row = _row(report, "v1")
    assert (row["judged"], row["recall@1"], report.pending) == (2, 1.0, 0)


def test_an_event_the_worker_dead_letters_for_its_timestamp_is_no_users_next_event(monkeypatch, tmp_path):
    """README: a recommendation is judged by the item of its user's next valid event. One stamped more than
    max_event_lead_s ahead of its record is dead-lettered (bad_timestamp): the worker answers the one after it."""
    import stream.quality
    from confluent_kafka import Message

    from stream.worker import route
    hour = 3_600_000
    msgs = [Message(topic="ev", partition=0, offset=o, key=b"u1", value=encode_event(Event("u1", item, "click", at)),
                    timestamp=(1, T0)) for o, item, at in ((0, "a", T0), (1, "junk", T0 + 2 * hour), (2, "b", T0))]
    assert [e.offset for e in route(msgs, max_lead_s=3600).events] == [0, 2]
    events, recs = [Record.from_message(m) for m in msgs], [_rec(0, 0, ["b"]), _rec(0, 2, ["c"])]
    row = _row(_report(events, recs), "v1")  # the workers' default lead, 3600 s
    assert (row["judged"], row["recall@1"]) == (1, 1.0)

    # Workers that check no lead (0) answer the junk event, and it is the next one: so the judge reads their setting.
    assert [e.offset for e in route(msgs, max_lead_s=0).events] == [0, 1, 2]
    judge = Judge({0: (0, 3)}, "ev", LOG, depth=20, max_event_lead_s=0)
    for r in events:
        judge.add_event(r)
    judge.add_recommendation(_rec(0, 0, ["b"]))
    assert judge.verdicts().rank.tolist() == [0]
    seen = {}
    monkeypatch.setattr(stream.quality, "quality", lambda *a, **kw: seen.update(kw))
    quality_worker(settings_for("127.0.0.1:9", tmp_path, tmp_path, max_event_lead_s=60.0))
    assert seen["max_event_lead_s"] == 60.0


def test_events_read_as_history_inform_the_reference_but_are_not_judged():
    events = [_event(0, o, "u1", item) for o, item in enumerate("abcab")]
    recs = [_rec(0, o, ["z"]) for o in range(5)]
    report = _report(events, recs, judged_from={0: 2})
    # judged: 2 -> a (rank 3 of [c, b, a]) and 3 -> b (rank 3 of [a, c, b]); 4 awaits its next event
    assert (_row(report, "v1")["judged"], report.pending) == (2, 1)
    assert _row(report, REFERENCE)["mrr@20"] == pytest.approx(1 / 3)


def test_a_next_item_ranked_past_the_largest_cutoff_in_a_list_of_any_length_is_a_miss():
    events = [_event(0, o, "u1", item) for o, item in enumerate("abc")]
    recs = [_rec(0, 0, ["z"] * 32_767 + ["b"]),  # b at 32,768: past what a 16-bit rank holds
            _rec(0, 1, ["z"] * 3 + ["c"] + ["y"] * 40_000)]
    row = _row(_report(events, recs), "v1")
    assert (row["judged"], row["recall@1"], row["recall@5"], row["recall@20"]) == (2, 0.0, 0.5, 0.5)


def test_dead_letters_and_mis_keyed_originals_are_not_events_of_the_user():
    bad = Record("ev", 0, 1, b"u1", b"{not json", None)
    events = [_event(0, 0, "u1", "a"), bad, _event(0, 2, "u1", "x", key="someone-else"), _event(0, 3, "u1", "b")]
    report = _report(events, [_rec(0, 0, ["b"])])
    assert _row(report, "v1")["judged"] == 1 and _row(report, "v1")["recall@1"] == 1.0


def test_a_second_re_keyed_copy_of_one_record_is_not_an_event_of_the_user():
    """Copied again after a crash before its batch committed: the worker applies (and answers) the first only."""
    def copy(offset: int, item: str, origin: int) -> Record:
        r = _event(1, offset, "u1", item)
        return Record(r.topic, r.partition, r.offset, r.key, r.value, None, tuple(repartition_headers("ev", 0, origin)))
    events = [copy(0, "a", 5), copy(1, "b", 6), copy(2, "a", 5), copy(3, "b", 6), _event(1, 4, "u1", "c")]
    report = _report(events, [_rec(1, 0, ["b"]), _rec(1, 1, ["c"]), _rec(1, 4, ["x"])])
    assert _row(report, "v1")["judged"] == 2 and _row(report, "v1")["recall@1"] == 1.0 and report.pending == 1


def test_versions_are_listed_in_the_order_they_first_served_and_charted_over_time(tmp_path):
    events = [_event(0, o, "u1", "a") for o in range(6)]
    recs = [_rec(0, o, ["a"] if o >= 3 else ["z"], version="new" if o >= 3 else "old", emitted=o * 10_000)
            for o in range(6)]
    report = _report(events, recs)
    assert report.verdicts.versions == ["old", "new"]
    assert [r["name"] for r in report.rows() if r["kind"] == "all"] == ["old", "new", REFERENCE]
    assert (_row(report, "old")["recall@1"], _row(report, "new")["recall@1"]) == (0.0, 1.0)
    series = report.series(20, 20_000)
    assert [(b - T0, n, recall) for b, n, recall, _ in series["old"]] == [(0, 2, 0.0), (20_000, 1, 0.0)]
    assert [(b - T0, n) for b, n, *_ in series["new"]] == [(20_000, 1), (40_000, 1)]
    assert bucket_ms_for(report) == 2000  # 40 s of judged recommendations in about 30 whole-second buckets
    png = plot_quality(report, tmp_path / "q.png", 20)
    assert png.stat().st_size > 10_000


def test_the_chart_breaks_a_versions_line_where_it_did_not_serve():
    t, recall, _ = with_gaps([(0, 3, 0.5, 0.2), (1000, 2, 0.6, 0.3), (5000, 1, 1.0, 1.0)], 1000)
    assert list(t) == [0, 1000, 2000, 5000]
    assert np.isnan(recall[2]) and list(recall[[0, 1, 3]]) == [0.5, 0.6, 1.0]
    assert [len(c) for c in with_gaps([], 1000)] == [0, 0, 0]


def _verdicts(rows: list[tuple[str, int, int, int]]) -> Verdicts:
    """(version, emitted ms, rank, user) per judged list."""
    names = list(dict.fromkeys(r[0] for r in rows))
    col = lambda i: np.array([r[i] for r in rows], np.int64)  # noqa: E731
    return Verdicts(names, np.array([names.index(r[0]) for r in rows]), col(1), col(2), np.zeros(len(rows), np.int64),
                    np.zeros(len(rows), np.int64), col(3))


def test_an_interval_counts_users_not_lists_as_the_independent_draws():
    two_users = _verdicts([("v", 0, 1 if u == 0 else 0, u) for u in (0, 1) for _ in range(10)])
    many_users = _verdicts([("v", 0, 1 if u < 10 else 0, u) for u in range(20)])
    every = np.ones(20, bool)
    a, b = two_users.estimate(every, 20, "recall"), many_users.estimate(every, 20, "recall")
    assert (a.value, a.lists, a.users) == (0.5, 20, 2) and (b.value, b.lists, b.users) == (0.5, 20, 20)
    assert a.se == pytest.approx(0.5)  # two users say little, however many lists they got
    assert b.se == pytest.approx(np.sqrt(20 / 19 * 20 * 0.25) / 20)
    assert a.half_width == pytest.approx(1.96 * a.se, rel=1e-4)
    assert a.to_dict() == {"value": 0.5, "se": a.se, "lists": 20, "users": 2, "half_width": a.half_width}
    mrr = _verdicts([("v", 0, r, u) for u, r in enumerate([1, 2, 4, 0])]).estimate(np.ones(4, bool), 3, "mrr")
    assert mrr.value == pytest.approx((1 + 1 / 2) / 4)  # rank 4 lies past k = 3


def test_a_canary_is_compared_with_the_stable_version_over_the_time_both_served_to_different_users():
    rows = [("stable", t, 0, u) for t in range(0, 100_000, 10_000) for u in range(10)]  # before the canary: not compared
    rows += [("stable", t, 1, u) for t in range(100_000, 200_000, 10_000) for u in range(8)]
    rows += [("canary", t, 0, u) for t in range(100_000, 200_000, 10_000) for u in (8, 9)]
    rows += [("canary", 150_000, 1, 7)]  # user 7 moved to the canary (its share was raised): left out of both
    report = QualityReport("ev", "rec", [20], None, _verdicts(rows), 0, LOG)
    (c,) = report.comparisons()
    assert (c.baseline, c.candidate, c.start_ms, c.end_ms, c.left_out_users) == ("stable", "canary", 100_000, 190_000, 1)
    stable, canary = c.metrics["recall@20"]
    assert (stable.value, stable.lists, stable.users) == (1.0, 70, 7) and (canary.value, canary.users) == (0.0, 2)
    assert c.difference("recall@20")[0] == -1.0
    assert json.loads(json.dumps(report.to_dict()))["comparisons"][0]["metrics"]["recall@20"]["difference"] == -1.0
    out = io.StringIO()
    print_report(report, out)
    assert "canary vs stable, served side by side to different users for 90 s" in out.getvalue()
    assert "recall@20: 0.0000 (20 lists, 2 users) vs 1.0000 (70, 7): -1.0000 ± " in out.getvalue()
    assert "1 user(s) who saw both left out" in out.getvalue() and ", worse (anytime ± " in out.getvalue()
    swap = _verdicts([("old", t, 0, u) for t in range(5) for u in range(3)] +
                     [("new", t, 0, u) for t in range(4, 9) for u in range(3)])
    assert QualityReport("ev", "rec", [20], None, swap, 0, LOG).comparisons() == []  # one after the other


def _opening_mid_canary(canary: str = "v2", share: float = 0.3) -> QualityReport:
    """Three events of each of 60 users, read from a time a canary already served: the stable version's lists
    hold each next item, the canary's do not, and the first list read is one of the canary's."""
    from stream.canary import in_canary

    users = sorted((f"user-{n}" for n in range(60)), key=lambda u: not in_canary(u, canary, share))
    assert in_canary(users[0], canary, share) and not in_canary(users[-1], canary, share)
    events, recs = [], []
    for step in range(3):
        for user in users:
            offset, side = len(events), canary if in_canary(user, canary, share) else "v1"
            events.append(_event(0, offset, user, f"i{step}"))
            recs.append(_rec(0, offset, [f"i{step + 1}"] if side == "v1" else ["other"], version=side,
                             emitted=offset, user=user))
    return _report(events, recs, bounds={0: (0, len(events))})


def test_the_canary_is_the_candidate_even_when_what_was_read_opens_on_one_of_its_lists(monkeypatch, capsys):
    import stream.quality
    from stream.cli import main as hrnn

    report = _opening_mid_canary()
    assert report.verdicts.versions == ["v2", "v1"]  # first to serve in what was read: the canary
    (c,) = report.comparisons()
    assert (c.baseline, c.candidate, c.verdict("recall@20")) == ("v1", "v2", "worse")
    monkeypatch.setattr(stream.quality, "quality_worker", lambda settings, **kw: report)
    assert hrnn(["quality", "--bootstrap-servers", "127.0.0.1:9", "--fail-if-worse"]) == 1
    assert "v2 vs v1 on recall@20" in capsys.readouterr().err


def test_the_canary_is_the_candidate_when_its_share_was_raised_while_what_was_read_opens_on_one_of_its_lists(
        monkeypatch, capsys):
    """Raised from 20% to 50% mid-way: users of that range active only before stay on the stable side, those
    active only after are the canary's, so neither side lies wholly below the other by the canary's key."""
    import stream.quality
    from stream.canary import in_canary
    from stream.cli import main as hrnn

    users = sorted((f"user-{n}" for n in range(240)), key=lambda u: not in_canary(u, "v2", 0.2))
    events, recs = [], []
    for phase, share in enumerate((0.2, 0.5)):
        for step in range(2):
            for n, user in enumerate(users):
                if n % 3 == 1 - phase:
                    continue  # active before the raise only (n % 3 == 0), after it only (1), or both (2)
                offset, side = len(events), "v2" if in_canary(user, "v2", share) else "v1"
                item = f"i{phase}{step}"
                events.append(_event(0, offset, user, item))
                recs.append(_rec(0, offset, ["other"] if side == "v2" else [f"i{phase}{step + 1}", f"i{phase + 1}0"],
                                 version=side, emitted=offset, user=user))
    report = _report(events, recs, bounds={0: (0, len(events))})
    assert report.verdicts.versions == ["v2", "v1"]  # first to serve in what was read: the canary
    (c,) = report.comparisons()
    assert c.left_out_users > 0  # users of the raised range active before and after saw both
    assert (c.baseline, c.candidate, c.verdict("recall@20")) == ("v1", "v2", "worse")
    monkeypatch.setattr(stream.quality, "quality_worker", lambda settings, **kw: report)
    assert hrnn(["quality", "--bootstrap-servers", "127.0.0.1:9", "--fail-if-worse"]) == 1
    assert "v2 vs v1 on recall@20" in capsys.readouterr().err


def test_a_comparison_faces_either_version_as_its_baseline():
    (c,) = _opening_mid_canary().comparisons()
    flipped = c.facing("v2")
    assert (flipped.baseline, flipped.candidate) == ("v2", "v1") and flipped.facing("v1") == c
    assert flipped.difference("mrr@20")[0] == -c.difference("mrr@20")[0] > 0 and c.facing("v1") is c


def test_fail_if_worse_exits_1_when_a_canary_did_worse_beyond_its_interval(monkeypatch, capsys):
    import stream.quality
    from stream.cli import main as hrnn

    def judged(candidate_rank: int) -> QualityReport:
        rows = [("stable", t, 1, u) for t in range(0, 100_000, 10_000) for u in range(20)]
        rows += [("canary", t, candidate_rank, u) for t in range(0, 100_000, 10_000) for u in range(20, 40)]
        return QualityReport("ev", "rec", [20], None, _verdicts(rows), 0, LOG)

    flags = ["quality", "--bootstrap-servers", "127.0.0.1:9", "--fail-if-worse"]
    monkeypatch.setattr(stream.quality, "quality_worker", lambda settings, **kw: judged(0))
    assert hrnn(flags) == 1
    assert "worse beyond the 95% interval: canary vs stable on recall@20; canary vs stable on mrr@20" \
        in capsys.readouterr().err
    assert hrnn(flags[:-1]) == 0  # without the flag, a report is a report
    monkeypatch.setattr(stream.quality, "quality_worker", lambda settings, **kw: judged(1))
    assert hrnn(flags) == 0 and "no difference shown" in capsys.readouterr().out


def test_a_canary_promoted_and_then_rolled_back_is_compared_only_over_the_time_both_served(monkeypatch, capsys):
    import stream.quality
    from stream.cli import main as hrnn

    heavy = set(range(50)) | set(range(100, 110))  # active throughout; the same rank whichever version serves
    rank = lambda u: 0 if u in heavy else 1  # noqa: E731
    rows = [(name, t, rank(u), u) for t in range(0, 100_000, 10_000)  # the canary: C beside S
            for name, users in (("S", range(100)), ("C", range(100, 120))) for u in users]
    rows += [("C", t, rank(u), u) for t in range(100_000, 200_000, 10_000) for u in heavy]  # C promoted
    rows += [("S", t, rank(u), u) for t in range(200_000, 300_000, 10_000) for u in heavy]  # rolled back to S
    report = QualityReport("ev", "rec", [20], None, _verdicts(rows), 0, LOG)
    (c,) = report.comparisons()
    # Over [first C, last C] S's heavy users saw C as well: left out of S's side only, S would have looked better.
    assert (c.baseline, c.candidate, c.start_ms, c.end_ms, c.left_out_users) == ("S", "C", 0, 90_000, 0)
    assert (c.bucket_ms, c.side_by_side_ms, c.alone_ms) == (10_000, 90_000, 100_000)
    stable, canary = c.metrics["recall@20"]
    assert (stable.users, canary.users) == (100, 20) and c.difference("recall@20")[0] == 0.0
    out = io.StringIO()
    print_report(report, out)
    assert ("C vs S, served side by side to different users for 90 s (only the 10 s buckets in which both served "
            "lists; 100 s in which one served alone left out; 95% intervals by user):") in out.getvalue()
    monkeypatch.setattr(stream.quality, "quality_worker", lambda settings, **kw: report)
    assert hrnn(["quality", "--bootstrap-servers", "127.0.0.1:9", "--fail-if-worse"]) == 0
    assert "no difference shown" in capsys.readouterr().out


def test_a_canary_announced_mid_bucket_is_compared_from_its_first_list_not_from_the_buckets_start():
    """The stable version's lists to the canary's users before the announcement share its time bucket: counted,
    every canary user would have "seen both" and been left out, and no comparison made."""
    rows = [("stable", t, 1, u) for t in range(0, 155_000, 5_000) for u in range(100)]
    rows += [("stable" if u < 80 else "canary", t, 1, u) for t in range(155_000, 300_000, 5_000) for u in range(100)]
    report = QualityReport("ev", "rec", [20], None, _verdicts(rows), 0, LOG)
    assert 155_000 % bucket_ms_for(report)  # the announcement falls inside a bucket
    (c,) = report.comparisons()
    a, b = c.metrics["recall@20"]
    assert (c.start_ms, c.end_ms, c.left_out_users) == (155_000, 295_000, 0) and {a.users, b.users} == {80, 20}
    assert c.difference("recall@20")[0] == 0.0


def test_the_json_report_holds_null_where_a_figure_has_nothing_to_judge(monkeypatch, tmp_path):
    import stream.quality
    from stream.cli import main as hrnn

    # No next-session lists (kind 0), and one user on the canary's side: NaN figures and standard errors.
    rows = [("stable", t, 1, u) for t in range(0, 100_000, 10_000) for u in range(5)]
    rows += [("canary", t, 1, 5) for t in range(0, 100_000, 10_000)]
    report = QualityReport("ev", "rec", [20], None, _verdicts(rows), 0, LOG)
    monkeypatch.setattr(stream.quality, "quality_worker", lambda settings, **kw: report)
    path = tmp_path / "q.json"
    assert hrnn(["quality", "--bootstrap-servers", "127.0.0.1:9", "--json", str(path)]) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    written = json.loads(path.read_text(), parse_constant=refuse)
    row = next(r for r in written["rows"] if r["name"] == "stable" and r["kind"] == "next session")
    assert row["judged"] == 0 and row["recall@20"] is None and row["mrr@20"] is None
    metric = written["comparisons"][0]["metrics"]["recall@20"]
    assert metric["candidate"]["se"] is None and metric["ci95"] is None and metric["difference"] == 0.0


def _announced_canary(bootstrap: str, tmp_path: Path, registry_id: str | None = None):
    """A registry whose current version (stable) has a canary published beside it, not over it, announced for half
    of the users on a topic of its own (under `registry_id`, else the registry's path): (registry, stable, canary,
    topic, announcement)."""
    import uuid

    from model.artifact import current_version, latest_version_dir, set_current
    from stream.announce import announce

    registry = make_registry(tmp_path / "registry", seed=1)
    stable = current_version(registry)
    canary = latest_version_dir(make_registry(registry, seed=2)).name
    set_current(registry, stable)
    topic = f"upd-{uuid.uuid4().hex[:8]}"
    return registry, stable, canary, topic, announce(bootstrap, topic, canary, registry / canary, reason="canary",
                                                     share=0.5, registry_id=registry_id)


def test_decide_canary_acts_on_the_canary_announced_under_the_registry_id_it_is_given(broker, tmp_path, monkeypatch,
                                                                                       capsys):
    import stream.quality
    from stream.announce import latest_announcement
    from stream.cli import main as hrnn

    registry, stable, canary, topic, _ = _announced_canary(broker.bootstrap, tmp_path, registry_id="team-a")
    rows = [(v, t, 1, u) for t in range(0, 100_000, 10_000) for v, users in ((stable, range(200)),
                                                                            (canary, range(200, 400))) for u in users]
    monkeypatch.setattr(stream.quality, "quality_worker",
                        lambda settings, **kw: QualityReport("ev", "rec", [20], None, _verdicts(rows), 0, LOG))
    assert hrnn(["quality", "--bootstrap-servers", broker.bootstrap, "--registry", str(registry), "--updates-topic",
                 topic, "--registry-id", "team-a", "--decide-canary", "--min-users", "50"]) == 0
    assert f"canary {canary} (50.0% of the users) vs {stable}: promote" in capsys.readouterr().out
    assert latest_announcement(broker.bootstrap, topic, "team-a").version == canary


@pytest.mark.parametrize("canary_rank, action, status, flags, says", [
    (1, "promote", 0, [], "anytime 95% lower bounds"), (0, "end", 1, [], "beyond the anytime 95% interval"),
    (0, "end", 1, ["--fixed-horizon"], "beyond the 95% interval"), (None, "wait", 0, [], "needed"),
    (0, "end", 1, ["--fail-if-worse"], "beyond the anytime 95% interval")])  # the alarm does not skip the decision
def test_decide_canary_promotes_ends_or_keeps_the_announced_canary(broker, tmp_path, monkeypatch, capsys,
                                                                   canary_rank, action, status, flags, says):
    import stream.quality
    from model.artifact import current_version
    from stream.announce import latest_announcement
    from stream.cli import main as hrnn

    registry, stable, canary, topic, _ = _announced_canary(broker.bootstrap, tmp_path)
    rows = [(stable, t, 1, u) for t in range(0, 100_000, 10_000) for u in range(200)]
    waiting = canary_rank is None  # too few canary users yet
    rows += [(canary, t, 1 if waiting else canary_rank, u) for t in range(0, 100_000, 10_000)
             for u in range(200, 210 if waiting else 400)]
    monkeypatch.setattr(stream.quality, "quality_worker",
                        lambda settings, **kw: QualityReport("ev", "rec", [20], None, _verdicts(rows), 0, LOG))
    assert hrnn(["quality", "--bootstrap-servers", broker.bootstrap, "--registry", str(registry),
                 "--updates-topic", topic, "--decide-canary", "--min-users", "50", "--json", str(tmp_path / "q.json"),
                 *flags]) == status
    out = capsys.readouterr().out
    assert f"canary {canary} (50.0% of the users) vs {stable}: {action}" in out and says in out
    decided = json.loads((tmp_path / "q.json").read_text())["canary_decision"]
    assert (decided["canary"], decided["stable"], decided["action"]) == (canary, stable, action)
    assert decided["announced"] == {"promote": canary, "end": stable, "wait": None}[action]
    assert says in decided["reason"]
    latest = latest_announcement(broker.bootstrap, topic, str(registry.resolve()))
    want = {"promote": (canary, 1.0, canary), "end": (stable, 1.0, stable), "wait": (canary, 0.5, stable)}[action]
    assert (latest.version, latest.share, current_version(registry)) == want
    assert latest.reason == {"promote": "promote", "end": "rollback", "wait": "canary"}[action]


def test_decide_canary_promotes_nothing_when_the_canary_can_no_longer_be_served(broker, tmp_path, monkeypatch,
                                                                                 capsys):
    import torch

    import stream.quality
    from model.artifact import current_version
    from model.config import HRNNConfig
    from model.network import HRNN
    from stream.announce import latest_announcement
    from stream.cli import main as hrnn

    registry, stable, canary, topic, _ = _announced_canary(broker.bootstrap, tmp_path)
    # signed, but weights of another shape: only the worker's own check finds it
    torch.save(HRNN(10, HRNNConfig(hidden_dimension=48)).state_dict(), registry / canary / "weights.pt")
    resign(registry / canary)
    rows = [(v, t, 1, u) for t in range(0, 100_000, 10_000)
            for v, us in ((stable, range(200)), (canary, range(200, 400))) for u in us]
    monkeypatch.setattr(stream.quality, "quality_worker",
                        lambda settings, **kw: QualityReport("ev", "rec", [20], None, _verdicts(rows), 0, LOG))
    assert hrnn(["quality", "--bootstrap-servers", broker.bootstrap, "--registry", str(registry),
                 "--updates-topic", topic, "--decide-canary", "--min-users", "50"]) == 2
    assert "refused (shape)" in capsys.readouterr().err
    latest = latest_announcement(broker.bootstrap, topic, str(registry.resolve()))
    assert (latest.version, latest.share, current_version(registry)) == (canary, 0.5, stable)


@pytest.mark.parametrize("meanwhile", ["a promote moved CURRENT", "a models command holds the registry lock"])
def test_decide_canary_announces_nothing_when_current_moved_while_judging_or_another_command_holds_the_registry(
        broker, tmp_path, monkeypatch, capsys, meanwhile):
    """The decision is about the canary against the version it was judged with: a promote landing meanwhile, or
    one still holding the registry's pointer lock, leaves CURRENT and the announcements as they are (exit 2)."""
    import model.registry
    import stream.hotswap
    import stream.quality
    from model.artifact import current_version, latest_version_dir, set_current
    from stream.announce import latest_announcement
    from stream.cli import main as hrnn

    registry, stable, canary, topic, _ = _announced_canary(broker.bootstrap, tmp_path)
    other = latest_version_dir(make_registry(registry, seed=3)).name
    set_current(registry, stable)
    rows = [(v, t, 1, u) for t in range(0, 100_000, 10_000)
            for v, us in ((stable, range(200)), (canary, range(200, 400))) for u in us]

    monkeypatch.setattr(stream.quality, "quality_worker",
                        lambda settings, **kw: QualityReport("ev", "rec", [20], None, _verdicts(rows), 0, LOG))
    check_servable = stream.hotswap.check_servable

    def checked_meanwhile(path, version):  # the last step before the decision is carried out
        if meanwhile == "a promote moved CURRENT":
            set_current(registry, other)
        check_servable(path, version)

    monkeypatch.setattr(stream.hotswap, "check_servable", checked_meanwhile)
    monkeypatch.setattr(model.registry, "CURRENT_LOCK_WAIT_S", 0.2)
    held = model.registry.RegistryLock(registry, model.registry.CURRENT_LOCK)
    if meanwhile == "a models command holds the registry lock":
        assert held.acquire()
    try:
        assert hrnn(["quality", "--bootstrap-servers", broker.bootstrap, "--registry", str(registry),
                     "--updates-topic", topic, "--decide-canary", "--min-users", "50"]) == 2
    finally:
        held.release()
    assert "nothing was" in capsys.readouterr().err
    latest = latest_announcement(broker.bootstrap, topic, str(registry.resolve()))
    assert (latest.version, latest.share) == (canary, 0.5)
    assert (current_version(registry) == stable) == (meanwhile != "a promote moved CURRENT")


def test_decide_canary_judges_the_canary_from_its_announcement_on_not_only_the_window(broker, tmp_path, monkeypatch,
                                                                                       capsys):
    import time
    from datetime import datetime

    import stream.quality
    from stream.cli import main as hrnn
    from stream.cli_quality import CANARY_LEAD_MS

    registry, stable, canary, topic, ann = _announced_canary(broker.bootstrap, tmp_path)
    time.sleep(0.05)  # the window below starts after the announcement
    windows = []

    def judged(settings, *, since_ms, **kw):
        windows.append(since_ms)
        return QualityReport("ev", "rec", [20], since_ms, _verdicts([(stable, 0, 1, 0)]), 0, LOG)

    monkeypatch.setattr(stream.quality, "quality_worker", judged)
    assert hrnn(["quality", "--bootstrap-servers", broker.bootstrap, "--registry", str(registry), "--updates-topic",
                 topic, "--decide-canary", "--since-s", "0.01"]) == 0
    announced_ms = int(datetime.fromisoformat(ann.announced_at).timestamp() * 1000)
    assert len(windows) == 2 and windows[0] > announced_ms and windows[1] == announced_ms - CANARY_LEAD_MS
    assert "judging the canary over its whole time" in capsys.readouterr().out
    windows.clear()
    assert hrnn(["quality", "--bootstrap-servers", broker.bootstrap, "--registry", str(registry), "--updates-topic",
                 topic, "--decide-canary", "--since-s", "86400"]) == 0
    assert len(windows) == 1  # the window already holds the canary's whole time


@pytest.fixture
def new_york_time(monkeypatch):
    """Local time five hours behind UTC in December: a time without offset read as local lies off by 5 h."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_decide_canary_reads_an_announced_time_without_offset_as_utc_as_workers_do(tmp_path, monkeypatch, capsys,
                                                                                   new_york_time):
    import stream.announce
    import stream.quality
    from model.artifact import current_version
    from stream.announce import Announcement
    from stream.cli import main as hrnn
    from stream.cli_quality import CANARY_LEAD_MS

    registry = make_registry(tmp_path / "registry", seed=1)
    stable = current_version(registry)
    ann = Announcement("v9", str(registry / "v9"), "2026-12-05T12:00:00", "canary", str(registry), 0.5)
    announced_ms = 1_796_472_000_000  # 2026-12-05 12:00 UTC
    assert ann.announced_epoch_s() * 1000 == announced_ms  # what the workers serve the canary from
    monkeypatch.setattr(stream.announce, "latest_canary", lambda *a, **kw: ann)
    windows = []

    def judged(settings, *, since_ms, **kw):
        windows.append(since_ms)
        return QualityReport("ev", "rec", [20], since_ms, _verdicts([(stable, 0, 1, 0)]), 0, LOG)

    monkeypatch.setattr(stream.quality, "quality_worker", judged)
    assert hrnn(["quality", "--bootstrap-servers", "127.0.0.1:9", "--registry", str(registry), "--decide-canary",
                 "--since-s", "60"]) == 0
    assert windows[1:] == [announced_ms - CANARY_LEAD_MS] and current_version(registry) == stable
    assert "canary v9 (50.0% of the users)" in capsys.readouterr().out


def test_decide_canary_without_a_canary_serving_changes_nothing_and_says_so(broker, tmp_path, monkeypatch, capsys):
    import uuid

    import stream.quality
    from model.artifact import current_version
    from stream.cli import main as hrnn

    registry = make_registry(tmp_path / "registry", seed=1)
    stable = current_version(registry)
    monkeypatch.setattr(stream.quality, "quality_worker", lambda settings, **kw: QualityReport(
        "ev", "rec", [20], None, _verdicts([(stable, 0, 1, 0)]), 0, LOG))
    assert hrnn(["quality", "--bootstrap-servers", broker.bootstrap, "--registry", str(registry), "--updates-topic",
                 f"upd-{uuid.uuid4().hex[:8]}", "--decide-canary", "--json", str(tmp_path / "q.json")]) == 0
    assert "canary: none serving" in capsys.readouterr().out and current_version(registry) == stable
    assert json.loads((tmp_path / "q.json").read_text())["canary_decision"] == {"canary": None, "action": "none"}


def test_nothing_to_judge_gives_an_empty_report():
    report = _report([_event(0, 0, "u1", "a")], [_rec(0, 0, ["a"])])
    assert report.pending == 1 and len(report.verdicts.rank) == 0 and report.rows() == []


def _naive_judgement(events: list[Record], recs: list[Record], k: int) -> tuple[int, int]:
    """(judged, hits@k) as the docstring says, the plain way: per partition and user, the next event's item."""
    nxt, last = {}, {}
    for r in sorted(events, key=lambda r: (r.partition, r.offset)):
        user = json.loads(r.value)["user_id"]
        if (r.partition, user) in last:
            nxt[(r.partition, last[(r.partition, user)])] = json.loads(r.value)["item_id"]
        last[(r.partition, user)] = r.offset
    judged = hits = 0
    seen = set()
    for r in recs:
        rec = decode_recommendation(r.value)
        key = (rec.source_partition, rec.source_offset)
        if key in nxt and key not in seen:
            seen.add(key)
            judged += 1
            hits += nxt[key] in [s.item_id for s in rec.items[:k]]
    return judged, hits


def test_on_a_running_worker_every_recommendation_is_judged_or_awaits_its_users_next_event(broker, tmp_path):
    registry = make_registry(tmp_path / "reg")
    settings = settings_for(broker.bootstrap, registry, tmp_path / "state", partitions=2, k=10)
    events = make_events(300, 25, seed=4)
    with running(settings):
        produce(broker.bootstrap, settings.input_topic, events)
        wait_until(lambda: len(records_of(broker.bootstrap, settings.output_topic)) >= len(events), 90,
                   message="every recommendation")
    report = quality_worker(settings, ks=[1, 10], idle_s=1.5)
    judged, hits = _naive_judgement(records_of(broker.bootstrap, settings.input_topic),
                                    records_of(broker.bootstrap, settings.output_topic), 10)
    row = _row(report, report.verdicts.versions[0])
    assert report.pending == len({e.user_id for e in events}) and judged + report.pending == len(events)
    assert row["judged"] == judged and row["recall@10"] == pytest.approx(hits / judged)
    assert len(report.verdicts.versions) == 1 and report.input_log is not None
    kinds = {r["kind"]: r["judged"] for r in report.rows() if r["name"] == row["name"]}
    assert kinds["same session"] + kinds["next session"] == judged and kinds["next session"] > 0

    out = tmp_path / "q.json"
    proc = subprocess.run([HRNN, "quality", "--bootstrap-servers", broker.bootstrap, "--input-topic",
                           settings.input_topic, "--output-topic", settings.output_topic, "--idle-s", "1.5",
                           "--cutoffs", "10,1", "--json", str(out), "--png", str(tmp_path / "q.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"{judged} recommendations judged" in proc.stdout and (tmp_path / "q.png").exists()
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(report.rows()))


def test_a_window_judges_the_answers_to_its_events_and_history_only_informs_the_reference(broker, tmp_path):
    from stream.kafka_clients import admin_client, create_producer, topic_id
    from stream.topics import TopicSpec, ensure_topics

    settings = settings_for(broker.bootstrap, tmp_path, tmp_path, partitions=1)
    ev, rec_topic, now_ms = settings.input_topic, settings.output_topic, int(time.time() * 1000)
    admin = admin_client(broker.bootstrap)
    ensure_topics(admin, [TopicSpec(ev, 1), TopicSpec(rec_topic, 1)])
    log = topic_id(admin, ev)
    items = "abcdabcd"  # offsets 0-3 two hours old, 4-7 recent; each list holds the next item first
    producer = create_producer(broker.bootstrap)
    for o, item in enumerate(items):
        ts = now_ms - 2 * 3_600_000 if o < 4 else now_ms
        producer.produce(ev, encode_event(Event("u1", item, "click", T0 + o)), b"u1", partition=0, timestamp=ts)
        nxt = [items[o + 1]] if o + 1 < len(items) else []
        value = encode_recommendation(Recommendation("u1", [ScoredItem(i, 1.0) for i in nxt], "v1", "s", None, 0, o,
                                                     T0 + o, ts, ev, log))
        producer.produce(rec_topic, value, b"u1", partition=0, timestamp=ts)
    assert producer.flush(15) == 0
    whole = quality_worker(settings, idle_s=1.5)
    window = quality_worker(settings, since_ms=now_ms - 3_600_000, idle_s=1.5)
    warmed = quality_worker(settings, since_ms=now_ms - 3_600_000, history_ms=3 * 3_600_000, idle_s=1.5)
    assert (_row(whole, "v1")["judged"], _row(window, "v1")["judged"], _row(warmed, "v1")["judged"]) == (7, 3, 3)
    assert _row(window, "v1")["recall@1"] == _row(warmed, "v1")["recall@1"] == 1.0
    # the window alone has never seen the items 5, 6, 7 lead to; with the history each is the 4th newest
    assert _row(window, REFERENCE)["recall@20"] == 0 and _row(warmed, REFERENCE)["mrr@20"] == pytest.approx(1 / 4)
    proc = subprocess.run([HRNN, "quality", "--bootstrap-servers", broker.bootstrap, "--input-topic", ev,
                           "--output-topic", rec_topic, "--since-s", "3600", "--history-s", "10800", "--idle-s", "1.5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "3 recommendations judged" in proc.stdout, proc.stderr


@pytest.mark.parametrize("flags, message", [(["--cutoffs", "0,5"], "each must lie in"),
                                            (["--cutoffs", "five"], "whole numbers"),
                                            (["--bucket-s", "0"], "--bucket-s"),
                                            (["--history-s", "60"], "needs --since-s"),
                                            (["--max-loss", "-0.1"], "--max-loss must be >= 0"),
                                            (["--max-loss", "nan"], "--max-loss must be >= 0"),
                                            (["--planned-users", "0"], "--planned-users >= 1"),
                                            (["--since-s", "nan"], "--since-s must be > 0"),
                                            (["--since-s", "inf"], "--since-s must be > 0"),
                                            (["--since-s", "60", "--history-s", "nan"], "--history-s must be")])
def test_the_command_refuses_bad_cut_offs_buckets_and_canary_rules(flags, message):
    proc = subprocess.run([HRNN, "quality", *flags], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def test_a_report_path_that_cannot_be_written_is_refused_before_any_topic_is_read(tmp_path):
    (tmp_path / "file").write_text("")
    for flag, path in (("--json", tmp_path / "file" / "q.json"), ("--png", tmp_path / "file" / "q.png"),
                       ("--json", tmp_path)):
        proc = subprocess.run([HRNN, "quality", "--bootstrap-servers", "127.0.0.1:9", flag, str(path)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and f"{flag} {path}: " in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flags, message", [(["--png", "q.txt"], "--png q.txt: matplotlib cannot write '.txt'"),
                                            (["--png", "qnoext"], "--png qnoext: no extension names the format"),
                                            (["--png", "q.png", "--bucket-s", "1e300"], "--bucket-s must be > 0 "
                                             "seconds and at most"),
                                            (["--since-s", "1e12"], "--since-s 1e+12 reaches back before 1970")])
def test_a_chart_or_window_that_cannot_be_made_is_refused_before_any_topic_is_read(flags, message, tmp_path):
    proc = subprocess.run([HRNN, "quality", "--bootstrap-servers", "127.0.0.1:9", *flags], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())  # no chart under another name


def test_the_command_names_an_output_topic_that_does_not_exist(broker):
    from stream.kafka_clients import admin_client, create_producer
    from stream.topics import TopicSpec, ensure_topics

    settings = settings_for(broker.bootstrap, Path("-"), Path("-"), partitions=1)
    ensure_topics(admin_client(broker.bootstrap), [TopicSpec(settings.input_topic, 1)])
    producer = create_producer(broker.bootstrap)
    producer.produce(settings.input_topic, encode_event(Event("u1", "a", "click", T0)), b"u1", partition=0)
    assert producer.flush(15) == 0
    proc = subprocess.run([HRNN, "quality", "--bootstrap-servers", broker.bootstrap, "--input-topic",
                           settings.input_topic, "--output-topic", "no-such-recs", "--idle-s", "1", "--fail-if-worse"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "output topic 'no-such-recs' does not exist" in proc.stderr


def test_the_command_names_an_input_topic_that_does_not_exist(broker):
    proc = subprocess.run([HRNN, "quality", "--bootstrap-servers", broker.bootstrap, "--input-topic", "no-such-ev",
                           "--idle-s", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "'no-such-ev' does not exist" in proc.stderr


def test_an_event_carrying_a_copys_header_that_names_a_later_record_of_its_partition_is_judged_as_an_event():
    # a mirrored topic or an app re-producing consumed records carries the header; the worker answers such a record
    # and its own copies of the records the header named, so the judge must count all of them
    def with_origin(r: Record, origin: str) -> Record:
        from stream import records
        return Record(r.topic, r.partition, r.offset, r.key, r.value, None,
                      ((records.H_REPARTITIONED_FROM, origin.encode()),))

    events = [_event(0, 67, "u1", "a", key="zz"), with_origin(_event(0, 68, "u1", "b"), "ev/0/69"),
              _event(0, 69, "u1", "c", key="zz"), with_origin(_event(0, 70, "u1", "a"), "ev/0/67"),
              with_origin(_event(0, 71, "u1", "c"), "ev/0/69")]
    report = _report(events, [_rec(0, 68, ["a"]), _rec(0, 70, ["c"])])
    assert _row(report, "v1")["judged"] == 2 and report.pending == 0
