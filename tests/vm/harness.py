#!/usr/bin/python3
"""Guest VMs that look like the hosts remediator is for: systemd as PID 1, the unified cgroup v2
hierarchy, a distribution kernel with its own headers.

    sudo ./bootstrap vm test [GUEST...]          build (or reuse) each image, run tests/guest inside
    sudo ./bootstrap vm shell GUEST [-- CMD...]  boot GUEST with this checkout installed, run CMD
                                                 (or an interactive shell), exit with its status
    sudo ./bootstrap vm build [GUEST...]         build the images only
    sudo ./bootstrap vm list                     the guests and their cached images

An image is a root filesystem made by mmdebstrap from Debian's packages only, turned into an ext4
image by `mke2fs -d` (no loop device), with its kernel and initrd beside it for a direct kernel
boot. Images are cached under $REMEDIATOR_VM_CACHE (default /var/cache/remediator-vm), keyed by
everything that builds them; a missing one is built. Each boot writes to a throw-away qcow2
overlay, so the cached image never changes.

The checkout reaches the guest as a tar archive on a second disk (only files git knows, as they
are in the work tree). A oneshot unit in the image unpacks it at /opt/remediator, installs it as
the README's "Running as a service" block says (the unit copied into /etc/systemd/system but not
started), then runs the job and powers off; the job's status comes back on the serial console.

The guests run under TCG where /dev/kvm cannot boot a stock kernel (a paravirtual KVM): assert
behaviour there, never latency.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("REMEDIATOR_VM_CACHE", "/var/cache/remediator-vm"))
# Bump when the image recipe changes in a way the key below cannot see.
IMAGE_FORMAT = 1
EXIT_MARK = "@@remediator-vm-exit="
JOB_TIMEOUT_S = float(os.environ.get("REMEDIATOR_VM_TIMEOUT", "2400"))
SOFT_LOCKUP_REPORTS = 4  # about 100 s of one CPU stuck in the guest kernel

# What every guest holds: systemd as init, the distribution kernel and its matching headers, and
# everything `./bootstrap setup` would install (so that the guest needs no network: it has none).
# pytest comes from Debian too: the guest suite needs nothing else.
COMMON_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "procps", "kmod", "util-linux", "iproute2",
    "linux-image-amd64", "linux-headers-amd64", "initramfs-tools",
    "bpfcc-tools", "python3-bpfcc", "python3-venv", "python3-pip", "python3-setuptools", "python3-wheel",
    "python3-psutil", "python3-pyroute2", "python3-tomli", "python3-jeepney", "python3-prometheus-client",
    "python3-pytest",
)


@dataclass(frozen=True)
class Guest:
    name: str
    suite: str
    title: str

    def recipe(self) -> dict:
        return {
            "format": IMAGE_FORMAT,
            "suite": self.suite,
            "packages": sorted(COMMON_PACKAGES),
            "provision": PROVISION,
            "job_unit": JOB_UNIT,
            "job_runner": JOB_RUNNER,
        }

    def key(self) -> str:
        text = json.dumps(self.recipe(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def image_dir(self) -> Path:
        return CACHE / f"{self.name}-{self.key()}"


GUESTS = {
    guest.name: guest
    for guest in (
        Guest("debian12", "bookworm", "Debian 12 (bookworm)"),
        Guest("debian13", "trixie", "Debian 13 (trixie)"),
    )
}

# Run inside the new root filesystem (chroot) once, at build time.
PROVISION = r"""
set -eu
echo remediator-guest > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 remediator-guest\n' > /etc/hosts
# A fixed machine id: no first-boot wizard waiting on the console.
systemd-machine-id-setup >/dev/null 2>&1 || true
: > /etc/fstab
passwd -d root >/dev/null
# The job owns the serial console; nothing else may read it.
ln -sf /dev/null /etc/systemd/system/serial-getty@ttyS0.service
ln -sf /dev/null /etc/systemd/system/getty@tty1.service
for timer in apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer man-db.timer dpkg-db-backup.timer; do
    ln -sf /dev/null /etc/systemd/system/$timer
