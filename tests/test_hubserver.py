"""The local Hub (tests/hubserver.py) against huggingface_hub, unmodified: what the upload worker
relies on (private repos, LFS and regular files, sub-path listings, folder deletions, refs,
partial snapshots) answers as the Hub does, and each injected fault reaches the client as the
real failure would.

Run:  pytest tests/test_hubserver.py      (a few seconds; no engine needed)
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlsplit

import httpx2
import pytest
from hubserver import Commit, FakeHub
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile, RepoFolder

TOKEN = "hf_writerTOKEN0123456789"
REPO = "alice/sana-ckpt"
RUN = "checkpoints/abc123"
CONFIG = b'{"step": 10, "lr": 0.0001}\n'
WEIGHTS = os.urandom(150_000)  # binary and > 100 kB: an LFS file
OPTIMIZER = b"\0\1\2" * 1000  # binary: LFS although small


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob_oid(data: bytes) -> str:
    """git hash-object, computed here rather than taken from the server under test."""
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@pytest.fixture(autouse=True)
def lfs_only(monkeypatch):
    """hf_xet is installed; the local Hub speaks LFS only (what HF_HUB_DISABLE_XET=1 sets at import)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def hub():
    with FakeHub() as server:
        server.write_tokens.add(TOKEN)
        yield server


@pytest.fixture
def api(hub):
    return HfApi(endpoint=hub.url, token=TOKEN)


def push_checkpoints(api: HfApi) -> str:
    """A private repo holding two checkpoints of one run and a README; returns the commit sha."""
    api.create_repo(REPO, exist_ok=True, private=True)
    files = {
        f"{RUN}/checkpoint-10/config.json": CONFIG,
        f"{RUN}/checkpoint-10/model.safetensors": WEIGHTS,
        f"{RUN}/checkpoint-10/optimizer/state.bin": OPTIMIZER,
        f"{RUN}/checkpoint-20/config.json": CONFIG.replace(b"10", b"20"),
        "README.md": b"# tiny\n",
    }
    info = api.create_commit(REPO, operations=[CommitOperationAdd(p, d) for p, d in files.items()],
                             commit_message="checkpoints 10 and 20")
    return info.oid


def test_private_repo_holds_regular_and_lfs_files_committed_once(hub, api):
    sha = push_checkpoints(api)
    repo = hub.repos[("model", REPO)]
    assert repo.private and api.repo_info(REPO).private is True
    assert repo.commits == [sha] and repo.sha == sha
    assert repo.history == [Commit(sha=sha, message="checkpoints 10 and 20", added={
        f"{RUN}/checkpoint-10/config.json": sha256(CONFIG),
        f"{RUN}/checkpoint-10/model.safetensors": sha256(WEIGHTS),
        f"{RUN}/checkpoint-10/optimizer/state.bin": sha256(OPTIMIZER),
        f"{RUN}/checkpoint-20/config.json": sha256(CONFIG.replace(b"10", b"20")),
        "README.md": sha256(b"# tiny\n"),
    }, deleted=[])]
    assert repo.lfs == {f"{RUN}/checkpoint-10/model.safetensors", f"{RUN}/checkpoint-10/optimizer/state.bin"}
    assert repo.files[f"{RUN}/checkpoint-10/model.safetensors"] == WEIGHTS
    # Private: hidden from anonymous callers and from unknown tokens, as on the Hub.
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token=False).repo_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub.url, token="hf_someoneElse").repo_info(REPO)
    # Committing the same content again is no commit at all: huggingface_hub skips it.
    again = api.create_commit(REPO, operations=[CommitOperationAdd(f"{RUN}/checkpoint-10/model.safetensors", WEIGHTS),
                                                CommitOperationAdd(f"{RUN}/checkpoint-10/config.json", CONFIG)],
                              commit_message="same again")
    assert again.oid == sha and repo.commits == [sha] and hub.hits("POST", "/commit/") == 1


