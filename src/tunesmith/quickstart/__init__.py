"""The quickstart: SFT with LoRA → DPO → evaluation of base vs SFT vs DPO on held-out
prompts, on bundled data small enough to run in about 15 minutes on 2 CPU cores.

``data.py`` generates the bundled datasets under ``data/`` and holds the metric checks
(``format_ok``, ``concise_ok``, ``answer_of``); its docstring explains the design.
"""
