"""``features finetune``: supervised-contrastive fine-tuning of an encoder on a mined patch selection.

    features finetune --slides cohort/slides --coords store/ --selection r0/selection.csv --out r1/encoder.safetensors

Without ``--encoder.*`` it starts from the encoder recorded in the store given as ``--coords`` (name, weights file
and its checksum or the hub repo and file, input size, seed, pooling, normalisation): the one whose features the
selection was mined from. A hub file is fetched again (the hub cache first) and must have the recorded checksum.
An ``--encoder.*`` that contradicts the store is refused unless ``--encoder.override true``.

Epochs alternate two phases (ItS2CLR / HNM-WSI): a hard-negative phase, one pass over the mined hard negatives
with pseudo-positives in every batch, and a self-paced positive phase, one pass over the positives with
negatives mixed in. SupCon with the pseudo-labels pulls tumor patches together and pushes look-alikes away
from them. Because an epoch walks the hard-negative pool, not the cohort, its cost scales with ``neg_ratio``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from features.encoders import EncoderConfig, file_sha256, hub_source, weights_file
from features.errors import InputError
from features.machine import default_workers
from features.options import parse
from features.provenance import canonical, recorded_encoder
from features.selection import counts_by_kind, read_selection
from features.training.augment import AugmentConfig
from features.training.encoder_module import (ContrastiveEncoder, OptimConfig, TrainerSpec, check_not_collapsed,
                                              make_trainer)
from features.training.patch_data import PHASES, Selected, ViewsDataset, phase_of, phase_order, selection_items, slide_refs
from features.training.pretrain import run_dir, view_transform
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
class FinetuneEncoder(EncoderConfig):
    """The encoder to fine-tune; fields not given come from the encoder recorded in ``--coords``.

    Attributes:
        override: fine-tune exactly the given ``--encoder.*`` (defaults for the rest) even where they contradict
            the encoder recorded in the store.
    """

    override: bool = False


@dataclass
class FinetuneArgs:
    slides: str
    """Slide folder or slides CSV (the cohort mining ran on)."""
    coords: str
    """Feature store, coords or features folder (ours, CLAM or TRIDENT): where each selected patch lies."""
    selection: str
    """Selection CSV from `mil mine`."""
    out: str
    """Weights file to write (.safetensors) + .json sidecar."""
    encoder: FinetuneEncoder = field(default_factory=FinetuneEncoder)
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
    patch_size_level0: int | None = None
    """Patch side in level-0 pixels, for CLAM files that carry no geometry."""
    interpolate: float = 1.0
    """Share of the fine-tuned weights in the saved encoder, the rest being the starting weights (WiSE-FT,
    Wortsman et al. 2022): 1 saves the fine-tuned encoder, 0.5 the midpoint, which keeps more of what the
    starting encoder knew when a few hundred mined patches pull it too far."""
    soup_seeds: list[int] = field(default_factory=list)
    """More data seeds: the encoder is fine-tuned from the same start once for ``data.seed`` and once per seed here,
    and the saved weights are their mean (a uniform model soup, Wortsman et al. 2022). On a few hundred mined
    patches, which of them share a batch swings a refresh; the mean of several orders is meant to swing less.
    Each seed costs one more fine-tuning."""


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

    def stepping_batches(self, trainer: L.Trainer) -> int | None:
        """Optimizer steps of the whole fit, epoch by epoch (None when the epochs are not bounded).

        Lightning estimates the steps from the first epoch's loader times the epochs; the two phases differ in
        length, so that estimate is off, and a cosine schedule sized by it either ends early or never reaches its
        end (on the demo loop it stopped at a quarter of the peak rate). This counts each epoch's phase.
        """
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            return None
        limit = trainer.limit_train_batches
        total = 0
        for patches in epoch_lengths(self.selected, list(self.phases), self.loading.batch_size, trainer.max_epochs):
            batches = math.ceil(math.ceil(patches / self.loading.batch_size) / max(1, trainer.world_size))
            batches = min(batches, limit) if isinstance(limit, int) else int(batches * min(1.0, float(limit)))
            total += math.ceil(batches / trainer.accumulate_grad_batches)
        return min(total, trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else total


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(FinetuneArgs, argv, "features finetune", __doc__)
    args.encoder = start_encoder(args.coords, args.encoder, given_encoder_fields(argv))
    finetune(args)


ENCODER_FIELDS = tuple(f.name for f in fields(FinetuneEncoder))


def given_encoder_fields(argv: list[str]) -> set[str]:
    """Which ``--encoder.*`` fields the user set, on the command line or in a ``--config`` file."""
    import yaml

    given: set[str] = set()
    for index, token in enumerate(argv):
        name = token.split("=", 1)[0]
        if name.startswith("--encoder."):
            given.add(name.removeprefix("--encoder."))
        elif name == "--encoder":
            given |= set(ENCODER_FIELDS)
        elif name == "--config":
            path = token.split("=", 1)[1] if "=" in token else (argv[index + 1] if index + 1 < len(argv) else "")
            try:
                config = yaml.safe_load(open(path)) if path else None
            except (OSError, yaml.YAMLError):
                continue  # the parser has already reported a bad config file
            if isinstance(config, dict):
                section = config.get("encoder")
                given |= set(section) if isinstance(section, dict) else (set(ENCODER_FIELDS) if section else set())
                given |= {k.removeprefix("encoder.") for k in config if str(k).startswith("encoder.")}
    return given & set(ENCODER_FIELDS)


def start_encoder(store: str, given: FinetuneEncoder, fields_given: set[str]) -> FinetuneEncoder:
    """The encoder fine-tuning starts from: the store's, with given fields that agree with it (or ``override``)."""
    found = recorded_encoder(store)
    if found is None:
        if not fields_given - {"override"}:
            raise InputError(f"{store}: holds no features, so it records no encoder to start from; pass --coords the "
                             "store `features extract` wrote, or --encoder.name [--encoder.weights FILE]")
        return given
    if given.override:
        return given  # exactly the encoder asked for (defaults for fields not given), whatever the store used
    recorded, folder = found
    start = replace(given, name=recorded["name"], weights=recorded["weights"], pretrained=recorded["pretrained"],
                    input_size=recorded["input_size"], model_kwargs=dict(recorded["model_kwargs"]),
                    seed=recorded["seed"], hub=recorded["hub"], hub_file=recorded["hub_file"],
                    pooling=recorded["pooling"], mean=recorded["mean"], std=recorded["std"],
                    interpolation=recorded["interpolation"])
    start = replace(start, **{name: getattr(given, name) for name in fields_given})
    # An unset normalisation means "the default": the store's is the one its features were made with.
    start = replace(start, **{key: recorded[key] for key in NORMALISATION if getattr(start, key) is None})
    clashes = contradictions(recorded, start, fields_given)
    if clashes:
        raise InputError(f"{folder}: its features were made with another encoder than --encoder.* asks for "
                         f"({'; '.join(clashes)}); drop those --encoder options to start from the store's encoder, or "
                         "pass --encoder.override true to fine-tune the one given")
    if start.weights and "weights" not in fields_given:
        check_recorded_weights(folder, start.weights, recorded["weights_sha256"])
    elif not start.weights and start.hub and start.hub_file:
        check_hub_file(folder, start, recorded["weights_sha256"])
    return start


