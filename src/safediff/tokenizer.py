"""An offline, real ``CLIPTokenizer`` built from a word list.

No model hub is needed: a byte-level BPE is trained with the ``tokenizers`` library over the
words, with CLIP's conventions (lower-case, ``</w>`` end-of-word suffix, no continuing-subword
prefix), and written in CLIP's ``vocab.json`` + ``merges.txt`` layout: 256 byte symbols, the same
256 with ``</w>``, the merged symbols in merge-rank order, then ``<|startoftext|>`` and
``<|endoftext|>`` (pad = unk = eos, as in SD v1.x). ``transformers.CLIPTokenizer.from_pretrained``
loads the folder; every training word is a single token, and an unseen word falls back to
byte-level pieces, never to ``unk``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Iterable

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    # The GPT-2/CLIP reversible byte -> printable-character table.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _train_merges(words: list[str]) -> list[tuple[str, str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    byte_chars = list(_bytes_to_unicode().values())
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=byte_chars,
        end_of_word_suffix="</w>",
        special_tokens=[],
    )
    tok.train_from_iterator(words, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        merges.append((a, b))
    return merges


def build_clip_tokenizer(words: Iterable[str], out_dir: str | Path, model_max_length: int = 77):
    """Write a CLIP tokenizer for ``words`` into ``out_dir`` and return it loaded.

    Example:
        >>> from safediff.tokenizer import build_clip_tokenizer
        >>> tok = build_clip_tokenizer(["striped", "zebra"], "/tmp/tok")  # doctest: +SKIP
        >>> tok("a striped zebra").input_ids  # doctest: +SKIP
    """
    from transformers import CLIPTokenizer

    words = sorted({w.strip().lower() for w in words if w.strip()})
    if not words:
        raise ValueError("`words` is empty: a tokenizer needs at least one word to train on.")
    merges = _train_merges(words)
    byte_chars = list(_bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    seen = set(vocab_list)
    for a, b in merges:
        tok = a + b
        if tok not in seen:
            vocab_list.append(tok)
            seen.add(tok)
    vocab_list += [BOS, EOS]
    vocab = {t: i for i, t in enumerate(vocab_list)}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    with open(out / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    tok_cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": model_max_length,
        "do_lower_case": True,
        **special,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    tokenizer = CLIPTokenizer.from_pretrained(str(out))
    tokenizer.model_max_length = model_max_length
    return tokenizer


def build_t5_tokenizer(words: Iterable[str], out_dir: str | Path, model_max_length: int = 256):
    """Write a T5 tokenizer (SD3's and FLUX's third / second text encoder) for ``words`` into
    ``out_dir`` and return it loaded with ``transformers.T5Tokenizer.from_pretrained``.

    T5's conventions, as its SentencePiece unigram model: ids 0 / 1 / 2 are ``<pad>`` / ``</s>`` /
    ``<unk>``, words carry the ``▁`` word-start marker, every sequence ends with ``</s>``, padding
    is ``<pad>`` (id 0). Each word is one piece; an unseen word falls back to single characters
    (all printable ASCII characters are pieces), never to ``<unk>``.
    """
    from transformers import T5Tokenizer

    words = sorted({w.strip().lower() for w in words if w.strip()})
    if not words:
        raise ValueError("`words` is empty: a tokenizer needs at least one word to train on.")
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {v for v, _ in vocab}
    for w in words:  # whole words score far above their characters, so they win the unigram split
        if "\u2581" + w not in seen:
            vocab.append(("\u2581" + w, -1.0))
            seen.add("\u2581" + w)
    for c in (chr(i) for i in range(33, 127)):
        for piece in (c, "\u2581" + c):
            if piece not in seen:
                vocab.append((piece, -20.0))
                seen.add(piece)
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    loaded = T5Tokenizer.from_pretrained(str(out))
    loaded.model_max_length = model_max_length
    return loaded
