"""The metrics module and its config: bounded labels, the textfile, the loopback server, located
errors; and the real daemon's /metrics, scraped over HTTP and checked by promtool."""

from __future__ import annotations

import dataclasses
import http.client
import os
import select
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers.daemon import metrics_url, scrape, wait_until, write_config
from helpers.promtool import promtool
from helpers.workloads import hog_argv, victim_argv
from remediator.audit import AuditWriter
from remediator.config import load_config
from remediator.daemon import DecisionLog
from remediator.engine import EngineState
from remediator.metrics import (CONNECTION_DEADLINE_S, MAX_REQUEST_BYTES, OTHER, PENDING_COMMS_MAX, STALLED_S, Metrics, MetricsServer,
                                TextfileWriter)
from remediator.model import PolicySet
from remediator.procfs import ProcessInfo
from remediator.sample import ProtectedWaits, Sample
from remediator.schema import PolicyErrors
from remediator.tick import Observers, TickObserver, TickReport, engine_settings, replay_samples

SHIPPED_POLICIES = Path(__file__).resolve().parent.parent / "policies"


def values(metrics: Metrics, name: str) -> dict[tuple, float]:
    found = {}
    for family in text_string_to_metric_families(metrics.text().decode()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def blamed_sample(index: int, blame: list[tuple[int, str, int]]) -> Sample:
    """A tick in which each (pid, comm, ns) ran while the protected thread waited."""
    return Sample(
        ts=1000.0 + index, start_ns=index * 10**9, end_ns=(index + 1) * 10**9, source="bpf", window_ns=10**8, ncpus=2,
        protected=ProtectedWaits(threads=1, pids=(1,), waits=10, wakeups=8, preemptions=2, wait_ns=sum(ns for _, _, ns in blame),
                                 max_ns=None, histogram=((70, 10),)),
        usage=(), blame=tuple((pid, ns) for pid, _, ns in blame), cpu_busy_ns=(0, 0),
        processes={pid: ProcessInfo(pid=pid, start_time=pid, comm=comm) for pid, comm, _ in blame},
    )


def test_offender_comms_are_bounded_and_no_blame_is_lost():
    metrics = Metrics(offender_labels=3)
    # 50 comms, each blamed 20 ms, then one tiny one: only 3 get a series of their own.
    samples = [blamed_sample(i, [(100 + i, f"worker-{i}", 20_000_000), (999, "blip", 1000)]) for i in range(50)]
    settings = engine_settings(PolicySet(()), 1.0, frozenset({0}), frozenset({0, 1}), 10, self_pid=-1)
    replay_samples(samples, PolicySet(()), settings, Observers([metrics]))
    blame = {dict(labels)["comm"]: value for labels, value in values(metrics, "remediator_offender_blame_seconds_total").items()}
    assert set(blame) == {"worker-0", "worker-1", "worker-2", OTHER}
    assert blame["worker-0"] == pytest.approx(0.02)
    assert sum(blame.values()) == pytest.approx(50 * 0.02 + 50 * 1e-6)
    by_policy = values(metrics, "remediator_policy_blame_seconds_total")
    assert by_policy == {(("policy", "none"),): pytest.approx(50 * 0.02 + 50 * 1e-6)}
    # the probe's slot 70 (1792..1920 ns) lands in le=2**11 ns, and every bucket above counts it too
    buckets = values(metrics, "remediator_protected_run_queue_wait_seconds_bucket")
    assert buckets[(("le", "1.024e-06"),)] == 0 and buckets[(("le", "2.048e-06"),)] == 500
    assert buckets[(("le", "4.096e-06"),)] == 500 and buckets[(("le", "+Inf"),)] == 500


def test_blame_on_a_shippers_child_counts_for_the_tree_policy():
    from pathlib import Path

    from remediator.policy import load_policies

    shipped = load_policies([Path(__file__).resolve().parent.parent / "policies"])
    vector = ProcessInfo(pid=400, start_time=40, comm="vector")
    xz = ProcessInfo(pid=401, start_time=41, comm="xz", ppid=400, ancestors=((400, "vector"),))
    sample = blamed_sample(0, [(401, "xz", 30_000_000), (500, "batch-job", 10_000_000)])
    sample = dataclasses.replace(sample, processes={**sample.processes, 400: vector, 401: xz})
    metrics = Metrics(offender_labels=3)
    settings = engine_settings(shipped, 1.0, frozenset({0}), frozenset({0, 1}), 10, self_pid=-1)
    replay_samples([sample], shipped, settings, Observers([metrics]))
    assert values(metrics, "remediator_policy_blame_seconds_total") == {
        (("policy", "log-shippers"),): pytest.approx(0.03), (("policy", "none"),): pytest.approx(0.01)}


def test_a_comm_that_only_flickers_gets_no_series_of_its_own():
    metrics = Metrics(offender_labels=5)
    samples = [blamed_sample(i, [(7, "flicker", 100_000)]) for i in range(10)]  # 1 ms in all: under the 10 ms bar
    replay_samples(samples, PolicySet(()), engine_settings(PolicySet(()), 1.0, frozenset({0}), frozenset({0, 1}), 10, -1),
                   Observers([metrics]))
    assert set(values(metrics, "remediator_offender_blame_seconds_total")) == {(("comm", OTHER),)}


def blame_by_comm(metrics: Metrics) -> dict[str, float]:
    series = values(metrics, "remediator_offender_blame_seconds_total")
    return {dict(labels)["comm"]: value for labels, value in series.items()}


def tell_ticks(metrics: Metrics, policies: PolicySet, blames: list[list[tuple[int, str, int]]]) -> None:
    """One tick per list of (pid, comm, ns), told to the observer as the tick does (no engine)."""
    settings = engine_settings(policies, 1.0, frozenset({0}), frozenset({0, 1}), 10, self_pid=-1)
    for index, blame in enumerate(blames):
        metrics.on_tick(TickReport(blamed_sample(index, blame), policies, settings, EngineState(), "live", ()))


def test_processes_no_policy_names_cannot_push_a_governed_offender_into_other():
    from remediator.policy import load_policies

    shipped = load_policies([SHIPPED_POLICIES])
    metrics = Metrics()  # 20 places
    squatters = [[(100 + i, f"squat-{i}", 10_000_000)] for i in range(20)]  # each just over the bar
    latecomers = [[(200 + i, f"late-{i}", 1_000_000_000)] for i in range(30)]
    tell_ticks(metrics, shipped, squatters + latecomers + [[(500, "fluent-bit", 1_000_000_000)]])
    blame = blame_by_comm(metrics)
    assert blame["fluent-bit"] == pytest.approx(1.0)  # the log-shippers policy governs it: a place of its own
    assert {f"squat-{i}" for i in range(20)} <= set(blame)
    assert not any(comm.startswith("late-") for comm in blame)
    assert blame[OTHER] == pytest.approx(30.0)
    assert len(blame) == 20 + 1 + 1


def test_governed_comms_have_places_of_their_own_and_all_places_stay_bounded():
    from remediator.policy import load_policies

    shipped = load_policies([SHIPPED_POLICIES])
    shippers = ["fluent-bit", "vector", "filebeat", "promtail", "otelcol"]  # all governed by log-shippers
    metrics = Metrics(offender_labels=3)
    ticks = [[(100 + i, f"worker-{i}", 20_000_000)] for i in range(50)]
    ticks += [[(500 + i, comm, 1_000_000_000)] for i, comm in enumerate(shippers)]
    tell_ticks(metrics, shipped, ticks)
    blame = blame_by_comm(metrics)
    assert set(blame) == {"worker-0", "worker-1", "worker-2", "fluent-bit", "vector", "filebeat", OTHER}
    assert sum(blame.values()) == pytest.approx(50 * 0.02 + 5 * 1.0)  # no blame lost, only counted as other


def test_a_flood_of_comms_under_the_bar_does_not_reset_a_governed_offenders_progress():
    from remediator.policy import load_policies

    shipped = load_policies([SHIPPED_POLICIES])
    metrics = Metrics()
    flood = [(1000 + i, f"blip-{i}", 1000) for i in range(PENDING_COMMS_MAX + 1000)]  # each far under the bar
    tell_ticks(metrics, shipped, [[(500, "fluent-bit", 6_000_000)], flood, [(500, "fluent-bit", 6_000_000)]])
    blame = blame_by_comm(metrics)
    assert blame["fluent-bit"] == pytest.approx(0.006)  # 12 ms in all: over the bar at the second tick
    assert set(blame) == {"fluent-bit", OTHER}


def test_a_reload_or_a_mode_change_shows_in_the_series_made_once_per_policy_set():
    from pathlib import Path

    from remediator.engine import EngineState
    from remediator.policy import load_policies
    from remediator.tick import TickReport

    shipped = load_policies([Path(__file__).resolve().parent.parent / "policies"])
    fewer = PolicySet(shipped.policies[:1])
    metrics = Metrics()
    settings = engine_settings(shipped, 1.0, frozenset({0}), frozenset({0, 1}), 10, self_pid=-1)

    def tick(index, policies, mode, source="bpf"):
        sample = dataclasses.replace(blamed_sample(index, [(7, "x", 1000)]), source=source)
        metrics.on_tick(TickReport(sample, policies, settings, EngineState(), mode, ()))

    def policy_labels(name):
        return {dict(labels)["policy"] for labels in values(metrics, name)}

    tick(0, shipped, "dry-run")
    names = {policy.name for policy in shipped.policies}
    assert policy_labels("remediator_active_remediations") == names
    assert len(policy_labels("remediator_policy_tail_threshold_seconds")) > 1
    tick(1, fewer, "dry-run")  # a reload dropped all but one: their series go
    assert policy_labels("remediator_active_remediations") == {fewer.policies[0].name}
    assert policy_labels("remediator_policy_tail_threshold_seconds") <= {fewer.policies[0].name}
    tick(2, fewer, "live", source="procfs")
    assert values(metrics, "remediator_mode")[(("mode", "live"),)] == 1
    assert values(metrics, "remediator_mode")[(("mode", "dry-run"),)] == 0
    assert values(metrics, "remediator_source")[(("source", "procfs"),)] == 1
    assert values(metrics, "remediator_degraded")[()] == 1
    tick(3, shipped, "live")
    assert policy_labels("remediator_active_remediations") == names
    assert values(metrics, "remediator_source")[(("source", "bpf"),)] == 1
    assert values(metrics, "remediator_degraded")[()] == 0


def _report(index: int, policies=PolicySet(())):
    from remediator.engine import EngineState
    from remediator.tick import TickReport

    settings = engine_settings(policies, 1.0, frozenset({0}), frozenset({0, 1}), 10, self_pid=-1)
    return TickReport(blamed_sample(index, [(100 + index % 3, f"w{index % 3}", 20_000_000)]), policies, settings,
                      EngineState(), "dry-run", (), duration_s=0.001)


def test_ticks_are_counted_in_at_the_next_read_and_the_loop_folds_them_when_nobody_reads():
    from remediator.metrics import FOLD_EVERY

    metrics = Metrics(offender_labels=3)
    ticks = 2 * FOLD_EVERY + 3
    for index in range(ticks):
        metrics.on_tick(_report(index))
    assert metrics.unfolded == 3  # kept: bounded without a scrape
    assert values(metrics, "remediator_ticks_total")[()] == ticks
    assert metrics.unfolded == 0
    assert values(metrics, "remediator_protected_waits_total")[()] == 10 * ticks
    assert values(metrics, "remediator_tick_duration_seconds_count")[()] == ticks
    blame = values(metrics, "remediator_offender_blame_seconds_total")
    assert sum(blame.values()) == pytest.approx(0.02 * ticks)
    assert values(metrics, "remediator_last_tick_timestamp_seconds")[()] == 1000.0 + ticks - 1


def test_a_filtered_scrape_counts_the_ticks_in_too():
    from prometheus_client import generate_latest

    metrics = Metrics()
    for index in range(5):
        metrics.on_tick(_report(index))
    text = generate_latest(metrics.registry.restricted_registry(["remediator_ticks_total"])).decode()
    assert "remediator_ticks_total 5.0" in text


def test_a_scrape_while_the_loop_ticks_loses_no_tick():
    import threading

    metrics = Metrics(offender_labels=3)
    stop = threading.Event()
    scrapes = []

    def scrape_all_the_time():
        while not stop.is_set():
            scrapes.append(metrics.text())

    scraper = threading.Thread(target=scrape_all_the_time)
    scraper.start()
    try:
        for index in range(600):
            metrics.on_tick(_report(index))
    finally:
        stop.set()
        scraper.join()
    assert len(scrapes) > 1
    assert values(metrics, "remediator_ticks_total")[()] == 600
    assert values(metrics, "remediator_protected_waits_total")[()] == 6000


@pytest.mark.parametrize("observer", [Metrics(), AuditWriter(lambda record: None), DecisionLog()])
def test_no_attribute_of_an_observer_shadows_one_of_its_methods(observer):
    # A bug seen before: an attribute named like a method (maintained) made calling it fail.
    for name in ("on_decision", "on_outcome", "on_tick"):
        assert callable(getattr(type(observer), name, None)) and name in TickObserver.__dict__
        assert name not in vars(observer)
    methods = {name for name in dir(type(observer)) if callable(getattr(type(observer), name))}
    assert not methods & set(vars(observer)), methods & set(vars(observer))


def test_the_textfile_is_replaced_whole_and_readable_by_node_exporter(tmp_path):
    metrics = Metrics()
    metrics.set_mode("dry-run")
    path = tmp_path / "remediator.prom"
    writer = TextfileWriter(metrics, path, every_s=5.0)
    assert writer.maybe_write(100.0) is True
    assert writer.maybe_write(102.0) is None  # not yet
    assert 'remediator_mode{mode="dry-run"} 1.0' in path.read_text()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["remediator.prom"]  # no temp file left
    assert writer.maybe_write(105.0) is True


def test_a_textfile_that_cannot_be_written_is_counted_not_raised(tmp_path):
    writer = TextfileWriter(Metrics(), tmp_path / "missing-directory" / "remediator.prom")
    assert writer.write() is False and writer.write() is False
    assert writer.failures == {"ENOENT": 2} and "missing-directory" in writer.last_failure


def test_the_server_serves_metrics_on_loopback():
    metrics = Metrics()
    metrics.set_mode("live")
    server = MetricsServer(metrics, "127.0.0.1", 0)
    try:
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        assert 'remediator_mode{mode="live"} 1.0' in scrape(server.url)
    finally:
        server.close()
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)


