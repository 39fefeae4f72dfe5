"""Model and dataset fetching against a real local HTTP server that speaks the Hub's protocol.

huggingface_hub runs unmodified; only the endpoint points at tests/hubserver.py.
Run: OMP_NUM_THREADS=1 pytest tests/test_assets.py -q   (about 5 s)
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
from hubserver import FakeHub

from sana_appliance.core.errors import AssetError, ExitCode
from sana_appliance.core.workspace import Credentials, HubSettings, Workspace
from sana_appliance.hub.download import fetch_dataset, fetch_model

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
SECRET = "hf_s3cretTOKENvalue0123456789"
WINDOW_S = 1.0  # hub_retry_window_s for tests: the backoff scales with it (first wait 0.05 s)


def pipeline_files(tag: str = "v1") -> dict[str, bytes]:
    """A tiny repo in diffusers layout; every file distinct so each is downloaded on its own."""
    index = {"_class_name": "SanaPipeline", "_diffusers_version": "0.42.1"}
    index.update({name: ["diffusers", f"{name}-class"] for name in COMPONENTS})
    files = {"model_index.json": json.dumps(index).encode()}
    for name in COMPONENTS:
        files[f"{name}/config.json"] = json.dumps({"component": name, "tag": tag}).encode()
    files["transformer/diffusion_pytorch_model.safetensors"] = bytes(range(256)) * 8 + tag.encode()
    return files


@pytest.fixture
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    root = tmp_path / "workspace"
    root.mkdir()
    return Workspace(root=root, hf_home=root / "cache" / "huggingface")


def online(hub: FakeHub, window_s: float = WINDOW_S) -> HubSettings:
    return HubSettings(endpoint=hub.url, retry_window_s=window_s)


def offline() -> HubSettings:
    # An endpoint nothing listens on: offline mode must not even try it.
    return HubSettings(endpoint="http://127.0.0.1:9", offline=True)


# ---------------------------------------------------------------- 1. download


def test_hub_download_pins_the_resolved_commit_into_hf_home(hub, workspace):
    repo = hub.add_repo("acme/tiny-sana", pipeline_files())
    source = fetch_model("acme/tiny-sana", "main", workspace, online(hub), Credentials())

    assert source.kind == "hub"
    assert (source.repo_id, source.revision, source.commit_sha) == ("acme/tiny-sana", "main", repo.sha)
    assert source.path.is_relative_to(workspace.hf_home / "hub")
    for name, data in repo.files.items():
        assert (source.path / name).read_bytes() == data
    # The branch was resolved once, then every file was fetched by sha, not by "main".
    assert hub.hits("GET", "/api/models/acme/tiny-sana/revision/main") == 1
    resolves = [r.path for r in hub.requests if "/resolve/" in r.path]
    assert resolves and all(f"/resolve/{repo.sha}/" in p for p in resolves)
    # No credentials resolved -> none sent, even if the machine has a token saved somewhere.
    assert all(r.authorization is None for r in hub.requests)

    # A second call finds everything in the cache: it asks for the sha again but downloads nothing.
    gets_before = hub.hits("GET", "/resolve/")
    again = fetch_model("acme/tiny-sana", "main", workspace, online(hub), Credentials())
    assert again == source
    assert hub.hits("GET", "/resolve/") == gets_before


def test_hub_repo_that_is_not_a_diffusers_pipeline_fails_clearly(hub, workspace):
    hub.add_repo("acme/not-diffusers", {"model.safetensors": b"weights", "config.json": b"{}"})
    with pytest.raises(AssetError) as err:
        fetch_model("acme/not-diffusers", "main", workspace, online(hub), Credentials())
    assert "model_index.json is missing" in err.value.message
    assert "acme/not-diffusers" in err.value.message


# ---------------------------------------------------------------- 2. not found


def test_missing_repo_fails_at_once_naming_it(hub, workspace):
    with pytest.raises(AssetError) as err:
        fetch_model("acme/no-such-model", "main", workspace, online(hub), Credentials())
    assert err.value.exit_code == ExitCode.ASSET == 3
    assert "'acme/no-such-model' was not found" in err.value.message
    assert "spelling" in err.value.message
    assert "HF_TOKEN" in err.value.message  # anonymous 401: it may be private
    assert hub.hits("GET", "/api/models/acme/no-such-model") == 1


def test_missing_revision_fails_at_once_naming_repo_and_revision(hub, workspace):
    hub.add_repo("acme/tiny-sana", pipeline_files())
    with pytest.raises(AssetError) as err:
        fetch_model("acme/tiny-sana", "v9-typo", workspace, online(hub), Credentials())
    assert err.value.exit_code == 3
    assert "revision 'v9-typo'" in err.value.message and "'acme/tiny-sana'" in err.value.message
    assert hub.hits("GET", "/api/models/acme/tiny-sana/revision/v9-typo") == 1
    assert hub.hits("GET", "/resolve/") == 0


# ---------------------------------------------------------------- 3. gated


def test_gated_repo_without_token_says_accept_license_and_set_hf_token(hub, workspace):
    hub.add_repo("acme/gated-sana", pipeline_files(), gated=True, allowed_tokens=(SECRET,))
    with pytest.raises(AssetError) as err:
        fetch_model("acme/gated-sana", "main", workspace, online(hub), Credentials())
    message = err.value.message
    assert err.value.exit_code == 3
    assert "no HF_TOKEN is set" in message
    assert "https://huggingface.co/acme/gated-sana" in message and "license" in message
    assert hub.hits("GET", "/revision/") == 1  # not retried


def test_gated_repo_with_refused_token_never_shows_the_token(hub, workspace, caplog):
    caplog.set_level(logging.DEBUG)
    hub.add_repo("acme/gated-sana", pipeline_files(), gated=True, allowed_tokens=("hf_someone_else",))
    with pytest.raises(AssetError) as err:
        fetch_model("acme/gated-sana", "main", workspace, online(hub), Credentials(hf_token=SECRET))
    message = err.value.message
    assert "HF_TOKEN is set but the Hub refused it" in message
    assert "https://huggingface.co/acme/gated-sana" in message
    # The token was really sent (explicitly, from Credentials) ...
    assert any(r.authorization == f"Bearer {SECRET}" for r in hub.requests)
    # ... and appears nowhere a user or a log collector could see it.
    assert SECRET not in str(err.value) and SECRET not in repr(err.value)
    assert SECRET not in caplog.text
    assert hub.hits("GET", "/revision/") == 1


def test_gated_repo_with_accepted_token_downloads(hub, workspace):
    repo = hub.add_repo("acme/gated-sana", pipeline_files(), gated=True, allowed_tokens=(SECRET,))
    source = fetch_model("acme/gated-sana", "main", workspace, online(hub), Credentials(hf_token=SECRET))
    assert source.commit_sha == repo.sha


# ---------------------------------------------------------------- 4. retries


def test_transient_failures_are_retried_with_logging(hub, workspace, caplog):
    caplog.set_level(logging.WARNING, logger="sana_appliance.hub.download")
    repo = hub.add_repo("acme/tiny-sana", pipeline_files())
    hub.fail("GET", "/api/models/acme/tiny-sana/revision/main", 503)
    hub.fail("GET", "/api/models/acme/tiny-sana/revision/main", "drop")
    hub.fail("GET", "/resolve/", 502)  # one file transfer fails mid-snapshot

    source = fetch_model("acme/tiny-sana", "main", workspace, online(hub), Credentials())

    assert source.commit_sha == repo.sha
    assert (source.path / "vae" / "config.json").read_bytes() == repo.files["vae/config.json"]
    assert hub.hits("GET", "/revision/main") == 3  # 503, dropped, ok
    retries = [r.getMessage() for r in caplog.records if r.name == "sana_appliance.hub.download" and "retrying" in r.getMessage()]
    assert len(retries) == 3, retries
    assert "503" in retries[0] and "RemoteProtocolError" in retries[1] and "502" in retries[2]


def test_persistent_503_is_retried_for_the_window_then_says_the_hub_is_failing(hub, workspace):
    hub.add_repo("acme/tiny-sana", pipeline_files())
    hub.fail("GET", "/revision/main", 503, times=1000)
    start = time.monotonic()
    with pytest.raises(AssetError) as err:
        fetch_model("acme/tiny-sana", "main", workspace, online(hub), Credentials(hf_token=SECRET))
    elapsed = time.monotonic() - start
    # Retried with backoff until the window was used up, then given up: not one try, not forever.
    assert hub.hits("GET", "/revision/main") >= 4
    assert 0.5 * WINDOW_S <= elapsed < WINDOW_S + 2.0
    message = err.value.message
    assert err.value.exit_code == 3
    assert "503" in message and "problem on the Hub's side, not with your token" in message
    assert "hub_retry_window_s" in message and "HF_HUB_OFFLINE=1" in message
    assert SECRET not in message


def test_unreachable_hub_is_retried_then_names_the_endpoint(hub, workspace):
    hub.add_repo("acme/tiny-sana", pipeline_files())
    endpoint = hub.url
    hub.stop()
    with pytest.raises(AssetError) as err:
        fetch_model("acme/tiny-sana", "main", workspace, HubSettings(endpoint=endpoint, retry_window_s=0.5), Credentials())
    message = err.value.message
    assert "ConnectError" in message and "connection refused" in message
    assert endpoint in message and "HF_ENDPOINT" in message
    assert "attempt(s)" in message and "1 attempt(s)" not in message


def test_hanging_hub_times_out_and_is_retried(hub, workspace, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 1)  # what HF_HUB_ETAG_TIMEOUT=1 sets at import
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    repo = hub.add_repo("acme/tiny-sana", pipeline_files())
    hub.fail("GET", "/revision/main", "delay:3")  # accepts, then says nothing for longer than the timeout
    start = time.monotonic()
    source = fetch_model("acme/tiny-sana", "main", workspace, online(hub, window_s=5.0), Credentials())
    assert source.commit_sha == repo.sha
    assert hub.hits("GET", "/revision/main") == 2
    assert time.monotonic() - start < 3.0  # gave up on the silent answer after ~1 s, not after 3 s


def test_window_zero_tries_once(hub, workspace):
    hub.add_repo("acme/tiny-sana", pipeline_files())
    hub.fail("GET", "/revision/main", 500, times=10)
    with pytest.raises(AssetError) as err:
        fetch_model("acme/tiny-sana", "main", workspace, online(hub, window_s=0), Credentials())
    assert hub.hits("GET", "/revision/main") == 1
    assert "1 attempt(s)" in err.value.message and "HTTP 500" in err.value.message


# ---------------------------------------------------------------- 5. offline


def test_offline_reuses_the_cache_without_any_server(hub, workspace):
    repo = hub.add_repo("acme/tiny-sana", pipeline_files())
    first = fetch_model("acme/tiny-sana", "main", workspace, online(hub), Credentials())
    hub.stop()

    cached = fetch_model("acme/tiny-sana", "main", workspace, offline(), Credentials())
    assert cached == first and cached.commit_sha == repo.sha
    by_sha = fetch_model("acme/tiny-sana", repo.sha, workspace, offline(), Credentials())
    assert by_sha.path == first.path and by_sha.commit_sha == repo.sha


def test_offline_with_empty_cache_says_how_to_fill_it(workspace):
    with pytest.raises(AssetError) as err:
        fetch_model("acme/tiny-sana", "main", workspace, offline(), Credentials())
    message = err.value.message
    assert err.value.exit_code == 3
    assert "HF_HUB_OFFLINE is set" in message and "acme/tiny-sana" in message
    assert "Run once with network access" in message and str(workspace.hf_home / "hub") in message


def test_offline_with_incomplete_snapshot_is_refused(hub, workspace):
    repo = hub.add_repo("acme/tiny-sana", pipeline_files())
    source = fetch_model("acme/tiny-sana", "main", workspace, online(hub), Credentials())
    (source.path / "vae" / "config.json").unlink()  # e.g. a cache copied while still downloading
    with pytest.raises(AssetError) as err:
        fetch_model("acme/tiny-sana", "main", workspace, offline(), Credentials())
    assert "missing or incomplete" in err.value.message and repo.sha in err.value.message


# ---------------------------------------------------------------- 6. local folders and bad specs


def make_pipeline_folder(folder: Path, skip: tuple[str, ...] = ()) -> Path:
    for name, data in pipeline_files().items():
        if name.split("/")[0] not in skip:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)
    return folder


def test_local_folder_relative_or_absolute(workspace):
    folder = make_pipeline_folder(workspace.root / "models" / "tiny")
    # "models/tiny" also looks like owner/name: an existing folder wins, no Hub call is made.
    for spec in ("models/tiny", str(folder)):
        source = fetch_model(spec, "main", workspace, offline(), Credentials())
        assert source.kind == "local" and source.path == folder
        assert (source.repo_id, source.revision, source.commit_sha) == (None, None, None)


def test_local_folder_without_model_index_names_what_is_missing(workspace):
    folder = workspace.root / "models" / "broken"
    folder.mkdir(parents=True)
    with pytest.raises(AssetError) as err:
        fetch_model(str(folder), "main", workspace, offline(), Credentials())
    assert str(folder / "model_index.json") in err.value.message and "is missing" in err.value.message
    assert err.value.exit_code == 3


def test_local_folder_missing_a_component_names_it(workspace):
    folder = make_pipeline_folder(workspace.root / "half", skip=("vae",))
    with pytest.raises(AssetError) as err:
        fetch_model("half", "main", workspace, offline(), Credentials())
    assert str(folder / "vae") in err.value.message


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("./models/missing", "does not exist"),
        ("/no/such/folder", "does not exist"),
        ("just-a-name", "owner/name"),
        ("bad id/with space", "owner/name"),
        ("owner/na--me", "owner/name"),
    ],
)
def test_bad_specs_say_what_to_use(workspace, spec, expected):
    with pytest.raises(AssetError) as err:
        fetch_model(spec, "main", workspace, offline(), Credentials())
    assert expected in err.value.message and err.value.exit_code == 3


# ---------------------------------------------------------------- 7. datasets


def test_dataset_repo_downloads_into_dest_and_works_offline(hub, tmp_path):
    files = {"metadata.jsonl": b'{"file_name": "a.png", "text": "a cat"}\n', "images/a.png": b"\x89PNG fake"}
    repo = hub.add_repo("acme/captions", files, repo_type="dataset")
    dest = tmp_path / "datasets" / "captions"

    folder, sha = fetch_dataset("acme/captions", "main", dest, online(hub), Credentials())

    assert (folder, sha) == (dest, repo.sha)
    assert (dest / "images" / "a.png").read_bytes() == files["images/a.png"]
    assert hub.hits("GET", "/api/datasets/acme/captions/revision/main") == 1
    assert hub.hits("GET", f"/datasets/acme/captions/resolve/{repo.sha}/") == len(files)
    hub.stop()
    assert fetch_dataset("acme/captions", "main", dest, offline(), Credentials()) == (dest, repo.sha)


def test_dataset_that_is_a_model_repo_is_not_found(hub, tmp_path):
    hub.add_repo("acme/tiny-sana", pipeline_files())  # a model repo, asked for as a dataset
    with pytest.raises(AssetError) as err:
        fetch_dataset("acme/tiny-sana", "main", tmp_path / "d", online(hub), Credentials())
    assert "dataset repo 'acme/tiny-sana' was not found" in err.value.message


# ---------------------------------------------------------------- several ranks


def test_concurrent_ranks_download_once(hub, workspace):
    repo = hub.add_repo("acme/tiny-sana", pipeline_files())
    hub.fail("GET", "/tree/", "delay:0.3")  # the first rank is slow to list the files
    results: dict[str, object] = {}

    def rank(name: str) -> None:
        try:
            results[name] = fetch_model("acme/tiny-sana", "main", workspace, online(hub), Credentials())
        except Exception as exc:  # surfaced by the asserts below
            results[name] = exc

    first = threading.Thread(target=rank, args=("rank0",))
    first.start()
    deadline = time.monotonic() + 5
    while hub.hits("GET", "/tree/") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    second = threading.Thread(target=rank, args=("rank1",))
    second.start()
    first.join(10)
    second.join(10)

    assert results["rank0"] == results["rank1"]
    assert results["rank0"].commit_sha == repo.sha  # type: ignore[union-attr]
    # The second rank waited for the lock (it asked the Hub nothing until the first had every
    # file), then found the tree listing and all files in the cache.
    paths = [r.path for r in hub.requests]
    second_resolve = [i for i, p in enumerate(paths) if p.endswith("/revision/main")][1]
    assert second_resolve > max(i for i, p in enumerate(paths) if "/resolve/" in p)
    assert hub.hits("GET", "/tree/") == 1
    for name in repo.files:
        assert hub.hits("GET", f"/resolve/{repo.sha}/{name}") == 1
