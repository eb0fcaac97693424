"""``ExportOptions``: every option of an export, validated together before any work.

Frozen and self-validating: ``auto`` and the device overrides (npu graphs take their precision
from ``npu_quant``; gpu graphs compute in fp16) are resolved once here, and each role gets its
storage plan from :meth:`ExportOptions.quant_plan`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgellm.errors import ConfigError
from edgellm.export.draft_vocab import DraftVocabConfig
from edgellm.options import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DRAFT_BLOCK_SIZE,
    DEFAULT_DRAFT_QUANT,
    DEFAULT_DRAFT_VOCAB,
    DEFAULT_MAX_CONTEXT,
    DEFAULT_MAX_TARGET_KL,
    DEFAULT_NPU_WINDOW,
    DEFAULT_QUALITY,
    DEFAULT_QUANT,
    NPU_QUANTS,
    QUALITY_LEVELS,
    TARGET_DEVICES,
)


@dataclass(frozen=True)
class ExportOptions:
    """The options of :func:`edgellm.export.export` (same names, same meanings), plus ``has_draft``.

    After construction: ``quant``, ``draft_quant`` and ``lm_head_quant`` are what the graphs store
    (npu: fp32; gpu: ``auto`` is int4), ``npu_draft_quant`` is set for npu exports,
    ``calibration`` is ``(name, text)`` of ``calibration_text``, ``vocab`` the draft's LM head
    plan, ``activations`` fp32 or fp16, ``adapters`` / ``draft_adapters`` the parsed ``lora`` /
    ``draft_lora`` (``{name: folder}``).

    Raises:
        ConfigError: a bad value or combination, naming it and what is allowed.
    """

    quant: str = DEFAULT_QUANT
    draft_quant: str = DEFAULT_DRAFT_QUANT
    block_size: int = DEFAULT_BLOCK_SIZE
    draft_block_size: int = DEFAULT_DRAFT_BLOCK_SIZE
    lm_head_quant: str | None = None
    draft_lm_head_quant: str | None = None
    max_context: int = DEFAULT_MAX_CONTEXT
    quality: str = DEFAULT_QUALITY
    max_target_kl: float = DEFAULT_MAX_TARGET_KL
    trust_remote_code: bool = False
    ort_mobile: bool = False
    target_device: str = "cpu"
    npu_window: int = DEFAULT_NPU_WINDOW
    npu_quant: str = "fp32"
    npu_draft_quant: str | None = None
    calibration_text: str | os.PathLike | None = None
    draft_vocab: int | None = None
    draft_vocab_corpus: str | os.PathLike | None = None
    lora: Any = None
    draft_lora: Any = None
    has_draft: bool = False
    calibration: tuple[str, str] | None = field(default=None, init=False)
    vocab: DraftVocabConfig = field(default=DraftVocabConfig(0), init=False)
    activations: str = field(default="fp32", init=False)
    adapters: dict[str, Path] = field(default_factory=dict, init=False)
    draft_adapters: dict[str, Path] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        self._check_general()
        if self.target_device == "npu":
            self._resolve_npu()
        self._check_quants()
        self._check_npu_extras()
        self._resolve_draft_vocab()
        if self.target_device == "gpu":
            self._resolve_gpu()

    def _set(self, **values: Any) -> None:
        for k, v in values.items():
            object.__setattr__(self, k, v)

    def _check_general(self) -> None:
        from edgellm.export.lora import parse_lora_args
        from edgellm.manifest import MAX_CONTEXT

        self._set(adapters=parse_lora_args(self.lora), draft_adapters=parse_lora_args(self.draft_lora))
        check_draft_lora(self.draft_adapters, self.adapters, self.has_draft)
        if self.draft_lm_head_quant is not None and not self.has_draft:
            raise ConfigError(f"draft_lm_head_quant={self.draft_lm_head_quant!r} without a draft; add --draft or "
                              "leave --draft-lm-head-quant out", param="draft_lm_head_quant")
        if self.adapters and (self.target_device == "npu" or self.ort_mobile):
            raise ConfigError(f"lora with {'target_device=npu' if self.target_device == 'npu' else 'ort_mobile'}: "
                              "LoRA branches are in the cpu and gpu graphs only; leave that option out", param="lora")
        if self.quality not in QUALITY_LEVELS:
            raise ConfigError(f"quality={self.quality!r}; allowed: {', '.join(QUALITY_LEVELS)}")
        m = self.max_context
        if not isinstance(m, int) or isinstance(m, bool) or not 64 <= m <= MAX_CONTEXT:
            raise ConfigError(f"max_context={m!r}; allowed: an integer 64-{MAX_CONTEXT}", param="max_context")
        if self.target_device not in TARGET_DEVICES:
            raise ConfigError(f"target_device={self.target_device!r}; allowed: {', '.join(TARGET_DEVICES)}")

    def _resolve_npu(self) -> None:
        if self.quant not in ("auto", "fp32") or self.draft_quant not in ("int4", "fp32"):
            raise ConfigError(f"quant={self.quant!r} with target_device='npu': npu graphs take their precision from "
                              "npu_quant (--npu-quant fp32 or qdq); leave --quant at auto")
        if not 1 <= self.npu_window <= 64:
            raise ConfigError(f"npu_window={self.npu_window}; allowed: 1-64")
        self._set(npu_draft_quant=self.npu_draft_quant or self.npu_quant)
        for name, value in (("npu_quant", self.npu_quant), ("npu_draft_quant", self.npu_draft_quant)):
            if value not in NPU_QUANTS:
                raise ConfigError(f"{name}={value!r}; allowed: {', '.join(NPU_QUANTS)}")
        self._set(quant="fp32", draft_quant="fp32", lm_head_quant=None, draft_lm_head_quant=None)

    def _check_quants(self) -> None:
        from edgellm.export.builder import QuantConfig

        for name, value in (("quant", self.quant), ("draft_quant", self.draft_quant)):  # fail before any work
            if value != "auto":
                QuantConfig(value, self.block_size if name == "quant" else self.draft_block_size,
                            lm_head_quant=self.lm_head_quant if name == "quant" else self.draft_lm_head_quant)

    def _check_npu_extras(self) -> None:
        npu = self.target_device == "npu"
        if not npu and (self.npu_quant != "fp32" or self.npu_draft_quant is not None):
            raise ConfigError(f"npu_quant={self.npu_quant!r} / npu_draft_quant={self.npu_draft_quant!r} quantize npu "
                              f"graphs; target_device={self.target_device!r} does not write any (add --target-device npu)")
        if self.calibration_text is not None:
            if not npu or {self.npu_quant, self.npu_draft_quant or self.npu_quant} == {"fp32"}:
                raise ConfigError("calibration_text is read by QDQ quantization only; add --target-device npu "
                                  "--npu-quant qdq (or qdq-w4)")
            self._set(calibration=read_calibration_text(self.calibration_text))

    def _resolve_draft_vocab(self) -> None:
        npu = self.target_device == "npu"
        if self.draft_vocab not in (None, 0) and npu:
            raise ConfigError(f"draft_vocab={self.draft_vocab!r} with target_device='npu': static npu graphs keep the "
                              "whole vocabulary; leave --draft-vocab out", param="draft_vocab")
        size = 0 if npu else DEFAULT_DRAFT_VOCAB if self.draft_vocab is None else self.draft_vocab
        corpus = None if self.draft_vocab_corpus is None else str(self.draft_vocab_corpus)
        self._set(vocab=DraftVocabConfig(size, corpus))

    def _resolve_gpu(self) -> None:
        # GGUF blocks need fp32 arithmetic (the K-quant minimum): auto means int4 here
        self._set(activations="fp16", quant="int4" if self.quant == "auto" else self.quant,
                  draft_quant="int4" if self.draft_quant == "auto" else self.draft_quant)
        for name, value in (("quant", self.quant), ("draft_quant", self.draft_quant),
                            ("lm_head_quant", self.lm_head_quant), ("draft_lm_head_quant", self.draft_lm_head_quant)):
            if value in ("fp32", "gguf"):
                raise ConfigError(f"{name}={value!r} with target_device='gpu' (fp16 graphs); allowed: int4, int8, fp16")

    # ------------------------------------------------------------------ per role
    def quant_plan(self, role: str) -> dict[str, Any]:
        """Keyword arguments of the role's :class:`~edgellm.export.builder.QuantConfig` (``auto`` still
        open: it depends on the source, see ``_quant_config``)."""
        if role == "target":
            return dict(quant=self.quant, block_size=self.block_size, lm_head_quant=self.lm_head_quant,
                        activations=self.activations)
        return dict(quant=self.draft_quant, block_size=self.draft_block_size, lm_head_quant=self.draft_lm_head_quant,
                    activations=self.activations)

    @property
    def static_window(self) -> int | None:
        """Tokens per call of the npu graphs, or ``None`` for dynamic (cpu/gpu) graphs."""
        return self.npu_window if self.target_device == "npu" else None

    def npu_quant_of(self, role: str) -> str:
        return self.npu_quant if role == "target" else (self.npu_draft_quant or self.npu_quant)

    def lora_of(self, role: str) -> dict[str, Path]:
        return self.adapters if role == "target" else self.draft_adapters


def check_draft_lora(draft_adapters: dict, adapters: dict, has_draft: bool) -> None:
    """A draft adapter needs a draft model and a target adapter of the same name."""
    if draft_adapters and not has_draft:
        raise ConfigError("draft_lora without a draft model; add --draft, or leave --draft-lora out", param="draft_lora")
    stray = sorted(set(draft_adapters) - set(adapters))
    if stray:
        raise ConfigError(f"draft_lora names {stray[0]!r}, which is not an adapter of the target; a draft adapter "
                          "goes with the target adapter of the same name (give it with --lora too)", param="draft_lora")


def read_calibration_text(path: str | os.PathLike) -> tuple[str, str]:
    """``(name, text)`` of a calibration text file, or a ConfigError naming what is wrong with it."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"calibration_text {str(p)!r}: cannot read it as UTF-8 text ({e})") from None
    if len(text.strip()) < 200:
        raise ConfigError(f"calibration_text {str(p)!r} holds {len(text.strip())} characters; give at least 200 "
                          "(a few hundred tokens of text like the model's inputs)")
    return p.name, text