def test_the_server_serves_ipv6_loopback_when_the_host_has_it():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    server = MetricsServer(Metrics(), "::1", 0)
    try:
        assert server.url.startswith("http://[::1]:")
        assert "remediator_ticks_total" in scrape(server.url)
    finally:
        server.close()


def cut_off_after(sock: socket.socket, request: bytes, every_s: float, give_up_s: float) -> float | None:
    """Send `request` a byte every `every_s`; the seconds until the server closed the connection, or
    None if it was still open after `give_up_s`."""
    started = time.monotonic()
    for byte in request:
        try:
            sock.send(bytes([byte]))
            readable, _, _ = select.select([sock], [], [], every_s)
            if readable and not sock.recv(4096):
                return time.monotonic() - started
        except OSError:  # reset: closed with our bytes unread
            return time.monotonic() - started
        if time.monotonic() - started > give_up_s:
            return None
    return None


def test_a_client_trickling_its_request_is_cut_off_at_the_deadline_while_scrapes_go_through():
    server = MetricsServer(Metrics(), "127.0.0.1", 0)
    endless = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100
    cut_off = []
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as trickler:
            give_up_s = 3 * CONNECTION_DEADLINE_S
            thread = threading.Thread(target=lambda: cut_off.append(cut_off_after(trickler, endless, 1.0, give_up_s)))
            thread.start()
            try:
                time.sleep(1.5)  # the trickler is still on its request line
                started = time.monotonic()
                with urllib.request.urlopen(server.url, timeout=3) as response:
                    assert response.status == 200 and b"remediator_ticks_total" in response.read()
                assert time.monotonic() - started < 2.0
            finally:
                thread.join()
        assert cut_off[0] is not None, "the trickling client was never cut off"
        assert CONNECTION_DEADLINE_S - 1.0 <= cut_off[0] <= CONNECTION_DEADLINE_S + 2.0
    finally:
        server.close()


