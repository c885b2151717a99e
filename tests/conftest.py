"""Shared test set-up: offline Hugging Face libraries and small deterministic inputs."""

import os

# Read once at import by huggingface_hub / datasets / transformers: set before any of them loads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def random_sequences(n: int, vocab_size: int, min_len: int = 3, max_len: int = 12, seed: int = 0,
                     prompt_len: int = 0) -> list[dict]:
    """``n`` token sequences of varying length (so batches carry padding).

    With ``prompt_len`` > 0 the first tokens carry no loss (label -100), like instruction data.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(4, vocab_size) for _ in range(length)]
        labels = [-100 if i < prompt_len else t for i, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels})
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
