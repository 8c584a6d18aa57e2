"""A provider's key goes only to that provider's host (issue #26, point 1).

OPENAI_API_KEY goes only to https://api.openai.com and OPENROUTER_API_KEY only to
https://openrouter.ai; every other URL (the provider's name in the path, the query, a subdomain
or userinfo, plain http, another port, a look-alike letter) gets PATCHDB_JUDGE_API_KEY or no
key. The table checks the rule itself; the end-to-end tests run `patchdb judge` and `judge
--batch` with look-alike base URLs against loopback servers and read the Authorization header
each server received.

Host names that resolve nowhere here (`api.openai.com.example.net`, or `api.openai.com` over
plain http) reach a loopback server as a forward proxy: HTTP_PROXY names the server, and the
client sends it the request with the full URL, as it would to any proxy.
"""

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from batch_server import BatchServer, batch_server
from conftest import file_digest, run_cli
from judge_server import FaultServer, fault_server, make_store

from patchdb.errors import JudgeError
from patchdb.judge.batch_plan import reasoning_options
from patchdb.judge.client import NO_KEY, resolve_endpoint
from patchdb.judge.providers import provider_of

OPENAI_KEY = "sk-oa-sentinel-3f7a1c9e"
OPENROUTER_KEY = "sk-or-sentinel-91c2d4b8"
OWN_KEY = "sk-own-sentinel-55d06e2f"  # PATCHDB_JUDGE_API_KEY
ALL_KEYS = {"OPENAI_API_KEY": OPENAI_KEY, "OPENROUTER_API_KEY": OPENROUTER_KEY,
            "PATCHDB_JUDGE_API_KEY": OWN_KEY}
PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
              "all_proxy", "NO_PROXY", "no_proxy")

PROVIDER_URLS = [
    ("https://api.openai.com/v1", "openai"),
    ("https://api.openai.com/v1/", "openai"),
    ("https://API.OpenAI.com/v1", "openai"),  # host names have no case
    ("HTTPS://api.openai.com/v1", "openai"),
    ("https://api.openai.com:443/v1", "openai"),  # https's own port
    ("https://api.openai.com", "openai"),
    ("https://openrouter.ai/api/v1", "openrouter"),
    ("https://OpenRouter.AI/api/v1", "openrouter"),
]
LOOK_ALIKES = [
    "http://127.0.0.1:8000/x/api.openai.com/v1",  # in the path
    "http://127.0.0.1:8000/openrouter.ai/api/v1",
    "http://127.0.0.1:8000/v1?to=api.openai.com",  # in the query
    "http://127.0.0.1:8000/v1?to=openrouter.ai",
    "http://127.0.0.1:8000/v1#api.openai.com",  # in the fragment
    "https://api.openai.com.example.net/v1",  # a subdomain of another host
    "https://openrouter.ai.example.net/api/v1",
    "https://evil-openrouter.ai/api/v1",
    "https://openai.com/v1",
    "https://api.openai.com@example.net/v1",  # userinfo: the host is example.net
    "https://user:pw@api.openai.com/v1",  # userinfo on the real host: not written exactly
    "https://example.net\\@api.openai.com/v1",
    "https://api.openai.com\\@example.net/v1",
    "http://api.openai.com/v1",  # plain http
    "http://openrouter.ai/api/v1",
    "ws://api.openai.com/v1",
    "https://api.openai.com:8443/v1",  # another port
    "https://api.openai.com:x/v1",
    "https://api.openai.com./v1",  # a trailing dot: not written exactly
    "https://\u0430pi.openai.com/v1",  # Cyrillic a
    "https://xn--pi-7kc.openai.com/v1",
    "https://\uff41pi.openai.com/v1",  # fullwidth a
    "https://api.openai.com\t.example.net/v1",  # urllib would drop the tab
    " https://api.openai.com/v1",
    "https://[api.openai.com]/v1",
    "//api.openai.com/v1",
    "api.openai.com/v1",
    "https:api.openai.com/v1",
    "",
]


