"""Operator configuration: the Prometheus scrape config and alert rules, the Grafana dashboard
and its provisioning (config/prometheus, config/grafana).

promtool checks the files and unit-tests the alerts, every metric they query must be one
gateway.metrics defines (a renamed metric fails here), and a real Prometheus started from the
shipped config scrapes a gateway, evaluates the shipped rules and answers the dashboard's queries.
promtool and prometheus come from Debian's `prometheus` package (scripts/test.sh installs it).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway import metrics
from tests.ops.test_deploy_files import COMPOSE, image_ports

ROOT = Path(__file__).resolve().parents[2]
PROM_CONFIG = ROOT / "config" / "prometheus" / "prometheus.yml"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
GRAFANA = ROOT / "config" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "gateway.json"
DATASOURCE = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDER = GRAFANA / "provisioning" / "dashboards" / "gateway.yml"
JOB = "gateway"
METRIC_NAME = re.compile(r"\bgateway_[a-z_]+")
# Grafana's variables, given values Prometheus accepts.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m",
                     "$instance": ".*"}


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"`{name}` is not installed: it comes with Debian's `prometheus` package "
                    "(apt-get install prometheus; scripts/test.sh installs it)", pytrace=False)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{output}"
    return output


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, rows' nested panels included."""
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_exprs() -> list[str]:
    return [target["expr"] for panel in _panels(_dashboard()["panels"])
            for target in panel.get("targets", []) if target.get("expr")]


def _provisioned_uid() -> str:
    (source,) = _yaml(DATASOURCE)["datasources"]
    return source["uid"]


def _gateway_job(config: dict[str, Any]) -> dict[str, Any]:
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert len(jobs) == 1, f"prometheus.yml needs exactly one scrape job named {JOB!r}"
    return jobs[0]


def _exported_names() -> set[str]:
    """The sample names gateway.metrics exposes, from its Counter/Gauge/Histogram objects."""
    names: set[str] = set()
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        for family in obj.describe():
            if family.type == "counter":
                names.add(family.name + "_total")
            elif family.type == "histogram":
                names |= {family.name + suffix for suffix in ("", "_bucket", "_sum", "_count")}
            else:
                names.add(family.name)
    assert "gateway_requests_total" in names and "gateway_overhead_seconds_bucket" in names
    return names


# --- promtool ------------------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    output = _run(_tool("promtool"), "check", "rules", str(ALERTS))
    assert f"SUCCESS: {len(_alert_rules())} rules found" in output


def test_promtool_check_config(tmp_path: Path) -> None:
    """The shipped prometheus.yml as it is, with the alert file where its rule_files points."""
    text = PROM_CONFIG.read_text()
    rule_files = _yaml(PROM_CONFIG)["rule_files"]
    assert [Path(entry).name for entry in rule_files] == [ALERTS.name]
    for entry in rule_files:
        target = tmp_path / Path(entry).name
        if Path(entry).is_absolute():
            text = text.replace(entry, str(target))
        shutil.copy(ALERTS, target)
    config = tmp_path / "prometheus.yml"
    config.write_text(text)
    output = _run(_tool("promtool"), "check", "config", str(config))
    assert "SUCCESS: 1 rule files found" in output


def test_scrape_config_targets_the_gateway() -> None:
    config = _yaml(PROM_CONFIG)
    job = _gateway_job(config)
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for static in job["static_configs"] for t in static["targets"]]
    assert targets and all(re.fullmatch(r"[\w.-]+:\d+", t) for t in targets), targets
    # The compose stack's gateways, on the metrics port the container image sets (the API port
    # serves no /metrics there).
    _, metrics_port = image_ports()
    gateways = sorted(name for name in _yaml(COMPOSE)["services"] if name.startswith("gateway-"))
    assert sorted(targets) == [f"{name}:{metrics_port}" for name in gateways], targets
    assert config["global"]["scrape_interval"] == config["global"]["evaluation_interval"] == "15s"


def _series(metric: str, values: str, **labels: str) -> dict[str, str]:
    all_labels = {"job": JOB, "instance": "gateway-1:9100", **labels}
    selector = ", ".join(f'{k}="{v}"' for k, v in all_labels.items())
    return {"series": f"{metric}{{{selector}}}", "values": values}


