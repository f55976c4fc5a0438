"""The shipped deployment files: every container command is one `hrnn` accepts, and the audit and
quality jobs check the group the workers run, with their settings."""
from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from stream import cli

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


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
