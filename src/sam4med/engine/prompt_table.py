"""Prompts for many images from one CSV file: boxes from a detector, centroids from a nucleus finder, clicks
exported from another tool.

One row per object: ``image`` (the file's path inside the images folder) and a box (``x0, y0, x1, y1``),
points (``points``: ``x y`` pairs separated by ``;``, with ``labels`` ``1;0`` for foreground and
background, all foreground when left out), or both; ``label`` names the object (optional). Pixels, with
(0, 0) the centre of the top-left pixel, as ``sam4med segment`` takes them::

    image,label,x0,y0,x1,y1,points,labels
    case01.png,polyp,120,80,260,210,,
    case02.png,nucleus,,,,,41 57,
    case02.png,nucleus,,,,,90 12;95 20,1;0

A spreadsheet's table separated by semicolons or tabs (its header tells), in UTF-8 or UTF-16, is read too,
with the decimal comma such a spreadsheet writes (``45,5``; a click's x and y then separated by a space).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from sam4med.engine.errors import InputError, one_line
from sam4med.engine.prompts import Prompt

PROMPT_COLUMNS = ("image", "label", "x0", "y0", "x1", "y1", "points", "labels")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")
MAX_OBJECTS = 2**16 - 1  # an image's label map is 16 bits: object k has value k


@dataclass(frozen=True)
class PromptRow:
    """One object's prompt and where it came from."""

    line: int  # line of the CSV file, for messages
    label: str
    prompt: Prompt


def read_prompt_table(path: str | Path) -> dict[str, list[PromptRow]]:
    """Image path (relative, ``/``-separated) -> its prompts in file order. Every row is checked before any
    image is read: a bad row is an InputError naming the file and the line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such prompt table") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read the prompt table ({one_line(error)})") from None
    # a spreadsheet's byte-order mark is not part of the header; UTF-16 is what "Unicode text" saves
    encoding = "utf-16" if data[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) else "utf-8-sig"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text ({one_line(error)}); save the table as CSV UTF-8") from None
    # quoted cells may hold line breaks; strict: a quote left open is an error, not the rest of the file in one cell
    delimiter = _delimiter(text)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        return _read_rows(path, reader, decimal_comma=delimiter != ",")
    except csv.Error as error:
        raise InputError(f"{path}: not CSV after line {reader.line_num} ({one_line(error)}; a quote left open?)") from None


def _delimiter(text: str) -> str:
    """The header's separator: a comma, or where the header has none, the semicolon that spreadsheets write
    where the comma is the decimal mark, or the tab of "Unicode text"."""
    header = text.split("\n", 1)[0]
    for delimiter in (",", ";", "\t"):
        if delimiter in header:
            return delimiter
    return ","


def _read_rows(path: Path, reader: csv.DictReader, decimal_comma: bool) -> dict[str, list[PromptRow]]:
    columns = [c.strip().lower() for c in reader.fieldnames or []]  # "Image" or " x0" from a spreadsheet too
    if "" in columns:
        raise InputError(f"{path}: column {columns.index('') + 1} of the header has no name")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise InputError(f"{path}: the header names {', '.join(repeated)} more than once")
    if "image" not in columns:
        raise InputError(f"{path}: the prompt table needs a header with an 'image' column ({', '.join(PROMPT_COLUMNS)})")
    unknown = sorted(set(columns) - set(PROMPT_COLUMNS))
    if unknown:
        raise InputError(f"{path}: unknown column(s) {', '.join(unknown)} (known: {', '.join(PROMPT_COLUMNS)})")
    table: dict[str, list[PromptRow]] = {}
    for row in reader:
        line = reader.line_num
        if None in row:  # csv keeps cells beyond the header under None
            raise InputError(f"{path}: line {line}: more cells than columns")
        cells = {key.strip().lower(): (value or "").strip() for key, value in row.items()}
        if not any(cells.values()):
            continue
        try:
            image = _image_key(cells.get("image", ""))
            prompt = _prompt(cells, decimal_comma)
        except InputError as error:
            raise InputError(f"{path}: line {line}: {error}") from None
        rows = table.setdefault(image, [])
        if len(rows) == MAX_OBJECTS:
            raise InputError(f"{path}: line {line}: image {image} has more than {MAX_OBJECTS} prompts, the objects a "
                             "16-bit label map holds; split the table")
        rows.append(PromptRow(line, cells.get("label") or f"object {len(rows) + 1}", prompt))
    if not table:
        raise InputError(f"{path}: the prompt table has no rows")
    return table


def prompts_digest(rows: list[PromptRow]) -> str:
    """sha256 of an image's prompts and labels: a result made from other prompts is not this one. The exact
    coordinates count (a prompt's record rounds them to 0.01 px), so any edit of the table re-runs its image."""
    def exact(values: np.ndarray | None) -> list | None:
        return None if values is None else values.astype(np.float64).tolist()

    record = [{"label": r.label, "points": exact(r.prompt.points), "labels": exact(r.prompt.labels),
               "box": exact(r.prompt.box)} for r in rows]
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def _image_key(value: str) -> str:
    """A relative path inside the images folder, ``/``-separated; ``..`` or an absolute path would leave it."""
    if not value:
        raise InputError("empty 'image' cell")
    parts = PurePosixPath(value.replace("\\", "/"))
    if not parts.parts or parts.is_absolute() or ".." in parts.parts or ":" in parts.parts[0]:
        raise InputError(f"image '{value}': must be a path inside the images folder")
    return parts.as_posix()


def _prompt(cells: dict[str, str], decimal_comma: bool) -> Prompt:
    box_cells = [cells.get(c, "") for c in BOX_COLUMNS]
    box = None
    if any(box_cells):
        if not all(box_cells):
            raise InputError("a box needs all of x0, y0, x1, y1")
        box = [_number(v, name, decimal_comma) for v, name in zip(box_cells, BOX_COLUMNS)]
    points = labels = None
    if cells.get("points"):
        points = [_pair(p, decimal_comma) for p in cells["points"].split(";") if p.strip()]
    if cells.get("labels"):
        if points is None:
            raise InputError("'labels' given without 'points'")
        labels = [_label(v) for v in cells["labels"].split(";") if v.strip()]
    return Prompt(points=points, labels=labels, box=box)


DECIMAL_COMMA = re.compile(r"-?\d+,\d+")


def _number(text: str, what: str, decimal_comma: bool) -> float:
    """A plain decimal number (with ``decimal_comma``, ``45,5`` too); Python's own extras (``1_0`` for 10, digits
    of other scripts) are refused, since a spreadsheet would not read them as the same number."""
    if decimal_comma and DECIMAL_COMMA.fullmatch(text):
        text = text.replace(",", ".")
    try:
        if "_" in text or not text.isascii():
            raise ValueError(text)
        return float(text)
    except ValueError:
        raise InputError(f"{what} '{text}': not a number") from None


def _pair(text: str, decimal_comma: bool) -> tuple[float, float]:
    """``x y`` or ``x,y``; in a table with the decimal comma, ``60,5 50`` is (60.5, 50)."""
    values = text.split()
    if not (decimal_comma and len(values) == 2 and all(DECIMAL_COMMA.fullmatch(v) for v in values if "," in v)):
        values = text.replace(",", " ").split()
    if len(values) != 2:
        raise InputError(f"point '{text.strip()}': expected 'x y'")
    return _number(values[0], "point x", decimal_comma), _number(values[1], "point y", decimal_comma)


def _label(text: str) -> int:
    if text.strip() not in ("0", "1"):
        raise InputError(f"point label '{text.strip()}': expected 1 (foreground) or 0 (background)")
    return int(text)