def closed_by_the_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_silent_connections_hold_no_place_and_no_thread_and_keep_no_scrape_out():
    """A local user's connections that never send a request are held by the accepting thread
    alone (a descriptor each, at most max_waiting, the first accepted closed for one more): every
    place stays free for scrapes, and no thread is started for them."""
    server = MetricsServer(Metrics(), "127.0.0.1", 0, deadline_s=30.0, max_connections=2, max_waiting=4)
    threads_before = threading.active_count()
    silent: list[socket.socket] = []
    try:
        for _ in range(50):  # one after another: all at once would only overflow the kernel's listen backlog
            silent.append(socket.create_connection(("127.0.0.1", server.port), timeout=1.0))
        assert wait_until(lambda: server.server.closed_waiting >= 46, 5.0, what="all but the newest 4 closed")
        assert threading.active_count() == threads_before
        assert all(closed_by_the_server(sock, 1.0) for sock in silent[:46]), "the first accepted gave way"
        assert not closed_by_the_server(silent[-1], 0.2)

        started = time.monotonic()
        assert "remediator_ticks_total" in scrape(server.url)
        assert time.monotonic() - started < 2.0
    finally:
        for sock in silent:
            sock.close()
        server.close()


def test_an_answer_its_client_does_not_read_gives_its_place_to_a_waiting_request():
    """A client that sends a request and never reads the answer holds its place only until a
    complete request needs it and STALLED_S has passed, not until its deadline."""
    server = MetricsServer(Metrics(), "127.0.0.1", 0, deadline_s=30.0, max_connections=1)
    metrics_app = server.server.get_app()

    def app(environ, start_response):
        if environ["PATH_INFO"] != "/big":
            return metrics_app(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"x" * (1 << 20) for _ in range(256))  # far more than the socket buffers hold

    server.server.set_app(app)
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # and never reads
            time.sleep(0.3)  # its answer has begun and filled the buffers
            started = time.monotonic()
            with urllib.request.urlopen(server.url, timeout=10) as response:
                assert response.status == 200 and b"remediator_ticks_total" in response.read()
            waited = time.monotonic() - started
        assert STALLED_S - 0.5 <= waited < STALLED_S + 2.0, waited
        assert server.server.cut_off_stalled == 1
    finally:
        server.close()


