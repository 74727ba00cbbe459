"""The steps of ``train.py`` (set-up, export, evaluation) as functions that ``train(cfg)`` calls in order.

The top floor of the library: it puts together the models, data, objective, compression stages, runtime,
export and evaluation below it, and nothing below imports it.
"""