def _fires(at: str, alert: str, *expected: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": alert, "exp_alerts": [{"exp_labels": e} for e in expected]}


def test_alerts_fire_on_promtool_test_data(tmp_path: Path) -> None:
    """promtool's rule unit tests: each alert fires on the failure it describes (labels only:
    the annotations are stripped from a copy so their wording can change freely)."""
    rules = _yaml(ALERTS)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    one = {"job": JOB, "instance": "gateway-1:9100"}
    model = "gpt-image-1"
    healthy = [  # 1 request/s, quota store never called yet (its gauge reads 0), no errors
        _series("up", "1x30"),
        _series("gateway_requests_total", "0+60x30", endpoint="images/edits", model=model,
                status="200"),
        _series("gateway_quota_store_up", "0x30"),
        _series("gateway_quota_store_errors_total", "0x30"),
    ]
    failing = [
        _series("up", "1 1 0x30"),
        _series("gateway_requests_total", "0+60x30", endpoint="images/edits", model=model,
                status="200"),
        _series("gateway_upstream_errors_total", "0+12x30", model=model, kind="timeout"),  # 20%
        _series("gateway_rejections_total", "0+30x30", reason="auth"),  # 50%
        _series("gateway_quota_store_up", "1 1 0x30"),
        _series("gateway_quota_store_errors_total", "0 0 0+6x30"),
        # Every request between 120 s and 180 s: p95 177 s.
        _series("gateway_request_duration_seconds_bucket", "0x30", endpoint="images/edits",
                model=model, le="120"),
        *[_series("gateway_request_duration_seconds_bucket", "0+60x30", endpoint="images/edits",
                  model=model, le=le) for le in ("180", "+Inf")],
        # Every request's overhead between 5 ms and 25 ms: p99 24.8 ms.
        _series("gateway_overhead_seconds_bucket", "0x30", endpoint="images/edits", le="0.005"),
        *[_series("gateway_overhead_seconds_bucket", "0+60x30", endpoint="images/edits", le=le)
          for le in ("0.025", "+Inf")],
    ]
    silent = [_fires("20m", alert["alert"]) for alert in rules["groups"][0]["rules"]]
    tests = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": healthy, "alert_rule_test": silent},
            {"interval": "1m", "input_series": failing, "alert_rule_test": [
                _fires("20m", "GatewayTargetDown", {"severity": "critical", **one}),
                _fires("20m", "GatewayUpstreamErrorRateHigh", {"severity": "warning", "model": model}),
                _fires("20m", "GatewayRejectionSpike", {"severity": "warning", "reason": "auth"}),
                _fires("20m", "GatewayQuotaStoreDown", {"severity": "critical", **one}),
                _fires("20m", "GatewayQuotaStoreErrors", {"severity": "warning", **one}),
                _fires("20m", "GatewayLatencyP95High",
                       {"severity": "warning", "endpoint": "images/edits", "model": model}),
                _fires("20m", "GatewayOverheadP99High",
                       {"severity": "warning", "endpoint": "images/edits", "instance": one["instance"]}),
            ]},
        ],
    }
    (tmp_path / "tests.yml").write_text(yaml.safe_dump(tests))
    _run(_tool("promtool"), "test", "rules", str(tmp_path / "tests.yml"))


def test_alert_rules_are_complete() -> None:
    rules = _alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule.get("for"), rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
    exprs = {rule["alert"]: rule["expr"] for rule in rules}
    joined = "\n".join(exprs.values())
    for needed in ("gateway_upstream_errors_total", "gateway_request_duration_seconds_bucket",
                   "gateway_quota_store_up", "gateway_quota_store_errors_total",
                   "gateway_rejections_total", "gateway_overhead_seconds_bucket", "up{"):
        assert needed in joined, f"no alert uses {needed}"


# --- metric names --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_queried_metric_exists(source: str) -> None:
    exprs = [rule["expr"] for rule in _alert_rules()] if source == "alerts" else _dashboard_exprs()
    queried = {name for expr in exprs for name in METRIC_NAME.findall(expr)}
    assert len(queried) >= 5
    unknown = queried - _exported_names()
    assert not unknown, f"{source} queries metrics gateway/metrics.py does not define: {sorted(unknown)}"


# --- Grafana -------------------------------------------------------------------------------------

