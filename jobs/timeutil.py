from datetime import UTC, datetime


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every one we store is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def unix_seconds(value: datetime | None) -> int | None:
    """A stored time as the whole Unix seconds OpenAI's objects carry."""
    moment = aware(value)
    return int(moment.timestamp()) if moment is not None else None
