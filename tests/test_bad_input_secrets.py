"""Round four, secrets: a password or DSN is never shown in a plan, a results file or a message."""

from __future__ import annotations

import json
import logging

import pytest
import yaml

from cli_checks import one_line_error, run_cli
from compare_fixtures import tiny_configs
from patchbalance.config.secrets import mask_secrets, mask_text
from patchbalance.demo import write_demo_dataset
from patchbalance.errors import ConfigError

SECRET = "Sup3r-S3cret-XYZ"
BRACED = "Sup3r${S3cret-XYZ"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


def _everything_written(folder) -> str:
    return "\n".join(
        path.read_bytes().decode("utf-8", "replace") for path in folder.rglob("*") if path.is_file()
    )


def test_the_masking_rule_covers_password_dsn_and_uri_user_info():
    settings = {
        "input": {
            "password": SECRET,
            "dsn": f"postgresql://reader:{SECRET}@db.example:5432/tiles",
            "records_path": f"https://user:{SECRET}@files.example/records.csv",
        },
        "arms": [{"db_password": SECRET, "note": f"host=x password={SECRET} port=5"}],
    }
    shown = mask_secrets(settings)
    assert SECRET not in json.dumps(shown)
    assert shown["input"]["password"] == "***"
    assert shown["input"]["dsn"] == "postgresql://reader:***@db.example:5432/tiles"
    assert shown["input"]["records_path"] == "https://user:***@files.example/records.csv"
    assert shown["arms"][0] == {"db_password": "***", "note": "host=x password=*** port=5"}
    assert mask_text(f"postgresql://u:{SECRET}@h/db") == "postgresql://u:***@h/db"


def test_compare_dry_run_and_results_never_show_an_arms_password(tmp_path, demo, monkeypatch):
    monkeypatch.setenv("PB_TEST_ARM_PASSWORD", SECRET)
    arms = {
        "rank_max": {
            "build": {
                "sampling_method": "rank_max",
                "input": {"password": "${oc.env:PB_TEST_ARM_PASSWORD}"},
            }
        }
    }
    # One arm (the baseline itself): the fewest trainings that write every result file.
    config = tiny_configs(tmp_path, demo, arms=arms, baseline="rank_max")
    dry = run_cli("compare", config, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert "'password': '***'" in dry.stdout
    assert SECRET not in dry.output

    result = run_cli("compare", config, "--verbose")
    assert result.exit_code == 0, result.output
    assert SECRET not in result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["settings"]["arms"]["rank_max"]["build"]["input"]["password"] == "***"
    assert SECRET not in _everything_written(tmp_path / "out")


def _postgres_config(folder, password_line: str):
    path = folder / "pg.yaml"
    path.write_text(
        "input:\n  host: 127.0.0.1\n  port: 1\n  user: reader\n  database: tiles\n"
        f"  table: tiles\n{password_line}output:\n  csv_path: out/t.csv\n"
    )
    return path


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_a_password_holding_a_malformed_interpolation_is_never_echoed(tmp_path, dry_run):
    config = _postgres_config(tmp_path, f'  password: "{BRACED}"\n')
    result = run_cli("build-balanced-dataset", config, *dry_run)
    line = one_line_error(result, str(config), "'input.password'", "not shown")
    assert "S3cret" not in result.output, line
    # Not in the traceback that --debug adds either.
    debug = run_cli("build-balanced-dataset", config, *dry_run, "--debug")
    assert debug.exit_code == 2 and "Traceback" in debug.output
    assert "S3cret" not in debug.output
    assert not (tmp_path / "out").exists()


def test_a_password_set_on_the_command_line_is_never_echoed(tmp_path):
    config = _postgres_config(tmp_path, "")
    for value in ("Sup3r${S3cret", "Sup3r${S3cret}", "${oc.decode:Sup3rS3cret"):
        result = run_cli("build-balanced-dataset", config, "--set", f"input.password={value}")
        one_line_error(result, str(config), "'input.password'", "not shown")
        debug = run_cli(
            "build-balanced-dataset", config, "--debug", "--set", f"input.password={value}"
        )
        assert "S3cret" not in result.output + debug.output, result.output
    assert not (tmp_path / "out").exists()


def test_a_password_of_the_wrong_type_is_not_quoted(tmp_path):
    config = _postgres_config(tmp_path, f"  password: {{nested: {SECRET}}}\n")
    result = run_cli("build-balanced-dataset", config)
    one_line_error(result, "input.password")
    debug = run_cli("build-balanced-dataset", config, "--debug")
    assert SECRET not in result.output + debug.output


def _logs_then_fails(error: Exception):
    def load_config(*args, **kwargs):
        logging.getLogger("patchbalance.test").warning("connecting with password=%s", SECRET)
        raise error

    return load_config


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RuntimeError(f"driver said: postgresql://reader:{SECRET}@db/tiles is down"), 1),
        (ConfigError("stop"), 2),
    ],
    ids=["unexpected-error", "user-error"],
)
def test_log_lines_and_unexpected_errors_mask_passwords(tmp_path, monkeypatch, error, status):
    import patchbalance.balancing.command as command

    monkeypatch.setattr(command, "load_config", _logs_then_fails(error))
    result = run_cli("build-balanced-dataset", tmp_path / "any.yaml")
    assert result.exit_code == status
    assert "password=***" in result.stderr
    if status == 1:
        assert "postgresql://reader:***@db/tiles" in result.stderr
    assert SECRET not in result.output


def test_a_compare_file_with_a_password_in_yaml_keeps_it_out_of_the_plan(tmp_path, demo):
    config = tiny_configs(tmp_path, demo)
    data = yaml.safe_load(config.read_text())
    data["compare"]["arms"]["rank_max"]["build"]["input"] = {"password": SECRET}
    config.write_text(yaml.safe_dump(data))
    dry = run_cli("compare", config, "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert SECRET not in dry.output
