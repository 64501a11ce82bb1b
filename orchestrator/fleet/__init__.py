"""Connecting a fleet: the Celery app, Redis endpoints (Sentinel, timeouts, retries), clean exits, Flower and Prometheus."""
