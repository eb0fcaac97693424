"""The one exception tree of edgellm.

Every error a user can cause derives from :class:`EdgeLLMError` and from the builtin it
resembles, so ``except ValueError`` keeps working for callers who do not know edgellm::

    EdgeLLMError
    ├── ConfigError(ValueError)              bad argument or option value
    │   └── ContextLengthError               prompt (+ new tokens) past the context length
    ├── BundleError(OSError)                 missing, unreadable or tampered bundle
    │   └── ManifestError(ValueError)        manifest.json malformed or of an unknown version
    ├── IncompatibleModelsError(ValueError)  draft and target cannot be paired
    ├── ProviderUnavailableError(RuntimeError)  execution provider not in this onnxruntime
    ├── RollbackError(RuntimeError)          KV cache cannot be rolled back to that length
    ├── ExportError(RuntimeError)            export failed (source model unreadable, ...)
    └── FetchError(OSError)                  downloading or verifying the default pair failed

Messages name the received value, what is allowed and, where one exists, a hint.
"""

from __future__ import annotations


class EdgeLLMError(Exception):
    """Base of every error edgellm raises on purpose."""


class ConfigError(EdgeLLMError, ValueError):
    """An argument, option or request field has a value that is not allowed.

    Attributes:
        param: the name of the offending parameter when one is to blame (the server reports it as
            the OpenAI error's ``param``), else ``None``.
    """

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ContextLengthError(ConfigError):
    """The prompt, plus the tokens asked for, does not fit the model's context."""


class BundleError(EdgeLLMError, OSError):
    """A bundle folder is missing, unreadable, incomplete or tampered with."""


class ManifestError(BundleError, ValueError):
    """``manifest.json`` is malformed, inconsistent or of an unsupported version."""


class IncompatibleModelsError(EdgeLLMError, ValueError):
    """The draft cannot serve the target (different tokenizer or logits width)."""


class ProviderUnavailableError(EdgeLLMError, RuntimeError):
    """The requested execution provider is unknown or not in the installed onnxruntime."""


class RollbackError(EdgeLLMError, RuntimeError):
    """A KV cache was asked to roll back to a length it cannot reach."""


class ExportError(EdgeLLMError, RuntimeError):
    """Exporting a model failed; the message names the model and the step."""


class FetchError(EdgeLLMError, OSError):
    """Fetching, assembling or verifying model files failed."""
