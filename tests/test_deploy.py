"""The shipped deployment files: every container command is one `hrnn` accepts, and the audit and
quality jobs check the group the workers run, with their settings."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from stream import cli

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


def _containers() -> dict[str, dict]:
    """Every container of deploy/k8s, by name."""
    out = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            spec = doc.get("spec", {})
            spec = spec.get("jobTemplate", {}).get("spec", spec)  # a CronJob's pods are one level deeper
            for c in spec.get("template", {}).get("spec", {}).get("containers", []):
                pod = spec["template"]["spec"]
                out[c["name"]] = {**c, "volumes": pod.get("volumes", []),
                                  "pod_security": pod.get("securityContext", {})}
    return out


def _file_of(container: dict, flag: str) -> tuple[dict, str]:
    """The volume holding the file the container's `flag` names, and the file's path inside it."""
    path = container["args"][container["args"].index(flag) + 1]
    mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in container["volumes"] if v["name"] == mount["name"])
    return volume, path[len(mount["mountPath"]) + 1:]


def _commands() -> list[tuple[str, list[str]]]:
    text = (DEPLOY / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)["services"]
    shown = [shlex.split(line.split(" tools ", 1)[1]) for line in text.splitlines()
             if line.startswith("#") and " tools " in line]  # the header's `run --rm tools ...` examples
    return ([(f"k8s {n}", c["args"]) for n, c in _containers().items()]
            + [(f"compose {n}", s["command"]) for n, s in compose.items() if "command" in s]
            + [(f"compose header {argv[0]} {i}", argv) for i, argv in enumerate(shown)])


@pytest.mark.parametrize("where, argv", _commands(), ids=[w for w, _ in _commands()])
def test_every_shipped_command_is_one_hrnn_accepts(where, argv):
    argv = [a.replace("$(KAFKA_BOOTSTRAP)", "kafka:9092") for a in argv]
    args = cli.build_parser(argv).parse_args(argv)  # argparse exits (and fails the test) on a bad flag
    assert args.command == argv[0]


@pytest.mark.parametrize("job", ["audit", "quality"])
def test_the_checking_jobs_read_the_settings_file_the_workers_read(job):
    containers = _containers()
    worker, audit = containers["worker"], containers[job]

    def config_map_of(container: dict) -> tuple[str, str]:
        volume, file = _file_of(container, "--config")
        return volume["configMap"]["name"], file

    assert audit["args"][0] == job and config_map_of(audit) == config_map_of(worker) == ("hrnn-config",
                                                                                              "worker.toml")


@pytest.mark.parametrize("job", ["audit", "quality"])
def test_a_checking_job_that_fails_is_not_retried_into_a_pass(job):
    # a failed audit is a finding; a quality run fails on the run that ends a canary, and a retry would find no
    # canary serving and succeed, and the failed-job alert would never fire
    [doc] = yaml.safe_load_all((DEPLOY / "k8s" / f"{job}.yaml").read_text())
    assert doc["kind"] == "CronJob" and doc["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0


def test_the_quality_job_decides_canaries_on_the_workers_registry_at_their_path():
    containers = _containers()

    def registry_of(container: dict) -> tuple[str, str, bool]:
        """(--registry, the volume claim mounted there, whether the mount is writable)"""
        path = container["args"][container["args"].index("--registry") + 1]
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == path)
        volume = next(v for v in container["volumes"] if v["name"] == mount["name"])
        return path, volume["persistentVolumeClaim"]["claimName"], not mount.get("readOnly", False)

    quality = containers["quality"]
    assert "--decide-canary" in quality["args"]
    path, claim, _ = registry_of(containers["worker"])
    # the announcements are keyed by the registry's path, and a decision writes CURRENT
    assert registry_of(quality) == (path, claim, True) == registry_of(containers["retrainer"])


def test_every_volume_is_writable_by_the_user_the_image_runs_as():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    uid = int(dockerfile.split("useradd --uid ", 1)[1].split()[0])
    assert "USER hrnn" in dockerfile and f"--gid {uid}" in dockerfile
    for name, c in _containers().items():  # a claim's files get the pod's fsGroup
        assert c["pod_security"] == {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid}, name
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    named = set(compose.get("volumes", {}))
    mounts = {m.split(":")[1] for s in compose["services"].values() for m in s.get("volumes", [])
              if m.split(":")[0] in named}
    made = dockerfile.split("mkdir -p ", 1)[1].split("&&")[0].split()
    assert mounts and mounts <= {p.rstrip("\\") for p in made if p.startswith("/")}  # so a new volume takes hrnn's
    assert "chown -R hrnn /var/lib/hrnn" in dockerfile


def test_the_compose_services_that_run_for_good_come_back_after_exiting():
    """A worker started on a registry with no version yet exits 2: it must be up once the first is published."""
    services = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]
    for name in ("worker", "retrainer"):
        assert services[name].get("restart") in ("on-failure", "unless-stopped", "always"), name


def test_every_pod_reads_the_kafka_client_settings_of_one_secret_which_the_retrainer_can_apply():
    """Workers, retrainer, audit and quality connect alike, the retrainer's Faust consumer included; the Secret's
    example is no manifest, so applying the folder cannot overwrite the real Secret with its placeholders."""
    from stream.faust_credentials import faust_credentials
    from stream.kafka_clients import load_client_settings

    def secret_of(container: dict) -> tuple[str, str]:
        volume, file = _file_of(container, "--kafka-config-file")
        return volume["secret"]["secretName"], file

    containers = _containers()
    assert set(containers) == {"worker", "retrainer", "audit", "quality"}
    assert {secret_of(c) for c in containers.values()} == {("hrnn-kafka-client", "client.properties")}
    example = DEPLOY / "k8s" / "client.properties.example"
    assert "secret generic hrnn-kafka-client --from-file=client.properties=" in example.read_text()
    settings = load_client_settings(example)
    assert settings["security.protocol"] == "SASL_SSL"
    assert faust_credentials(settings).mechanism.value == settings["sasl.mechanism"]
    config = next(yaml.safe_load_all((DEPLOY / "k8s" / "config.yaml").read_text()))["data"]["worker.toml"]
    assert "[serve.kafka]" not in config  # one place: a table there would add to (and hide behind) the Secret's


def _dockerignored(path: str) -> bool:
    """Whether the root's .dockerignore keeps `path` out of the build context: the last pattern matching the path
    or one of its parent folders decides (`!` re-includes); `*` stays within a folder, `**/` spans any number."""
    ignored = False
    parents = [path] + [str(p) for p in Path(path).parents if str(p) != "."]
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        keep, pattern = pattern.startswith("!"), pattern.lstrip("!").strip("/")
        regex = "".join({"**/": "(.*/)?", "**": ".*", "*": "[^/]*", "?": "[^/]"}.get(t, re.escape(t))
                        for t in re.findall(r"\*\*/|\*\*|\*|\?|[^*?]+", pattern))
        if any(re.fullmatch(regex, p) for p in parents):
            ignored = not keep
    return ignored


def test_the_build_context_holds_every_file_the_dockerfile_copies_and_not_the_checkouts_bulk():
    """docker-compose builds with the repository root as context: without a .dockerignore the .venv (over a GB
    once `make setup` ran), .git and out/ go to the daemon on every build."""
    copied = [src for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")
              for src in shlex.split(line)[1:-1] if not src.startswith("--")]
    assert {"pyproject.toml", "README.md", "model", "stream"} <= set(copied)
    files = [f for src in copied for f in ([ROOT / src] if (ROOT / src).is_file() else (ROOT / src).rglob("*.py"))
             if "__pycache__" not in f.parts]
    assert not [str(f.relative_to(ROOT)) for f in files if _dockerignored(str(f.relative_to(ROOT)))]
    for bulk in (".venv/bin/python", ".git/HEAD", "out/demo/report.json", "tests/conftest.py", "bench/run.py",
                 "hrnn_stream.egg-info/PKG-INFO", ".pytest_cache/README.md", "stream/__pycache__/cli.pyc"):
        assert _dockerignored(bulk), bulk


def test_every_phony_make_target_has_a_rule():
    """A phony target without a rule runs nothing and exits 0: `make bench` would read as a benchmark that passed."""
    text = (ROOT / "Makefile").read_text()
    phony = next(line for line in text.splitlines() if line.startswith(".PHONY:")).split(":", 1)[1].split()
    rules = set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", text, flags=re.M))
    assert phony and set(phony) <= rules, sorted(set(phony) - rules)


@pytest.mark.parametrize("name", ["worker", "retrainer"])
def test_the_long_running_pods_serve_health_and_are_restarted_when_it_fails(name):
    """The retrainer's /health answers 503 once its archive agent crashed, which only a restart mends: without
    --metrics-port and a liveness probe on that port, nothing would ever ask."""
    c = _containers()[name]
    port = int(c["args"][c["args"].index("--metrics-port") + 1])
    assert {"containerPort": port, "name": "metrics"} in c["ports"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] in ({"path": "/health", "port": "metrics"}, {"path": "/health", "port": port})
