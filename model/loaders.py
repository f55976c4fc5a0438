"""Interactions files (CSV, TSV, Parquet) into `Interactions`.

The expected schema is Amazon Personalize's interactions dataset: USER_ID, ITEM_ID,
TIMESTAMP (epoch seconds), optional EVENT_TYPE, EVENT_VALUE, SESSION_ID; lower-case names
are accepted too. Other logs load without a conversion script through a column mapping
(`columns={"USER_ID": "userId", ...}`, positional names "0", "1", ... for headerless files)
and a time unit. Parsing is done by pyarrow so a million rows take a second or two; the
slow Python paths run only to explain an error (which line, which value).
"""
from __future__ import annotations

import argparse
import codecs
import csv
import math
import re
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from model.config import is_utf8, shown_path
from model.errors import ConfigError, DataError, EventError
from model.events import MAX_ID_CHARS, parse_timestamp
from model.interactions import Interactions, encode_text

TimeUnit = Literal["s", "ms", "iso"]
LineOf = Callable[[int], int]  # row index -> the file's line number, for messages

REQUIRED = ("USER_ID", "ITEM_ID", "TIMESTAMP")
OPTIONAL = ("EVENT_TYPE", "EVENT_VALUE", "SESSION_ID")
FIELDS = REQUIRED + OPTIONAL

_PARQUET_SUFFIXES = (".parquet", ".pq", ".parq")
_DELIMITER_NAMES = {",": "comma ','", "\t": "tab '\\t'", ";": "semicolon ';'", "|": "pipe '|'"}
_SNIFF_BYTES = 1 << 16
_SNIFF_LINES = 20
_NUMBER = r"^\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\s*$"
_INT64_MS_LIMIT = 2.0 ** 63  # times are int64 epoch ms: [-2**63, 2**63), exactly representable as a float
_LINE_BREAK = re.compile(r"\r\n|\r|\n")  # the line ends pyarrow splits on, so line numbers agree with it


def parse_column_map(text: str) -> dict[str, str]:
    """Read the CLI form "USER_ID=userId,ITEM_ID=movieId,TIMESTAMP=timestamp" into a mapping.

    Field names are case-insensitive; source names are kept as written ("0", "1", ... address
    the columns of a headerless file by position).
    """
    mapping: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise DataError("<column map>", f"cannot read {part!r}",
                            expected="FIELD=source pairs like USER_ID=userId,ITEM_ID=movieId,TIMESTAMP=timestamp")
        field, source = (s.strip() for s in part.split("=", 1))
        field = field.upper()
        if field not in FIELDS:
            raise DataError("<column map>", f"unknown field {field!r}", expected=f"one of {', '.join(FIELDS)}")
        if not source:
            raise DataError("<column map>", f"field {field} has no source column", expected=f"{field}=<column>")
        if field in mapping:
            raise DataError("<column map>", f"field {field} is mapped twice")
        mapping[field] = source
    if not mapping:
        raise DataError("<column map>", "the mapping is empty", expected="USER_ID=...,ITEM_ID=...,TIMESTAMP=...")
    return mapping


def format_column_map(mapping: dict[str, str]) -> str:
    """The inverse of `parse_column_map`, for messages that suggest a mapping."""
    return ",".join(f"{k}={v}" for k, v in mapping.items())


def guess_headerless_3col(rows: list[list[str]]) -> dict[str, str] | None:
    """Suggest a positional mapping for a headerless user/item/time file of three columns.

    The time column is the one whose sample values are all numbers (or ISO dates) and never
    decrease; failing that, the numeric one with the largest values. The other two keep
    their order as user, item (the common layout of research logs). None if nothing fits.
    """
    rows = [r for r in rows if len(r) == 3]
    if not rows:
        return None
    scores: list[tuple[int, float, int]] = []
    for col in range(3):
        values = [r[col].strip() for r in rows]
        nums = _as_numbers(values)
        if nums is not None:
            monotone = int(all(b >= a for a, b in zip(nums, nums[1:])))
            has_fraction = int(any(v != int(v) for v in nums))
            scores.append((monotone + has_fraction, max(nums), col))
        elif all(_is_iso(v) for v in values):
            scores.append((3, float("inf"), col))
    if not scores:
        return None
    t = max(scores)[2]
    u, i = [c for c in range(3) if c != t]
    return {"USER_ID": str(u), "ITEM_ID": str(i), "TIMESTAMP": str(t)}


