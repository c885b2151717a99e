"""The demo's printed result on the session's fact world (publishing is tested in tests/hub)."""

from hub_msif.toy import demo


def test_demo_answers_the_examples_and_marks_true_proponents(fact_world):
    lines: list[str] = []
    results = demo.run(fact_world["factors"].parent, top=5, publish=False, echo=lines.append)
    text = "\n".join(lines)
    assert len(results) == 3 and text.count("\nQ: ") == 3
    assert "fine-tuned model answers" in text and "\ndone in " in text
    # it ends with the summary table (one row per question) under the legend of score and rel
    table = text.rstrip().splitlines()[-4:]
    assert table[0].startswith("question ") and "rank" in table[0] and "rel" in table[0]
    assert "\nscore: influence of the document on the answer" in text and "\nrel: score / the largest |score|" in text
    for item, row in zip(results, table[1:]):
        assert row.startswith(item["query"].prompt)
        if item["proponent"] is not None:
            assert row.split()[-3] == str(item["proponent"].rank) and item["proponent"].id in item["query"].proponents
    for item in results:
        query, result = item["query"], item["result"]
        assert result.answer_generated and result.method == "ms-if" and len(result.rows) == 5
        assert f"Q: {query.prompt}" in text
        for row in result.rows:
            star = "*" if row.id in query.proponents else " "
            assert f"  {star} {row.rank:>2}  score" in text
    # MS-IF puts a true proponent in the top 5 of at least one of the three example questions
    assert any(row.id in item["query"].proponents for item in results for row in item["result"].rows)
