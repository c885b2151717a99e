"""Bad input to every command, table-driven (issue 12, items 9 and 15; docs/design.md, "Command line").

Each case must end with a non-zero exit status and exactly one line on stderr, no traceback,
nothing on stdout, nothing written under the test's folder and nothing created on the Hub; and
it must be refused before any model loads or any server starts (``nothing_loads`` fails the
test otherwise). Cases run in-process through ``cli.main``; a few also as real processes.

Not repeated here: tests/factors/test_bad_input.py (fit: --max-length/--batch-size/--max-sequences
0, module specs, missing or malformed data) and tests/attribution/test_retrieval.py
(``index build``: missing columns, missing data, broken files).
"""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HUB_PORT, HUB_TOKENS
from test_cli import save_small_index

from hub_msif.apps import cli

HUB = {"push", "pull", "find-factors"}  # commands that talk to the Hub: run with the loopback server

# (case id, arguments, a piece of the error line). Placeholders: {tmp} the test's folder, {file} a
# file in it, {dir} an empty folder in it, {index} a valid index folder (outside it), {port} a busy
# port, {broken_root} a hub root with an unreadable tokens.json.
CASES = [
    # fit (the model folder never exists: every case must be refused before it is looked for)
    ("fit-no-args", "fit", "the following arguments are required: --model, --stage, --data, --out"),
    ("fit-no-out", "fit --model {tmp}/m --stage pretrained --data d.jsonl", "required: --out"),
    ("fit-bad-stage", "fit --model {tmp}/m --stage middle --data d.jsonl --out {tmp}/o", "invalid choice: 'middle'"),
    ("fit-max-length-1", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --max-length 1",
     "max length must be at least 2 tokens, got 1"),
    ("fit-max-length-text", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --max-length 5k",
     "argument --max-length: invalid int value: '5k'"),
    ("fit-batch-size-negative", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --batch-size -3",
     "batch size must be positive, got -3"),
    ("fit-batch-size-float", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --batch-size 2.5",
     "argument --batch-size: invalid int value: '2.5'"),
    ("fit-max-sequences-negative",
     "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --max-sequences -1",
     "max sequences must be positive, got -1"),
    ("fit-seed-negative", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --seed -1",
     "argument --seed: must be at least 0, got -1"),
    ("fit-seed-huge", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --seed 18446744073709551616",
     "argument --seed: must be at most 9223372036854775807"),
    ("fit-checkpoint-negative",
     "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --checkpoint-every -1",
     "argument --checkpoint-every: must be at least 0, got -1"),
    ("fit-bad-labels", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --labels greedy",
     "invalid choice: 'greedy'"),
    ("fit-bad-dtype", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --dtype int8",
     "invalid choice: 'int8'"),
    ("fit-out-is-a-file", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {file}",
     "--out {file} is a file, not a folder"),
    ("fit-out-under-a-file", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {file}/factors",
     "--out {file}/factors cannot be created: {file} is a file"),
    ("fit-empty-out", ["fit", "--model", "{tmp}/m", "--stage", "pretrained", "--data", "d.jsonl", "--out", ""],
     "argument --out: must not be empty"),
    ("fit-empty-model", ["fit", "--model", " ", "--stage", "pretrained", "--data", "d.jsonl", "--out", "{tmp}/o"],
     "argument --model: must not be empty"),
    ("fit-empty-data", ["fit", "--model", "{tmp}/m", "--stage", "pretrained", "--data", "", "--out", "{tmp}/o"],
     "argument --data: must not be empty"),
    ("fit-template-without-placeholder",
     "fit --model {tmp}/m --stage finetuned --data d.jsonl --out {tmp}/o --prompt-column q --response-column a "
     "--template Q:", "has no {{prompt}} placeholder"),
    ("fit-text-and-prompt-columns",
     "fit --model {tmp}/m --stage finetuned --data d.jsonl --out {tmp}/o --text-column t --prompt-column q "
     "--response-column a", "not both"),
    ("fit-reuse-with-pretrained-stage",
     "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --reuse-pretrained alice/x@v1",
     "--reuse-pretrained goes with --stage finetuned"),
    ("fit-reuse-missing-folder",
     "fit --model {tmp}/m --stage finetuned --data d.jsonl --out {tmp}/o --reuse-pretrained {tmp}/no-factors",
     "factor folder {tmp}/no-factors does not exist"),
    ("fit-model-name-is-a-path",
     "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --model-name /home/me/model",
     "argument --model-name: the model name '/home/me/model' is a path"),
    ("fit-unknown-option", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --epochs 3",
     "unrecognized arguments: --epochs 3"),
    # demo (a valid run would build the fact world: every case must stop before)
    ("demo-top-0", "demo --cache {tmp}/c --top 0", "argument --top: must be at least 1, got 0"),
    ("demo-top-negative", "demo --cache {tmp}/c --top -2", "argument --top: must be at least 1, got -2"),
    ("demo-top-text", "demo --cache {tmp}/c --top many", "argument --top: must be a whole number, got 'many'"),
    ("demo-port-0", "demo --cache {tmp}/c --space --port 0", "argument --port: must be at least 1, got 0"),
    ("demo-port-too-big", "demo --cache {tmp}/c --space --port 70000", "argument --port: must be at most 65535"),
    ("demo-cache-is-a-file", "demo --cache {file}", "--cache {file} is a file, not a folder"),
    ("demo-cache-under-a-file", "demo --cache {file}/demo", "{file} is a file, not a folder"),
    ("demo-empty-cache", ["demo", "--cache", ""], "argument --cache: must not be empty"),
    ("demo-unknown-option", "demo --cache {tmp}/c --fast", "unrecognized arguments: --fast"),
    # index build (a missing --data would load the embedding model first: tests/attribution covers it)
    ("index-no-action", "index", "required: ACTION"),
    ("index-no-args", "index build", "required: --data, --out"),
    ("index-batch-size-0", "index build --data d.jsonl --out {tmp}/i --batch-size 0",
     "argument --batch-size: must be at least 1, got 0"),
    ("index-batch-size-negative", "index build --data d.jsonl --out {tmp}/i --batch-size -64",
     "argument --batch-size: must be at least 1, got -64"),
    ("index-batch-size-text", "index build --data d.jsonl --out {tmp}/i --batch-size all",
     "argument --batch-size: must be a whole number, got 'all'"),
    ("index-bad-type", "index build --data d.jsonl --out {tmp}/i --index-type ivf", "invalid choice: 'ivf'"),
    ("index-out-is-a-file", "index build --data d.jsonl --out {file}", "--out {file} is a file, not a folder"),
    ("index-out-under-a-file", "index build --data d.jsonl --out {file}/index", "{file} is a file, not a folder"),
    ("index-empty-out", ["index", "build", "--data", "d.jsonl", "--out", ""], "argument --out: must not be empty"),
    ("index-empty-model", ["index", "build", "--data", "d.jsonl", "--out", "{tmp}/i", "--embedding-model", ""],
     "argument --embedding-model: must not be empty"),
    ("index-empty-text-column", ["index", "build", "--data", "d.jsonl", "--out", "{tmp}/i", "--text-column", ""],
     "argument --text-column: must not be empty"),
    # attribute ({index} is valid; {dir} passes the location check but holds no factors)
    ("attribute-no-args", "attribute", "one of the arguments --prompt --queries is required"),
    ("attribute-no-factors", "attribute --index {index} --prompt hi",
     "give --factors (a pair of stages), or --factors-pretrained and --factors-finetuned"),
    ("attribute-one-stage-only", "attribute --factors-pretrained {dir} --index {index} --prompt hi",
     "give --factors (a pair of stages), or --factors-pretrained and --factors-finetuned"),
    ("attribute-bad-model-path", "attribute --factors {dir} --index {index} --prompt hi --model-path nameonly",
     "argument --model-path: must be NAME=FOLDER"),
    ("attribute-missing-model-path", "attribute --factors {dir} --index {index} --prompt hi --model-path a={tmp}/none",
     "argument --model-path: no such model folder"),
    ("attribute-no-prompt", "attribute --factors {dir} --index {index}",
     "one of the arguments --prompt --queries is required"),
    ("attribute-no-index", "attribute --factors {dir} --prompt hi",
     "give --index, --gradindex or --documents: where the candidates come from"),
    ("attribute-gradient-without-gradindex", "attribute --factors {dir} --index {index} --prompt hi "
     "--candidates-from gradient", "--candidates-from gradient needs --gradindex (a gradient index)"),
    ("attribute-both-without-index", "attribute --factors {dir} --gradindex {dir} --prompt hi --candidates-from both",
     "--candidates-from both needs --index (a document index)"),
    ("attribute-candidates-from-documents", "attribute --factors {dir} --documents {jsonl[docs]} --prompt hi "
     "--candidates-from embedding", "--candidates-from goes with --index and --gradindex, not with --documents"),
    ("attribute-bad-candidates-from", "attribute --factors {dir} --index {index} --prompt hi --candidates-from bm25",
     "invalid choice: 'bm25'"),
    ("attribute-missing-gradindex", "attribute --factors {dir} --gradindex {tmp}/nope --prompt hi",
     "gradient index folder {tmp}/nope does not exist"),
    # gradindex check (issue 18): refused before any index or model loads
    ("gradindex-check-missing-index", "gradindex check --index {tmp}/nope --queries {jsonl[good]} --sample 1 "
     "--factors {dir}", "gradient index folder {tmp}/nope does not exist"),
    ("gradindex-check-sample-0", "gradindex check --index {dir} --queries {jsonl[good]} --sample 0 --factors {dir}",
     "argument --sample: must be at least 1, got 0"),
    ("gradindex-check-no-factors", "gradindex check --index {dir} --queries {jsonl[good]} --sample 2",
     "give --factors (a pair of stages) or --factors-finetuned"),
    ("gradindex-check-record-hub", "gradindex check --index alice/gradindex@v1 --queries {jsonl[good]} --sample 2 "
     "--factors {dir} --record", "--record writes into a local gradient index folder"),
    ("attribute-top-0", "attribute --factors {dir} --index {index} --prompt hi --top 0",
     "argument --top: must be at least 1, got 0"),
    ("attribute-top-negative", "attribute --factors {dir} --index {index} --prompt hi --top -1",
     "argument --top: must be at least 1, got -1"),
    ("attribute-top-float", "attribute --factors {dir} --index {index} --prompt hi --top 1.5",
     "argument --top: must be a whole number, got '1.5'"),
    ("attribute-candidates-0", "attribute --factors {dir} --index {index} --prompt hi --candidates 0",
     "argument --candidates: must be at least 1, got 0"),
    ("attribute-candidates-text", "attribute --factors {dir} --index {index} --prompt hi --candidates lots",
     "argument --candidates: must be a whole number"),
    *[(f"attribute-damping-{name}", f"attribute --factors {{dir}} --index {{index}} --prompt hi --damping={value}",
       f"argument --damping: must be a {'number' if name == 'text' else 'finite number above 0'}")
      for name, value in [("0", "0"), ("negative", "-0.1"), ("nan", "nan"), ("inf", "inf"), ("minus-inf", "-inf"),
                          ("overflow", "1e400"), ("text", "small")]],
    ("attribute-empty-prompt", ["attribute", "--factors", "{dir}", "--index", "{index}", "--prompt", ""],
     "argument --prompt: must not be empty"),
    ("attribute-blank-prompt", ["attribute", "--factors", "{dir}", "--index", "{index}", "--prompt", " \n\t "],
     "argument --prompt: must not be empty"),
    ("attribute-empty-answer", ["attribute", "--factors", "{dir}", "--index", "{index}", "--prompt", "hi",
                                "--answer", ""], "argument --answer: must not be empty"),
    ("attribute-bad-method", "attribute --factors {dir} --index {index} --prompt hi --method tracin",
     "invalid choice: 'tracin'"),
    ("attribute-bad-modules", "attribute --factors {dir} --index {index} --prompt hi --modules attn",
     "invalid choice: 'attn'"),
    ("attribute-empty-factors", ["attribute", "--factors", "", "--index", "{index}", "--prompt", "hi"],
     "argument --factors: must not be empty"),
    ("attribute-missing-factors", "attribute --factors {tmp}/nope --index {index} --prompt hi",
     "factor folder {tmp}/nope does not exist"),
    ("attribute-factors-is-a-file", "attribute --factors {file} --index {index} --prompt hi",
     "factor folder {file} is a file, not a folder"),
    ("attribute-factors-empty-revision", "attribute --factors alice/factors@ --index {index} --prompt hi",
     "empty revision after '@'"),
    ("attribute-factors-bad-location", "attribute --factors a/b/c@v1 --index {index} --prompt hi",
     "is neither a local folder nor a Hub location"),
    ("attribute-factors-without-manifest", "attribute --factors {dir} --index {index} --prompt hi", "msif.json"),
    ("attribute-index-as-factors", "attribute --factors {index} --index {index} --prompt hi", "msif.json"),
    ("attribute-missing-index", "attribute --factors {dir} --index {tmp}/nope --prompt hi",
     "index folder {tmp}/nope does not exist"),
    ("attribute-index-is-a-file", "attribute --factors {dir} --index {file} --prompt hi",
     "index folder {file} is a file, not a folder"),
    ("attribute-index-without-manifest", "attribute --factors {dir} --index {dir} --prompt hi", "index.json"),
    ("attribute-missing-pretrained", "attribute --factors {dir} --index {index} --prompt hi --pretrained ./no-model",
     "model folder no-model does not exist"),
    ("attribute-finetuned-is-a-file", "attribute --factors {dir} --index {index} --prompt hi --finetuned {file}",
     "model folder {file} is a file"),
    ("attribute-empty-token", ["attribute", "--factors", "{dir}", "--index", "{index}", "--prompt", "hi",
                               "--token", ""], "argument --token: must not be empty"),
    # attribute --queries / --documents / --threads: files checked whole, before any model loads
    ("attribute-threads-0", "attribute --factors {dir} --index {index} --prompt hi --threads 0",
     "argument --threads: must be at least 1, got 0"),
    ("attribute-threads-negative", "attribute --factors {dir} --index {index} --prompt hi --threads -4",
     "argument --threads: must be at least 1, got -4"),
    ("attribute-threads-text", "attribute --factors {dir} --index {index} --prompt hi --threads all",
     "argument --threads: must be a whole number, got 'all'"),
    ("attribute-prompt-and-queries", "attribute --factors {dir} --index {index} --prompt hi --queries {jsonl[good]}",
     "argument --queries: not allowed with argument --prompt"),
    ("attribute-index-and-documents", "attribute --factors {dir} --index {index} --documents {jsonl[docs]} --prompt hi",
     "--documents are scored as they are: not with --index or --gradindex"),
    ("attribute-answer-with-queries", "attribute --factors {dir} --index {index} --queries {jsonl[good]} --answer a",
     "--answer goes with --prompt"),
    ("queries-missing-file", "attribute --factors {dir} --index {index} --queries {tmp}/nope.jsonl",
     "queries file {tmp}/nope.jsonl does not exist"),
    ("queries-folder", "attribute --factors {dir} --index {index} --queries {dir}", "queries file {dir} is not a file"),
    ("queries-empty-file", "attribute --factors {dir} --index {index} --queries {jsonl[empty]}",
     "queries file {jsonl[empty]} is empty: no queries in it"),
    ("queries-blank-lines-only", "attribute --factors {dir} --index {index} --queries {jsonl[blank]}",
     "queries file {jsonl[blank]} is empty"),
    ("queries-bad-json-line", "attribute --factors {dir} --index {index} --queries {jsonl[bad_json]}",
     "{jsonl[bad_json]} line 2: not valid JSON"),
    ("queries-nan", "attribute --factors {dir} --index {index} --queries {jsonl[nan]}",
     "{jsonl[nan]} line 1: not valid JSON (NaN is not a JSON number)"),
    ("queries-not-an-object", "attribute --factors {dir} --index {index} --queries {jsonl[list]}",
     "{jsonl[list]} line 1: expected a JSON object with prompt, answer, id, got list"),
    ("queries-missing-prompt", "attribute --factors {dir} --index {index} --queries {jsonl[no_prompt]}",
     "{jsonl[no_prompt]} line 3: no 'prompt' field"),
    ("queries-blank-prompt", "attribute --factors {dir} --index {index} --queries {jsonl[blank_prompt]}",
     "{jsonl[blank_prompt]} line 1: 'prompt' is empty"),
    ("queries-prompt-not-text", "attribute --factors {dir} --index {index} --queries {jsonl[prompt_number]}",
     "{jsonl[prompt_number]} line 1: 'prompt' must be a string, got int"),
    ("queries-empty-answer", "attribute --factors {dir} --index {index} --queries {jsonl[empty_answer]}",
     "{jsonl[empty_answer]} line 1: 'answer' is empty"),
    ("queries-misspelt-field", "attribute --factors {dir} --index {index} --queries {jsonl[typo]}",
     "{jsonl[typo]} line 1: unknown field 'anwser' (fields: prompt, answer, id)"),
    ("queries-bad-id", "attribute --factors {dir} --index {index} --queries {jsonl[bad_id]}",
     "{jsonl[bad_id]} line 1: 'id' must be a string or a whole number, got list"),
    ("queries-bool-id", "attribute --factors {dir} --index {index} --queries {jsonl[bool_id]}",
     "{jsonl[bool_id]} line 1: 'id' must be a string or a whole number, got bool"),
    ("queries-empty-id", "attribute --factors {dir} --index {index} --queries {jsonl[empty_id]}",
     "{jsonl[empty_id]} line 1: 'id' is empty"),
    ("queries-repeated-id", "attribute --factors {dir} --index {index} --queries {jsonl[repeated_id]}",
     "{jsonl[repeated_id]} line 2: id 'q1' is already used on line 1"),
    ("queries-default-id-taken", "attribute --factors {dir} --index {index} --queries {jsonl[default_id_taken]}",
     "{jsonl[default_id_taken]} line 2: has no id, and its default (the line number 2) is the id of line 1"),
    ("queries-not-utf8", "attribute --factors {dir} --index {index} --queries {jsonl[latin1]}",
     "{jsonl[latin1]} line 2: not UTF-8 text"),
    ("documents-empty-file", "attribute --factors {dir} --documents {jsonl[empty]} --prompt hi",
     "documents file {jsonl[empty]} is empty: no documents in it"),
    ("documents-missing-id", "attribute --factors {dir} --documents {jsonl[doc_no_id]} --prompt hi",
     "{jsonl[doc_no_id]} line 2: no 'id' field"),
    ("documents-missing-text", "attribute --factors {dir} --documents {jsonl[doc_no_text]} --prompt hi",
     "{jsonl[doc_no_text]} line 1: no 'text' field"),
    ("documents-blank-text", "attribute --factors {dir} --documents {jsonl[doc_blank_text]} --prompt hi",
     "{jsonl[doc_blank_text]} line 1: 'text' is empty"),
    ("documents-repeated-id", "attribute --factors {dir} --documents {jsonl[doc_repeated_id]} --prompt hi",
     "{jsonl[doc_repeated_id]} line 2: id '7' is already used on line 1"),
    ("documents-bad-json-line", "attribute --factors {dir} --documents {jsonl[doc_bad_json]} --queries {jsonl[good]}",
     "{jsonl[doc_bad_json]} line 2: not valid JSON"),
    ("documents-unknown-field", "attribute --factors {dir} --documents {jsonl[good]} --prompt hi",
     "{jsonl[good]} line 1: unknown field 'prompt' (fields: id, text)"),
    ("queries-with-missing-factors", "attribute --factors {tmp}/nope --index {index} --queries {jsonl[good]}",
     "factor folder {tmp}/nope does not exist"),
    # text that is not Unicode (issue 21, items 4 and 6): refused before any model loads, naming the
    # file and line, or the option
    ("queries-lone-surrogate-prompt", "attribute --factors {dir} --index {index} --queries {jsonl[surrogate_prompt]}",
     "{jsonl[surrogate_prompt]} line 2: 'prompt' holds a lone surrogate (\\ud800 at character 5)"),
    ("queries-lone-surrogate-id", "attribute --factors {dir} --index {index} --queries {jsonl[surrogate_id]}",
     "{jsonl[surrogate_id]} line 1: 'id' holds a lone surrogate (\\udfff at character 1)"),
    ("queries-lone-surrogate-answer", "attribute --factors {dir} --index {index} --queries {jsonl[surrogate_answer]}",
     "{jsonl[surrogate_answer]} line 1: 'answer' holds a lone surrogate"),
    ("documents-lone-surrogate-text", "attribute --factors {dir} --documents {jsonl[doc_surrogate]} --prompt hi",
     "{jsonl[doc_surrogate]} line 2: 'text' holds a lone surrogate (\\udc80 at character 0)"),
    ("documents-lone-surrogate-id", "attribute --factors {dir} --documents {jsonl[doc_surrogate_id]} --prompt hi",
     "{jsonl[doc_surrogate_id]} line 1: 'id' holds a lone surrogate"),
    ("attribute-prompt-not-utf8", ["attribute", "--factors", "{dir}", "--index", "{index}", "--prompt", "caf\udce9"],
     "argument --prompt: holds the byte 0xe9, which is not UTF-8, at character 3"),
    ("attribute-answer-not-utf8", ["attribute", "--factors", "{dir}", "--index", "{index}", "--prompt", "hi",
                                   "--answer", "\udcff"], "argument --answer: holds the byte 0xff"),
    ("attribute-prompt-lone-surrogate", ["attribute", "--factors", "{dir}", "--index", "{index}", "--prompt",
                                         "a\ud800"], "argument --prompt: holds a lone surrogate \\ud800"),
    ("index-example-not-utf8", ["index", "build", "--data", "d.jsonl", "--out", "{tmp}/i", "--example", "\udce9?"],
     "argument --example: holds the byte 0xe9"),
    ("push-message-not-utf8", ["push", "index", "{index}", "--repo", "alice/x", "--message", "v\udce9"],
     "argument --message: holds the byte 0xe9"),
    # --threads on the other heavy commands
    ("fit-threads-0", "fit --model {tmp}/m --stage pretrained --data d.jsonl --out {tmp}/o --threads 0",
     "argument --threads: must be at least 1, got 0"),
    ("index-threads-0", "index build --data d.jsonl --out {tmp}/i --threads 0", "argument --threads: must be at least 1"),
    ("demo-threads-0", "demo --cache {tmp}/c --threads 0", "argument --threads: must be at least 1, got 0"),
    # push space --wheel: a file name pip would refuse in requirements.txt (issue 21, item 3a)
    ("push-space-wheel-duplicate-download",
     ["push", "space", "--repo", "alice/cli-space", "--factors", "alice/f@v1", "--index", "alice/i@v1", "--wheel",
      "{tmp}/hub_msif-0.1.0-py3-none-any (1).whl"],
     "--wheel 'hub_msif-0.1.0-py3-none-any (1).whl': not a hub_msif wheel file name"),
    ("push-space-wheel-platform", "push space --repo alice/cli-space --factors alice/f@v1 --index alice/i@v1 --wheel "
     "{tmp}/hub_msif-0.1.0-cp311-cp311-linux_x86_64.whl", "not a pure-Python wheel"),
    # push --model-name (what a card calls a local model)
    ("push-model-name-path", "push factors {dir} --repo alice/x --model-name pretrained=/home/me/model",
     "the model name '/home/me/model' is a path"),
    ("push-model-name-relative-path", "push index {index} --repo alice/x --model-name ./models/enc",
     "the model name './models/enc' is a path"),
    ("push-model-name-no-stage", "push factors {dir} --repo alice/x --model-name acme/base",
     "must look like pretrained=NAME or finetuned=NAME"),
    ("push-model-name-bad-stage", "push factors {dir} --repo alice/x --model-name middle=acme/base",
     "must look like pretrained=NAME or finetuned=NAME"),
    ("push-bad-stage", "push factors {dir} --repo alice/x --stage middle", "argument --stage: invalid choice: 'middle'"),
    ("push-model-name-empty", ["push", "factors", "{dir}", "--repo", "alice/x", "--model-name", "finetuned="],
     "a model name must not be empty"),
    ("push-model-name-twice", "push factors {dir} --repo alice/x --model-name finetuned=a --model-name finetuned=b",
     "--model-name finetuned= is given twice"),
    ("push-model-name-for-a-hub-embedding-model", "push index {index} --repo alice/cli-hub-model-name --model-name enc",
     "is a Hub model: its card names it by its id"),
    # push ({index} is a valid index folder: refusals must come before anything is uploaded)
    ("push-no-artifact", "push", "required: ARTIFACT"),
    ("push-bad-artifact", "push model {index} --repo alice/x", "invalid choice: 'model'"),
    ("push-no-repo", "push index {index}", "required: --repo"),
    ("push-no-folder", "push index --repo alice/x", "required: folder"),
    ("push-empty-repo", ["push", "index", "{index}", "--repo", ""], "argument --repo: must not be empty"),
    ("push-repo-without-namespace", "push index {index} --repo just-a-name", "'just-a-name' is not of the form"),
    ("push-repo-three-parts", "push index {index} --repo alice/x/y", "'alice/x/y' is not of the form"),
    ("push-repo-bad-characters", ["push", "index", "{index}", "--repo", "alice/no spaces!"], "is not of the form"),
    ("push-repo-with-revision", "push index {index} --repo alice/x@v1", "'alice/x@v1' is not of the form"),
    ("push-missing-folder", "push index {tmp}/nope --repo alice/x", "index folder {tmp}/nope does not exist"),
    ("push-folder-is-a-file", "push factors {file} --repo alice/x", "factor folder {file} is a file, not a folder"),
    ("push-folder-without-manifest", "push factors {dir} --repo alice/x", "msif.json"),
    # hand-edited factor folders (issue 21, items 1 and 2): refused before anything is uploaded
    ("push-factors-swapped-module-names", "push factors {factors[swapped]} --repo alice/cli-hand-edited",
     "layers.0.mlp.safetensors as the finetuned factors of module 'layers.1.mlp', but the file holds the finetuned "
     "factors of module 'layers.0.mlp'"),
    ("push-factors-module-listed-twice", "push factors {factors[twice]} --repo alice/cli-hand-edited",
     "stage 'pretrained' lists module 'layers.1.mlp' twice"),
    ("push-factors-symlink-outside", "push factors {factors[symlink]} --repo alice/cli-hand-edited",
     "which is a symbolic link (or lies under one) to a file outside the folder"),
    ("pull-factors-module-listed-twice", "pull factors {factors[twice]}", "lists module 'layers.1.mlp' twice"),
    ("attribute-factors-module-listed-twice", "attribute --factors {factors[twice]} --index {index} --prompt hi",
     "lists module 'layers.1.mlp' twice"),
    ("push-index-as-factors", "push factors {index} --repo alice/x", "msif.json"),
    ("push-tag-main", "push index {index} --repo alice/cli-bad-tag --tag main", "not a usable version name"),
    ("push-tag-with-space", ["push", "index", "{index}", "--repo", "alice/cli-bad-tag", "--tag", "v 1"],
     "not a usable version name"),
    ("push-tag-commit-sha", "push index {index} --repo alice/cli-bad-tag --tag " + "a" * 40, "not a usable version name"),
    ("push-empty-tag", ["push", "index", "{index}", "--repo", "alice/x", "--tag", ""], "argument --tag: must not be empty"),
    ("push-empty-token", ["push", "index", "{index}", "--repo", "alice/x", "--token", ""],
     "argument --token: must not be empty"),
    ("push-unknown-token", "push index {index} --repo alice/cli-bad-token --token not-a-token", "alice/cli-bad-token"),
    ("push-read-only-token", "push index {index} --repo carol/cli-read-only --token test-token-carol-read",
     "carol/cli-read-only"),
    ("push-other-namespace", "push index {index} --repo bob/cli-not-alice", "bob/cli-not-alice"),
    # pull
    ("pull-no-location", "pull factors", "required: location"),
    ("pull-bad-artifact", "pull model alice/x", "invalid choice: 'model'"),
    ("pull-empty-location", ["pull", "factors", ""], "argument location: must not be empty"),
    ("pull-empty-revision", "pull factors alice/factors@", "empty revision after '@'"),
    ("pull-bad-location", "pull index a/b/c@v1", "is neither a local folder nor a Hub location"),
    ("pull-missing-repo", "pull factors alice/cli-no-such-factors", "alice/cli-no-such-factors"),
    ("pull-missing-repo-at-tag", "pull index alice/cli-no-such-index@v1", "alice/cli-no-such-index"),
    ("pull-missing-revision", "pull index alice/cli-bad-input-index@v99", "v99"),
    ("pull-index-repo-as-factors", "pull factors alice/cli-bad-input-index@v1", "msif.json"),
    ("pull-missing-folder", "pull factors {tmp}/nope", "{tmp}/nope"),
    ("pull-folder-without-manifest", "pull index {dir}", "index.json"),
    ("pull-bad-modules", "pull factors alice/x --modules attn", "invalid choice: 'attn'"),
    ("pull-unknown-token", "pull index alice/cli-bad-input-index@v1 --token not-a-token", "alice/cli-bad-input-index"),
    # find-factors
    ("find-no-args", "find-factors", "give --model (its published stages), or --pretrained and --finetuned (a pair)"),
    ("find-no-finetuned", "find-factors --pretrained a/b", "a pair needs both --pretrained and --finetuned"),
    ("find-model-and-pair", "find-factors --model a/b --pretrained a/b --finetuned a/c",
     "give --model (its published stages), or --pretrained and --finetuned (a pair)"),
    ("find-pair-with-stage", "find-factors --pretrained a/b --finetuned a/c --stage pretrained",
     "--revision and --stage go with --model"),
    ("find-bad-stage", "find-factors --model a/b --stage both", "argument --stage: invalid choice"),
    ("find-empty-pretrained", ["find-factors", "--pretrained", "", "--finetuned", "a/b"],
     "argument --pretrained: must not be empty"),
    ("find-empty-author", ["find-factors", "--pretrained", "a/b", "--finetuned", "a/c", "--author", ""],
     "argument --author: must not be empty"),
    ("find-missing-local-model", "find-factors --pretrained {tmp}/no-model --finetuned a/b",
     "model folder {tmp}/no-model does not exist"),
    ("find-model-is-a-file", "find-factors --pretrained a/b --finetuned {file}", "model folder {file} is a file"),
    ("find-missing-hub-model", "find-factors --pretrained alice/cli-no-such-model --finetuned alice/cli-no-such-model",
     "alice/cli-no-such-model"),
    # hub serve (serve_forever is refused by nothing_loads: no case may get that far)
    ("serve-no-action", "hub", "required: ACTION"),
    ("serve-no-root", "hub serve", "required: --root"),
    ("serve-port-too-big", "hub serve --root {tmp}/hub --port 99999", "argument --port: must be at most 65535, got 99999"),
    ("serve-port-negative", "hub serve --root {tmp}/hub --port -1", "argument --port: must be at least 0, got -1"),
    ("serve-port-text", "hub serve --root {tmp}/hub --port http", "argument --port: must be a whole number, got 'http'"),
    ("serve-port-busy", "hub serve --root {tmp}/hub --port {port}", "cannot listen on 127.0.0.1 port {port}"),
    ("serve-unknown-host", "hub serve --root {tmp}/hub --host no-such-host.invalid --port 0",
     "cannot listen on no-such-host.invalid port 0"),
    ("serve-empty-host", ["hub", "serve", "--root", "{tmp}/hub", "--host", ""], "argument --host: must not be empty"),
    ("serve-root-is-a-file", "hub serve --root {file}", "--root {file} is a file, not a folder"),
    ("serve-root-under-a-file", "hub serve --root {file}/hub --port 0",
     "--root {file}/hub cannot be created: {file} is a file"),
    ("serve-empty-root", ["hub", "serve", "--root", ""], "argument --root: must not be empty"),
    ("serve-broken-tokens-file", "hub serve --root {broken_root} --port 0 --token t=dave",
     "{broken_root}/tokens.json cannot be read"),
    ("serve-token-without-user", "hub serve --root {tmp}/hub --token secret", "--token must look like"),
    ("serve-token-bad-name", "hub serve --root {tmp}/hub --token t=bad--name", "invalid user or org name 'bad--name'"),
    ("serve-token-empty", ["hub", "serve", "--root", "{tmp}/hub", "--token", "=dave"], "--token must look like"),
    ("serve-max-request-bytes-zero", "hub serve --root {tmp}/hub --max-request-bytes 0",
     "argument --max-request-bytes: must be at least 1, got 0"),
    ("serve-max-request-bytes-text", "hub serve --root {tmp}/hub --max-request-bytes 100MB",
     "argument --max-request-bytes: must be a whole number, got '100MB'"),
    # no command at all
    ("no-command", [], "required: COMMAND"),
    ("unknown-command", "train --model x", "invalid choice: 'train'"),
]


