"""Draft/target tokenizer pairs: padding of the logits is fine, anything that changes ids is refused by name."""

from __future__ import annotations

import json

import pytest

from edgellm.errors import IncompatibleModelsError
from edgellm.export.tokenizer import TokenizerFiles, check_compatible


@pytest.fixture(scope="module")
def tokenizer_json():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def foo(x): return x + 1\n" * 40, "hello world " * 30], trainer)
    return tok.to_str()


def _files(tj: str) -> TokenizerFiles:
    return TokenizerFiles(tj, None, [1], None, len(json.loads(tj)["model"]["vocab"]))


def _edited(tj: str, edit) -> str:
    d = json.loads(tj)
    edit(d)
    return json.dumps(d)


def test_same_tokenizer_with_padded_logits_is_accepted(tokenizer_json):
    t = _files(tokenizer_json)
    check_compatible(t, _files(tokenizer_json), t.vocab_size + 64, t.vocab_size + 128)  # Qwen pads per size


@pytest.mark.parametrize("edit,match", [
    (lambda d: d["model"]["merges"].reverse(), r"merges differ from rule 0 on"),
    (lambda d: d["added_tokens"][1].update(special=False), r"added token 1 is \('<\|im_end\|>', True\) in the target"),
    (lambda d: d["model"]["vocab"].update({"zz-new": 299}), r"token 'zz-new' is id None in the target, 299"),
    (lambda d: d.update(normalizer={"type": "NFC"}), r"their normalizers differ"),
])
def test_what_changes_ids_is_named(tokenizer_json, edit, match):
    with pytest.raises(IncompatibleModelsError, match=match):
        check_compatible(_files(tokenizer_json), _files(_edited(tokenizer_json, edit)), 400, 400)


def test_logits_narrower_than_the_vocabulary_are_refused(tokenizer_json):
    t = _files(tokenizer_json)
    with pytest.raises(IncompatibleModelsError, match="draft logits width 10"):
        check_compatible(t, t, t.vocab_size, 10)
