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


def test_journal_path_comes_from_the_config_relative_to_the_file(tmp_path, capsys):
    (tmp_path / "policies").mkdir()
    config = tmp_path / "remediator.toml"
    config.write_text('[protect]\nunit = ["api"]\n\n[daemon]\njournal = "state/journal.jsonl"\n')
    assert main(["revert", "--all", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"nothing to revert: no journal at {tmp_path / 'state' / 'journal.jsonl'}\n"
    assert captured.err == ""


def test_a_config_with_problems_elsewhere_still_names_the_journal(tmp_path, capsys):
    config = tmp_path / "remediator.toml"  # its default policies directory does not exist
    journal = tmp_path / "journal.jsonl"
    config.write_text(f'[protect]\nunit = ["api"]\n\n[daemon]\njournal = "{journal}"\n')
    assert main(["revert", "--all", "--config", str(config)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"nothing to revert: no journal at {journal}\n"
    assert "does not load (1 problem, first: " in captured.err and "daemon.policies" in captured.err
    assert f"using its [daemon] journal ({journal}) anyway" in captured.err


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
    # A located error prints as the compiler-style line itself, not behind a second "error:".
    assert err.startswith(f"{config}:2:") and ": error: " in err
    assert len(err.strip().splitlines()) == 1


def test_a_wrong_journal_type_in_the_config_is_an_error(tmp_path, capsys):
    config = tmp_path / "remediator.toml"
    config.write_text("[daemon]\njournal = 3\n")
    assert main(["revert", "--all", "--config", str(config)]) == 1
    assert "[daemon] journal must be a file path, not 3" in capsys.readouterr().err


@pytest.mark.root
def test_root_refuses_a_journal_others_can_write(tmp_path, capsys):
    journal = tmp_path / "journal.jsonl"
    journal.write_text("")
    journal.chmod(0o666)
    assert main(["revert", "--all", "--journal", str(journal)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"remediator: error: refusing {journal}: it is group- or world-writable (mode 0666)")