done
mkdir -p /etc/systemd/system/multi-user.target.wants
ln -sf /etc/systemd/system/remediator-vm-job.service /etc/systemd/system/multi-user.target.wants/remediator-vm-job.service
chmod 0755 /usr/local/sbin/remediator-vm-job
"""

JOB_UNIT = """\
[Unit]
Description=remediator guest job (unpack the checkout, install it as the README says, run the job)
After=basic.target systemd-user-sessions.service
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/remediator-vm-job
StandardInput=tty-force
StandardOutput=inherit
StandardError=inherit
TTYPath=/dev/ttyS0
TTYReset=yes
TimeoutStartSec=infinity
"""

# The job disk holds a tar archive: job.sh, install.sh and checkout/.
JOB_RUNNER = r"""#!/bin/bash
stty -F /dev/ttyS0 -onlcr cols 160 rows 50 2>/dev/null || true
export TERM=dumb HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /run/remediator-vm && tar -xf /dev/vdb -C /run/remediator-vm
cd /run/remediator-vm
status=0
bash -e install.sh || status=$?
if [ "$status" -eq 0 ]; then
    bash job.sh
    status=$?
else
    echo "remediator-vm: installing the checkout failed (status $status)"
fi
echo "@@remediator-vm-exit=$status@@"
sync
systemctl poweroff -ff
"""


# -- host ---------------------------------------------------------------------------------------

def say(message: str) -> None:
    print(f"vm: {message}", flush=True)


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    say("$ " + " ".join(shlex.quote(str(a)) for a in argv))
    return subprocess.run(argv, check=True, **kwargs)


def debian_mirror() -> str:
    """The Debian mirror this host's apt already uses (the guests use the same one)."""
    if os.environ.get("REMEDIATOR_VM_MIRROR"):
        return os.environ["REMEDIATOR_VM_MIRROR"]
    texts = []
    for path in [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]:
        if path.suffix in (".list", ".sources") or path.name == "sources.list":
            try:
                texts.append(path.read_text())
            except OSError:
                pass
    for text in texts:
        for uri in re.findall(r"^\s*URIs:\s*(\S+)", text, re.M) + re.findall(r"^\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M):
            if uri.rstrip("/").endswith("/debian"):
                return uri
    raise SystemExit("vm: error: no Debian mirror in this host's apt sources; set REMEDIATOR_VM_MIRROR")


class CacheLock:
    """One guest at a time on this machine (2 CPUs), and one builder per image."""

    def __enter__(self):
        CACHE.mkdir(parents=True, exist_ok=True)
        self._file = open(CACHE / ".lock", "w")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"another guest is running (lock {CACHE / '.lock'}): waiting")
            fcntl.flock(self._file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self._file.close()


def build_image(guest: Guest) -> Path:
    target = guest.image_dir()
    if (target / "image.json").exists():
        return target
    started = time.monotonic()
    say(f"{guest.name}: building the image for {guest.title} (key {guest.key()}) in {target}")
    for stale in CACHE.glob(f"{guest.name}-*"):
        if stale != target:
            say(f"{guest.name}: removing the stale image {stale}")
            shutil.rmtree(stale, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=f"{guest.name}-build-", dir=CACHE))
    try:
        root = work / "root"
        root.mkdir()
        job_unit = "/etc/systemd/system/remediator-vm-job.service"
        mirror = debian_mirror()
        say(f"$ mmdebstrap --variant=minbase --include=<{len(COMMON_PACKAGES)} packages> {guest.suite} {root} {mirror} "
            "(hooks: the job unit and runner, then PROVISION in tests/vm/harness.py)")
        subprocess.run([
            "mmdebstrap", "--variant=minbase", "--components=main", "--mode=root",
            "--include=" + ",".join(COMMON_PACKAGES),
            "--customize-hook=" + f"cat > \"$1{job_unit}\" <<'EOF'\n{JOB_UNIT}EOF",
            "--customize-hook=" + f"cat > \"$1/usr/local/sbin/remediator-vm-job\" <<'EOF'\n{JOB_RUNNER}EOF",
            "--customize-hook=" + f"chroot \"$1\" /bin/bash -c {shlex.quote(PROVISION)}",
            guest.suite, str(root), mirror,
        ], check=True)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise SystemExit(f"vm: error: {guest.name}: no kernel in {root}/boot")
        release = kernels[-1].name.removeprefix("vmlinuz-")
        shutil.copy2(kernels[-1], work / "vmlinuz")
        shutil.copy2(root / "boot" / f"initrd.img-{release}", work / "initrd.img")
        used = int(subprocess.run(["du", "-sm", str(root)], capture_output=True, text=True, check=True).stdout.split()[0])
        size_mb = used + 1536  # room for the venv, logs and the tests' files
        run(["mke2fs", "-q", "-t", "ext4", "-L", "root", "-d", str(root), str(work / "rootfs.img"), f"{size_mb}M"])
        versions = subprocess.run(
            ["chroot", str(root), "dpkg-query", "-W", "-f", "${Package} ${Version}\n", "systemd", "python3-bpfcc", "python3", f"linux-headers-{release}"],
            capture_output=True, text=True,
        ).stdout
        shutil.rmtree(root)
        info = {
            "guest": guest.name, "title": guest.title, "suite": guest.suite, "kernel": release, "key": guest.key(),
            "packages": dict(line.split(" ", 1) for line in versions.splitlines() if " " in line),
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": round(time.monotonic() - started),
        }
        (work / "image.json").write_text(json.dumps(info, indent=2) + "\n")
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"{guest.name}: image built in {time.monotonic() - started:.0f} s (kernel {info['kernel']})")
    return target


