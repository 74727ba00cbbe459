"""distill: teacher→student distillation of causal language models with Lightning and Hydra."""

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
