"""Data: the raw corpus (``corpus``), the step batch sampler (``sampler``) and the LightningDataModule (``datamodule``).

Nothing is re-exported here: ``distill.models.tokenizer`` trains its tiny tokenizer on ``corpus`` while
``datamodule`` fingerprints with that tokenizer, so importing the datamodule from this package's ``__init__``
would make ``distill.data`` and ``distill.models.tokenizer`` import each other.
"""
