"""`remediator revert`: arguments, the journal path from --config, help with examples."""

from __future__ import annotations

import pytest

from remediator.cli import main


def test_help_ends_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["revert", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out.rstrip()
    examples = text[text.index("examples:") :]
    assert examples.splitlines()[-2].strip().startswith("sudo remediator revert --all --config")
    assert "remediator revert --pid 2621" in examples


def test_all_or_pid_is_required(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["revert"])
    assert exit_info.value.code == 2
    assert "one of the arguments --all --pid is required" in capsys.readouterr().err


def test_a_missing_journal_means_nothing_to_revert(tmp_path, capsys):
    assert main(["revert", "--all", "--journal", str(tmp_path / "none.jsonl")]) == 0
    assert capsys.readouterr().out == f"nothing to revert: no journal at {tmp_path / 'none.jsonl'}\n"
    assert not (tmp_path / "none.jsonl").exists()  # looking created nothing


def test_journal_path_comes_from_the_config_daemon_table(tmp_path, capsys):
    config = tmp_path / "remediator.toml"
    journal = tmp_path / "state" / "journal.jsonl"
    config.write_text(f'[daemon]\njournal = "{journal}"\n\n[protect]\nunits = ["api"]\n')
    assert main(["revert", "--all", "--config", str(config)]) == 0
    assert capsys.readouterr().out == f"nothing to revert: no journal at {journal}\n"


def test_journal_flag_overrides_the_config(tmp_path, capsys):
    config = tmp_path / "remediator.toml"
    config.write_text('[daemon]\njournal = "/nonexistent/from-config.jsonl"\n')
    explicit = tmp_path / "explicit.jsonl"
    assert main(["revert", "--all", "--config", str(config), "--journal", str(explicit)]) == 0
    assert str(explicit) in capsys.readouterr().out


def test_an_empty_journal_has_nothing_to_revert_for_a_pid(tmp_path, capsys):
    journal = tmp_path / "journal.jsonl"
    journal.write_text("")
    assert main(["revert", "--pid", "4242", "--journal", str(journal)]) == 0
    assert capsys.readouterr().out == f"nothing to revert for pid 4242: no active change in {journal}\n"


def test_a_broken_config_is_one_located_error(tmp_path, capsys):
    config = tmp_path / "remediator.toml"
    config.write_text('[daemon]\njournal = "unterminated\n')
    assert main(["revert", "--all", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"remediator: error: {config}:2:")
    assert len(err.strip().splitlines()) == 1


def test_a_wrong_journal_type_in_the_config_is_an_error(tmp_path, capsys):
    config = tmp_path / "remediator.toml"
    config.write_text("[daemon]\njournal = 3\n")
    assert main(["revert", "--all", "--config", str(config)]) == 1
    assert "[daemon] journal must be a file path, not 3" in capsys.readouterr().err