NORMALISATION = ("mean", "std", "interpolation")


def store_weights(recorded: dict) -> str:
    """How the store's weights are named in a refusal (``none`` for a random init)."""
    source = EncoderConfig(name=recorded["name"], weights=recorded["weights"], pretrained=recorded["pretrained"],
                           hub=recorded["hub"], hub_file=recorded["hub_file"])
    return weights_named(source) or "none"


def contradictions(recorded: dict, start: FinetuneEncoder, fields_given: set[str]) -> list[str]:
    """Given encoder fields that disagree with the store, as ``--encoder.X given (store: Y)``."""
    clashes = []
    if "name" in fields_given and start.name != recorded["name"]:
        clashes.append(f"--encoder.name {start.name} (store: {recorded['name']})")
    stored = f"(store: {store_weights(recorded)} sha256 {recorded['weights_sha256'][:12] or 'none'})"
    if fields_given & {"weights", "pretrained", "hub", "hub_file"}:
        if not start.weights and start.hub and start.hub_file:
            # The same hub file is checked against the store's checksum once fetched (check_hub_file).
            if (start.hub, start.hub_file) != (recorded["hub"], recorded["hub_file"]):
                clashes.append(f"--encoder.hub {start.hub} --encoder.hub_file {start.hub_file} {stored}")
        else:
            sha = (file_sha256(start.weights) if start.weights else f"hf-hub:{start.hub}" if start.hub
                   else start.name if start.pretrained or start.name.startswith("hf-hub:") else "")
            if sha != recorded["weights_sha256"]:
                given = (f"--encoder.hub {start.hub}" if start.hub and not start.weights
                         else f"--encoder.weights {start.weights or 'none'} sha256 {sha[:12] or 'none'}")
                clashes.append(f"{given} {stored}")
    if "seed" in fields_given and not start.weights and not start.pretrained and not start.hub \
            and start.seed != recorded["seed"]:
        clashes.append(f"--encoder.seed {start.seed} (store: {recorded['seed']})")
    if "input_size" in fields_given and start.input_size is not None and recorded["resolved_input_size"] is not None \
            and start.input_size != recorded["resolved_input_size"]:
        clashes.append(f"--encoder.input_size {start.input_size} (store: {recorded['resolved_input_size']})")
    if "model_kwargs" in fields_given and dict(start.model_kwargs) != dict(recorded["model_kwargs"]):
        clashes.append(f"--encoder.model_kwargs {json.dumps(start.model_kwargs, sort_keys=True)} "
                       f"(store: {json.dumps(recorded['model_kwargs'], sort_keys=True)})")
    if "pooling" in fields_given and start.pooling != recorded["pooling"]:
        clashes.append(f"--encoder.pooling {start.pooling} (store: {recorded['pooling']})")
    for key in NORMALISATION:
        value, stored_value = getattr(start, key), recorded[key]
        if key in fields_given and value is not None and stored_value is not None \
                and canonical(list(value) if key != "interpolation" else value) != canonical(stored_value):
            clashes.append(f"--encoder.{key} {json.dumps(value)} (store: {json.dumps(stored_value)})")
    return clashes