@pytest.mark.parametrize("url, provider", PROVIDER_URLS)
def test_a_provider_url_gets_only_its_own_key(url: str, provider: str) -> None:
    assert provider_of(url) == provider
    own = OPENAI_KEY if provider == "openai" else OPENROUTER_KEY
    assert resolve_endpoint(url, ALL_KEYS).api_key == own
    # without its own key the provider gets the user's PATCHDB_JUDGE_API_KEY, never the other's
    other = {k: v for k, v in ALL_KEYS.items() if v != own}
    assert resolve_endpoint(url, other).api_key == OWN_KEY
    assert resolve_endpoint(url, {k: v for k, v in other.items() if v != OWN_KEY}).api_key \
        == NO_KEY


@pytest.mark.parametrize("url", LOOK_ALIKES)
def test_a_look_alike_url_gets_no_provider_key(url: str) -> None:
    assert provider_of(url) is None
    if url:
        assert resolve_endpoint(url, ALL_KEYS).api_key == OWN_KEY
        no_own = {k: v for k, v in ALL_KEYS.items() if v != OWN_KEY}
        assert resolve_endpoint(url, no_own).api_key == NO_KEY
    # the request fields follow the same rule: OpenAI's own field only at OpenAI
    assert reasoning_options(url, "low") == {"reasoning": {"effort": "low"}}


@pytest.mark.parametrize("key, owner_url", [
    ("sk-or-v1-0a1b2c3d4e", "https://openrouter.ai/api/v1"),
    ("sk-proj-9f8e7d6c5b", "https://api.openai.com/v1"),
])
def test_a_provider_key_in_the_generic_variable_goes_to_that_provider_only(
        key: str, owner_url: str) -> None:
    """PATCHDB_JUDGE_API_KEY goes to whatever URL is asked (a shared sweep config's too), so a
    provider's own key put there is refused anywhere but at that provider, in one line that
    names the right variable and shows no more of the key than its prefix."""
    env = {"PATCHDB_JUDGE_API_KEY": key}
    assert resolve_endpoint(owner_url, env).api_key == key
    for url in ("http://127.0.0.1:8000/v1", "https://openrouter.ai.example.net/v1",
                "https://api.openai.com/v1" if "openrouter" in owner_url
                else "https://openrouter.ai/api/v1"):
        with pytest.raises(JudgeError) as refused:
            resolve_endpoint(url, env)
        message = str(refused.value)
        assert key[-10:] not in message and "\n" not in message
        assert ("OPENROUTER_API_KEY" if "openrouter" in owner_url else "OPENAI_API_KEY") in message
    # the provider's own variable, when set, is what goes there; other keys go anywhere
    assert resolve_endpoint("http://127.0.0.1:8000/v1",
                            {"PATCHDB_JUDGE_API_KEY": "sk-local-vllm"}).api_key == "sk-local-vllm"


