"""One rule for every call to the Hugging Face Hub: which failures are retried, for how long,
and what a person is told when the Hub stays unreachable.

Downloads (hub/download.py), the push check (hub/access.py) and the resume from the Hub go through
`call_with_retries`; the background uploads (hub/upload.py) classify with the same rule and back off the same way. A failure is
classified by looking through the whole exception chain, because huggingface_hub wraps network
errors and HTTP 5xx in other errors ("not in the local cache") and httpx2 raises its own
ConnectError, which is neither OSError nor ConnectionError.

Transient (retried until the window `hub_retry_window_s` is used up): connection refused, DNS
failure, timeouts, connections cut mid-answer, HTTP 408/429/5xx. Permanent (raised at once):
401/403/gated, 404, other 4xx, offline mode, a failing proxy. Users see 429/503/504 on large
uploads for minutes at a time (huggingface_hub #3071, #2587), so the default window is minutes.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import httpx2
import tenacity

from ..core.errors import ApplianceError

T = TypeVar("T")

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_ENDPOINT = "https://huggingface.co"
STATUS_PAGE = "https://status.huggingface.co"
# What a failure is, and whether waiting can fix it.
TRANSIENT_KINDS = frozenset({"server", "rate_limited", "timeout", "dns", "refused", "dropped"})


@dataclass(frozen=True)
class Failure:
    kind: str  # offline, auth, not_found, proxy, http, other, or one of TRANSIENT_KINDS
    status: int | None  # HTTP status when the Hub answered
    detail: str  # one line, secrets removed

    @property
    def transient(self) -> bool:
        return self.kind in TRANSIENT_KINDS


class HubUnavailable(Exception):
    """A Hub call failed for good: a permanent error, or transient ones for the whole window."""

    def __init__(self, failure: Failure, attempts: int, elapsed_s: float, window_s: float):
        super().__init__(failure.detail)
        self.failure, self.attempts, self.elapsed_s, self.window_s = failure, attempts, elapsed_s, window_s


# ---------------------------------------------------------------- classification


def causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and everything it was raised from or during."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def http_status(exc: BaseException) -> int | None:
    from huggingface_hub.errors import HfHubHTTPError

    response = getattr(exc, "response", None) if isinstance(exc, (HfHubHTTPError, httpx2.HTTPStatusError)) else None
    return getattr(response, "status_code", None)


def redact(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "<redacted>")
    return text


def describe(exc: BaseException, secrets: Sequence[str] = ()) -> str:
    """One line about an error (huggingface_hub's own messages span several lines)."""
    status = http_status(exc)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    head = lines[0] if lines else ""
    if status is not None and str(status) not in head:
        head = f"HTTP {status} {head}".strip()
    return redact(f"{type(exc).__name__}: {head}" if head else type(exc).__name__, secrets)


def classify(exc: BaseException, secrets: Sequence[str] = ()) -> Failure:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    chain = list(causes(exc))
    detail = describe(exc, secrets)
    statuses = [s for s in (http_status(link) for link in chain) if s is not None]
    status = statuses[0] if statuses else None

    def has(*kinds: type) -> bool:
        return any(isinstance(link, kinds) for link in chain)

    if has(OfflineModeIsEnabled):
        return Failure("offline", status, detail)
    if has(httpx2.ProxyError):
        return Failure("proxy", status, detail)
    # An answer from the Hub decides, whatever huggingface_hub wrapped it in.
    if status is not None:
        if status == 429:
            return Failure("rate_limited", status, detail)
        if status == 408:
            return Failure("timeout", status, detail)
        if status in TRANSIENT_STATUS:
            return Failure("server", status, detail)
        if has(GatedRepoError) or status in (401, 403):
            return Failure("auth", status, detail)
        if status == 404:
            return Failure("not_found", status, detail)
        return Failure("http", status, detail)
    if has(GatedRepoError):
        return Failure("auth", status, detail)
    if has(RepositoryNotFoundError, RevisionNotFoundError) or (
        has(EntryNotFoundError) and not has(LocalEntryNotFoundError)
    ):
        return Failure("not_found", status, detail)
    if has(socket.gaierror):
        return Failure("dns", status, detail)
    if has(httpx2.TimeoutException, TimeoutError):
        return Failure("timeout", status, detail)
    if has(httpx2.ConnectError, ConnectionRefusedError):
        return Failure("refused", status, detail)
    if has(httpx2.TransportError, ConnectionError):
        return Failure("dropped", status, detail)
    # huggingface_hub's size check after a cut-off transfer ("usually due to network issues").
    if any(isinstance(link, OSError) and str(link).startswith("Consistency check failed") for link in chain):
        return Failure("dropped", status, detail)
    return Failure("other", status, detail)


# ---------------------------------------------------------------- advice


def endpoint_of(endpoint: str | None) -> str:
    return (endpoint or DEFAULT_ENDPOINT).rstrip("/")


def transient_advice(failure: Failure, endpoint: str | None, window_key: str = "hub_retry_window_s") -> str:
    """What to do when the Hub stayed unreachable for the whole retry window (the setting `window_key`)."""
    where = endpoint_of(endpoint)
    wait_longer = f"set {window_key} higher to keep retrying longer"
    if failure.kind == "server":
        return (f"the Hub at {where} kept failing (HTTP {failure.status}); this is a problem on the Hub's side, not "
                f"with your token or config. Try again later (status: {STATUS_PAGE}), or {wait_longer}")
    if failure.kind == "rate_limited":
        return (f"the Hub at {where} is rate-limiting these requests (HTTP 429); wait a few minutes before "
                f"starting again, or {wait_longer}")
    if failure.kind == "refused":
        return (f"nothing accepts connections at {where} (connection refused): check HF_ENDPOINT (unset means "
                f"{DEFAULT_ENDPOINT}) and that the host and port are right and up; behind a proxy, set HTTPS_PROXY")
    if failure.kind == "dns":
        return (f"the host name of {where} cannot be resolved (DNS failure): check the spelling of HF_ENDPOINT "
                f"(unset means {DEFAULT_ENDPOINT}) and this machine's DNS and network")
    if failure.kind == "timeout":
        return (f"{where} did not answer in time: the network or the Hub is slow. Try again later, {wait_longer}, "
                "or raise HF_HUB_DOWNLOAD_TIMEOUT / HF_HUB_ETAG_TIMEOUT (seconds one request may stay silent)")
    return (f"the connection to {where} was cut before the answer was complete: check the network and any proxy, "
            f"then try again, or {wait_longer}")


def token_name(source: str | None) -> str:
    """The environment variable the token came from (never its value)."""
    return source or "HF_TOKEN"


# ---------------------------------------------------------------- the policy


@dataclass(frozen=True)
class RetryPolicy:
    """Retry transient failures until `window_s` seconds have passed since the first try.

    The backoff scales with the window so that a short window (tests, impatient users) still
    gets several tries and a long one does not hammer a struggling Hub: the first wait is
    window/20 (at most 2 s), doubling up to window/4 (at most 60 s), plus jitter so that
    many ranks or appliances do not retry in lockstep."""

    window_s: float

    @property
    def first_wait_s(self) -> float:
        return min(2.0, self.window_s / 20)

    @property
    def max_wait_s(self) -> float:
        return min(60.0, self.window_s / 4)


def call_with_retries(
    call: Callable[[], T], *, what: str, policy: RetryPolicy, secrets: Sequence[str], log: logging.Logger
) -> T:
    """Run `call`; retry transient Hub failures within the policy's window; each retry is logged.

    Raises HubUnavailable for a permanent failure (at once) or when the window is used up.
    ApplianceError raised by `call` passes through unchanged."""
    start = time.monotonic()

    def log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        failure = classify(exc, secrets) if exc is not None else Failure("other", None, "unknown error")
        sleep_s = state.next_action.sleep if state.next_action else 0.0
        log.warning("%s failed (attempt %d, %.1f s into the %g s retry window): %s; retrying in %.1f s",
                    what, state.attempt_number, time.monotonic() - start, policy.window_s, failure.detail, sleep_s)

    retrying = tenacity.Retrying(
        # stop_before_delay: never sleep past the window, so the last try starts inside it.
        stop=tenacity.stop_before_delay(policy.window_s),
        wait=tenacity.wait_exponential(multiplier=policy.first_wait_s, max=policy.max_wait_s)
        + tenacity.wait_random(0, policy.first_wait_s),
        retry=tenacity.retry_if_exception(
            lambda exc: not isinstance(exc, ApplianceError) and classify(exc, secrets).transient
        ),
        before_sleep=log_retry,
        reraise=True,
    )
    attempts = 0

    def counted() -> T:
        nonlocal attempts
        attempts += 1
        return call()

    try:
        return retrying(counted)
    except ApplianceError:
        raise
    except Exception as exc:  # every other failure becomes a message, never a traceback
        raise HubUnavailable(classify(exc, secrets), attempts, time.monotonic() - start, policy.window_s) from exc


# ---------------------------------------------------------------- request timeouts


def request_timeout() -> httpx2.Timeout:
    """How long one Hub request may stay silent: huggingface_hub's own settings (HF_HUB_ETAG_TIMEOUT to
    connect, HF_HUB_DOWNLOAD_TIMEOUT between reads or writes; 10 s each by default)."""
    from huggingface_hub import constants

    transfer = float(constants.HF_HUB_DOWNLOAD_TIMEOUT)
    return httpx2.Timeout(transfer, connect=float(constants.HF_HUB_ETAG_TIMEOUT))


def ensure_request_timeouts() -> None:
    """Give huggingface_hub's shared HTTP client a timeout.

    Its default client has none, and the calls an upload makes (create repo, preupload, LFS,
    commit) pass none either: a Hub that accepts the connection and never answers would hang the
    run forever instead of being retried. Retrying after a lost answer is safe: upload_folder
    skips files the Hub already has, so a repeated commit of the same files is a no-op."""
    from huggingface_hub import get_session, set_client_factory
    from huggingface_hub.utils._http import default_client_factory

    timeout = request_timeout()
    if get_session().timeout == timeout:
        return

    def factory() -> httpx2.Client:
        client = default_client_factory()
        client.timeout = timeout
        return client

    set_client_factory(factory)
