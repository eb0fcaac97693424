"""Tokenizer for the bundle: one ``tokenizer.json`` (Hugging Face ``tokenizers``) + chat template.

Hugging Face folders go through ``AutoTokenizer`` (no remote code). GGUF files go through
transformers' GGUF converter, which is lossy for Qwen (see ../shared/NOTES.md): it registers only
three special tokens and sets eos to ``<|endoftext|>``. We re-register every CONTROL (type 3)
and USER_DEFINED (type 4) token of the GGUF vocabulary at its own id and take eos from the GGUF.
Phi-3 files go through transformers' Llama converter (:data:`GGUF_TOKENIZER_AS`), and every
converted GGUF tokenizer must give back a sample text unchanged, or the export stops.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm.errors import ExportError, IncompatibleModelsError
from edgellm.export.gguf_source import GGUFSource
from edgellm.export.source import Source

logger = logging.getLogger(__name__)

GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4

#: GGUF architectures whose tokenizer is converted with another architecture's converter:
#: transformers' Phi-3 converter hard-codes Phi-3's special tokens and drops the byte fallback
#: (and would mangle Phi-4-mini's byte-level vocabulary); its Llama converter reads both kinds,
#: and the file's own control tokens are restored after (:func:`_restore_gguf_added_tokens`).
GGUF_TOKENIZER_AS = {"phi3": "llama"}

#: what a converted GGUF tokenizer must encode and decode back unchanged: code, accents, emoji
ROUNDTRIP_SAMPLE = "def foo(x):\n    return x + 1  # héllo wörld 😀\n\tprint('a  b')"


@dataclass
class TokenizerFiles:
    """What the bundle stores about the tokenizer."""

    tokenizer_json: str
    chat_template: str | None
    eos_token_ids: list[int]
    bos_token_id: int | None
    vocab_size: int

    @property
    def fingerprint(self) -> str:
        """Hash of what decides token ids: vocab, merges, added tokens, normalizer, pre-tokenizer."""
        tj = json.loads(self.tokenizer_json)
        key = {
            "model": tj.get("model"),
            "added": sorted((t["id"], t["content"], bool(t.get("special"))) for t in tj.get("added_tokens", [])),
            "normalizer": tj.get("normalizer"),
            "pre_tokenizer": tj.get("pre_tokenizer"),
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def tokenizer_files(src: Source, *, trust_remote_code: bool = False) -> TokenizerFiles:
    """Produce the bundle tokenizer of ``src``."""
    from transformers import AutoTokenizer

    try:
        if isinstance(src, GGUFSource) and src.fields.get("general.architecture") in GGUF_TOKENIZER_AS:
            tok = _gguf_tokenizer_as(src, GGUF_TOKENIZER_AS[src.fields["general.architecture"]])
        elif isinstance(src, GGUFSource):
            tok = AutoTokenizer.from_pretrained(str(src.path.parent), gguf_file=src.path.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(src.path), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise ExportError(f"{src.path}: could not load its tokenizer ({type(e).__name__}: {e})") from e
    if not getattr(tok, "is_fast", False):
        raise ExportError(f"{src.path}: only fast (tokenizer.json) tokenizers are supported")
    backend = tok.backend_tokenizer
    eos = _eos_ids(src, tok)
    if isinstance(src, GGUFSource):
        _restore_gguf_added_tokens(src, backend)
        _check_roundtrip(src, backend)
    return TokenizerFiles(
        tokenizer_json=backend.to_str(),
        chat_template=_chat_template(src, tok),
        eos_token_ids=eos,
        bos_token_id=_bos_id(src, tok),
        vocab_size=backend.get_vocab_size(with_added_tokens=True),
    )


def _gguf_tokenizer_as(src: GGUFSource, arch: str):
    """The GGUF file's tokenizer converted by transformers' converter for ``arch``."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.ggml import convert_gguf_tokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    param = load_gguf_checkpoint(str(src.path), return_tensors=False)
    backend, extra = convert_gguf_tokenizer(arch, param["tokenizer"])
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**param["tokenizer_config"], **extra})


def _check_roundtrip(src: GGUFSource, backend: Any) -> None:
    """A converted GGUF tokenizer must decode what it encodes back to the same text; a converter that
    does not fit the file (another tokenizer kind than it expects) gives another text, and every
    prompt would reach the model as other tokens."""
    got = backend.decode(backend.encode(ROUNDTRIP_SAMPLE, add_special_tokens=False).ids, skip_special_tokens=False)
    if got != ROUNDTRIP_SAMPLE:
        arch = src.fields.get("general.architecture")
        kind = src.fields.get("tokenizer.ggml.model")
        raise ExportError(f"{src.path}: its tokenizer ({kind!r}, architecture {arch!r}) does not convert faithfully: "
                          f"{ROUNDTRIP_SAMPLE!r} comes back as {got!r}; not exported (please report the file)")


def _restore_gguf_added_tokens(src: GGUFSource, backend: Any) -> None:
    from tokenizers import AddedToken

    r = src.reader
    tokens_field, types_field = r.fields["tokenizer.ggml.tokens"], r.fields["tokenizer.ggml.token_type"]
    added = []
    for idx, data_idx in enumerate(types_field.data):
        ttype = int(types_field.parts[data_idx][0])
        if ttype in (GGUF_CONTROL, GGUF_USER_DEFINED):
            text = bytes(tokens_field.parts[tokens_field.data[idx]]).decode("utf-8")
            if ttype == GGUF_USER_DEFINED and " " in text and backend.token_to_id(text.replace(" ", "\u2581")) == idx:
                continue  # SentencePiece vocabularies (Gemma) keep whitespace runs as ordinary "▁" pieces
            if backend.token_to_id(text) != idx:
                raise ExportError(f"{src.path}: GGUF token {idx} {text!r} is not at its id in the converted vocabulary")
            added.append(AddedToken(text, special=ttype == GGUF_CONTROL, normalized=False))
    backend.add_tokens(added)


