"""Loading the compact form of a student with tied (shared) weights, low-rank factors and LoRA deltas.

``transformers``' ``save_pretrained`` refuses tensors shared across layers, and a plain model class
cannot load factorised linears. Sharing and low-rank therefore have one compact format that keeps the
real size saving, written by :func:`distill.export.compact.save_compact`:

* ``model.safetensors``: every distinct tensor once, under the first name it has in the model;
* ``compact.json``: the structure to rebuild on top of the plain architecture (which linears are
  factorised and at what rank, which projections carry a LoRA delta) and the tie groups
  (``[canonical, alias, ...]``: names that are one tensor);
* ``config.json`` and the tokenizer files, as in a plain Hugging Face folder;
* ``load_compact.py``: a copy of this file, so ``load_compact(folder)`` works without this package.

This file must stay self-contained (torch, transformers, safetensors and, for LoRA, peft only): it is
copied next to the weights as the loader, so it holds only what loading needs. The module surgery that
loading shares with training (:class:`LowRankLinear`, :func:`set_module`, :func:`set_parameter`) is
defined here once and imported by the training code; the writer and the plain form are in
:mod:`distill.export.compact`.

Usage, without this package::

    import sys; sys.path.insert(0, folder)
    from load_compact import load_compact
    model = load_compact(folder)  # an AutoModelForCausalLM with the ties and factors rebuilt
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

FORMAT = "distill-compact"
# v2: the factorised linears' ranks are under "factors" (v1 called it by the stage's name); a v1 folder loads
# with the copy of this file written beside it.
VERSION = 2


class LowRankLinear(nn.Module):
    """``y = up(down(x))``: a linear layer W (d_out × d_in) stored as two factors of rank ``rank``.

    ``down.weight`` is (rank × d_in) and ``up.weight`` (d_out × rank); the bias, if any, sits on ``up``,
    so ``up.weight @ down.weight`` is the dense weight and the bias is unchanged.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the two factors."""
        return self.up(self.down(x))

    def dense_weight(self) -> torch.Tensor:
        """The d_out × d_in product ``up.weight @ down.weight``."""
        return self.up.weight @ self.down.weight

    def extra_repr(self) -> str:  # noqa: D102 (nn.Module's repr hook)
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


# -- module surgery ---------------------------------------------------------------------------------
def get_owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that owns the dotted attribute ``name`` and the attribute's last component."""
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted ``name``."""
    owner, leaf = get_owner(model, name)
    setattr(owner, leaf, module)


def set_parameter(model: nn.Module, name: str, param: nn.Parameter) -> None:
    """Make the dotted parameter ``name`` this Parameter object (ties it when used for several names)."""
    owner, leaf = get_owner(model, name)
    setattr(owner, leaf, param)


# -- the compact format: loading ----------------------------------------------------------------------
def load_compact(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a compact folder: build the plain architecture, rebuild factors and LoRA, re-tie, load weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    spec = json.loads((folder / "compact.json").read_text())
    if spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise ValueError(f"{folder}/compact.json: not a {FORMAT} v{VERSION} folder")
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config)
    for name, rank in spec["factors"].items():
        dense = model.get_submodule(name)
        set_module(model, name, LowRankLinear(dense.in_features, dense.out_features, rank, dense.bias is not None))
    lora = spec.get("lora")
    if lora:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], target_modules=lora["modules"])
        inject_adapter_in_model(config, model)
        for name, scaling in lora["scaling"].items():
            layer = model.get_submodule(name)
            layer.scaling[layer.active_adapters[0]] = scaling
    for names in spec["ties"]:
        shared = model.get_parameter(names[0])
        for alias in names[1:]:
            set_parameter(model, alias, shared)
    tensors = load_file(str(folder / "model.safetensors"))
    result = model.load_state_dict(tensors, strict=False)
    aliases = {alias for names in spec["ties"] for alias in names[1:]}
    missing = [k for k in result.missing_keys if k not in aliases]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{folder}: weights do not fit the structure (missing {missing}, unexpected {result.unexpected_keys})"
        )
    for p in model.parameters():
        p.requires_grad_(True)  # peft freezes the base weights on injection; a loaded model is fully trainable
    if dtype is not None:
        model.to(dtype)
    return model.eval()
