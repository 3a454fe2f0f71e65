"""Schedules: a job or batch body run again at each fire time of a cron expression in a time
zone. `cron` reads the expressions and computes fire times, `store` keeps the schedule rows,
and `firing` makes each fire time's run, once; this module is the package's API."""

from jobs.schedules.cron import check_timing, latest_fire, next_fire, shortest_interval, zone
from jobs.schedules.firing import fire_due, run_key
from jobs.schedules.store import (
    create_schedule,
    delete_schedule,
    get_schedule,
    list_runs,
    list_schedules,
    update_schedule,
)

__all__ = [
    "check_timing",
    "create_schedule",
    "delete_schedule",
    "fire_due",
    "get_schedule",
    "latest_fire",
    "list_runs",
    "list_schedules",
    "next_fire",
    "run_key",
    "shortest_interval",
    "update_schedule",
    "zone",
]