def test_judge_refuses_a_provider_key_bound_for_another_url_and_writes_nothing(
        db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_store(db_path)
    before = file_digest(db_path)
    monkeypatch.setenv("PATCHDB_JUDGE_API_KEY", "sk-or-v1-5e6f7a8b9c")
    for batch in ((), ("--batch",)):
        result = run_cli("judge", "--db", db_path, "--base-url", "http://127.0.0.1:9/v1",
                         "--no-progress", *batch)
        assert result.exit_code != 0
        assert "looks like an OpenRouter key" in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert "5e6f7a8b9c" not in result.output
    assert file_digest(db_path) == before


def test_without_a_url_the_provider_whose_key_is_set_is_used() -> None:
    both = resolve_endpoint(None, ALL_KEYS)
    assert (both.base_url, both.api_key) == ("https://openrouter.ai/api/v1", OPENROUTER_KEY)
    openai = resolve_endpoint(None, {"OPENAI_API_KEY": OPENAI_KEY})
    assert (openai.base_url, openai.api_key) == ("https://api.openai.com/v1", OPENAI_KEY)
    assert reasoning_options("https://api.openai.com/v1", "low") == {"reasoning_effort": "low"}


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    for var, value in ALL_KEYS.items():
        monkeypatch.setenv(var, value)


@pytest.fixture
def live_server(keys: None) -> Iterator[FaultServer]:
    with fault_server() as srv:
        yield srv


def _route(url: str, port: int, monkeypatch: pytest.MonkeyPatch) -> str:
    """The URL to pass: `{port}` filled in; a host that is not 127.0.0.1 goes by the proxy."""
    url = url.replace("{port}", str(port))
    if "127.0.0.1" not in url:
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    return url


LIVE_LOOK_ALIKES = [
    "http://127.0.0.1:{port}/x/api.openai.com/v1",
    "http://127.0.0.1:{port}/openrouter.ai/api/v1",
    "http://127.0.0.1:{port}/v1?to=api.openai.com",
    "http://127.0.0.1:{port}/v1?to=openrouter.ai",
    "http://api.openai.com.example.net/v1",
    "http://openrouter.ai.example.net/api/v1",
    "http://api.openai.com/v1",
    "http://openrouter.ai/api/v1",
    "http://api.openai.com@127.0.0.1:{port}/v1",
]


@pytest.mark.parametrize("url", LIVE_LOOK_ALIKES)
def test_live_judge_sends_no_provider_key_to_a_look_alike(
        url: str, db_path: Path, live_server: FaultServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    make_store(db_path)
    base_url = _route(url, live_server.port, monkeypatch)
    result = run_cli("judge", "--db", db_path, "--base-url", base_url, "--limit", "2",
                     "--reasoning", "low", "--concurrency", "1", "--no-progress")
    assert result.exit_code == 0, result.output
    headers = live_server.stats.auth_headers
    assert live_server.stats.requests == 2 and headers
    assert not any(OPENAI_KEY in h or OPENROUTER_KEY in h for h in headers), headers
    if "@" not in url:  # with userinfo the HTTP client sends it as Basic credentials instead
        assert headers == {f"Bearer {OWN_KEY}"}
    for body in live_server.stats.bodies:  # and OpenRouter's request shape, not OpenAI's
        assert "reasoning_effort" not in body and body["reasoning"] == {"effort": "low"}


@pytest.fixture
def batch_api(keys: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[BatchServer]:
    monkeypatch.setenv("PATCHDB_JUDGE_BATCH_POLL", "0.01")
    with batch_server() as srv:
        yield srv


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/api.openai.com/../v1",  # the path the client sends is /v1/...
    "http://api.openai.com.example.net/v1",
    "http://api.openai.com/v1",
])
def test_batch_sends_no_provider_key_to_a_look_alike(
        url: str, db_path: Path, batch_api: BatchServer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    make_store(db_path)
    base_url = _route(url, batch_api.port, monkeypatch)
    result = run_cli("judge", "--db", db_path, "--batch", "--base-url", base_url, "--limit", "4",
                     "--reasoning", "low")
    assert result.exit_code == 0, result.output
    assert "Submitted 1 batch(es) of 4 calls; collected 1" in result.output
    assert batch_api.state.auth_headers == {f"Bearer {OWN_KEY}"}
    (_name, data), = [f for f in batch_api.state.files.values() if f[0].startswith("patchdb-")]
    for line in data.splitlines():
        body = json.loads(line)["body"]
        assert "reasoning_effort" not in body and body["reasoning"] == {"effort": "low"}


def test_batch_refuses_openrouter_by_its_host_only(db_path: Path,
                                                  batch_api: BatchServer) -> None:
    make_store(db_path)
    before = file_digest(db_path)
    refused = run_cli("judge", "--db", db_path, "--batch", "--base-url",
                      "https://OpenRouter.ai/api/v1")
    assert refused.exit_code == 1 and len(refused.output.splitlines()) == 1
    assert refused.output.startswith("Error: OpenRouter's batch API takes its requests inline")
    assert file_digest(db_path) == before and not batch_api.state.calls
    # a server whose URL merely mentions OpenRouter is not OpenRouter
    elsewhere = f"http://127.0.0.1:{batch_api.port}/openrouter.ai/../v1"
    judged = run_cli("judge", "--db", db_path, "--batch", "--base-url", elsewhere,
                     "--limit", "4")
    assert judged.exit_code == 0, judged.output
    assert batch_api.state.auth_headers == {f"Bearer {OWN_KEY}"}


def test_help_says_which_key_goes_where() -> None:
    text = " ".join(run_cli("judge", "--help").output.split())
    assert "OPENAI_API_KEY goes only to https://api.openai.com" in text
    assert "OPENROUTER_API_KEY only to https://openrouter.ai" in text
    assert "any other URL gets PATCHDB_JUDGE_API_KEY or no key" in text
