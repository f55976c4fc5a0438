"""`hrnn synth | train | evaluate | models` as a user runs them: real processes, real files."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import cli_evaluate
from model.artifact import latest_version_dir, save_version
from model.config import DataConfig, HRNNConfig
from model.errors import ConfigError
from model.network import HRNN


def hrnn(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "stream.cli", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"hrnn {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    data = d / "events.csv"
    hrnn("synth", "--out", str(data), "--users", "400", "--items", "150", "--seed", "3")
    out = hrnn("train", "--data", str(data), "--registry", str(d / "reg"), "--epochs", "2", "--hidden-dimension", "32",
               "--quiet")
    return d, data, Path(out.stdout.strip().splitlines()[-1])


def test_train_prints_the_published_version_directory_last(trained):
    d, _, version = trained
    assert version.parent == d / "reg" and (version / "manifest.json").exists()
    assert (version / "training_curve.png").stat().st_size > 1000
    listed = hrnn("models", "list", str(d / "reg")).stdout
    assert version.name in listed and listed.lstrip().startswith("*")


def test_evaluate_writes_the_documented_json_and_a_plot(trained):
    d, data, version = trained
    out = d / "eval.json"
    proc = hrnn("evaluate", "--data", str(data), "--model", str(version), "--baselines", "pop,sknn",
                "--protocol", "last-session", "--json", str(out), "--quiet")
    result = json.loads(out.read_text())
    assert result["protocol"] == "last-session" and result["n_test_events"] > 0
    assert set(result["models"]) == {"pop", "sknn", f"hrnn:{version.name}"}
    assert 0 <= result["models"]["pop"]["recall@20"] <= 1 and "mrr@20" in result["models"]["sknn"]
    assert out.with_suffix(".png").exists()
    assert "recall@20" in proc.stdout


def test_evaluate_under_the_personalize_protocol(trained):
    d, data, version = trained
    out = d / "p.json"
    hrnn("evaluate", "--data", str(data), "--model", str(version), "--baselines", "pop", "--protocol", "personalize",
         "--json", str(out), "--quiet")
    assert json.loads(out.read_text())["protocol"] == "personalize"


def test_models_show_gives_manifest_config_and_metrics(trained):
    d, _, version = trained
    shown = json.loads(hrnn("models", "show", str(d / "reg"), version.name).stdout)
    assert shown["config"]["hrnn"]["hidden_dimension"] == 32 and "weights.pt" in shown["manifest"]["files"]


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/nonexistent.csv", "--registry", "/tmp/x"], "/nonexistent.csv"),
    (["train", "--data", "{data}", "--registry", "/tmp/x", "--hidden-dimension", "7"], "hidden_dimension = 7"),
    (["train", "--data", "{data}", "--registry", "/tmp/x", "--loss", "hinge"], "loss = 'hinge'"),
    (["train", "--data", "{data}", "--registry", "/tmp/x", "--weight-decay", "-1"], "weight_decay = -1.0"),
    (["train", "--data", "{data}", "--registry", "/tmp/x", "--event-type-weights", "click=nan"],
     "event_type_weights['click'] = nan"),
    (["train", "--data", "{data}", "--registry", "/tmp/x", "--config", "{d}/list.json"], "holds an array"),
    (["train", "--data", "{data}", "--registry", "/tmp/x", "--event-types", "foo"],
     "featurization left no events: step event_types"),
    (["evaluate", "--data", "{data}", "--baselines", "pop", "--json", "{d}/list.json/eval.json"],
     "--json {d}/list.json/eval.json: cannot create its folder"),
    (["evaluate", "--data", "{data}", "--baselines", "nope"], "unknown baseline 'nope'"),
    (["train", "--data", "{data}", "--registry", "{d}/list.json"], "--registry {d}/list.json: cannot create"),
    (["train", "--data", "{data}", "--registry", "/tmp/x", "--seed", "-1"], "seed = -1"),
    (["tune", "--data", "{data}", "--out", "{d}/list.json", "--trials", "1"], "--out {d}/list.json: cannot create"),
    (["tune", "--data", "{data}", "--out", "{d}/tune", "--timeout-s", "nan"], "timeout_s must be a number of seconds"),
    (["tune", "--data", "{data}", "--out", "{d}/tune", "--tune-seed", "-1"], "the sampler's seed must lie in"),
    (["synth", "--out", "{d}/s.csv", "--events-per-user", "nan"], "events_per_user must lie in [2, 1e6]"),
    (["models", "show", "{reg}", "v0"], "no version 'v0'"),
    (["train", "--data", "{data}", "--registry", "/tmp/x", "--config", "{d}/typo.json"],
     "config file {d}/typo.json: unknown setting 'hidden_dimensions' (did you mean 'hidden_dimension'?)"),
    (["train", "--data", "{data}", "--registry", "/tmp/x", "--config", "{d}/latin1.json"],
     "config file {d}/latin1.json is not UTF-8 text: byte 0xe9 at offset 16"),
    (["train", "--data", "{data}", "--registry", "/tmp/x", "--config", "{d}/kind.json"],
     "setting session_timeout_s: true is a boolean, not a number"),
    (["evaluate", "--data", "{data}", "--baselines", "pop", "--plot", "{d}/out.txt", "--json", "{d}/r.json"],
     "--plot {d}/out.txt: matplotlib cannot write '.txt' files (it writes "),
    (["evaluate", "--data", "{data}", "--baselines", ""], "nothing to evaluate"),
    (["synth", "--out", "{d}/s.csv", "--users", "5", "--seed", "-1"], "--seed -1"),
])
def test_bad_input_is_a_clear_error_and_a_nonzero_exit(trained, args, message):
    d, data, _ = trained
    (d / "list.json").write_text("[1, 2]")
    (d / "typo.json").write_text('{"hidden_dimensions": 64, "epoch": 1}')
    (d / "latin1.json").write_bytes('{"variant": "café"}'.encode("latin-1"))
    (d / "kind.json").write_text('{"session_timeout_s": true}')
    args = [a.format(data=data, reg=d / "reg", d=d) for a in args]
    proc = hrnn(*args, check=False)
    assert proc.returncode != 0
    assert message.format(d=d) in proc.stderr and "Traceback" not in proc.stderr


def test_a_file_without_the_required_columns_names_what_was_found(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("user,thing\n1,2\n")
    proc = hrnn("train", "--data", str(bad), "--registry", str(tmp_path / "r"), check=False)
    assert proc.returncode == 2 and "bad.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_a_device_this_machine_cannot_use_is_one_error_line_and_exit_2(trained):
    d, data, _ = trained
    proc = hrnn("train", "--data", str(data), "--registry", str(d / "reg-x"), "--device", "cuda:7", check=False)
    assert proc.returncode == 2 and "'cuda:7': torch sees" in proc.stderr and "Traceback" not in proc.stderr
    assert not (d / "reg-x").exists() or not any((d / "reg-x").iterdir())  # nothing published


def test_the_benchmark_scripts_report_bad_input_as_one_error_line_and_exit_2(tmp_path):
    root = Path(__file__).resolve().parents[1]
    for script, args in (("quality_reddit.py", ["--data", str(tmp_path / "missing.tsv")]),
                         ("repeat_explore.py", [str(tmp_path / "no-version")]),
                         ("serving_scale.py", ["--devices", "tpu"]), ("train_throughput.py", ["--device", "tpu"]),
                         ("stream_throughput.py", ["--device", "tpu"]), ("worker_scaling.py", ["--device", "tpu"]),
                         ("worker_scaling.py", ["--workers", "0,2"])):
        proc = subprocess.run([sys.executable, str(root / "bench" / script), *args], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, script
        assert proc.stderr.startswith(f"{script}: error: ") and "Traceback" not in proc.stderr, proc.stderr


def evaluate_here(*args: str) -> int:
    """`hrnn evaluate` in this process (no subprocess start-up: these cases only need its run())."""
    p = argparse.ArgumentParser()
    cli_evaluate.add_arguments(p)
    return cli_evaluate.run(p.parse_args(list(args)))


def _write_log(path: Path, rows: list[tuple[str, str, int, str]]) -> Path:
    path.write_text("USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE\n" + "".join(f"{u},{i},{t},{e}\n" for u, i, t, e in rows))
    return path


def test_evaluate_reads_event_types_by_name_when_the_file_lists_other_types_than_the_model(tmp_path):
    rng = np.random.default_rng(0)
    rows, t = [], 1_700_000_000
    for u in range(30):
        for _ in range(12):
            t += int(rng.choice([60, 5 * 3600]))  # 5 h gaps open sessions: last-session has test sessions
            rows.append((f"u{u}", f"i{int(rng.integers(0, 25))}", t, str(rng.choice(["click", "purchase"]))))
    items = sorted({r[1] for r in rows})
    cfg = HRNNConfig(hidden_dimension=32, repeat_head=True, seed=3)
    torch.manual_seed(3)
    model = HRNN(len(items), cfg).eval()
    with torch.no_grad():  # trained-looking head: its type weights matter
        for prm in model.repeat.parameters():
            prm.add_(torch.randn_like(prm) * 0.5)
    save_version(tmp_path / "reg", model, cfg, DataConfig(max_user_history_length_percentile=1.0), items,
                 ["click", "purchase"])
    version = latest_version_dir(tmp_path / "reg")
    same = _write_log(tmp_path / "same.csv", rows)
    # One more user with one event of a type the model never saw: it sorts first, so every code shifts by one;
    # one event is never tested and its item is known, so the network's scores must not change.
    shifted = _write_log(tmp_path / "shifted.csv", rows + [("zz", items[0], t, "add_to_cart")])
    results = []
    for name, data in (("same", same), ("shifted", shifted)):
        out = tmp_path / f"{name}.json"
        evaluate_here("--data", str(data), "--model", str(version), "--baselines", "", "--json", str(out), "--quiet")
        results.append(json.loads(out.read_text())["models"][f"hrnn:{version.name}"])
    assert results[0] == results[1]


def _untrained_version(registry: Path, items: list[str], data_config: DataConfig) -> Path:
    """A version of an untrained network: evaluate only needs it to load and to score."""
    cfg = HRNNConfig(hidden_dimension=32, seed=3)
    torch.manual_seed(3)
    return save_version(registry, HRNN(len(items), cfg).eval(), cfg, data_config, items, ["click"])


def _sessions_log(path: Path) -> Path:
    rows, t = [], 1_700_000_000
    for u in range(20):
        for k in range(10):
            t += 5 * 3600 if k % 4 == 0 else 60  # 5 h gaps open sessions under the default timeout, not under a day's
            rows.append((f"u{u}", f"i{(u + k) % 15}", t, "click"))
    return _write_log(path, rows)


def test_evaluate_warns_of_each_model_featurized_otherwise_than_its_split_and_of_no_model_featurized_alike(
        tmp_path, capsys):
    data = _sessions_log(tmp_path / "log.csv")
    items = [f"i{k}" for k in range(15)]
    first = _untrained_version(tmp_path / "a", items, DataConfig())
    alike = _untrained_version(tmp_path / "b", items, DataConfig(max_user_history_length_percentile=1.0))
    other = _untrained_version(tmp_path / "c", items, DataConfig(session_timeout_s=86400.0))
    evaluate_here("--data", str(data), "--model", str(first), "--model", str(alike), "--model", str(other),
                  "--baselines", "", "--quiet")
    (warning,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warning.startswith(f"warning: {other} was featurized with session_timeout_s 86400.0, this split with "
                              "1800.0") and "its scores may include events it trained on" in warning


def test_evaluate_warns_when_a_flag_featurizes_the_split_otherwise_than_the_model(tmp_path, capsys):
    data = _sessions_log(tmp_path / "log.csv")
    version = _untrained_version(tmp_path / "a", [f"i{k}" for k in range(15)], DataConfig())
    evaluate_here("--data", str(data), "--model", str(version), "--baselines", "", "--quiet", "--min-item-support",
                  "2")
    err = capsys.readouterr().err
    assert f"warning: {version} was featurized with min_item_support 1, this split with 2" in err
    assert err.count("warning:") == 1


@pytest.mark.parametrize("flags", [["--json", "{d}/r.png"], ["--json", "{d}/r.png", "--plot", "{d}/./r.png"]])
def test_evaluate_refuses_a_chart_path_that_is_its_json_path_before_it_reads_the_data(tmp_path, monkeypatch, flags):
    monkeypatch.setattr(cli_evaluate, "load_data", lambda args: pytest.fail("read the data first"))
    with pytest.raises(ConfigError, match="the chart would overwrite it"):
        evaluate_here("--data", "events.csv", "--baselines", "pop", *[f.format(d=tmp_path) for f in flags])


@pytest.mark.parametrize("flags", [["--json", "{f}/eval.json"], ["--json", "{d}/eval.json", "--plot", "{f}/p.png"],
                                   ["--json", "{d}"]])
def test_evaluate_refuses_an_output_path_it_cannot_write_before_it_reads_the_data(tmp_path, monkeypatch, flags):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setattr(cli_evaluate, "load_data", lambda args: pytest.fail("read the data first"))
    flags = [f.format(f=tmp_path / "a-file", d=tmp_path) for f in flags]
    with pytest.raises(ConfigError, match="cannot create its folder|a folder, not a file"):
        evaluate_here("--data", "events.csv", "--baselines", "pop", *flags)


@pytest.mark.parametrize("plot", ["p.txt", "p"])
def test_evaluate_refuses_a_plot_format_matplotlib_cannot_write_before_it_writes_or_reads_anything(
        tmp_path, monkeypatch, plot):
    monkeypatch.setattr(cli_evaluate, "load_data", lambda args: pytest.fail("read the data first"))
    with pytest.raises(ConfigError, match=r"--plot .*\(it writes .*\.png") as err:
        evaluate_here("--data", "events.csv", "--baselines", "pop", "--json", str(tmp_path / "out" / "r.json"),
                      "--plot", str(tmp_path / plot))
    assert str(tmp_path / plot) in str(err.value) and not (tmp_path / "out").exists()


def test_evaluate_refuses_a_negative_seed_before_it_reads_the_data(monkeypatch):
    # numpy's generator, which draws the personalize sample, ended the run in a traceback
    monkeypatch.setattr(cli_evaluate, "load_data", lambda args: pytest.fail("read the data first"))
    with pytest.raises(ConfigError, match=r"seed = -1 is outside its range \[0, "):
        evaluate_here("--data", "events.csv", "--baselines", "pop", "--protocol", "personalize", "--seed", "-1")


def test_evaluate_with_no_baseline_and_no_model_refuses_before_it_reads_the_data(monkeypatch):
    monkeypatch.setattr(cli_evaluate, "load_data", lambda args: pytest.fail("read the data first"))
    with pytest.raises(ConfigError, match="nothing to evaluate"):
        evaluate_here("--data", "events.csv", "--baselines", " , ")


def test_evaluate_tests_the_protocol_a_config_files_holdout_names_unless_the_flag_names_one(tmp_path):
    from model.synth import generate, write

    data = write(generate(120, 60, seed=3, events_per_user=15), tmp_path / "log.csv")
    config = tmp_path / "best.json"
    config.write_text('{"holdout": "personalize"}')
    for flags, protocol in (([], "personalize"), (["--protocol", "last-session"], "last-session")):
        evaluate_here("--data", str(data), "--baselines", "pop", "--config", str(config), "--json",
                      str(tmp_path / "e.json"), "--quiet", *flags)
        assert json.loads((tmp_path / "e.json").read_text())["protocol"] == protocol


def test_train_writes_only_the_version_directory_to_stdout_and_its_progress_to_stderr(tmp_path, capsys):
    from model.synth import generate, write
    from stream.cli import main

    data = write(generate(120, 60, seed=3, events_per_user=15), tmp_path / "log.csv")
    assert main(["train", "--data", str(data), "--registry", str(tmp_path / "reg"), "--epochs", "1",
                 "--hidden-dimension", "32", "--repeat-head", "true", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    (version,) = cap.out.splitlines()
    assert Path(version).parent == tmp_path / "reg"
    for progress in ("epoch 1: ", "refit: ", "calibration: "):
        assert progress in cap.err


def test_evaluate_scores_every_user_whatever_the_history_length_percentiles_which_only_limit_training(tmp_path):
    from model.synth import generate, write

    data = write(generate(200, 60, seed=3, events_per_user=15), tmp_path / "log.csv")
    counts = []
    for low, high in (("0.0", "1.0"), ("0.0", "0.99"), ("0.2", "0.8")):
        out = tmp_path / f"e{low}-{high}.json"
        evaluate_here("--data", str(data), "--baselines", "pop,user-repeat+session", "--json", str(out), "--quiet",
                      "--min-user-history-length-percentile", low, "--max-user-history-length-percentile", high)
        result = json.loads(out.read_text())
        counts.append((result["n_test_events"], result["n_first_events"], result["models"]))
    assert counts[0] == counts[1] == counts[2] and counts[0][0] > 0


def test_evaluate_reads_no_training_setting_so_a_worker_variable_or_its_own_seed_flag_cannot_stop_it(tmp_path,
                                                                                                    monkeypatch):
    from model.synth import generate, write

    data = write(generate(120, 60, seed=3, events_per_user=15), tmp_path / "log.csv")
    monkeypatch.setenv("HRNN_BATCH_SIZE", "10000")  # the worker's records per batch; no training minibatch
    for protocol in ("last-session", "personalize"):
        assert evaluate_here("--data", str(data), "--baselines", "pop", "--protocol", protocol, "--seed", "5000000000",
                             "--quiet") == 0
    monkeypatch.setenv("HRNN_MIN_ITEM_SUPPORT", "0")  # its own settings are still read, and checked
    with pytest.raises(ConfigError, match="min_item_support"):
        evaluate_here("--data", str(data), "--baselines", "pop", "--quiet")


def test_the_split_settings_warning_ignores_the_session_timeout_when_both_take_each_history_as_one_session():
    from model.cli_evaluate import differing_split_settings
    from model.config import DataConfig

    whole = dict(whole_history_session=True)
    assert differing_split_settings(DataConfig(session_timeout_s=86400, **whole),
                                    DataConfig(session_timeout_s=1800, **whole)) == []
    assert [d[0] for d in differing_split_settings(DataConfig(session_timeout_s=86400),
                                                   DataConfig(session_timeout_s=1800))] == ["session_timeout_s"]


def test_a_registry_name_too_long_for_the_system_exits_2_saying_so(tmp_path):
    for action in (["list"], ["show"], ["promote"], ["rollback"], ["prune", "--keep", "1"]):
        version = ["v1"] if action[0] in ("show", "promote") else []
        proc = hrnn("models", action[0], str(tmp_path / ("A" * 300)), *version, *action[1:], check=False)
        assert proc.returncode == 2, proc.stderr
        assert "File name too long" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_evaluate_refuses_an_output_file_name_too_long_for_the_system_before_it_reads_the_data(
        tmp_path, monkeypatch, flag):
    monkeypatch.setattr(cli_evaluate, "load_data", lambda args: pytest.fail("read the data first"))
    flags = ["--json", str(tmp_path / "r.json")] if flag == "--plot" else []
    with pytest.raises(ConfigError, match=f"{flag} .*: cannot be written \\(File name too long\\)"):
        evaluate_here("--data", "events.csv", "--baselines", "pop", *flags, flag,
                      str(tmp_path / ("A" * 300 + (".json" if flag == "--json" else ".png"))))


@pytest.mark.parametrize("argv", [
    ["train", "--data", "ev.csv", "--registry", ""], ["train", "--data", "ev.csv", "--registry", "r", "--config", ""],
    ["tune", "--data", "ev.csv", "--out", ""], ["evaluate", "--data", "ev.csv", "--config", ""],
    ["evaluate", "--data", "ev.csv", "--model", ""], ["evaluate", "--data", "", "--json", "r.json"],
    ["serve", "--config", ""], ["serve", "--registry", "", "--state-dir", "s"], ["serve", "--state-dir", ""],
    ["retrainer", "--registry", "", "--archive", "a", "--once"], ["retrainer", "--registry", "r", "--archive", ""],
    ["audit", "--config", ""], ["audit", "--json", ""], ["audit", "--kafka-config-file", ""], ["quality", "--png", ""],
    ["produce", "--data", ""], ["items", "unavailable", "x", "--from-file", ""], ["demo", "--out", ""],
    ["models", "list", ""], ["models", "prune", "", "--keep", "1"],
])
def test_an_empty_path_flag_exits_2_naming_it_and_writes_nothing_to_the_working_directory(
        argv, tmp_path, monkeypatch, capsys):
    from stream.cli import main

    monkeypatch.chdir(tmp_path)  # what pathlib makes of an empty name: `--registry ''` published here
    (tmp_path / "ev.csv").write_text("USER_ID,ITEM_ID,TIMESTAMP\nu,i,1\n")
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    assert "an empty path: name a file or directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev.csv"]
