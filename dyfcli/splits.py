"""Parse the split flags (`--train-until`, `--val`, `--test`) into inclusive time ranges.

A selection is a year (`2019`), a month (`2019-07`), a date (`2019-07-14`), a date-time
(`2019-07-14T06` or `2019-07-14T06:30`, for sub-daily data) or a range `START:END` of any of these
(either side may be empty). Ranges are inclusive and returned as ISO dates (`2019-07-14`, an end that
covers the whole day) or date-times (`2019-07-14T06:00`, that instant).
"""

from __future__ import annotations

import calendar
import re
from datetime import date, datetime, timedelta

from dyfcli.errors import UsageError

_YEAR = re.compile(r"^\d{4}$")
_MONTH = re.compile(r"^(\d{4})-(\d{1,2})$")
_DATE = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})$")
_DATETIME = re.compile(r"^(\d{4})-(\d{1,2})-(\d{1,2})T(\d{1,2})(?::(\d{2}))?$")


def _bounds(token: str, flag: str) -> tuple[str, str]:
    """The first and last ISO date (or date-time) a token covers."""
    token = token.strip()
    try:
        if _YEAR.match(token):
            year = int(token)
            return date(year, 1, 1).isoformat(), date(year, 12, 31).isoformat()
        if m := _MONTH.match(token):
            year, month = int(m[1]), int(m[2])
            return (date(year, month, 1).isoformat(),
                    date(year, month, calendar.monthrange(year, month)[1]).isoformat())
        if m := _DATE.match(token):
            day = date(int(m[1]), int(m[2]), int(m[3])).isoformat()
            return day, day
        if m := _DATETIME.match(token):
            instant = datetime(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5] or 0))
            return instant.isoformat(timespec="minutes"), instant.isoformat(timespec="minutes")
    except ValueError as err:
        raise UsageError(f"{flag} {token!r}: {err}") from None
    raise UsageError(f"{flag} {token!r}: expected a year (2019), month (2019-07), date (2019-07-14), "
                     "date-time (2019-07-14T06:00) or range START:END")


def parse_selection(text: str, flag: str) -> tuple[str | None, str | None]:
    """`2019` -> ('2019-01-01', '2019-12-31'); `2015:2017-06` -> ('2015-01-01', '2017-06-30')."""
    if (parts := _split_range(text)) is not None:
        left, right = parts
        start = _bounds(left, flag)[0] if left.strip() else None
        end = _bounds(right, flag)[1] if right.strip() else None
    else:
        start, end = _bounds(text, flag)
    if start and end and _instant(start, end=False) >= _instant(end, end=True):
        raise UsageError(f"{flag} {text!r}: the range ends before it starts")
    return start, end


def _split_range(text: str) -> tuple[str, str] | None:
    """`START:END` split at the colon that is not inside a time of day (`2019-07-14T06:30`)."""
    for index, char in enumerate(text):
        if char != ":":
            continue
        in_time = re.search(r"T\d{1,2}$", text[:index]) and re.match(r"\d{2}(:|$)", text[index + 1:])
        if not in_time:
            return text[:index], text[index + 1:]
    return None


def _instant(text: str, end: bool) -> datetime:
    """A bound as a point in time; an end date covers its whole day (the next midnight, exclusive)."""
    if "T" in text:
        instant = datetime.fromisoformat(text)
        return instant + timedelta(minutes=1) if end else instant
    day = datetime.fromisoformat(text)
    return day + timedelta(days=1) if end else day


def time_splits(train_until: str, val: str, test: str) -> dict[str, dict[str, list[str | None]]]:
    """The `dyf_splits` attribute for date-based splits. `train_until` may itself be a range."""
    if _split_range(train_until) is not None:
        train = parse_selection(train_until, "--train-until")
    else:
        train = (None, _bounds(train_until, "--train-until")[1])
    splits = {"train": list(train), "val": list(parse_selection(val, "--val")),
              "test": list(parse_selection(test, "--test"))}
    names = list(splits)
    for a_index, a in enumerate(names):
        for b in names[a_index + 1:]:
            if _overlap(splits[a], splits[b]):
                raise UsageError(f"the {a} and {b} splits overlap ({splits[a]} vs {splits[b]}); "
                                 "choose disjoint --train-until/--val/--test")
    return {name: {"time": bounds} for name, bounds in splits.items()}


def _overlap(a: list[str | None], b: list[str | None]) -> bool:
    """Whether two inclusive ranges share a moment (dates cover whole days)."""
    lo_a, hi_a = (_instant(a[0], False) if a[0] else datetime.min), (_instant(a[1], True) if a[1] else datetime.max)
    lo_b, hi_b = (_instant(b[0], False) if b[0] else datetime.min), (_instant(b[1], True) if b[1] else datetime.max)
    return lo_a < hi_b and lo_b < hi_a
