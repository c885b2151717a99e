"""A small bundled example: a word-level tokenizer, a templated corpus and tiny causal LMs.

Everything is built locally and deterministically from a seed (no download), for the demo and
the tests. ``tiny_model`` builds GPT-NeoX, BLOOM, GPT-2 or Llama (with grouped-query attention).
"""

from __future__ import annotations

import random
from typing import Any

import torch

from hub_msif.errors import MsifValueError

SUBJECTS = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a farmer", "the child", "our neighbour"]
VERBS = ["sees", "likes", "finds", "paints", "carries", "follows", "remembers", "visits"]
OBJECTS = ["the river", "a red apple", "the market", "a small house", "the mountain", "an old book", "the garden", "a blue boat"]
PLACES = ["in the morning", "at night", "near the sea", "in the city", "after the rain", "before dinner"]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]


def example_texts(n: int = 200, seed: int = 0) -> list[str]:
    """``n`` templated sentences (a learnable toy corpus)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
        if rng.random() < 0.6:
            parts.append(rng.choice(PLACES))
        sentence = " ".join(parts) + " ."
        if rng.random() < 0.4:
            sentence += " then " + " ".join([rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]) + " ."
        texts.append(sentence)
    return texts


def word_tokenizer(texts: list[str]):
    """A ``PreTrainedTokenizerFast`` with one token per lower-cased word of ``texts``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in t.lower().split()})
    vocab = {tok: i for i, tok in enumerate(SPECIAL + words)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", vocab["[BOS]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def tiny_model(arch: str = "gpt_neox", vocab_size: int = 64, hidden: int = 32, layers: int = 2, heads: int = 4,
               kv_heads: int = 2, ffn: int = 64, seed: int = 0, dtype: torch.dtype = torch.float32,
               max_positions: int = 256):
    """A randomly initialised tiny causal LM of the given architecture (eager attention)."""
    from transformers import AutoModelForCausalLM, BloomConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, PretrainedConfig

    common: dict[str, Any] = dict(vocab_size=vocab_size, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    config: PretrainedConfig
    if arch == "gpt_neox":
        config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                               intermediate_size=ffn, max_position_embeddings=max_positions, **common)
    elif arch == "bloom":
        config = BloomConfig(hidden_size=hidden, n_layer=layers, n_head=heads, **common)
    elif arch == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_inner=ffn, n_positions=max_positions, **common)
    elif arch == "llama":
        config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv_heads, intermediate_size=ffn, max_position_embeddings=max_positions, **common)
    else:
        raise MsifValueError(f"unknown example architecture {arch!r}")
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(dtype)
    return model.eval()


def train_briefly(model, tokenizer, texts: list[str], steps: int = 60, batch_size: int = 16, lr: float = 3e-3, seed: int = 0):
    """A few AdamW steps of next-token training, so the example model is not pure noise."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        batch = tokenizer(rng.sample(texts, min(batch_size, len(texts))), return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
