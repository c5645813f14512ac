"""jaxdpo: DPO and related preference losses for causal LMs in JAX/Flax NNX.

jaxdpo reads tokenizers and configs through transformers without torch; transformers' import-time advice
that PyTorch was not found is about its own models, which jaxdpo never uses, so it is silenced unless the
user set TRANSFORMERS_NO_ADVISORY_WARNINGS themselves.
"""

import os

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
