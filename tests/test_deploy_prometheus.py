"""deploy/: the alert rules (checked and unit-tested by promtool), the Grafana dashboard, and the
metrics they read, which must be ones the daemon exports, in a format promtool accepts."""

from __future__ import annotations

import json
import re
from pathlib import Path

from helpers.promtool import promtool
from remediator.metrics import Metrics
from remediator.policy import load_policies
from remediator.sample import read_samples
from remediator.tick import Observers, engine_settings, replay_samples

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "remediator.rules.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "remediator.rules.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "remediator.json"
RECORDING = ROOT / "tests" / "fixtures" / "recordings" / "fluent-bit-bursts.jsonl"
METRIC_NAME = re.compile(r"\bremediator_[a-z0-9_]+")
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}


def replayed_metrics() -> Metrics:
    """The daemon's metrics module (with its own-process collector, as the daemon runs it) fed a
    recording through the tick, as `remediator replay --metrics` does."""
    metrics = Metrics(own_process=True)
    policies = load_policies([ROOT / "policies"])
    samples = list(read_samples(RECORDING))
    online = frozenset(range(samples[0].ncpus))
    settings = engine_settings(policies, 0.25, frozenset({0}), online, 10, self_pid=-1)
    replay_samples(samples, policies, settings, Observers([metrics]))
    return metrics


def exported_names(metrics: Metrics) -> set[str]:
    """Every series name the registry can export, whether or not a label set has a value yet."""
    names = set()
    for family in metrics.registry.collect():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
        names |= {sample.name for sample in family.samples}
    return names


def rule_expressions() -> list[str]:
    return re.findall(r"^\s+expr: (?:\|\n)?((?:.*\n)+?)(?=\s+(?:for|labels):)", RULES.read_text(), re.M)


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    found = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    found += [annotation["expr"] for annotation in dashboard["annotations"]["list"]]
    found += [variable["query"]["query"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
    return found


def test_promtool_checks_the_rules():
    out = promtool("check", "rules", str(RULES))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 9 rules found" in out.stdout


def test_promtool_unit_tests_the_rules():
    out = promtool("test", "rules", str(RULES_TEST))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_promtool_accepts_the_daemons_metrics():
    text = replayed_metrics().text().decode()
    # the recording acted and judged: the labelled series are there, not just the HELP lines
    assert 'remediator_actions_total{mode="replay",policy="log-shippers",result="would-apply",step="cpu_idle"} 1.0' in text
    assert 'remediator_verifications_total{mode="replay",policy="log-shippers",step="cpu_idle",verdict="inconclusive"} 1.0' in text
    out = promtool("check", "metrics", stdin=text)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr


def test_the_rules_and_the_dashboard_read_only_metrics_the_daemon_exports():
    exported = exported_names(replayed_metrics())
    assert {"remediator_actions_total", "remediator_process_cpu_seconds_total",
            "remediator_protected_run_queue_wait_seconds_bucket"} <= exported
    expressions = rule_expressions() + dashboard_expressions()
    assert len(rule_expressions()) == 9  # every alert's expression was found
    for expr in expressions:
        assert "remediator_" in expr or "up{" in expr, expr
        unknown = set(METRIC_NAME.findall(expr)) - exported
        assert not unknown, f"{expr}: not exported by the daemon: {sorted(unknown)}"


def test_the_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query (Grafana's variables substituted) as a recording rule."""
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for index, expr in enumerate(dashboard_expressions()):
        if expr.startswith("label_values("):
            continue  # Grafana's own function, not PromQL
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        lines += [f"      - record: dashboard:query_{index}", f"        expr: {json.dumps(expr)}"]
    path = tmp_path / "dashboard.rules.yml"
    path.write_text("\n".join(lines) + "\n")
    out = promtool("check", "rules", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
