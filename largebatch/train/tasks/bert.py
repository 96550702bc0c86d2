"""``bert-mlm``: a small BERT pretrained by masked language modelling on Shakespeare.

The paper's headline experiment is BERT pretraining (masked LM + next-sentence prediction on
Wikipedia/BooksCorpus, sequence length 128 then 512). This task is the same objective at CPU scale:

- Corpus: the bundled 42 works of Shakespeare (``data/shakespeare/works``), or any folder of
  ``*.txt``/``*.txt.gz`` files. The split is by work, so held-out text is never seen in training:
  ``hamlet``, ``macbeth``, ``sonnets`` and ``twelfth_night`` (about 10% of the words; two
  tragedies, a comedy and the poems) form "eval", the other 38 works "train". A corpus without
  those names holds out every work whose sorted position i has ``i % 10 == 9`` (the last work
  when there are fewer than ten). Option ``eval_works`` names the held-out works explicitly.
- Tokenizer: a WordPiece tokenizer (Hugging Face ``tokenizers``: BertNormalizer with lower-casing,
  BertPreTokenizer, WordPieceTrainer; special tokens ``[PAD] [UNK] [CLS] [SEP] [MASK]`` = ids 0-4)
  trained on the training split only. It and the token ids of both splits are cached in
  :func:`largebatch.train.data.cache_dir` under a hash of the corpus and the vocabulary size, and
  written atomically, so only the first construction trains or tokenizes.
- Sequences: each split's works are tokenized line by line and concatenated (in name order) into
  one token stream, cut into consecutive windows of ``seq_len - 2`` tokens, each wrapped as
  ``[CLS] window [SEP]``; the tail shorter than a window is dropped. No padding, no sentence pairs
  and no next-sentence prediction (RoBERTa showed NSP unnecessary; the paper's optimizer claims do
  not depend on it).
- Masking (Devlin et al. 2019): each non-special token is selected with probability 15%; a
  selected token becomes ``[MASK]`` with probability 80%, a uniformly random non-special token
  with 10%, and stays unchanged with 10%. A sequence where no token was selected gets one
  selected position at random, so every sequence contributes. Training batches draw the masks
  from the generator passed to ``get_batch``; the eval split is masked once at construction with
  a fixed seed, so held-out numbers do not depend on the eval batch size or call order.
- Model: ``transformers.BertForMaskedLM`` built from a ``BertConfig`` (no download). Default: 2
  layers, hidden 128, 2 heads, intermediate 512 (the BERT-Tiny shape of Turc et al. 2019),
  ``max_position_embeddings`` 512 so that the paper's two-phase 128 -> 512 schedule runs. Any BERT
  config may be passed (dict or JSON path). The model is a subclass that, given
  ``masked_index``, applies the MLM head only at the masked positions (the head is the costliest
  layer at this size); without it, it is a plain ``BertForMaskedLM``.

Batches hold ``input_ids`` (int64 ``[B, seq_len]``, with masking applied), ``masked_index``
(flat positions into ``B * seq_len`` of the masked tokens) and ``masked_labels`` (their original
ids). ``weight`` is the number of masked tokens; ``loss`` returns the summed cross-entropy over
them and "accuracy" = number of masked tokens predicted exactly, so ``evaluate`` reports MLM
accuracy = correct / masked.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from torch import nn
from transformers import BertConfig, BertForMaskedLM

from ..checkpoint import atomic_write_bytes
from ..data import cache_dir, default_data_dir, load_text_corpus
from ...schedules import _finite_number
from ..task import Batch, Task, example_generators
from .common import _at_least_float32, check_split, float_option, int_option, subset_size

HELD_OUT_WORKS = ("hamlet", "macbeth", "sonnets", "twelfth_night")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL = len(SPECIAL_TOKENS)
TOKENIZER_RECIPE = "wordpiece/bert-normalizer-lowercase/bert-pretokenizer/v1"
EVAL_MASK_SEED = 0
DEFAULT_VOCAB_SIZE = 4096

# How many tokenizers this process has trained (a cache hit does not count).
TOKENIZER_TRAININGS = 0


# ---------------------------------------------------------------------------------------------
# Corpus and split


def corpus_folder(data_dir: str | os.PathLike | None) -> Path:
    """The folder of text files: ``data_dir`` itself when it holds ``*.txt[.gz]`` files, else
    its ``shakespeare/works`` or ``works`` subfolder; default the bundled Shakespeare."""
    if data_dir is None:
        return default_data_dir() / "shakespeare" / "works"
    folder = Path(data_dir)

    def has_text(path: Path) -> bool:
        return path.is_dir() and any(p.name.endswith((".txt", ".txt.gz")) for p in path.iterdir())

    if has_text(folder):
        return folder
    for sub in (folder / "shakespeare" / "works", folder / "works"):
        if has_text(sub):
            return sub
    return folder  # load_text_corpus raises a clear error


def split_works(names: list[str], eval_works: Iterable[str] | None = None) -> tuple[list[str], list[str]]:
    """(train names, eval names) of a corpus, split by work (see the module docstring)."""
    if len(names) < 2:
        raise ValueError(f"bert-mlm splits the corpus by work and needs at least two works, got {names}")
    if eval_works is not None:
        held = [n for n in names if n in set(eval_works)]
        unknown = sorted(set(eval_works) - set(names))
        if unknown or not held:
            raise ValueError(f"eval_works {unknown or list(eval_works)} not in the corpus; works are {names}")
    else:
        held = [n for n in names if n in HELD_OUT_WORKS]
        if not held:
            held = [n for i, n in enumerate(names) if i % 10 == 9] or [names[-1]]
    if len(held) == len(names):
        raise ValueError("eval_works would hold out every work; keep at least one for training")
    return [n for n in names if n not in held], held


def _hash_texts(works: list[tuple[str, str]]) -> str:
    h = hashlib.sha256()
    for name, text in works:
        for part in (name, text):
            data = part.encode("utf-8", errors="surrogatepass")
            h.update(len(data).to_bytes(8, "little"))
            h.update(data)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizer and token streams


def train_wordpiece(texts: Iterable[str], vocab_size: int):
    """A BERT-style WordPiece tokenizer (``tokenizers.Tokenizer``) trained on ``texts``."""
    global TOKENIZER_TRAININGS
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    for i, tok in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(tok) != i:  # pragma: no cover - guards the id constants
            raise RuntimeError(f"special token {tok} got id {tokenizer.token_to_id(tok)}, expected {i}")
    TOKENIZER_TRAININGS += 1
    return tokenizer


def load_or_train_tokenizer(train_works: list[tuple[str, str]], vocab_size: int, folder: Path | None = None):
    """The cached tokenizer for this training text and vocabulary size, trained on a miss.

    Returns ``(tokenizer, path of the cache file)``.
    """
    folder = cache_dir() if folder is None else folder
    key = hashlib.sha256(f"{TOKENIZER_RECIPE}|{vocab_size}|{_hash_texts(train_works)}".encode()).hexdigest()[:20]
    path = folder / f"wordpiece-{vocab_size}-{key}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path)), path
        except Exception:  # unreadable cache entry: rebuild it
            pass
    tokenizer = train_wordpiece((text for _, text in train_works), vocab_size)
    atomic_write_bytes(path, lambda f: f.write(tokenizer.to_str().encode("utf-8")))
    return tokenizer, path


def encode_works(tokenizer, works: list[tuple[str, str]]) -> np.ndarray:
    """One token stream (int32) of all ``works``, tokenized line by line without special tokens."""
    lines = [line for _, text in works for line in text.splitlines() if line.strip()]
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    encodings = encode(lines, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
    stream = np.empty(int(lengths.sum()), dtype=np.int32)
    pos = 0
    for e, n in zip(encodings, lengths):
        stream[pos : pos + n] = e.ids
        pos += n
    return stream


def load_or_encode_streams(
    tokenizer, splits: dict[str, list[tuple[str, str]]], folder: Path | None = None
) -> tuple[dict[str, np.ndarray], Path]:
    """Token streams of each split, cached beside the tokenizer. Returns ``(streams, path)``."""
    folder = cache_dir() if folder is None else folder
    h = hashlib.sha256(tokenizer.to_str().encode("utf-8"))
    for split in sorted(splits):
        h.update(split.encode())
        h.update(_hash_texts(splits[split]).encode())
    path = folder / f"tokens-{h.hexdigest()[:20]}.npz"
    if path.is_file():
        try:
            with np.load(path) as npz:
                if set(npz.files) == set(splits):
                    return {k: npz[k].astype(np.int32) for k in splits}, path
        except Exception:  # unreadable cache entry: rebuild it
            pass
    streams = {k: encode_works(tokenizer, works) for k, works in splits.items()}
    dtype = np.uint16 if tokenizer.get_vocab_size() <= np.iinfo(np.uint16).max + 1 else np.int32
    atomic_write_bytes(path, lambda f: np.savez(f, **{k: v.astype(dtype) for k, v in streams.items()}))
    return streams, path


def make_sequences(stream: np.ndarray, seq_len: int) -> torch.Tensor:
    """``[CLS] window [SEP]`` rows (int64 ``[N, seq_len]``) from consecutive windows of the stream."""
    body = seq_len - 2
    n = len(stream) // body
    windows = torch.from_numpy(stream[: n * body].astype(np.int64)).view(n, body)
    cls = torch.full((n, 1), CLS_ID, dtype=torch.int64)
    sep = torch.full((n, 1), SEP_ID, dtype=torch.int64)
    return torch.cat([cls, windows, sep], dim=1)


# ---------------------------------------------------------------------------------------------
# Masking


def mask_tokens(
    input_ids: torch.Tensor,
    generator: torch.Generator | None,
    vocab_size: int,
    mask_prob: float = 0.15,
    keys: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ``input_ids`` ``[B, L]``: returns ``(masked input_ids, labels)`` where
    labels hold the original id at selected positions and -100 elsewhere.

    Special tokens (ids < 5) are never selected. Every row with an eligible token gets at least
    one selected position. Draws, in order and with fixed shapes (so a generator's state after the
    call depends only on the batch shape): selection uniforms ``[B, L]``, fallback uniforms
    ``[B, L]``, replacement-kind uniforms ``[B, L]``, random token ids ``[B, L]``. With ``keys``
    (one example index per row), row i makes the same draws with shape ``[L]`` from its own
    generator (:func:`largebatch.train.task.example_generators`): its masking then does not depend
    on the other rows of the batch.
    """
    shape = input_ids.shape
    if keys is None:
        draws = _mask_draws(shape, generator, vocab_size, input_ids.dtype)
    else:
        rows = [_mask_draws(shape[1:], g, vocab_size, input_ids.dtype) for g in example_generators(generator, keys)]
        draws = tuple(torch.stack(d) for d in zip(*rows)) if rows else _mask_draws(shape, None, vocab_size, input_ids.dtype)
    select_u, fallback_u, kind, random_ids = draws
    eligible = input_ids >= NUM_SPECIAL
    selected = (select_u < mask_prob) & eligible
    fallback_score = fallback_u.masked_fill_(~eligible, -1.0)
    fallback = torch.zeros_like(selected).scatter_(1, fallback_score.argmax(dim=1, keepdim=True), True)
    none_selected = ~selected.any(dim=1, keepdim=True) & eligible.any(dim=1, keepdim=True)
    selected |= fallback & none_selected
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    masked = torch.where(selected & (kind < 0.8), torch.full_like(input_ids, MASK_ID), input_ids)
    masked = torch.where(selected & (kind >= 0.8) & (kind < 0.9), random_ids, masked)
    return masked, labels


