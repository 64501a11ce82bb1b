"""The data plane: Celery tasks that run ViT models over shards. Imports orchestrator, never the reverse.

Importing a worker module does nothing but define. The Celery app and its signal handlers
live in `workers/celery.py`, which `celery -A workers worker` finds by Celery's own rule (the
package's `celery` module), so `import workers.runner` (tests, bench, the in-process path)
builds no app and needs no broker settings.
"""
