"""Cron expressions in a time zone: what is accepted, when they fire, across daylight saving."""

from datetime import UTC, datetime

import pytest

from jobs.errors import InvalidParameter
from jobs.schedules.cron import (
    Fires,
    check_cron,
    check_timing,
    latest_fire,
    next_fire,
    shortest_interval,
    zone,
)

NEW_YORK = zone("America/New_York")


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def fires(expr: str, start: datetime, count: int, tz: str = "America/New_York") -> list[str]:
    """The next `count` fires after `start`, as local wall-clock times with their offsets."""
    place = zone(tz)
    return [
        moment.astimezone(place).isoformat()
        for _, moment in zip(range(count), Fires(expr, place, start), strict=False)
    ]


def test_five_fields_fire_on_the_minute() -> None:
    assert next_fire("*/15 * * * *", zone("UTC"), utc(2026, 1, 1, 10, 7, 30)) == utc(
        2026, 1, 1, 10, 15
    )
    # Strictly after: a start on a slot gives the next one.
    assert next_fire("*/15 * * * *", zone("UTC"), utc(2026, 1, 1, 10, 15)) == utc(
        2026, 1, 1, 10, 30
    )


def test_six_fields_have_seconds_first() -> None:
    # croniter's own default reads a 6th field as seconds last: "15 * * * * *" would then be
    # minute 15 of every hour, not second 15 of every minute.
    assert fires("15 * * * * *", utc(2026, 1, 1, 0, 0, 7), 2, "UTC") == [
        "2026-01-01T00:00:15+00:00",
        "2026-01-01T00:01:15+00:00",
    ]
    assert fires("*/20 30 9 * * *", utc(2026, 1, 1), 4, "UTC") == [
        "2026-01-01T09:30:00+00:00",
        "2026-01-01T09:30:20+00:00",
        "2026-01-01T09:30:40+00:00",
        "2026-01-02T09:30:00+00:00",
    ]


def test_a_daily_cron_fires_at_its_local_time() -> None:
    # 09:00 in New York is 14:00 UTC in winter and 13:00 UTC in summer.
    assert next_fire("0 9 * * *", NEW_YORK, utc(2026, 1, 10)) == utc(2026, 1, 10, 14)
    assert next_fire("0 9 * * *", NEW_YORK, utc(2026, 7, 10)) == utc(2026, 7, 10, 13)


@pytest.mark.parametrize(
    "expr",
    [
        "",
        "* * * *",
        "0 0 0 0 0 0 0",  # croniter takes a 7th field (a year); the API does not
        "@daily",
        "61 * * * *",
        "*/0 * * * *",
        "0 0 * * 8",
        "0 0 31 2 *",  # 31 February never comes
        "H * * * *",  # hashed, needs an id
        "a b c d e",
        "1-100000000000000000000 * * * *",
        "60 * * * * *",
    ],
)
def test_invalid_expressions_are_refused_naming_cron(expr: str) -> None:
    with pytest.raises(InvalidParameter) as refused:
        check_cron(expr)
    assert refused.value.param == "cron"


def test_an_expression_is_normalized() -> None:
    assert check_cron("  0   9 * *  1-5 ") == "0 9 * * 1-5"
    assert check_cron("0 0 29 2 *") == "0 0 29 2 *"  # every four years is still a date


@pytest.mark.parametrize(
    "name", ["utc", "America", "zone.tab", "../etc/passwd", "a" * 300, "Mars/Olympus", "\x00"]
)
def test_only_iana_zone_names_are_accepted(name: str) -> None:
    with pytest.raises(InvalidParameter) as refused:
        zone(name)
    assert refused.value.param == "timezone"


@pytest.mark.parametrize(
    ("expr", "seconds"),
    [
        ("* * * * *", 60),
        ("*/1 * * * * *", 1),
        ("*/20 * * * * *", 20),
        ("0,59 * * * *", 60),  # 00:59 -> 01:00
        ("0 0 31,1 * *", 86400),  # the 31st -> the 1st
        ("* * * 29 2 *", 1),  # every second, but only on 29 February
        ("0 1,3 * * *", 3600),  # two hours apart, but one on the day clocks spring forward
    ],
)
def test_shortest_interval_is_sampled(expr: str, seconds: float) -> None:
    assert shortest_interval(expr, NEW_YORK) == seconds