def _mask_draws(shape, generator, vocab_size: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """The four draws of :func:`mask_tokens`, in order."""
    return (
        torch.rand(shape, generator=generator),
        torch.rand(shape, generator=generator),
        torch.rand(shape, generator=generator),
        torch.randint(NUM_SPECIAL, vocab_size, shape, generator=generator, dtype=dtype),
    )


# ---------------------------------------------------------------------------------------------
# Model


class BertForMaskedLMAtPositions(BertForMaskedLM):
    """``BertForMaskedLM`` whose forward, given ``masked_index`` (flat positions into
    ``batch * seq_len``), returns the MLM logits ``[M, vocab]`` at those positions only.
    Without ``masked_index`` it is ``BertForMaskedLM.forward`` unchanged."""

    def forward(self, input_ids=None, masked_index: torch.Tensor | None = None, **kwargs):
        if masked_index is None:
            return super().forward(input_ids=input_ids, **kwargs)
        hidden = self.bert(input_ids, return_dict=True, **kwargs).last_hidden_state
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, masked_index)
        return self.cls(hidden)


def _user_config(config: Any) -> tuple[dict[str, Any], str]:
    """The ``config`` argument's fields and where they came from, for messages: ``"config file
    PATH"`` or ``"config"``. Refuses anything but a dict, a ``BertConfig`` or the path of a JSON
    file holding an object."""
    if config is None:
        return {}, "config"
    if isinstance(config, dict):
        return dict(config), "config"
    if hasattr(config, "to_dict"):
        return config.to_dict(), "config"
    if not isinstance(config, (str, os.PathLike)):
        raise ValueError(f"config must be a dict, a BertConfig or a JSON file path, got {config!r}")
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"BERT config file {path} not found (pass a dict or a JSON file path)")
    try:
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"BERT config file {path} is not valid JSON: {err}") from None
    if not isinstance(fields, dict):
        raise ValueError(
            f"BERT config file {path} must hold a JSON object of BertConfig fields "
            f'(e.g. {{"hidden_size": 128}}), got a JSON {type(fields).__name__}'
        )
    return fields, f"config file {path}"