def _command(case_args: list[str]) -> str:
    """The command a case runs (its first argument; "" for none)."""
    return case_args[0] if case_args else ""


@pytest.fixture(scope="module")
def small_index(tmp_path_factory) -> Path:
    return save_small_index(tmp_path_factory.mktemp("cli-bad-input") / "index")


@pytest.fixture(scope="module")
def hub_with_index(hub_root, small_index):
    """The loopback Hub (as conftest's ``hub_server``, but one for the module: starting and stopping
    it per case would take most of the table's time) holding a published index repo, to name wrong
    revisions and artifacts of."""
    from hub_msif.hub import push_index
    from hub_msif.hub.server import HubServer

    with HubServer(hub_root, host="127.0.0.1", port=HUB_PORT, tokens=HUB_TOKENS) as server:
        push_index(small_index, "alice/cli-bad-input-index", token="test-token-alice")  # again: stays v1
        yield server


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test when a case gets as far as loading a model, building the demo or serving."""
    import transformers

    import hub_msif.toy.demo as demo
    from hub_msif.hub.server import HubServer

    def refuse(*args, **kwargs):
        raise AssertionError("bad input was not refused before the work started")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(demo, "prepare", refuse)
    monkeypatch.setattr(demo, "run", refuse)
    monkeypatch.setattr(HubServer, "serve_forever", refuse)
    monkeypatch.delenv("HUB_MSIF_DEBUG", raising=False)


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def _fill(args, places: dict) -> list[str]:
    args = args.split() if isinstance(args, str) else args
    return [a.format(**places) for a in args]


def _hand_edited(root: Path) -> dict[str, Path]:
    """Two-stage factor folders of two modules (identity factors; no model needed: every refusal
    comes first), each with one hand edit of its manifest or files (issue 21, items 1 and 2)."""
    import json
    import shutil

    import torch

    from hub_msif.factors.architectures import TrackedModule
    from hub_msif.factors.ekfac import ModuleFactors
    from hub_msif.factors.storage import save_stage

    good = root / "good"
    factors = {name: ModuleFactors(TrackedModule(name, "mlp", 3, 2, False, False), torch.eye(3), torch.eye(2)[None],
                                   torch.ones(1, 2, 3), torch.ones(3), torch.ones(1, 2))
               for name in ("layers.0.mlp", "layers.1.mlp")}
    for stage in ("pretrained", "finetuned"):
        save_stage(good, stage, factors, {"model": {"id": f"acme/{stage}", "revision": "0" * 40}})
    outside = root / "outside.safetensors"
    shutil.copyfile(good / "pretrained" / "mlp" / "layers.0.mlp.safetensors", outside)

    def edited(name: str, change) -> Path:
        folder = Path(shutil.copytree(good, root / name, symlinks=True))
        manifest = json.loads((folder / "msif.json").read_text())
        change(folder, manifest, manifest["stages"]["pretrained"]["modules"],
               manifest["stages"]["finetuned"]["modules"])
        (folder / "msif.json").write_text(json.dumps(manifest))
        return folder

    def swap(folder, manifest, pre, fine):
        fine[0]["name"], fine[1]["name"] = fine[1]["name"], fine[0]["name"]

    def link(folder, manifest, pre, fine):
        (folder / pre[0]["file"]).unlink()
        (folder / pre[0]["file"]).symlink_to(outside)

    return {
        "swapped": edited("swapped", swap),
        "twice": edited("twice", lambda f, m, pre, fine: pre.append(dict(pre[1]))),
        "outside": edited("outside", lambda f, m, pre, fine: pre[0].update(file="../outside.safetensors")),
        "absolute": edited("absolute", lambda f, m, pre, fine: pre[0].update(file=str(outside))),
        "symlink": edited("symlink", link),
    }


@pytest.fixture(scope="module")
def hand_edited(tmp_path_factory) -> dict[str, Path]:
    return _hand_edited(tmp_path_factory.mktemp("hand-edited"))


def _places(tmp_path: Path, small_index: Path, busy_port: int, factors: dict | None = None) -> dict:
    (tmp_path / "a-file").write_text("not a folder\n")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken-root"
    broken.mkdir()
    (broken / "tokens.json").write_text("{not json")
    files = tmp_path / "jsonl"
    files.mkdir()
    jsonl = {}
    for name, content in JSONL_FILES.items():
        jsonl[name] = files / f"{name}.jsonl"
        jsonl[name].write_bytes(content if isinstance(content, bytes) else content.encode())
    return {"tmp": tmp_path, "file": tmp_path / "a-file", "dir": tmp_path / "empty", "index": small_index,
            "port": busy_port, "broken_root": broken, "jsonl": jsonl, "factors": factors or {}}


# Query and document files of the --queries / --documents cases ({jsonl[name]}).
JSONL_FILES = {
    "good": '{"prompt": "where was kili born ?", "id": "q1"}\n',
    "docs": '{"id": "d1", "text": "kili was born in quito ."}\n',
    "empty": "",
    "blank": "\n   \n\t\n",
    "bad_json": '{"prompt": "a"}\n{"prompt": "b",}\n',
    "nan": '{"prompt": "a", "id": NaN}\n',
    "list": '["where was kili born ?"]\n',
    "no_prompt": '{"prompt": "a"}\n\n{"answer": "quito"}\n',
    "blank_prompt": '{"prompt": "  "}\n',
    "prompt_number": '{"prompt": 3}\n',
    "empty_answer": '{"prompt": "a", "answer": ""}\n',
    "typo": '{"prompt": "a", "anwser": "quito"}\n',
    "bad_id": '{"prompt": "a", "id": ["q"]}\n',
    "bool_id": '{"prompt": "a", "id": true}\n',
    "empty_id": '{"prompt": "a", "id": ""}\n',
    "repeated_id": '{"prompt": "a", "id": "q1"}\n{"prompt": "b", "id": "q1"}\n',
    "default_id_taken": '{"prompt": "a", "id": 2}\n{"prompt": "b"}\n',
    "latin1": '{"prompt": "a"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"),
    "doc_bad_json": '{"id": "d1", "text": "a"}\n{"id": "d2", "text": "b"\n',
    "doc_no_id": '{"id": "d1", "text": "a"}\n{"text": "b"}\n',
    "doc_no_text": '{"id": "d1"}\n',
    "doc_blank_text": '{"id": "d1", "text": ""}\n',
    "doc_repeated_id": '{"id": 7, "text": "a"}\n{"id": "7", "text": "b"}\n',
    "surrogate_prompt": '{"prompt": "a"}\n{"prompt": "where\\ud800 was kili born ?"}\n',
    "surrogate_id": '{"prompt": "a", "id": "q\\udfff"}\n',
    "surrogate_answer": '{"prompt": "a", "answer": "\\ud83d"}\n',
    "doc_surrogate": '{"id": "d1", "text": "a"}\n{"id": "d2", "text": "\\udc80 b"}\n',
    "doc_surrogate_id": '{"id": "\\ud800", "text": "a"}\n',
}


def _assert_one_error_line(err: str, expected: str) -> None:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{err}"
    # "hub-msif fit: error: ...", "hub-msif push index: error: ..." (argparse names the subcommand
    # it was parsing; unknown options and commands are the top level's: "hub-msif: error: ...")
    assert re.match(r"hub-msif( [a-z-]+)*: error: ", lines[0]), lines[0]
    assert expected in lines[0], f"{expected!r} not in {lines[0]!r}"


@pytest.mark.parametrize("case, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line_before_any_work(case, args, expected, tmp_path, small_index, busy_port,
                                                         nothing_loads, hub_root, hand_edited, request, capsys):
    places = _places(tmp_path, small_index, busy_port, hand_edited)
    argv = _fill(args, places)
    command = _command(argv)
    if command in HUB:
        request.getfixturevalue("hub_with_index")
        capsys.readouterr()  # the first push's progress bars
    from huggingface_hub import constants

    def downloaded() -> set[Path]:  # huggingface_hub's own markers (.no_exist, refs) do not count
        return set(Path(constants.HF_HUB_CACHE).glob("*/blobs/*"))

    before, hub_before, cache_before = _snapshot(tmp_path), _snapshot(hub_root), downloaded()
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's refusals
        status = exit_.code
    captured = capsys.readouterr()
    assert status == 2, captured.err
    _assert_one_error_line(captured.err, expected.format(**places))
    assert captured.out == ""
    assert _snapshot(tmp_path) == before, "a refused command wrote files"
    assert _snapshot(hub_root) == hub_before, "a refused command changed the Hub"
    assert downloaded() == cache_before, "a refused command downloaded files"


def test_the_table_covers_every_command():
    placeholders = dict.fromkeys(["tmp", "file", "dir", "index", "port", "broken_root"], "x")
    covered = {tuple(_fill(args, {**placeholders, "jsonl": dict.fromkeys(JSONL_FILES, "x"),
                                  "factors": dict.fromkeys(["swapped", "twice", "outside", "absolute", "symlink"], "x")})[:2])
               for _, args, _ in CASES}
    commands = {("fit",), ("demo",), ("index", "build"), ("attribute",), ("push", "factors"), ("push", "index"),
                ("pull", "factors"), ("pull", "index"), ("find-factors",), ("hub", "serve")}
    for command in commands:
        assert any(c[:len(command)] == command for c in covered), command


# --- the same as real processes: the exit status and stderr a shell sees ---------------------------

SUBPROCESS_CASES = ["attribute-top-0", "attribute-damping-nan", "attribute-blank-prompt", "serve-port-too-big",
                    "serve-root-is-a-file", "demo-cache-is-a-file", "push-repo-without-namespace", "no-command",
                    "queries-bad-json-line", "queries-missing-prompt", "attribute-threads-0",
                    "attribute-prompt-not-utf8", "queries-lone-surrogate-prompt"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_as_a_process_exits_2_with_one_line(case, tmp_path, small_index, busy_port):
    _, args, expected = next(c for c in CASES if c[0] == case)
    places = _places(tmp_path, small_index, busy_port)
    argv = _fill(args, places)
    before = _snapshot(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "HUB_MSIF_DEBUG"}
    result = subprocess.run([sys.executable, "-m", "hub_msif", *argv], capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 2, result.stderr
    _assert_one_error_line(result.stderr, expected.format(**places))
    assert result.stdout == ""
    assert _snapshot(tmp_path) == before


def test_json_lines_split_at_newlines_only(tmp_path):
    """U+2028, U+2029 and U+0085 are legal unescaped inside JSON strings, and str.splitlines() breaks
    lines at them (issue 21, item 5): a line ends at \\n only, a trailing \\r dropped."""
    from hub_msif.apps.inputs import read_documents, read_queries

    odd = "a\u2028b\u2029c\x85d \x1c\x1d\x1e\x0b\x0c e"  # the control characters travel escaped
    lines = [json.dumps({"prompt": odd, "id": "q1"}, ensure_ascii=False), "",
             json.dumps({"prompt": "\U0001f600 ok", "answer": odd}, ensure_ascii=False)]
    assert "\u2028" in lines[0] and "\\u001c" in lines[0]
    queries = tmp_path / "queries.jsonl"
    queries.write_bytes("\r\n".join(lines).encode("utf-8") + b"\r\n")
    read = read_queries(queries)
    assert [(q.prompt, q.answer, q.id, q.line) for q in read] == [(odd, None, "q1", 1), ("\U0001f600 ok", odd, 3, 3)]
    documents = tmp_path / "documents.jsonl"
    documents.write_text(json.dumps({"id": "d\u2028", "text": odd}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_documents(documents) == [{"id": "d\u2028", "text": odd}]


def test_a_wheel_file_name_is_written_in_its_canonical_form():
    from hub_msif.hub.space_push import canonical_wheel_name

    assert canonical_wheel_name("hub_msif-0.1.0-py3-none-any.whl") == "hub_msif-0.1.0-py3-none-any.whl"
    assert canonical_wheel_name("Hub.MSIF-0.1.0-py3-none-any.whl") == "hub_msif-0.1.0-py3-none-any.whl"
    assert canonical_wheel_name("hub_msif-0.2.0-1-py2.py3-none-any.whl") == "hub_msif-0.2.0-1-py2.py3-none-any.whl"
