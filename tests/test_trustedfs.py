"""trustedfs: a privileged remediator opens config, policies, journal and audit log by a walk from `/`
that checks, on the descriptors it then uses, that no other user could have changed what it reads.

Trees are built in tmp_path (/tmp/pytest-of-root/..., root-owned 0700 under the sticky /tmp); uid
65534 stands for "a local user". Root is needed to chown.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from remediator.audit import AuditLog
from remediator.cli import main
from remediator.config import load_config
from remediator.errors import RemediatorError
from remediator.journal import Journal, read_records
from remediator.policy import PolicyErrors, load_policies
from remediator.trustedfs import MAX_LINKS, Trust, TrustedDirectory, UntrustedPath, open_file, read_all, read_bytes

pytestmark = pytest.mark.root

STRICT = Trust(enforce=True)
USER = 65534
POLICY = '[[policy]]\nname = "{name}"\ndescription = "d"\nmatch.comm = "gzip"\ntrigger.always = true\n[[policy.actions]]\nnice = 10\n'


def directory(path: Path, mode: int = 0o755, uid: int = 0) -> Path:
    path.mkdir()
    os.chmod(path, mode)
    os.chown(path, uid, uid)
    return path


def file(path: Path, text: str = "x = 1\n", mode: int = 0o644, uid: int = 0) -> Path:
    path.write_text(text)
    os.chmod(path, mode)
    os.chown(path, uid, uid)
    return path


def test_a_root_owned_tree_is_read_and_the_process_trust_follows_the_euid(tmp_path):
    etc = directory(tmp_path / "etc")
    assert read_bytes(file(etc / "a.toml", "a = 1\n"), STRICT) == b"a = 1\n"
    assert Trust.for_this_process() == Trust(enforce=True, owners=frozenset({0}))


def test_a_link_in_a_directory_a_user_owns_is_refused_whatever_it_points_to(tmp_path):
    # The user may swap this link at any moment (e.g. between a check and a read): the directory
    # holding it is judged, not just the file it points to now.
    etc = directory(tmp_path / "etc")
    target = file(etc / "remediator.toml")
    home = directory(tmp_path / "home", uid=USER)
    (home / "link.toml").symlink_to(target)
    with pytest.raises(UntrustedPath, match=rf"refusing {home}/link.toml: {home} is owned by uid 65534, not root"):
        read_bytes(home / "link.toml", STRICT)


def test_a_trusted_link_into_a_directory_a_user_owns_is_refused(tmp_path):
    home = directory(tmp_path / "home", uid=USER)
    file(home / "policy.toml")
    etc = directory(tmp_path / "etc")
    (etc / "policy.toml").symlink_to(home / "policy.toml")
    with pytest.raises(UntrustedPath, match=rf"{home} is owned by uid 65534"):
        read_bytes(etc / "policy.toml", STRICT)


def test_a_directory_another_uid_owns_on_the_way_is_refused(tmp_path):
    shared = directory(tmp_path / "shared", uid=USER)
    etc = directory(shared / "etc")
    path = file(etc / "remediator.toml")
    with pytest.raises(UntrustedPath, match=rf"refusing {path}: {shared} is owned by uid 65534, not root"):
        read_bytes(path, STRICT)
    assert read_bytes(path, Trust.relaxed()) == b"x = 1\n"  # unprivileged: nothing to steer


def test_group_writable_holding_directory_is_refused_higher_up_it_is_allowed(tmp_path):
    upper = directory(tmp_path / "log", mode=0o775)  # as Ubuntu's /var/log (root:syslog 0775)
    holder = directory(upper / "remediator", mode=0o775)
    path = file(holder / "remediator.toml")
    with pytest.raises(UntrustedPath, match=rf"{holder} is group- or world-writable \(mode 0775\)"):
        read_bytes(path, STRICT)
    os.chmod(holder, 0o755)
    assert read_bytes(path, STRICT) == b"x = 1\n"
    os.chmod(path, 0o620)
    with pytest.raises(UntrustedPath, match=r"it is group- or world-writable \(mode 0620\)"):
        read_bytes(path, STRICT)


def test_a_link_in_a_trusted_directory_to_a_trusted_file_is_followed(tmp_path):
    etc = directory(tmp_path / "etc")
    file(etc / "real.toml", "real = 1\n")
    (etc / "remediator.toml").symlink_to("real.toml")  # relative
    (etc / "abs.toml").symlink_to(etc / "sub" / ".." / "remediator.toml")  # absolute, via a real ".."
    directory(etc / "sub")
    assert read_bytes(etc / "remediator.toml", STRICT) == b"real = 1\n"
    assert read_bytes(etc / "abs.toml", STRICT) == b"real = 1\n"


def test_in_a_sticky_shared_directory_only_what_root_owns_is_crossed(tmp_path):
    shared = directory(tmp_path / "tmp", mode=0o1777)  # like /tmp
    etc = directory(tmp_path / "etc")
    target = file(etc / "remediator.toml")
    os.symlink(target, shared / "root-link")
    assert read_bytes(shared / "root-link", STRICT) == b"x = 1\n"
    os.symlink(target, shared / "user-link")
    os.chown(shared / "user-link", USER, USER, follow_symlinks=False)
    with pytest.raises(UntrustedPath, match=rf"{shared}/user-link: it is owned by uid 65534"):
        read_bytes(shared / "user-link", STRICT)
    # A file right in it: never (another user could have created it before root did).
    with pytest.raises(UntrustedPath, match=rf"{shared} is group- or world-writable \(mode 1777\)"):
        read_bytes(file(shared / "plain.toml"), STRICT)


def test_a_link_loop_is_an_error_not_a_hang(tmp_path):
    etc = directory(tmp_path / "etc")
    (etc / "a").symlink_to("b")
    (etc / "b").symlink_to("a")
    with pytest.raises(OSError, match=f"more than {MAX_LINKS} symlinks") as caught:
        read_bytes(etc / "a", STRICT)
    assert caught.value.errno == errno.ELOOP and caught.value.filename == str(etc / "a")


def test_the_descriptor_checked_is_the_one_read(tmp_path):
    etc = directory(tmp_path / "etc")
    path = file(etc / "remediator.toml", "checked = 1\n")
    fd = open_file(path, STRICT)
    try:
        # Whatever replaces the name after the check is never read.
        forged = file(etc / "forged.toml", "forged = 1\n", uid=USER, mode=0o666)
        os.rename(forged, path)
        assert read_all(fd) == b"checked = 1\n"
    finally:
        os.close(fd)
    with pytest.raises(UntrustedPath, match="owned by uid 65534"):
        read_bytes(path, STRICT)


def test_the_daemon_config_loader_refuses_and_explains(tmp_path):
    etc = directory(tmp_path / "etc", uid=USER)
    path = file(etc / "remediator.toml", '[protect]\ncomm = ["nginx"]\n[daemon]\npolicies = ["."]\n')
    with pytest.raises(UntrustedPath) as caught:
        load_config(path, STRICT)
    message = str(caught.value)
    assert message.startswith(f"refusing {path}: {etc} is owned by uid 65534, not root (chown root:root {etc} && chmod go-w {etc})")
    assert "\n" not in message


def test_policy_directories_are_listed_and_read_through_their_descriptor(tmp_path):
    policies = directory(tmp_path / "policies")
    file(policies / "a.toml", POLICY.format(name="a"))
    home = directory(tmp_path / "home", uid=USER)
    file(home / "b.toml", POLICY.format(name="b"), uid=USER)
    (policies / "b.toml").symlink_to(home / "b.toml")
    (policies / "again.toml").symlink_to("a.toml")  # the same file twice is read once
    with pytest.raises(PolicyErrors) as caught:
        load_policies([policies], trust=STRICT)
    [problem] = caught.value.diagnostics
    assert problem.code == "untrusted"
    assert str(problem).startswith(f"{policies}/b.toml: error: refusing to read it: {home} is owned by uid 65534")
    (policies / "b.toml").unlink()
    assert [p.name for p in load_policies([policies], trust=STRICT).policies] == ["a"]


def test_policy_check_as_root_reports_an_untrusted_file_located(tmp_path, capsys):
    policies = directory(tmp_path / "policies", mode=0o777)
    file(policies / "a.toml", POLICY.format(name="a"))
    assert main(["policy", "check", str(policies / "a.toml")]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{policies}/a.toml: error: refusing to read it: {policies} is world-writable (mode 0777)")


@pytest.fixture
def user_checkout():
    """A directory a non-root user owns, somewhere that user can reach (tmp_path is root's 0700)."""
    path = Path(tempfile.mkdtemp(prefix="remediator-user-"))
    os.chmod(path, 0o775)  # group-writable, as a umask 002 leaves it
    os.chown(path, USER, USER)
    yield path
    shutil.rmtree(path)


def test_a_user_checks_their_own_checkout_without_root(user_checkout):
    file(user_checkout / "a.toml", POLICY.format(name="a"), mode=0o664, uid=USER)
    (user_checkout / "b.toml").symlink_to("a.toml")
    command = [sys.executable, "-m", "remediator", "policy", "check", "--format", "json", str(user_checkout)]
    result = subprocess.run(command, capture_output=True, text=True, user=USER, group=USER, extra_groups=[], cwd="/", timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["errors"] == 0
    # The same files as root: refused, since the user could change them under the daemon.
    assert main(["policy", "check", str(user_checkout)]) == 1


def test_the_journal_is_refused_in_an_untrusted_directory_and_as_a_link(tmp_path):
    state = directory(tmp_path / "state", mode=0o777)
    with pytest.raises(UntrustedPath, match=rf"{state} is world-writable"):
        Journal(state / "journal.jsonl", trust=STRICT)
    os.chmod(state, 0o755)
    os.chown(state, USER, USER)
    with pytest.raises(UntrustedPath, match=rf"{state} is owned by uid 65534"):
        Journal(state / "journal.jsonl", trust=STRICT)
    with pytest.raises(UntrustedPath, match=rf"{state} is owned by uid 65534"):
        read_records(state / "journal.jsonl", trust=STRICT)
    assert list(state.iterdir()) == []  # nothing was created there
    os.chown(state, 0, 0)
    os.symlink(tmp_path / "elsewhere", state / "journal.jsonl")
    with pytest.raises(UntrustedPath, match="it is a symlink; it must be a plain file"):
        Journal(state / "journal.jsonl", trust=STRICT)
    assert not (tmp_path / "elsewhere").exists()


def test_the_journal_creates_its_private_directories(tmp_path):
    path = tmp_path / "var" / "lib" / "remediator" / "journal.jsonl"
    with Journal(path, trust=STRICT):
        pass
    for created in (path.parent, path.parent.parent, path.parent.parent.parent):
        assert oct(created.stat().st_mode & 0o7777) == oct(0o700)
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)


def test_the_audit_log_is_refused_in_an_untrusted_directory(tmp_path):
    logs = directory(tmp_path / "log", uid=USER)
    with pytest.raises(RemediatorError, match=rf"{logs} is owned by uid 65534"):
        AuditLog(logs / "remediator" / "audit.jsonl", trust=STRICT)
    assert list(logs.iterdir()) == []
    os.chown(logs, 0, 0)
    audit = AuditLog(logs / "remediator" / "audit.jsonl", trust=STRICT)
    audit.close()
    assert oct((logs / "remediator").stat().st_mode & 0o777) == oct(0o750)
    os.chown(logs / "remediator" / "audit.jsonl", USER, USER)
    with pytest.raises(RemediatorError, match="audit.jsonl: it is owned by uid 65534"):
        AuditLog(logs / "remediator" / "audit.jsonl", trust=STRICT)


def test_a_trusted_directory_opens_its_entries_without_following_links(tmp_path):
    etc = directory(tmp_path / "etc")
    os.symlink("/etc/passwd", etc / "audit.jsonl")
    with TrustedDirectory(etc, STRICT) as held:
        with pytest.raises(UntrustedPath, match="it is a symlink"):
            held.open("audit.jsonl", os.O_WRONLY | os.O_APPEND)
        assert held.kind("audit.jsonl") == "link"


def test_the_engine_state_is_read_only_from_a_file_no_other_user_can_write(tmp_path):
    """The state file holds caps and cooldowns (what not to do again): one a local user could write
    would let them reset those, and a FIFO in its place would hang the reader. Read as the journal is."""
    from remediator.statefile import load_state, save_state, state_path_for

    home = directory(tmp_path / "var")
    path = state_path_for(home / "journal.jsonl")
    assert load_state(path, "boot", STRICT) == (None, "none saved")
    save_state(path, {"format": 1}, "boot")
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_state(path, "boot", STRICT) == ({"format": 1}, "")
    os.chmod(path, 0o622)
    saved, why = load_state(path, "boot", STRICT)
    assert saved is None and "it is group- or world-writable (mode 0622)" in why and why.endswith(": ignored"), why
    os.chmod(path, 0o600)
    os.chown(path, USER, USER)
    saved, why = load_state(path, "boot", STRICT)
    assert saved is None and "owned by uid 65534" in why, why
    path.unlink()
    os.mkfifo(path, 0o600)
    saved, why = load_state(path, "boot", STRICT)  # returns: does not wait for a writer
    assert saved is None and "not a regular file" in why, why


def test_the_engine_state_is_written_through_the_journal_directory_descriptor(tmp_path):
    """Saved through the journal's checked directory, held open: a rename of its path afterwards
    (only root could) does not send the write elsewhere, and the temporary file is never opened
    through a link planted at its name."""
    from remediator.statefile import save_state, state_path_for

    home = directory(tmp_path / "var")
    path = state_path_for(home / "journal.jsonl")
    with TrustedDirectory(home, STRICT) as held:
        moved = tmp_path / "moved"
        home.rename(moved)
        home.mkdir()
        save_state(path, {"format": 1}, "boot", held)
        assert not path.exists()
        assert json.loads((moved / path.name).read_text()) == {"boot_id": "boot", "engine": {"format": 1}}
        elsewhere = file(tmp_path / "elsewhere", "kept\n")
        os.symlink(elsewhere, moved / f".{path.name}.{os.getpid()}.tmp")
        with pytest.raises(UntrustedPath, match="it is a symlink"):
            save_state(path, {"format": 2}, "boot", held)
        assert elsewhere.read_text() == "kept\n"
        assert json.loads((moved / path.name).read_text())["engine"] == {"format": 1}
