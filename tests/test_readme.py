"""README.md agrees with the code: settings, problem codes and statuses, metrics, audit events, CLI, Helm values,
rate-limit defaults, the example page's CSP, the emulator's fault API, the paths it names, the hostile-input count."""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

import service.app
import service.cursors
import service.jwks
import service.ledger
import service.ratelimit
from service import errors
from service import settings as settings_module
from service.__main__ import build_parser, example_csp
from service.emulator import faults
from service.errors import GatewayError
from service.observability import Metrics

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
ERROR_MODULES = (service.app, service.cursors, service.jwks, service.ledger, service.ratelimit)
EN_DASH = "\u2013"  # README writes ranges as 1<EN DASH>100, and an empty labels cell as an en dash
ENV_NAME = re.compile(r"`([A-Z][A-Z0-9_]+)`")
# Codes a class defines that no response can carry: an abstract base, and a failure that is only recorded.
NEVER_ANSWERED = {
    "forbidden": "PermissionDenied is only a base class; every 403 raises a subclass with its own code",
    "jwks_unavailable": "JWKS refreshes never raise; a token whose key is missing is 401 unknown key",
    "http_error": "the fallback for a Starlette HTTPException status _HTTP_CODES does not list; none is raised",
}


def section(title: str) -> str:
    """Return the README text under the heading `title`, up to the next heading of the same or higher level."""
    match = re.search(rf"^(#+) {re.escape(title)}\n", README, re.MULTILINE)
    assert match, f"README has no section {title!r}"
    level = len(match.group(1))
    rest = README[match.end() :]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.MULTILINE)
    return rest[: end.start()] if end else rest


def table_rows(text: str, first_header: str) -> list[list[str]]:
    """Return the cells of the rows of the Markdown table whose first header cell is `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        # Split on unescaped pipes; an empty cell is `| |`.
        cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
        rows.append([cell.strip() for cell in cells])
    return rows


def config_rows() -> dict[str, tuple[str, str]]:
    """Return each variable of README's configuration table with its default and meaning cells."""
    rows: dict[str, tuple[str, str]] = {}
    for name_cell, default_cell, meaning in table_rows(section("Configuration"), "variable"):
        names = ENV_NAME.findall(name_cell)
        defaults = re.findall(r"`([^`]*)`", default_cell)
        for index, name in enumerate(names):
            default = defaults[index] if len(defaults) == len(names) > 1 else default_cell.strip("`")
            rows[name] = (default, meaning)
    return rows


