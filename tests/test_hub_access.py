"""The push preflight (hub/access.py): with push_to_hub on, the token is checked against the Hub (whoami,
repo lookup) before anything is downloaded or trained; a token that cannot write hub_model_id exits 3 in
seconds, naming the variable, the repo, the account and the fix, never the token itself.

Run: OMP_NUM_THREADS=1 pytest tests/test_hub_access.py -q   (~1 minute on 2 busy cores: a few CLI start-ups
that stop at the check; the in-process tests take a second)
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import pytest
from conftest import PLANTED_TOKEN, cli_env, run_cli, start_cli
from hubserver import FakeHub, whoami_payload

from sana_appliance import cli
from sana_appliance.config.resolve import resolve
from sana_appliance.core.errors import AssetError
from sana_appliance.core.workspace import Credentials
from sana_appliance.hub import access

REPO_ID = "acme/sana-ft"
TOKENS = "https://huggingface.co/settings/tokens"


@pytest.fixture
def hub():
    with FakeHub() as server:
        yield server


def resolved_for(tmp_path: Path, endpoint: str, **env: str):
    base = {"WORKSPACE": str(tmp_path / "ws"), "HF_TOKEN": PLANTED_TOKEN, "HF_ENDPOINT": endpoint,
            "SANA_PUSH_TO_HUB": "true", "SANA_HUB_MODEL_ID": REPO_ID, "SANA_HUB_RETRY_WINDOW_S": "1.5"}
    return resolve({**base, **env})


# ---------------------------------------------------------------- what whoami's answer allows


@pytest.mark.parametrize(("payload", "repo", "allowed"), [
    (whoami_payload(), "alice/x", True),  # write token, own namespace
    (whoami_payload(), "acme/x", True),  # write token, org with the write role
    (whoami_payload(role="admin", orgs={"acme": "admin"}), "acme/x", True),
    (whoami_payload(orgs={"acme": "contributor"}), "acme/x", True),
    (whoami_payload(orgs={"acme": "read"}), "acme/x", False),  # read role in the org
    (whoami_payload(), "bob/x", False),  # someone else's namespace
    (whoami_payload(role="read"), "alice/x", False),
    (whoami_payload(role="fineGrained", scoped=(("user", "alice", ("repo.content.read", "repo.write")),)),
     "alice/x", True),
    (whoami_payload(role="fineGrained", scoped=(("org", "acme", ("repo.write",)),)), "acme/x", True),
    (whoami_payload(role="fineGrained", scoped=(("model", "acme/x", ("repo.write",)),)), "acme/x", True),
    (whoami_payload(role="fineGrained", scoped=(("model", "acme/other", ("repo.write",)),)), "acme/x", False),
    (whoami_payload(role="fineGrained", scoped=(("org", "acme", ("repo.content.read",)),)), "acme/x", False),
    (whoami_payload(role="fineGrained", global_permissions=("repo.write",)), "alice/x", True),
    (whoami_payload(role="fineGrained", global_permissions=("repo.write",)), "bob/x", False),
])
def test_write_access_is_read_from_whoami(payload, repo, allowed):
    assert (access.write_problem(payload, repo) is None) == allowed


def test_marker_name_is_runinfos():
    from sana_appliance.run import runinfo

    assert cli.COMPLETE_MARKER == runinfo.COMPLETE_MARKER


# ---------------------------------------------------------------- against the local Hub, in process


def test_write_token_passes_in_well_under_a_second(hub, tmp_path):
    hub.write_tokens.add(PLANTED_TOKEN)
    start = time.monotonic()
    result = access.check_push_access(resolved_for(tmp_path, hub.url))
    elapsed = time.monotonic() - start
    assert result.line == f"Hub: token of alice can write {REPO_ID} (will be created)"
    assert elapsed < 2.0, elapsed
    hub.add_repo(REPO_ID, {})
    assert access.check_push_access(resolved_for(tmp_path, hub.url)).line.endswith("(exists)")
    assert hub.hits("GET", "/api/whoami-v2") == 2 and hub.hits("GET", f"/api/models/{REPO_ID}") == 2


def test_whoami_5xx_is_retried_then_gives_the_retry_advice(hub, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    hub.write_tokens.add(PLANTED_TOKEN)
    hub.fail("GET", "/api/whoami-v2", 503, times=1000)
    with pytest.raises(AssetError) as err:
        access.check_push_access(resolved_for(tmp_path, hub.url))
    message = err.value.message
    assert err.value.exit_code == 3 and hub.hits("GET", "/api/whoami-v2") >= 3
    assert "HTTP 503" in message and "problem on the Hub's side" in message and REPO_ID in message
    assert "retrying in" in caplog.text and PLANTED_TOKEN not in message + caplog.text


def test_transient_failure_then_success_passes(hub, tmp_path):
    hub.write_tokens.add(PLANTED_TOKEN)
    hub.fail("GET", "/api/whoami-v2", "drop")
    hub.fail("GET", f"/api/models/{REPO_ID}", 502)
    assert access.check_push_access(resolved_for(tmp_path, hub.url, SANA_HUB_RETRY_WINDOW_S="20")).account == "alice"


# ---------------------------------------------------------------- through the CLI: exit 3 before anything runs


def hub_env(workspace: Path, output: Path, endpoint: str, **extra: str) -> dict[str, str]:
    settings = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_XET": "1", "SANA_PUSH_TO_HUB": "true",
                "SANA_HUB_MODEL_ID": REPO_ID, "SANA_HUB_RETRY_WINDOW_S": "2"}
    return cli_env(workspace, output, **{**settings, **extra})


CASES = {
    # token set up on the Hub, extra env, what the message says
    "invalid": (None, {}, ["did not accept the token in HF_TOKEN (HTTP 401): it is invalid, expired or revoked",
                           REPO_ID, f"Set HF_TOKEN to a write token from {TOKENS}"]),
    "read": ({"role": "read"}, {"HF_TOKEN": "", "HUGGING_FACE_HUB_TOKEN": PLANTED_TOKEN},
             [f"the token in HUGGING_FACE_HUB_TOKEN (account alice) cannot push to the Hub repo {REPO_ID}",
              f"it is a read token: make a write token at {TOKENS}"]),
    "fine-grained elsewhere": ({"role": "fineGrained", "scoped": (("model", "acme/other", ("repo.write",)),)}, {},
                               [f"the token in HF_TOKEN (account alice) cannot push to the Hub repo {REPO_ID}",
                                f"fine-grained token without write access to {REPO_ID} or to acme's repos"]),
    "not your namespace": ({}, {"SANA_HUB_MODEL_ID": "bob/sana-ft"},
                           ["cannot push to the Hub repo bob/sana-ft",
                            "hub_model_id's namespace bob is not yours (alice) or an org you belong to (your orgs: "
                            "acme); set hub_model_id to alice/sana-ft"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_token_that_cannot_write_exits_3_before_any_download_or_training(tmp_path, case):
    token_setup, extra, expected = CASES[case]
    workspace, output = tmp_path / "ws", tmp_path / "out"
    with FakeHub() as hub:
        if token_setup is not None:
            hub.add_token(PLANTED_TOKEN, **token_setup)
        result = run_cli(hub_env(workspace, output, hub.url, **extra), timeout=120)
        # huggingface_hub's own agent-harness registry look-up (made when it sees an AI agent's shell
        # variables) is not the appliance's request.
        asked = {r.path for r in hub.requests} - {"/api/agent-harnesses"}
    assert result.returncode == 3, result.stderr[-3000:]
    error = result.stderr.split("sana-appliance: error:")[-1]
    for text in expected:
        assert text in error, (text, error)
    assert "Nothing was downloaded or trained" in error and "Traceback" not in result.stderr
    assert PLANTED_TOKEN not in result.stderr + result.stdout
    # Nothing but the check was asked of the Hub; nothing was built, trained or checkpointed.
    assert asked <= {"/api/whoami-v2", f"/api/models/{extra.get('SANA_HUB_MODEL_ID', REPO_ID)}"}, asked
    assert not (output / "checkpoints").exists() and not (output / "final").exists()
    assert not (workspace / "cache").exists() or not any((workspace / "cache").rglob("*.safetensors"))
    assert "step 1" not in result.stderr


def test_no_token_is_refused_before_anything_runs(tmp_path):
    with FakeHub() as hub:
        result = run_cli(hub_env(tmp_path / "ws", tmp_path / "out", hub.url, HF_TOKEN=""), timeout=120)
        assert [r for r in hub.requests if r.path != "/api/agent-harnesses"] == []
    assert result.returncode == 2, result.stderr[-3000:]  # a config rule: no Hub call is needed to know
    assert "push_to_hub=True (from env:SANA_PUSH_TO_HUB): needs a Hugging Face write token in the HF_TOKEN " \
        "environment variable" in result.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_no_token_in_process_names_the_variable(hub, tmp_path):
    resolved = resolved_for(tmp_path, hub.url)
    resolved = dataclasses.replace(resolved, credentials=Credentials())
    with pytest.raises(AssetError) as err:
        access.check_push_access(resolved)
    assert f"{REPO_ID} needs a token and HF_TOKEN is not set: make a write token at {TOKENS}" in err.value.message
    assert hub.requests == []


def test_a_stop_while_the_check_waits_for_the_hub_exits_143_with_a_message(tmp_path):
    """The check may retry for minutes while the Hub is down: SIGTERM then ends it at once, with a message."""
    import signal

    with FakeHub() as hub:
        hub.write_tokens.add(PLANTED_TOKEN)
        hub.fail("GET", "/api/whoami-v2", 503, times=100_000)
        proc = start_cli(hub_env(tmp_path / "ws", tmp_path / "out", hub.url, SANA_HUB_RETRY_WINDOW_S="600"))
        try:
            deadline = time.monotonic() + 120
            while hub.hits("GET", "/api/whoami-v2") < 2 and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 143, out[-3000:]
    assert "stopped by SIGTERM during the Hub access check; nothing was downloaded or trained yet" in out
    assert "Traceback" not in out and PLANTED_TOKEN not in out
