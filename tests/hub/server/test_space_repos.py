"""Space repos on the loopback Hub server (hub_msif/hub/server/space_repos.py), through the real client.

A Space is created with an sdk (and optionally hardware), takes commits and LFS files like any
repo, downloads with ``snapshot_download(repo_type="space")``, reports its runtime, records
hardware requests, and is listed by the datasets and models its card names.
"""

import uuid

import pytest
from huggingface_hub import CommitOperationAdd, HfApi, snapshot_download
from huggingface_hub.errors import BadRequestError, HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.utils import get_session, hf_raise_for_status

BOB = "test-token-bob"
README = "---\nsdk: gradio\napp_file: app.py\ndatasets:\n- {factors}\n- alice/other-index\nmodels:\n- org/model\n---\n# hi\n"


def _space() -> str:
    return f"alice/hs-space-{uuid.uuid4().hex[:8]}"


def test_a_space_is_created_committed_downloaded_and_described(hub_server, tmp_path):
    api = HfApi()
    repo = _space()
    url = api.create_repo(repo, repo_type="space", space_sdk="gradio", space_hardware="t4-small")
    assert str(url).endswith(f"/spaces/{repo}")
    info = api.space_info(repo)
    assert info.sdk == "gradio" and info.runtime.stage == "NO_APP_FILE"
    assert info.runtime.requested_hardware == "t4-small"
    factors = f"alice/f-{uuid.uuid4().hex[:6]}"
    wheel = b"PK\x03\x04" + bytes(range(256)) * 64  # binary: goes up through LFS
    api.create_commit(repo, [CommitOperationAdd("app.py", b"print('hi')\n"),
                             CommitOperationAdd("README.md", README.format(factors=factors).encode()),
                             CommitOperationAdd("pkg-0.1-py3-none-any.whl", wheel)],
                      repo_type="space", commit_message="the app")
    info = api.space_info(repo, files_metadata=True)
    assert info.runtime.stage == "STOPPED"  # stored, never run
    assert info.datasets == [factors, "alice/other-index"] and info.models == ["org/model"]
    lfs = {s.rfilename: s.lfs for s in info.siblings}
    assert lfs["pkg-0.1-py3-none-any.whl"] is not None and lfs["app.py"] is None
    folder = tmp_path / "space"
    snapshot_download(repo, repo_type="space", local_dir=folder)
    assert (folder / "pkg-0.1-py3-none-any.whl").read_bytes() == wheel
    assert (folder / "app.py").read_text() == "print('hi')\n"
    runtime = api.request_space_hardware(repo, "a10g-small")
    assert runtime.requested_hardware == "a10g-small"
    assert api.get_space_runtime(repo).requested_hardware == "a10g-small"

    assert [s.id for s in api.list_spaces(datasets=factors)] == [repo]
    assert [s.id for s in api.list_spaces(datasets=[factors, "alice/other-index"], models="org/model")] == [repo]
    assert [s.id for s in api.list_spaces(datasets=f"{factors}-not")] == []
    api.delete_repo(repo, repo_type="space")
    with pytest.raises(RepositoryNotFoundError):
        api.space_info(repo)


def test_a_space_needs_an_sdk_and_keeps_its_owner_rights(hub_server):
    api = HfApi()
    repo = _space()
    # the client itself insists on an sdk: ask the API directly
    response = get_session().post(f"{api.endpoint}/api/repos/create", headers=api._build_hf_headers(),
                                  json={"name": repo.split("/")[1], "type": "space"})
    with pytest.raises(BadRequestError, match="sdk"):
        hf_raise_for_status(response)
    api.create_repo(repo, repo_type="space", space_sdk="gradio", private=True)
    bob = HfApi(token=BOB)
    with pytest.raises(RepositoryNotFoundError):
        bob.space_info(repo)  # private: alice's only
    with pytest.raises(HfHubHTTPError) as info:
        bob.request_space_hardware(repo, "t4-small")
    assert info.value.response.status_code == 404
    # exist_ok: a second creation is a 409 the client accepts
    api.create_repo(repo, repo_type="space", space_sdk="gradio", exist_ok=True)
    assert api.space_info(repo).private is True
