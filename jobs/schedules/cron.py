"""Cron expressions in a time zone: checking them, and the fire times they name.

A cron is 5 fields (minute hour day month weekday), or 6 with seconds first. Fire times are
computed in the schedule's IANA zone by croniter and handed out as UTC instants, which is what
is stored, compared and used as a run's key: two datetimes of one ZoneInfo compare by wall
clock, so 01:30 EDT and 01:30 EST (the repeated hour) would look equal.

Daylight saving follows Vixie cron: a wall-clock time skipped by a spring-forward change fires
once, at the change (croniter's behaviour), and a cron with a fixed hour fires once in a
repeated hour, not twice (a daily 01:30 runs once a day), while one whose hour is a wildcard
(`*`, `*/2`) keeps its real-time spacing through it.
"""

import zoneinfo
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from croniter import CroniterError, croniter

from jobs.errors import InvalidParameter

# A cron that matches less often than this is refused as one that never fires; croniter gives
# up after this many years without a match (a 29 February fires every four).
MAX_YEARS_BETWEEN_FIRES = 5
# How many fires, and how far ahead, the shortest interval is sampled over.
SAMPLE_FIRES = 2000
SAMPLE_SPAN = timedelta(days=400)
# Where sampling starts: a fixed instant, so a cron's verdict does not depend on the day it
# was asked; a year after it covers both daylight-saving changes of every zone.
SAMPLE_BASE = datetime(2026, 1, 1, tzinfo=UTC)
# What croniter may raise on text it was not written for, beside its own errors.
_CRON_ERRORS = (CroniterError, ValueError, KeyError, IndexError, TypeError, OverflowError)


@lru_cache(maxsize=1)
def _zone_names() -> frozenset[str]:
    # `localtime` is whatever zone the host reading it is set to, and `Factory` no zone at
    # all: a schedule would fire at different times on different hosts.
    return frozenset(zoneinfo.available_timezones()) - {"localtime", "Factory"}


def zone(name: str) -> zoneinfo.ZoneInfo:
    """The IANA time zone `name`; InvalidParameter("timezone") for any other text. Names are
    checked against the zone list first: ZoneInfo opens files, and on a directory, a long
    name or a path it raises errors of its own."""
    if name not in _zone_names():
        raise InvalidParameter("timezone", name, "not an IANA time zone name (e.g. Europe/Paris)")
    return zoneinfo.ZoneInfo(name)


def check_cron(expr: str) -> str:
    """`expr` with its fields separated by one space; InvalidParameter("cron") unless it is 5
    fields, or 6 with seconds first, that name dates that exist."""
    fields = expr.split()
    if len(fields) not in (5, 6):
        raise InvalidParameter(
            "cron", expr, "a cron expression is 5 fields, or 6 with seconds first"
        )
    normal = " ".join(fields)
    try:
        # strict: a day that never comes (`0 0 31 2 *`) is refused here, not when firing.
        valid = croniter.is_valid(normal, second_at_beginning=True, strict=True)
    except _CRON_ERRORS:
        valid = False
    if not valid:
        raise InvalidParameter("cron", expr, "not a valid cron expression")
    return normal


def _fixed_hour(expr: str) -> bool:
    """Whether the hour field names hours rather than stepping through all of them."""
    fields = expr.split()
    hour = fields[2] if len(fields) == 6 else fields[1]
    return not hour.startswith("*")


def _repeated(moment: datetime, tz: zoneinfo.ZoneInfo) -> bool:
    """Whether `moment` is the second pass of a wall-clock time that a fall-back change
    repeats (01:30 EST after 01:30 EDT)."""
    local = moment.astimezone(UTC).astimezone(tz)  # from UTC: `fold` is set exactly
    return local.fold == 1 and local.utcoffset() != local.replace(fold=0).utcoffset()


class Fires:
    """The fire times of a cron in a zone, as UTC instants, from a starting instant on."""

    def __init__(self, expr: str, tz: zoneinfo.ZoneInfo, start: datetime, backwards: bool = False):
        self._tz = tz
        self._skip_repeated = _fixed_hour(expr)
        self._backwards = backwards
        # croniter reads whole seconds; a fraction would land a 6-field cron between slots.
        start = start.astimezone(UTC).replace(microsecond=0)
        try:
            self._iter = croniter(
                expr,
                start.astimezone(tz),
                second_at_beginning=True,
                max_years_between_matches=MAX_YEARS_BETWEEN_FIRES,
            )
        except _CRON_ERRORS as exc:
            raise InvalidParameter("cron", expr, "not a valid cron expression") from exc

    def __iter__(self) -> "Fires":
        return self

    def __next__(self) -> datetime:
        while True:
            try:
                step = self._iter.get_prev if self._backwards else self._iter.get_next
                moment: datetime = step(datetime)
            except _CRON_ERRORS:  # no fire within MAX_YEARS_BETWEEN_FIRES
                raise StopIteration from None
            if not (self._skip_repeated and _repeated(moment, self._tz)):
                return moment.astimezone(UTC)


def next_fire(expr: str, tz: zoneinfo.ZoneInfo, after: datetime) -> datetime | None:
    """The first fire strictly after `after` (UTC), or None if there is none within
    MAX_YEARS_BETWEEN_FIRES."""
    return next(Fires(expr, tz, after), None)


def latest_fire(expr: str, tz: zoneinfo.ZoneInfo, now: datetime) -> datetime | None:
    """The last fire at or before `now` (UTC): the one slot a schedule that missed several
    runs, once."""
    # croniter's get_prev is strictly before its start; whole seconds, so one past `now`
    # (rounded down) includes a slot at `now` itself and nothing after it.
    start = now.astimezone(UTC).replace(microsecond=0) + timedelta(seconds=1)
    return next(Fires(expr, tz, start, backwards=True), None)


def shortest_interval(expr: str, tz: zoneinfo.ZoneInfo) -> float | None:
    """The shortest time between two consecutive fires, sampled over SAMPLE_FIRES fires or
    SAMPLE_SPAN from the first fire after SAMPLE_BASE; None for a cron that fires once or
    never in that span. Sampling from a fire, not from the base, catches a cron that is dense
    only on rare days (every second of 29 February)."""
    shortest: float | None = None
    fires = Fires(expr, tz, SAMPLE_BASE)
    previous = next(fires, None)
    if previous is None:
        return None
    end = previous + SAMPLE_SPAN
    for _, moment in zip(range(SAMPLE_FIRES), fires, strict=False):
        gap = (moment - previous).total_seconds()
        # Two wall-clock slots mapped to one instant by a spring-forward change are one fire.
        if gap > 0 and (shortest is None or gap < shortest):
            shortest = gap
        if moment > end:
            break
        previous = moment
    return shortest


def check_timing(expr: str, timezone: str, min_interval_seconds: float) -> tuple[str, str]:
    """A schedule's cron and zone, checked: the cron normalized, the zone a known name, and
    no two fires closer than `min_interval_seconds`; InvalidParameter naming the field."""
    normal = check_cron(expr)
    tz = zone(timezone)
    if next_fire(normal, tz, SAMPLE_BASE) is None:
        raise InvalidParameter("cron", expr, f"never fires within {MAX_YEARS_BETWEEN_FIRES} years")
    shortest = shortest_interval(normal, tz)
    if shortest is not None and shortest < min_interval_seconds:
        raise InvalidParameter(
            "cron",
            expr,
            f"fires {shortest:g} s apart; schedules may fire at most every "
            f"{min_interval_seconds:g} s (MBATCH_SCHEDULE_MIN_INTERVAL_SECONDS)",
        )
    return normal, timezone