def test_a_cron_may_not_fire_more_often_than_the_minimum() -> None:
    with pytest.raises(InvalidParameter) as refused:
        check_timing("*/30 * * * * *", "UTC", 60)
    assert refused.value.param == "cron"
    assert "30 s apart" in refused.value.message
    assert check_timing("*/30 * * * * *", "UTC", 30) == ("*/30 * * * * *", "UTC")
    assert check_timing("0 0 1 1 *", "UTC", 86400 * 7)  # once a year: no two fires at all
    with pytest.raises(InvalidParameter) as refused:
        check_timing("0 * * * *", "Nowhere/Land", 60)
    assert refused.value.param == "timezone"


def test_a_skipped_wall_clock_time_fires_once_at_the_change() -> None:
    # 2026-03-08: New York springs forward from 02:00 EST to 03:00 EDT; 02:30 never happens.
    assert fires("30 2 * * *", utc(2026, 3, 7, 17), 3) == [
        "2026-03-08T03:00:00-04:00",
        "2026-03-09T02:30:00-04:00",
        "2026-03-10T02:30:00-04:00",
    ]
    # An hourly cron has no 02:00 that day: an hour is an hour.
    assert fires("0 * * * *", utc(2026, 3, 8, 5, 30), 3) == [
        "2026-03-08T01:00:00-05:00",
        "2026-03-08T03:00:00-04:00",
        "2026-03-08T04:00:00-04:00",
    ]


def test_a_fixed_hour_fires_once_in_the_repeated_hour() -> None:
    # 2026-11-01: New York falls back from 02:00 EDT to 01:00 EST; 01:30 happens twice.
    assert fires("30 1 * * *", utc(2026, 10, 31, 16), 3) == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-02T01:30:00-05:00",
        "2026-11-03T01:30:00-05:00",
    ]
    assert fires("0 30 1 * * *", utc(2026, 10, 31, 16), 2) == [
        "2026-11-01T01:30:00-04:00",
        "2026-11-02T01:30:00-05:00",
    ]
    # From within the repeated hour (01:00 EST), the daily run has been made already.
    assert next_fire("30 1 * * *", NEW_YORK, utc(2026, 11, 1, 6)) == utc(2026, 11, 2, 6, 30)
    # The latest fire seen from after the repeated hour is the first 01:30, not the second.
    assert latest_fire("30 1 * * *", NEW_YORK, utc(2026, 11, 1, 8)) == utc(2026, 11, 1, 5, 30)


def test_a_wildcard_hour_keeps_real_time_spacing_through_the_repeated_hour() -> None:
    assert fires("*/30 * * * *", utc(2026, 11, 1, 4, 50), 6) == [
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:30:00-04:00",
        "2026-11-01T01:00:00-05:00",
        "2026-11-01T01:30:00-05:00",
        "2026-11-01T02:00:00-05:00",
        "2026-11-01T02:30:00-05:00",
    ]


def test_missed_windows_fire_once_for_the_latest_slot() -> None:
    # Due at 10:00, nothing ran until 10:07:30: one fire, for 10:05, and next due at 10:10.
    now = utc(2026, 1, 1, 10, 7, 30)
    assert latest_fire("*/5 * * * *", zone("UTC"), now) == utc(2026, 1, 1, 10, 5)
    assert next_fire("*/5 * * * *", zone("UTC"), now) == utc(2026, 1, 1, 10, 10)
    # A slot at `now` itself is the latest; a fraction of a second before it is not yet.
    assert latest_fire("*/5 * * * *", zone("UTC"), utc(2026, 1, 1, 10, 5)) == utc(2026, 1, 1, 10, 5)
    just_before = datetime(2026, 1, 1, 10, 4, 59, 999999, tzinfo=UTC)
    assert latest_fire("*/5 * * * *", zone("UTC"), just_before) == utc(2026, 1, 1, 10)
    assert latest_fire("* * * * * *", zone("UTC"), just_before) == utc(2026, 1, 1, 10, 4, 59)
    # Days missed: still the one latest slot.
    assert latest_fire("0 9 * * *", NEW_YORK, utc(2026, 1, 20, 12)) == utc(2026, 1, 19, 14)