def test_tree_of_a_sub_path_lists_blob_ids_and_lfs_sha256(api):
    push_checkpoints(api)
    entries = list(api.list_repo_tree(REPO, path_in_repo=RUN, recursive=True))
    files = {e.path: e for e in entries if isinstance(e, RepoFile)}
    folders = {e.path for e in entries if isinstance(e, RepoFolder)}
    assert folders == {f"{RUN}/checkpoint-10", f"{RUN}/checkpoint-10/optimizer", f"{RUN}/checkpoint-20"}
    assert set(files) == {f"{RUN}/checkpoint-10/config.json", f"{RUN}/checkpoint-10/model.safetensors",
                          f"{RUN}/checkpoint-10/optimizer/state.bin", f"{RUN}/checkpoint-20/config.json"}
    config = files[f"{RUN}/checkpoint-10/config.json"]
    assert (config.size, config.blob_id, config.lfs) == (len(CONFIG), blob_oid(CONFIG), None)
    for name, data in (("model.safetensors", WEIGHTS), ("optimizer/state.bin", OPTIMIZER)):
        entry = files[f"{RUN}/checkpoint-10/{name}"]
        assert entry.lfs is not None and entry.lfs.sha256 == sha256(data)
        assert entry.size == entry.lfs.size == len(data)
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256(data)}\nsize {len(data)}\n".encode()
        assert entry.blob_id == blob_oid(pointer) and entry.lfs.pointer_size == len(pointer)
    # Not recursive: the folder's own children only.
    top = {e.path for e in api.list_repo_tree(REPO, path_in_repo=f"{RUN}/checkpoint-10")}
    assert top == {f"{RUN}/checkpoint-10/config.json", f"{RUN}/checkpoint-10/model.safetensors",
                   f"{RUN}/checkpoint-10/optimizer"}
    assert {e.path for e in api.list_repo_tree(REPO)} == {"README.md", "checkpoints"}
    info = {e.path: e for e in api.get_paths_info(REPO, [f"{RUN}/checkpoint-20", "README.md", "missing.txt"])}
    assert isinstance(info[f"{RUN}/checkpoint-20"], RepoFolder) and info["README.md"].blob_id == blob_oid(b"# tiny\n")
    assert set(info) == {f"{RUN}/checkpoint-20", "README.md"}


def test_tree_of_a_missing_path_raises_entry_not_found(hub, api):
    push_checkpoints(api)
    with pytest.raises(EntryNotFoundError) as missing:
        list(api.list_repo_tree(REPO, path_in_repo="checkpoints/never-pushed", recursive=True))
    assert isinstance(missing.value, RemoteEntryNotFoundError) and missing.value.response.status_code == 404
    api.create_repo("alice/empty")
    with pytest.raises(RemoteEntryNotFoundError):
        list(api.list_repo_tree("alice/empty", path_in_repo=RUN, recursive=True))
    assert list(api.list_repo_tree("alice/empty", recursive=True)) == []


def test_delete_folder_removes_it_and_nothing_else(hub, api):
    push_checkpoints(api)
    info = api.create_commit(REPO, commit_message="drop checkpoint-10", operations=[
        CommitOperationDelete(path_in_repo=f"{RUN}/checkpoint-10/", is_folder=True)])
    repo = hub.repos[("model", REPO)]
    assert sorted(repo.files) == ["README.md", f"{RUN}/checkpoint-20/config.json"]
    assert repo.lfs == set() and repo.sha == info.oid and len(repo.commits) == 2
    assert repo.history[-1] == Commit(sha=info.oid, message="drop checkpoint-10", added={},
                                      deleted=[f"{RUN}/checkpoint-10/"])
    with pytest.raises(RemoteEntryNotFoundError):  # deleting what is gone: 404, as for a missing file
        api.create_commit(REPO, commit_message="again", operations=[
            CommitOperationDelete(path_in_repo=f"{RUN}/checkpoint-10/", is_folder=True)])
    with pytest.raises(RemoteEntryNotFoundError):
        api.create_commit(REPO, commit_message="file", operations=[CommitOperationDelete(path_in_repo="nope.txt")])
    assert len(repo.commits) == 2
    hub.lenient_folder_deletes = True
    api.create_commit(REPO, commit_message="lenient", operations=[
        CommitOperationDelete(path_in_repo=f"{RUN}/checkpoint-10/", is_folder=True)])
    assert len(repo.commits) == 3 and sorted(repo.files) == ["README.md", f"{RUN}/checkpoint-20/config.json"]


def test_list_repo_refs_follows_main(hub, api):
    first = push_checkpoints(api)
    refs = api.list_repo_refs(REPO)
    assert [(b.name, b.ref, b.target_commit) for b in refs.branches] == [("main", "refs/heads/main", first)]
    assert refs.tags == [] and refs.converts == []
    second = api.create_commit(REPO, commit_message="more", operations=[CommitOperationAdd("b.txt", b"b")]).oid
    assert second != first
    assert [b.target_commit for b in api.list_repo_refs(REPO).branches] == [second]
    assert api.list_repo_refs(REPO, include_pull_requests=True).pull_requests == []


def test_snapshot_download_of_a_sub_folder_is_byte_equal(hub, api, tmp_path):
    push_checkpoints(api)
    local = tmp_path / "local"
    snapshot_download(REPO, allow_patterns=[f"{RUN}/checkpoint-10/*"], local_dir=local, endpoint=hub.url,
                      token=TOKEN, cache_dir=tmp_path / "cache")
    got = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*")
           if p.is_file() and ".cache" not in p.relative_to(local).parts}
    repo = hub.repos[("model", REPO)]
    assert got == {p: d for p, d in repo.files.items() if p.startswith(f"{RUN}/checkpoint-10/")}
    assert len(got) == 3 and got[f"{RUN}/checkpoint-10/model.safetensors"] == WEIGHTS


