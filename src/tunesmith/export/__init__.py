"""Export: a finished run as a self-describing folder anyone can load with plain
``transformers``/``peft``, and ``verify``, which proves that in a fresh process.

    tunesmith export runs/sft-demo --format adapter -o exports/sft-demo-adapter
    tunesmith verify exports/sft-demo-adapter

An exported folder holds the weights (a PEFT adapter, or merged sharded safetensors),
the tokenizer with the chat template used in training, ``generation_config.json``, a
model card (``README.md``), reference logits for a fixed prompt
(``tunesmith_reference.safetensors``) and ``tunesmith.json``: base model, every file's
sha256, library versions, and whether vLLM serves it (``"vllm"``, from ``export/vllm.py``).
"""

from tunesmith.export.export import FORMATS, export_run
from tunesmith.export.verify import VerifyResult, verify_export

__all__ = ["FORMATS", "export_run", "verify_export", "VerifyResult"]
