"""API keys: shown once at creation, stored only as a SHA-256 hash."""

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.errors import Unauthorized
from jobs.models import ApiKey

KEY_PREFIX = "mb-"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, owner: str) -> str:
    """Store a new key for `owner` and return its secret; the secret is not kept."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(id="key_" + secrets.token_hex(12), owner=owner, key_hash=hash_key(secret)))
    session.flush()
    return secret


def authenticate(session: Session, secret: str | None) -> str:
    """The owner a bearer secret belongs to."""
    if not secret:
        raise Unauthorized("missing API key: send Authorization: Bearer <key>")
    key = session.scalar(
        select(ApiKey).where(ApiKey.key_hash == hash_key(secret), ApiKey.revoked_at.is_(None))
    )
    if key is None:
        raise Unauthorized("invalid API key")
    return key.owner
