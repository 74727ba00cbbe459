"""Importance scores for structured pruning: per attention head, MLP channel, hidden channel and decoder layer.

Three scores for heads and channels:

- ``activation`` (Minitron): mean activation magnitude over calibration batches. A channel scores the
  mean |x| of its input to ``down_proj``; a head scores the mean L2 norm of its contribution to the
  attention output (its slice of the ``o_proj`` input times its ``o_proj`` columns). Measuring after
  ``o_proj`` rather than before makes a head whose output projection is zero score zero, which it is
  worth: it contributes nothing.
- ``taylor`` (LLM-Pruner): first-order Taylor, the sum of |weight × grad| over the unit's weights,
  accumulated over calibration batches.
- ``magnitude``: the L2 norm of the unit's weights; needs no data.

Hidden (residual-stream) channels score the same three ways. ``activation`` follows Minitron's embedding
score: the mean |y| of the channel in the *output* of every RMSNorm over the residual stream (each layer's
two norms and the final norm), summed over the norms. The output, not the input, is what q/k/v, gate/up
and ``lm_head`` read, so a channel that every norm weight silences scores zero although the residual stream
carries it. ``taylor`` and ``magnitude`` sum over every weight the channel indexes (embedding and
``lm_head`` columns, norm weights, q/k/v/gate/up columns, o_proj/down_proj rows).

Layers always score by block influence (ShortGPT): 1 − cos(input, output) of the layer's hidden states,
averaged over tokens; a layer that barely changes its input costs least to remove.

Sums are kept in float64 with token counts, so they can be summed across DDP ranks and checkpointed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from distill.compress.prune.surgery import decoder_layers, hidden_norms, hidden_params
from distill.runtime.sampling import generating

METHODS = ("activation", "taylor", "magnitude")


class ImportanceAccumulator:
    """Collects importance statistics from a model's forward (and backward) passes.

    Args:
        method: ``activation``, ``taylor`` or ``magnitude`` for heads and channels (and hidden channels).
        layers: also collect block influence for layer scores.
        means: also collect the signed mean inputs of ``down_proj``/``o_proj`` (bias compensation).
        hidden: also collect hidden-channel scores (width pruning).

    """

    def __init__(self, method: str, layers: bool, means: bool = False, hidden: bool = False) -> None:
        self.method = method
        self.layers = layers
        self.means = means
        self.hidden = hidden
        self.collecting = False
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, Tensor] = {}
        # What this rank added since the last reduce (sum, count): reduce sums only these across ranks, so the
        # totals are the same on every rank after each reduce, and the checkpoint rank 0 writes holds them all.
        self._local: dict[str, tuple[Tensor, Tensor]] = {}
        self._handles: list[RemovableHandle] = []

    @property
    def needs_data(self) -> bool:
        """Whether scores come from batches (anything but pure weight magnitude)."""
        return self.method != "magnitude" or self.layers or self.means

    # -- bookkeeping --------------------------------------------------------------------------
    def _add(self, key: str, value: Tensor, count: int) -> None:
        value = value.detach().to(torch.float64).cpu()
        n = torch.tensor(float(count), dtype=torch.float64)
        if key in self.sums:
            self.sums[key] += value
            self.counts[key] += n
        else:
            self.sums[key] = value.clone()
            self.counts[key] = n.clone()
        old_sum, old_count = self._local.get(key, (torch.zeros_like(value), torch.zeros_like(n)))
        self._local[key] = (old_sum + value, old_count + n)

    def reset(self) -> None:
        """Forget collected statistics (after the structure they describe has changed)."""
        self.sums, self.counts, self._local = {}, {}, {}

    def state_dict(self) -> dict[str, Any]:
        """Sums and counts, so a resumed run scores on the same batches as an uninterrupted one."""
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.sums, self.counts, self._local = dict(state["sums"]), dict(state["counts"]), {}

    def reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Sum the statistics added since the last reduce across ranks, so every rank holds the same totals.

        Called after each calibration step (and before a cut), every rank then picks the same units, and the
        state rank 0 checkpoints is the sum over ranks, which a resumed run continues from.
        """
        for key in sorted(self._local):  # the same order on every rank, or collectives would mismatch
            local_sum, local_count = self._local[key]
            # Copies: an all-reduce may work in place on the tensor it is given.
            self.sums[key] += reduce_sum(local_sum.clone()) - local_sum
            self.counts[key] += reduce_sum(local_count.clone()) - local_count
        self._local = {}

    # -- hooks --------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Register forward hooks on the model's layers (replacing earlier ones)."""
        self.detach()
        for i, layer in enumerate(decoder_layers(model)):
            if self.method == "activation":
                self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._channel_hook(i)))
                self._handles.append(layer.self_attn.o_proj.register_forward_pre_hook(self._head_hook(i, layer)))
            if self.layers:
                self._handles.append(layer.register_forward_hook(self._layer_hook(i), with_kwargs=True))
            if self.means:
                self._handles.append(layer.mlp.down_proj.register_forward_pre_hook(self._mean_hook(f"mean.mlp.{i}")))
                self._handles.append(
                    layer.self_attn.o_proj.register_forward_pre_hook(self._mean_hook(f"mean.attn.{i}"))
                )
        if self.hidden and self.method == "activation":
            self._handles += [norm.register_forward_hook(self._hidden_hook) for norm in hidden_norms(model)]

    def detach(self) -> None:
        """Remove all hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def _counts(self) -> bool:
        """Whether this forward is scored: while collecting, except the forwards that sample continuations.

        Sampling with the student (``distill.generation``) runs inside the training step, but its prompt
        prefills and one-token decode steps are not the training distribution the scores describe.
        """
        return self.collecting and not generating()

    def _channel_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if self._counts():
                x = args[0].detach()
                self._add(f"channel.{i}", x.abs().flatten(0, -2).sum(0), x[..., 0].numel())

        return hook

    def _head_hook(self, i: int, layer: nn.Module) -> Callable[..., None]:
        attn = layer.self_attn

        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if not self._counts():
                return
            with torch.no_grad():
                x = args[0].detach().flatten(0, -2)  # tokens × (heads · head_dim)
                d = attn.head_dim
                w = module.weight.detach().view(module.out_features, -1, d)  # out × heads × head_dim
                contrib = torch.einsum("thd,ohd->tho", x.view(x.shape[0], -1, d), w)
                self._add(f"head.{i}", contrib.norm(dim=-1).sum(0), x.shape[0])

        return hook

    def _hidden_hook(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
        if self._counts():
            y = output.detach()
            # One count per token and norm: the mean over norms and tokens ranks like the sum over norms.
            self._add("hidden", y.abs().flatten(0, -2).sum(0), y[..., 0].numel())

    def _mean_hook(self, key: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            if self._counts():
                x = args[0].detach().flatten(0, -2)
                self._add(key, x.sum(0), x.shape[0])

        return hook

    def input_mean(self, kind: str, i: int) -> Tensor:
        """Signed mean input of layer ``i``'s ``down_proj`` (``mlp``) or ``o_proj`` (``attn``): bias compensation."""
        return self._mean(f"mean.{kind}.{i}")

    def _layer_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if not self._counts():
                return
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                cos = F.cosine_similarity(x.detach().float(), y.detach().float(), dim=-1)
                self._add(f"layer.{i}", (1 - cos).sum(), cos.numel())

        return hook

    @torch.no_grad()
    def accumulate_grads(self, model: nn.Module) -> None:
        """Add one batch of first-order Taylor scores from the current gradients (``taylor`` only)."""
        if self.method != "taylor" or not self.collecting:
            return
        if self.hidden:
            self._accumulate_hidden_grads(model)
        for i, layer in enumerate(decoder_layers(model)):
            mlp, attn = layer.mlp, layer.self_attn
            if any(lin.weight.grad is None for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
                continue
            ch = (mlp.gate_proj.weight * mlp.gate_proj.weight.grad).abs().sum(1)
            ch += (mlp.up_proj.weight * mlp.up_proj.weight.grad).abs().sum(1)
            ch += (mlp.down_proj.weight * mlp.down_proj.weight.grad).abs().sum(0)
            self._add(f"channel.{i}", ch, 1)
            if attn.q_proj.weight.grad is None or attn.o_proj.weight.grad is None:
                continue
            d = attn.head_dim
            q = (attn.q_proj.weight * attn.q_proj.weight.grad).abs().view(-1, d, attn.q_proj.in_features).sum((1, 2))
            o = (attn.o_proj.weight * attn.o_proj.weight.grad).abs().view(attn.o_proj.out_features, -1, d).sum((0, 2))
            self._add(f"head.{i}", q + o, 1)

    def _accumulate_hidden_grads(self, model: nn.Module) -> None:
        """One batch of |w·∇w| per hidden channel, summed over every weight the channel indexes."""
        total = None
        for w, axis in hidden_params(model):
            if w.grad is not None:  # a frozen weight (say, the embedding) has no gradient to score with
                part = _per_channel((w * w.grad).abs(), axis)
                total = part if total is None else total + part
        if total is not None:
            self._add("hidden", total, 1)

    # -- scores -------------------------------------------------------------------------------
    def _mean(self, key: str) -> Tensor:
        if key not in self.sums or float(self.counts[key]) == 0:
            raise RuntimeError(f"no importance statistics for {key}: no calibration batch reached this layer")
        return self.sums[key] / self.counts[key]

    @torch.no_grad()
    def head_scores(self, model: nn.Module) -> list[Tensor]:
        """Per layer, one score per query head (higher = more important)."""
        out = []
        for i, layer in enumerate(decoder_layers(model)):
            if self.method == "magnitude":
                attn = layer.self_attn
                d = attn.head_dim
                q = attn.q_proj.weight.detach().float().view(-1, d, attn.q_proj.in_features).pow(2).sum((1, 2))
                o = attn.o_proj.weight.detach().float().view(attn.o_proj.out_features, -1, d).pow(2).sum((0, 2))
                out.append((q + o).sqrt().double().cpu())
            else:
                out.append(self._mean(f"head.{i}"))
        return out

    @torch.no_grad()
    def channel_scores(self, model: nn.Module) -> list[Tensor]:
        """Per layer, one score per MLP intermediate channel (higher = more important)."""
        out = []
        for i, layer in enumerate(decoder_layers(model)):
            if self.method == "magnitude":
                mlp = layer.mlp
                sq = mlp.gate_proj.weight.detach().float().pow(2).sum(1) + mlp.up_proj.weight.detach().float().pow(
                    2
                ).sum(1)
                sq += mlp.down_proj.weight.detach().float().pow(2).sum(0)
                out.append(sq.sqrt().double().cpu())
            else:
                out.append(self._mean(f"channel.{i}"))
        return out

    def layer_scores(self, model: nn.Module) -> Tensor:
        """One block-influence score per decoder layer (higher = more important)."""
        return torch.stack([self._mean(f"layer.{i}") for i in range(len(decoder_layers(model)))])

    @torch.no_grad()
    def hidden_scores(self, model: nn.Module) -> Tensor:
        """One score per hidden (residual-stream) channel (higher = more important)."""
        if self.method != "magnitude":
            return self._mean("hidden")
        sq = sum(_per_channel(w.detach().float().pow(2), axis) for w, axis in hidden_params(model))
        return sq.sqrt().double().cpu()


def _per_channel(t: Tensor, axis: int) -> Tensor:
    """Sum a weight-shaped tensor down to one value per index along ``axis`` (a vector stays as it is)."""
    return t if t.dim() == 1 else t.sum(dim=1 - axis)
