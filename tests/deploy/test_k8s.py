"""docker/k8s/: every manifest is valid for the Kubernetes versions we claim (kubernetes-validate's
offline schemas, strict: an unknown field fails), KEDA's objects are valid for KEDA's own CRD schema
(vendored beside this file from KEDA v2.20.2), and the manifests agree with the code: the scaler
watches the queues the workers consume, the ScaledObject scales the worker Deployment, every
VITBATCH_* name is a setting, every image is one the Dockerfiles build, and no secret is inlined.
"""

from __future__ import annotations

import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from orchestrator.config import Settings
from orchestrator.constants import QUEUE_DEFAULT, QUEUE_INTERACTIVE
from orchestrator.fleet.celery_app import make_app

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "docker" / "k8s"
HERE = Path(__file__).parent
KUBERNETES_VERSIONS = ["1.30", "1.37"]  # the oldest we claim, and the newest kubernetes-validate 1.37 ships
KEDA_SCHEMAS = {"ScaledObject": HERE / "keda-scaledobject-v1alpha1.schema.yaml",
                "TriggerAuthentication": HERE / "keda-triggerauthentication-v1alpha1.schema.yaml"}


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def documents() -> list[dict]:
    """Every object the kustomization applies, in its order."""
    return [doc for name in kustomization()["resources"] for doc in yaml.safe_load_all((K8S / name).read_text())
            if doc]


def objects(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in documents() if doc["kind"] == kind}


def containers() -> list[dict]:
    return [c for d in [*objects("Deployment").values(), *objects("StatefulSet").values()]
            for c in d["spec"]["template"]["spec"]["containers"]]


def walk(node):
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from walk(child)


