"""`celery -A workers worker` entry: the shared app with the tasks registered."""

from orchestrator.celery_app import make_app

app = make_app()
app.conf.imports = ["workers.tasks"]
