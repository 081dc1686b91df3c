"""The JSON Schema and the parser accept the same keys, and agree on values.

Both come from the one description in remediator/schema.py; these tests check the result, not
the derivation: documents the parser accepts must validate against the schema, documents the
schema rejects must be rejected by the parser, and a document holding every key is accepted by
both. The key reference in docs/policy-format.md must be the generated one.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.policy_docs import config_document, mutate_structure, policy_document, walk_paths, write_toml
from helpers.policy_jsonschema import errors as schema_errors
from remediator.cli import main
from remediator.policy import check_sources
from remediator.schema import json_schema, reference_markdown

ROOT = Path(__file__).resolve().parent.parent
ONLINE = frozenset(range(64))
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))

# One document that uses every key of the policy format.
FULL_POLICY = {
    "policy": [
        {
            "name": "full",
            "description": "every key",
            "priority": 5,
            "match": {
                "comm": ["gzip"],
                "exe": ["/usr/bin/gzip"],
                "cmdline": "-9",
                "cgroup": ["/system.slice/logrotate.service"],
                "unit": ["logrotate.service"],
                "user": ["root"],
                "ancestor": ["logrotate"],
                "descendants": True,
            },
            "trigger": {
                "always": False,
                "tail": {"percentile": 99.0, "above": "5x baseline", "at_least": "1ms", "at_most": "2ms", "windows": 3, "of": 5, "within": "50ms", "waits": 2},
                "offender": {"cpu": 0.5, "cpu_kind": "peak", "blame_share": 0.2, "require": "all"},
            },
            "actions": [
                {"nice": 10, "settle": "3s"},
                {"sched": "idle", "settle": "3s"},
                {"cpu_weight": 10, "settle": "3s"},
                {"cpu_idle": True, "settle": "3s"},
                {"cpu_max": "20ms/100ms", "settle": "3s"},
                {"affinity": "unprotected", "settle": "5s"},
                {"cpuset": {"cpus": "1", "cgroup": "maintenance"}, "settle": "10s"},
            ],
            "limits": {"cooldown": "60s", "max_actions_per_hour": 6, "revert_after_quiet": "never", "min_cpus": 1},
        }
    ]
}

FULL_CONFIG = {
    "protect": {"pids": [1234], "comm": ["nginx"], "cgroup": ["/system.slice/api.service"], "unit": ["api"], "users": ["root", 33], "request_cpus": "0"},
    "daemon": {
        "mode": "live",
        "source": "auto",
        "tick": "250ms",
        "policies": ["."],
        "journal": "/var/lib/remediator/journal.jsonl",
        "audit_log": "/var/log/remediator/audit.jsonl",
        "on_start": "keep",
        "revert_on_exit": False,
    },
    "limits": {"max_changes_per_minute": 10},
    "recording": {"path": "/var/lib/remediator/recording.jsonl", "max_bytes": 268435456},
    "metrics": {"listen": "127.0.0.1:9447", "textfile": "/var/lib/prometheus/node-exporter/remediator.prom", "offender_labels": 20},
}


def schema_key_paths(schema: dict, path: tuple = ()) -> set[tuple]:
    """Key paths the schema names, with '*' for array elements."""
    found = set()
    node = schema
    if node.get("type") == "array" and "items" in node:
        return schema_key_paths(node["items"], path + ("*",))
    for key, sub in node.get("properties", {}).items():
        found.add(path + (key,))
        found |= schema_key_paths(sub, path + (key,))
    for alternative in node.get("anyOf", []):
        if alternative.get("type") == "array" and alternative.get("items", {}).get("properties"):
            found |= schema_key_paths(alternative["items"], path + ("*",))
    return found


def document_key_paths(document) -> set[tuple]:
    return {
        tuple("*" if isinstance(part, int) else part for part in path)
        for path in walk_paths(document)
        if isinstance(path[-1], str)
    }


def parser_errors(document: dict, path: str, tmp_path: Path) -> list[str]:
    text = write_toml(document, __import__("random").Random(0))
    return [str(d) for d in check_sources([(str(tmp_path / path), text)], ONLINE) if d.severity == "error"]


@pytest.mark.parametrize(
    "kind, document, file_name",
    [("policy", FULL_POLICY, "p.toml"), ("config", FULL_CONFIG, "remediator.toml")],
)
def test_every_key_is_in_the_schema_and_accepted_by_the_parser(kind, document, file_name, tmp_path):
    schema = json_schema(kind)
    assert document_key_paths(document) == schema_key_paths(schema)
    assert schema_errors(schema, document) == []
    assert parser_errors(document, file_name, tmp_path) == []


@pytest.mark.parametrize(
    "kind, document, file_name",
    [("policy", FULL_POLICY, "p.toml"), ("config", FULL_CONFIG, "remediator.toml")],
)
def test_a_key_outside_the_schema_is_rejected_by_both(kind, document, file_name, tmp_path):
    schema = json_schema(kind)
    tables = [()] + [path for path in walk_paths(document) if isinstance(_get(document, path), dict)]
    assert len(tables) >= 4
    for table in tables:
        changed = copy.deepcopy(document)
        _get(changed, table)["bogus_key"] = 1
        assert schema_errors(schema, changed), table
        found = parser_errors(changed, file_name, tmp_path)
        assert len(found) == 1 and "bogus_key: unknown key" in found[0], (table, found)


def _get(document, path):
    for part in path:
        document = document[part]
    return document


def test_documents_the_parser_accepts_validate_against_the_schema(tmp_path_factory):
    directory = tmp_path_factory.mktemp("schema")
    (directory / "policies").mkdir()
    seen = []

    @settings(max_examples=400, **SETTINGS)
    @given(rng=st.randoms(use_true_random=True), kind=st.sampled_from(["policy", "config"]))
    def run(rng, kind):
        document = policy_document(rng) if kind == "policy" else config_document(rng)
        name = "p.toml" if kind == "policy" else "remediator.toml"
        assert parser_errors(document, name, directory) == []
        assert schema_errors(json_schema(kind), document) == [], document
        seen.append(1)

    run()
    assert len(seen) == 400


def test_documents_the_schema_rejects_are_rejected_by_the_parser(tmp_path_factory):
    directory = tmp_path_factory.mktemp("schema")
    (directory / "policies").mkdir()
    counts = {"schema rejected": 0, "seen": 0}

    @settings(max_examples=1000, **SETTINGS)
    @given(rng=st.randoms(use_true_random=True), kind=st.sampled_from(["policy", "config"]))
    def run(rng, kind):
        document = policy_document(rng) if kind == "policy" else config_document(rng)
        document = mutate_structure(document, rng)
        name = "p.toml" if kind == "policy" else "remediator.toml"
        counts["seen"] += 1
        if schema_errors(json_schema(kind), document):
            counts["schema rejected"] += 1
            assert parser_errors(document, name, directory), document

    run()
    assert counts["seen"] == 1000 and counts["schema rejected"] > 300


def test_schema_command_prints_the_schema(capsys):
    assert main(["policy", "schema"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema("policy")
    assert main(["policy", "schema", "--kind", "config"]) == 0
    assert json.loads(capsys.readouterr().out) == json_schema("config")
    assert main(["policy", "schema", "--format", "markdown"]) == 0
    assert capsys.readouterr().out == reference_markdown()


def test_the_docs_hold_the_generated_key_reference():
    docs = (ROOT / "docs" / "policy-format.md").read_text()
    assert reference_markdown() in docs, "regenerate with: remediator policy schema --format markdown"


def test_every_key_is_documented_in_the_reference():
    reference = reference_markdown()
    for path in schema_key_paths(json_schema("policy")) | schema_key_paths(json_schema("config")):
        assert f"| `{path[-1]}` |" in reference, path


def test_pre_commit_hook_runs_policy_check():
    yaml = pytest.importorskip("yaml")
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    assert [hook["id"] for hook in hooks] == ["remediator-policy-check"]
    hook = hooks[0]
    assert hook["entry"] == "remediator policy check"
    assert hook["language"] == "python"
    # The whole set is checked (cross-file duplicates and conflicts), on any TOML change.
    assert hook["pass_filenames"] is False
    assert re.search(hook["files"], "policies/log-shippers.toml")
    assert not re.search(hook["files"], "README.md")
