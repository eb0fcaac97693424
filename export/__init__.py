"""edgellm.export: turn a target (and a draft) model into one self-describing bundle.

:func:`export` (:mod:`edgellm.export.pipeline`) writes a bundle; :func:`add_lora`
(:mod:`edgellm.export.adapters`) adds LoRA adapters to one, :func:`add_batch_graph` a
batch graph to one exported before they existed. The only part of edgellm that may
import torch / transformers, and only inside functions.
"""

from __future__ import annotations

from edgellm.export.adapters import add_batch_graph, add_lora
from edgellm.export.output import PARTIAL_OWNER
from edgellm.export.pipeline import export
from edgellm.options import DEFAULT_DRAFT_QUANT, DEFAULT_QUANT

__all__ = ["export", "add_lora", "add_batch_graph", "PARTIAL_OWNER", "DEFAULT_QUANT", "DEFAULT_DRAFT_QUANT"]
