"""Text tokenisers (docs/methods.md "CLIP"): CLIP BPE for PSD and DiHT, BERT-uncased WordPiece for the thesis.

Every tokeniser is a callable `tokenizer(list[str], generator=None) -> LongTensor [n, context_length]`
with the attributes `vocab_size`, `context_length`, `pad_id` and `kind`. Both run on the Rust
`tokenizers` library, so a batch of captions is encoded in one call.
"""

import gzip
import heapq
import html
from collections import Counter, defaultdict
from pathlib import Path

import ftfy
import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tokenizers.processors import TemplateProcessing

BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
# CLIP's word splitter (openai/CLIP simple_tokenizer.py, without its special-token alternatives).
_CLIP_WORD_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def pack_token_ids(sequences: list[list[int]], context_length: int, pad_id: int) -> torch.Tensor:
    """Right-pad id sequences to `context_length`; a longer sequence is cut but keeps its last id.

    The last id is the end marker (CLIP's EOT, BERT's [SEP]), which the text towers pool on, so
    truncation must never drop it (open_clip's SimpleTokenizer does the same).
    """
    packed = np.full((len(sequences), context_length), pad_id, dtype=np.int64)
    for row, ids in enumerate(sequences):
        if len(ids) > context_length:
            ids = list(ids[: context_length - 1]) + [ids[-1]]
        packed[row, : len(ids)] = ids
    return torch.from_numpy(packed)


