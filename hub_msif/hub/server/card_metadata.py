"""README front matter: the YAML a repo card starts with, and the tags the Hub derives from it.

Repo info and listings carry the parsed front matter as ``cardData`` and derived ``tags``, which
``list_datasets(filter=...)`` matches; ``/api/validate-yaml`` refuses a README
whose front matter does not parse, and so does a commit of such a README (400). YAML is read
with ``yaml.SafeLoader`` less aliases (``_NoAliasLoader``): an alias (``*name``) is refused, so a
few hundred bytes of nested aliases (a "billion laughs" card) can never expand into megabytes of
``cardData`` in every info and listing answer.
"""

from __future__ import annotations

import json

import yaml

# front matter keys whose values become "key:value" tags of a dataset
_DATASET_TAG_KEYS = ("task_categories", "task_ids", "language", "size_categories", "multilinguality",
                     "annotations_creators", "language_creators", "source_datasets")


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases (anchors alone are harmless)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{event.anchor}) are not allowed in a card",
                                              event.start_mark)
        return super().compose_node(parent, index)


def parse_front_matter(text: str) -> tuple[dict | None, str | None]:
    """``(front matter, None)`` of a README text, ``(None, None)`` when it has none, and
    ``(None, error message)`` when its ``---`` block is not a YAML mapping."""
    lines = text.lstrip().splitlines()
    if not lines or lines[0].rstrip() != "---":
        return None, None
    end = next((i for i in range(1, len(lines)) if lines[i].rstrip() == "---"), None)
    if end is None:
        return None, None
    try:
        data = yaml.load("\n".join(lines[1:end]), Loader=_NoAliasLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        return None, f"Invalid YAML in README.md front matter: {_one_line(err)}"
    if data is None:
        return {}, None
    if not isinstance(data, dict):
        return None, f"README.md front matter must be a YAML mapping, got {type(data).__name__}"
    # YAML dates and other non-JSON scalars become strings: the card goes out as JSON
    return json.loads(json.dumps(data, default=str)), None


def _one_line(err: yaml.YAMLError) -> str:
    problem, mark = getattr(err, "problem", None), getattr(err, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 2} of README.md)"  # +1 for 1-based, +1 for the opening ---
    return " ".join(str(err).split())


def card_tags(repo_type: str, card: dict | None) -> list[str]:
    """The tags of a ``repo_type`` repo whose front matter is ``card``: its ``tags``, ``license:*``,
    the dataset ``key:value`` tags or the model's library, pipeline and languages, and ``region:us``."""
    tags: list[str] = []

    def add(values) -> None:
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is not None and str(value) not in tags:
                tags.append(str(value))

    card = card or {}
    add(card.get("tags"))
    add([f"license:{v}" for v in _as_list(card.get("license"))])
    if repo_type == "dataset":
        for key in _DATASET_TAG_KEYS:
            add([f"{key}:{v}" for v in _as_list(card.get(key))])
    else:
        for key in ("library_name", "pipeline_tag", "language"):
            add(card.get(key))
    add("region:us")
    return tags


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
