"""A pretrained transformers text tower brings its own tokenizer: `model.tokenizer.kind: hf` reads the
vocab.txt saved beside it, and a config whose tokenizer would give the tower other ids is refused."""

from __future__ import annotations

import pytest
from transformers import BertConfig, BertModel, BertTokenizer

from alignlab.config import ConfigError, validate_config
from alignlab.training import builders

WORDS = ["a", "red", "blue", "circle", "square", "left", "of", "the", "photo"]


@pytest.fixture()
def bert_folder(tmp_path):
    """A tiny BERT and a BERT-style vocabulary whose special ids sit where BERT's do (101 / 102)."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32)
    BertModel(config).save_pretrained(folder)
    return folder


def _model_tree(folder, tokenizer):
    return {"model": {"preset": None, "embed_dim": 16,
                      "image": {"name": "vit_tiny_patch16_224",
                                "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}},
                      "text": {"kind": "hf", "hf_name_or_path": str(folder), "pool": "first"},
                      "tokenizer": tokenizer},
            "data": {"image_size": 32}}


def test_the_towers_own_vocabulary_gives_berts_ids(bert_folder):
    cfg = validate_config(_model_tree(bert_folder, {"kind": "hf", "context_length": 8}))
    tokenizer = builders.tokenizer_from_config(cfg.model)
    reference = BertTokenizer.from_pretrained(bert_folder)
    caption = "A red circle left of the blue square"
    want = reference(caption, padding="max_length", max_length=8, truncation=True)["input_ids"]
    assert tokenizer([caption])[0].tolist() == want
    assert want[0] == 101  # [CLS] where BERT has it
    model = builders.model_from_config(cfg.model, tokenizer)
    assert model.encode_text(tokenizer([caption])).shape == (1, 16)


def test_a_tokenizer_that_disagrees_with_the_tower_is_refused(bert_folder):
    for tokenizer in ({"kind": "wordpiece", "vocab_size": 64}, {"kind": "clip_bpe"}):
        with pytest.raises(ConfigError, match="model.tokenizer.kind=hf"):
            validate_config(_model_tree(bert_folder, tokenizer))
    with pytest.raises(ConfigError, match="reads the vocabulary of model.text.hf_name_or_path"):
        validate_config({"model": {"tokenizer": {"kind": "hf"}}})


def test_a_vocabulary_larger_than_the_towers_embedding_is_refused(bert_folder, tmp_path):
    big = tmp_path / "big.txt"
    big.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(200)]) + "\n")
    cfg = validate_config(_model_tree(bert_folder, {"kind": "wordpiece", "vocab_file": str(big),
                                                    "context_length": 8}))
    tokenizer = builders.tokenizer_from_config(cfg.model)
    with pytest.raises(ConfigError, match=r"205 ids but the text tower's embedding has 113 rows"):
        builders.model_from_config(cfg.model, tokenizer)


def test_missing_vocab_file_is_named(tmp_path):
    folder = tmp_path / "bare"
    BertModel(BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    cfg = validate_config(_model_tree(folder, {"kind": "hf"}))
    with pytest.raises(ConfigError, match="vocab.txt"):
        builders.tokenizer_from_config(cfg.model)
