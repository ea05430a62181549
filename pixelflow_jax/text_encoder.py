"""Prompts -> T5 features for PixelFlow's cross-attention, each prompt encoded once (DESIGN §7).

:class:`TextEncoder` joins the tokenizer (``tokenizer.py``), the encoder (``t5.py``)
and the Hugging Face folder reader (``hf_weights.py``), and adds two savings:

- **Bucketed length.** The official pipeline pads every prompt to 512 tokens. T5
  masks padded keys with float32's most negative value, so a real token's features do
  not depend on how many pads follow; PixelFlow masks the padded positions of the
  context with the bias ``(1 - m) * -10000``, so what sits there does not reach the
  image either. The sequence is therefore cut to the longest prompt of the batch,
  rounded up to one of :data:`BUCKETS`, so that a new prompt recompiles nothing: one
  encoder program per (batch rows, bucket), and the sampler one per bucket.
- **Cache.** Each distinct prompt's features are kept (real tokens only, within a
  memory budget, least recently used dropped first); the empty prompt, the negative
  prompt of every guided sample, is kept for the life of the encoder.

Returned features are float32 and exactly zero at padded positions (T5 itself writes
non-zero values there, which every consumer masks out); the mask is 1 on tokens and
``</s>``, 0 on padding.
"""

from __future__ import annotations

import collections
import os
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pixelflow_jax.errors import CheckpointError
from pixelflow_jax.hf_weights import load_t5_encoder, read_t5_config
from pixelflow_jax.t5 import T5Encoder
from pixelflow_jax.tokenizer import DEFAULT_MAX_LENGTH, PromptTokenizer, check_prompts

BUCKETS = (16, 32, 64, 128, 256, 512)
MAX_BATCH = 8  # encoder rows per call: batches are padded to 1, 2, 4 or 8 rows


def bucket_length(num_tokens: int, max_length: int = DEFAULT_MAX_LENGTH) -> int:
    """The smallest bucket holding ``num_tokens`` tokens, never above ``max_length``."""
    return next((b for b in BUCKETS if num_tokens <= b < max_length), max_length)


def _batch_rows(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


class TextEncoder:
    """T5 tokenizer + encoder with bucketed lengths and a per-prompt cache.

    Args:
      encoder: the T5 encoder (float32 for parity with the official pipeline).
      tokenizer: its tokenizer.
      cache_bytes: memory budget of the prompt cache (features of real tokens).
    """

    def __init__(self, encoder: T5Encoder, tokenizer: PromptTokenizer, *,
                 cache_bytes: int = 256 * 2 ** 20):
        vocab = encoder.config.vocab_size
        if tokenizer.vocab_size > vocab:
            raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the "
                                  f"encoder's table only {vocab} rows")
        self.encoder, self.tokenizer = encoder, tokenizer
        self.d_model = encoder.config.d_model
        graphdef, self._state = nnx.split(encoder)
        # The parameters are an argument, not constants baked into each program.
        self._forward = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
        self._cache: collections.OrderedDict[tuple[str, int], np.ndarray] = \
            collections.OrderedDict()
        self._pinned: dict[tuple[str, int], np.ndarray] = {}
        self._cache_bytes, self._cache_budget = 0, cache_bytes
        self._lock = threading.Lock()
        self.encoded_rows = 0  # prompts run through T5 so far (the cache's misses)

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, dtype: Any = jnp.float32,
                    **kwargs) -> "TextEncoder":
        """Load a Hugging Face T5 folder as downloaded (e.g. ``google/flan-t5-xl``):
        ``config.json``, ``tokenizer.json`` and the weights (see ``hf_weights``)."""
        config = read_t5_config(folder)
        tokenizer = PromptTokenizer.from_folder(folder)  # before the slow part
        return cls(load_t5_encoder(folder, dtype=dtype, config=config), tokenizer, **kwargs)

    @property
    def num_compilations(self) -> int:
        """Encoder programs compiled so far: one per (batch rows, bucket) met."""
        return self._forward._cache_size()

    def encode(self, prompts: Sequence[str], max_length: int = DEFAULT_MAX_LENGTH
               ) -> tuple[np.ndarray, np.ndarray]:
        """Features float32 [N, L, d_model] and mask int32 [N, L] of ``prompts``.

        L is the bucketed length of the longest prompt (after truncation to
        ``max_length``); features at masked positions are zero.
        """
        prompts = check_prompts(prompts)
        keys = [(p, max_length) for p in prompts]
        with self._lock:
            found = {k: v for k in dict.fromkeys(keys) if (v := self._get(k)) is not None}
            found.update(self._encode_missing([k for k in dict.fromkeys(keys)
                                               if k not in found], max_length))
        rows = [found[k] for k in keys]
        length = bucket_length(max((len(r) for r in rows), default=1), max_length)
        features = np.zeros((len(rows), length, self.d_model), np.float32)
        mask = np.zeros((len(rows), length), np.int32)
        for i, r in enumerate(rows):
            features[i, :len(r)] = r
            mask[i, :len(r)] = 1
        return features, mask

    def _get(self, key: tuple[str, int]) -> np.ndarray | None:
        if key in self._pinned:
            return self._pinned[key]
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        return None

    def _put(self, key: tuple[str, int], value: np.ndarray) -> None:
        if key[0] == "":
            self._pinned[key] = value
            return
        self._cache[key] = value
        self._cache_bytes += value.nbytes
        while self._cache_bytes > self._cache_budget and len(self._cache) > 1:
            self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes

    def _encode_missing(self, keys: list[tuple[str, int]],
                        max_length: int) -> dict[tuple[str, int], np.ndarray]:
        done: dict[tuple[str, int], np.ndarray] = {}
        if not keys:
            return done
        ids, mask = self.tokenizer([p for p, _ in keys], max_length)
        lengths = mask.sum(axis=1)
        order = np.argsort(lengths, kind="stable")  # similar lengths share a bucket
        for start in range(0, len(order), MAX_BATCH):
            rows = order[start:start + MAX_BATCH]
            length = bucket_length(int(lengths[rows].max()), max_length)
            # Pad the batch with copies of its first row (never an all-masked row).
            take = np.concatenate([rows, np.full(_batch_rows(len(rows)) - len(rows), rows[0])])
            out = self._forward(self._state, jnp.asarray(ids[take, :length]),
                                jnp.asarray(mask[take, :length]))
            out = np.asarray(out)
            for j, r in enumerate(rows):
                done[keys[r]] = out[j, :lengths[r]].copy()
                self._put(keys[r], done[keys[r]])
            self.encoded_rows += len(rows)
        return done
