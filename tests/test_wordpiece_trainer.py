"""The WordPiece vocabulary learnt from captions: the merges a brute-force trainer makes, and the same
vocabulary in every process (the Rust trainer's tie-breaking followed hash-map order)."""

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from alignlab.data.tokenizers import BERT_SPECIAL_TOKENS, WordPieceTokenizer, learn_wordpiece_vocab


def brute_force_vocab(word_counts, vocab_size, min_frequency=1, prefix="##"):
    """Recount every adjacent pair after each merge; merge the most frequent, ties to the smallest (left, right)."""
    words = {word: [word[0]] + [prefix + c for c in word[1:]] for word in word_counts}
    chars = sorted({c for word in word_counts for c in word})
    vocab = list(BERT_SPECIAL_TOKENS)
    for piece in chars + [prefix + c for c in chars]:
        if len(vocab) < vocab_size:
            vocab.append(piece)
    while len(vocab) < vocab_size:
        counts = {}
        for word, pieces in words.items():
            for pair in zip(pieces, pieces[1:]):
                counts[pair] = counts.get(pair, 0) + word_counts[word]
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        if counts[best] < min_frequency:
            break
        left, right = best
        merged = left + right[len(prefix):]
        if merged not in vocab:
            vocab.append(merged)
        for word, pieces in words.items():
            out, i = [], 0
            while i < len(pieces):
                if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(pieces[i])
                    i += 1
            words[word] = out
    return vocab


def random_word_counts(seed, n_words=60):
    rng = random.Random(seed)
    letters = "abcdeo"  # a small alphabet, so pieces repeat across words and counts tie often
    words = {"".join(rng.choice(letters) for _ in range(rng.randint(1, 7))) for _ in range(n_words)}
    return {word: rng.choice([1, 1, 2, 3, 5]) for word in sorted(words)}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("vocab_size,min_frequency", [(10_000, 1), (40, 1), (10_000, 3)])
def test_merges_match_a_brute_force_trainer(seed, vocab_size, min_frequency):
    counts = random_word_counts(seed)
    learnt = learn_wordpiece_vocab(counts, vocab_size, min_frequency)
    assert learnt == brute_force_vocab(counts, vocab_size, min_frequency)
    assert len(learnt) <= vocab_size and len(set(learnt)) == len(learnt)
    assert learnt[: len(BERT_SPECIAL_TOKENS)] == BERT_SPECIAL_TOKENS
    if vocab_size == 10_000 and min_frequency == 1:
        assert set(counts) <= set(learnt)  # merging runs until every word is one piece


def test_every_caption_word_round_trips_and_unseen_words_of_seen_letters_are_not_unknown():
    captions = ["a small green triangle left of a large red circle", "the blue square above a star"] * 20
    tokenizer = WordPieceTokenizer.train(captions, vocab_size=500, context_length=16)
    for caption in captions[:2]:
        ids = tokenizer([caption])[0]
        assert tokenizer.decode(ids) == caption
        assert len([i for i in ids.tolist() if i not in (tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id)]) == len(
            caption.split())  # each word is one token once the vocabulary has room
    unknown = tokenizer._backend.token_to_id("[UNK]")
    ids = tokenizer(["lattice"])[0].tolist()  # not a caption word; every letter is
    assert unknown not in ids and tokenizer.decode(ids) == "lattice"


TRAIN_AND_SAVE = """
import sys
from alignlab.data.tokenizers import WordPieceTokenizer
words = "a red green blue small large circle square triangle diamond star left right of above below".split()
texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(6)) for i in range(400)]
WordPieceTokenizer.train(texts, vocab_size=512, context_length=32).save(sys.argv[1])
"""


def test_the_vocabulary_is_the_same_in_every_process(tmp_path):
    """Two processes with different hash seeds (like two machines generating the same data folder)."""
    saved = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"vocab-{hash_seed}.txt"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        subprocess.run([sys.executable, "-c", TRAIN_AND_SAVE, str(out)], check=True, env=env, timeout=120)
        saved.append(Path(out).read_bytes())
    assert saved[0] == saved[1]
