"""Celery workers: prediction (the model, batched) and URL fetching."""
