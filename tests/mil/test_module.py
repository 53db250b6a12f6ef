"""``MILModule``: input standardisation is fitted on the training split alone and travels with the model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from fixtures import synthetic_bags, write_bag
from lightning.pytorch import Trainer

from mil.aggregators import MeanPool
from mil.aggregators.base import AggregatorOutput
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


def test_slide_score_can_average_the_bag_logit_with_the_top_valid_patch_logit():
    module = MILModule(MeanPool(in_dim=2, num_classes=2), slide_score="bag_and_top_patch")
    output = AggregatorOutput(logits=torch.tensor([[1.0], [-3.0]]),
                              instance_scores=torch.tensor([[0.5, 3.0, 9.0], [-1.0, -2.0, 0.0]]))
    mask = torch.tensor([[True, True, False], [True, True, True]])  # slide 0's 9.0 is padding and must not count
    torch.testing.assert_close(module.slide_logits(output, mask), torch.tensor([[2.0], [-1.5]]))
    bag_only = MILModule(MeanPool(in_dim=2, num_classes=2))
    torch.testing.assert_close(bag_only.slide_logits(output, mask), output.logits)


def test_slide_score_from_the_top_patch_is_refused_for_multiclass_tasks():
    with pytest.raises(ValueError, match="binary task"):
        MILModule(MeanPool(in_dim=2, num_classes=3), slide_score="bag_and_top_patch")


def test_with_the_top_patch_in_the_slide_score_val_auc_still_watches_the_bag_head(tmp_path):
    """Predictions carry the averaged score; ``val_auc`` (checkpointing, early stopping) stays the bag head's.

    Patch logit = the single feature, bag logit = their mean: the tumor slide wins on the mean (2 > 1.75), the
    normal slide on the top patch (7 > 2), so the two scores rank the validation slides in opposite orders.
    """
    bags = {"t_train": [2.0] * 4, "n_train": [0.0] * 4, "t_val": [2.0] * 4, "n_val": [0.0, 0.0, 0.0, 7.0]}
    for slide_id, values in bags.items():
        write_bag(tmp_path / f"{slide_id}.h5", np.asarray(values, dtype=np.float32)[:, None])
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": list(bags), "label": [1, 0, 1, 0], "split": ["train", "train", "val", "val"]}).to_csv(
        labels, index=False)
    module = MILModule(MeanPool(in_dim=1, num_classes=2, hidden_dim=1, dropout=0.0), scheduler="none",
                       standardize=False, slide_score="bag_and_top_patch")
    with torch.no_grad():  # patch logit = relu(feature)
        for layer in (module.aggregator.embed[0], module.aggregator.classifier):
            layer.weight.fill_(1.0)
            layer.bias.zero_()
    data = MILDataModule(features=str(tmp_path), labels=str(labels), batch_size=2)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False)
    assert trainer.validate(module, datamodule=data, verbose=False)[0]["val_auc"] == 1.0  # the bag head's order
    written = {}
    for batch in data.val_dataloader():
        with torch.no_grad():
            probs = module._results(batch, module(batch["features"], batch["mask"]))["probs"][:, 1]
        written.update(zip(batch["slide_id"], probs.tolist()))
    assert written["n_val"] > written["t_val"]  # the averaged score, written to predictions, ranks them the other way