def test_hf_hub_download_of_lfs_and_regular_files(hub, api, tmp_path):
    sha = push_checkpoints(api)
    name = f"{RUN}/checkpoint-10/model.safetensors"
    meta = get_hf_file_metadata(hf_hub_url(REPO, name, endpoint=hub.url), token=TOKEN)
    assert (meta.etag, meta.size, meta.commit_hash) == (sha256(WEIGHTS), len(WEIGHTS), sha)
    path = hf_hub_download(REPO, name, endpoint=hub.url, token=TOKEN, local_dir=tmp_path / "d",
                           cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == WEIGHTS
    config = hf_hub_download(REPO, f"{RUN}/checkpoint-10/config.json", endpoint=hub.url, token=TOKEN,
                             local_dir=tmp_path / "d", cache_dir=tmp_path / "cache")
    assert Path(config).read_bytes() == CONFIG
    # A commit sha stays downloadable after newer commits.
    api.create_commit(REPO, commit_message="newer", operations=[CommitOperationAdd(name, b"\0new")])
    old = hf_hub_download(REPO, name, revision=sha, endpoint=hub.url, token=TOKEN, cache_dir=tmp_path / "cache2")
    assert Path(old).read_bytes() == WEIGHTS


def test_apply_then_drop_applies_the_commit_and_loses_the_reply(hub, api):
    push_checkpoints(api)
    hub.fail("POST", "/commit/", "apply-then-drop")
    with pytest.raises(httpx2.RemoteProtocolError):  # not an HfHubHTTPError: no answer came
        api.create_commit(REPO, commit_message="lost reply", operations=[CommitOperationAdd("late.txt", b"late")])
    repo = hub.repos[("model", REPO)]
    assert repo.files["late.txt"] == b"late" and len(repo.commits) == 2
    assert repo.history[-1].message == "lost reply" and repo.history[-1].added == {"late.txt": sha256(b"late")}
    # The fault was used up: the next call gets an answer.
    assert [b.target_commit for b in api.list_repo_refs(REPO).branches] == [repo.sha]


def test_drop_loses_the_commit(hub, api):
    push_checkpoints(api)
    hub.fail("POST", "/commit/", "drop")
    with pytest.raises(httpx2.RemoteProtocolError):
        api.create_commit(REPO, commit_message="dropped", operations=[CommitOperationAdd("late.txt", b"late")])
    assert "late.txt" not in hub.repos[("model", REPO)].files and len(hub.repos[("model", REPO)].commits) == 1


def test_outage_answers_every_request_until_it_ends(hub, api):
    push_checkpoints(api)
    hub.outage(503)
    before = len(hub.requests)
    for call in (lambda: api.list_repo_refs(REPO), lambda: api.whoami(),
                 lambda: api.repo_info(REPO)):
        with pytest.raises(HfHubHTTPError) as down:
            call()
        assert down.value.response.status_code == 503
    assert len(hub.requests) == before + 3  # recorded all the same (these three calls do not retry)
    hub.end_outage()
    assert api.list_repo_refs(REPO).branches[0].target_commit == hub.repos[("model", REPO)].sha


def test_refuse_then_accept_on_the_same_port(hub, api):
    push_checkpoints(api)
    url = hub.url
    port = urlsplit(url).port
    hub.refuse()
    with pytest.raises(httpx2.ConnectError):  # the pooled keep-alive connection was cut too
        api.list_repo_refs(REPO)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    hub.accept()
    assert hub.url == url
    assert api.list_repo_refs(REPO).branches[0].target_commit == hub.repos[("model", REPO)].sha  # state kept


def test_revoked_token_gets_401(hub, api):
    push_checkpoints(api)
    other = "hf_otherWriter9876543210"
    hub.write_tokens.add(other)
    hub.revoke(TOKEN)
    with pytest.raises(HfHubHTTPError) as refused:
        api.create_commit(REPO, commit_message="after revoke", operations=[CommitOperationAdd("x.txt", b"x")])
    assert refused.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as whoami:
        api.whoami()
    assert whoami.value.response.status_code == 401
    assert len(hub.repos[("model", REPO)].commits) == 1
    HfApi(endpoint=hub.url, token=other).create_commit(REPO, commit_message="other",
                                                       operations=[CommitOperationAdd("x.txt", b"x")])
    assert len(hub.repos[("model", REPO)].commits) == 2


def test_concurrent_commits_are_all_kept(hub, api):
    api.create_repo(REPO)
    errors: list[BaseException] = []

    def push(worker: int) -> None:
        try:
            for i in range(3):
                api.create_commit(REPO, commit_message=f"w{worker}-{i}",
                                  operations=[CommitOperationAdd(f"w{worker}/{i}.txt", f"{worker}-{i}".encode())])
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=push, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    repo = hub.repos[("model", REPO)]
    assert len(repo.commits) == len(repo.history) == 12 and len(set(repo.commits)) == 12
    assert repo.files == {f"w{w}/{i}.txt": f"{w}-{i}".encode() for w in range(4) for i in range(3)}


def test_fail_rejects_unknown_actions(hub):
    with pytest.raises(ValueError):
        hub.fail("POST", "/commit/", "explode")
    with pytest.raises(ValueError):
        hub.outage("delay:soon")
