"""The data plane: Celery tasks that run ViT models over shards. Imports orchestrator, never the reverse."""

from workers.app import app

__all__ = ["app"]
