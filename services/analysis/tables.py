"""The AnalysisService's tables in the object store: keys, reading, writing, checks.

Tables travel as object-store keys (CSV, TSV or parquet, told apart by the key's
extension). This module reads them, writes results back, joins stored results, and
checks the caller's numbers (counts, seeds, numeric columns), raising
:class:`~services.common.errors.InvalidInput` naming what is wrong. No gRPC here.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from services.common.errors import InvalidInput, NotFound
from services.common.objectstore import ObjectInfo, ObjectStore

#: Most bootstrap resamples one request may ask for (a count).
MAX_BOOTSTRAP = 10_000
#: Most trees per forest one ablation may ask for (a count).
MAX_TREES = 1000
#: Cross-validation folds allowed (a count).
MIN_FOLDS, MAX_FOLDS = 2, 20
#: Seeds must fit numpy's and scikit-learn's generators.
MAX_SEED = 2**32 - 1
#: Table formats by extension.
#: Compressions of the text forms by extension.
_COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz", ".zip": "zip", ".zst": "zstd"}
_TABLE_FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "tsv"}
_CONTENT_TYPES = {
    "parquet": "application/vnd.apache.parquet",
    "csv": "text/csv",
    "tsv": "text/tab-separated-values",
}
_RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


# --- the caller's numbers -----------------------------------------------------------


def check_seed(seed: int) -> int:
    """``seed`` if numpy and scikit-learn accept it (0 to 2**32 - 1)."""
    if not 0 <= seed <= MAX_SEED:
        raise InvalidInput(f"seed must be within 0-{MAX_SEED}, got {seed}")
    return seed


def check_count(value: int, name: str, default: int, high: int, low: int = 0) -> int:
    """``value``, or ``default`` for 0, after checking it lies in [low, high]."""
    if value == 0:
        return default
    if not low <= value <= high:
        raise InvalidInput(f"{name} must be within {low}-{high} (0 for {default}), got {value}")
    return value


def check_numeric(table: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise when a text column of ``columns`` holds something that is not a number
    (the rows are named); absent columns are left to the caller."""
    for column in columns:
        if column in table.columns and table[column].dtype == object:
            numbers = pd.to_numeric(table[column], errors="coerce")
            bad = numbers.isna() & table[column].notna()
            if bad.any():
                rows = ", ".join(str(int(r)) for r in np.flatnonzero(bad.to_numpy())[:10])
                raise InvalidInput(f"{what}: {column} is not a number at rows {rows}")


# --- object keys ----------------------------------------------------------------------


def run_prefix(run_id: str) -> str:
    """``runs/{run_id}/analysis``, after checking the run id."""
    if not _RUN_ID.match(run_id) or run_id in (".", ".."):
        raise InvalidInput(f"run_id {run_id[:80]!r} must be 1-128 letters, digits, '.', '_' or '-'")
    return f"runs/{run_id}/analysis"


def output_key(given: str, run_id: str, name: str) -> str | None:
    """Where a result goes: the key given, else under the run's prefix, else nowhere."""
    if given:
        return given
    if run_id:
        return f"{run_prefix(run_id)}/{name}"
    return None


def table_format(key: str) -> str:
    """``parquet``, ``csv`` or ``tsv`` from the key's extension."""
    suffix = PurePosixPath(key).suffix.lower()
    if suffix not in _TABLE_FORMATS:
        raise InvalidInput(f"cannot tell the table format of {key!r}: use .parquet, .csv or .tsv")
    return _TABLE_FORMATS[suffix]


# --- reading and writing ----------------------------------------------------------------


def parse_table(source: Path | bytes, name: str) -> pd.DataFrame:
    """A CSV, TSV or parquet table (a file, or an object's bytes), told apart by the
    extension of ``name``; the text forms may be compressed (``.gz``, ``.bz2``...).

    Raises:
        InvalidInput: An unknown extension or content that does not parse (naming
            ``name``).
    """
    suffixes = [s.lower() for s in PurePosixPath(name).suffixes]
    compression = _COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression is not None:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    data = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        if kind in (".parquet", ".pq"):
            return pd.read_parquet(data)
        if kind in (".tsv", ".tab"):
            return pd.read_csv(data, sep="\t", compression=compression)
        if kind == ".csv":
            return pd.read_csv(data, compression=compression)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {name}: {exc}") from None
    raise InvalidInput(f"cannot tell the format of {name!r}: use .csv, .tsv or .parquet")


def read_table(path: str | Path) -> pd.DataFrame:
    """A table file (see :func:`parse_table`).

    Raises:
        NotFound: No such file.
        InvalidInput: An unknown extension or a file that does not parse.
    """
    target = Path(path)
    if not target.is_file():
        raise NotFound(f"no table file {str(target)!r}")
    return parse_table(target, target.name)


def load_table(store: ObjectStore, key: str, what: str) -> pd.DataFrame:
    """Read the table ``key`` from the store (CSV, TSV or parquet by extension).

    Raises:
        NotFound: No such object (the message names ``what`` and the key).
        InvalidInput: An unknown extension or content that does not parse.
    """
    try:
        data = store.get_bytes(key)
    except NotFound:
        raise NotFound(f"{what}: no table {key!r} in the store") from None
    try:
        table = parse_table(data, key)
    except InvalidInput as exc:
        raise InvalidInput(f"{what} ({key}): {exc}") from None
    except Exception as exc:  # parsers raise many kinds on corrupt files
        raise InvalidInput(
            f"{what} ({key}): cannot read the table ({type(exc).__name__})"
        ) from None
    table.columns = [str(c) for c in table.columns]
    return table


def load_manifest(store: ObjectStore, key: str, what: str) -> pd.DataFrame:
    """A stored cohort manifest, typed as :class:`services.cohort.manifest.Manifest`
    types it (labels nullable 0/1, ``immune_score`` a nullable float).

    Raises:
        NotFound: No such object.
        InvalidInput: Not a manifest (the message names ``what``).
    """
    from services.cohort.manifest import Manifest

    try:
        data = store.get_bytes(key)
    except NotFound:
        raise NotFound(f"{what}: no manifest {key!r} in the store") from None
    try:
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        return Manifest.from_frame(frame).table
    except InvalidInput as exc:
        raise InvalidInput(f"{what} ({key}): {exc}") from None
    except Exception as exc:  # the CSV parser raises many kinds on corrupt files
        raise InvalidInput(
            f"{what} ({key}): cannot read the manifest ({type(exc).__name__})"
        ) from None


def store_table(store: ObjectStore, key: str, table: pd.DataFrame) -> ObjectInfo:
    """Write ``table`` to ``key`` as parquet, CSV or TSV by the key's extension."""
    kind = table_format(key)
    table = table.copy()
    table.attrs = {}  # pandas stores attrs as JSON, which numpy scalars are not
    if kind == "parquet":
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        data = buffer.getvalue()
    else:
        data = table.to_csv(index=False, sep="\t" if kind == "tsv" else ",").encode()
    return store.put_bytes(key, data, content_type=_CONTENT_TYPES[kind])


def store_json(store: ObjectStore, key: str, value: Mapping[str, Any]) -> ObjectInfo:
    """Write ``value`` as indented JSON to ``key``."""
    data = json.dumps(value, indent=2, default=str).encode()
    return store.put_bytes(key, data, content_type="application/json")


def joined(earlier: Sequence[pd.DataFrame], table: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``earlier`` tables, then those of ``table``, renumbered."""
    if not earlier:
        return table
    return pd.concat([*earlier, table], ignore_index=True)
