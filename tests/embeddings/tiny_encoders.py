"""Tiny random embedders built with `transformers`, saved as Hugging Face directories, for
exactness tests against transformers and sentence-transformers on the same weights: encoders
(BERT, XLM-R, their one-label cross-encoders) with the real all-MiniLM WordPiece tokenizer, or
a small WordPiece trained here where real files cannot be had (the GPU machine has no package
index); decoder embedders (Qwen3-Embedding style) on the demo tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import transformers

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
# The trained WordPiece's alphabet and words: English and accented Latin, digits, punctuation.
_TRAINING_TEXT = (
    "the engine packs sequences of different lengths into one batch without padding . "
    "sovereign inference keeps prompts on hardware the organisation controls , "
    "embeddings rerank score query document paris capital france bananas yellow hello world "
    "dónde está la biblioteca municipal de sevilla café naïve ¿ ? ! 0 1 2 3 4 5 6 7 8 9 "
    "abcdefghijklmnopqrstuvwxyz"
)


def build(kind: str, out: Path, tokenizer_dir: Path | None = None, seed: int = 0) -> Path:
    """`kind`: bert | xlmr (embedders) or bert-cross | xlmr-cross (one-label cross-encoders);
    the tokenizer files of `tokenizer_dir`, or a small trained WordPiece (None)."""
    torch.manual_seed(seed)
    common = dict(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=128, max_position_embeddings=128, type_vocab_size=2)
    if kind.startswith("bert"):
        cfg = transformers.BertConfig(**common)
        cls = (transformers.BertForSequenceClassification if kind.endswith("cross")
               else transformers.BertModel)
    else:
        # pad 0: the WordPiece tokenizer's [PAD]; positions then start at 1, as RoBERTa's do
        # past its padding index.
        cfg = transformers.XLMRobertaConfig(**common, pad_token_id=0, bos_token_id=101,
                                            eos_token_id=102)
        cls = (transformers.XLMRobertaForSequenceClassification if kind.endswith("cross")
               else transformers.XLMRobertaModel)
    if kind.endswith("cross"):
        cfg.num_labels = 1
    model = cls(cfg).eval()
    model.save_pretrained(out)
    if tokenizer_dir is None:
        _trained_wordpiece(out)
    else:
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).exists():
                shutil.copy(tokenizer_dir / name, out / name)
    return out


def _trained_wordpiece(out: Path, vocab_size: int = 400) -> None:
    """A BERT-style uncased WordPiece tokenizer ([PAD] = 0, [CLS] ... [SEP], pairs with token
    types) trained on a few sentences, saved as a fast BertTokenizer."""
    import tokenizers as tk

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = tk.Tokenizer(tk.models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = tk.normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([_TRAINING_TEXT] * 4, tk.trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = tk.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = tk.decoders.WordPiece()
    fast = transformers.BertTokenizerFast(tokenizer_object=tok, model_max_length=512)
    fast.save_pretrained(out)


def sentence_transformers_files(out: Path, pooling: str, dim: int, normalize: bool) -> None:
    """`modules.json` and `1_Pooling/config.json` as sentence-transformers writes them:
    Transformer → Pooling(`pooling`: mean | cls | lasttoken) [→ Normalize]."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    (out / "modules.json").write_text(json.dumps(modules))
    (out / "1_Pooling").mkdir()
    keys = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
            "lasttoken": "pooling_mode_lasttoken"}
    modes = {key: mode == pooling for mode, key in keys.items()}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": dim, **modes}))


def build_decoder_embedders(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Qwen3 as {"lm": the causal LM, "headless": its Qwen3Model checkpoint,
    "st": the same weights as Qwen3-Embedding ships them (Qwen3ForCausalLM config, tied,
    sentence-transformers last-token + Normalize)}."""
    from tests.engine.tiny_models import build_tiny_model

    lm_dir = build_tiny_model(tmp_path_factory.mktemp("qwen3-lm"), "qwen3", seed=4)
    lm = transformers.AutoModelForCausalLM.from_pretrained(lm_dir, dtype=torch.float32)
    dirs = {"lm": lm_dir}
    for kind in ("headless", "st"):
        out = tmp_path_factory.mktemp(f"qwen3-{kind}")
        save_headless(lm, lm_dir, out)
        if kind == "st":
            cfg = json.loads((out / "config.json").read_text())
            cfg.update(architectures=["Qwen3ForCausalLM"], tie_word_embeddings=True)
            (out / "config.json").write_text(json.dumps(cfg))
            sentence_transformers_files(out, "lasttoken", 64, normalize=True)
        dirs[kind] = out
    return dirs


def save_headless(lm, lm_dir: Path, out: Path) -> None:
    """The decoder of causal LM `lm` alone (names without "model.", no head) and the
    tokenizer files of `lm_dir`, into `out`."""
    lm.model.save_pretrained(out)
    for f in lm_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)


def pad_with_eos(tok, vocab_size: int) -> None:
    """Pad with EOS where the tokenizer has no pad token inside the tiny vocabulary
    (transformers 5 gives a Qwen2 config's tokenizer an extra <|endoftext|> past it)."""
    if tok.pad_token_id is None or tok.pad_token_id >= vocab_size:
        tok.pad_token = tok.eos_token


def last_token_reference(path: Path, texts: list[str], side: str,
                         device: str = "cpu") -> torch.Tensor:  # fmt: skip
    """transformers, float32 on `device`: padded batch, the last non-pad token's state,
    L2-normalised (on the CPU)."""
    import torch.nn.functional as F

    tok = transformers.AutoTokenizer.from_pretrained(path, padding_side=side)
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).to(device).eval()
    pad_with_eos(tok, model.config.vocab_size)
    enc = tok(texts, padding=True, return_tensors="pt").to(device)
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    if side == "left":
        last = hidden[:, -1]
    else:
        last = hidden[torch.arange(len(texts), device=device), enc["attention_mask"].sum(1) - 1]
    return F.normalize(last, dim=-1).cpu()