def load_interactions(path: str | Path, *, columns: dict[str, str] | None = None, time_unit: TimeUnit = "s",
                      delimiter: str | None = None, header: bool | None = None,
                      base_epoch_s: float = 0.0) -> Interactions:
    """Load a CSV/TSV/Parquet interactions file.

    columns: field -> source column (see module docstring); fields not mapped are looked up
    by their Personalize name, upper or lower case. time_unit: how numeric TIMESTAMPs are
    read ("s" as Personalize, "ms", or "iso" for ISO-8601 strings; ISO strings are also
    recognised under "s"/"ms" when the whole column is ISO). base_epoch_s is added to numeric
    times, for logs that count seconds from their own start. delimiter/header: sniffed from
    the extension and the first lines unless given.
    """
    p = Path(path)
    name = str(p)
    if time_unit not in ("s", "ms", "iso"):
        raise DataError(name, f"unknown time unit {time_unit!r}", expected="'s', 'ms' or 'iso'")
    mapping = _normalise_mapping(name, columns)
    base_epoch_s = _checked_base_epoch(base_epoch_s)
    magic = _first_bytes(p)
    if p.suffix.lower() in _PARQUET_SUFFIXES or magic == b"PAR1":
        table, line_of, resolved = _read_parquet(name, mapping)
    else:
        table, line_of, resolved = _read_text(name, mapping, delimiter, header)
    return _to_interactions(name, table, resolved, line_of, time_unit, base_epoch_s)


def _first_bytes(p: Path) -> bytes:
    """The file's first 4 bytes (Parquet's magic), once a path that is no readable data file is refused: pyarrow's
    errors for one would be tracebacks."""
    name = str(p)
    try:
        if not p.exists():
            raise DataError(name, "file not found", expected="an existing CSV, TSV or Parquet file")
        if not p.is_file():
            raise DataError(name, "not a regular file", expected="a CSV, TSV or Parquet file")
        empty = p.stat().st_size == 0
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:  # a name too long, a folder not searchable: exists() raises rather than say False
        raise DataError(shown_path(name), f"cannot be read ({exc.strerror or exc})") from None
    if not is_utf8(name):  # pyarrow opens it by its name in UTF-8
        raise DataError(repr(name), "the file name is not UTF-8 text, so pyarrow cannot open it",
                        expected="a UTF-8 file name: rename the file")
    if empty:
        raise DataError(name, "file is empty", expected="a header row and at least one event")
    packed = next((kind for kind, head in _COMPRESSED.items() if magic.startswith(head)), None)
    if packed:  # read as text it is "not UTF-8", and re-encoding, the remedy that message gives, cannot help
        raise DataError(name, f"a {packed}-compressed file",
                        expected="a CSV, TSV or Parquet file: decompress it first")
    return magic


# The first bytes of the compressed files an interaction log is most often shipped as.
# Binary magics only: bzip2's "BZh" could open a headerless text file.
_COMPRESSED = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd", "xz": b"\xfd7zX", "zip": b"PK\x03\x04"}


def add_loader_arguments(parser: argparse.ArgumentParser) -> None:
    """The loader's options as flags, for every command that reads an interactions file."""
    g = parser.add_argument_group("interactions file format")
    g.add_argument("--columns", type=str, default=None, metavar="MAP",
                   help="column mapping, e.g. USER_ID=userId,ITEM_ID=movieId,TIMESTAMP=timestamp "
                        "(USER_ID=0,ITEM_ID=1,TIMESTAMP=2 for a headerless file)")
    g.add_argument("--time-unit", choices=("s", "ms", "iso"), default="s",
                   help="unit of numeric TIMESTAMP values (default s, as Amazon Personalize)")
    g.add_argument("--delimiter", type=str, default=None, help="field delimiter (default: sniffed; 'tab' for \\t)")
    g.add_argument("--base-epoch", type=float, default=0.0, metavar="SECONDS",
                   help="added to numeric timestamps, for logs that count from their own start")


def loader_options(args: argparse.Namespace) -> dict:
    """Keyword arguments for `load_interactions` from the flags of `add_loader_arguments`."""
    delim = getattr(args, "delimiter", None)
    if delim is not None and delim.lower() in ("tab", "\\t"):
        delim = "\t"
    text = getattr(args, "columns", None)
    return {"columns": parse_column_map(text) if text else None, "time_unit": getattr(args, "time_unit", "s"),
            "delimiter": delim, "base_epoch_s": float(getattr(args, "base_epoch", 0.0) or 0.0)}


