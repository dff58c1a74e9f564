"""Tables medflow writes for people: CSV files a spreadsheet opens safely, markdown that shows values as text.

Label values, class names and file names come from the user's data. A CSV cell that begins with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return is a formula to Excel and LibreOffice
(``=cmd|' /C calc'!A0``), so every CSV medflow writes prefixes such cells, and its column
headers, with ``'`` (OWASP's rule for CSV injection); a cell that already begins with ``'`` gets
one more, so ``read_csv`` gives back exactly what was written. Numbers stay numbers.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pandas as pd

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def neutralise(value):
    """A string cell made inert for spreadsheets (others unchanged).

    >>> neutralise("=cmd|' /C calc'!A0"), neutralise("@SUM(1+1)"), neutralise("pneumonia"), neutralise(-1.5)
    ("'=cmd|' /C calc'!A0", "'@SUM(1+1)", 'pneumonia', -1.5)
    """
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def restore(value):
    """The value ``neutralise`` was given.

    >>> restore(neutralise("=1+1")), restore(neutralise("'quoted")), restore("plain")
    ('=1+1', "'quoted", 'plain')
    """
    return value[1:] if isinstance(value, str) and value.startswith("'") else value


def to_csv(df: pd.DataFrame) -> str:
    """``df`` as CSV text with every string cell and header neutralised (no index)."""
    out = df.rename(columns=lambda c: neutralise(str(c)))
    for col in out.columns:
        if out[col].dtype == object or pd.api.types.is_string_dtype(out[col]):
            out[col] = out[col].map(neutralise)
    # every string quoted: a carriage return inside a cell would otherwise end the row for a reader
    return out.to_csv(index=False, quoting=csv.QUOTE_NONNUMERIC)


def write_csv_atomic(path: str | Path, df: pd.DataFrame) -> Path:
    """Write ``to_csv(df)`` whole or not at all."""
    from medflow.runs import write_text_atomic

    return write_text_atomic(path, to_csv(df))


def read_csv(path: str | Path, **kwargs) -> pd.DataFrame:
    """A CSV written by ``to_csv``, with its cells and headers as they were before neutralising."""
    df = pd.read_csv(path, **kwargs)
    df = df.rename(columns=restore)
    for col in df.columns:
        if df[col].dtype == object or pd.api.types.is_string_dtype(df[col]):
            df[col] = df[col].map(restore)
    return df


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>()#+\-.!|~=&])")


def md(value) -> str:
    """A user's value as literal markdown text: punctuation escaped, one line.

    >>> md("=cmd|x [a](javascript:alert(1)) <b>")
    '\\\\=cmd\\\\|x \\\\[a\\\\]\\\\(javascript:alert\\\\(1\\\\)\\\\) \\\\<b\\\\>'
    """
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))
