"""Webhooks: events written in an outbox in the transaction that ends their object, delivered
signed by `mbatch webhooks`, retried on a schedule.

`events` writes the outbox rows; `signing` keeps owners' secrets and signs; `delivery` makes
one attempt of one event; `publishing` publishes the messages that wake the delivery workers
(the maintenance pass calls `publish_due`); `addresses` is the guard on where callbacks go;
`store` is what the API reads and changes (the list of events, redelivery).
"""

from jobs.webhooks.publishing import publish_due

__all__ = ["publish_due"]