# BertConfig fields that are sizes (integers >= 1), with the task option that sets each (if any).
SIZE_FIELDS = {
    "num_hidden_layers": "layers",
    "hidden_size": "hidden",
    "num_attention_heads": "heads",
    "intermediate_size": "intermediate",
    "max_position_embeddings": None,
    "type_vocab_size": None,
}
# BertConfig fields that are dropout probabilities, in [0, 1) (``classifier_dropout`` may be null).
PROBABILITY_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")


def bert_activations() -> list[str]:
    """The ``hidden_act`` names BERT accepts: the keys of transformers' ``ACT2FN``."""
    from transformers.activations import ACT2FN

    return sorted(ACT2FN)


def _check_bert_fields(fields: dict[str, Any], label) -> None:
    """Refuses model-shape and other ``BertConfig`` values that would build a broken or empty model
    (or fail later with a traceback). ``label(key)`` names a field for messages. Converts integral
    ``initializer_range``/``layer_norm_eps`` to float (``BertConfig`` wants floats); everything
    else is left as it is."""

    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    for key in SIZE_FIELDS:
        if key in fields and not (is_int(fields[key]) and fields[key] >= 1):
            raise ValueError(f"{label(key)} must be an integer >= 1, got {fields[key]!r}")
    hidden, heads = fields["hidden_size"], fields["num_attention_heads"]
    if hidden % heads:
        divisors = ", ".join(str(d) for d in range(1, hidden + 1) if hidden % d == 0)
        raise ValueError(
            f"hidden size {hidden} ({label('hidden_size')}) must be divisible by the number of attention heads "
            f"{heads} ({label('num_attention_heads')}); for hidden size {hidden}, heads may be {divisors}"
        )
    for key in PROBABILITY_FIELDS:
        if key not in fields or (key == "classifier_dropout" and fields[key] is None):
            continue
        if not (_finite_number(fields[key]) and 0 <= fields[key] < 1):
            none = " or null" if key == "classifier_dropout" else ""
            raise ValueError(f"{label(key)} must be a probability in [0, 1){none}, got {fields[key]!r}")
    for key, positive, allowed in (("layer_norm_eps", True, "a number > 0"), ("initializer_range", False, "a number >= 0")):
        if key in fields:
            value = fields[key]
            if not _finite_number(value, low=0.0, low_open=positive):
                raise ValueError(f"{label(key)} must be {allowed}, got {value!r}")
            fields[key] = float(value) if is_int(value) else value
    if "hidden_act" in fields:
        allowed = bert_activations()
        if not (isinstance(fields["hidden_act"], str) and fields["hidden_act"] in allowed):
            raise ValueError(f"{label('hidden_act')} must be one of {', '.join(allowed)}; got {fields['hidden_act']!r}")
    pad = fields.get("pad_token_id")
    if pad is not None and not (is_int(pad) and pad >= 0):
        raise ValueError(f"{label('pad_token_id')} must be an integer >= 0 (a token id) or null, got {pad!r}")
    for key in ("is_decoder", "add_cross_attention"):
        if fields.get(key, False) is not False:
            raise ValueError(f"{label(key)} must be false (bert-mlm trains a bidirectional encoder), got {fields[key]!r}")


