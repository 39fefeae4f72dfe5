"""Before a run that pushes to the Hub: may the token write hub_model_id? Checked in seconds, before
anything is downloaded or trained, so a wrong token costs a start-up, not a training run.

Two calls through the retry rule (hub/retry.py): `whoami` (GET /api/whoami-v2: the account, its
orgs with the role in each, and what the token may do) and `repo_exists` (GET /api/models/{repo}).
Write access is read from whoami's answer as the Hub gives it:

- ``auth.accessToken.role`` "write" or "admin": the account's own namespace, and every org in
  ``orgs`` whose ``roleInOrg`` is write, admin or contributor;
- "read": nothing;
- "fineGrained": where ``auth.accessToken.fineGrained.scoped[]`` holds an entity for the namespace
  (type user or org, by name) or the repo itself with "repo.write" among its permissions, or
  ``fineGrained.global`` holds "repo.write"; the namespace must still be the account's or one of
  its orgs.

Any failure is an AssetError (exit 3) naming the token's variable (never its value), the repo, the
account and the fix. The Hub itself stays the judge at upload time; this check only refuses what
it would certainly refuse.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..core.errors import AssetError
from . import retry as hubretry

log = logging.getLogger(__name__)

TOKENS_PAGE = "https://huggingface.co/settings/tokens"
WRITE_ROLES = frozenset({"write", "admin"})
ORG_WRITE_ROLES = frozenset({"write", "admin", "contributor"})
REPO_WRITE = "repo.write"
NOTHING_DONE = "Nothing was downloaded or trained"


@dataclass(frozen=True)
class Access:
    account: str  # the token's account name
    repo_id: str
    exists: bool  # the repo is there already (else the upload creates it)

    @property
    def line(self) -> str:
        return f"Hub: token of {self.account} can write {self.repo_id} ({'exists' if self.exists else 'will be created'})"


def needed(resolved) -> bool:
    cfg = resolved.config
    return bool(cfg.push_to_hub or cfg.push_checkpoints_to_hub)


def write_problem(whoami: dict, repo_id: str) -> str | None:
    """Why the token described by `whoami` may not write `repo_id` (None: it may). No token names here:
    the caller adds the variable and the fix."""
    name = str(whoami.get("name") or "")
    namespace = repo_id.split("/", 1)[0] if "/" in repo_id else name
    orgs = {str(o.get("name")): o for o in whoami.get("orgs") or [] if isinstance(o, dict) and o.get("name")}
    token = (whoami.get("auth") or {}).get("accessToken") or {}
    role = token.get("role")

    # Whose namespace is it? The account's own, or an org with a role that may create and push repos.
    if namespace != name:
        org = orgs.get(namespace)
        if org is None:
            mine = ", ".join(sorted(orgs)) or "none"
            return (f"hub_model_id's namespace {namespace} is not yours ({name}) or an org you belong to (your orgs: "
                    f"{mine}); set hub_model_id to {name}/{repo_id.split('/', 1)[-1]} or to a repo in an org you can "
                    "write to")
        org_role = org.get("roleInOrg")
        if org_role is not None and org_role not in ORG_WRITE_ROLES:
            return (f"your role in the org {namespace} is {org_role!r}, which may not push repos (write, admin or "
                    f"contributor may); ask an admin of {namespace} for the write role, or set hub_model_id to "
                    f"{name}/{repo_id.split('/', 1)[-1]}")

    if role == "read":
        return (f"it is a read token: make a write token at {TOKENS_PAGE} (or a fine-grained one with write access "
                f"to {namespace}'s repos)")
    if role == "fineGrained":
        grants = token.get("fineGrained") or {}
        if REPO_WRITE in (grants.get("global") or []):
            return None
        for scope in grants.get("scoped") or []:
            entity = (scope or {}).get("entity") or {}
            kind, entity_name = entity.get("type"), entity.get("name")
            matches = (kind in ("user", "org") and entity_name == namespace) or (
                kind == "model" and entity_name == repo_id)
            if matches and REPO_WRITE in (scope.get("permissions") or []):
                return None
        return (f"it is a fine-grained token without write access to {repo_id} or to {namespace}'s repos: edit it at "
                f"{TOKENS_PAGE} to allow \"Write access to contents/settings of all repos\" under {namespace} (or the "
                "repo itself, once it exists), or make a write token there")
    # "write"/"admin", or a token whose answer says no role (OAuth, older Hubs): the namespace decides.
    if role is not None and role not in WRITE_ROLES:
        return f"its role is {role!r}, not write: make a write token at {TOKENS_PAGE}"
    return None


def _failure_message(gave_up: hubretry.HubUnavailable, repo_id: str, token: str, endpoint: str) -> str:
    failure = gave_up.failure
    head = f"checking that the token in {token} can push to the Hub repo {repo_id} failed"
    if failure.transient:
        return (f"{head}: {failure.detail} ({gave_up.attempts} attempt(s) over {gave_up.elapsed_s:.0f} s). "
                f"{hubretry.transient_advice(failure, endpoint)}. {NOTHING_DONE}.")
    if failure.kind == "auth" and failure.status == 401:
        return (f"{endpoint} did not accept the token in {token} (HTTP 401): it is invalid, expired or revoked, so "
                f"nothing could be pushed to {repo_id}. Set {token} to a write token from {TOKENS_PAGE}. "
                f"{NOTHING_DONE}.")
    if failure.kind == "auth":
        return (f"{head}: the Hub refused the token in {token} (HTTP {failure.status or 403}). Use a write token "
                f"from {TOKENS_PAGE}. {NOTHING_DONE}.")
    if failure.kind == "offline":
        return f"{head}: huggingface_hub is in offline mode; unset HF_HUB_OFFLINE to upload. {NOTHING_DONE}."
    if failure.kind == "proxy":
        return f"{head}: the HTTP proxy failed ({failure.detail}); check HTTPS_PROXY / HTTP_PROXY. {NOTHING_DONE}."
    return f"{head}: {failure.detail}. {NOTHING_DONE}."


def check_push_access(resolved) -> Access:
    """That the token is valid and may write hub_model_id (which exists, or may be created); raises AssetError."""
    from huggingface_hub import HfApi

    repo_id = resolved.config.hub_model_id
    token = hubretry.token_name(resolved.credentials.hf_token_source)
    endpoint = hubretry.endpoint_of(resolved.hub.endpoint)
    if not resolved.credentials.hf_token:
        raise AssetError(f"pushing to the Hub repo {repo_id} needs a token and {token} is not set: make a write token "
                         f"at {TOKENS_PAGE} and set {token} to it. {NOTHING_DONE}.")
    api = HfApi(endpoint=endpoint, token=resolved.credentials.hf_token)
    secrets = resolved.credentials.values()
    policy = hubretry.RetryPolicy(resolved.hub.retry_window_s)
    hubretry.ensure_request_timeouts()
    try:
        whoami = hubretry.call_with_retries(api.whoami, what="check the Hub token (whoami)", policy=policy,
                                            secrets=secrets, log=log)
        if not isinstance(whoami, dict) or not whoami.get("name"):
            raise AssetError(f"{endpoint}/api/whoami-v2 did not say whose token {token} holds; check HF_ENDPOINT "
                             f"(unset means {hubretry.DEFAULT_ENDPOINT}). {NOTHING_DONE}.")
        problem = write_problem(whoami, repo_id)
        if problem is not None:
            raise AssetError(f"the token in {token} (account {whoami['name']}) cannot push to the Hub repo {repo_id}: "
                             f"{problem}. {NOTHING_DONE}.")
        exists = hubretry.call_with_retries(lambda: api.repo_exists(repo_id), what=f"look up {repo_id}",
                                            policy=policy, secrets=secrets, log=log)
    except hubretry.HubUnavailable as gave_up:
        raise AssetError(_failure_message(gave_up, repo_id, token, endpoint)) from None
    return Access(account=str(whoami["name"]), repo_id=repo_id, exists=bool(exists))