PANELS = [  # keywords one panel title must all contain (lower case)
    ("traffic", "status"), ("traffic", "model"), ("request latency",), ("upstream latency",),
    ("overhead",), ("tokens", "key", "model"), ("images", "key", "model"),
    ("upstream errors", "kind"), ("rejections", "reason"), ("in-flight",), ("quota store",),
]


def test_dashboard_has_the_panels() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = list(_panels(dashboard["panels"]))
    titles = [panel["title"].lower() for panel in panels]
    for keywords in PANELS:
        assert any(all(k in title for k in keywords) for title in titles), (keywords, titles)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
    for panel in panels:  # the percentile panels show p50, p95 and p99
        if "latency" in panel["title"].lower() or "overhead" in panel["title"].lower():
            quantiles = {re.search(r"histogram_quantile\((0\.\d+)", t["expr"]).group(1)  # type: ignore[union-attr]
                         for t in panel["targets"]}
            assert quantiles == {"0.5", "0.95", "0.99"}, panel["title"]


def test_dashboard_uses_the_provisioned_datasource() -> None:
    uid = _provisioned_uid()
    assert "${DS_" not in DASHBOARD.read_text()
    dashboard = _dashboard()
    for panel in _panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == uid, panel["title"]
    for variable in dashboard.get("templating", {}).get("list", []):
        if "datasource" in variable:
            assert variable["datasource"]["uid"] == uid, variable["name"]


def test_grafana_provisioning() -> None:
    (source,) = _yaml(DATASOURCE)["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    (provider,) = _yaml(DASHBOARD_PROVIDER)["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


# --- a real Prometheus ---------------------------------------------------------------------------


@contextmanager
def _exporter(request: pytest.FixtureRequest) -> Iterator[str]:
    """A real gateway (conftest's start_gateway) serving /metrics on its own port, as the
    container does, after one edit through the fake upstream."""
    from tests.support.images import png

    port = _free_port()
    gw = request.getfixturevalue("start_gateway")(metrics_port=port)
    assert httpx.get(f"{gw.url}/metrics", timeout=10).status_code == 404, "/metrics on the API port"
    httpx.post(f"{gw.url}/v1/images/edits", headers={"authorization": "Bearer sk-client"},
               data={"model": "gpt-image-1", "prompt": "Add a hat"},
               files=[("image", ("cat.png", png(), "image/png"))], timeout=30)
    yield f"127.0.0.1:{port}"


@contextmanager
def _prometheus(binary: str, config: Path, tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "prometheus.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([binary, f"--config.file={config}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"prometheus exited:\n{log_path.read_text()}"
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"prometheus not ready:\n{log_path.read_text()}"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _api(url: str, path: str, **params: str) -> Any:
    answer = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=5).json()
    assert answer["status"] == "success", answer
    return answer["data"]


def _poll(what: str, check: Callable[[], Any], deadline: float) -> Any:
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_prometheus_scrapes_the_gateway_and_loads_the_rules(request: pytest.FixtureRequest,
                                                            tmp_path: Path) -> None:
    binary = _tool("prometheus")
    config = _yaml(PROM_CONFIG)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    job = _gateway_job(config)
    for key in ("scrape_interval", "scrape_timeout"):
        job.pop(key, None)
    with _exporter(request) as target:
        job["static_configs"] = [{"targets": [target]}]
        config["scrape_configs"] = [job]
        config_path = tmp_path / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        with _prometheus(binary, config_path, tmp_path) as url:
            deadline = time.monotonic() + 20
            series = _poll("gateway_requests_total", lambda: _api(
                url, "query", query=f'gateway_requests_total{{job="{JOB}"}}')["result"], deadline)
            assert all(s["metric"]["instance"] == target for s in series)
            (up,) = _api(url, "query", query=f'up{{job="{JOB}"}}')["result"]
            assert up["value"][1] == "1"

            # Every shipped rule is loaded and has been evaluated without error.
            def evaluated() -> list[dict[str, Any]]:
                rules = [r for g in _api(url, "rules")["groups"] for r in g["rules"]]
                return rules if rules and all(r["health"] != "unknown" for r in rules) else []

            rules = _poll("the rules' first evaluation", evaluated, deadline)
            assert sorted(r["name"] for r in rules) == sorted(r["alert"] for r in _alert_rules())
            assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError"))
                                                              for r in rules]

            # Every dashboard query is valid PromQL to this Prometheus.
            for expr in _dashboard_exprs():
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                _api(url, "query", query=expr)
