"""distill: teacher→student distillation of causal language models with Lightning and Hydra.

The library is built in floors; a module imports only from lower floors and its own package (imports made inside
functions included), which ``tests/test_layering.py`` enforces. From the bottom:

0. ``config`` (errors, instantiation of the configs);
1. ``runtime`` (files, paths, ranks, clocks, FSDP gathering), ``cost`` (counting parameters and bytes),
   ``fingerprint`` (hashes of weights and tokenizers), ``loaders`` (the self-contained loaders an export ships,
   which import nothing of this package);
2. ``objective`` (the losses) and ``compress`` (the compression algorithms, quantization grids included);
3. ``data`` (corpus, splits, held-out sets, generated rows);
4. ``models`` (teacher, students, the teacher cache);
5. ``export`` (hf, compact, torchao, GGUF files and their checks);
6. ``module`` (the LightningModule);
7. ``eval`` (held-out scoring, reports, baselines);
8. ``recipe`` (the steps of ``train.py`` and the strategy checks that need the whole stack).

The Lightning callbacks (``callbacks/``) and the entry points (``train.py``, ``evaluate.py``) sit above the library.
"""

from omegaconf import OmegaConf

__version__ = "0.1.0"

# ``${from_scratch:${student._target_},<value for a student built from scratch>,<value otherwise>}``: one recipe
# setting for students that start as a copy of the teacher (or a pretrained model) and for ones that start from
# random weights (student=tiny), e.g. the default run's learning rate. Registered on import, so every entry point
# and test that composes the configs can resolve it.
if not OmegaConf.has_resolver("from_scratch"):
    OmegaConf.register_new_resolver(
        "from_scratch", lambda target, scratch, other: scratch if str(target).endswith("scratch.build") else other
    )
