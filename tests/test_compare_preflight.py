"""What `compare` and `train` refuse before any work, `--dry-run` included (docs/bad-input.md,
round four, B5-B9): each a one-line error naming the arm or the key, exit 2, nothing written."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from compare_fixtures import EXAMPLES, error_line, tiny_configs
from data_fixtures import write_training_tables
from patchbalance.cli import app
from patchbalance.demo import write_demo_dataset

runner = CliRunner()


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


CASES = [
    # WEAK 4: what would fail in a late training, found for every arm.
    (
        {"arms": {"typo": {"train": {"loss": {"clas_weights": "inverse_frequency"}}}}},
        "arm 'typo': loss: cannot instantiate 'torch.nn.CrossEntropyLoss'",
        "clas_weights",
    ),
    ({"arms": {"gpu": {"train": {"device": "cuda"}}}}, "arm 'gpu': device: cuda", "not available"),
    ({"classes_of_interest": [7]}, "classes_of_interest names class 7", "0, 1, 2, 3"),
    # WEAK 5: a random subset's budget.
    (
        {"arms": {"r": {"coreset": {"method": "random", "budget": 2.5}}}},
        "arm 'r': arms.r.coreset: budget 2.5 is above 1",
        "budget_mode: count",
    ),
    (
        {"arms": {"r": {"coreset": {"method": "random", "budget": -1}}}},
        "arm 'r': arms.r.coreset: 'budget'",
        "greater than 0",
    ),
    (
        {"arms": {"r": {"coreset": {"method": "random", "budget_mode": "percent"}}}},
        "arm 'r': arms.r.coreset: 'budget_mode'",
        "'fraction' or 'count'",
    ),
    # WEAK 6, 7, 9: seeds, arms.
    ({"seeds": 1_000_000}, "'seeds'", "less than or equal to 1000"),
    ({"arms": {}}, "arms is empty", "at least one arm"),
    ({"arms": {"..": {}}}, "arm name '..'", "not be . or .."),
    ({"arms": {".": {}}}, "arm name '.'", "not be . or .."),
    ({"arms": {"a/b": {}}}, "arm name 'a/b'", "names a folder"),
    ({"arms": {"Uniform": {}}}, "'uniform' and 'Uniform' differ only in case", "rename one"),
]


@pytest.mark.parametrize(("compare", "names", "says"), CASES)
@pytest.mark.parametrize("dry_run", [True, False])
def test_compare_refuses_before_any_build_naming_the_arm_or_key(
    tmp_path, demo, compare, names, says, dry_run
):
    config = tiny_configs(tmp_path, demo, **compare)
    result = runner.invoke(app, ["compare", str(config), *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 2, result.output
    line = error_line(result)
    assert names in line and says in line, line
    assert not (tmp_path / "out").exists()
    assert len(result.stdout) < 10_000


def test_a_dry_run_with_many_seeds_summarises_them(tmp_path, demo):
    config = tiny_configs(tmp_path, demo, seeds=1000)
    result = runner.invoke(app, ["compare", str(config), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "seeds: 42, 43, 44, 45, 46, 47, 48, 49, 50, ... 1041 (1000 seeds);" in result.stdout
    assert len(result.stdout) < 2_000


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return write_training_tables(tmp_path_factory.mktemp("scenes"))


def train_yaml(tmp_path, tables, loss) -> str:
    """Write the example comparison's train config over the tables, with `loss`."""
    config = yaml.safe_load((EXAMPLES / "compare_train.yaml").read_text())
    config["train_dataset"]["input_csv_path"], config["val_dataset"]["input_csv_path"] = map(
        str, tables
    )
    config.update(loss=loss, output_dir=str(tmp_path / "trained"))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    return str(tmp_path / "train.yaml")


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (
            {"terms": [{"name": "cross_entropy", "factor": 0}, {"name": "dice", "factor": 0}]},
            "loss.terms: every factor is 0",
        ),
        (
            {"terms": [{"name": "dice", "mode": "bogus"}]},
            "loss.terms[0].mode must be one of binary",
        ),
        (
            {
                "_target_": "segmentation_models_pytorch.losses.DiceLoss",
                "mode": "multiclass",
                "smoth": 0.5,
            },
            "unexpected keyword argument 'smoth'",
        ),
    ],
)
def test_train_dry_run_instantiates_the_loss_and_refuses_a_bad_one(tmp_path, tables, loss, message):
    result = runner.invoke(app, ["train", train_yaml(tmp_path, tables, loss), "--dry-run"])
    assert result.exit_code == 2, result.output
    assert message in error_line(result)
    assert not (tmp_path / "trained").exists()
