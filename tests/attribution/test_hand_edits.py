"""Hand edits of a factor folder's manifest never give silently wrong scores (issue 21, items 1
and 2; docs/design.md, "Artifact formats").

A property test: 200 random edits of a valid pair folder's ``msif.json`` (a module renamed,
listed twice, dropped, two names or two files swapped, an entry moved to the other stage, a file
path pointed out of the folder, a file replaced by a link out of it; and edits that change nothing
that matters: entries reordered, a file moved inside the folder with its path updated). Each
``Attributor`` + ``attribute`` either refuses with one line (a hub_msif error) or gives exactly the
untouched folder's scores.
"""

import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import fit_tiny_pair, save_tiny_pair

from hub_msif.attribution.attributor import Attributor
from hub_msif.errors import MsifError
from hub_msif.toy.examples import example_texts

pytestmark = pytest.mark.usefixtures("one_thread")

TRIALS = 200
DOCUMENTS = [{"id": i, "text": t} for i, t in enumerate(example_texts(6, seed=5))]
PROMPT, ANSWER = "what does the cat see ?", "the river"
STAGES = ("pretrained", "finetuned")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hand-edits")
    models = save_tiny_pair(root)
    factors = root / "factors"
    fit_tiny_pair(models, factors, max_length=32, max_sequences=16)
    return {"factors": factors, "scores": _scores(factors), "outside": root}


def _scores(folder: Path) -> dict[str, float]:
    result = Attributor(folder).attribute(PROMPT, ANSWER, documents=DOCUMENTS, top=len(DOCUMENTS))
    return {row.id: row.score for row in result.rows}


# -- the edits: each changes a copy of the folder (and its manifest) in place ---------------------------
def _rename(rng, folder, manifest, stage, modules):
    entry = rng.choice(modules)
    others = [m["name"] for m in modules if m is not entry]
    names = {rng.choice(others), entry["name"] + ".x", entry["name"].replace(".0.", ".1.")} - {entry["name"]}
    entry["name"] = rng.choice(sorted(names))


def _duplicate(rng, folder, manifest, stage, modules):
    modules.insert(rng.randrange(len(modules) + 1), dict(rng.choice(modules)))


def _drop(rng, folder, manifest, stage, modules):
    modules.pop(rng.randrange(len(modules)))


def _swap_names(rng, folder, manifest, stage, modules):
    a, b = rng.sample(modules, 2)
    a["name"], b["name"] = b["name"], a["name"]


def _swap_files(rng, folder, manifest, stage, modules):
    a, b = rng.sample(modules, 2)
    for key in ("file", "sha256"):
        a[key], b[key] = b[key], a[key]


def _cross_stage(rng, folder, manifest, stage, modules):
    other = manifest["stages"][STAGES[1 - STAGES.index(stage)]]["modules"]
    i = rng.randrange(len(modules))
    j = next(k for k, m in enumerate(other) if m["name"] == modules[i]["name"])
    modules[i], other[j] = other[j], modules[i]


def _path_out(rng, folder, manifest, stage, modules):
    entry = rng.choice(modules)
    outside = folder.parent / "outside.safetensors"
    shutil.copyfile(folder / entry["file"], outside)  # the same bytes: its sha256 matches
    entry["file"] = rng.choice(["../outside.safetensors", str(outside), f"{stage}/../../outside.safetensors",
                                "/etc/passwd", "../../../../../../etc/passwd", "./" + entry["file"],
                                entry["file"].replace("/", "\\")])


def _link_out(rng, folder, manifest, stage, modules):
    entry = rng.choice(modules)
    path = folder / entry["file"]
    if rng.random() < 0.5:  # the file is a link to a copy of itself outside
        outside = folder.parent / f"outside-{path.name}"
        shutil.copyfile(path, outside)
        path.unlink()
        path.symlink_to(outside)
    else:  # its folder is
        outside = folder.parent / "outside-folder"
        shutil.copytree(path.parent, outside)
        shutil.rmtree(path.parent)
        path.parent.symlink_to(outside, target_is_directory=True)


def _reorder(rng, folder, manifest, stage, modules):
    rng.shuffle(modules)


def _move_inside(rng, folder, manifest, stage, modules):
    entry = rng.choice(modules)
    moved = f"{stage}/moved/{rng.randrange(10**6)}.bin"
    (folder / moved).parent.mkdir(parents=True, exist_ok=True)
    if rng.random() < 0.5:
        (folder / entry["file"]).rename(folder / moved)
    else:  # a link that stays inside the folder
        (folder / moved).symlink_to((folder / entry["file"]).resolve())
    entry["file"] = moved


REFUSED = [_rename, _duplicate, _drop, _swap_names, _swap_files, _cross_stage, _path_out, _link_out]
HARMLESS = [_reorder, _move_inside]


def test_random_hand_edits_are_refused_in_one_line_or_change_nothing(pair, tmp_path):
    rng = random.Random(21)
    outcomes = {"refused": 0, "equal": 0}
    for trial in range(TRIALS):
        edit = rng.choice(REFUSED + HARMLESS)
        stage = rng.choice(STAGES)
        folder = Path(shutil.copytree(pair["factors"], tmp_path / f"trial-{trial}" / "factors"))
        manifest = json.loads((folder / "msif.json").read_text())
        edit(rng, folder, manifest, stage, manifest["stages"][stage]["modules"])
        (folder / "msif.json").write_text(json.dumps(manifest))
        try:
            scores = _scores(folder)
        except MsifError as err:
            message = str(err)
            assert message and "\n" not in message, (edit.__name__, message)
            assert "sha256" not in message, (edit.__name__, message)  # nothing outside was hashed
            outcomes["refused"] += 1
        else:
            assert edit in HARMLESS, f"trial {trial}: {edit.__name__} of the {stage} stage was accepted"
            assert scores.keys() == pair["scores"].keys()
            for key, score in scores.items():
                assert score == pytest.approx(pair["scores"][key], rel=1e-6, abs=1e-9), (trial, edit.__name__)
            outcomes["equal"] += 1
        shutil.rmtree(tmp_path / f"trial-{trial}")
    assert outcomes["refused"] > 100 and outcomes["equal"] > 10, outcomes
