"""`patchbalance compare` arms beyond overrides: CoreSets, random subsets, embeddings builds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml

from compare_fixtures import tiny_configs
from patchbalance.compare import compare_plan_from_mapping, load_compare_config
from patchbalance.compare.config import deep_merge
from patchbalance.compare.engine import build_all, run_config
from patchbalance.demo import write_demo_dataset
from patchbalance.errors import ConfigError
from patchbalance.train.plan import plan_training

LITE0 = {"backbone": "efficientnet_lite0", "image_size": 64, "num_workers": 0}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo"))


def drawn_rows(plan, arm: str, table_path, epochs: int = 20) -> np.ndarray:
    """Return the table rows (0-based) that the arm's training sampler draws in `epochs`."""
    # The dataset numbers its rows from 1, as in messages.
    training = plan_training(run_config(plan, arm, plan.first_seed, table_path))
    sampler = training.train_loader.sampler
    rows = training.train_dataset.row_numbers
    drawn = []
    for epoch in range(epochs):
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        drawn.extend(rows[np.fromiter(iter(sampler), dtype=np.int64)] - 1)
    return np.asarray(drawn)


def test_a_coreset_arm_draws_only_its_selected_rows_with_equal_weights(tmp_path, demo):
    arms = {
        "cb30": {"coreset": {"method": "cb", "budget": 0.3}},
        "random30": {"coreset": {"method": "random", "budget": 0.3}},
    }
    plan = load_compare_config(tiny_configs(tmp_path, demo, arms=arms))
    tables, _ = build_all(plan)

    pool = int((~pd.read_csv(tables["uniform"].path)["excluded"]).sum())
    assert pool == 176
    for arm in ("cb30", "random30"):
        table = pd.read_csv(tables[arm].path)
        selected = table["coreset_selected"].to_numpy(bool)
        assert selected.sum() == round(0.3 * pool) == 53
        weights = table["sampler_weight"].to_numpy()
        assert np.all(weights[selected] == weights[selected][0]) and np.all(weights[~selected] == 0)
        # 50 "epochs" of eval_every (1) x batch_size (4) draws: 200, every one a selected row.
        drawn = drawn_rows(plan, arm, tables[arm].path, epochs=50)
        assert drawn.size == 200
        assert set(drawn) <= set(np.flatnonzero(selected))
        assert len(set(drawn)) > 45  # equal weights spread the draws over the CoreSet
    # The random subset is seeded: a second selection picks the same rows.
    again = compare_plan_from_mapping(
        {**yaml.safe_load((tmp_path / "compare.yaml").read_text())["compare"], "arms": arms},
        tmp_path,
    )
    (tmp_path / "out" / "builds" / "random30" / "done.json").unlink()
    rebuilt = pd.read_csv(build_all(again)[0]["random30"].path)
    first = pd.read_csv(tables["random30"].path)
    assert rebuilt["coreset_selected"].equals(first["coreset_selected"])


def test_embeddings_arms_share_one_cache_so_each_patch_is_embedded_once(tmp_path, demo):
    arms = {
        "uniqueness_only": {
            "build": {"mode": "embeddings", "sampling_method": "uniqueness_only",
                      "embeddings": LITE0},
        },
        "rank_max_both": {
            "build": {"mode": "embeddings", "sampling_method": "rank_max", "embeddings": LITE0},
        },
    }  # fmt: skip
    config = tiny_configs(tmp_path, demo, arms=arms)
    from typer.testing import CliRunner

    from patchbalance.cli import app

    result = CliRunner().invoke(app, ["compare", str(config), "-q"])

    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    # The arm built first embeds the 176 active patches; the other reuses every one.
    first, second = (results["sampling"][arm]["notes"]["embeddings"] for arm in results["arms"][1:])
    assert (first["computed"], first["cache_hits"]) == (176, 0)
    assert (second["computed"], second["cache_hits"]) == (0, 176)
    assert first["cache_path"] == second["cache_path"]
    caches = list((tmp_path / "out" / "embeddings").glob("*.parquet"))
    assert len(caches) == 1 and len(pd.read_parquet(caches[0])) == 176
    # Both seeds of both arms trained on those tables: builds are per arm, never per seed.
    assert sorted(results["trained"]) == sorted(
        f"{arm}/seed{seed}" for arm in ("uniform", *arms) for seed in (42, 43)
    )


