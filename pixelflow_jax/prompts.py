"""Prompts for text-to-image runs: reading them, and the model inputs of a batch (DESIGN §7).

``sample.py --prompt`` / ``--prompts-file`` give a list of P prompts. Image i of a
run with ``--num-images n`` has prompt ``i // n`` (:class:`PromptBlocks`, a grid row
per prompt); image i of a FID run has prompt ``i mod P`` (:class:`PromptCycle`).
Images are labelled with prompt numbers, and :class:`PromptConditioning` turns the
numbers of a batch into the sampler's text inputs: every row gets its own prompt's
features and mask (the official pipeline misaligns masks when several prompts each
get several images), and the batch and the negative prompt share one bucketed length,
so the sampler compiles once per bucket, never per prompt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from pixelflow_jax.errors import UserError

if TYPE_CHECKING:
    from pixelflow_jax.text_encoder import TextEncoder

TEXT_ENCODER_FOLDER = "text_encoder"  # inside a checkpoint folder (written by the converter)
PROMPTS_FILE = "prompts.jsonl"


def read_prompts(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """The ``--prompt`` values, then the lines of ``--prompts-file``.

    The file is UTF-8 (a byte-order mark is dropped), one prompt per line; line ends
    (``\\n``, ``\\r\\n``) are removed, other characters kept as written, and lines that
    are empty or only whitespace are skipped. Raises UserError for an unreadable or
    non-UTF-8 file and for an empty list.
    """
    out = list(prompts or [])
    if prompts_file is not None:
        try:
            with open(prompts_file, "rb") as f:
                data = f.read()
        except OSError as e:
            raise UserError(f"--prompts-file {prompts_file}: cannot read it "
                            f"({e.strerror or e})") from None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise UserError(f"--prompts-file {prompts_file}: line {line} is not UTF-8 "
                            f"(byte 0x{data[e.start]:02x})") from None
        lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
        out += [line for line in lines if line.strip()]
    if not out:
        where = f"--prompts-file {prompts_file} holds no prompt" if prompts_file is not None \
            else "no prompt given"
        raise UserError(f"{where}: give --prompt TEXT or a --prompts-file with one prompt "
                        "per line")
    return out


def prompts_digest(prompts: Sequence[str]) -> str:
    """SHA-256 of a prompt list (``run.json`` records it: the prompts decide the images)."""
    return hashlib.sha256(json.dumps(list(prompts), ensure_ascii=False)
                          .encode("utf-8")).hexdigest()


def text_encoder_folder(ckpt: str, text_encoder: str | None) -> str:
    """``--text-encoder``, else the checkpoint's ``text_encoder/`` folder; UserError if
    neither exists."""
    if text_encoder is not None:
        if not os.path.isdir(text_encoder):
            raise UserError(f"--text-encoder {text_encoder}: no such folder")
        return text_encoder
    inside = os.path.join(ckpt, TEXT_ENCODER_FOLDER)
    if os.path.isdir(inside):
        return inside
    raise UserError(f"{ckpt} is a text-to-image model and has no {TEXT_ENCODER_FOLDER}/ "
                    "folder: give --text-encoder HF_T5_DIR (e.g. a download of "
                    "google/flan-t5-xl)")


@dataclasses.dataclass(frozen=True)
class PromptBlocks:
    """``per_prompt`` images of each prompt in turn: image i has prompt ``i // per_prompt``."""

    num_prompts: int
    per_prompt: int

    def __len__(self) -> int:
        return self.num_prompts * self.per_prompt

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(rows, np.int64) // self.per_prompt


@dataclasses.dataclass(frozen=True)
class PromptCycle:
    """A FID run over a prompt list: image i has prompt ``i mod num_prompts``."""

    num_images: int
    num_prompts: int

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray(rows, np.int64) % self.num_prompts


class PromptConditioning:
    """Prompt numbers of a batch -> the text keyword arguments of ``Sampler.sample``.

    Args:
      encoder: the run's :class:`~pixelflow_jax.text_encoder.TextEncoder` (its cache
        encodes each distinct prompt once).
      prompts: the run's prompts; labels index them.
      negative_prompt: the unconditional rows' prompt (official: ``""``).
      cross_attention_dim: the transformer's context width, checked against the encoder.
    """

    def __init__(self, encoder: TextEncoder, prompts: Sequence[str], negative_prompt: str = "",
                 cross_attention_dim: int | None = None):
        if cross_attention_dim is not None and encoder.d_model != cross_attention_dim:
            raise UserError(f"the text encoder gives {encoder.d_model}-wide features but the "
                            f"model's cross-attention takes {cross_attention_dim}: not the "
                            "encoder it was trained with")
        self.encoder, self.prompts = encoder, list(prompts)
        self.negative_prompt = negative_prompt

    def __call__(self, labels: np.ndarray) -> dict[str, Any]:
        """``context``/``context_mask`` [B, L, d]/[B, L] of prompts ``labels`` and the
        negative prompt's ``null_context``/``null_context_mask`` [1, L, d]/[1, L]."""
        texts = [self.prompts[k] for k in np.asarray(labels).tolist()]
        # One encode call pads the batch and the negative prompt to one bucket.
        features, mask = self.encoder.encode(texts + [self.negative_prompt])
        return dict(context=features[:-1], context_mask=mask[:-1],
                    null_context=features[-1:], null_context_mask=mask[-1:])


def write_prompt_records(folder: str, paths: Sequence[str], prompts: Sequence[str],
                         labels: Any) -> str:
    """``folder/prompts.jsonl``: one ``{"index", "prompt", "file"}`` line per image
    (``paths[i]`` its PNG, ``labels`` its prompt number), written atomically."""
    path = os.path.join(folder, PROMPTS_FILE)
    ks = np.asarray(labels[np.arange(len(paths))]).tolist()
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for i, (file, k) in enumerate(zip(paths, ks)):
            f.write(json.dumps({"index": i, "prompt": prompts[k],
                                "file": os.path.basename(file)}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
