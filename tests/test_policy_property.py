"""Property tests: generated and mutated documents never raise, and every rejection is located.

More than 10,000 documents in all (each test asserts how many it ran): valid policy documents
written in varied TOML styles, the same with one key deleted, renamed, added or given a wrong
value, text-level damage (truncation, duplicated/deleted/swapped lines, inserted characters),
random bytes, and config documents valid and mutated.
"""

from __future__ import annotations

import tomli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers.policy_docs import config_document, mutate_structure, mutate_text, policy_document, walk_paths, write_toml
from remediator.policy import check_sources, compile_policies
from remediator.schema import FILE_LEVEL_CODES, Diagnostic
from remediator.tomlpos import TomlSyntaxError, parse

ONLINE = frozenset(range(64))
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))
# A seeded Random drawn from hypothesis: it drives the document generator, the writer and the mutations.
RANDOMS = st.randoms(use_true_random=True)


def assert_located(diagnostics: list[Diagnostic], text: str | bytes, path: str) -> None:
    line_count = (text.count(b"\n") if isinstance(text, bytes) else text.count("\n")) + 1
    for diagnostic in diagnostics:
        assert diagnostic.severity in ("error", "warning")
        assert diagnostic.location.path == path
        assert str(diagnostic) == f"{diagnostic.location}: {diagnostic.severity}: {diagnostic.message}"
        if diagnostic.code in FILE_LEVEL_CODES:
            continue
        assert 1 <= diagnostic.location.line <= line_count, diagnostic
        assert diagnostic.location.column >= 1, diagnostic


def assert_unknown_keys_point_at_keys(diagnostics: list[Diagnostic], text: str) -> None:
    lines = text.split("\n")
    for diagnostic in diagnostics:
        if diagnostic.code != "unknown-key":
            continue
        name = diagnostic.key.rsplit(".", 1)[-1].strip('"')
        at = lines[diagnostic.location.line - 1][diagnostic.location.column - 1 :]
        assert at.startswith(name) or at[:1] in "\"'", (diagnostic, at)


def assert_scanner_complete(text: str | bytes) -> None:
    """Whatever tomli accepts, the position scanner walks to the end."""
    try:
        document = parse(text, "x.toml")
    except TomlSyntaxError:
        return
    assert document.complete, text


def check(text: str | bytes, path: str = "p.toml") -> list[Diagnostic]:
    diagnostics = check_sources([(path, text)], online_cpus=ONLINE)
    assert_located(diagnostics, text, path)
    assert_scanner_complete(text)
    if isinstance(text, str):
        assert_unknown_keys_point_at_keys(diagnostics, text)
    return diagnostics


def _run(test, seen: list, examples: int) -> None:
    """Run a hypothesis test and prove it saw `examples` documents."""
    test()
    assert len(seen) >= examples, f"only {len(seen)} documents"


def test_valid_policy_documents_compile_and_every_key_is_located():
    seen = []

    @settings(max_examples=2500, **SETTINGS)
    @given(data=st.data())
    def run(data):
        rng = data.draw(RANDOMS)
        document = policy_document(rng)
        text = write_toml(document, rng)
        seen.append(1)
        assert tomli.loads(text) == document
        diagnostics = check(text)
        assert [d for d in diagnostics if d.severity == "error"] == [], text
        parsed = parse(text, "p.toml")
        compiled, _ = compile_policies(parsed, ONLINE)
        assert [item.policy.name for item in compiled] == [p["name"] for p in document["policy"]]
        for item, source in zip(compiled, document["policy"]):
            assert len(item.policy.steps) == len(source["actions"])
        # Every key path has a position, and the key is written there.
        lines = text.split("\n")
        for path in walk_paths(document):
            span = parsed.spans[path]
            at = lines[span.key_line - 1][span.key_column - 1 :]
            if isinstance(path[-1], str):
                assert at.startswith(path[-1]) or at[:1] in "\"'", (path, at)

    _run(run, seen, 2500)


def test_mutated_policy_structures_never_raise():
    seen = []

    @settings(max_examples=3000, **SETTINGS)
    @given(data=st.data())
    def run(data):
        rng = data.draw(RANDOMS)
        original = policy_document(rng)
        document = mutate_structure(original, rng)
        seen.append(1)
        diagnostics = check(write_toml(document, rng))
        if any(d.severity == "error" for d in diagnostics):
            rejected.append(1)

    rejected: list = []
    _run(run, seen, 3000)
    # The mutations must really damage documents (some, like deleting a default, do not).
    assert len(rejected) > len(seen) // 3


def test_deleting_a_required_key_is_always_reported():
    seen = []

    @settings(max_examples=500, **SETTINGS)
    @given(data=st.data())
    def run(data):
        rng = data.draw(RANDOMS)
        document = policy_document(rng)
        index = data.draw(st.integers(0, len(document["policy"]) - 1))
        key = data.draw(st.sampled_from(["name", "description", "match", "trigger", "actions"]))
        del document["policy"][index][key]
        text = write_toml(document, rng)
        seen.append(1)
        diagnostics = check(text)
        assert any(d.code == "missing-key" and f"'{key}'" in d.message for d in diagnostics), diagnostics

    _run(run, seen, 500)


def test_damaged_texts_never_raise():
    seen = []

    @settings(max_examples=2500, **SETTINGS)
    @given(data=st.data())
    def run(data):
        rng = data.draw(RANDOMS)
        text = write_toml(policy_document(rng), rng)
        for _ in range(rng.randint(1, 3)):
            text = mutate_text(text, rng)
        seen.append(1)
        if any(d.severity == "error" for d in check(text)):
            rejected.append(1)

    rejected: list = []
    _run(run, seen, 2500)
    assert len(rejected) > len(seen) // 3


def test_random_bytes_never_raise():
    toml_bytes = st.lists(
        st.sampled_from([b"[", b"]", b"[[", b"]]", b"=", b"\"", b"'", b"\"\"\"", b"{", b"}", b",", b"\n", b"#", b" ",
                         b"policy", b"name", b".", b"1", b"true", b"\xff", b"\xc3", b"\x00", b"\\u", b"actions", b"nice"]),
        max_size=40,
    ).map(b"".join)

    seen = []

    @settings(max_examples=1500, **SETTINGS)
    @given(raw=st.one_of(st.binary(max_size=200), toml_bytes))
    def run(raw):
        seen.append(1)
        check(raw)

    _run(run, seen, 1500)


def test_config_documents_valid_and_mutated(tmp_path_factory):
    directory = tmp_path_factory.mktemp("config")
    (directory / "policies").mkdir()  # the default and the generated policy paths exist
    path = str(directory / "remediator.toml")

    seen = []

    @settings(max_examples=1000, **SETTINGS)
    @given(data=st.data())
    def run(data):
        rng = data.draw(RANDOMS)
        document = config_document(rng)
        mutate = rng.randint(0, 2)
        if mutate == 1:
            document = mutate_structure(document, rng)
        text = write_toml(document, rng)
        if mutate == 2:
            text = mutate_text(text, rng)
        seen.append(1)
        diagnostics = check(text, path)
        if mutate == 0:
            assert [str(d) for d in diagnostics if d.severity == "error"] == [], text

    _run(run, seen, 1000)
