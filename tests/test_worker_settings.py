"""The worker's settings object and the `hrnn serve` flags that fill it."""
from __future__ import annotations

import json
import textwrap
import threading
from pathlib import Path

import pytest

from model.errors import ConfigError
from stream import cli
from stream.cli_serve import overrides_from
from stream.kafka_clients import load_client_settings
from stream.settings import WorkerSettings, load_settings
from stream.topics import AVAILABILITY_TOPIC


@pytest.fixture(autouse=True)
def no_hrnn_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("HRNN_")]:
        monkeypatch.delenv(key)


def test_defaults_follow_the_design():
    s = load_settings(None, {"registry": "r", "state_dir": "s"})
    assert (s.k, s.exclude_purchased, s.purchase_types, s.exclude_session_items) == (25, True, ("purchase",), False)
    assert s.processing_guarantee == "at_least_once"
    assert (s.input_topic, s.output_topic, s.group) == ("hrnn.events", "hrnn.recommendations", "hrnn-worker")
    assert (s.dlq_topic, s.changelog_topic) == ("hrnn.events.dlq", "hrnn-worker.state-changelog")
    assert (s.follow_availability, s.availability_topic) == (True, AVAILABILITY_TOPIC)


def shipped_worker_toml(tmp_path: Path) -> Path:
    """deploy/k8s/config.yaml's worker.toml, as the pods read it."""
    text = (Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "config.yaml").read_text()
    cfg = tmp_path / "worker.toml"
    cfg.write_text(textwrap.dedent(text.split("worker.toml: |\n", 1)[1].split("\n---", 1)[0]))
    return cfg


def test_the_shipped_kubernetes_worker_config_loads(tmp_path):
    # unknown keys or bad values in the shipped files would fail here; the Kafka settings come from the Secret
    props = Path(__file__).resolve().parents[1] / "deploy" / "k8s" / "client.properties.example"
    s = load_settings(shipped_worker_toml(tmp_path), {"registry": "/registry", "state_dir": "/state",
                                                      "bootstrap_servers": "kafka:9092",
                                                      "kafka": load_client_settings(props)})
    s.validate()
    assert (s.processing_guarantee, s.batch_size, s.torch_threads) == ("exactly_once", 500, 2)
    assert s.kafka["security.protocol"] == "SASL_SSL" and s.kafka["sasl.username"] == "hrnn"


def test_the_audit_reads_the_workers_settings_without_their_registry_or_state(tmp_path):
    cfg = shipped_worker_toml(tmp_path)
    s = load_settings(cfg, {"bootstrap_servers": "kafka:9092"}, serving=False)
    assert (s.group, s.processing_guarantee) == ("hrnn-worker", "exactly_once")
    with pytest.raises(ConfigError, match="--registry"):
        load_settings(cfg, {"bootstrap_servers": "kafka:9092"})  # serving needs them
    with pytest.raises(ConfigError, match="must differ"):
        load_settings(cfg, {"output_topic": "hrnn.events"}, serving=False)


