"""edgellm: exact speculative decoding of LLMs on CPUs, phones and small boards.

The runtime needs only onnxruntime, numpy and tokenizers::

    import edgellm
    llm = edgellm.load("bundle/")
    print(llm.generate("def fib(n):", max_new_tokens=64).text)
    opts = edgellm.GenerationOptions(temperature=0.7, seed=1, stop=("\n\n",))
    print(llm.generate("def fib(n):", opts).text)

Heavy pieces (the exporter, the CLI, the server) are imported only when used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from edgellm.errors import (  # noqa: E402
    BundleError,
    ConfigError,
    ContextLengthError,
    EdgeLLMError,
    ExportError,
    IncompatibleModelsError,
    ManifestError,
    ProviderUnavailableError,
    RollbackError,
)

__all__ = [
    "__version__", "load", "LLM", "GenerationOptions", "GenerationResult",
    "EdgeLLMError", "ConfigError", "ContextLengthError", "BundleError", "ManifestError",
    "IncompatibleModelsError", "ProviderUnavailableError", "RollbackError", "ExportError",
]


def __getattr__(name: str):
    # Lazy: `import edgellm` stays cheap and never pulls in onnxruntime until a model is loaded.
    if name in ("load", "LLM"):
        from edgellm import api

        return getattr(api, name)
    if name in ("GenerationOptions", "GenerationResult"):
        from edgellm import generation

        return getattr(generation, name)
    raise AttributeError(f"module 'edgellm' has no attribute {name!r}")
