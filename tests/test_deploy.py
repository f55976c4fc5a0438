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
                out[c["name"]] = {**c, "volumes": spec["template"]["spec"].get("volumes", [])}
    return out


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
        path = container["args"][container["args"].index("--config") + 1]
        mount = next(m for m in container["volumeMounts"] if path.startswith(m["mountPath"] + "/"))
        volume = next(v for v in container["volumes"] if v["name"] == mount["name"])
        return volume["configMap"]["name"], path[len(mount["mountPath"]) + 1:]

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