def _eos_ids(src: Source, tok: Any) -> list[int]:
    ids: list[int] = []
    if isinstance(src, GGUFSource):
        eos = src.fields.get("tokenizer.ggml.eos_token_id")
        if eos is not None:
            ids.append(int(eos))
        # Chat models stop on <|im_end|> and base text on <|endoftext|>, as upstream Qwen does.
        for text in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>"):
            i = tok.backend_tokenizer.token_to_id(text)
            if i is not None and i not in ids:
                ids.append(i)
    else:  # a Hugging Face folder, native or generic
        gen = src.path / "generation_config.json"
        if gen.is_file():
            e = json.loads(gen.read_text()).get("eos_token_id")
            ids.extend(e if isinstance(e, list) else [e] if e is not None else [])
        if tok.eos_token_id is not None and tok.eos_token_id not in ids:
            ids.append(tok.eos_token_id)
    return [int(i) for i in ids]


def _bos_id(src: Source, tok: Any) -> int | None:
    if isinstance(src, GGUFSource):
        if not src.fields.get("tokenizer.ggml.add_bos_token"):
            return None
        bos = src.fields.get("tokenizer.ggml.bos_token_id")
        return int(bos) if bos is not None else None
    return None  # HF tokenizers add bos themselves through their post-processor


def _chat_template(src: Source, tok: Any) -> str | None:
    if isinstance(src, GGUFSource):
        return src.fields.get("tokenizer.chat_template") or tok.chat_template
    tmpl = tok.chat_template
    return tmpl if isinstance(tmpl, str) else None


def check_compatible(target: TokenizerFiles, draft: TokenizerFiles, target_width: int, draft_width: int) -> None:
    """Refuse a draft whose token ids do not mean what the target's mean.

    Logits widths may differ (Qwen pads its vocabulary differently per size), as long as both
    cover the tokenizer; the runtime compares only the first ``vocab_size`` logits.

    Raises:
        IncompatibleModelsError: different tokenizers, or a logits width below the vocabulary.
    """
    if target.fingerprint != draft.fingerprint:
        raise IncompatibleModelsError(
            "the draft's tokenizer differs from the target's (" + tokenizer_difference(target, draft) + "); "
            "speculative decoding needs the same tokenizer — pick a draft of the same model family"
        )
    for role, width in (("target", target_width), ("draft", draft_width)):
        if width < target.vocab_size:
            raise IncompatibleModelsError(
                f"{role} logits width {width} is smaller than the tokenizer's {target.vocab_size} tokens"
            )


def tokenizer_difference(target: TokenizerFiles, draft: TokenizerFiles) -> str:
    """The first thing that makes two tokenizers give different ids, in words (target first)."""
    t, d = json.loads(target.tokenizer_json), json.loads(draft.tokenizer_json)
    tm, dm = t.get("model") or {}, d.get("model") or {}
    if tm.get("type") != dm.get("type"):
        return f"model types {tm.get('type')!r} (target) vs {dm.get('type')!r} (draft)"
    tv, dv = tm.get("vocab", {}), dm.get("vocab", {})
    if isinstance(tv, list):  # Unigram: [piece, score] pairs
        tv, dv = {p[0]: i for i, p in enumerate(tv)}, {p[0]: i for i, p in enumerate(dv)}
    diff = next((k for k in tv if dv.get(k) != tv[k]), None) or next((k for k in dv if k not in tv), None)
    if diff is not None:
        return (f"vocab sizes {target.vocab_size} (target) vs {draft.vocab_size} (draft); token {diff!r} is id "
                f"{tv.get(diff)} in the target, {dv.get(diff)} in the draft")
    tmerges, dmerges = tm.get("merges") or [], dm.get("merges") or []
    if tmerges != dmerges:
        i = next((i for i, (a, b) in enumerate(zip(tmerges, dmerges)) if a != b), min(len(tmerges), len(dmerges)))
        return f"merges differ from rule {i} on ({len(tmerges)} rules in the target, {len(dmerges)} in the draft)"
    ta = {a["id"]: (a["content"], bool(a.get("special"))) for a in t.get("added_tokens", [])}
    da = {a["id"]: (a["content"], bool(a.get("special"))) for a in d.get("added_tokens", [])}
    i = next((i for i in sorted(set(ta) | set(da)) if ta.get(i) != da.get(i)), None)
    if i is not None:
        return f"added token {i} is {ta.get(i)} in the target, {da.get(i)} in the draft (content, special)"
    part = next(k for k in ("normalizer", "pre_tokenizer") if t.get(k) != d.get(k))
    return f"their {part}s differ"


def write_tokenizer(files: TokenizerFiles, folder: Path) -> dict[str, Any]:
    """Write ``tokenizer.json`` (+ ``chat_template.jinja``) into ``folder``; return the manifest part."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(files.tokenizer_json, encoding="utf-8")
    entry: dict[str, Any] = {
        "file": f"{folder.name}/tokenizer.json",
        "fingerprint": files.fingerprint,
        "vocab_size": files.vocab_size,
        "eos_token_ids": files.eos_token_ids,
        "bos_token_id": files.bos_token_id,
        "chat_template": None,
    }
    if files.chat_template:
        (folder / "chat_template.jinja").write_text(files.chat_template, encoding="utf-8")
        entry["chat_template"] = f"{folder.name}/chat_template.jinja"
    return entry
