"""Text side of the runtime: the bundle's tokenizer, chat template and streaming detokenizer."""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any, Sequence

from edgellm.errors import BundleError, ConfigError
from edgellm.manifest import Manifest


class TextTokenizer:
    """The bundle tokenizer (``tokenizers``) plus its chat template (rendered with jinja2)."""

    def __init__(self, bundle: Path, manifest: Manifest) -> None:
        from tokenizers import Tokenizer

        t = manifest.tokenizer
        try:
            self.tok = Tokenizer.from_file(str(bundle / t["file"]))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exceptions
            raise BundleError(f"{bundle / t['file']}: not a readable tokenizer.json ({e})") from e
        self.eos_token_ids = tuple(int(i) for i in t.get("eos_token_ids") or ())
        self.bos_token_id = t.get("bos_token_id")
        real = self.tok.get_vocab_size(with_added_tokens=True)
        self.vocab_size = int(t.get("vocab_size") or real)
        # the runtime reads the first vocab_size logits: a wrong size would change the output quietly
        if self.vocab_size != real:
            raise BundleError(f"tokenizer.vocab_size={self.vocab_size} in the manifest, but {t['file']} holds {real} "
                              "tokens; the bundle is inconsistent (re-export it)")
        bad = [i for i in (*self.eos_token_ids, self.bos_token_id) if i is not None and i >= real]
        if bad:
            raise BundleError(f"tokenizer: token ids {bad} (eos/bos) are past the vocabulary of {real} tokens")
        self.chat_template = None
        if t.get("chat_template"):
            path = bundle / t["chat_template"]
            try:
                self.chat_template = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise BundleError(f"{path}: not a readable chat template ({e})") from None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it: ~1 s for 1 MB of text,
        # which would stall a server's event loop); one text in, the same ids out
        ids = self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        if add_special_tokens and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [int(self.bos_token_id)] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True) -> str:
        """Render chat ``messages`` (``[{"role": ..., "content": ...}]``) into the prompt text."""
        _check_messages(messages)
        if not self.chat_template:
            raise ConfigError("this bundle has no chat template; pass a plain prompt string instead of messages")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise ConfigError(f"chat template: {msg}")

        from jinja2 import TemplateError

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=raise_exception,
                           strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
        try:
            return env.from_string(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
                bos_token="", eos_token="",
            )
        except TemplateError as e:  # a broken template in the bundle, not the caller's fault
            raise BundleError(f"the bundle's chat template cannot be rendered: {type(e).__name__}: {e}") from None


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ConfigError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"messages[{i}] = {m!r}; expected {{'role': str, 'content': str}}")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise ConfigError(f"messages[{i}].role = {m['role']!r}; allowed: system, user, assistant, tool")


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character.

    Byte-level BPE tokens can end in the middle of a multi-byte character; decoding then yields
    U+FFFD, so such text is held back until the following tokens complete it.
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # text already handed out

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        full = self.tokenizer.decode(self.ids)
        if full.endswith("\ufffd"):
            return ""
        piece = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return piece

    def flush(self) -> str:
        full = self.tokenizer.decode(self.ids)
        piece = full[len(self.text):] if full.startswith(self.text) else ""
        self.text = full
        return piece
