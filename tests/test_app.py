"""The assembled app: health, readiness, OpenAPI honesty, metrics, and failure answers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import httpx
from openapi_spec_validator import validate
from starlette.routing import Route

from service.app import create_app
from service.openapi import OPERATIONS
from service.settings import load_settings
from tests.support.gateway import Gateway, gateway_env
from tests.support.lifespan import running
from tests.support.servers import RedisServer, free_port

GatewayFactory = Callable[..., AbstractAsyncContextManager[Gateway]]


async def test_healthz_is_always_ok(gateway: Gateway) -> None:
    response = await gateway.client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_ready_with_redis_and_keys(gateway: Gateway) -> None:
    response = await gateway.client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ready"
    assert body["checks"]["redis"]["ok"] is True
    assert body["checks"]["jwt_keys"]["ok"] is True
    assert body["mode"]["rate_limiter"] == "redis"


async def test_readyz_names_redis_when_it_is_down(gateway: Gateway, redis_server: RedisServer) -> None:
    redis_server.stop()
    try:
        response = await gateway.client.get("/readyz")
    finally:
        redis_server.start()
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not_ready"
    assert body["checks"]["redis"]["ok"] is False
    assert body["checks"]["jwt_keys"]["ok"] is True
    recovered = await gateway.client.get("/readyz")
    assert recovered.status_code == 200


async def test_readyz_says_when_running_without_redis(make_gateway: GatewayFactory) -> None:
    async with make_gateway(REDIS_URL="") as gw:
        response = await gw.client.get("/readyz")
    assert response.status_code == 200
    body = response.json()
    assert body["mode"] == {
        "rate_limiter": "in-process",
        "ledger": "in-process",
        "ownership": "ledger_or_user_id",
    }
    assert "in-process" in body["checks"]["redis"]["detail"]


async def test_readyz_waits_for_jwks_keys(make_gateway: GatewayFactory) -> None:
    unreachable = f"http://127.0.0.1:{free_port()}/jwks.json"
    async with make_gateway(JWT_JWKS_URL=unreachable) as gw:
        response = await gw.client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["jwt_keys"]["ok"] is False


async def test_openapi_documents_exactly_the_mounted_routes(gateway: Gateway) -> None:
    response = await gateway.client.get("/openapi.json")
    assert response.status_code == 200
    document = response.json()
    validate(document)
    assert document["openapi"] == "3.1.0"
    mounted = {
        (method, route.path)
        for route in gateway.app.routes
        if isinstance(route, Route)
        for method in (route.methods or ())
        if method != "HEAD"
    }
    documented = {(method.upper(), path) for path, ops in document["paths"].items() for method in ops}
    assert documented == mounted == set(OPERATIONS)


LIST = "/v1/convai/conversations"
FEEDBACK = "/v1/convai/conversations/{conversation_id}/feedback"


def documented_codes(document: dict[str, Any], method: str, path: str, status: int) -> set[str]:
    """Return the problem `code`s the document lists for one status of one operation (empty when none)."""
    response = document["paths"][path][method.lower()]["responses"].get(str(status))
    if response is None:
        return set()
    if "$ref" in response:
        response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"]["application/problem+json"]["schema"]
    codes: set[str] = set()
    for part in schema.get("allOf", [schema]):
        codes |= set(part.get("properties", {}).get("code", {}).get("enum", []))
    return codes


async def test_openapi_lists_the_status_and_code_of_each_refusal_the_routes_give(gateway: Gateway) -> None:
    document = (await gateway.client.get("/openapi.json")).json()
    alice = gateway.headers("alice")
    as_json = {**alice, "Content-Type": "application/json"}
    feedback = FEEDBACK.replace("{conversation_id}", "conv_missing")
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", FEEDBACK, {"url": feedback, "headers": alice, "content": b'{"feedback": "like"}'}),
        ("POST", FEEDBACK, {"url": feedback, "headers": as_json, "content": b" " * 2000}),
        ("POST", FEEDBACK, {"url": feedback, "headers": as_json, "content": b'{"feedback": 1}'}),
        ("POST", FEEDBACK, {"url": feedback, "headers": as_json, "content": b'{"feedback": "like"}'}),
        ("GET", LIST, {"url": LIST, "headers": alice, "params": {"cursor": "forged.cursor"}}),
        ("GET", LIST, {"url": LIST, "headers": gateway.headers("alice", scopes="convai:session")}),
        ("GET", LIST, {"url": LIST, "headers": alice, "params": {"agent_id": "agent_unlisted"}}),
        ("GET", LIST, {"url": LIST, "headers": {"Authorization": "Bearer nope"}}),
    ]
    seen = set()
    for method, path, request in cases:
        response = await gateway.client.request(method, **request)
        body = response.json()
        seen.add((response.status_code, body["code"]))
        assert body["code"] in documented_codes(document, method, path, response.status_code), (
            method,
            path,
            response.status_code,
            body,
        )
    assert {status for status, _ in seen} == {415, 413, 422, 404, 403, 401}, seen
    # A body that never finishes arriving is a 408 (tests/observability/test_http_hygiene.py).
    assert documented_codes(document, "POST", FEEDBACK, 408) == {"request_timeout"}


async def test_openapi_patterns_accept_the_data_collection_filters_the_gateway_takes(
    gateway: Gateway,
) -> None:
    document = (await gateway.client.get("/openapi.json")).json()
    (param,) = [
        p for p in document["paths"][LIST]["get"]["parameters"] if p["name"] == "data_collection_params"
    ]
    pattern = re.compile(param["schema"]["items"]["pattern"])
    # README: "exists and missing ignore their value, which may be empty or left out".
    for value in ("email:exists", "email:exists:", "email:missing:ignored", "city:eq:Oslo", "age:gte:18"):
        response = await gateway.client.get(
            LIST, params={"data_collection_params": value}, headers=gateway.headers("alice")
        )
        assert response.status_code == 200, (value, response.text)
        assert pattern.search(value), value


async def test_openapi_scopes_match_the_design(gateway: Gateway) -> None:
    document = (await gateway.client.get("/openapi.json")).json()
    scopes = {
        (method.upper(), path): op.get("x-required-scope")
        for path, ops in document["paths"].items()
        for method, op in ops.items()
    }
    assert scopes[("GET", "/v1/convai/conversation/get-signed-url")] == "convai:session"
    assert scopes[("GET", "/v1/convai/conversation/token")] == "convai:session"
    assert scopes[("GET", "/v1/convai/conversations")] == "convai:history"
    assert scopes[("DELETE", "/v1/convai/conversations/{conversation_id}")] == "convai:delete"
    assert scopes[("GET", "/healthz")] is None


async def test_metrics_are_served_in_prometheus_format(gateway: Gateway) -> None:
    await gateway.client.get("/healthz")
    response = await gateway.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    assert 'convai_gateway_http_requests_total{method="GET",route="/healthz",status="200"}' in response.text


async def test_responses_before_the_router_are_counted_under_their_route(gateway: Gateway) -> None:
    # The authentication middleware answers before the router sets the route: the path still names it.
    assert (await gateway.client.get("/v1/convai/conversations")).status_code == 401
    assert (await gateway.client.delete("/v1/convai/conversations/conv_1")).status_code == 401
    # Authentication runs before routing: an unknown path under /v1 is still a 401 to an anonymous caller.
    unknown = await gateway.client.get("/v1/no-such-route")
    assert unknown.status_code == 401 and unknown.json()["code"] == "invalid_token"
    assert unknown.headers["www-authenticate"] == 'Bearer realm="convai-gateway"'
    text = (await gateway.client.get("/metrics")).text
    assert (
        'convai_gateway_http_requests_total{method="GET",route="/v1/convai/conversations",status="401"}'
        in text
    )
    assert (
        'convai_gateway_http_requests_total{method="DELETE",'
        'route="/v1/convai/conversations/{conversation_id}",status="401"}'
    ) in text
    assert 'route="/v1/no-such-route"' not in text


async def test_unreachable_upstream_is_a_502_problem(redis_url: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    settings = load_settings(gateway_env(dead, "xi-key", redis_url, UPSTREAM_MAX_RETRIES="0"))
    app = create_app(settings)
    from service.dev_tokens import mint_token
    from tests.support.gateway import TEST_JWT_SECRET

    token = mint_token(TEST_JWT_SECRET, "alice")
    async with (
        running(app) as asgi,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://gateway.test") as client,
    ):
        response = await client.get(
            "/v1/convai/conversation/get-signed-url",
            params={"agent_id": "agent_demo"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "upstream_error"
    assert "Traceback" not in response.text


async def test_unexpected_errors_are_500_problems_with_request_id_and_security_headers(
    gateway: Gateway,
) -> None:
    async def explode(request: object) -> None:
        raise RuntimeError("boom with a secret inside")

    gateway.app.router.routes.append(Route("/explode", explode))
    response = await gateway.client.get("/explode", headers={"X-Request-ID": "req-123"})
    assert response.status_code == 500
    assert response.json()["code"] == "internal_error"
    assert "secret" not in response.text
    assert response.headers["x-request-id"] == "req-123"
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_unexpected_errors_carry_cors_headers_for_allowed_origins(make_gateway: GatewayFactory) -> None:
    # The error boundary sits inside CORS, so a browser can read a 500's problem body and request id.
    async def explode(request: object) -> None:
        raise RuntimeError("boom")

    async with make_gateway(CORS_ALLOWED_ORIGINS="https://app.example") as gw:
        gw.app.router.routes.append(Route("/explode", explode))
        response = await gw.client.get("/explode", headers={"Origin": "https://app.example"})
    assert response.status_code == 500
    assert response.headers["access-control-allow-origin"] == "https://app.example"
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()


async def test_cors_grants_an_origin_written_with_capitals_or_its_default_port(
    make_gateway: GatewayFactory,
) -> None:
    # Browsers send the serialized origin: lower-case scheme and host, no default port, no trailing slash.
    configured = "HTTPS://App.Example:443, http://LocalHost:8080/"
    async with make_gateway(CORS_ALLOWED_ORIGINS=configured) as gw:
        for origin in ("https://app.example", "http://localhost:8080"):
            granted = await gw.client.options(
                "/v1/convai/conversations",
                headers={
                    "Origin": origin,
                    "Access-Control-Request-Method": "GET",
                    "Access-Control-Request-Headers": "authorization",
                },
            )
            assert granted.status_code == 200, granted.text
            assert granted.headers["access-control-allow-origin"] == origin
            listed = await gw.client.get(
                "/v1/convai/conversations", headers={**gw.headers("alice"), "Origin": origin}
            )
            assert listed.headers["access-control-allow-origin"] == origin


async def test_wrong_method_is_a_405_problem_naming_every_method_of_the_path(gateway: Gateway) -> None:
    headers = gateway.headers("alice")
    conversation = await gateway.client.put("/v1/convai/conversations/conv_1", headers=headers)
    assert conversation.status_code == 405
    assert conversation.json()["code"] == "method_not_allowed"
    # Two routes serve this path (details and delete): the Allow header names both.
    assert conversation.headers["allow"] == "DELETE, GET, HEAD"
    mint = await gateway.client.post("/v1/convai/conversation/get-signed-url", headers=headers)
    # A mint has effects a HEAD could not hand out: the token routes take GET only.
    assert (mint.status_code, mint.headers["allow"]) == (405, "GET")


async def test_security_headers_and_request_id_on_every_response(gateway: Gateway) -> None:
    for path in ("/healthz", "/nope", "/v1/convai/conversations"):
        response = await gateway.client.get(path)
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert len(response.headers["x-request-id"]) >= 8


def output_of_child(script: str) -> str:
    """Run `script` in a fresh interpreter with a gateway's environment; return what it printed."""
    env = {"PATH": os.environ.get("PATH", ""), **gateway_env("http://127.0.0.1:9", "xi-key", redis_url=None)}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def test_serve_factory_freezes_start_up_objects_out_of_gc_scans() -> None:
    # A child process: freezing changes the garbage collector of the whole interpreter.
    script = (
        "import gc\n"
        "from service.app import app_from_environment\n"
        "before = gc.get_freeze_count()\n"
        "app_from_environment()\n"
        "print(before, gc.get_freeze_count())\n"
    )
    before, after = (int(n) for n in output_of_child(script).split())
    # Not `before == 0`: some interpreters start with objects frozen already (375 on CPython 3.12.1).
    assert after - before > 10_000


def test_the_served_app_never_imports_the_emulator() -> None:
    # README and DESIGN: production code never imports service/emulator (only `dev`, `emulator` and the tests
    # do). A child process, since this one has imported it already: every production module, then the app
    # exactly as `serve` builds it.
    script = (
        "import importlib, pathlib, sys\n"
        "import service\n"
        "root = pathlib.Path(service.__file__).parent\n"
        "for path in sorted(root.rglob('*.py')):\n"
        "    parts = path.relative_to(root.parent).with_suffix('').parts\n"
        "    if 'emulator' not in parts:\n"
        "        importlib.import_module('.'.join(parts).removesuffix('.__init__'))\n"
        "from service.app import app_from_environment\n"
        "app_from_environment()\n"
        "print(sorted(name for name in sys.modules if name.startswith('service.')))\n"
    )
    loaded = output_of_child(script)
    assert "'service.routes.sessions'" in loaded and "'service.__main__'" in loaded
    assert "service.emulator" not in loaded
