"""The web example end to end: headless Chromium drives deploy/examples/web against a real gateway and emulator.

Needs Debian's `chromium`, Node and `npm ci` in deploy/examples/web (playwright-core, @elevenlabs/client).
`make test` installs all three (.ci/system-deps, then npm ci); a missing one is a failure naming the command that
fixes it, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import ASGIApp, Receive, Scope, Send

from service.__main__ import (
    DEV_AGENT_ID,
    EXAMPLE_CLIENT_BUNDLE,
    EXAMPLE_DIR,
    _dev_environment,
    example_app,
    with_example,
)
from service.app import create_app
from service.dev_tokens import mint_token
from service.emulator import create_emulator_app
from service.settings import load_settings
from tests.support.dev_command import running_dev_command
from tests.support.servers import ServedApp

REPO = Path(__file__).resolve().parents[2]
FLOW = Path(__file__).with_name("browser_flow.mjs")
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
BOBS_SEEDED = {"conv_03bob00refund000000000000b", "conv_04bob00inprogress00000000b"}


def require_browser_tools() -> None:
    """Fail with the fixing command when Chromium, Node or the example's packages are missing."""
    missing = []
    if not Path(CHROMIUM).is_file():
        missing.append(f"{CHROMIUM}: apt-get install -y chromium")
    if shutil.which("node") is None:
        missing.append("node: apt-get install -y nodejs npm")
    if (
        not (EXAMPLE_DIR / "node_modules" / "playwright-core").is_dir()
        or not (EXAMPLE_DIR / EXAMPLE_CLIENT_BUNDLE).is_file()
    ):
        missing.append(f"playwright-core and @elevenlabs/client: cd {EXAMPLE_DIR} && npm ci")
    if missing:
        pytest.fail(
            "the web example's browser test needs: " + "; ".join(missing) + " (`make test` installs them)"
        )


