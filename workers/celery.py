"""The Celery app (`celery -A workers worker` finds it here, by Celery's rule for a package) with the tasks registered."""

from celery.signals import celeryd_init, worker_init, worker_ready

from orchestrator.config import Settings
from orchestrator.fleet.celery_app import make_app
from workers.memory import keep_freed_memory, pause_collector, settle_heap
from workers.metrics import on_worker_init

app = make_app(Settings())  # the worker process's edge: its settings come from the environment
app.conf.imports = ["workers.tasks", "workers.vectortasks"]
worker_init.connect(on_worker_init)  # VITBATCH_METRICS_PORT: the Prometheus endpoint, once per process
worker_init.connect(lambda **_: keep_freed_memory(), weak=False)  # before the first forward pass
celeryd_init.connect(pause_collector)  # worker processes only: not tests or tools that import the app
worker_ready.connect(settle_heap)