def _checked_base_epoch(base_epoch_s: float) -> float:
    """The base epoch as a float, refused when no timestamp could be shifted by it into int64 epoch ms
    (nan would turn every time into the same garbage value and training would still publish)."""
    try:
        value = float(base_epoch_s)
    except (TypeError, ValueError):
        raise ConfigError(f"--base-epoch {base_epoch_s!r} is not a number of seconds") from None
    if not math.isfinite(value):
        raise ConfigError(f"--base-epoch {value} is not a finite number (expected epoch seconds, e.g. 1767225600)")
    if abs(value * 1000.0) >= _INT64_MS_LIMIT:
        raise ConfigError(f"--base-epoch {_compact(value)} is out of range (expected epoch seconds within about "
                          "±292 million years of 1970, e.g. 1767225600)")
    return value


# --- mapping and header resolution -------------------------------------------------------

def _normalise_mapping(name: str, columns: dict[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for field, source in (columns or {}).items():
        key = str(field).upper()
        if key not in FIELDS:
            raise DataError(name, f"column mapping names unknown field {field!r}",
                            expected=f"one of {', '.join(FIELDS)}")
        out[key] = str(source)
    return out


def _resolve(name: str, found: list[str], mapping: dict[str, str], positional: bool) -> dict[str, int]:
    """Field -> column index, or a DataError that lists what the file has."""
    resolved: dict[str, int] = {}
    for field in FIELDS:
        if field in mapping:
            resolved[field] = _mapped_column(name, found, field, mapping[field], positional)
        elif not positional:
            matches = _columns_named(found, field, exact=False)
            if matches:
                resolved[field] = _only_match(name, found, field, matches)
    missing = [f for f in REQUIRED if f not in resolved]
    if missing:
        what = "columns found: " + ", ".join(repr(c) for c in found)
        raise DataError(name, f"required column(s) {', '.join(missing)} missing; {what}",
                        expected="USER_ID, ITEM_ID, TIMESTAMP (or a column mapping such as "
                                 "USER_ID=userId,ITEM_ID=movieId,TIMESTAMP=timestamp)")
    _refuse_shared_columns(found, resolved)
    return resolved


def _mapped_column(name: str, found: list[str], field: str, src: str, positional: bool) -> int:
    # an exact name wins over case-insensitive ones, so a mapping is how to pick between TIMESTAMP and timestamp
    matches = _columns_named(found, src, exact=True) or _columns_named(found, src, exact=False)
    if matches:
        return _only_match(name, found, field, matches)
    if src.isdigit() and (positional or int(src) < len(found)):
        if int(src) >= len(found):
            raise DataError(name, f"column mapping {field}={src} points past the last column",
                            column=src, expected=f"a position below {len(found)}")
        return int(src)
    raise DataError(name, f"mapped column {src!r} for {field} is not in the file",
                    column=src, expected=f"one of the columns found: {', '.join(found)}")


def _columns_named(found: list[str], wanted: str, *, exact: bool) -> list[int]:
    if exact:
        return [i for i, c in enumerate(found) if c == wanted]
    key = wanted.strip().lower()
    return [i for i, c in enumerate(found) if c.strip().lower() == key]


def _only_match(name: str, found: list[str], field: str, matches: list[int]) -> int:
    """The one column a field names; several would otherwise leave the last one winning silently (a stray
    second USER_ID column made every event one user's)."""
    if len(matches) == 1:
        return matches[0]
    cols = ", ".join(f"{found[i]!r} (position {i})" for i in matches)
    names_differ = len({found[i] for i in matches}) == len(matches)
    pick = f"{field}={found[matches[0]]}" if names_differ else f"{field}={matches[0]}"
    raise DataError(name, f"{field} matches {len(matches)} columns: {cols}",
                    expected=f"one column for {field}: rename or drop the others, or pick one with a column "
                             f"mapping such as {pick}")


def _refuse_shared_columns(found: list[str], resolved: dict[str, int]) -> None:
    # fields looked up by their own names never share a column, so a shared one comes from the mapping
    by_column: dict[int, list[str]] = {}
    for field, i in resolved.items():
        by_column.setdefault(i, []).append(field)
    for i, fields in by_column.items():
        if len(fields) > 1:
            raise ConfigError(f"--columns maps {' and '.join(fields)} to the same column {found[i]!r} "
                              f"(position {i}); each field needs a column of its own")


# --- Parquet -----------------------------------------------------------------------------

def _read_parquet(name: str, mapping: dict[str, str]) -> tuple[pa.Table, LineOf, dict[str, int]]:
    try:
        pf = pq.ParquetFile(name)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(name, f"not a readable Parquet file ({exc})", expected="a Parquet file") from None
    found = list(pf.schema_arrow.names)
    resolved = _resolve(name, found, mapping, positional=False)
    wanted = list(dict.fromkeys(found[i] for i in sorted(set(resolved.values()))))
    try:
        table = pf.read(columns=wanted)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(name, f"cannot read Parquet data ({exc})") from None
    # pyarrow reads every column of a requested name, in request order then file order; a field mapped by
    # position to one of two same-named columns must get that one, not whichever a by-name lookup keeps
    read_order = [i for n in wanted for i, c in enumerate(found) if c == n]
    return table, lambda row: row + 1, {f: read_order.index(i) for f, i in resolved.items()}


# --- CSV / TSV ---------------------------------------------------------------------------

def _sample_text(name: str) -> str:
    with open(name, "rb") as fh:
        raw = fh.read(_SNIFF_BYTES)
    cut = len(raw) == _SNIFF_BYTES  # before the BOM goes, or a cut sample that began with one looks whole
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    if cut and b"\n" in raw:
        raw = raw[: raw.rindex(b"\n") + 1]  # never cut a multi-byte character in half
    try:
        # a first line longer than the sample still ends mid-character: a cut sample may end in an incomplete one
        return codecs.getincrementaldecoder("utf-8")().decode(raw, final=not cut)
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(name, f"not UTF-8 text (byte 0x{raw[exc.start]:02x})", line=line,
                        expected="a UTF-8 encoded file; re-encode it, e.g. iconv -f latin1 -t utf-8") from None


def _sniff_delimiter(name: str, lines: list[str]) -> str:
    by_ext = {".tsv": "\t", ".tab": "\t", ".csv": ","}.get(Path(name).suffix.lower())
    best, best_count = None, 0
    for cand in _DELIMITER_NAMES:
        counts = [ln.count(cand) for ln in lines]
        # a real delimiter occurs the same number of times on every line
        if counts and min(counts) > 0 and len(set(counts)) == 1:
            if counts[0] > best_count or (counts[0] == best_count and cand == by_ext):
                best, best_count = cand, counts[0]
    return best or by_ext or ","


def _check_delimiter(name: str, delim: str) -> None:
    """pyarrow splits on one byte and fails with a bare ValueError on any other delimiter; the quote and line breaks
    already mean something else in delimited text."""
    if len(delim) != 1:
        problem = "is not a single character"
    elif not delim.isascii():
        problem = "is not an ASCII character"
    elif delim in "\"\r\n":
        problem = "is the quote character" if delim == '"' else "is a line break"
    else:
        return
    raise DataError(name, f"delimiter {delim!r} {problem}", expected="',', '\\t', ';' or '|'")


def _split(line: str, delimiter: str) -> list[str]:
    return next(csv.reader([line], delimiter=delimiter), [])


def _looks_like_header(fields: list[str], mapping: dict[str, str]) -> bool:
    names = {f.lower() for f in FIELDS} | {s.strip().lower() for s in mapping.values() if not s.isdigit()}
    return any(f.strip().lower() in names for f in fields)


def _read_text(name: str, mapping: dict[str, str], delimiter: str | None,
               header: bool | None) -> tuple[pa.Table, LineOf, dict[str, int]]:
    text = _sample_text(name)
    physical = _LINE_BREAK.split(text)
    lines = [ln for ln in physical if ln.strip()][:_SNIFF_LINES]
    if not lines:
        raise DataError(name, "file has no rows", expected="a header row and at least one event")
    # blank lines above the first row are skipped here, so pyarrow must skip them too, or it reads the
    # header as an event ("cannot parse timestamp 'TIMESTAMP'") and every line number is off
    leading = next(k for k, ln in enumerate(physical) if ln.strip())
    first_line = leading + 1
    delim = delimiter if delimiter is not None else _sniff_delimiter(name, lines)
    _check_delimiter(name, delim)
    first = _split(lines[0], delim)
    if len(first) == 1:
        others = [d for d in _DELIMITER_NAMES if d != delim and lines[0].count(d) > 0
                  and len({ln.count(d) for ln in lines}) == 1]
        if others:
            raise DataError(name, f"every line reads as one column with delimiter {_DELIMITER_NAMES.get(delim, repr(delim))}",
                            line=first_line,
                            expected=f"delimiter {_DELIMITER_NAMES[others[0]]}, which this file appears to use")
    has_header = _looks_like_header(first, mapping) if header is None else header
    positional = not has_header
    if positional:
        needs_position = [f for f in REQUIRED if not mapping.get(f, "").isdigit()]
        if needs_position:
            hint = ""
            if len(first) == 3 and not mapping:
                guess = guess_headerless_3col([_split(ln, delim) for ln in lines])
                if guess:
                    hint = f"; it has 3 columns: try the column mapping {format_column_map(guess)}"
            raise DataError(name, "the first line is not a header with USER_ID, ITEM_ID, TIMESTAMP "
                                  f"(found {', '.join(repr(f) for f in first)}){hint}", line=first_line,
                            expected="a header row, or a positional column mapping such as "
                                     "USER_ID=0,ITEM_ID=1,TIMESTAMP=2 for a headerless file")
        found = [str(i) for i in range(len(first))]
    else:
        found = [f.strip() for f in first]
    resolved = _resolve(name, found, mapping, positional)
    col_names = [f"c{i}" for i in range(len(found))]  # unique names even if the header repeats one
    wanted = sorted(set(resolved.values()))
    skip = leading + (1 if has_header else 0)
    types = {col_names[i]: pa.string() for i in wanted if i != resolved.get("EVENT_VALUE")}
    if "EVENT_VALUE" in resolved:
        types[col_names[resolved["EVENT_VALUE"]]] = pa.string()
    try:
        table = pa_csv.read_csv(
            name,
            read_options=pa_csv.ReadOptions(column_names=col_names, skip_rows=skip,
                                            block_size=1 << 24),
            parse_options=pa_csv.ParseOptions(delimiter=delim, newlines_in_values=False),
            convert_options=pa_csv.ConvertOptions(column_types=types,
                                                  include_columns=[col_names[i] for i in wanted],
                                                  strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as exc:
        raise _explain_csv_error(name, str(exc), delim, len(found), leading) from None
    by_name = {c: i for i, c in enumerate(table.column_names)}
    return table, _text_line_of(name, delim, skip), {f: by_name[col_names[i]] for f, i in resolved.items()}


def _text_line_of(name: str, delim: str, skip: int) -> LineOf:
    """Row index -> physical line of a delimited file whose first `skip` lines are not rows. pyarrow skips
    blank lines and a quoted field may hold a line break, so the row number plus the header is wrong past
    either; this slow rescan only runs to name the line of an error."""
    def line_of(row: int) -> int:
        with open(name, encoding="utf-8", errors="replace", newline="") as fh:
            for _ in range(skip):
                fh.readline()
            reader = csv.reader(fh, delimiter=delim)
            consumed, seen = 0, 0
            for record in reader:
                start, consumed = skip + consumed + 1, reader.line_num
                if record:  # an empty record is a blank line, which pyarrow skips
                    if seen == row:
                        return start
                    seen += 1
        return row + 1 + skip
    return line_of


def _explain_csv_error(name: str, message: str, delim: str, n_cols: int, leading: int) -> DataError:
    """Find the line pyarrow choked on; this slow scan only runs on the error path. `leading`: the blank
    lines above the first row, which are skipped and so cannot be the bad line."""
    if message.startswith("Could not skip initial"):
        # pyarrow's words for a header that has no line end after it: there is nothing past the header
        return DataError(name, "no events after the header", expected="at least one event row")
    if "UTF8" in message or "utf8" in message.lower():
        data = Path(name).read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = data[: exc.start].count(b"\n") + 1
            return DataError(name, f"not UTF-8 text (byte 0x{data[exc.start]:02x})", line=line,
                             expected="a UTF-8 encoded file; re-encode it, e.g. iconv -f latin1 -t utf-8")
        return DataError(name, f"not UTF-8 text ({message})", expected="a UTF-8 encoded file")
    m = re.search(r"Expected (\d+) columns, got (\d+)", message)
    if m:
        with open(name, encoding="utf-8", errors="replace", newline="") as fh:
            for lineno, row in enumerate(csv.reader(fh, delimiter=delim), start=1):
                if row and len(row) != n_cols and lineno > leading:
                    return DataError(name, f"line has {len(row)} fields, the first line has {n_cols}",
                                     line=lineno, expected=f"{n_cols} fields separated by {_DELIMITER_NAMES.get(delim, repr(delim))}")
        return DataError(name, f"a line has {m.group(2)} fields, the first line has {m.group(1)}")
    return DataError(name, f"cannot parse as delimited text: {message}")


# --- columns into Interactions -----------------------------------------------------------

def _to_interactions(name: str, table: pa.Table, resolved: dict[str, int], line_of: LineOf,
                     time_unit: TimeUnit, base_epoch_s: float) -> Interactions:
    n = table.num_rows
    if n == 0:
        raise DataError(name, "no events after the header", expected="at least one event row")

    def col(field: str) -> pa.ChunkedArray:
        return table.column(resolved[field])

    def ids(field: str) -> np.ndarray:
        with _arrow_errors(name, field):
            arr = _id_text(col(field))
        bad = pc.or_kleene(pc.is_null(arr), pc.equal(pc.utf8_length(arr), 0))
        _raise_first(name, bad, arr, field, line_of, "empty value", f"a non-empty {field}")
        _refuse_long_ids(name, arr, field, line_of)
        return np.asarray(arr.to_numpy(zero_copy_only=False))

    users, items = ids("USER_ID"), ids("ITEM_ID")
    with _arrow_errors(name, "TIMESTAMP"):
        ts_ms = _timestamps(name, col("TIMESTAMP"), time_unit, base_epoch_s, line_of)
    types = ids("EVENT_TYPE") if "EVENT_TYPE" in resolved else None
    with _arrow_errors(name, "EVENT_VALUE"):
        values = _event_values(name, col("EVENT_VALUE"), line_of) if "EVENT_VALUE" in resolved else None
    sessions = _session_ids(name, col("SESSION_ID"), line_of) if "SESSION_ID" in resolved else None
    return Interactions.from_columns(users, items, ts_ms, event_types=types, values=values,
                                     session_ids=sessions, source=name)


def _session_ids(name: str, column: pa.ChunkedArray, line_of: LineOf) -> np.ndarray:
    """SESSION_ID is optional per event, as in an event record and the retrainer's archive: an empty or null cell
    is an event without one (None), which is sessionized by its time gap as the worker does."""
    with _arrow_errors(name, "SESSION_ID"):
        arr = _id_text(column)
    _refuse_long_ids(name, arr, "SESSION_ID", line_of)
    arr = pc.if_else(pc.equal(pc.utf8_length(arr), 0), pa.scalar(None, arr.type), arr)
    return np.asarray(arr.to_numpy(zero_copy_only=False))


@contextmanager
def _arrow_errors(name: str, field: str) -> Iterator[None]:
    """A column pyarrow cannot convert is bad input, not a crash: a DataError naming the column."""
    try:
        yield
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise DataError(name, f"cannot read the column ({exc})", column=field) from None


def _id_text(arr: pa.ChunkedArray) -> pa.ChunkedArray:
    """An ID column as text without surrounding whitespace (`u1, i1` in a CSV means item "i1"); a NaN in a
    float column is a missing ID, like an empty one."""
    if pa.types.is_floating(arr.type):
        arr = pc.if_else(pc.is_nan(arr), pa.scalar(None, arr.type), arr)
        # ids stored as floats in Parquet: 12.0 must still read as "12" (exactly so below 2**53)
        whole = pc.and_(pc.equal(pc.floor(arr), arr), pc.less(pc.abs(arr), 2.0 ** 53))
        if pc.all(whole).as_py() is not False:
            arr = pc.cast(arr, pa.int64())
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        arr = pc.cast(arr, pa.string())
    return pc.utf8_trim_whitespace(arr)


def _refuse_long_ids(name: str, arr: pa.ChunkedArray, field: str, line_of: LineOf) -> None:
    """An id longer than an event may carry: the worker would dead-letter every event of it, so the file is
    refused here, where the line can be named (and before a vocabulary of such ids is built)."""
    lengths = pc.utf8_length(arr)
    if (pc.max(lengths).as_py() or 0) > MAX_ID_CHARS:  # None: every value null (a SESSION_ID column may be)
        row = int(pc.index(pc.greater(lengths, MAX_ID_CHARS), True).as_py())
        value = arr[row].as_py()
        raise DataError(name, f"id of {len(value)} characters ({value[:20]!r}...), more than the "
                              f"{MAX_ID_CHARS} an event's {field.lower()} may have", line=line_of(row), column=field,
                        expected=f"ids of at most {MAX_ID_CHARS} characters")


def _raise_first(name: str, bad: pa.ChunkedArray | pa.Array, arr, field: str, line_of, problem: str,
                 expected: str) -> None:
    if pc.any(bad).as_py():
        row = int(pc.index(bad, True).as_py())
        value = arr[row].as_py()
        raise DataError(name, f"{problem} {value!r}" if value not in (None, "") else problem,
                        line=line_of(row), column=field, expected=expected)


def _numbers(name: str, arr: pa.ChunkedArray, field: str, line_of, *, allow_empty: bool = False) -> np.ndarray:
    """float64 values of a numeric or numeric-string column; the first bad one is reported."""
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        if not allow_empty:
            _raise_first(name, pc.is_null(arr), arr, field, line_of, "empty value", "a number")
        return arr.to_numpy(zero_copy_only=False).astype(np.float64)
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        raise DataError(name, f"column has type {arr.type}", column=field, expected="numbers")
    text = pc.utf8_trim_whitespace(arr)
    empty = pc.equal(pc.utf8_length(text), 0)
    if allow_empty:
        text = pc.if_else(empty, pa.scalar(None, pa.string()), text)
    try:
        return pc.cast(text, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    except pa.ArrowInvalid:
        ok = pc.match_substring_regex(text, _NUMBER)
        bad = pc.invert(pc.fill_null(ok, True)) if allow_empty else pc.invert(pc.fill_null(ok, False))
        _raise_first(name, bad, arr, field, line_of, "not a number:", "a number")
        raise DataError(name, "cannot read the column as numbers", column=field, expected="numbers") from None


def _event_values(name: str, arr: pa.ChunkedArray, line_of: LineOf) -> np.ndarray:
    """EVENT_VALUE as float64, NaN where empty. A value that is not finite as the float32 it is kept as (inf,
    nan, 1e300) is refused: replay would send it as null and the value would be lost without a word."""
    values = _numbers(name, arr, "EVENT_VALUE", line_of, allow_empty=True)
    absent = pc.is_null(arr)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        absent = pc.or_(absent, pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(arr)), 0))
    with np.errstate(over="ignore"):
        finite = np.isfinite(values.astype(np.float32))
    bad = ~finite & ~np.asarray(absent.to_numpy(zero_copy_only=False), dtype=bool)
    if bad.any():
        _raise_first(name, pa.array(bad), arr, "EVENT_VALUE", line_of, "not a finite number:",
                     f"a finite number within ±{float(np.finfo(np.float32).max):.4g}, or an empty field")
    return values


def _timestamps(name: str, arr: pa.ChunkedArray, unit: TimeUnit, base_epoch_s: float, line_of) -> np.ndarray:
    expected = {"s": "epoch seconds", "ms": "epoch milliseconds", "iso": "ISO-8601 date-times"}[unit]
    if pa.types.is_timestamp(arr.type) or pa.types.is_date(arr.type):
        _raise_first(name, pc.is_null(arr), arr, "TIMESTAMP", line_of, "empty timestamp", expected)
        return _native_ms(arr)
    is_text = pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)
    if unit != "iso":
        if is_text:
            text = pc.utf8_trim_whitespace(arr)
            numeric = pc.match_substring_regex(text, _NUMBER)
            if not pc.any(numeric).as_py() and _is_iso(str(text[0].as_py())):
                return _iso(name, arr, line_of)  # a whole column of ISO dates: read it as such
            _raise_first(name, pc.invert(numeric), arr, "TIMESTAMP", line_of, "cannot parse timestamp", expected)
        values = _numbers(name, arr, "TIMESTAMP", line_of)
        finite = np.isfinite(values)
        if not finite.all():
            _raise_first(name, pa.array(~finite), arr, "TIMESTAMP", line_of, "cannot parse timestamp", expected)
        if unit == "s" and values.max() > 1e11:  # past year 5000 in seconds: these are milliseconds
            row = int(np.argmax(values > 1e11))
            raise DataError(name, f"timestamp {_compact(values[row])} is too large for epoch seconds",
                            line=line_of(row), column="TIMESTAMP",
                            expected="epoch seconds; for epoch milliseconds use time unit 'ms'")
        ms = _epoch_ms(name, values, unit, base_epoch_s, line_of, expected)
        # past year 5000 in milliseconds: a finer unit read 1,000x too late; checked after int64's range, whose
        # message names a base epoch that pushed a time out
        if unit == "ms" and values.max() > 1e14:
            row = int(np.argmax(values > 1e14))
            raise DataError(name, f"timestamp {_compact(values[row])} is too large for epoch milliseconds; it looks "
                                  "like microseconds or nanoseconds", line=line_of(row), column="TIMESTAMP",
                            expected="epoch milliseconds; divide microseconds by 1,000 and nanoseconds by "
                                     "1,000,000 first")
        return ms
    if not is_text:
        raise DataError(name, f"time unit 'iso' but the column holds {arr.type}", column="TIMESTAMP",
                        expected="ISO-8601 strings, or time_unit 's'/'ms' for numbers")
    return _iso(name, arr, line_of)


def _epoch_ms(name: str, values: np.ndarray, unit: TimeUnit, base_epoch_s: float, line_of,
              expected: str) -> np.ndarray:
    """Numeric times as int64 epoch ms; a time outside int64 is refused, since numpy's cast would turn it into
    -2**63 silently and that one row would zero every recency weight in training."""
    scale = 1000.0 if unit == "s" else 1.0
    ms = np.rint(values * scale + base_epoch_s * 1000.0)
    outside = ~((ms >= -_INT64_MS_LIMIT) & (ms < _INT64_MS_LIMIT))
    if outside.any():
        row = int(np.argmax(outside))
        shift = f" plus the base epoch {_compact(base_epoch_s)} s" if base_epoch_s else ""
        raise DataError(name, f"timestamp {_compact(values[row])} {unit}{shift} is beyond the range of "
                              "int64 epoch milliseconds", line=line_of(row), column="TIMESTAMP",
                        expected=f"{expected} within about ±292 million years of 1970")
    return ms.astype(np.int64)


def _compact(value: float) -> str:
    """A number short enough for a message: whole numbers of up to 15 digits in full (an epoch in ms is
    recognisable), anything else in 6 significant digits (1e300 is not 301 characters)."""
    if math.isfinite(value) and float(value).is_integer() and abs(value) < 1e15:
        return f"{value:.0f}"
    return f"{value:.6g}"


def _native_ms(arr: pa.ChunkedArray) -> np.ndarray:
    """Epoch ms of a Parquet timestamp or date column; finer units are floored to the millisecond (events are
    ordered by ms, and a lossless cast would refuse any sub-millisecond part)."""
    per_ms = {"us": 1_000, "ns": 1_000_000}.get(getattr(arr.type, "unit", ""), 1)
    if per_ms > 1:
        return pc.cast(arr, pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64) // per_ms
    return pc.cast(pc.cast(arr, pa.timestamp("ms")), pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64)


def _iso(name: str, arr: pa.ChunkedArray, line_of) -> np.ndarray:
    text = pc.utf8_trim_whitespace(arr)
    # fast paths: a column that is all zoned, or all naive (read as UTC)
    for target in (pa.timestamp("ms", tz="UTC"), pa.timestamp("ms")):
        try:
            return pc.cast(pc.cast(text, target), pa.int64()).to_numpy(zero_copy_only=False).astype(np.int64)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    uniq, inverse = encode_text(text.to_numpy(zero_copy_only=False))
    parsed = np.empty(len(uniq), dtype=np.int64)
    bad_values: set[str] = set()
    for k, value in enumerate(uniq):
        try:
            parsed[k] = parse_timestamp(value, "iso")
        except EventError:
            bad_values.add(value)
    if bad_values:
        bad = pc.is_in(text, value_set=pa.array(sorted(bad_values)))
        _raise_first(name, bad, arr, "TIMESTAMP", line_of, "cannot parse timestamp", "ISO-8601 date-times")
    return parsed[inverse]


def _as_numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def _is_iso(value: str) -> bool:
    if not re.match(r"^\d{4}-\d{2}-\d{2}", value):
        return False
    try:
        parse_timestamp(value, "iso")
        return True
    except EventError:
        return False


__all__ = ["FIELDS", "REQUIRED", "OPTIONAL", "TimeUnit", "load_interactions", "parse_column_map",
           "format_column_map", "guess_headerless_3col", "add_loader_arguments", "loader_options"]