def settings_reads() -> Iterator[tuple[str, str, list[ast.expr], dict[str, ast.expr]]]:
    """Yield (method, variable, positional args, keyword args) for each environment read in service/settings.py."""
    tree = ast.parse((ROOT / "service" / "settings.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        first, func = node.args[0], node.func
        if not (
            isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id == "reader"
        ):
            continue
        if isinstance(first, ast.Constant) and isinstance(first.value, str) and first.value.isupper():
            yield func.attr, first.value, node.args, {k.arg: k.value for k in node.keywords if k.arg}


def constant(node: ast.expr) -> object:
    """Return the value of a constant expression of settings.py (`365 * 86400` included)."""
    return eval(compile(ast.Expression(node), "settings.py", "eval"), {"__builtins__": {}})  # noqa: S307


def number_text(value: object) -> str:
    """Format a default or bound as README writes it (60000 stays 60000; 3600.0 is 3600)."""
    assert isinstance(value, int | float)
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_every_setting_read_is_in_the_configuration_table_and_back() -> None:
    read = {name for _, name, _, _ in settings_reads()}
    documented = set(config_rows())
    assert read - documented == set(), (
        "read by service/settings.py, missing from README's Configuration table"
    )
    # Variables the table names that settings.py does not read are read elsewhere (observability, serve).
    assert documented - read == {"PROMETHEUS_MULTIPROC_DIR"}


def test_every_numeric_setting_has_its_default_and_range_in_the_table() -> None:
    rows = config_rows()
    for method, name, args, keywords in settings_reads():
        if method not in ("integer", "number"):
            continue
        default, low, high = constant(args[1]), constant(keywords["low"]), constant(keywords["high"])
        documented_default, meaning = rows[name]
        wanted_default = "off" if default == 0 and low == 0 else number_text(default)
        assert documented_default == wanted_default, f"{name}: README says {documented_default!r}"
        span = f"{number_text(low)}{EN_DASH}{number_text(high)}"
        assert span in meaning.replace(",", ""), f"{name}: README does not give the range {span}"


def test_every_choice_setting_lists_its_default_and_choices() -> None:
    rows = config_rows()
    for method, name, args, _ in settings_reads():
        if method != "choice":
            continue
        default = constant(args[1])
        documented_default, meaning = rows[name]
        assert documented_default == default, f"{name}: README says {documented_default!r}"
        choices = getattr(settings_module, ast.unparse(args[2]))
        for choice in choices:
            assert f"`{choice}`" in meaning, f"{name}: README does not list {choice!r}"


def code_statuses() -> dict[str, set[int]]:
    """Return every problem `code` the service defines, with its statuses: exception classes, literal problems."""
    assert ERROR_MODULES  # imported so that GatewayError.__subclasses__ sees every error class
    statuses: dict[str, set[int]] = {}
    pending: list[type[GatewayError]] = [GatewayError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls.__module__.startswith("service.") and not cls.__module__.startswith("service.emulator"):
            statuses.setdefault(cls.code, set()).add(cls.status)
    for status, (code, _) in errors._HTTP_CODES.items():
        statuses.setdefault(code, set()).add(status)
    literal = re.compile(r'(?:problem_response|_refuse)\(\s*(\d{3}),\s*"([a-z_]+)"')
    for path in (ROOT / "service").rglob("*.py"):
        if "emulator" in path.parts:
            continue
        for match in literal.finditer(path.read_text(encoding="utf-8")):
            statuses.setdefault(match.group(2), set()).add(int(match.group(1)))
    return statuses


def emitted_codes() -> set[str]:
    """Return every problem `code` the service defines: exception classes and literal problem responses."""
    # errors._http_exception_handler's fallback for a status _HTTP_CODES does not list.
    return set(code_statuses()) | {"http_error"}


def test_readme_lists_every_problem_code_the_gateway_answers_and_no_other() -> None:
    assert ERROR_MODULES  # imported so that GatewayError.__subclasses__ sees every error class
    stable = section("API").split("`code` is stable:", 1)[1].split("\n\n", 1)[0]
    commands = next(a for a in build_parser()._actions if a.dest == "command").choices or {}
    listed = set(re.findall(r"`([a-z_]+)`", stable)) - set(commands)  # `serve`'s HTTP layer, `dev` only
    answered = emitted_codes() - set(NEVER_ANSWERED)
    assert answered - listed == set(), "answered by the gateway, missing from README's list of stable codes"
    assert listed - answered == set(), "in README's list of stable codes, never answered"


def test_every_metric_and_label_is_in_the_metrics_table() -> None:
    metrics = Metrics(CollectorRegistry())
    exported = {}
    for wrapper in vars(metrics).values():
        if isinstance(wrapper, MetricWrapperBase):
            suffix = "_total" if wrapper._type == "counter" else ""
            exported[wrapper._name + suffix] = (wrapper._type, wrapper._labelnames)
    rows = {row[0].strip("`"): row for row in table_rows(section("Metrics"), "metric")}
    assert set(rows) == set(exported), "README's metrics table (one unbroken table) differs from the metrics"
    for name, (kind, labels) in exported.items():
        _, documented_kind, documented_labels = rows[name]
        assert documented_kind == kind, f"{name}: README says {documented_kind}, the gateway exports a {kind}"
        for label in labels:
            assert f"`{label}`" in documented_labels, f"{name}: label {label} is missing from README"
        if not labels:
            assert documented_labels == EN_DASH, f"{name}: README lists labels the metric does not have"


def test_every_command_and_option_is_in_the_command_line_section() -> None:
    text = section("Command line")
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert isinstance(subparsers.choices, dict)
    for command, sub in subparsers.choices.items():
        assert f"convai-gateway {command}" in text, f"{command} is missing from README's Command line section"
        usage = next(line for line in text.splitlines() if line.startswith(f"convai-gateway {command}"))
        for action in sub._actions:
            for option in action.option_strings:
                if option not in ("-h", "--help"):
                    assert option in usage, (
                        f"{command} {option} is missing from README's Command line section"
                    )
    for option in parser._actions:
        for flag in option.option_strings:
            if flag not in ("-h", "--help"):
                assert f"convai-gateway {flag}" in text, (
                    f"convai-gateway {flag} is missing from README's Command line section"
                )


def helm_value_paths() -> dict[str, str]:
    """Return each environment variable the chart's ConfigMap sets, with the values.yaml key it comes from."""
    template = (ROOT / "helm" / "convai-gateway" / "templates" / "configmap.yaml").read_text(encoding="utf-8")
    found: dict[str, str] = {}
    current: str | None = None
    for line in template.split("\n---\n", 1)[0].splitlines():
        value = re.search(r"(\$c|\.Values)\.([A-Za-z.]+)", line)
        env = re.match(r"\s+([A-Z][A-Z0-9_]+): ", line)
        path = None
        if value:
            path = ("config." if value.group(1) == "$c" else "") + value.group(2)
        if env and path:
            found[env.group(1)] = path
        elif env and current:
            found[env.group(1)] = current
        current = path if (path and not env) else None
    return found


def documented_helm_values() -> set[str]:
    """Return every values.yaml key README's Main values table names (`.x` continues the row's first key)."""
    keys: set[str] = set()
    for row in table_rows(section("Main values"), "value"):
        tokens = re.findall(r"`([^`]+)`", row[0])
        parent = tokens[0].rsplit(".", 1)[0] if "." in tokens[0] else ""
        for token in tokens:
            keys.add(f"{parent}{token}" if token.startswith(".") else token)
    return keys


def test_the_helm_values_table_lists_every_value_that_becomes_an_environment_variable() -> None:
    documented = documented_helm_values()
    missing = {
        env: path
        for env, path in helm_value_paths().items()
        if path not in documented and path.rsplit(".", 1)[0] + ".*" not in documented
    }
    # Set by the chart itself from other values (GATEWAY_CONFIG, the key file), not from one key.
    assert missing == {}, (
        "values.yaml keys that set an environment variable, missing from README's Main values"
    )


def gateway_prose() -> str:
    """Return README without the emulator's section, whose codes and statuses are the emulator's own."""
    emulator = section("Upstream emulator")
    return README.replace(emulator, "")


def test_every_status_and_code_the_prose_pairs_is_one_the_gateway_answers() -> None:
    # "`403 insufficient_scope`", "503 `audio_streams_busy`": the code exists and comes with that status.
    paired = re.compile(r"`([1-5][0-9]{2})\s+([a-z_]+)`|\b([1-5][0-9]{2}) `([a-z_]+)`")
    statuses = code_statuses()
    pairs = set()
    for match in paired.finditer(gateway_prose()):
        status, code = int(match.group(1) or match.group(3)), match.group(2) or match.group(4)
        pairs.add((status, code))
        assert code in statuses, f"README names {status} {code}, a code the gateway never answers"
        assert status in statuses[code], (
            f"README says {code} is a {status}; the gateway answers {statuses[code]}"
        )
    assert len(pairs) >= 10, "the pattern no longer finds README's status-and-code pairs"


def test_every_metric_the_readme_names_is_exported() -> None:
    # The series a scrape shows: a counter's _total, a histogram's _bucket, _count and _sum (and its name).
    series = {"counter": ("_total",), "histogram": ("", "_bucket", "_count", "_sum")}
    exported = set()
    for wrapper in vars(Metrics(CollectorRegistry())).values():
        if isinstance(wrapper, MetricWrapperBase):
            exported |= {wrapper._name + suffix for suffix in series.get(str(wrapper._type), ("",))}
    named = set(re.findall(r"\bconvai_gateway_[a-z_]+", README))
    assert named - exported == set(), "README names metrics (or series) the gateway does not export"


def test_every_audit_event_is_listed_and_every_listed_one_is_written() -> None:
    written = set()
    for path in (ROOT / "service").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        written |= set(re.findall(r'\b_?audit(?:_mint)?\(\s*"([a-z_]+)"', text))
    line = next(line for line in section("Logs").splitlines() if "`convai_gateway.audit`" in line)
    listed = set(re.findall(r"`([a-z_]+)`", line))
    assert written, "the pattern no longer finds the audit events the service writes"
    assert listed == written, "README's list of audit events differs from the events the service writes"


# Outputs of a run, not files of the repository.
GENERATED_PATHS = ("tests/artifacts/", "tests/perf/results/")


def test_every_repository_path_the_readme_names_exists() -> None:
    named = set(re.findall(r"`((?:\.ci|service|tests|deploy|helm)/[^`\s]*)`", README))
    named |= set(re.findall(r"\]\(([^)#:]+)\)", README))  # relative Markdown links and images
    assert len(named) > 20, "the pattern no longer finds README's paths"
    missing = {path for path in named if not (ROOT / path).exists() and not path.startswith(GENERATED_PATHS)}
    assert missing == set(), "README names paths that are not in the repository"


def test_the_reliability_table_counts_the_hostile_input_rows() -> None:
    tree = ast.parse((ROOT / "tests" / "reliability" / "test_hostile_input.py").read_text(encoding="utf-8"))
    rows = next(
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == "ROWS"
    )
    assert isinstance(rows, ast.Dict)
    assert f"| hostile input | {len(rows.keys)}-row raw-socket table" in section("Reliability")


def test_the_rate_limit_table_gives_every_policy_its_default() -> None:
    rows = {row[0].strip("`"): row for row in table_rows(section("Rate limits"), "policy")}
    defaults = settings_module.DEFAULT_RATE_LIMITS
    assert set(rows) == set(defaults), "README's rate-limit table differs from the policies"
    for name, policy in defaults.items():
        default = re.sub(r"(?<=[0-9]),(?=[0-9])", "", rows[name][2])  # 1,000 is 1000
        match = re.match(r"([0-9]+)/min(?:, burst ([0-9]+))?", default)
        assert match, f"{name}: README's default {default!r} is not `N/min[, burst B]`"
        # Where the table names no burst it equals limit (README, under the table).
        documented = (int(match.group(1)), 60.0, int(match.group(2) or match.group(1)))
        assert documented == (policy.limit, policy.period_seconds, policy.burst), (
            f"{name}: README says {default}"
        )


def test_the_web_example_csp_is_the_one_dev_serves() -> None:
    csp = example_csp("https://gateway.invalid", "https://upstream.invalid")
    documented = csp.replace("https://gateway.invalid", "<gateway>").replace(
        "wss://upstream.invalid", "<upstream ws>"
    )
    prose = " ".join(section("Using it from a web page").split())  # the policy wraps across lines
    assert f"`{documented}`" in prose, "README's example-page CSP differs from the one `dev` serves"


def test_the_emulator_fault_api_lists_every_endpoint_kind_and_field() -> None:
    text = " ".join(section("Upstream emulator").split())
    endpoints = re.search(r'"endpoint": "([^"]+)"', text)
    kinds = re.search(r'"kind": "([^"]+)"', text)
    assert endpoints and kinds, "README no longer shows the fault JSON"
    assert set(endpoints.group(1).split("|")) == faults.ENDPOINTS
    assert set(kinds.group(1).split("|")) == faults.KINDS
    fields = set(faults.Fault().as_json())
    assert {field for field in fields if f'"{field}":' in text} == fields


def test_every_make_command_the_readme_gives_is_one_make_accepts() -> None:
    # make reads `--levers` as an option of its own and stops: the perf tools' options go through ARGS.
    targets = set(
        re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.MULTILINE)
    )
    commands = re.findall(r"`make ([^`]*)`", README)
    assert len(commands) > 10, "the pattern no longer finds README's make commands"
    for command in commands:
        for word in shlex.split(command):
            assert word in targets or re.fullmatch(r"[A-Z][A-Z_]*=.*", word), f"`make {command}`: {word!r}"
