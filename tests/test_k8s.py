"""deploy/k8s, checked offline: every manifest against the Kubernetes API schemas that
kubernetes-validate bundles, and, read as YAML, what docs/operations.md ("Kubernetes") promises."""
from __future__ import annotations

import copy
import importlib.util
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

from app.config import Settings, shard_arg
from tests.test_deploy import settings_read

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
# The oldest Kubernetes the manifests are meant for, and the newest schema the package bundles.
VERSIONS = ("1.31.0", "1.37.0")
API_BASE = "/api/v1/pipeline"  # the contract's API base
DAEMONS = {"app.ingest": "event-ingest", "app.splitter": "shard-splitter", "app.worker": "shard-worker",
           "app.sender": "mysql-sender"}
# docs/operations.md's recipe for one more shard (POSIX sed).
ADD_SHARD = """sed -e 's/-1$/-2/' -e 's/"1"/"2"/g' deploy/k8s/shard-1.yaml > deploy/k8s/shard-2.yaml"""


def kustomization() -> dict:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def documents(texts: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """(file, object) for every object of the files the kustomization lists."""
    if texts is None:
        texts = {name: (K8S / name).read_text() for name in kustomization()["resources"]}
    return [(name, doc) for name, text in texts.items() for doc in yaml.safe_load_all(text) if doc is not None]


def validate(doc: dict, version: str) -> None:
    """Strict: a field the schema does not know (a typo) is an error too."""
    kubernetes_validate.validate(doc, version, strict=True)


DOCS = documents()


def by_key(docs) -> dict[tuple[str, str], dict]:
    found = {}
    for _, doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in found, f"{key} is defined twice"
        found[key] = doc
    return found


@pytest.fixture(scope="module")
def objects() -> dict[tuple[str, str], dict]:
    return by_key(DOCS)


@pytest.fixture(scope="module")
def config(objects) -> dict[str, str]:
    return objects[("ConfigMap", "pipeline-config")]["data"]


@pytest.fixture(scope="module")
def secret(objects) -> dict[str, str]:
    return objects[("Secret", "pipeline-secrets")]["stringData"]


def workloads(objects) -> list[dict]:
    return [o for (kind, _), o in objects.items() if kind in ("Deployment", "StatefulSet")]


def pod(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def only_container(workload: dict) -> dict:
    containers = pod(workload)["containers"]
    assert len(containers) == 1, f"{workload['metadata']['name']}: one program per pod"
    return containers[0]


def program(workload: dict) -> tuple[str, int | None]:
    """The module a workload runs with `python -m`, and its `--shard`."""
    command = only_container(workload)["command"] + only_container(workload).get("args", [])
    assert command[:2] == ["python", "-m"], command
    shard = int(command[command.index("--shard") + 1]) if "--shard" in command else None
    return command[2], shard


def container_env(container: dict, config: dict, secret: dict) -> dict[str, str]:
    """The environment a container gets: its envFrom sources, then its own env."""
    env = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            assert source["configMapRef"]["name"] == "pipeline-config"
            env.update(config)
        else:
            assert source["secretRef"]["name"] == "pipeline-secrets"
            env.update(secret)
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", "<from the downward API>")
    return env


def names_the_app_reads_outside_config() -> set[str]:
    """WORKER_ID, the owner name of a daemon's claims, is read by the daemon loop itself."""
    sources = "".join(p.read_text() for p in (ROOT / "app").rglob("*.py"))
    return {"WORKER_ID"} if re.search(r"environ\.get\(\s*\"WORKER_ID\"", sources) else set()


# -- schemas ----------------------------------------------------------------------------------------

def test_the_kustomization_lists_every_manifest_and_nothing_else():
    k = kustomization()
    assert (k["apiVersion"], k["kind"]) == ("kustomize.config.k8s.io/v1beta1", "Kustomization")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(k["resources"]) == sorted(files)
    assert len(DOCS) >= 20


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("item", DOCS, ids=lambda item: f"{item[0]}:{item[1]['kind']}/{item[1]['metadata']['name']}")
def test_every_manifest_validates_against_the_kubernetes_schema(item, version):
    validate(item[1], version)


@pytest.mark.parametrize("breakage", [
    ("a misspelt field", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
        readinesProbe=d["spec"]["template"]["spec"]["containers"][0].pop("readinessProbe"))),
    ("a wrong type", lambda d: d["spec"].update(replicas="two")),
    ("a missing required field", lambda d: d["spec"].pop("selector")),
    ("a list for an object", lambda d: d["spec"]["template"]["spec"]["containers"][0].update(resources=["cpu"])),
    ("a wrong apiVersion", lambda d: d.update(apiVersion="apps/v1beta1")),
], ids=lambda b: b[0])
def test_a_broken_manifest_is_a_failure(objects, breakage):
    _, breakit = breakage
    broken = copy.deepcopy(objects[("Deployment", "pipeline-apid")])
    breakit(broken)
    with pytest.raises((ValidationError, SchemaNotFoundError)):
        validate(broken, VERSIONS[-1])


# -- what the manifests promise ---------------------------------------------------------------------

def test_api_runs_twice_behind_one_service_with_readiness_on_ready(objects, config):
    api = objects[("Deployment", "pipeline-apid")]
    assert api["spec"]["replicas"] >= 2
    assert program(api) == ("app.api", None)
    c = only_container(api)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert c["readinessProbe"]["httpGet"]["path"] == f"{API_BASE}/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == f"{API_BASE}/health"
    for probe in ("readinessProbe", "livenessProbe"):
        assert ports[c[probe]["httpGet"]["port"]] == int(config["PIPELINE_API_PORT"])
    service = objects[("Service", "pipeline-apid")]
    pod_labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert api["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert ports[port["targetPort"]] == int(config["PIPELINE_API_PORT"])
    # Every daemon's PIPELINE_URL is this Service.
    url = urlsplit(config["PIPELINE_URL"])
    assert (url.hostname, url.port, url.path) == ("pipeline-apid", port["port"], API_BASE)
    assert config["PIPELINE_API_HOST"] == "0.0.0.0"
    # It keeps answering while the daemons stopping with it hand their tasks back, and gets the
    # time to (gunicorn's graceful timeout is 10 s).
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod(api)["terminationGracePeriodSeconds"] >= sleep + 10


def test_one_worker_and_a_sender_per_shard(objects, config):
    shard_count = int(config["SHARD_COUNT"])
    workers, senders = [], []
    for w in workloads(objects):
        module, shard = program(w)
        if module == "app.worker":
            # Exactly one per shard: a StatefulSet of one (at most one pod, a stable WORKER_ID).
            assert w["kind"] == "StatefulSet" and w["spec"]["replicas"] == 1, w["metadata"]["name"]
            assert ("Service", w["spec"]["serviceName"]) in objects
            assert w["metadata"]["name"] == f"shard-worker-{shard}"
            workers.append(shard)
        elif module == "app.sender":
            assert w["kind"] == "Deployment" and w["spec"]["replicas"] >= 1
            assert w["metadata"]["name"].startswith(f"mysql-sender-{shard}")
            senders.append(shard)
    assert sorted(workers) == list(range(shard_count))
    assert sorted(set(senders)) == list(range(shard_count))


def test_the_splitter_and_one_generator(objects):
    modules = [program(w)[0] for w in workloads(objects)]
    assert modules.count("app.splitter") == 1
    assert modules.count("app.ingest") == 1
    ingest = objects[("Deployment", "event-ingest")]
    assert ingest["spec"]["replicas"] == 1 and ingest["spec"]["strategy"]["type"] == "Recreate"


def test_every_daemon_mounts_the_rwx_claim_at_shared_and_knows_its_name_and_the_api(objects, config, secret):
    claims = {name: o for (kind, name), o in objects.items() if kind == "PersistentVolumeClaim"}
    assert config["SHARED_DIR"] == "/shared"
    daemons = [w for w in workloads(objects) if program(w)[0] != "app.api"]
    assert sorted({program(w)[0] for w in daemons}) == sorted(DAEMONS)
    for w in daemons:
        name, c = w["metadata"]["name"], only_container(w)
        volumes = {v["name"]: v for v in pod(w)["volumes"]}
        [mount] = [m for m in c["volumeMounts"] if m["mountPath"] == "/shared"]
        claim = claims[volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"], name
        assert not mount.get("readOnly"), name
        [worker_id] = [e for e in c["env"] if e["name"] == "WORKER_ID"]
        assert worker_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name", name
        assert container_env(c, config, secret)["PIPELINE_URL"] == config["PIPELINE_URL"], name
        assert importlib.util.find_spec(program(w)[0]) is not None, name
        # Enough time to hand the task back and empty the folder (supervisord gave 30 s).
        assert pod(w)["terminationGracePeriodSeconds"] >= 30, name


def test_every_variable_the_manifests_set_is_one_the_app_reads(objects, config, secret):
    assert not {k for k in config if "URL" in k and k.startswith("MYSQL") or "TOKEN" in k}, \
        "database URLs and the token belong in the Secret"
    for w in workloads(objects):
        c = only_container(w)
        env = container_env(c, config, secret)
        module, shard = program(w)
        read = settings_read(env) | names_the_app_reads_outside_config()
        unknown = sorted(set(env) - read)
        assert not unknown, f"{w['metadata']['name']} sets variables the app never reads: {unknown}"
        settings = Settings.from_env(env)  # and every value is valid
        if shard is not None:
            assert shard_arg(env, shard, settings.shard_count) == shard


def test_the_three_databases_are_services_with_an_address(objects, config, secret):
    shard_count = int(config["SHARD_COUNT"])
    # Set explicitly: a missing one would silently mean 127.0.0.1.
    assert {"MYSQL_PIPELINE_URL", *(f"MYSQL_SHARD_{n}_URL" for n in range(shard_count))} <= set(secret)
    settings = Settings.from_env({**config, **secret})
    urls = [settings.pipeline_db, *settings.shard_dbs]
    assert len({u.host for u in urls}) == 1 + shard_count == 3
    slices = [o for (kind, _), o in objects.items() if kind == "EndpointSlice"]
    for url in urls:
        service = objects[("Service", url.host)]
        if service["spec"].get("type") == "ExternalName":
            assert service["spec"]["externalName"]
            continue
        assert "selector" not in service["spec"], f"{url.host} is outside the cluster: no selector"
        assert url.port in [p["port"] for p in service["spec"]["ports"]]
        [endpoints] = [s for s in slices if s["metadata"]["labels"]["kubernetes.io/service-name"] == url.host]
        assert endpoints["endpoints"] and all(e["addresses"] for e in endpoints["endpoints"])
        assert url.port in [p["port"] for p in endpoints["ports"]]


def test_every_pod_is_bounded_and_runs_as_nobody_in_particular(objects):
    for w in workloads(objects):
        name, spec, c = w["metadata"]["name"], pod(w), only_container(w)
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] != 0, name
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), (name, kind)
        assert c["image"] in [i["name"] for i in kustomization()["images"]], name
        assert not program(w)[0].startswith("app.supervis"), f"{name}: one program per container, not supervisord"


def test_one_namespace(objects):
    namespace = kustomization()["namespace"]
    assert ("Namespace", namespace) in objects
    assert all(doc["metadata"].get("namespace", namespace) == namespace for _, doc in DOCS)


def test_the_documented_recipe_adds_a_valid_shard(tmp_path):
    assert ADD_SHARD in (ROOT / "docs" / "operations.md").read_text()
    out = tmp_path / "shard-2.yaml"
    subprocess.run(ADD_SHARD.replace("> deploy/k8s/shard-2.yaml", f"> {out}"), shell=True, cwd=ROOT, check=True)
    text = out.read_text()
    assert not re.search(r'-1$|"1"', text, re.M)
    added = by_key(documents({"shard-2.yaml": text}))
    assert set(added) == {("StatefulSet", "shard-worker-2"), ("Deployment", "mysql-sender-2")}
    for w in added.values():
        validate(w, VERSIONS[-1])
        assert program(w)[1] == 2
        labels = [w["metadata"]["labels"], w["spec"]["selector"]["matchLabels"], w["spec"]["template"]["metadata"]["labels"]]
        assert all(lab["event-pipeline/shard"] == "2" for lab in labels)