def check_recorded_weights(folder: Path, weights: str, sha256: str) -> None:
    """The store's weights file must still be there, unchanged, to start from it."""
    path = Path(weights)
    if not path.is_file():
        raise InputError(f"{folder}: its encoder weights {path} are missing; put the file back, or pass "
                         f"--encoder.weights FILE with the same weights (sha256 {sha256[:12]}...)")
    actual = file_sha256(path)
    if sha256 and actual != sha256:
        raise InputError(f"{path}: changed since {folder} was extracted (sha256 {actual[:12]}..., recorded "
                         f"{sha256[:12]}...); pass --encoder.weights FILE with the original weights, or "
                         "--encoder.override true with --encoder.weights to start from another file")


def check_hub_file(folder: Path, start: FinetuneEncoder, sha256: str) -> None:
    """The store's hub file, fetched again (hub cache first; one line when it cannot be), must be the one extracted."""
    path = weights_file(start)
    actual = file_sha256(path)
    if sha256 and not sha256.startswith("hf-hub:") and actual != sha256:
        raise InputError(f"{hub_source(start)}: the hub's file ({path}, sha256 {actual[:12]}...) is not the one "
                         f"{folder} was extracted with (sha256 {sha256[:12]}...); pass --encoder.weights FILE with the "
                         "original weights, or --encoder.override true to start from the hub's current file")


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
    selected = selection_items(selection, slide_refs(args.slides), args.coords, args.patch_size_level0)
    if not 0.0 <= args.interpolate <= 1.0:
        raise InputError(f"--interpolate {args.interpolate}: use a share between 0 and 1 (1 = the fine-tuned weights)")
    seeds = list(dict.fromkeys([args.data.seed, *args.soup_seeds]))
    soup: dict[str, torch.Tensor] = {}
    for seed in seeds:
        if seed != seeds[0]:  # the first run is seeded above, as a single fine-tuning always was
            L.seed_everything(seed, workers=True, verbose=False)
        module = ContrastiveEncoder(args.encoder, args.optim)
        weights = {key: value.detach().clone() for key, value in module.encoder.state_dict().items()}
        if seed == seeds[0]:
            start_weights = weights
            transform, size = view_transform(module, selected.items[0].geometry.patch_size, args.data.image_size,
                                             args.augment)
        elif any(not torch.equal(weights[key], start_weights[key]) for key in start_weights):
            raise InputError(f"--soup_seeds {args.soup_seeds}: the encoder starts from other weights under seed {seed} "
                             "(a random init that follows the global seed); a soup needs one start")
        data = PhaseData(selected, ViewsDataset(selected.items, transform, selected.labels), args.phases,
                         replace(args.data, seed=seed))
        folder = run_dir(out) if len(seeds) == 1 else run_dir(out) / f"seed{seed}"
        trainer = make_trainer(args.trainer, str(folder), reload_dataloaders_every_n_epochs=1)
        trainer.fit(module, datamodule=data)
        check_not_collapsed(trainer, str(out))
        add_to_soup(soup, module.encoder)
    if len(seeds) > 1:
        serve_soup(module.encoder, soup, len(seeds))
    if args.interpolate < 1.0:
        interpolate_weights(module.encoder, start_weights, args.interpolate)
    seconds = time.perf_counter() - started
    if trainer.is_global_zero:
        save_encoder_weights(module.encoder, out, {
            "command": "features finetune", "method": "SupCon on pseudo-labels, hard-negative / positive phases",
            "encoder": args.encoder.name, "coords": str(args.coords),
            "started_from": started_from(args.encoder),
            "selection": str(args.selection), "selection_counts": counts_by_kind(selection), "image_size": size,
            "steps": int(trainer.global_step), "epochs": int(trainer.current_epoch), "seconds": round(seconds, 2),
            "final_lr": float(trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]),
            "settings": json.loads(json.dumps(asdict(args), default=str)),
        })
        print(f"wrote {out} ({len(selected.items)} selected patches, {trainer.global_step} steps, {seconds:.1f} s)")
    return out


