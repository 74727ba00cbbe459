"""Where a causal LM keeps its decoder layers, for every stage that works layer by layer."""

from __future__ import annotations

from torch import nn

from distill.config import config_error


def decoder_layers(model: nn.Module, field: str = "student") -> nn.ModuleList:
    """The decoder layer stack of a transformers causal LM (``model.model.layers``, the Llama family).

    ``field`` names the config node in the error for a model without one.
    """
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise config_error(field, type(model).__name__, "needs decoder layers at model.model.layers (Llama family)")
    return layers