def checkout_files() -> list[str]:
    """What git knows of the checkout, as it is in the work tree (uncommitted edits included)."""
    out = subprocess.run(["git", "-C", str(CHECKOUT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True).stdout
    return [name for name in out.decode().split("\0") if name and (CHECKOUT / name).exists()]


def readme_install_lines() -> list[str]:
    """The README's "Running as a service" commands, as a user types them, minus the clone (the
    job disk brings the checkout) and the start (the tests start the unit themselves)."""
    text = (CHECKOUT / "README.md").read_text()
    section = text.split("### Running as a service", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    lines = []
    for line in block.splitlines():
        if not line.strip() or "git clone" in line or "enable --now" in line:
            continue
        lines.append(re.sub(r"\bsudo\s+", "", line))
    if not any("bootstrap setup" in line for line in lines):
        raise SystemExit("vm: error: README.md 'Running as a service' has no './bootstrap setup' line")
    return lines


def write_job_disk(path: Path, job: str) -> None:
    install = "\n".join([
        "echo '== the checkout at /opt/remediator, installed as README.md \"Running as a service\" says'",
        "mkdir -p /opt/remediator && cp -a /run/remediator-vm/checkout/. /opt/remediator/",
        *(f"echo '# {line}'\n{line}" for line in readme_install_lines()),
        "cd /opt/remediator",
    ]) + "\n"
    with tempfile.TemporaryDirectory() as staging:
        staging_path = Path(staging)
        (staging_path / "job.sh").write_text(job)
        (staging_path / "install.sh").write_text(install)
        subprocess.run(["tar", "-cf", str(staging_path / "job.tar"), "-C", str(staging_path), "job.sh", "install.sh"], check=True)
        files = "\0".join(checkout_files()).encode()
        subprocess.run(["tar", "-rf", str(staging_path / "job.tar"), "--transform", "s,^,checkout/,", "--null", "-T", "-",
                        "-C", str(CHECKOUT)], input=files, check=True)
        shutil.move(str(staging_path / "job.tar"), path)


def kvm_works() -> bool:
    """Whether /dev/kvm can boot a stock kernel here (a paravirtual KVM cannot)."""
    if os.environ.get("REMEDIATOR_VM_ACCEL") in ("tcg", "kvm"):
        return os.environ["REMEDIATOR_VM_ACCEL"] == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    return not Path("/sys/module/kvm_pvm").exists()


def qemu_argv(image: Path, overlay: Path, job_disk: Path, interactive: bool) -> list[str]:
    # TCG on one host thread: multi-threaded TCG does not keep the vCPUs coherent while the kernel
    # patches its own text, which it does when remediator attaches or detaches the scheduler
    # tracepoints (static keys in __schedule): the Debian 13 guest oopsed on a stray int3 in
    # __schedule (Oops: int3, RIP __schedule+0x343) and the Debian 12 one spun in soft lockups.
    accel = ["-accel", "kvm", "-cpu", "host"] if kvm_works() else ["-accel", "tcg,thread=single", "-cpu", "max"]
    console = ["-serial", "mon:stdio"] if interactive else ["-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console"]
    return [
        "qemu-system-x86_64", *accel, "-smp", "2", "-m", "2048", "-nographic", "-no-reboot", "-nodefaults",
        "-kernel", str(image / "vmlinuz"), "-initrd", str(image / "initrd.img"),
        "-append", "root=/dev/vda rw console=ttyS0 quiet loglevel=5 softlockup_all_cpu_backtrace=1 systemd.show_status=false panic=-1 "
        + os.environ.get("REMEDIATOR_VM_KERNEL_ARGS", ""),  # e.g. loglevel=7 to see a kernel warning's stack
        "-drive", f"file={overlay},format=qcow2,if=virtio,cache=unsafe",
        "-drive", f"file={job_disk},format=raw,if=virtio,readonly=on",
        *console,
    ]


def boot(guest: Guest, job: str, *, interactive: bool = False, log_path: Path | None = None) -> tuple[int, str]:
    """Boot guest, run job; (status, console text). status is the job's, or 124/125 when the guest
    did not finish (timed out / died)."""
    image = build_image(guest)
    with tempfile.TemporaryDirectory(prefix=f"remediator-{guest.name}-", dir="/var/tmp") as scratch:
        scratch_path = Path(scratch)
        overlay = scratch_path / "overlay.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(image / "rootfs.img"), str(overlay)], check=True)
        job_disk = scratch_path / "job.tar"
        write_job_disk(job_disk, job)
        argv = qemu_argv(image, overlay, job_disk, interactive)
        say(f"{guest.name}: booting ({' '.join(argv[1:5])}, kernel {json.loads((image / 'image.json').read_text())['kernel']})")
        started = time.monotonic()
        if interactive:
            status = subprocess.run(argv).returncode
            return (0 if status == 0 else 125), ""
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        lines: list[str] = []
        job_status: int | None = None
        log = log_path.open("w") if log_path else None
        try:
            deadline = started + JOB_TIMEOUT_S
            os.set_blocking(proc.stdout.fileno(), True)
            import selectors

            selector = selectors.DefaultSelector()
            selector.register(proc.stdout, selectors.EVENT_READ)
            pending = b""
            lockups = 0
            while True:
                if time.monotonic() > deadline:
                    say(f"{guest.name}: no result after {JOB_TIMEOUT_S:.0f} s: stopping the guest")
                    break
                if lockups >= SOFT_LOCKUP_REPORTS:
                    # A CPU stuck in the kernel for minutes does not come back: fail now, with the
                    # stacks the kernel printed above, rather than at the job timeout.
                    say(f"{guest.name}: the guest kernel reported {lockups} soft lockups: stopping the guest")
                    break
                if not selector.select(timeout=5):
                    if proc.poll() is not None:
                        break
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                pending += chunk
                *complete, pending = pending.split(b"\n")
                for raw in complete:
                    line = raw.decode(errors="replace").replace("\r", "").rstrip()
                    lines.append(line)
                    if log:
                        log.write(line + "\n")
                    if "BUG: soft lockup" in line:
                        lockups += 1
                    mark = re.search(re.escape(EXIT_MARK) + r"(\d+)@@", line)
                    if mark:
                        job_status = int(mark.group(1))
                        continue
                    print(f"[{guest.name}] {line}", flush=True)
        finally:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=30 if job_status is not None else 0.1)
                except subprocess.TimeoutExpired:
                    pass
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if log:
                log.close()
        elapsed = time.monotonic() - started
        say(f"{guest.name}: guest ran {elapsed:.0f} s, job status {job_status if job_status is not None else 'none (did not finish)'}")
        if job_status is None:
            return 124, "\n".join(lines)
        return job_status, "\n".join(lines)


GUEST_SUITE_JOB = """\
cd /opt/remediator
export REMEDIATOR_REQUIRE_PRIVILEGED=1 REMEDIATOR_GUEST={name}
# A test stuck past 4 minutes prints every thread's stack (it is not stopped): where it hangs, on the console.
.venv/bin/python -m pytest -p no:cacheprovider -o faulthandler_timeout=240 -vv -rfEsP --tb=short tests/guest {pytest_args}
"""


def pytest_counts(text: str) -> tuple[int, int]:
    """(passed, failed incl. errors) from pytest's closing line."""
    summary = ""
    for line in text.splitlines():
        if re.match(r"^=+ .*(passed|failed|error|skipped|no tests ran).* =+$", line):
            summary = line
    count = lambda word: sum(int(n) for n in re.findall(rf"(\d+) {word}", summary))  # noqa: E731
    return count("passed"), count("failed") + count("errors?") + count("skipped")


def command_test(args) -> int:
    names = args.guests or list(GUESTS)
    results = []
    with CacheLock():
        for name in names:
            guest = GUESTS[name]
            started = time.monotonic()
            cold = not (guest.image_dir() / "image.json").exists()
            job = GUEST_SUITE_JOB.format(name=name, pytest_args=" ".join(shlex.quote(a) for a in args.pytest_args))
            log_path = Path(tempfile.gettempdir()) / f"remediator-vm-{name}.log"
            status, text = boot(guest, job, log_path=log_path)
            passed, failed = pytest_counts(text)
            if status != 0 and failed == 0:
                failed = 1  # the guest or the suite did not finish: a failure, never silence
            results.append((name, passed, failed, time.monotonic() - started, cold))
            say(f"{name}: console log in {log_path}")
    print()
    for name, passed, failed, elapsed, cold in results:
        image = json.loads((GUESTS[name].image_dir() / "image.json").read_text()) if (GUESTS[name].image_dir() / "image.json").exists() else {}
        print(f"{name} ({image.get('kernel', '?')}, {'cold' if cold else 'warm'}, {elapsed:.0f} s): {passed} passed, {failed} failed", flush=True)
    total_passed = sum(passed for _, passed, _, _, _ in results)
    total_failed = sum(failed for _, _, failed, _, _ in results)
    print(f"guests: {total_passed} passed, {total_failed} failed", flush=True)
    return 1 if total_failed else 0


def command_shell(args) -> int:
    guest = GUESTS[args.guest]
    command = args.command
    if command and command[0] == "--":
        command = command[1:]
    if command:
        job = "cd /opt/remediator\n" + " ".join(shlex.quote(part) for part in command) + "\n"
    else:
        job = "cd /opt/remediator\necho 'remediator guest: a root shell; exit (or Ctrl-D) powers off'\nexec bash -l\n"
    with CacheLock():
        status, _ = boot(guest, job, interactive=not command)
    return status


def command_build(args) -> int:
    with CacheLock():
        for name in args.guests or list(GUESTS):
            build_image(GUESTS[name])
    return 0


def command_list(_args) -> int:
    for guest in GUESTS.values():
        directory = guest.image_dir()
        state = "cached" if (directory / "image.json").exists() else "not built"
        print(f"{guest.name}: {guest.title}, suite {guest.suite}, image {directory} ({state})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bootstrap vm", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    test = sub.add_parser("test", help="run tests/guest in each guest")
    test.add_argument("guests", nargs="*", metavar="GUEST")
    test.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[], help="passed to pytest in the guest")
    test.set_defaults(handler=command_test)
    shell = sub.add_parser("shell", help="boot a guest, run a command (or a shell) in /opt/remediator")
    shell.add_argument("guest", choices=list(GUESTS))
    shell.add_argument("command", nargs=argparse.REMAINDER)
    shell.set_defaults(handler=command_shell)
    build = sub.add_parser("build", help="build the images")
    build.add_argument("guests", nargs="*", metavar="GUEST")
    build.set_defaults(handler=command_build)
    listing = sub.add_parser("list", help="the guests and their images")
    listing.set_defaults(handler=command_list)
    args = parser.parse_args(argv)
    for name in getattr(args, "guests", None) or []:
        if name not in GUESTS:
            parser.error(f"unknown guest {name!r} (guests: {', '.join(GUESTS)})")
    if os.geteuid() != 0:
        parser.error("building images and booting guests needs root: sudo ./bootstrap vm ...")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