def _try_scrape(url: str) -> str:
    try:
        return scrape(url)
    except (OSError, http.client.HTTPException):
        return ""


def test_a_request_longer_than_the_budget_is_cut_off_before_it_is_served():
    server = MetricsServer(Metrics(), "127.0.0.1", 0)
    headers = b"".join(b"X-Big-%d: %s\r\n" % (i, b"a" * 1500) for i in range(60))  # 60 lines: under 100, each short
    assert len(headers) > MAX_REQUEST_BYTES
    answer = b""
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=3) as sock:
            try:
                sock.sendall(b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n")
                while chunk := sock.recv(65536):
                    answer += chunk
            except OSError:
                pass  # reset: closed with our bytes unread
        assert not answer.startswith(b"HTTP/1.0 200"), answer[:100]
        assert "remediator_ticks_total" in scrape(server.url)  # and the server serves on
    finally:
        server.close()


def config_with(tmp_path, metrics_table: str):
    path = write_config(tmp_path, [1], mode="dry-run", metrics=metrics_table)
    return path, path.read_text().splitlines().index("[metrics]") + 2  # the line of the table's first key


@pytest.mark.parametrize("listen, message", [
    ('"0.0.0.0:9447"', "0.0.0.0 is not a loopback address"),
    ('"192.168.1.5:9447"', "192.168.1.5 is not a loopback address"),
    ('"[::]:9447"', ":: is not a loopback address"),
    ('"example.com:9447"', "example.com is not an IP address"),
    ('"127.0.0.1"', "is not HOST:PORT"),
    ('"::1:9447"', "write an IPv6 address in brackets"),
    ('"127.0.0.1:70000"', "port 70000 is out of range"),
    ("9447", "expected a string"),
])
def test_listen_must_be_a_loopback_address_and_the_error_says_where(tmp_path, listen, message):
    path, line = config_with(tmp_path, f"listen = {listen}")
    with pytest.raises(PolicyErrors) as error:
        load_config(path)
    assert f"{path}:{line}:" in str(error.value) and "metrics.listen" in str(error.value) and message in str(error.value)


def test_metrics_config(tmp_path):
    path, _ = config_with(tmp_path, 'listen = "localhost:9447"\ntextfile = "node/remediator.prom"\noffender_labels = 5')
    metrics = load_config(path).metrics
    assert metrics.listen == ("127.0.0.1", 9447) and metrics.offender_labels == 5
    assert metrics.textfile == tmp_path / "node" / "remediator.prom"
    path, _ = config_with(tmp_path, 'listen = "[::1]:0"')
    assert load_config(path).metrics.listen == ("::1", 0) and load_config(path).metrics.offender_labels == 20
    assert load_config(write_config(tmp_path, [1], mode="dry-run")).metrics is None  # no table: no metrics
    path, line = config_with(tmp_path, 'textfile = "/tmp/remediator.txt"')
    with pytest.raises(PolicyErrors, match=rf"{path}:{line}:\d+: error: metrics.textfile: .* ending in .prom"):
        load_config(path)


@pytest.mark.bpf
def test_the_daemons_metrics_over_http_in_a_dry_run(spawn, daemon, tmp_path):
    """A real daemon, scraped as Prometheus would: dry-run marked, the would-be action counted, and
    the whole output accepted by promtool check metrics."""
    # one session: nice weighs between the two (another autogroup would make the engine skip the step)
    victim = spawn(victim_argv(0), own_session=False)
    spawn(hog_argv("fluent-bit", 2), own_session=False)
    textfile = tmp_path / "remediator.prom"
    run = daemon(write_config(tmp_path, [victim.pid], mode="dry-run",
                              metrics=f'listen = "127.0.0.1:0"\ntextfile = "{textfile}"'))
    url = wait_until(lambda: metrics_url(run.log()), 30.0, what="the metrics URL in the log")
    wait_until(lambda: any(line["decision"] == "act" for line in run.audit()), 10.0, what="a would-be change")
    time.sleep(0.5)  # the tick's observers run after the audit line
    text = scrape(url)
    assert 'remediator_mode{mode="dry-run"} 1.0' in text
    assert 'remediator_actions_total{mode="dry-run",policy="test-shipper",result="would-apply",step="nice 10"} 1.0' in text
    assert 'remediator_source{source="bpf"} 1.0' in text and "remediator_degraded 0.0" in text
    assert "remediator_process_resident_memory_bytes" in text and "remediator_tick_duration_seconds_count" in text
    waits = [line for line in text.splitlines() if line.startswith("remediator_protected_waits_total ")]
    assert waits and float(waits[0].split()[1]) > 0
    out = promtool("check", "metrics", stdin=text)
    assert out.returncode == 0 and out.stdout.strip() == "" and out.stderr.strip() == "", out.stdout + out.stderr
    assert run.stop() == 0
    assert "remediator_actions_total" in textfile.read_text()  # written at exit too
    assert os.stat(textfile).st_mode & 0o777 == 0o644


def test_requests_queued_for_a_place_are_bounded_and_the_newest_is_answered_first():
    """Complete requests waiting for a place count against the same bound as connections still
    sending theirs (the first accepted closed for one more), so a flood of them cannot run the
    daemon out of descriptors; and the newest is answered first, so a scrape does not wait behind
    the flood until its deadline."""
    server = MetricsServer(Metrics(), "127.0.0.1", 0, deadline_s=30.0, max_connections=1, max_waiting=4)
    metrics_app = server.server.get_app()

    def app(environ, start_response):
        if environ["PATH_INFO"] != "/big":
            return metrics_app(environ, start_response)
        start_response("200 OK", [("Content-Type", "text/plain")])
        return (b"x" * (1 << 20) for _ in range(256))

    server.server.set_app(app)
    flood: list[socket.socket] = []
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as stalled:
            stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            stalled.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")  # holds the only place
            time.sleep(0.3)
            for _ in range(20):
                sock = socket.create_connection(("127.0.0.1", server.port), timeout=1.0)
                sock.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                flood.append(sock)
            assert wait_until(lambda: server.server.closed_waiting >= 16, 5.0, what="all but the newest 4 closed")
            with urllib.request.urlopen(server.url, timeout=10) as response:
                assert response.status == 200 and b"remediator_ticks_total" in response.read()
    finally:
        for sock in flood:
            sock.close()
        server.close()


def test_a_request_ending_in_bare_newlines_is_answered():
    """`printf 'GET /metrics HTTP/1.0\\n\\n' | nc` as a health check: wsgiref takes a bare newline."""
    server = MetricsServer(Metrics(), "127.0.0.1", 0)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /metrics HTTP/1.0\n\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 200") and b"remediator_ticks_total" in answer, answer[:200]
    finally:
        server.close()


OUT_OF_DESCRIPTORS = """
import os, resource, sys, time
sys.path.insert(0, sys.argv[1])
from remediator.metrics import Metrics, MetricsServer
server = MetricsServer(Metrics(), "127.0.0.1", 0)
resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 4, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
print(server.port, flush=True)
time.sleep(60)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_the_accepting_thread_rests_instead_of_spinning():
    """At EMFILE the listening socket stays readable: the thread must not spin on it (it would
    make the daemon a noisy neighbour of its own)."""
    server = subprocess.Popen([sys.executable, "-c", OUT_OF_DESCRIPTORS, str(Path(__file__).resolve().parent.parent)],
                              stdout=subprocess.PIPE, text=True)
    clients: list[socket.socket] = []
    try:
        port = int(server.stdout.readline())
        for _ in range(20):  # more than it may hold: the kernel queues the rest
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=2.0))
        time.sleep(0.3)
        before = cpu_seconds(server.pid)
        time.sleep(1.0)
        used = cpu_seconds(server.pid) - before
        assert used < 0.5, f"{used:.2f} s of CPU in 1 s out of descriptors"
    finally:
        for sock in clients:
            sock.close()
        server.kill()
        server.wait(timeout=30)