def test_flags_beat_environment_which_beats_the_file(tmp_path, monkeypatch):
    cfg = tmp_path / "worker.toml"
    cfg.write_text('[serve]\nk = 10\nbatch_size = 100\ngroup = "from-file"\nregistry = "reg"\nstate_dir = "st"\n'
                   '[serve.kafka]\n"security.protocol" = "SASL_SSL"\n"sasl.mechanism" = "PLAIN"\n'
                   '[train]\nepochs = 3\n')
    monkeypatch.setenv("HRNN_K", "40")
    monkeypatch.setenv("HRNN_GROUP", "from-env")
    s = load_settings(cfg, {"k": 50, "group": None, "kafka": {"sasl.mechanism": "SCRAM-SHA-512"}})
    assert (s.k, s.group, s.batch_size) == (50, "from-env", 100)
    assert s.kafka == {"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}


def test_kafka_settings_written_as_bare_dotted_toml_keys_keep_librdkafkas_dotted_names(tmp_path):
    cfg = tmp_path / "worker.toml"
    cfg.write_text('[serve]\ngroup = "g"\n[serve.kafka]\nsecurity.protocol = "SASL_SSL"\nsasl.mechanism = "PLAIN"\n'
                   '"sasl.username" = "shop"\n[serve.kafka_consumer]\nsession.timeout.ms = 6000\n')
    s = load_settings(cfg, {}, serving=False)
    assert s.kafka == {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "sasl.username": "shop"}
    assert s.consumer_kafka == {**s.kafka, "session.timeout.ms": "6000"}


def test_a_kafka_setting_given_both_as_a_dotted_and_as_a_quoted_key_is_refused(tmp_path):
    cfg = tmp_path / "worker.toml"
    cfg.write_text('[serve.kafka]\n"security.protocol" = "SSL"\nsecurity.protocol = "SASL_SSL"\n')
    with pytest.raises(ConfigError, match="'security.protocol' is given twice"):
        load_settings(cfg, {}, serving=False)


def test_kafka_settings_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("HRNN_KAFKA", "security.protocol=SSL,ssl.ca.location=/etc/ca.pem")
    monkeypatch.setenv("HRNN_KAFKA_CONSUMER", '{"session.timeout.ms": 6000}')
    s = load_settings(None, {"registry": "r", "state_dir": "s"})
    assert s.kafka == {"security.protocol": "SSL", "ssl.ca.location": "/etc/ca.pem"}
    assert s.consumer_kafka == {**s.kafka, "session.timeout.ms": "6000"}
    assert s.producer_kafka == s.kafka


def secured_worker_toml(tmp_path: Path) -> Path:
    cfg = tmp_path / "worker.toml"
    cfg.write_text('[serve]\n[serve.kafka]\nsecurity.protocol = "SASL_SSL"\nsasl.mechanism = "PLAIN"\n'
                   '[serve.kafka_consumer]\n"session.timeout.ms" = "45000"\n')
    return cfg


def test_kafka_settings_from_the_environment_add_to_the_files_tables_key_by_key(tmp_path, monkeypatch):
    # Replacing the file's table dropped its security.protocol and sasl.*: the worker connected without TLS.
    monkeypatch.setenv("HRNN_KAFKA", "client.id=worker-7")
    monkeypatch.setenv("HRNN_KAFKA_CONSUMER", "fetch.wait.max.ms=10")
    s = load_settings(secured_worker_toml(tmp_path), {}, serving=False)
    assert s.kafka == {"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN", "client.id": "worker-7"}
    assert s.consumer_kafka == {**s.kafka, "session.timeout.ms": "45000", "fetch.wait.max.ms": "10"}
    monkeypatch.setenv("HRNN_KAFKA", "sasl.mechanism=SCRAM-SHA-512")
    assert load_settings(secured_worker_toml(tmp_path), {}, serving=False).kafka == {
        "security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}


def test_a_kafka_config_flag_wins_over_the_same_key_in_a_consumer_or_producer_table_of_the_file_or_environment(
        tmp_path, monkeypatch):
    monkeypatch.setenv("HRNN_KAFKA_PRODUCER", "linger.ms=50")
    argv = ["serve", "--registry", "reg", "--state-dir", "st", "--config", str(secured_worker_toml(tmp_path)),
            "--kafka-config", "session.timeout.ms=10000", "--kafka-config", "linger.ms=5"]
    args = cli.build_parser(argv).parse_args(argv)
    s = load_settings(args.config, overrides_from(args))
    assert (s.consumer_kafka["session.timeout.ms"], s.producer_kafka["linger.ms"]) == ("10000", "5")
    assert s.consumer_kafka["security.protocol"] == s.producer_kafka["security.protocol"] == "SASL_SSL"


@pytest.mark.parametrize("argv", [["serve", "--registry", "/nonexistent/r", "--state-dir", "s"],
                                  ["train", "--data", "/nonexistent/ev.csv", "--registry", "r"],
                                  ["evaluate", "--data", "/nonexistent/ev.csv"], ["synth", "--out", "x.txt"]])
def test_a_misspelt_hrnn_variable_is_warned_about_by_every_command_with_the_setting_probably_meant(
        argv, monkeypatch, caplog, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HRNN_PROCESSING_GUARANTE", "exactly_once")
    monkeypatch.setenv("HRNN_NOTHING_LIKE_IT", "1")
    # read by another command (training), by the worker outside its settings, or by the tests: no typo
    for name in ("HRNN_EPOCHS", "HRNN_MIN_ITEM_SUPPORT", "HRNN_FAULT_INJECT", "HRNN_TEST_APACHE_KAFKA"):
        monkeypatch.setenv(name, "1")
    with caplog.at_level("WARNING", logger="stream.settings"):
        assert cli.main(argv) == 2  # warned, not refused (the variable may be another program's): exit 2 for argv
    assert [r.getMessage() for r in caplog.records if r.name == "stream.settings"] == [
        "ignoring environment variable HRNN_NOTHING_LIKE_IT: no hrnn setting has that name",
        "ignoring environment variable HRNN_PROCESSING_GUARANTE: no hrnn setting has that name "
        "(did you mean HRNN_PROCESSING_GUARANTEE?)"]


@pytest.mark.parametrize("overrides, complaint", [
    ({"k": 501}, "k = 501"),
    ({"k": 0}, "k = 0"),
    ({"processing_guarantee": "twice"}, "processing_guarantee"),
    ({"registry": ""}, "--registry"),
    ({"batch_size": 0}, "batch_size"),
    ({"kafka": {"group.id": "x"}}, "group.id"),
    ({"output_topic": "hrnn.events"}, "must differ"),
    ({"availability_topic": "hrnn.events"}, "availability_topic 'hrnn.events' must differ"),
    ({"output_topic": "hrnn.events.dlq"}, r"output_topic 'hrnn.events.dlq' must differ from the dead-letter topic"),
    ({"output_topic": "hrnn-worker.state-changelog"},
     "output_topic 'hrnn-worker.state-changelog' must differ from the changelog topic"),
    ({"input_topic": "g.state-changelog", "group": "g"},
     "input_topic 'g.state-changelog' must differ from the changelog topic"),
    ({"updates_topic": "hrnn.events"}, "updates_topic 'hrnn.events' must differ from input_topic"),
    # names Tansu accepts but Apache Kafka refuses, and that would put a state store outside <state_dir>/<group>
    ({"input_topic": "../shop"}, r"input_topic '../shop' is not a Kafka topic name"),
    ({"input_topic": ".."}, r"input_topic '..' is not a Kafka topic name"),
    ({"output_topic": "r" * 250}, r"output_topic 'r{250}' is not a Kafka topic name"),
    ({"availability_topic": "items on sale"}, r"availability_topic 'items on sale' is not a Kafka topic name"),
    ({"group": "shop/eu"}, r"the changelog topic .* 'shop/eu.state-changelog' is not a Kafka topic name"),
    ({"group": ".."}, r"group '..' cannot name the worker group"),
    ({"group": "."}, r"group '.' cannot name the worker group"),
    ({"group": ""}, r"group '' cannot name the worker group"),
    ({"restore_timeout_s": float("nan")}, "restore_timeout_s = nan must be a number of seconds > 0"),
    ({"restore_timeout_s": 0}, "restore_timeout_s = 0"),
    ({"restore_timeout_s": -5}, "restore_timeout_s = -5"),
    ({"prebuild_max_users": -1}, "prebuild_max_users"),
    ({"gc_threshold": -5}, "gc_threshold"),
    ({"state_format": 3}, "state_format = 3 is not one of 1, 2"),
    ({"device": "tpu"}, "'tpu' is not one of auto, cpu, cuda"),
    ({"device": "cuda:7"}, "'cuda:7': torch sees"),  # no machine here has eight GPUs
])
def test_out_of_range_settings_are_refused_with_what_to_fix(overrides, complaint):
    with pytest.raises(ConfigError, match=complaint):
        load_settings(None, {"registry": "r", "state_dir": "s", **overrides})


def test_a_wait_for_a_table_topic_given_nan_seconds_returns_instead_of_spinning_forever():
    # The worker refuses a NaN restore_timeout_s; other callers (hrnn items --timeout-s) reach the reader as given.
    from stream.compacted import CompactedTopicReader

    never_started = CompactedTopicReader("127.0.0.1:1", "t", create_topic=False)
    done: list[bool] = []
    waiter = threading.Thread(target=lambda: done.append(never_started.wait_caught_up(float("nan"))), daemon=True)
    waiter.start()
    waiter.join(5)
    assert done == [False]


def test_an_unknown_key_in_the_settings_file_is_refused(tmp_path):
    cfg = tmp_path / "w.json"
    cfg.write_text(json.dumps({"registry": "r", "state_dir": "s", "batchsize": 3}))
    with pytest.raises(ConfigError, match="batchsize"):
        load_settings(cfg)


def test_a_setting_beside_a_serve_table_is_refused_naming_it_and_other_commands_tables_are_kept(tmp_path):
    cfg = tmp_path / "w.toml"
    # In TOML a key above the first table is top level: the worker, reading only [serve], would drop it silently.
    cfg.write_text('batch_size = 7\nprocesing_guarantee = "exactly_once"\n[kafka]\n"security.protocol" = "SSL"\n'
                   '[serve]\ngroup = "g1"\n[train]\nepochs = 3\n')
    with pytest.raises(ConfigError, match="'batch_size', 'procesing_guarantee', 'kafka' beside its 'serve' table"):
        load_settings(cfg, serving=False)
    cfg.write_text('[serve]\ngroup = "g1"\n[serve.kafka]\n"security.protocol" = "SSL"\n[train]\nepochs = 3\n')
    s = load_settings(cfg, serving=False)
    assert (s.group, s.kafka) == ("g1", {"security.protocol": "SSL"})


@pytest.mark.parametrize("command", [["serve", "--registry", "r", "--state-dir", "s"],
                                     ["audit", "--bootstrap-servers", "127.0.0.1:9"],
                                     ["quality", "--bootstrap-servers", "127.0.0.1:9"]])
def test_every_command_reading_worker_settings_exits_2_on_a_setting_beside_the_serve_table(command, tmp_path, capsys):
    cfg = tmp_path / "w.json"
    cfg.write_text(json.dumps({"processing_guarantee": "exactly_once", "serve": {"group": "g1"}}))
    assert cli.main([*command, "--config", str(cfg)]) == 2
    assert "'processing_guarantee' beside its 'serve' table would be ignored" in capsys.readouterr().err


def test_exactly_once_transactional_id_is_stable_per_state_dir_and_unique_across_them(tmp_path):
    a = WorkerSettings(registry="r", state_dir=str(tmp_path / "a"))
    assert a.effective_transactional_id() == WorkerSettings(registry="r", state_dir=str(tmp_path / "a")) \
        .effective_transactional_id()
    assert a.effective_transactional_id() != WorkerSettings(registry="r", state_dir=str(tmp_path / "b")) \
        .effective_transactional_id()
    assert WorkerSettings(registry="r", state_dir="s", transactional_id="pod-7").effective_transactional_id() == "pod-7"


def test_serve_flags_become_settings(tmp_path):
    props = tmp_path / "client.properties"
    props.write_text("# managed kafka\nsecurity.protocol=SASL_SSL\nsasl.username=me\n")
    argv = ["serve", "--bootstrap-servers", "h:9093", "--registry", "reg", "--state-dir", "st", "--k", "7",
            "--no-exclude-purchased", "--exclude-session-items", "--metrics-port", "9400",
            "--kafka-config-file", str(props), "--kafka-config", "sasl.username=you",
            "--processing-guarantee", "exactly_once", "--batch-timeout", "0.1", "--no-follow-availability",
            "--availability-topic", "shop.stock"]
    args = cli.build_parser(argv).parse_args(argv)
    s = load_settings(args.config, overrides_from(args))
    assert (s.bootstrap_servers, s.registry, s.state_dir, s.k, s.metrics_port) == ("h:9093", "reg", "st", 7, 9400)
    assert (s.exclude_purchased, s.exclude_session_items, s.exactly_once, s.batch_timeout_s) == (False, True, True, 0.1)
    assert s.kafka == {"security.protocol": "SASL_SSL", "sasl.username": "you"}
    assert (s.follow_availability, s.availability_topic) == (False, "shop.stock")


def test_serve_without_a_registry_exits_2_with_the_fix(capsys):
    assert cli.main(["serve", "--state-dir", "st"]) == 2
    assert "--registry" in capsys.readouterr().err


def test_a_state_dir_that_is_a_file_or_under_one_is_refused_before_the_worker_starts(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.touch()
    for state_dir in (a_file, a_file / "state"):
        with pytest.raises(ConfigError, match="--state-dir .* must be a directory"):
            load_settings(None, {"registry": "r", "state_dir": str(state_dir)})
    assert not (tmp_path / "fresh").exists()
    load_settings(None, {"registry": "r", "state_dir": str(tmp_path / "fresh")})  # made when first written
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("command, complaint", [
    (["serve", "--registry", "r", "--state-dir", "s"], "log_level = 'verbose' is not a log level"),
    (["retrainer", "--once", "--registry", "r", "--archive", "a"], "--log-level verbose is not a log level")])
def test_an_unknown_log_level_exits_2_naming_it(command, complaint, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert cli.main([*command, "--log-level", "verbose"]) == 2
    assert complaint in capsys.readouterr().err


@pytest.mark.parametrize("where", ["file", "environment"])
def test_an_unknown_log_level_of_the_settings_file_or_environment_is_named_as_the_setting_not_the_flag(
        where, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    Path("l.toml").write_text('log_level = "verbose"\n')
    if where == "environment":
        monkeypatch.setenv("HRNN_LOG_LEVEL", "verbose")
    config = ["--config", "l.toml"] if where == "file" else []
    assert cli.main(["serve", "--registry", "r", "--state-dir", "s", *config]) == 2
    err = capsys.readouterr().err
    assert "log_level = 'verbose' is not a log level" in err and "--log-level verbose" not in err
    assert "HRNN_LOG_LEVEL" in err and "settings file" in err  # where else it may have come from


@pytest.mark.parametrize("suffix, text, complaint", [
    (".json", '{"group": null}', r"setting group: null is not a string \(leave the key out for its default\)"),
    # "None" would have been every exactly-once worker's transactional id, and the announcements' key followed
    (".json", '{"transactional_id": null}', "setting transactional_id: null is not a string"),
    (".json", '{"registry_id": null}', "setting registry_id: null is not a string"),
    (".json", '{"input_topic": null}', "setting input_topic: null is not a string"),
    (".toml", "group = true", "setting group: true is a boolean, not a string"),
    (".toml", 'registry_id = ["a", "b"]', r'setting registry_id: \["a", "b"\] is an array, not a string'),
    (".toml", "input_topic = 123", "setting input_topic: 123 is a number, not a string"),
    (".json", '{"purchase_types": ["purchase", 1]}', r"setting purchase_types\[1\]: 1 is a number, not a string"),
    # a Kafka table's value is text to librdkafka: strings, numbers and booleans only
    (".json", '{"kafka": {"client.id": null}}', "setting kafka: 'client.id' = null is not a string, number or boolean"),
    (".toml", '[kafka]\n"client.id" = ["a", "b"]',
     r"setting kafka: 'client.id' = \[\"a\", \"b\"\] is an array, not a string, number or boolean"),
    (".toml", '[kafka_producer]\nlinger.ms = [5]', r"setting kafka_producer: 'linger.ms' = \[5\] is an array"),
])
def test_a_text_setting_or_kafka_value_of_the_settings_file_given_null_or_another_kind_is_refused_naming_it(
        suffix, text, complaint, tmp_path):
    cfg = tmp_path / f"w{suffix}"
    cfg.write_text(text + "\n")
    with pytest.raises(ConfigError, match=complaint):
        load_settings(cfg, {"registry": "r", "state_dir": "s"})


def test_text_settings_from_the_environment_are_text_whatever_they_look_like(monkeypatch):
    monkeypatch.setenv("HRNN_GROUP", "123")
    monkeypatch.setenv("HRNN_REGISTRY_ID", "true")
    s = load_settings(None, {"registry": "r", "state_dir": "s"})
    assert (s.group, s.registry_id) == ("123", "true")


def test_a_kafka_variable_in_json_is_held_to_the_files_kinds_too(monkeypatch):
    monkeypatch.setenv("HRNN_KAFKA_CONSUMER", '{"client.id": null}')
    with pytest.raises(ConfigError, match="setting kafka_consumer: 'client.id' = null is not"):
        load_settings(None, serving=False)


def test_kafka_table_numbers_and_booleans_reach_librdkafka_as_its_text(tmp_path):
    cfg = tmp_path / "w.toml"
    cfg.write_text('[kafka_producer]\nlinger.ms = 5\nenable.idempotence = true\n"enable.gapless.guarantee" = false\n')
    assert load_settings(cfg, serving=False).kafka_producer == {
        "linger.ms": "5", "enable.idempotence": "true", "enable.gapless.guarantee": "false"}


@pytest.mark.parametrize("variable, value, complaint", [
    ("HRNN_KAFKA_PRODUCER", "linger.ms", "setting kafka_producer: 'linger.ms' must look like key=value,key=value"),
    ("HRNN_KAFKA_CONSUMER", "{bad", "setting kafka_consumer: not valid JSON"),
    ("HRNN_KAFKA_CONSUMER", '{"session": {"timeout.ms": 1}, "session.timeout.ms": 2}',
     "setting kafka_consumer: 'session.timeout.ms' is given twice"),
    ("HRNN_KAFKA", "client.id", "setting kafka: 'client.id' must look like"),
])
def test_a_malformed_kafka_table_is_refused_naming_its_own_setting(variable, value, complaint, monkeypatch):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=complaint):
        load_settings(None, serving=False)
