"""The demo's printed result on the session's fact world (publishing is tested in tests/hub)."""

from hub_msif.toy import demo


def test_demo_answers_the_examples_and_marks_true_proponents(fact_world):
    lines: list[str] = []
    results = demo.run(fact_world["factors"].parent, top=5, publish=False, echo=lines.append)
    text = "\n".join(lines)
    assert len(results) == 3 and text.count("\nQ: ") == 3
    assert "fine-tuned model answers" in text and "\ndone in " in text
    # the summary table (one row per question) under the legend of score and rel
    all_lines = text.rstrip().splitlines()
    header = next(n for n, line in enumerate(all_lines) if line.startswith("question "))
    table = all_lines[header:header + 4]
    assert table[0].startswith("question ") and "rank" in table[0] and "rel" in table[0]
    assert "\nscore: influence of the document on the answer" in text and "\nrel: score / the largest |score|" in text
    for item, row in zip(results, table[1:]):
        assert row.startswith(item["query"].prompt)
        if item["proponent"] is not None:
            assert row.split()[-3] == str(item["proponent"].rank) and item["proponent"].id in item["query"].proponents
    for item in results:
        query, result = item["query"], item["result"]
        assert result.answer_generated and result.method == "ms-if" and len(result.rows) == 5
        assert len(result.opponents) <= 5 and all(row.score < 0 for row in result.opponents)
        assert f"Q: {query.prompt}" in text
        assert f"log p(answer) = {result.answer_logprob:.3f})" in text and result.answer_logprob < 0
        for row in result.rows:
            star = "*" if row.id in query.proponents else " "
            assert f"  {star} {row.rank:>2}  score" in text
    # MS-IF puts a true proponent in the top 5 of at least one of the three example questions
    assert any(row.id in item["query"].proponents for item in results for row in item["result"].rows)


def test_demo_ends_with_its_folders_and_a_command_the_cli_runs(fact_world, capsys):
    """The closing lines name the demo's own (lasting) factor and index folders and a `hub-msif
    attribute` command on them that the real parser accepts and the real CLI runs."""
    import shlex
    from pathlib import Path

    from hub_msif.apps import cli
    from hub_msif.attribution.retrieval import DocumentIndex

    lines: list[str] = []
    results = demo.run(fact_world["factors"].parent, top=3, publish=False, echo=lines.append)
    closing = lines[-4:]
    assert closing[0].startswith("The factors and the index stay in the demo's cache")
    factors = Path(closing[1].split("factors", 1)[1].strip())
    index = Path(closing[2].split("index", 1)[1].strip())
    assert factors.is_absolute() and (factors / "msif.json").is_file()
    assert factors.resolve() == Path(fact_world["factors"]).resolve()
    assert index.is_absolute() and DocumentIndex.load(index).metadata["num_documents"] == len(fact_world["world"].documents)
    argv = shlex.split(closing[3])
    assert argv[:2] == ["hub-msif", "attribute"]
    args = cli.build_parser().parse_args(argv[1:])
    assert (Path(args.factors), Path(args.index)) == (factors, index)
    assert args.prompt == results[0]["query"].prompt
    capsys.readouterr()
    assert cli.main(argv[1:] + ["--top", "3"]) == 0  # runs as printed: the answer, its log p, both tables
    out = capsys.readouterr().out
    assert f"answer: {results[0]['result'].answer}" in out and "log p(answer) = " in out
    assert "opponents" in out
