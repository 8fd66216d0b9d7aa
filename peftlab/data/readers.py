"""Reading records from the user's data files: CSV, TSV, JSON (a list of objects), JSONL, Parquet and Arrow.

Compressed files (``.gz``, ``.bz2``, ``.xz``) are read transparently. Every problem is an InputError that names
the file and, where there is one, the line: a missing or empty file, binary content, text that is not UTF-8, a
malformed JSON line, a CSV row with the wrong number of fields. Each record comes back with its location
(``file:line``, or ``file item N`` for a JSON list) so later checks (a missing label, an empty text) can name it.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import re
from pathlib import Path

from ..errors import InputError

TEXT_FORMATS = (".csv", ".tsv", ".json", ".jsonl")
FORMATS = (*TEXT_FORMATS, ".parquet", ".arrow")  # the last two are read by peftlab.data.tables
_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}

Record = tuple[str, dict]  # (location such as "data.csv:12", row)


def data_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in _OPENERS:
        suffixes = suffixes[:-1]
    fmt = suffixes[-1] if suffixes else ""
    if fmt not in FORMATS:
        raise InputError(
            f"{path}: unknown data format {fmt or '(no extension)'!r}; expected one of "
            f"{', '.join(FORMATS)} (optionally .gz, .bz2 or .xz)"
        )
    return fmt


def require_data_file(path: Path) -> None:
    """A regular file that exists, else a one-line error (a pipe or device would be read until memory runs out)."""
    if not path.exists():
        raise InputError(f"{path}: data file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a data file")
    if not path.is_file():
        raise InputError(f"{path}: is not a regular file (a device, pipe or socket); expected a data file")


def read_text(path: Path) -> str:
    """The file's text, decoded as UTF-8 (a leading BOM is dropped), or a one-line error saying why not."""
    require_data_file(path)
    opener = _OPENERS.get(path.suffix.lower())
    try:
        if opener:
            with opener(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, lzma.LZMAError) as e:
        raise InputError(f"{path}: cannot read the data file ({e})") from None
    if not raw.strip():
        raise InputError(f"{path}: data file is empty")
    nul = raw.find(b"\x00", 0, 1 << 16)
    if nul >= 0:
        raise InputError(f"{path}: looks binary (NUL byte at offset {nul}); expected UTF-8 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); save the file as UTF-8") from None


def read_records(path: str | Path) -> list[Record]:
    path = Path(path)
    fmt = data_format(path)
    if fmt not in TEXT_FORMATS:
        from .tables import read_table_file

        return read_table_file(path)
    text = read_text(path)
    if fmt in (".csv", ".tsv"):
        records = _read_delimited(path, text, "," if fmt == ".csv" else "\t")
    elif fmt == ".jsonl":
        records = _read_jsonl(path, text)
    else:
        records = _read_json(path, text)
    if not records:
        raise InputError(f"{path}: data file has no rows")
    return records


def _read_delimited(path: Path, text: str, delimiter: str) -> list[Record]:
    reader = csv.reader(
        io.StringIO(text, newline=""),
        delimiter=delimiter,
        quoting=csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL,
    )
    try:
        header = next(reader)
    except csv.Error as e:
        raise InputError(f"{path}:1: malformed header ({e})") from None
    header = [h.strip() for h in header]
    if not any(header):
        raise InputError(f"{path}:1: the header row is empty; expected column names")
    dupes = {h for h in header if header.count(h) > 1}
    if dupes:
        raise InputError(f"{path}:1: duplicate column name {sorted(dupes)[0]!r}")
    records = []
    start = 2
    try:
        for row in reader:
            line = start
            start = reader.line_num + 1
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(header):
                raise InputError(f"{path}:{line}: row has {len(row)} fields, the header has {len(header)}")
            records.append((f"{path}:{line}", dict(zip(header, row, strict=True))))
    except csv.Error as e:
        raise InputError(f"{path}:{reader.line_num}: malformed row ({e})") from None
    return records


def _read_jsonl(path: Path, text: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = _checked_json(json.loads(line), line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: malformed JSON line ({e.msg} at column {e.colno})") from None
        except _JSON_TROUBLE as e:
            raise InputError(f"{path}:{number}: {_json_trouble(e)}") from None
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{number}: expected a JSON object per line, found {type(obj).__name__}")
        records.append((f"{path}:{number}", obj))
    return records


def _read_json(path: Path, text: str) -> list[Record]:
    try:
        obj = _checked_json(json.loads(text), text)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    except _JSON_TROUBLE as e:
        raise InputError(f"{path}: {_json_trouble(e)}") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list):
        raise InputError(f'{path}: expected a JSON list of objects (or {{"data": [...]}}), found {type(obj).__name__}')
    records = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise InputError(f"{path}: item {i} is {type(item).__name__}, expected an object")
        records.append((f"{path} item {i}", item))
    return records


_JSON_TROUBLE = (RecursionError, UnicodeEncodeError)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _checked_json(obj: object, raw: str) -> object:
    """JSON that Python parsed but the rest cannot use: a ``\\ud800`` escape that decodes to half a character (a
    lone surrogate), which tokenizers cannot take. (Nesting deep enough to exhaust the stack fails in json.loads.)
    Only text holding a surrogate escape is checked, so ordinary data pays nothing."""
    if _SURROGATE_ESCAPE.search(raw):
        json.dumps(obj, ensure_ascii=False).encode("utf-8")  # a lone surrogate raises UnicodeEncodeError
    return obj


def _json_trouble(error: Exception) -> str:
    if isinstance(error, RecursionError):
        return "JSON nested too deeply"
    return "invalid Unicode escape (a lone surrogate such as \\ud800); expected whole characters"
