"""`patchbalance.lightning.BalancedDataModule` with a user's own LightningModule."""

from __future__ import annotations

import pytest
import torch
from lightning import LightningModule, Trainer

from data_fixtures import write_training_tables
from lightning_runs import IndexedDataset, tiny_config
from patchbalance.data import NumpyWeightedRandomSampler
from patchbalance.data.loader import dataset_weights
from patchbalance.lightning import BalancedDataModule

NUM_SAMPLES, SEED = 40, 3


class TinySegmenter(LightningModule):
    """A user's module: a 1x1 convolution; it keeps the rows it trained and validated on."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=1)
        self.trained: dict[int, list[int]] = {}
        self.validated: dict[int, list[int]] = {}

    def training_step(self, batch, batch_idx):
        self.trained.setdefault(self.current_epoch, []).extend(batch["row"].tolist())
        return torch.nn.functional.cross_entropy(
            self.conv(batch["image"]), batch["mask"], ignore_index=255
        )

    def validation_step(self, batch, batch_idx):
        self.validated.setdefault(self.current_epoch, []).extend(batch["row"].tolist())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    return write_training_tables(tmp_path_factory.mktemp("scenes"))


def test_balanced_data_module_trains_a_users_lightning_module_with_weighted_draws(tables):
    train_table, val_table = tables
    data = BalancedDataModule(
        IndexedDataset(train_table, n_classes=4),
        IndexedDataset(val_table, n_classes=4),
        batch_size=4,
        train_loader={"weighted_sampler": True, "weighted_sampler_num_samples": NUM_SAMPLES},
        seed=SEED,
    )
    model = TinySegmenter()
    before = model.conv.weight.detach().clone()
    trainer = Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2 * NUM_SAMPLES // 4
    assert not torch.equal(before, model.conv.weight)
    # The training rows are the weighted draw of (seed, epoch): excluded row 0 never, the
    # epochs different; set_weights makes the sampler schedule-aware.
    weights = dataset_weights(data.train_dataset)  # excluded row 0 has weight 0
    oracle = NumpyWeightedRandomSampler(weights, NUM_SAMPLES, seed=SEED)
    for epoch in (0, 1):
        oracle.set_epoch(epoch)
        assert model.trained[epoch] == oracle.draw().tolist()
    assert 0 not in model.trained[0] + model.trained[1]
    assert model.trained[0] != model.trained[1]
    assert isinstance(data.sampler, NumpyWeightedRandomSampler) and hasattr(
        data.sampler, "set_weights"
    )
    # Validation: every row once, in table order, each epoch.
    assert model.validated == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3]}


def test_balanced_data_module_from_a_train_yaml_takes_its_dataset_blocks(tables, tmp_path):
    mapping = tiny_config(*tables, tmp_path / "out", NUM_SAMPLES, batch_size=4)
    data = BalancedDataModule.from_config(mapping)
    assert isinstance(data.train_dataset, IndexedDataset)
    assert data.batch_size == 4 and data.seed == mapping["seed"]
    loader = data.train_dataloader()
    assert len(loader.sampler) == NUM_SAMPLES and len(data.val_dataloader().dataset) == 4