class LateApp:
    """An ASGI app whose target is set after its server has bound a port (CORS needs the port first)."""

    def __init__(self) -> None:
        self.target: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward to the target app."""
        assert self.target is not None
        await self.target(scope, receive, send)


@dataclass
class DevStack:
    """The gateway (with the example mounted as `dev` mounts it) and its emulator, on loopback."""

    gateway_port: int
    emulator_url: str
    api_key: str
    expired_token: str

    @property
    def page_url(self) -> str:
        """Return the page's URL: on `localhost`, a different origin from the gateway's 127.0.0.1 (CORS)."""
        return f"http://localhost:{self.gateway_port}/example/"


@contextlib.contextmanager
def dev_stack() -> Iterator[DevStack]:
    """Serve what `convai-gateway dev` serves: the seeded emulator and the gateway with the example page."""
    emulator_app, gateway_app = LateApp(), LateApp()
    emulator, gateway = ServedApp(emulator_app), ServedApp(gateway_app)
    env = _dev_environment(gateway.port, emulator.port)
    env["ELEVENLABS_BASE_URL"] = emulator.url
    env.pop("REDIS_URL", None)
    settings = load_settings(env)
    issuer = settings.issuers[0]

    def mint(sub: str, now: float | None = None) -> str:
        return mint_token(
            env["JWT_HS256_SECRET"],
            sub,
            issuer=issuer.issuer,
            audience=(issuer.audiences or (None,))[0],
            now=now,
        )

    emulator_app.target = create_emulator_app(env["ELEVENLABS_API_KEY"], seed=True)
    page = example_app(
        EXAMPLE_DIR,
        gateway_url=f"http://127.0.0.1:{gateway.port}",
        upstream_url=emulator.url,
        agent_id=DEV_AGENT_ID,
        mint=mint,
    )
    gateway_app.target = with_example(create_app(settings), page)
    emulator.start()
    try:
        gateway.start()
        try:
            # Issued two days ago for an hour: expired whatever the leeway.
            expired = mint("carol", now=time.time() - 2 * 86_400)
            yield DevStack(gateway.port, emulator.url, env["ELEVENLABS_API_KEY"], expired)
        finally:
            gateway.stop()
    finally:
        emulator.stop()


def run_browser_flow(stack: DevStack) -> dict[str, Any]:
    """Run the Playwright script against the stack; return what it saw, or fail with its output."""
    env = {
        **os.environ,
        "E2E_PAGE_URL": stack.page_url,
        "E2E_WEB_DIR": str(EXAMPLE_DIR),
        "E2E_ARTIFACTS": str(ARTIFACTS),
        # The key itself, and the header that would carry it: neither may ever reach the browser.
        "E2E_FORBIDDEN": json.dumps([stack.api_key, "xi-api-key"]),
        "E2E_EXPIRED_TOKEN": stack.expired_token,
        "CHROMIUM": CHROMIUM,
    }
    node = shutil.which("node") or "node"
    result = subprocess.run(
        [node, str(FLOW)], env=env, capture_output=True, text=True, timeout=55, check=False
    )
    if result.returncode != 0:
        pytest.fail(
            f"browser flow exited {result.returncode}\n{result.stderr[-4000:]}\n{result.stdout[-2000:]}"
        )
    seen: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return seen


def upstream(stack: DevStack, path: str, **params: str) -> dict[str, Any]:
    """GET an upstream (emulator) endpoint with the workspace key, as only the gateway may."""
    response = httpx.get(
        f"{stack.emulator_url}{path}", params=params, headers={"xi-api-key": stack.api_key}, timeout=5
    )
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    return body


def test_browser_talks_to_an_agent_lists_its_history_and_sends_feedback_without_the_api_key() -> None:
    require_browser_tools()
    screenshot = ARTIFACTS / "web-example.png"
    screenshot.unlink(missing_ok=True)
    with dev_stack() as stack:
        seen = run_browser_flow(stack)
        text_id, voice_id = seen["alice"]["textId"], seen["alice"]["voiceId"]

        # The official client really ran the protocol: both conversations are recorded upstream for alice.
        listed_upstream = upstream(stack, "/v1/convai/conversations", user_id="alice")["conversations"]
        assert {text_id, voice_id} <= {row["conversation_id"] for row in listed_upstream}
        text = upstream(stack, f"/v1/convai/conversations/{text_id}")
        voice = upstream(stack, f"/v1/convai/conversations/{voice_id}")

    for details in (text, voice):
        assert (details["user_id"], details["agent_id"], details["status"]) == ("alice", DEV_AGENT_ID, "done")
        assert details["conversation_initiation_client_data"]["source_info"]["source"] == "js_sdk"
    assert [(t["role"], t["message"], t["source_medium"]) for t in text["transcript"]] == [
        ("user", "Where is my order?", "text"),
        ("agent", "You said: Where is my order?", "text"),
    ]
    assert [(t["role"], t["source_medium"]) for t in voice["transcript"][:2]] == [
        ("user", "audio"),
        ("agent", "audio"),
    ]
    # Feedback went page -> gateway -> upstream.
    assert text["metadata"]["feedback"]["overall_score"] == "like"
    assert voice["metadata"]["feedback"]["overall_score"] == "dislike"

    # Alice sees both; bob, in a fresh browser, sees only his own and gets 404 for alice's conversation.
    assert {text_id, voice_id} <= set(seen["alice"]["listed"])
    assert set(seen["bob"]["listed"]) == BOBS_SEEDED
    assert seen["bob"]["feedbackOnAlices"]["status"] == 404
    assert seen["bob"]["feedbackOnAlices"]["body"]["code"] == "not_found"
    # The signed-in page holds the token in memory only: not in the DOM, nor restored into a page loaded later.
    assert seen["bob"]["tokenInDom"] == seen["bob"]["tokenAfterBack"] == ""
    # Carol's expired token: the page signed her out and asked for a new sign-in.
    assert seen["carol"]["who"] == "Signed out"

    # Every HTTP response and WebSocket frame the pages received was scanned for the key.
    received = seen["received"]
    assert seen["leaks"] == [] and seen["problems"] == []
    assert received["http"] >= 15 and received["frames"] >= 4
    assert received["corsAllowed"] >= 5  # the page's origin differs from the gateway's: real CORS
    assert {"conversation_initiation_metadata", "agent_response", "user_transcript", "audio"} <= set(
        received["frameTypes"]
    )
    # The browser talks to upstream directly with the signed URL; the gateway only minted it.
    assert set(received["websockets"]) == {stack.emulator_url.removeprefix("http://")}
    assert screenshot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert screenshot.stat().st_size > 10_000


@pytest.fixture
def dev_command() -> Iterator[tuple[int, list[str]]]:
    """Run `convai-gateway dev` on free ports; yield its gateway port and banner lines."""
    with running_dev_command() as dev:
        yield dev.port, dev.lines


def test_dev_command_serves_the_example_page_with_cors_and_dev_tokens(
    dev_command: tuple[int, list[str]],
) -> None:
    require_browser_tools()
    port, lines = dev_command
    page = f"http://localhost:{port}/example/"
    assert f"Web example: {page}" in lines, lines
    gateway = f"http://127.0.0.1:{port}"
    with httpx.Client(timeout=5) as client:
        index = client.get(page)
        assert index.status_code == 200 and 'src="vendor/elevenlabs-client.js"' in index.text
        # The page holds a user's JWT: it runs only its own scripts and talks only to the gateway and to
        # upstream's conversation WebSocket (the emulator's, under dev), never framed, with no referrer.
        emulator = next(line for line in lines if "upstream emulator on " in line).rsplit(" ", 1)[1]
        csp = dict(
            directive.strip().split(" ", 1)
            for directive in index.headers["content-security-policy"].split(";")
        )
        assert csp == {
            "default-src": "'none'",
            "script-src": "'self'",
            "style-src": "'self'",
            "img-src": "data:",
            "connect-src": f"'self' {gateway} {emulator.replace('http://', 'ws://')}",
            "base-uri": "'none'",
            "form-action": "'none'",
            "frame-ancestors": "'none'",
        }
        assert index.headers["x-content-type-options"] == "nosniff"
        assert index.headers["referrer-policy"] == "no-referrer"
        assert index.headers["x-frame-options"] == "DENY"
        # The SDK's audio worklets, served from the page's origin so script-src needs no blob: or data:.
        for worklet in ("raw-audio-processor.js", "audio-concat-processor.js"):
            served = client.get(page + "vendor/" + worklet)
            assert served.status_code == 200 and "registerProcessor(" in served.text
            assert served.headers["content-type"] == "text/javascript; charset=utf-8"
        bundle = client.get(page + "vendor/elevenlabs-client.js")
        assert bundle.status_code == 200 and bundle.text.startswith("var ElevenLabsClient")
        assert client.get(page + "config.json").json() == {"gatewayUrl": gateway, "agentId": DEV_AGENT_ID}
        assert client.get(page + "dev-token", params={"sub": "bob smith"}).status_code == 422
        # Only the listed files are served: nothing else of the example directory (package.json, node_modules).
        assert client.get(page + "package.json").status_code == 404
        assert client.get(f"http://localhost:{port}/examples").status_code == 404

        token = client.get(page + "dev-token", params={"sub": "bob"}).json()["token"]
        origin = f"http://localhost:{port}"
        preflight = client.options(
            f"{gateway}/v1/convai/conversations",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == origin
        listed = client.get(
            f"{gateway}/v1/convai/conversations",
            headers={"Authorization": f"Bearer {token}", "Origin": origin},
        )
        assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == origin
        assert {row["conversation_id"] for row in listed.json()["conversations"]} == BOBS_SEEDED
