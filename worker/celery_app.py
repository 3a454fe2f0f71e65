"""The workers' Celery app: the same configuration the API publishes with."""

from celery import Celery

from jobs.queue import celery_config
from jobs.settings import get_settings

app = Celery("mbatch")
app.conf.update(celery_config(get_settings()))
app.conf.update(include=["worker.tasks"])
