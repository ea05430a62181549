"""pixelflow_jax.tokenizer against the Hugging Face T5 tokenizer the official pipeline uses
(``AutoTokenizer``, the fast tokenizer), and against sentencepiece itself (DESIGN §7).

The vocabulary is a tiny sentencepiece model trained here on a multilingual corpus, with
T5's special ids (pad 0, eos 1, unk 2), saved as a Hugging Face folder by transformers.
"""

from __future__ import annotations

import io
import os
import random

import numpy as np
import pytest
import sentencepiece as spm
from transformers import AutoTokenizer, T5Tokenizer

from pixelflow_jax.errors import CheckpointError, UserError
from pixelflow_jax.tokenizer import PromptTokenizer

WORDS = ("a photo of an astronaut riding horse on mars oil painting the quick brown fox jumps "
         "over lazy dog sunset mountain river city night light portrait cat sitting mat "
         "watercolor forest castle dragon flower garden ocean wave cloud snow winter summer "
         "Hund läuft über Straße Übermaß café crème naïve façade été côté à garçon Ålesund "
         "smörgåsbord ñandú jalapeño São Paulo Kraków Zürich Ægir fjørd "
         "猫 坐 在 垫子 上 东京 夜景 山 川 ネオン 光 の 桜 서울 바다 "
         "съешь ещё этих мягких французских булок Ελλάδα θάλασσα "
         "🐴 🚀 🌸 🐱").split()
LONG = " ".join(WORDS) * 6  # far beyond 512 tokens
CASES = [
    "", "a cat", "   leading spaces", "trailing spaces   ", "repeated    spaces  inside",
    "line\nbreak\n\nand more", "tab\there\t\tand there", "non\u00a0breaking\u00a0space",
    "café crème naïve Ålesund Übermaß", "一只猫坐在垫子上。东京の夜景 서울",
    "🐴🚀 riding 🌸", " \t\n ", "unknown ☃ ∰ chars", "ＦＵＬＬ ｗｉｄｔｈ", LONG,
]
# Added (special) tokens written as text: the fast tokenizer matches them as tokens,
# sentencepiece does not, so these are checked against transformers only.
SPECIAL_CASES = ["literal </s> inside", "a sentinel <extra_id_1> here"]


def train_spiece(path: str, vocab_size: int = 300) -> str:
    """A tiny T5-style sentencepiece model (pad 0, eos 1, unk 2, no bos) at ``path``."""
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
              for _ in range(400)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    with open(path, "wb") as f:
        f.write(model.getvalue())
    return path


def make_tokenizer_folder(root: str) -> str:
    """``root/tokenizer``: tokenizer.json + tokenizer_config.json written by transformers."""
    sp_dir = os.path.join(root, "spiece")
    os.makedirs(sp_dir)
    train_spiece(os.path.join(sp_dir, "spiece.model"))
    folder = os.path.join(root, "tokenizer")
    T5Tokenizer.from_pretrained(sp_dir, extra_ids=3).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tokenizer_folder(str(tmp_path_factory.mktemp("tok")))


def official(folder: str, prompts: list[str], max_length: int):
    """The official call (pipeline_pixelflow.py), through transformers."""
    out = AutoTokenizer.from_pretrained(folder)(
        prompts, padding="max_length", max_length=max_length, truncation=True,
        return_tensors="np")
    return out["input_ids"], out["attention_mask"]


@pytest.mark.parametrize("max_length", [512, 24])
def test_ids_and_mask_match_transformers(folder, max_length):
    prompts = CASES + SPECIAL_CASES
    ids, mask = PromptTokenizer.from_folder(folder)(prompts, max_length)
    want_ids, want_mask = official(folder, prompts, max_length)
    assert ids.shape == mask.shape == (len(prompts), max_length)
    assert ids.dtype == mask.dtype == np.int32
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_array_equal(mask, want_mask)
    # The cases do reach the truncation at both lengths.
    assert mask[CASES.index(LONG)].all()


def test_ids_match_sentencepiece(folder):
    """A second, independent oracle: sentencepiece's own encoding + </s>, pads after."""
    sp = spm.SentencePieceProcessor(
        model_file=os.path.join(os.path.dirname(folder), "spiece", "spiece.model"))
    ids, mask = PromptTokenizer.from_folder(folder)(CASES)
    for prompt, row, m in zip(CASES, ids, mask):
        want = sp.encode(prompt)[:511] + [1]
        assert list(row[:len(want)]) == want, prompt
        assert not row[len(want):].any() and m.sum() == len(want), prompt
    assert len(sp.encode(LONG)) > 512  # truncated to 511 + </s>
    assert ids[CASES.index("")].tolist()[:2] == [1, 0]  # the negative prompt: </s>, pads


def test_bad_input(folder, tmp_path):
    tok = PromptTokenizer.from_folder(folder)
    with pytest.raises(UserError, match="list of strings"):
        tok("a cat")
    with pytest.raises(UserError, match="must be strings"):
        tok(["a cat", 3])
    with pytest.raises(UserError, match="max_length"):
        tok(["a cat"], 1)
    assert tok([], 8)[0].shape == (0, 8)
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        PromptTokenizer.from_folder(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a tokenizers file"):
        PromptTokenizer.from_folder(tmp_path)