# CLIP's BPE merges (OpenAI CLIP, MIT licence; the file open_clip ships), packaged with alignlab so training
# does not need open_clip at run time (it stays a development dependency: the parity tests compare ids).
CLIP_BPE_FILE = Path(__file__).with_name("bpe_simple_vocab_16e6.txt.gz")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table; its order fixes CLIP token ids 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def _clean_caption(text: str) -> str:
    """open_clip's default 'lower' cleaning: ftfy, HTML unescape twice, collapse whitespace, lower case."""
    # ftfy is the slowest step and leaves printable ASCII without HTML entities unchanged: skip it there.
    if not (text.isascii() and text.isprintable() and "&" not in text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class ClipBPETokenizer:
    """CLIP byte-level BPE (vocabulary 49,408, context 77; docs/methods.md "CLIP"), ids identical to open_clip.

    Each caption becomes [SOT] + BPE ids + [EOT], padded with 0 (open_clip's padding id). A caption
    longer than the context is cut keeping EOT, or, with `random_subsequence=True`, a random contiguous
    window of `context_length - 2` BPE ids is kept (PSD; the window start comes from the `generator`
    passed at call time, so it follows the sample's aug seed).
    """

    kind = "clip_bpe"

    def __init__(self, context_length: int = 77, random_subsequence: bool = False, bpe_file: str | Path | None = None):
        if context_length < 2:
            raise ValueError(f"context_length={context_length} is too small: CLIP BPE needs room for SOT and EOT")
        bpe_file = Path(bpe_file) if bpe_file else CLIP_BPE_FILE
        if not bpe_file.is_file():
            raise FileNotFoundError(
                f"CLIP BPE merges file {bpe_file} not found (expected bpe_simple_vocab_16e6.txt.gz)"
            )
        lines = gzip.open(bpe_file).read().decode("utf-8").split("\n")
        # The same slice as openai/CLIP: line 0 is a header, 48,894 merges give a 49,408-token vocabulary.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        char_of_byte = _bytes_to_unicode()
        byte_chars = list(char_of_byte.values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
        vocab += ["<start_of_text>", "<end_of_text>"]
        backend = Tokenizer(
            models.BPE(
                vocab={token: i for i, token in enumerate(vocab)},
                merges=merges,
                continuing_subword_prefix="",
                end_of_word_suffix="</w>",
                fuse_unk=False,
            )
        )
        # use_regex=False: CLIP's word pattern already split the text; GPT-2's must not split it again.
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_CLIP_WORD_PATTERN), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        self._backend = backend
        self._byte_of_char = {char: byte for byte, char in char_of_byte.items()}
        self.context_length = context_length
        self.random_subsequence = random_subsequence
        self.vocab_size = len(vocab)
        self.sot_id = len(vocab) - 2
        self.eot_id = len(vocab) - 1
        self.pad_id = 0

    def encode(self, texts: list[str]) -> list[list[int]]:
        """BPE ids of each caption, without SOT/EOT and without truncation."""
        cleaned = [_clean_caption(text) for text in texts]
        return [encoding.ids for encoding in self._backend.encode_batch_fast(cleaned, add_special_tokens=False)]

    def __call__(self, texts: list[str] | str, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids [n, context_length]; `generator` drives the random sub-sequence (if enabled)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        keep = self.context_length - 2
        sequences = []
        for ids in self.encode(texts):
            if self.random_subsequence and len(ids) > keep:
                start = int(torch.randint(0, len(ids) - keep + 1, (1,), generator=generator))
                ids = ids[start : start + keep]
            sequences.append([self.sot_id] + ids + [self.eot_id])
        return pack_token_ids(sequences, self.context_length, self.pad_id)

    def decode(self, token_ids) -> str:
        """Text of one row of ids, stopping at EOT (lower-cased and cleaned, as CLIP sees it)."""
        pieces = []
        for token_id in (int(t) for t in token_ids):
            if token_id == self.eot_id:
                break
            if token_id != self.sot_id:
                pieces.append(self._backend.id_to_token(token_id))
        data = bytes(self._byte_of_char[c] for c in "".join(pieces))
        return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()


def learn_wordpiece_vocab(
    word_counts: dict[str, int],
    vocab_size: int,
    min_frequency: int = 1,
    special_tokens: list[str] = BERT_SPECIAL_TOKENS,
    prefix: str = "##",
) -> list[str]:
    """A WordPiece vocabulary learnt from word counts, the same on every machine and in every process.

    The merges are those of the `tokenizers` WordPiece trainer (BPE with a `prefix` on word-inner pieces):
    the special tokens, every character seen (word-initial, then `prefix` + each), then, until `vocab_size`
    tokens, the merge of the most frequent adjacent pair of pieces. Ties go to the pair whose (left, right)
    strings sort first. The Rust trainer breaks ties by hash-map order instead, which changes from one
    process to the next: in a template language most pairs tie, so two data folders generated from the same
    config got different vocabularies (other intermediate pieces, other ids) and the same checkpoint scored
    differently on a zero-shot prompt. Pairs seen fewer than `min_frequency` times are never merged.
    """
    if vocab_size < len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the {len(special_tokens)} special tokens")
    words = sorted(word for word, count in word_counts.items() if word and count > 0)
    pieces = [[word[0]] + [prefix + char for char in word[1:]] for word in words]
    counts = [word_counts[word] for word in words]
    vocab = list(dict.fromkeys(special_tokens))
    known = set(vocab)
    characters = sorted({char for word in words for char in word})
    alphabet = characters + [prefix + char for char in characters]  # any word of these characters encodes
    for piece in alphabet:
        if piece not in known and len(vocab) < vocab_size:
            vocab.append(piece)
            known.add(piece)

    pair_count: dict[tuple[str, str], int] = defaultdict(int)
    pair_words: dict[tuple[str, str], set[int]] = defaultdict(set)
    for index, word in enumerate(pieces):
        for pair in zip(word, word[1:]):
            pair_count[pair] += counts[index]
            pair_words[pair].add(index)
    heap = [(-count, left, right) for (left, right), count in pair_count.items()]
    heapq.heapify(heap)
    while len(vocab) < vocab_size and heap:
        negative, left, right = heapq.heappop(heap)
        count = pair_count.get((left, right), 0)
        if count != -negative:
            continue  # stale entry: the pair's current count was pushed when it changed
        if count < min_frequency:
            break
        merged = left + right[len(prefix):]
        if merged not in known:
            vocab.append(merged)
            known.add(merged)
        changed = set()
        for index in sorted(pair_words.pop((left, right))):
            old = pieces[index]
            new, i = [], 0
            while i < len(old):
                if i + 1 < len(old) and old[i] == left and old[i + 1] == right:
                    new.append(merged)
                    i += 2
                else:
                    new.append(old[i])
                    i += 1
            for pair in zip(old, old[1:]):
                pair_count[pair] -= counts[index]
                pair_words[pair].discard(index)
                changed.add(pair)
            for pair in zip(new, new[1:]):
                pair_count[pair] += counts[index]
                pair_words[pair].add(index)
                changed.add(pair)
            pieces[index] = new
        for pair in sorted(changed):
            if pair_count[pair] > 0:
                heapq.heappush(heap, (-pair_count[pair], *pair))
            else:
                pair_count.pop(pair, None)
                pair_words.pop(pair, None)
    return vocab


def _bert_pipeline(model: models.Model, lowercase: bool) -> Tokenizer:
    """BERT's normaliser and pre-tokeniser around a WordPiece model (as BertWordPieceTokenizer builds it)."""
    backend = Tokenizer(model)
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    return backend


class WordPieceTokenizer:
    """BERT-uncased style WordPiece (the thesis: vocabulary 30,522, at most 64 tokens; docs/methods.md "CLIP").

    Each caption becomes [CLS] + word pieces + [SEP], cut to `context_length` keeping [SEP], padded
    with [PAD]. Build it from a BERT vocab.txt (`from_vocab`) or learn a vocabulary (`train`).
    """

    kind = "wordpiece"

    def __init__(self, backend: Tokenizer, context_length: int = 64, source: str = "the vocabulary"):
        missing = [token for token in BERT_SPECIAL_TOKENS[:4] if backend.token_to_id(token) is None]
        if missing:
            raise ValueError(
                f"{source} lacks the special tokens {missing}; a BERT vocab.txt has [PAD], [UNK], [CLS], [SEP]"
            )
        if context_length < 2:
            raise ValueError(f"context_length={context_length} is too small: WordPiece needs room for [CLS] and [SEP]")
        # Registered as special (their ids unchanged), so decode skips them and no caption text splits into them.
        backend.add_special_tokens([token for token in BERT_SPECIAL_TOKENS if backend.token_to_id(token) is not None])
        cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
        backend.post_processor = TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
        )
        self.pad_id = backend.token_to_id("[PAD]")
        # Truncation counts the two special tokens, so [SEP] always survives.
        backend.enable_truncation(max_length=context_length)
        backend.enable_padding(length=context_length, pad_id=self.pad_id, pad_token="[PAD]")
        self._backend = backend
        self.context_length = context_length
        self.vocab_size = backend.get_vocab_size()
        self.cls_id, self.sep_id = cls_id, sep_id

    @classmethod
    def from_vocab(
        cls, vocab_file: str | Path, context_length: int = 64, lowercase: bool = True
    ) -> "WordPieceTokenizer":
        """Load a BERT vocab.txt (one token per line, line number = id), e.g. bert-base-uncased's."""
        vocab_file = Path(vocab_file)
        if not vocab_file.is_file():
            raise FileNotFoundError(f"WordPiece vocab_file {vocab_file} not found (expected a BERT vocab.txt)")
        model = models.WordPiece.from_file(str(vocab_file), unk_token="[UNK]")
        return cls(_bert_pipeline(model, lowercase), context_length, source=str(vocab_file))

    @classmethod
    def train(
        cls,
        texts: list[str],
        vocab_size: int = 30522,
        context_length: int = 64,
        lowercase: bool = True,
        min_frequency: int = 1,
    ) -> "WordPieceTokenizer":
        """Learn a WordPiece vocabulary of at most `vocab_size` tokens from `texts` (the special tokens first),
        deterministically (`learn_wordpiece_vocab`)."""
        if not texts:
            raise ValueError("WordPieceTokenizer.train needs a non-empty list of train_texts")
        splitter = _bert_pipeline(models.WordPiece(unk_token="[UNK]"), lowercase)
        word_counts: Counter[str] = Counter()
        for text in texts:
            normalized = splitter.normalizer.normalize_str(text)
            word_counts.update(word for word, _ in splitter.pre_tokenizer.pre_tokenize_str(normalized))
        vocab = learn_wordpiece_vocab(word_counts, vocab_size, min_frequency)
        model = models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]")
        return cls(_bert_pipeline(model, lowercase), context_length, source="the trained vocabulary")

    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as a BERT vocab.txt that `from_vocab` reads back to the same ids."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        by_id = sorted(self._backend.get_vocab().items(), key=lambda item: item[1])
        path.write_text("".join(token + "\n" for token, _ in by_id), encoding="utf-8")
        return path

    def __call__(self, texts: list[str] | str, generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids [n, context_length]; `generator` is accepted for a uniform interface and not used."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        encodings = self._backend.encode_batch_fast(texts)
        return torch.tensor([encoding.ids for encoding in encodings], dtype=torch.long).reshape(-1, self.context_length)

    def decode(self, token_ids) -> str:
        """Text of one row of ids, without [CLS], [SEP] and padding."""
        return self._backend.decode([int(t) for t in token_ids], skip_special_tokens=True)


def build_tokenizer(
    kind: str,
    context_length: int | None = None,
    vocab_file: str | Path | None = None,
    train_texts: list[str] | None = None,
    vocab_size: int = 30522,
    random_subsequence: bool = False,
):
    """Tokeniser by name: "clip_bpe" (context 77 by default) or "wordpiece" (context 64 by default).

    wordpiece loads `vocab_file` if given, else trains a vocabulary of `vocab_size` on `train_texts`.
    clip_bpe uses the packaged CLIP merges file (CLIP_BPE_FILE) unless `vocab_file` names another one.
    """
    if kind == "clip_bpe":
        return ClipBPETokenizer(context_length or 77, random_subsequence=random_subsequence, bpe_file=vocab_file)
    if kind == "wordpiece":
        if vocab_file is not None:
            return WordPieceTokenizer.from_vocab(vocab_file, context_length or 64)
        if train_texts is not None:
            return WordPieceTokenizer.train(train_texts, vocab_size, context_length or 64)
        raise ValueError("tokenizer kind 'wordpiece' needs vocab_file (a BERT vocab.txt) or train_texts to learn one")
    raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'clip_bpe' or 'wordpiece'")
