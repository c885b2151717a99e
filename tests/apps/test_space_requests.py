"""The Space's requests without a page (``SpaceRequests``), and the argument checks shared by the
Attributor, the command line and the Space (``hub_msif.attribution.checks``; issue 20, item 2)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("gradio")

from hub_msif.apps.space import SpaceError, SpaceRequests, SpaceSettings  # noqa: E402
from hub_msif.apps.space.backend import Backend  # noqa: E402
from hub_msif.attribution import checks  # noqa: E402
from hub_msif.errors import MsifValueError  # noqa: E402

SETTINGS = SpaceSettings(max_prompt_tokens=24, max_candidates=150, concurrency=1, queue_size=8)


class NoBackend:
    """A backend that must not be reached: every check answers before anything loads."""

    def attributor(self, *args, **kwargs):
        raise AssertionError("loaded before the checks")

    index = describe = gradindex = attributor
    has_gradindex = False  # configured or not is known before anything loads


# --- the shared checks -------------------------------------------------------------------------


@pytest.mark.parametrize(("check", "value", "problem", "message"), [
    (checks.check_prompt, "  ", "empty", "the prompt is empty"),
    (checks.check_prompt, None, "empty", "the prompt is empty"),
    (checks.check_candidates, 0, "too_small", "the number of candidates must be at least 1, got 0"),
    (checks.check_candidates, -2.0, "too_small", "the number of candidates must be at least 1, got -2"),
    (checks.check_candidates, 2.5, "not_whole", "the number of candidates must be a whole number, got 2.5"),
    (checks.check_candidates, None, "not_whole", "the number of candidates must be a whole number, got None"),
    (checks.check_candidates, math.inf, "not_whole", "the number of candidates must be a whole number, got inf"),
    (checks.check_candidates, True, "not_whole", "the number of candidates must be a whole number, got True"),
    (checks.check_top, 0, "too_small", "top must be at least 1, got 0"),
    (checks.check_method, "tf-idf", "unknown", "unknown method 'tf-idf'; use one of ms-if, ss-if, gdp, repsim, bm25"),
    (checks.check_damping, 0, "not_positive", "damping must be a finite number above 0, got 0"),
    (checks.check_damping, math.nan, "not_positive", "damping must be a finite number above 0, got nan"),
    (checks.check_damping, "0.1", "not_number", "damping must be a finite number above 0, got '0.1'"),
    (checks.check_damping, None, "not_number", "damping must be a finite number above 0, got None"),
])
def test_a_shared_check_refuses_with_the_library_message_and_names_the_problem(check, value, problem, message):
    with pytest.raises(checks.ArgumentError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as info:
        check(value)
    assert isinstance(info.value, MsifValueError) and info.value.problem == problem


def test_shared_checks_return_what_they_accept():
    assert checks.check_prompt(" where ? ") == " where ? "
    assert checks.check_candidates(3.0) == 3 and isinstance(checks.check_candidates(3.0), int)
    assert checks.check_damping(1) == 1.0
    assert checks.check_methods(["gdp", "ms-if", "gdp"]) == ["gdp", "ms-if"]
    assert checks.check_dampings([0.1, 0.1, 1.0]) == [0.1, 1.0]
    with pytest.raises(checks.ArgumentError, match="unknown method ''"):
        checks.check_methods([])
    with pytest.raises(MsifValueError, match="give at least one damping"):
        checks.check_dampings([])


def test_the_cli_damping_option_uses_the_shared_check():
    import argparse

    from hub_msif.apps.arguments import positive_finite_float

    assert positive_finite_float("0.5") == 0.5
    for text in ("0", "-1", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be a finite number above 0, got {text}"):
            positive_finite_float(text)


# --- the Space's wording of them, before anything loads ------------------------------------------


@pytest.mark.parametrize(("call", "message"), [
    (lambda r: r.generate("   "), "The prompt is empty: type a question first."),
    (lambda r: r.attribute("", "", "ms-if", 0.1, 10, False), "The prompt is empty: type a question first."),
    (lambda r: r.attribute("q", "", "tf-idf", 0.1, 10, False),
     "Unknown method 'tf-idf'; use one of ms-if, ss-if, gdp, repsim, bm25."),
    (lambda r: r.attribute("q", "", "ms-if", 0.1, 0, False),
     "The number of candidates must be at least 1, got 0: zero candidates leave nothing to rank."),
    (lambda r: r.attribute("q", "", "ms-if", 0.1, 2.5, False), "The number of candidates must be a whole number, got 2.5."),
    (lambda r: r.attribute("q", "", "ms-if", 0.1, 151, False),
     "The number of candidates is 151; this Space scores at most 150 per request (MSIF_MAX_CANDIDATES)."),
    (lambda r: r.compare("q", "", -1, 10, False),
     "Damping must be a positive number (relative to the mean eigenvalue), got -1."),
    (lambda r: r.compare("q", "", None, 10, False), "Damping must be a positive number, got None."),
    (lambda r: r.attribute("q", "", "ms-if", 0.1, 10, False, "gradient"),
     "This Space has no gradient index (MSIF_GRADINDEX): its candidates come from the document index only."),
    (lambda r: r.compare("q", "", 0.1, 10, False, "both"),
     "This Space has no gradient index (MSIF_GRADINDEX): its candidates come from the document index only."),
    (lambda r: r.attribute("q", "", "ms-if", 0.1, 10, False, "bm25"),
     "Unknown candidate source 'bm25'; use one of embedding, gradient, both."),
])
def test_space_requests_refuse_bad_input_in_the_pages_words_before_loading(call, message):
    requests = SpaceRequests(NoBackend(), SETTINGS)
    with pytest.raises(SpaceError) as info:
        call(requests)
    assert str(info.value) == message


# --- the handlers on the fact world ----------------------------------------------------------------


@pytest.fixture(scope="module")
def requests(fact_world):
    return SpaceRequests(Backend(fact_world["factors"], fact_world["index_folder"]), SETTINGS, fact_world["examples"])


def test_attribute_ranks_the_true_proponents_and_returns_the_endpoints_outputs(requests, fact_world):
    query = fact_world["examples"][0]
    answer, logprob, table, opposing, _chart, status, shading, payload = requests.attribute(
        query.prompt, query.answer, "ms-if", 0.1, 50, False)
    assert answer == query.answer and logprob < 0
    assert len(table) == SETTINGS.top and list(table.columns)[:3] == ["rank", "score", "relative score"]
    assert "★ marks the" in status and "MS-IF" in status and "msif-token" in shading
    assert payload["answer_generated"] is False and payload["num_candidates"] == 50
    assert set(query.proponents) & {row["id"] for row in payload["rows"]}


def test_generate_compare_and_describe(requests, fact_world):
    query = fact_world["examples"][1]
    answer, status = requests.generate(query.prompt)
    assert answer.strip() and "generated greedily" in status
    answer, frame, status, summary = requests.compare(query.prompt, "", 0.1, 30, True)
    assert summary["answer"] == answer and summary["candidates"] == 30 and "(generated)" in status
    assert set(summary["top_ids"]) == set(checks.METHODS) and len(frame) == SETTINGS.top
    markdown, served, questions = requests.describe()
    assert "pre-trained model" in markdown and served["index"] == str(fact_world["index_folder"])
    assert questions == []  # the Space was given examples: the index's are not offered
    with pytest.raises(SpaceError, match="at most 24 tokens"):
        requests.attribute(" ".join(["where was ranusin born ?"] * 10), "", "ms-if", 0.1, 10, False)
