"""``MILModule``: input standardisation is fitted on the training split alone and travels with the model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from fixtures import synthetic_bags, write_bag
from lightning.pytorch import Trainer

from mil.aggregators import MeanPool
from mil.data.bags import read_bag
from mil.data.datamodule import MILDataModule
from mil.training.module import MILModule


def test_standardisation_statistics_come_from_the_training_split_only(tmp_path):
    # Validation and test bags sit 50 units away from the training bags in every dimension: statistics that
    # peeked at them (all splits) would move the mean by ~25 and the std by ~25.
    torch.set_num_threads(1)
    folder, labels_csv = synthetic_bags(tmp_path, n_slides=8, n_patches=20, dim=4, seed=1)
    table = pd.read_csv(labels_csv)
    rng = np.random.default_rng(2)
    for slide_id in table.loc[table["split"] != "train", "slide_id"]:
        write_bag(folder / f"{slide_id}.h5", (rng.normal(size=(20, 4)) + 50.0).astype(np.float32))
    train = np.concatenate([read_bag(folder / f"{s}.h5", s).features
                            for s in table.loc[table["split"] == "train", "slide_id"]])

    data = MILDataModule(features=str(folder), labels=str(labels_csv), batch_size=2)
    module = MILModule(MeanPool(in_dim=4, num_classes=2), scheduler="none")
    Trainer(max_steps=1, limit_val_batches=0, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=data)

    assert bool(module.statistics_fitted)
    np.testing.assert_allclose(module.feature_mean.numpy(), train.mean(0), atol=1e-4)
    np.testing.assert_allclose(module.feature_std.numpy(), train.std(0), rtol=1e-3)
    # and the saved state carries them, so test/predict standardise with the same numbers
    state = module.state_dict()
    assert torch.equal(state["feature_mean"], module.feature_mean)
