"""``features finetune``: supervised-contrastive fine-tuning of an encoder on a mined patch selection.

    features finetune --slides cohort/slides --coords store/ --selection r0/selection.csv \
        --encoder.name resnet18 --encoder.weights r0/encoder.safetensors --out r1/encoder.safetensors

Epochs alternate two phases (ItS2CLR / HNM-WSI): a hard-negative phase, one pass over the mined hard negatives
with pseudo-positives in every batch, and a self-paced positive phase, one pass over the positives with
negatives mixed in. SupCon with the pseudo-labels pulls tumour patches together and pushes look-alikes away
from them. Because an epoch walks the hard-negative pool, not the cohort, its cost scales with ``neg_ratio``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, Subset

from features.encoders import EncoderConfig
from features.errors import InputError
from features.machine import default_workers
from features.selection import counts_by_kind, read_selection
from features.training.augment import AugmentConfig
from features.training.encoder_module import (ContrastiveEncoder, OptimConfig, TrainerSpec, check_not_collapsed,
                                              make_trainer)
from features.training.patch_data import PHASES, Selected, ViewsDataset, phase_of, phase_order, selection_items, slide_refs
from features.training.pretrain import parse, run_dir, view_transform
from features.training.weights import save_encoder_weights


@dataclass
class SelectionLoading:
    batch_size: int = 32
    """Patches per step: half from the phase's pool, half mixed in."""
    num_workers: int = field(default_factory=default_workers)
    """DataLoader processes reading patches; default: the cores this process may use (at most 8)."""
    image_size: int | None = None
    """Train at this size; default: what extraction feeds the encoder."""
    seed: int = 0
    """Seeds the sampling and the augmentations."""


@dataclass
class FinetuneArgs:
    slides: str
    """Slide folder or slides CSV (the cohort mining ran on)."""
    coords: str
    """Feature store (or coords folder): the geometry each selected patch was extracted with."""
    selection: str
    """Selection CSV from `mil mine`."""
    out: str
    """Weights file to write (.safetensors) + .json sidecar."""
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    """The encoder to fine-tune; default: the one recorded in the --coords store."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimiser and loss settings."""
    data: SelectionLoading = field(default_factory=SelectionLoading)
    """How selected patches are loaded."""
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    """Epoch e runs phases[e % len(phases)]."""
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    """Augmentation strengths."""
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    """Lightning Trainer flags."""


class PhaseData(L.LightningDataModule):
    """Builds each epoch's loader for its phase; needs ``reload_dataloaders_every_n_epochs=1``."""

    def __init__(self, selected: Selected, dataset: ViewsDataset, phases: list[str], loading: SelectionLoading):
        super().__init__()
        self.selected, self.dataset, self.phases, self.loading = selected, dataset, tuple(phases), loading

    def train_dataloader(self) -> DataLoader:
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        order = phase_order(self.selected, phase_of(epoch, self.phases), self.loading.batch_size, self.loading.seed, epoch)
        # The order already holds the batches; a plain sequential loader keeps them intact (and under DDP the
        # distributed sampler deals them out without reshuffling).
        return DataLoader(Subset(self.dataset, order.tolist()), batch_size=self.loading.batch_size, shuffle=False,
                          num_workers=self.loading.num_workers, drop_last=False)


def main(argv: list[str] | None = None) -> None:
    finetune(parse(FinetuneArgs, argv, "features finetune", __doc__))


def finetune(args: FinetuneArgs) -> Path:
    out = Path(args.out)
    if out.is_file():
        print(f"{out} exists; skipping (delete it to fine-tune again)")
        return out
    bad = sorted(set(args.phases) - set(PHASES))
    if bad or not args.phases:
        raise InputError(f"--phases {args.phases}: use a list of {', '.join(PHASES)}")
    started = time.perf_counter()
    L.seed_everything(args.data.seed, workers=True, verbose=False)
    selection = read_selection(args.selection)
    selected = selection_items(selection, slide_refs(args.slides), args.coords)
    module = ContrastiveEncoder(args.encoder, args.optim)
    transform, size = view_transform(module, selected.items[0].geometry.patch_size, args.data.image_size, args.augment)
    data = PhaseData(selected, ViewsDataset(selected.items, transform, selected.labels), args.phases, args.data)
    trainer = make_trainer(args.trainer, str(run_dir(out)), reload_dataloaders_every_n_epochs=1)
    trainer.fit(module, datamodule=data)
    check_not_collapsed(trainer, str(out))
    seconds = time.perf_counter() - started
    if trainer.is_global_zero:
        save_encoder_weights(module.encoder, out, {
            "command": "features finetune", "method": "SupCon on pseudo-labels, hard-negative / positive phases",
            "encoder": args.encoder.name, "started_from": args.encoder.weights or f"random init seed {args.encoder.seed}",
            "selection": str(args.selection), "selection_counts": counts_by_kind(selection), "image_size": size,
            "steps": int(trainer.global_step), "epochs": int(trainer.current_epoch), "seconds": round(seconds, 2),
            "settings": json.loads(json.dumps(asdict(args), default=str)),
        })
        print(f"wrote {out} ({len(selected.items)} selected patches, {trainer.global_step} steps, {seconds:.1f} s)")
    return out


def epoch_lengths(selected: Selected, phases: list[str], batch_size: int, epochs: int) -> list[int]:
    """Patches per epoch for each phase: what one fine-tuning epoch costs (used by the benchmark)."""
    return [len(phase_order(selected, phase_of(e, tuple(phases)), batch_size, 0, e)) for e in range(epochs)]

