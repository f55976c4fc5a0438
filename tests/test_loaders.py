"""Interactions loader: formats, column mappings, time units, and errors that say what to fix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.errors import ConfigError, DataError
from model.loaders import guess_headerless_3col, load_interactions, parse_column_map

REDDIT_MAP = {"USER_ID": "0", "ITEM_ID": "1", "TIMESTAMP": "2"}


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    p = tmp_path / name
    if isinstance(text, str):
        p.write_text(text, encoding="utf-8")
    else:
        p.write_bytes(text)
    return p


PERSONALIZE_CSV = (
    "USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE,EVENT_VALUE\n"
    "u2,i1,1767225610,click,\n"
    "u1,i2,1767225600,click,1.5\n"
    "u1,i3,1767225605,purchase,20\n"
    "u2,i2,1767225601,click,\n"
)


def test_personalize_csv_loads_sorted_by_user_and_time_with_epoch_seconds_as_ms(tmp_path):
    data = load_interactions(write(tmp_path, "x.csv", PERSONALIZE_CSV))
    assert len(data) == 4 and data.n_users == 2 and data.n_items == 3
    assert list(data.user_ids[data.user]) == ["u1", "u1", "u2", "u2"]
    assert list(data.item_ids[data.item]) == ["i2", "i3", "i2", "i1"]
    assert list(data.ts_ms) == [1767225600000, 1767225605000, 1767225601000, 1767225610000]
    assert [data.event_types[t] for t in data.event_type] == ["click", "purchase", "click", "click"]
    assert data.value[0] == pytest.approx(1.5) and data.value[1] == pytest.approx(20)
    assert np.isnan(data.value[2]) and np.isnan(data.value[3])
    assert data.session_key is None


def test_lower_case_column_names_and_missing_event_type_mean_click(tmp_path):
    data = load_interactions(write(tmp_path, "x.csv", "user_id,item_id,timestamp\na,x,1\nb,y,2\n"))
    assert len(data) == 2 and data.event_types == ("click",)
    assert list(data.ts_ms) == [1000, 2000]


def test_session_id_column_is_kept_as_session_keys(tmp_path):
    text = "USER_ID,ITEM_ID,TIMESTAMP,SESSION_ID\na,x,1,s1\na,y,2,s1\na,z,3,s2\n"
    data = load_interactions(write(tmp_path, "x.csv", text))
    assert data.session_key is not None
    assert data.session_key[0] == data.session_key[1] != data.session_key[2]


def test_an_event_without_a_session_id_is_read_as_having_none_in_a_csv_and_in_the_archives_parquet(tmp_path):
    """As an event record may leave session_id out and the retrainer's archive writes null for it, a file may too:
    such an event is sessionized by its time gap (session code -1), the others keep theirs."""
    csv = write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP,SESSION_ID\na,x,1,s1\na,y,2,\nb,x,1, \nb,y,2,s2\n")
    pq.write_table(pa.table({"USER_ID": ["a", "a", "b", "b"], "ITEM_ID": ["x", "y", "x", "y"],
                             "TIMESTAMP": [1, 2, 1, 2], "SESSION_ID": ["s1", None, None, "s2"]}),
                   tmp_path / "x.parquet")
    for data in (load_interactions(csv), load_interactions(tmp_path / "x.parquet")):
        keys = {(data.user_ids[u], data.item_ids[i]): k for u, i, k in zip(data.user, data.item, data.session_key)}
        assert keys[("a", "y")] == keys[("b", "x")] == -1
        assert [data.session_ids[keys[p]] for p in (("a", "x"), ("b", "y"))] == ["s1", "s2"]


@pytest.mark.parametrize("column", [pa.array([None, None], pa.string()), pa.nulls(2)])
def test_a_session_id_column_without_any_value_reads_as_events_without_one(tmp_path, column):
    pq.write_table(pa.table({"USER_ID": ["a", "a"], "ITEM_ID": ["x", "y"], "TIMESTAMP": [1, 2], "SESSION_ID": column}),
                   tmp_path / "x.parquet")
    assert list(load_interactions(tmp_path / "x.parquet").session_key) == [-1, -1]


def test_ids_that_look_numeric_keep_their_text(tmp_path):
    data = load_interactions(write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP\n007,0042,1\n"))
    assert data.user_ids[0] == "007" and data.item_ids[0] == "0042"


def test_parquet_with_personalize_columns_loads_like_the_csv(tmp_path):
    csv_data = load_interactions(write(tmp_path, "x.csv", PERSONALIZE_CSV))
    table = pa.table({"USER_ID": ["u2", "u1", "u1", "u2"], "ITEM_ID": ["i1", "i2", "i3", "i2"],
                      "TIMESTAMP": [1767225610, 1767225600, 1767225605, 1767225601],
                      "EVENT_TYPE": ["click", "click", "purchase", "click"]})
    pq.write_table(table, tmp_path / "x.parquet")
    data = load_interactions(tmp_path / "x.parquet")
    assert list(data.ts_ms) == list(csv_data.ts_ms)
    assert list(data.item_ids[data.item]) == list(csv_data.item_ids[csv_data.item])
    assert data.event_types == csv_data.event_types


def test_parquet_native_timestamp_and_integer_ids(tmp_path):
    table = pa.table({"user_id": pa.array([5, 5], pa.int64()), "item_id": pa.array([7, 8], pa.int64()),
                      "timestamp": pa.array([1_767_225_600_000, 1_767_225_601_500], pa.timestamp("ms"))})
    pq.write_table(table, tmp_path / "x.parquet")
    data = load_interactions(tmp_path / "x.parquet")
    assert list(data.ts_ms) == [1_767_225_600_000, 1_767_225_601_500]
    assert list(data.item_ids) == ["7", "8"] and list(data.user_ids) == ["5"]


def test_reddit_tsv_loads_through_a_positional_mapping_with_the_documented_shape(reddit_path):
    data = load_interactions(reddit_path, columns=REDDIT_MAP, time_unit="s")
    assert (len(data), data.n_users, data.n_items) == (134_489, 8_640, 966)
    assert data.ts_ms.min() == 0  # relative seconds stay relative
    assert np.all(np.diff(data.ts_ms)[np.diff(data.user) == 0] >= 0)


def test_base_epoch_is_added_to_relative_times(reddit_path):
    data = load_interactions(reddit_path, columns=REDDIT_MAP, base_epoch_s=1_767_225_600)
    assert data.ts_ms.min() == 1_767_225_600_000


def test_headerless_three_column_file_without_mapping_suggests_the_mapping(reddit_path):
    with pytest.raises(DataError) as err:
        load_interactions(reddit_path)
    msg = str(err.value)
    assert str(reddit_path) in msg and "line 1" in msg
    assert "USER_ID=0,ITEM_ID=1,TIMESTAMP=2" in msg


def test_guess_headerless_3col_finds_the_time_column_wherever_it_is():
    rows = [["1767225600", "u1", "i9"], ["1767225601", "u2", "i3"], ["1767225700", "u1", "i4"]]
    assert guess_headerless_3col(rows) == {"USER_ID": "1", "ITEM_ID": "2", "TIMESTAMP": "0"}
    rows = [["3", "12", "0.0"], ["1", "4", "6.5"], ["3", "9", "7.0"]]
    assert guess_headerless_3col(rows)["TIMESTAMP"] == "2"
    assert guess_headerless_3col([["a", "b", "c"]]) is None


def test_movielens_ratings_load_with_a_cli_style_mapping(tmp_path):
    text = "userId,movieId,rating,timestamp\n1,31,2.5,1260759144\n1,1029,3.0,1260759179\n2,10,4.0,835355493\n"
    mapping = parse_column_map("USER_ID=userId, ITEM_ID=movieId ,TIMESTAMP=timestamp,EVENT_VALUE=rating")
    assert mapping == {"USER_ID": "userId", "ITEM_ID": "movieId", "TIMESTAMP": "timestamp",
                       "EVENT_VALUE": "rating"}
    data = load_interactions(write(tmp_path, "ratings.csv", text), columns=mapping)
    assert (len(data), data.n_users, data.n_items) == (3, 2, 3)
    assert sorted(data.value.tolist()) == [2.5, 3.0, 4.0]
    assert data.ts_ms.max() == 1260759179000


def test_parse_column_map_rejects_unknown_fields_and_malformed_pairs():
    with pytest.raises(DataError, match="unknown field 'USERID'"):
        parse_column_map("USERID=u")
    with pytest.raises(DataError, match="cannot read 'ITEM_ID'"):
        parse_column_map("USER_ID=u,ITEM_ID")


def test_iso_timestamps_with_and_without_zones(tmp_path):
    text = ("USER_ID,ITEM_ID,TIMESTAMP\n"
            "a,x,2026-01-01T00:00:00Z\na,y,2026-01-01T00:00:01.500+00:00\nb,x,2026-01-01 01:00:00\n")
    data = load_interactions(write(tmp_path, "x.csv", text), time_unit="iso")
    base = 1_767_225_600_000
    assert list(data.ts_ms) == [base, base + 1500, base + 3_600_000]
    # an all-ISO column is recognised even under the default unit
    assert list(load_interactions(tmp_path / "x.csv").ts_ms) == list(data.ts_ms)


def test_millisecond_unit_and_tab_delimiter_sniffed_from_content(tmp_path):
    text = "USER_ID\tITEM_ID\tTIMESTAMP\na\tx\t1767225600123\n"
    data = load_interactions(write(tmp_path, "events.txt", text), time_unit="ms")
    assert list(data.ts_ms) == [1767225600123]


def test_semicolon_file_with_csv_extension_is_sniffed(tmp_path):
    data = load_interactions(write(tmp_path, "x.csv", "USER_ID;ITEM_ID;TIMESTAMP\na;x;1\n"))
    assert len(data) == 1 and data.item_ids[0] == "x"


# --- errors: each names the file and the line or column, and what was expected --------------

def test_missing_file_is_a_data_error_naming_the_path(tmp_path):
    with pytest.raises(DataError, match="nope.csv: file not found"):
        load_interactions(tmp_path / "nope.csv")


def test_empty_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="x.csv: file is empty"):
        load_interactions(write(tmp_path, "x.csv", ""))


def test_header_only_file_says_there_are_no_events(tmp_path):
    with pytest.raises(DataError, match="no events"):
        load_interactions(write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP\n"))


def test_missing_required_columns_lists_the_columns_found(tmp_path):
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", "USER_ID,PRODUCT,TIMESTAMP\na,x,1\n"))
    msg = str(err.value)
    assert "x.csv" in msg and "ITEM_ID" in msg and "'PRODUCT'" in msg and "'USER_ID'" in msg


def test_mapped_column_absent_from_the_file_is_named(tmp_path):
    with pytest.raises(DataError, match="column 'movie'.*one of the columns found: userId, movieId, timestamp"):
        load_interactions(write(tmp_path, "x.csv", "userId,movieId,timestamp\n1,2,3\n"),
                          columns={"USER_ID": "userId", "ITEM_ID": "movie", "TIMESTAMP": "timestamp"})


def test_unparsable_timestamp_names_the_first_bad_line_and_value(tmp_path):
    text = "USER_ID,ITEM_ID,TIMESTAMP\na,x,1\na,y,2\nb,z,yesterday\nb,q,later\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text))
    assert err.value.line == 4 and err.value.column == "TIMESTAMP"
    assert "x.csv, line 4, column 'TIMESTAMP'" in str(err.value) and "'yesterday'" in str(err.value)
    assert "epoch seconds" in str(err.value)


def test_unparsable_iso_timestamp_names_its_line(tmp_path):
    text = "USER_ID,ITEM_ID,TIMESTAMP\na,x,2026-01-01T00:00:00Z\na,y,2026-13-45T00:00:00Z\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text), time_unit="iso")
    assert err.value.line == 3 and "2026-13-45" in str(err.value)


def test_bad_event_value_names_line_and_column(tmp_path):
    text = "USER_ID,ITEM_ID,TIMESTAMP,EVENT_VALUE\na,x,1,2.0\na,y,2,\na,z,3,lots\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text))
    assert err.value.line == 4 and err.value.column == "EVENT_VALUE" and "'lots'" in str(err.value)


def test_empty_user_id_names_its_line(tmp_path):
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP\na,x,1\n,y,2\n"))
    assert err.value.line == 3 and err.value.column == "USER_ID"


def test_wrong_delimiter_says_which_delimiter_looks_right(tmp_path):
    path = write(tmp_path, "x.csv", "USER_ID\tITEM_ID\tTIMESTAMP\na\tx\t1\n")
    with pytest.raises(DataError) as err:
        load_interactions(path, delimiter=",")
    msg = str(err.value)
    assert "x.csv, line 1" in msg and "one column" in msg and "tab" in msg


def test_wrong_delimiter_semicolons(tmp_path):
    with pytest.raises(DataError, match="semicolon"):
        load_interactions(write(tmp_path, "x.csv", "USER_ID;ITEM_ID;TIMESTAMP\na;x;1\n"), delimiter=",")


@pytest.mark.parametrize("delimiter, problem", [("é", "not an ASCII character"), ('"', "the quote character"),
                                                ("\r", "a line break"), ("\n", "a line break")])
def test_a_delimiter_that_cannot_split_delimited_text_is_refused_naming_it(tmp_path, delimiter, problem):
    # pyarrow splits on one byte: "é" crashed inside it with a ValueError; a quote or line break means something else
    path = write(tmp_path, "x.csv", f"USER_ID{delimiter}ITEM_ID{delimiter}TIMESTAMP\nu1{delimiter}i1{delimiter}1\n")
    with pytest.raises(DataError) as err:
        load_interactions(path, delimiter=delimiter)
    assert err.value.problem == f"delimiter {delimiter!r} is {problem}"


def test_ragged_line_is_reported_with_its_number(tmp_path):
    text = "USER_ID,ITEM_ID,TIMESTAMP\na,x,1\na,y,2\na,z,3,extra\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text))
    assert err.value.line == 4 and "4 fields" in str(err.value)


def test_non_utf8_file_names_the_line_of_the_bad_byte(tmp_path):
    data = "USER_ID,ITEM_ID,TIMESTAMP\na,x,1\nb,caf\xe9,2\n".encode("latin-1")
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", data))
    assert err.value.line == 3 and "UTF-8" in str(err.value) and "x.csv" in str(err.value)


def test_non_utf8_byte_beyond_the_sniffed_sample_is_still_located(tmp_path):
    rows = "".join(f"u{i},i{i % 50},{i}\n" for i in range(20_000))
    data = ("USER_ID,ITEM_ID,TIMESTAMP\n" + rows).encode() + b"z,\xff\xfe,5\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", data))
    assert err.value.line == 20_002 and "UTF-8" in str(err.value)


@pytest.mark.parametrize("bom", [b"", b"\xef\xbb\xbf"])
@pytest.mark.parametrize("item", ["i1", "i12"])  # one byte more: the sample's end falls inside an "é" or after it
def test_a_utf8_first_line_longer_than_the_sniffed_sample_loads(tmp_path, bom, item):
    # the 64 KiB sample ended in the middle of an "é" and the file was refused as "not UTF-8"
    description = "é" * 40_000
    text = f"u1\t{item}\t1600000000\t{description}\nu1\ti2\t1600000001\tshort\n"
    data = load_interactions(write(tmp_path, "x.tsv", bom + text.encode()), columns=REDDIT_MAP)
    assert sorted(data.item_ids[data.item]) == sorted([item, "i2"])


def test_corrupt_parquet_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="x.parquet.*Parquet"):
        load_interactions(write(tmp_path, "x.parquet", b"PAR1 this is not parquet"))


def test_unknown_time_unit_is_rejected(tmp_path):
    with pytest.raises(DataError, match="time unit"):
        load_interactions(write(tmp_path, "x.csv", PERSONALIZE_CSV), time_unit="days")  # type: ignore[arg-type]


def test_milliseconds_read_as_seconds_suggest_the_ms_unit(tmp_path):
    text = "USER_ID,ITEM_ID,TIMESTAMP\na,x,1767225600000\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text))
    assert err.value.line == 2 and "'ms'" in str(err.value)


@pytest.mark.parametrize("stamp, unit", [("1767225600000000", "microseconds"), ("1767225600000000000", "nanoseconds")])
def test_microseconds_or_nanoseconds_read_as_milliseconds_are_refused_naming_the_line(tmp_path, stamp, unit):
    # the 's' unit refuses milliseconds; 'ms' took these silently, as times thousands of years ahead
    text = f"USER_ID,ITEM_ID,TIMESTAMP\na,x,1767225600000\nb,y,{stamp}\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text), time_unit="ms")
    assert err.value.line == 3 and err.value.column == "TIMESTAMP"
    assert "too large for epoch milliseconds" in str(err.value) and "microseconds or nanoseconds" in str(err.value)


def test_a_parquet_column_of_microseconds_read_as_milliseconds_is_refused(tmp_path):
    table = pa.table({"USER_ID": ["a"], "ITEM_ID": ["x"], "TIMESTAMP": pa.array([1_767_225_600_000_000], pa.int64())})
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(DataError, match="microseconds or nanoseconds"):
        load_interactions(tmp_path / "x.parquet", time_unit="ms")


def test_byte_order_mark_and_windows_line_ends_are_accepted(tmp_path):
    data = b"\xef\xbb\xbfUSER_ID,ITEM_ID,TIMESTAMP\r\na,x,1\r\nb,y,2\r\n"
    out = load_interactions(write(tmp_path, "x.csv", data))
    assert list(out.user_ids) == ["a", "b"] and list(out.item_ids) == ["x", "y"]


def test_nan_timestamp_in_parquet_names_its_row(tmp_path):
    table = pa.table({"USER_ID": ["a", "b"], "ITEM_ID": ["x", "y"], "TIMESTAMP": [1.0, float("nan")]})
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(DataError) as err:
        load_interactions(tmp_path / "x.parquet")
    assert err.value.line == 2 and err.value.column == "TIMESTAMP"


def test_loader_flags_become_load_options(reddit_path):
    import argparse

    from model.loaders import add_loader_arguments, loader_options

    parser = argparse.ArgumentParser()
    add_loader_arguments(parser)
    args = parser.parse_args(["--columns", "USER_ID=0,ITEM_ID=1,TIMESTAMP=2", "--delimiter", "tab",
                              "--base-epoch", "100"])
    opts = loader_options(args)
    assert opts["delimiter"] == "\t" and opts["columns"]["TIMESTAMP"] == "2"
    data = load_interactions(reddit_path, **opts)
    assert len(data) == 134_489 and data.ts_ms.min() == 100_000


@pytest.mark.parametrize("unit, per_ms", [("us", 1_000), ("ns", 1_000_000)])
def test_parquet_timestamps_finer_than_milliseconds_are_floored_to_the_millisecond(tmp_path, unit, per_ms):
    raw = [1_767_225_600_000 * per_ms + per_ms - 1, 1_767_225_601_500 * per_ms + 1, -per_ms + 1]
    table = pa.table({"USER_ID": ["a", "a", "b"], "ITEM_ID": ["x", "y", "x"],
                      "TIMESTAMP": pa.array(raw, pa.timestamp(unit, tz="UTC"))})
    pq.write_table(table, tmp_path / "x.parquet")
    data = load_interactions(tmp_path / "x.parquet")
    assert list(data.ts_ms) == [1_767_225_600_000, 1_767_225_601_500, -1]


def test_a_nan_id_in_a_float_parquet_column_is_an_empty_id_naming_its_line(tmp_path):
    table = pa.table({"USER_ID": [1.0, float("nan"), 2.0], "ITEM_ID": ["x", "y", "x"], "TIMESTAMP": [1, 2, 3]})
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(DataError, match="empty value") as err:
        load_interactions(tmp_path / "x.parquet")
    assert err.value.line == 2 and err.value.column == "USER_ID"


def test_float_parquet_ids_read_as_their_integer_text_when_whole_and_as_written_otherwise(tmp_path):
    table = pa.table({"USER_ID": [1.0, 1.0, 2.5], "ITEM_ID": [3.0, 4.0, float("inf")], "TIMESTAMP": [1, 2, 3]})
    pq.write_table(table, tmp_path / "x.parquet")
    data = load_interactions(tmp_path / "x.parquet")
    assert list(data.user_ids) == ["1", "2.5"] and list(data.item_ids) == ["3", "4", "inf"]


def test_a_parquet_id_column_that_cannot_be_read_as_text_is_a_data_error_naming_it(tmp_path):
    table = pa.table({"USER_ID": ["a", "b"], "ITEM_ID": pa.array([[1], [2]]), "TIMESTAMP": [1, 2]})
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(DataError, match="cannot read the column") as err:
        load_interactions(tmp_path / "x.parquet")
    assert err.value.column == "ITEM_ID"


def test_csv_ids_lose_the_spaces_around_them_as_the_header_names_do(tmp_path):
    text = "USER_ID, ITEM_ID, TIMESTAMP, EVENT_TYPE\nu1, i1, 1700000000, click\n u1 ,i2 ,1700000060,\tpurchase \n"
    data = load_interactions(write(tmp_path, "x.csv", text))
    assert list(data.user_ids) == ["u1"] and list(data.item_ids) == ["i1", "i2"]
    assert data.event_types == ("click", "purchase")


# --- timestamps must fit int64 epoch milliseconds: numpy's cast turned an overflow into -2**63 silently, and
# that one row zeroed every recency weight (training then published a model with loss 0.0) ----------------

def test_a_millisecond_timestamp_beyond_int64_is_refused_naming_its_line_and_value(tmp_path):
    text = "USER_ID,ITEM_ID,TIMESTAMP\na,x,1767225600000\na,y,1767225601000\nb,x,1e19\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text), time_unit="ms")
    assert err.value.line == 4 and err.value.column == "TIMESTAMP"
    assert "1e+19" in str(err.value) and "int64" in str(err.value)


def test_a_negative_timestamp_in_seconds_beyond_int64_milliseconds_is_refused_naming_its_line(tmp_path):
    text = "USER_ID,ITEM_ID,TIMESTAMP\na,x,1767225600\nb,y,-1e17\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text))
    assert err.value.line == 3 and err.value.column == "TIMESTAMP" and "-1e+17" in str(err.value)


def test_a_parquet_uint64_timestamp_near_2_to_the_64_is_refused_naming_its_row(tmp_path):
    table = pa.table({"USER_ID": ["a", "b"], "ITEM_ID": ["x", "y"],
                      "TIMESTAMP": pa.array([1_767_225_600_000, 2**64 - 5], pa.uint64())})
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(DataError) as err:
        load_interactions(tmp_path / "x.parquet", time_unit="ms")
    assert err.value.line == 2 and err.value.column == "TIMESTAMP"


def test_a_timestamp_pushed_beyond_int64_by_the_base_epoch_is_refused_naming_the_base_epoch(tmp_path):
    path = write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP\na,x,0\nb,y,3000000\nb,z,5e17\n")
    with pytest.raises(DataError) as err:
        load_interactions(path, time_unit="ms", base_epoch_s=9e15)
    assert err.value.line == 4 and "base epoch" in str(err.value)


@pytest.mark.parametrize("base", [float("nan"), float("inf"), float("-inf"), 1e17])
def test_a_base_epoch_not_finite_or_beyond_int64_is_a_config_error_naming_the_flag(tmp_path, base):
    with pytest.raises(ConfigError, match="--base-epoch"):
        load_interactions(write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP\na,x,1\n"), base_epoch_s=base)


def test_a_nan_base_epoch_flag_is_refused_before_any_time_is_read(tmp_path):
    import argparse

    from model.loaders import add_loader_arguments, loader_options

    parser = argparse.ArgumentParser()
    add_loader_arguments(parser)
    opts = loader_options(parser.parse_args(["--base-epoch", "nan"]))
    with pytest.raises(ConfigError, match="--base-epoch nan"):
        load_interactions(write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP\na,x,1\n"), **opts)


def test_seconds_from_a_logs_start_still_load_while_an_int64_overflow_is_refused(tmp_path):
    # relative times (reddit-jodie's 0..3e6 s) are legitimate: the check is int64's range, not a calendar window
    path = write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP\na,x,0\nb,y,3000000\nb,z,1e17\n")
    with pytest.raises(DataError):
        load_interactions(path, time_unit="ms", base_epoch_s=9.2e15)
    data = load_interactions(write(tmp_path, "y.csv", "USER_ID,ITEM_ID,TIMESTAMP\na,x,0\nb,y,3000000\n"))
    assert sorted(data.ts_ms.tolist()) == [0, 3_000_000_000]


def test_a_huge_timestamp_in_seconds_is_shown_compactly_in_the_message(tmp_path):
    with pytest.raises(DataError, match="too large for epoch seconds") as err:
        load_interactions(write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP\na,x,1\nb,y,1e300\n"))
    assert err.value.problem == "timestamp 1e+300 is too large for epoch seconds"


# --- a field names one column: the last of several used to win silently -------------------------------------

def test_a_second_column_named_like_a_field_is_refused_naming_both_positions(tmp_path):
    text = "USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE,USER_ID\na,x,1,click,z\nb,y,2,click,z\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text))
    msg = str(err.value)
    assert "USER_ID matches 2 columns" in msg and "position 0" in msg and "position 4" in msg
    assert "USER_ID=0" in msg  # the way out: pick one by position
    data = load_interactions(tmp_path / "x.csv", columns={"USER_ID": "0"})
    assert list(data.user_ids) == ["a", "b"]


def test_upper_and_lower_case_columns_for_one_field_are_refused_until_a_mapping_picks_one(tmp_path):
    path = write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP,timestamp\na,x,1,100\n")
    with pytest.raises(DataError, match="TIMESTAMP matches 2 columns: 'TIMESTAMP' .*'timestamp'"):
        load_interactions(path)
    assert list(load_interactions(path, columns={"TIMESTAMP": "TIMESTAMP"}).ts_ms) == [1000]
    assert list(load_interactions(path, columns={"TIMESTAMP": "timestamp"}).ts_ms) == [100_000]


def test_a_parquet_column_name_repeated_is_refused_and_a_positional_mapping_picks_either(tmp_path):
    table = pa.Table.from_arrays([pa.array(["a", "b"]), pa.array(["x", "y"]), pa.array([1, 2]), pa.array(["z", "z"])],
                                 names=["USER_ID", "ITEM_ID", "TIMESTAMP", "USER_ID"])
    pq.write_table(table, tmp_path / "x.parquet")
    with pytest.raises(DataError, match="USER_ID matches 2 columns"):
        load_interactions(tmp_path / "x.parquet")
    assert list(load_interactions(tmp_path / "x.parquet", columns={"USER_ID": "0"}).user_ids) == ["a", "b"]
    assert list(load_interactions(tmp_path / "x.parquet", columns={"USER_ID": "3"}).user_ids) == ["z"]


def test_two_fields_mapped_to_one_column_is_a_config_error_naming_the_columns_flag(tmp_path):
    path = write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP\na,x,1\n")
    with pytest.raises(ConfigError, match="--columns maps USER_ID and ITEM_ID to the same column 'USER_ID'"):
        load_interactions(path, columns=parse_column_map("USER_ID=USER_ID,ITEM_ID=USER_ID"))
    with pytest.raises(ConfigError, match="--columns"):
        load_interactions(path, columns={"ITEM_ID": "user_id"})  # USER_ID still finds its own column


# --- the header line -------------------------------------------------------------------------------------

def test_a_header_without_a_line_end_and_no_events_says_there_are_no_events(tmp_path):
    with pytest.raises(DataError, match="no events after the header"):
        load_interactions(write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP"))
    with pytest.raises(DataError, match="no events after the header"):
        load_interactions(write(tmp_path, "y.csv", "\nUSER_ID,ITEM_ID,TIMESTAMP"))


def test_blank_lines_above_the_header_are_skipped_and_counted_in_line_numbers(tmp_path):
    data = load_interactions(write(tmp_path, "x.csv", "\n \r\nUSER_ID,ITEM_ID,TIMESTAMP\na,x,1\nb,y,2\n"))
    assert list(data.user_ids) == ["a", "b"] and list(data.ts_ms) == [1000, 2000]
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "y.csv", "\n\nUSER_ID,ITEM_ID,TIMESTAMP\na,x,1\nb,y,oops\n"))
    assert err.value.line == 5 and "'oops'" in str(err.value)
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "z.csv", " \nUSER_ID,ITEM_ID,TIMESTAMP\na,x,1\na,y,2,extra\n"))
    assert err.value.line == 4 and "4 fields" in str(err.value)


def test_one_very_long_id_does_not_make_every_row_as_wide_as_it():
    # numpy's fixed-width text would give each of the 10,000 rows 4,000 characters: 160 MB for a 40 kB column
    import tracemalloc

    from model.interactions import Interactions

    users = np.array(["u" + "x" * 3_999] + [f"u{k % 50}" for k in range(9_999)], dtype=object)
    tracemalloc.start()
    try:
        data = Interactions.from_columns(users, users, np.arange(10_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16_000_000, f"peak {peak / 1e6:.0f} MB"
    assert data.user_ids.dtype == object and data.n_users == 51 and len(data.user_ids[-1]) == 4_000


def test_ids_are_coded_in_sorted_order_whatever_their_length_or_script():
    from model.interactions import Interactions

    users = ["b", "a" * 300, "é", "Z", "😀", "a", "b"]
    data = Interactions.from_columns(users, [1, 10, 2, 1, 1, 1, 1], np.arange(7))
    assert list(data.user_ids) == sorted(set(users)) and list(data.item_ids) == ["1", "10", "2"]
    assert [data.user_ids[u] for u in data.user] == ["Z", "a", "a" * 300, "b", "b", "é", "😀"]


def test_a_file_of_the_longest_ids_an_event_may_carry_loads_without_a_row_per_id_width(tmp_path):
    import tracemalloc

    rows = [f"u{k % 40},i{k % 30},{1767225600 + k}" for k in range(50_000)]
    rows[7] = f"{'u' * 256},i1,1767225607"
    path = write(tmp_path, "x.csv", "USER_ID,ITEM_ID,TIMESTAMP\n" + "\n".join(rows) + "\n")
    tracemalloc.start()
    try:
        data = load_interactions(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) == 50_000 and max(map(len, data.user_ids)) == 256
    assert peak < 25_000_000, f"peak {peak / 1e6:.0f} MB"


@pytest.mark.parametrize("field", ["USER_ID", "ITEM_ID", "EVENT_TYPE", "SESSION_ID"])
def test_an_id_longer_than_an_event_may_carry_is_refused_naming_line_and_column(tmp_path, field):
    from model.events import MAX_ID_CHARS

    def row(k: int, long: bool = False) -> str:
        values = {"USER_ID": "u1", "ITEM_ID": f"i{k}", "EVENT_TYPE": "click", "SESSION_ID": "s1"}
        if long:
            values[field] = "y" * (MAX_ID_CHARS + 1)
        return ",".join([values["USER_ID"], values["ITEM_ID"], str(1767225600 + k), values["EVENT_TYPE"],
                         values["SESSION_ID"]])

    header = "USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE,SESSION_ID\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", header + "\n".join([row(1), row(2, long=True), row(3)]) + "\n"))
    assert err.value.line == 3 and err.value.column == field
    assert f"{MAX_ID_CHARS + 1} characters" in str(err.value) and str(MAX_ID_CHARS) in str(err.value)
    assert len(str(err.value)) < 400  # the id is not spelt out in full


def test_an_id_of_exactly_the_events_limit_loads(tmp_path):
    from model.events import MAX_ID_CHARS

    data = load_interactions(write(tmp_path, "x.csv", f"USER_ID,ITEM_ID,TIMESTAMP\nu1,{'i' * MAX_ID_CHARS},1\n"))
    assert list(data.item_ids) == ["i" * MAX_ID_CHARS]


def test_an_error_after_blank_lines_names_its_physical_line(tmp_path):
    text = "USER_ID,ITEM_ID,TIMESTAMP\nu1,i1,1700000000\n\n\n\n\nu1,i2,1700000100\nu1,i3,17OOOOO2OO\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text))
    assert err.value.line == 8 and "'17OOOOO2OO'" in str(err.value)
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "y.csv", text.replace("\n", "\r\n")))
    assert err.value.line == 8


def test_an_error_after_a_quoted_line_break_names_its_physical_line(tmp_path):
    text = 'USER_ID,ITEM_ID,TIMESTAMP\nu1,"item\none",1700000000\n\nu1,i2,oops\n'
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text))
    assert err.value.line == 5 and "'oops'" in str(err.value)


def test_an_empty_id_after_blank_lines_names_its_physical_line(tmp_path):
    text = "\nUSER_ID,ITEM_ID,TIMESTAMP\n\nu1,i1,1\n\n,i2,2\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text))
    assert err.value.line == 6 and err.value.column == "USER_ID"


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "NaN", "1e300", "-1e39"])
def test_an_event_value_not_finite_as_float32_is_refused_naming_its_line(tmp_path, value):
    text = f"USER_ID,ITEM_ID,TIMESTAMP,EVENT_VALUE\nu1,i1,1,2.5\nu1,i2,2,\nu1,i3,3,{value}\n"
    with pytest.raises(DataError) as err:
        load_interactions(write(tmp_path, "x.csv", text))
    assert err.value.line == 4 and err.value.column == "EVENT_VALUE" and repr(value) in str(err.value)
    assert "finite" in str(err.value)


def test_a_parquet_event_value_not_finite_is_refused_while_nulls_are_absent_values(tmp_path):
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"USER_ID": ["a", "a", "a"], "ITEM_ID": ["x", "y", "z"], "TIMESTAMP": [1, 2, 3],
                             "EVENT_VALUE": pa.array([1.0, None, 2.0])}), path)
    data = load_interactions(path)
    assert np.isnan(data.value[1]) and data.value[2] == 2.0
    pq.write_table(pa.table({"USER_ID": ["a", "a"], "ITEM_ID": ["x", "y"], "TIMESTAMP": [1, 2],
                             "EVENT_VALUE": pa.array([1.0, float("inf")])}), path)
    with pytest.raises(DataError) as err:
        load_interactions(path)
    assert err.value.line == 2 and err.value.column == "EVENT_VALUE"


def test_the_largest_float32_event_value_loads(tmp_path):
    top = float(np.finfo(np.float32).max)
    data = load_interactions(write(tmp_path, "x.csv", f"USER_ID,ITEM_ID,TIMESTAMP,EVENT_VALUE\nu1,i1,1,{top!r}\n"))
    assert np.isfinite(data.value[0])


def test_a_file_name_too_long_for_the_system_is_a_data_error_saying_so(tmp_path):
    with pytest.raises(DataError, match="cannot be read \\(File name too long\\)") as err:
        load_interactions(tmp_path / ("A" * 300 + ".csv"))
    assert "..." in str(err.value) and len(str(err.value)) < 300  # shortened: the reason is not buried


def test_a_file_name_that_is_not_utf8_is_refused_naming_it_and_saying_to_rename_it(tmp_path):
    import os

    path = write(tmp_path, os.fsdecode(b"events\xff.csv"), PERSONALIZE_CSV)  # as Python sees a Latin-1 byte
    with pytest.raises(DataError, match="not UTF-8 text.*rename the file") as err:
        load_interactions(path)
    assert repr(str(path)) in str(err.value)


@pytest.mark.parametrize("pack", ["gz", "xz"])
def test_a_compressed_file_is_refused_as_compressed_not_as_text_to_re_encode(tmp_path, pack):
    import gzip
    import lzma

    raw = b"USER_ID,ITEM_ID,TIMESTAMP\na,x,1\na,y,2\n"
    path = write(tmp_path, f"x.csv.{pack}", gzip.compress(raw) if pack == "gz" else lzma.compress(raw))
    with pytest.raises(DataError, match="compressed file") as err:
        load_interactions(path)
    assert "decompress it first" in str(err.value) and "iconv" not in str(err.value)
