"""Prompts -> T5 token ids and attention mask, as the official pipeline makes them (DESIGN §7).

The official pipeline calls ``AutoTokenizer.from_pretrained("google/flan-t5-xl")``, which
is the *fast* tokenizer: the Rust ``tokenizers`` library running the folder's
``tokenizer.json`` (normalizer, whitespace pre-tokenizer, Unigram model, ``$A </s>``
post-processor). This module runs that same file through that same library, so the
ids are the official ones by construction, with no PyTorch and no ``transformers``.
(``spiece.model`` through ``sentencepiece`` was the alternative; it is a different
implementation whose whitespace handling the fast tokenizer re-creates only
approximately, so agreement would have to be tested case by case rather than inherited.)

Call settings as the official ones: ``padding="max_length"``, ``max_length=512``,
``truncation=True``: at most ``max_length - 1`` tokens, then ``</s>``, then pad ids;
the mask is 1 on tokens and ``</s>``.
"""

from __future__ import annotations

import json
import os
import threading
from typing import Sequence

import numpy as np
import tokenizers

from pixelflow_jax.errors import CheckpointError, UserError

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_LENGTH = 512


def _pad_token(folder: str) -> str:
    """The pad token's text: from tokenizer_config.json or special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                token = json.load(f).get("pad_token")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise CheckpointError(f"{path}: unreadable ({e})") from None
        if isinstance(token, dict):  # older files store an AddedToken as a dict
            token = token.get("content")
        if isinstance(token, str):
            return token
    return "<pad>"  # T5's


def check_prompts(prompts: Sequence[str]) -> list[str]:
    """``prompts`` as a list of strings; a bare string is refused (it is not a list)."""
    if isinstance(prompts, (str, bytes)):
        raise UserError("prompts must be a list of strings, not a single string")
    prompts = list(prompts)
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise UserError(f"prompts must be strings, got {', '.join(sorted(set(bad)))}")
    return prompts


class PromptTokenizer:
    """T5 tokenization of a list of prompts into fixed-length id and mask arrays."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, pad_token: str = "<pad>",
                 source: str = "tokenizer"):
        pad_id = tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise CheckpointError(f"{source}: the pad token {pad_token!r} is not in the "
                                  "vocabulary")
        self._tokenizer, self.pad_token, self.pad_id = tokenizer, pad_token, pad_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._lock = threading.Lock()  # truncation and padding are tokenizer state

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "PromptTokenizer":
        """Read ``folder/tokenizer.json`` (and the pad token from ``tokenizer_config.json``)."""
        folder = os.fspath(folder)
        path = os.path.join(folder, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{folder} has no {TOKENIZER_FILE}: the official pipeline uses the fast "
                "tokenizer it defines (download the whole Hugging Face folder, e.g. "
                "google/flan-t5-xl)")
        try:
            tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the Rust parser raises a bare Exception
            raise CheckpointError(f"{path}: not a tokenizers file ({e})") from None
        return cls(tokenizer, _pad_token(folder), source=path)

    def __call__(self, prompts: Sequence[str],
                 max_length: int = DEFAULT_MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and attention mask, both int32 [len(prompts), max_length]."""
        prompts = check_prompts(prompts)
        if type(max_length) is not int or max_length < 2:
            raise UserError(f"max_length must be an integer >= 2 (a token and </s>), "
                            f"got {max_length!r}")
        if not prompts:
            empty = np.zeros((0, max_length), np.int32)
            return empty, empty.copy()
        with self._lock:
            # The settings transformers passes for padding="max_length", truncation=True.
            self._tokenizer.enable_truncation(max_length, stride=0, strategy="longest_first",
                                              direction="right")
            self._tokenizer.enable_padding(direction="right", pad_id=self.pad_id,
                                           pad_type_id=0, pad_token=self.pad_token,
                                           length=max_length)
            encodings = self._tokenizer.encode_batch(prompts, add_special_tokens=True)
        ids = np.array([e.ids for e in encodings], np.int32)
        mask = np.array([e.attention_mask for e in encodings], np.int32)
        return ids, mask
