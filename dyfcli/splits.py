"""Parse the split flags (`--train-until`, `--val`, `--test`) into inclusive date ranges.

A selection is a year (`2019`), a month (`2019-07`), a date (`2019-07-14`) or a range `START:END` of any
of these (either side may be empty). Ranges are inclusive and returned as ISO dates.
"""

from __future__ import annotations

import calendar
import re
from datetime import date

from dyfcli.errors import UsageError

_YEAR = re.compile(r"^\d{4}$")
_MONTH = re.compile(r"^(\d{4})-(\d{1,2})$")
_DATE = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$")


def _bounds(token: str, flag: str) -> tuple[date, date]:
    token = token.strip()
    try:
        if _YEAR.match(token):
            year = int(token)
            return date(year, 1, 1), date(year, 12, 31)
        if m := _MONTH.match(token):
            year, month = int(m[1]), int(m[2])
            return date(year, month, 1), date(year, month, calendar.monthrange(year, month)[1])
        if m := _DATE.match(token):
            day = date(int(m[1]), int(m[2]), int(m[3]))
            return day, day
    except ValueError as err:
        raise UsageError(f"{flag} {token!r}: {err}") from None
    raise UsageError(f"{flag} {token!r}: expected a year (2019), month (2019-07), date (2019-07-14) "
                     "or range START:END")


def parse_selection(text: str, flag: str) -> tuple[str | None, str | None]:
    """`2019` -> ('2019-01-01', '2019-12-31'); `2015:2017-06` -> ('2015-01-01', '2017-06-30')."""
    if ":" in text:
        left, right = text.split(":", 1)
        start = _bounds(left, flag)[0].isoformat() if left.strip() else None
        end = _bounds(right, flag)[1].isoformat() if right.strip() else None
    else:
        first, last = _bounds(text, flag)
        start, end = first.isoformat(), last.isoformat()
    if start and end and start > end:
        raise UsageError(f"{flag} {text!r}: the range ends before it starts")
    return start, end


def time_splits(train_until: str, val: str, test: str) -> dict[str, dict[str, list[str | None]]]:
    """The `dyf_splits` attribute for date-based splits. `train_until` may itself be a range."""
    if ":" in train_until:
        train = parse_selection(train_until, "--train-until")
    else:
        train = (None, _bounds(train_until, "--train-until")[1].isoformat())
    splits = {"train": list(train), "val": list(parse_selection(val, "--val")),
              "test": list(parse_selection(test, "--test"))}
    names = list(splits)
    for a_index, a in enumerate(names):
        for b in names[a_index + 1:]:
            (a0, a1), (b0, b1) = splits[a], splits[b]
            if (a0 or "0000") <= (b1 or "9999") and (b0 or "0000") <= (a1 or "9999"):
                raise UsageError(f"the {a} and {b} splits overlap ({splits[a]} vs {splits[b]}); "
                                 "choose disjoint --train-until/--val/--test")
    return {name: {"time": bounds} for name, bounds in splits.items()}