def closed(schema):
    """An OpenAPI v3 schema as the API server's strict field validation reads it: an object with
    `properties` takes no other field (unless it says it preserves unknown fields)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: closed(value) for key, value in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def test_the_kustomization_applies_every_manifest_in_the_folder_once():
    listed = kustomization()["resources"]
    assert len(listed) == len(set(listed))
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == on_disk
    assert kustomization()["namespace"] == "vitbatch"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kubernetes_object_is_valid_for_the_api_strictly(version):
    kinds = set()
    for doc in documents():
        if doc["apiVersion"].startswith("keda.sh/"):
            continue  # a CRD's: the next test
        kubernetes_validate.validate(doc, version, strict=True)  # raises with the path of the first problem
        kinds.add(doc["kind"])
    assert {"Namespace", "ConfigMap", "Service", "StatefulSet", "Deployment"} <= kinds


def test_a_misspelt_field_fails_the_kubernetes_validation():
    """The check above can fail: strict schemas refuse a field the API does not know."""
    worker = objects("Deployment")["vitbatch-worker"]
    bad = yaml.safe_load(yaml.safe_dump(worker))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 60
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("kind", sorted(KEDA_SCHEMAS))
def test_keda_objects_are_valid_for_kedas_crd_schema(kind):
    schema = closed(yaml.safe_load(KEDA_SCHEMAS[kind].read_text()))
    found = objects(kind)
    assert found, f"no {kind} in docker/k8s"
    for doc in found.values():
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        jsonschema.Draft7Validator(schema).validate(doc)
    misspelt = {**next(iter(found.values())), "sepc": {}}
    assert not jsonschema.Draft7Validator(schema).is_valid(misspelt)


def test_the_scaled_object_scales_the_worker_deployment_on_the_queues_it_consumes():
    (scaled,) = objects("ScaledObject").values()
    worker = objects("Deployment")[scaled["spec"]["scaleTargetRef"]["name"]]
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    consumed = args[args.index("--queues") + 1].split(",")
    assert consumed == [QUEUE_INTERACTIVE, QUEUE_DEFAULT]  # interactive first: kombu's priority order
    celery_queues = {queue.name for queue in make_app(Settings()).conf.task_queues}
    listed = [trigger["metadata"]["listName"] for trigger in scaled["spec"]["triggers"]]
    assert sorted(listed) == sorted(consumed) and set(listed) <= celery_queues
    sentinel_master = objects("ConfigMap")["vitbatch-config"]["data"]["VITBATCH_SENTINEL_MASTER"]
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "redis-sentinel" and trigger["metadata"]["sentinelMaster"] == sentinel_master
        assert trigger["authenticationRef"]["name"] in objects("TriggerAuthentication")


def test_every_vitbatch_variable_is_a_setting():
    settings = {f"VITBATCH_{name.upper()}" for name in Settings.model_fields}
    names = set(objects("ConfigMap")["vitbatch-config"]["data"])
    names |= {env["name"] for c in containers() for env in c.get("env", [])}
    used = {name for name in names if name.startswith("VITBATCH_")}
    assert {"VITBATCH_BROKER_URL", "VITBATCH_SENTINEL_PASSWORD", "VITBATCH_TASK_TIME_LIMIT_S"} <= used
    assert used - settings == set(), f"not settings in orchestrator/config.py: {sorted(used - settings)}"


def built_images() -> dict[str, str]:
    """name -> tag each Dockerfile says it is built as (`docker build ... -t NAME:TAG .`)."""
    built = {}
    for dockerfile in (ROOT / "docker").glob("*.Dockerfile"):
        name, tag = re.search(r"docker build -f docker/\S+ -t ([\w.-]+):([\w.-]+)", dockerfile.read_text()).groups()
        built[name] = tag
    return built


def test_every_vitbatch_image_is_one_the_dockerfiles_build_and_kustomize_pins_its_tag():
    built = built_images()
    assert set(built) == {"vitbatch-worker", "vitbatch-orchestrator"}
    pinned = {image["name"]: image["newTag"] for image in kustomization()["images"]}
    assert pinned == built
    for container in containers():
        name, _, tag = container["image"].partition(":")
        if name.startswith("vitbatch-"):
            assert name in built and tag == built[name], container["image"]
        else:
            assert tag and tag != "latest", container["image"]
    deployments = objects("Deployment")
    assert deployments["vitbatch-worker"]["spec"]["template"]["spec"]["containers"][0]["image"].startswith("vitbatch-worker:")
    for name in ("vitbatch-reconciler", "vitbatch-flower", "vitbatch-metrics"):
        assert deployments[name]["spec"]["template"]["spec"]["containers"][0]["image"].startswith("vitbatch-orchestrator:")


def test_no_secret_is_inlined_only_referenced():
    assert not objects("Secret"), "Secrets are created by the operator (kustomization.yaml says how), not shipped"
    secret_name = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|AUTH", re.I)
    for container in containers():
        for env in container.get("env", []):
            if secret_name.search(env["name"]):
                assert "valueFrom" in env or "$(" in env.get("value", ""), f"{env['name']} is written literally"
    for doc in documents():
        for node in walk(doc):
            if isinstance(node, str) and "://" in node and "@" in node:
                assert "$(REDIS_PASSWORD)@" in node, f"a URL with credentials: {node}"
    references = {ref["name"] for node in walk(documents()) if isinstance(node, dict)
                  for ref in [node.get("secretKeyRef")] if ref}
    references |= {ref["name"] for ta in objects("TriggerAuthentication").values()
                   for ref in ta["spec"]["secretTargetRef"]}
    text = (K8S / "kustomization.yaml").read_text()
    assert all(f"create secret generic {name}" in text for name in references), references


def test_workers_take_one_gpu_and_outlive_their_shards_on_a_warm_shutdown():
    config = objects("ConfigMap")["vitbatch-config"]["data"]
    limit_s, visibility_s = int(config["VITBATCH_TASK_TIME_LIMIT_S"]), int(config["VITBATCH_VISIBILITY_TIMEOUT_S"])
    assert visibility_s > limit_s
    pod = objects("Deployment")["vitbatch-worker"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > limit_s
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    pre_stop = " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    assert "kill -TERM 1" in pre_stop and "kill -0 1" in pre_stop  # warm shutdown, waited out
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" and m["name"] == "dshm" for m in container["volumeMounts"])


def test_every_vitbatch_process_reaches_redis_through_the_sentinels():
    redis = objects("StatefulSet")["vitbatch-redis"]
    assert redis["spec"]["replicas"] >= 3
    names = {c["name"] for c in redis["spec"]["template"]["spec"]["containers"]}
    assert names == {"redis", "sentinel"}
    scripts = objects("ConfigMap")["vitbatch-redis-scripts"]["data"]
    assert "appendonly yes" in scripts["start-redis.sh"] and "maxmemory-policy noeviction" in scripts["start-redis.sh"]
    assert "sentinel monitor $SENTINEL_MASTER" in scripts["start-sentinel.sh"]
    for name, deployment in objects("Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
        url = env.get("VITBATCH_BROKER_URL") or env["CELERY_BROKER_URL"]
        entries = url.split(";")
        assert len(entries) == redis["spec"]["replicas"] and all(e.startswith("sentinel://") for e in entries), name
        Settings().redis_endpoint(url.replace("$(REDIS_PASSWORD)", "pw"))  # the product parses it


def test_the_reconciler_flower_and_the_exporter_run_their_commands():
    deployments = objects("Deployment")
    assert deployments["vitbatch-reconciler"]["spec"]["template"]["spec"]["containers"][0]["args"] == ["reconcile", "--loop"]
    metrics = deployments["vitbatch-metrics"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert metrics[0] == "metrics"
    flower = deployments["vitbatch-flower"]["spec"]["template"]["spec"]["containers"][0]
    assert flower["command"] == ["python", "-m", "orchestrator.fleet.flowerauth"]
    env = {e["name"] for e in flower["env"]}
    assert {"CELERY_BROKER_URL", "FLOWER_BASIC_AUTH", "VITBATCH_SENTINEL_PASSWORD"} <= env
