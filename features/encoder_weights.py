"""Checkpoints not written for timm, turned into the keys and tensors of the timm model that replaces them.

Two layouts are recognised by their keys, so a local file and the hub's copy load the same way:

* a Hugging Face ``transformers`` DINOv2 (``Dinov2Model``, e.g. Phikon-v2): ``embeddings.*``, ``encoder.layer.N.*``
  and ``layernorm.*``, under the attention names of transformers 4 (``attention.attention.query``) or 5
  (``attention.q_proj``). It becomes a timm ``VisionTransformer`` with layer scale: query/key/value are stacked
  into one ``qkv`` projection, the mask token (used only in pre-training) is dropped;
* CONCH v1.5's vision tower as TRIDENT loads it (``trunk.*`` timm ViT keys, ``attn_pool_contrast.*``,
  ``ln_contrast.*``). Only its position table needs work (:func:`conch_position_table`).

Anything else is returned unchanged: it is already timm's layout, and the caller checks the keys.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from features.errors import InputError

DINOV2_MARKER = "embeddings.patch_embeddings.projection.weight"
CONCH_MARKER = "attn_pool_contrast.query"
# TRIDENT builds CONCH v1.5's trunk at its default 224 px, so its position table is a 14 x 14 grid that the
# trunk stretches at every forward pass to the 448 px input's 28 x 28 grid.
CONCH_TRUNK_GRID = 14

_DINOV2_BLOCK = [  # transformers DINOv2 layer part -> timm block part (both transformers 4 and 5 names)
    (r"norm1\.", "norm1."),
    (r"norm2\.", "norm2."),
    (r"attention\.output\.dense\.", "attn.proj."),
    (r"attention\.o_proj\.", "attn.proj."),
    (r"layer_scale1\.lambda1", "ls1.gamma"),
    (r"layer_scale2\.lambda1", "ls2.gamma"),
    (r"mlp\.fc1\.", "mlp.fc1."),
    (r"mlp\.fc2\.", "mlp.fc2."),
]
_DINOV2_QKV = {  # query/key/value projections, in the order timm stacks them
    "q": ("attention.attention.query.", "attention.q_proj."),
    "k": ("attention.attention.key.", "attention.k_proj."),
    "v": ("attention.attention.value.", "attention.v_proj."),
}


def to_timm_layout(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` in ``model``'s own layout when it is one of the layouts above; otherwise unchanged."""
    prefix = _prefix_of(state, DINOV2_MARKER)
    if prefix is not None:
        return dinov2_to_timm(_under(state, prefix), model)
    prefix = _prefix_of(state, CONCH_MARKER)
    if prefix is not None and f"{prefix}trunk.pos_embed" in state:
        state = _under(state, prefix)
        state["trunk.pos_embed"] = conch_position_table(state["trunk.pos_embed"], getattr(model, "trunk", model))
    return dict(state)


def dinov2_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A transformers ``Dinov2Model`` state dict as the state dict of timm's ViT with layer scale.

    The position table keeps the checkpoint's grid when it matches the model's; otherwise it is resampled to the
    model's grid once, the way transformers 5 interpolates it at every forward pass (bicubic to the new grid, no
    antialiasing, class position untouched), so a 224 px input embeds as ``Dinov2Model`` embeds it.
    """
    if any(".mlp.weights_in." in key or ".mlp.gate_proj." in key for key in state):
        raise InputError("DINOv2 checkpoint with a SwiGLU MLP (use_swiglu_ffn): not converted to timm here; pass a "
                         "checkpoint with a plain MLP (fc1/fc2), such as Phikon-v2")
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key == "embeddings.cls_token":
            out["cls_token"] = value
        elif key == "embeddings.mask_token":
            continue  # only masks patches in pre-training; an embedding model never uses it
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = _resample_grid(value, model, mode="bicubic")
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif match := re.match(r"encoder\.layer\.(\d+)\.(.+)$", key):
            index, part = int(match.group(1)), match.group(2)
            role = next((r for r, names in _DINOV2_QKV.items() if part.startswith(names)), None)
            if role is not None:
                qkv.setdefault((index, part.rsplit(".", 1)[1]), {})[role] = value
                continue
            for pattern, replacement in _DINOV2_BLOCK:
                if re.match(pattern, part):
                    out[f"blocks.{index}." + re.sub(pattern, replacement, part, count=1)] = value
                    break
            else:
                out[key] = value  # left for the caller's key check to report
        else:
            out[key] = value
    for (index, kind), parts in qkv.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise InputError(f"DINOv2 checkpoint: layer {index} lacks its {kind} of query/key/value "
                             f"(has {', '.join(sorted(parts))}); the file is incomplete")
        out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def conch_position_table(table: torch.Tensor, trunk: nn.Module) -> torch.Tensor:
    """CONCH v1.5's position table on ``trunk``'s grid, with the values TRIDENT's trunk adds to its tokens.

    TRIDENT first brings a table of any other grid to its 14 x 14 trunk (bilinear, no antialiasing), then at
    every forward pass stretches it to the input's grid DINO-style: bicubic with a scale factor of
    (grid + 0.1) / 14. Done once here, the timm model built at the input size adds the same table. A table
    already on ``trunk``'s grid (a file this project wrote, or one saved at 448 px) is taken as it is.
    """
    grid = _grid(trunk)
    if _table_grid(table) == grid:
        return table
    table = _resample_grid(table, trunk, mode="bilinear", grid=(CONCH_TRUNK_GRID, CONCH_TRUNK_GRID))
    if grid == (CONCH_TRUNK_GRID, CONCH_TRUNK_GRID):
        return table
    prefix, patches = table[:, :1], table[:, 1:]
    dim = patches.shape[-1]
    square = patches.reshape(1, CONCH_TRUNK_GRID, CONCH_TRUNK_GRID, dim).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / CONCH_TRUNK_GRID, (grid[1] + 0.1) / CONCH_TRUNK_GRID)
    stretched = F.interpolate(square.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    stretched = stretched.to(table.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, stretched], dim=1)


def _resample_grid(table: torch.Tensor, model: nn.Module, mode: str,
                   grid: tuple[int, int] | None = None) -> torch.Tensor:
    """``table`` (class position first) resampled to ``grid`` (default: the model's), without antialiasing."""
    from timm.layers import resample_abs_pos_embed

    grid = grid or _grid(model)
    if _table_grid(table) == grid:
        return table
    return resample_abs_pos_embed(table, new_size=list(grid), num_prefix_tokens=1, interpolation=mode,
                                  antialias=False)


def _grid(model: nn.Module) -> tuple[int, int]:
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "grid_size", None)
    if size is None:
        raise InputError(f"{type(model).__name__} is not a timm ViT; position tables convert only into one")
    return int(size[0]), int(size[1])


def _table_grid(table: torch.Tensor) -> tuple[int, int]:
    side = math.isqrt(table.shape[1] - 1)
    if side * side != table.shape[1] - 1:
        raise InputError(f"position table of {table.shape[1]} entries is not a class position plus a square grid")
    return side, side


def _prefix_of(state: Mapping[str, torch.Tensor], marker: str) -> str | None:
    """The prefix under which ``marker`` sits in ``state`` (``""`` at the top), or None when it is absent."""
    for key in state:
        if key.endswith(marker) and (len(key) == len(marker) or key[-len(marker) - 1] == "."):
            return key[: -len(marker)]
    return None


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The part of ``state`` under ``prefix``, prefix removed (a wrapper's other parts are not the encoder)."""
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
