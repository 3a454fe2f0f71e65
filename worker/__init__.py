"""GPU workers: the Celery app, its tasks, and the inference engine."""
