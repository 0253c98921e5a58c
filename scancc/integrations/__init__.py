"""Run third-party models on scancc kernels (docs/integrations.md).

- :mod:`scancc.integrations.transformers`: ``patch(model, target)`` / ``unpatch(model)`` for
  Hugging Face transformers models (Mamba, Mamba2, FalconMamba and the hybrids whose mixer
  calls the same scan functions).
- :mod:`scancc.integrations.fla`: ``patch(target)`` / ``unpatch()`` routing
  flash-linear-attention's layer functions to scancc's library recurrences.

Each submodule imports its third-party package only when used.
"""