def test_an_override_mapping_with_replace_takes_the_place_of_the_whole_block():
    base = {"loss": {"_target_": "torch.nn.CrossEntropyLoss", "ignore_index": 255}, "seed": 1}
    terms = {"_replace_": True, "terms": [{"name": "cross_entropy"}, {"name": "dice"}]}

    assert deep_merge(base, {"loss": terms}) == {"loss": {"terms": terms["terms"]}, "seed": 1}
    assert deep_merge(base, {"loss": {"ignore_index": 0}})["loss"] == {
        "_target_": "torch.nn.CrossEntropyLoss",
        "ignore_index": 0,
    }


def test_a_random_subset_with_an_unknown_key_is_an_error_naming_the_arm(tmp_path, demo):
    arms = {"r": {"coreset": {"method": "random", "budget": 0.3, "sed": 1}}}
    with pytest.raises(ConfigError, match=r"arm 'r': unknown key 'arms.r.coreset.sed'"):
        load_compare_config(tiny_configs(tmp_path, demo, arms=arms))


def test_loss_arms_train_with_class_weights_and_with_cross_entropy_plus_dice(tmp_path, demo):
    uniform = {"sampling_method": "composition_only", "weights": {"power": 0.0}}
    arms = {
        "median_frequency": {
            "build": uniform,
            "train": {"loss": {"class_weights": "median_frequency"}},
        },
        "ce_dice": {
            "build": uniform,
            "train": {"loss": {"_replace_": True, "terms": [{"name": "cross_entropy"},
                                                            {"name": "dice", "factor": 0.5}]}},
        },
    }  # fmt: skip
    plan = load_compare_config(tiny_configs(tmp_path, demo, arms=arms))
    assert plan.arms["ce_dice"].train["loss"] == {
        "terms": [{"name": "cross_entropy"}, {"name": "dice", "factor": 0.5}]
    }
    from typer.testing import CliRunner

    from patchbalance.cli import app

    result = CliRunner().invoke(app, ["compare", str(tmp_path / "compare.yaml"), "-q"])

    assert result.exit_code == 0, result.output
    runs = tmp_path / "out" / "runs"
    # f_c by hand (SPEC §7): class c's pixel share of the arm's table's active rows under the
    # sampler's weights; then w_c = median(f) / f_c, scaled so that sum_c f_c w_c = 1.
    table = pd.read_csv(tmp_path / "out" / "builds" / "median_frequency" / "table.csv")
    active = ~table["excluded"].to_numpy(bool)
    pixels = table.loc[active, ["px_0", "px_1", "px_2", "px_3"]].to_numpy(float)
    drawn = table.loc[active, "sampler_weight"].to_numpy(float) @ pixels
    share = drawn / drawn.sum()
    raw = np.median(share) / share
    expected = raw / (share @ raw)
    assert np.allclose(expected, 1 / (4 * share))  # median frequency, normalised: 1 / (C f_c)
    assert expected.max() < 50  # below max_class_weight: nothing clipped
    for seed in ("seed42", "seed43"):  # one table per arm, so both seeds use the same weights
        weights = json.loads((runs / "median_frequency" / seed / "class_weights.json").read_text())
        assert (weights["scheme"], weights["class_share_source"]) == (
            "median_frequency",
            "weighted_sampler",
        )
        np.testing.assert_allclose(weights["class_share"], share, rtol=1e-12)
        np.testing.assert_allclose(weights["weights"], expected, rtol=1e-12)
        assert weights["clipped_classes"] == [] and weights["absent_classes"] == []
    # Drawn with equal weights: the rarest class (building, 3) gets the largest weight.
    assert int(np.argmax(expected)) == 3
    for arm in ("uniform", "ce_dice"):
        assert not (runs / arm / "seed42" / "class_weights.json").exists()
    # The same draws (same seed, same table) and another loss give another model.
    base = pd.read_csv(runs / "uniform" / "seed42" / "metrics.csv")
    for arm in ("median_frequency", "ce_dice"):
        other = pd.read_csv(runs / arm / "seed42" / "metrics.csv")
        assert not np.allclose(other["train_loss"], base["train_loss"])


def test_an_arm_that_names_no_method_keeps_the_default_and_its_build_says_so(tmp_path, demo):
    # The demo's build config names no sampling_method; the arm changes only the seed.
    arms = {
        "default": {"build": {"seed": 7}},
        "rank_max": {"build": {"sampling_method": "rank_max"}},
    }
    plan = load_compare_config(tiny_configs(tmp_path, demo, arms=arms))

    assert "sampling_method" not in plan.arms["default"].build
    assert plan.arms["rank_max"].build["sampling_method"] == "rank_max"
    tables, _ = build_all(plan)
    summary = json.loads((tables["default"].path.parent / "table.summary.json").read_text())
    assert (summary["sampling_method"], summary["sampling_method_is_default"]) == (
        "class_target",
        True,
    )