class BertMlmTask(Task):
    """Masked language modelling with a small BERT on a text corpus (default: Shakespeare).

    Args:
        data_dir: folder of ``*.txt``/``*.txt.gz`` works (or one with ``shakespeare/works``);
            default the bundled Shakespeare.
        seq_len: tokens per sequence including ``[CLS]`` and ``[SEP]`` (default 128; up to the
            config's ``max_position_embeddings``, 512 by default).
        vocab_size: WordPiece vocabulary size to train (default 4096, or the ``config``'s).
        layers, hidden, heads, intermediate: model shape (defaults 2, 128, 2, 4 * hidden);
            they override the same fields of ``config``.
        config: any ``BertConfig`` fields, as a dict, a ``BertConfig`` or a JSON file path.
            ``vocab_size`` there is the tokenizer's target; the model always gets the trained
            tokenizer's actual vocabulary size. Sizes must be integers >= 1 with ``hidden_size``
            divisible by ``num_attention_heads``, dropout probabilities in [0, 1) and
            ``hidden_act`` one of :func:`bert_activations`; anything else is refused with a
            ValueError naming the field (and the config file), before any data work.
        mask_prob: fraction of tokens selected for prediction (default 0.15).
        eval_works: names of the held-out works (default ``HELD_OUT_WORKS``).
        train_subset, eval_subset: use only the first N sequences of a split.
    """

    name = "bert-mlm"
    metric = "accuracy"

    def __init__(
        self,
        data_dir: str | os.PathLike | None = None,
        seq_len: int = 128,
        vocab_size: int | None = None,
        layers: int | None = None,
        hidden: int | None = None,
        heads: int | None = None,
        intermediate: int | None = None,
        config: dict | str | os.PathLike | None = None,
        mask_prob: float = 0.15,
        eval_works: Iterable[str] | str | None = None,
        train_subset: int | None = None,
        eval_subset: int | None = None,
    ):
        self.seq_len = int_option(seq_len, "seq_len")
        self.mask_prob = float_option(mask_prob, "mask_prob")
        if not 0.0 < self.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        fields = {
            "hidden_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 512,
            "pad_token_id": PAD_ID,
        }
        user, source = _user_config(config)
        fields.update(user)
        options: dict[str, str] = {}  # field -> the option that set it
        for key, value, option in (("num_hidden_layers", layers, "layers"), ("hidden_size", hidden, "hidden"),
                                   ("num_attention_heads", heads, "heads"),
                                   ("intermediate_size", intermediate, "intermediate")):  # fmt: skip
            if value is not None:
                fields[key] = int_option(value, option)
                options[key] = option

        def label(key: str) -> str:
            if key in options:
                return options[key]
            if key in user:
                return f"{key} in {source}"
            return f"{SIZE_FIELDS.get(key) or key}, the default"

        _check_bert_fields(fields, label)
        if intermediate is None and "intermediate_size" not in user:
            fields["intermediate_size"] = 4 * fields["hidden_size"]
        vocab_label = "vocab_size" if vocab_size is not None or "vocab_size" not in user else label("vocab_size")
        target_vocab = int_option(vocab_size if vocab_size is not None else fields.get("vocab_size", DEFAULT_VOCAB_SIZE),
                                  vocab_label)
        if target_vocab < 100:
            raise ValueError(f"{vocab_label} must be at least 100, got {target_vocab}")
        try:  # any other bad field (a type BertConfig refuses): say so now, before the slow data work
            BertConfig(**{**fields, "vocab_size": target_vocab})
        except Exception as err:
            message = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
            raise ValueError(f"invalid BERT {source}: {message}") from None
        max_len = fields["max_position_embeddings"]
        if not 8 <= self.seq_len <= max_len:
            raise ValueError(
                f"seq_len must be between 8 and max_position_embeddings={max_len}, got {self.seq_len}"
            )

        folder = corpus_folder(data_dir)
        works = load_text_corpus(folder)
        if isinstance(eval_works, str):
            eval_works = [w.strip() for w in eval_works.split(",") if w.strip()]
        train_names, eval_names = split_works([n for n, _ in works], eval_works)
        by_name = dict(works)
        splits = {
            "train": [(n, by_name[n]) for n in train_names],
            "eval": [(n, by_name[n]) for n in eval_names],
        }
        self.data_dir = str(folder)
        self.train_works, self.eval_works = train_names, eval_names

        self.tokenizer, self.tokenizer_path = load_or_train_tokenizer(splits["train"], target_vocab)
        streams, self.tokens_path = load_or_encode_streams(self.tokenizer, splits)
        self.vocab_size = self.tokenizer.get_vocab_size()
        fields["vocab_size"] = self.vocab_size
        if fields.get("pad_token_id") is not None and fields["pad_token_id"] >= self.vocab_size:
            raise ValueError(
                f"{label('pad_token_id')} must be a token id below the vocabulary size {self.vocab_size}, "
                f"got {fields['pad_token_id']}"
            )
        self.config = BertConfig(**fields)

        self._ids: dict[str, torch.Tensor] = {}
        train = make_sequences(streams["train"], self.seq_len)
        evals = make_sequences(streams["eval"], self.seq_len)
        if train.shape[0] == 0 or evals.shape[0] == 0:
            raise ValueError(
                f"corpus too small for seq_len={self.seq_len}: {len(streams['train'])} train and "
                f"{len(streams['eval'])} eval tokens (the held-out works, eval_works), and each split needs at "
                f"least seq_len - 2 = {self.seq_len - 2}; use a smaller seq_len or a larger corpus"
            )
        self._ids["train"] = train[: subset_size(train_subset, train.shape[0], "train_subset")]
        # Eval masks: drawn once, for the whole held-out split, from a fixed seed.
        masked, labels = mask_tokens(evals, torch.Generator().manual_seed(EVAL_MASK_SEED), self.vocab_size, self.mask_prob)
        n_eval = subset_size(eval_subset, evals.shape[0], "eval_subset")
        self._ids["eval"] = evals[:n_eval]
        self._eval_masked, self._eval_labels = masked[:n_eval], labels[:n_eval]

    def build_model(self) -> nn.Module:
        return BertForMaskedLMAtPositions(self.config)

    def num_examples(self, split: str) -> int:
        return self._ids[check_split(split, self.name)].shape[0]

    def get_batch(self, split: str, indices: torch.Tensor, generator: torch.Generator | None = None) -> Batch:
        split = check_split(split, self.name)
        indices = torch.as_tensor(indices, dtype=torch.long)
        if split == "train":
            input_ids, labels = mask_tokens(self._ids["train"][indices], generator, self.vocab_size, self.mask_prob, keys=indices)
        else:
            input_ids, labels = self._eval_masked[indices], self._eval_labels[indices]
        flat = labels.reshape(-1)
        masked_index = (flat != -100).nonzero().squeeze(1)
        return Batch(
            {"input_ids": input_ids, "masked_index": masked_index, "masked_labels": flat[masked_index]},
            int(masked_index.numel()),
        )

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = model(input_ids=batch.tensors["input_ids"], masked_index=batch.tensors["masked_index"])
        target = batch.tensors["masked_labels"]
        loss_sum = F.cross_entropy(_at_least_float32(logits), target, reduction="sum")
        correct = (logits.argmax(dim=-1) == target).sum().to(loss_sum.dtype)
        return loss_sum, {"accuracy": correct}
