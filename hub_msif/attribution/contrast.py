"""Contrastive queries: the answer's gradient minus that with the prompt's subject neutralised.

A fact query's gradient mixes what the model knows about the subject with what it knows about the
answer word alone (how likely the city is anywhere). Subtracting the gradient of the same answer
after a prompt whose subject span is replaced by one neutral token keeps the part that depends on
the subject (docs/design.md, "Contrastive queries"). Scores are linear in the query gradient, so a
contrastive score is exactly the plain score minus the neutralised prompt's score.

The span is given (the subject's text, found in the prompt), or found from the prompt: the run of
at most ``max_words`` whitespace-separated words whose replacement by the neutral token lowers the
answer's log-probability the most under the fine-tuned model (an occlusion search).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from hub_msif.errors import MsifValueError

CONTRASTS = ("subject",)
DEFAULT_SPAN_WORDS = 3


def check_contrast(contrast: str | None) -> str | None:
    if contrast is not None and contrast not in CONTRASTS:
        raise MsifValueError(f"contrast must be one of {', '.join(CONTRASTS)} (or none), not {contrast!r}")
    return contrast


def neutral_token(tokenizer) -> str:
    """The text of the tokenizer's unknown token, else of its end-of-sequence token."""
    token = getattr(tokenizer, "unk_token", None) or getattr(tokenizer, "eos_token", None)
    if not token:
        raise MsifValueError("the tokenizer has neither an unknown nor an end-of-sequence token to neutralise a subject")
    return str(token)


def replace_subject(prompt: str, subject: str, neutral: str) -> str:
    """``prompt`` with the first occurrence of ``subject`` replaced by ``neutral``."""
    if not subject or not subject.strip():
        raise MsifValueError("the subject to contrast is empty")
    if subject not in prompt:
        raise MsifValueError(f"the subject {subject!r} does not occur in the prompt {prompt!r}")
    return prompt.replace(subject, neutral, 1)


def subject_spans(prompt: str, neutral: str, max_words: int = DEFAULT_SPAN_WORDS) -> list[tuple[str, str]]:
    """Every ``(span, neutralised prompt)`` with a run of 1..``max_words`` words of ``prompt``
    replaced by ``neutral``, in order of start word, then length."""
    words = prompt.split()
    if not words:
        raise MsifValueError("the prompt has no words to contrast")
    if max_words < 1:
        raise MsifValueError(f"a subject span has at least one word, not {max_words}")
    return [(" ".join(words[i:j]), " ".join(words[:i] + [neutral] + words[j:]))
            for i in range(len(words)) for j in range(i + 1, min(len(words), i + max_words) + 1)]


def find_subject(prompt: str, answer: str, neutral: str,
                 logprobs: Callable[[Sequence[tuple[str, str]]], Sequence[float]],
                 max_words: int = DEFAULT_SPAN_WORDS) -> str:
    """The span of ``prompt`` whose neutralisation lowers ``logprobs`` of ``answer`` the most (the
    first such span on ties); ``logprobs`` maps (prompt, answer) pairs to answer log-probabilities."""
    spans = subject_spans(prompt, neutral, max_words)
    values = list(logprobs([(variant, answer) for _, variant in spans]))
    if len(values) != len(spans):
        raise MsifValueError(f"{len(values)} log-probabilities for {len(spans)} spans")
    best = min(range(len(spans)), key=lambda i: (values[i], i))
    return spans[best][0]


def subject_for(prompt: str, subject: str | Mapping[str, str] | None) -> str | None:
    """The given subject of ``prompt``: the one string for every prompt, its entry in a mapping
    (prompt -> subject), or None (to be found)."""
    if subject is None or isinstance(subject, str):
        return subject
    return subject.get(prompt)
