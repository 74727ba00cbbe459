"""The Hydra configs, a package only so they ship in the wheel.

The library's own commands (``python -m distill.export.gguf`` and the others in README's table) compose their
root configs from ``pkg://conf``, which resolves to this folder in a checkout and to the installed copy anywhere
else; ``train.py`` and ``evaluate.py`` read it as the folder beside them.
"""