def add_to_soup(soup: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Add ``model``'s floating-point weights and buffers to the running sums in ``soup``."""
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            total = soup.get(key)
            soup[key] = value.detach().double().clone() if total is None else total + value.detach().double()


def serve_soup(model: nn.Module, soup: dict[str, torch.Tensor], count: int) -> None:
    """Load the mean of ``count`` fine-tuned encoders into ``model`` (integer buffers stay as the last one left them)."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if key in soup:
                value.copy_((soup[key] / count).to(value))


def interpolate_weights(model: nn.Module, start: dict[str, torch.Tensor], share: float) -> None:
    """Move ``model`` to ``start + share * (model - start)``, tensor by tensor (integer buffers stay as trained)."""
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point():
                value.copy_(start[key].to(value) + share * (value - start[key].to(value)))


def weights_named(encoder: EncoderConfig) -> str | None:
    """The weights an encoder starts from, named: the file, the hub source, timm's pretrained name (None: random)."""
    if encoder.weights:
        return encoder.weights
    if encoder.hub:
        return hub_source(encoder)
    if encoder.pretrained or encoder.name.startswith("hf-hub:"):
        return encoder.name
    return None


def started_from(encoder: EncoderConfig) -> str:
    """The weights fine-tuning began with, as the sidecar names them."""
    return weights_named(encoder) or f"random init seed {encoder.seed}"


def epoch_lengths(selected: Selected, phases: list[str], batch_size: int, epochs: int) -> list[int]:
    """Patches per epoch for each phase: what one fine-tuning epoch costs (sizes the learning-rate schedule)."""
    return [len(phase_order(selected, phase_of(e, tuple(phases)), batch_size, 0, e)) for e in range(epochs)]

