"""Process trees: parent chains guarded by start time, which policy governs a descendant, and the
engine rolling a tree's CPU and blame up to the matched ancestor while acting on the children that run."""

from __future__ import annotations

from remediator import histogram
from remediator.engine import EngineSettings, EngineState, decide, record_outcome
from remediator.policy import load_policies
from remediator.procfs import ProcessInfo
from remediator.sample import ProcessUsage, ProtectedWaits, Sample
from remediator.trees import chain, descendants, format_tree, governing

TICK = 0.25
SETTINGS = EngineSettings(request_cpus=frozenset({0}), online_cpus=frozenset({0, 1}), max_changes_per_minute=30, self_pid=999)
SERVICE = ProcessInfo(pid=100, start_time=10, comm="api")
VECTOR = ProcessInfo(pid=200, start_time=20, comm="vector", ppid=1)
SHELL = ProcessInfo(pid=210, start_time=21, comm="sh", ppid=200)
XZ = [ProcessInfo(pid=220 + i, start_time=30 + i, comm="xz", ppid=210) for i in range(4)]
GZIP = ProcessInfo(pid=230, start_time=40, comm="gzip", ppid=200)
# A gzip whose ppid is 200 but that started before the current pid 200: its parent died and the pid was reused.
ORPHAN = ProcessInfo(pid=240, start_time=5, comm="gzip", ppid=200)
PROCESSES = {p.pid: p for p in [SERVICE, VECTOR, SHELL, GZIP, ORPHAN, *XZ]}

POLICY = """
[[policy]]
name = "shippers"
description = "test"
[policy.match]
comm = ["vector"]
descendants = {descendants}
[policy.trigger]
tail = {{ percentile = 99.0, above = "2ms", windows = 2, of = 3 }}
offender = {{ cpu = 0.5, blame_share = 0.2, require = "all" }}
[[policy.actions]]
nice = 10
settle = "1s"

[[policy]]
name = "gzip-under-logrotate"
description = "a descendant another policy names is governed by that one"
[policy.match]
comm = ["gzip"]
ancestor = ["logrotate"]
[policy.trigger]
tail = {{ above = "2ms" }}
offender = {{ cpu = 0.5 }}
[[policy.actions]]
nice = 19
"""


def policies(tmp_path, descendants=True):
    path = tmp_path / "p.toml"
    path.write_text(POLICY.format(descendants=str(descendants).lower()))
    return load_policies([path])


def test_chain_stops_at_a_parent_that_started_after_the_child():
    assert [p.pid for p in chain(XZ[0], PROCESSES)] == [210, 200]
    assert chain(ORPHAN, PROCESSES) == []  # pid 200 now is not its parent
    assert [p.pid for p in descendants(VECTOR, PROCESSES)] == [210, 220, 221, 222, 223, 230]


def test_descendants_are_governed_through_the_matched_ancestor_only_when_the_policy_says_so(tmp_path):
    governed = governing(XZ[1], PROCESSES, policies(tmp_path))
    assert governed is not None and governed.policy.name == "shippers" and governed.root == VECTOR
    assert "descendant of vector (pid 200)" in governed.match.detail
    assert governing(ORPHAN, PROCESSES, policies(tmp_path)) is None  # reused parent pid: not in the tree
    assert governing(SERVICE, PROCESSES, policies(tmp_path)) is None


def test_without_descendants_a_child_is_not_governed(tmp_path):
    assert governing(XZ[1], PROCESSES, policies(tmp_path, descendants=False)) is None


def test_a_descendant_named_by_another_policy_is_governed_by_that_one(tmp_path):
    logrotate_gzip = ProcessInfo(pid=250, start_time=50, comm="gzip", ppid=200, ancestors=((200, "logrotate"),))
    governed = governing(logrotate_gzip, {**PROCESSES, 250: logrotate_gzip}, policies(tmp_path))
    assert governed is not None and governed.policy.name == "gzip-under-logrotate" and governed.root == logrotate_gzip


def test_format_tree_marks_members():
    lines = format_tree(VECTOR, PROCESSES, {220: "<- 0.40 CPU"})
    assert lines[0] == "vector (pid 200)"
    assert "    xz (pid 220) <- 0.40 CPU" in lines
    assert "  gzip (pid 230)" in lines


def tick(t, tail_us, usage, blame):
    waits = [50_000] * 200 + [int(tail_us * 1000)] * 4
    duration_ns = int(TICK * 1e9)
    return Sample(
        ts=1_700_000_000 + t, start_ns=int((t - TICK) * 1e9), end_ns=int(t * 1e9), source="bpf", window_ns=50_000_000, ncpus=2,
        protected=ProtectedWaits(threads=1, pids=(100,), waits=len(waits), wakeups=len(waits), preemptions=0, wait_ns=sum(waits),
                                 max_ns=max(waits), histogram=tuple(sorted(histogram.from_values(waits).items()))),
        usage=tuple(ProcessUsage(pid, PROCESSES[pid].comm, int(cpu * duration_ns), int(cpu * 50_000_000)) for pid, cpu in usage.items()),
        blame=tuple((pid, int(share * sum(waits))) for pid, share in blame.items()),
        cpu_busy_ns=(duration_ns, duration_ns), processes=PROCESSES,
    )


def run(policy_set, samples):
    state, acted = EngineState(), []
    for s in samples:
        state, decisions = decide(state, s, policy_set, SETTINGS)
        for d in decisions:
            if d.kind == "act":
                acted.append(d)
                state = record_outcome(state, d, "applied", policy_set)
    return acted


# Four xz children each at 0.3 CPU and 10% blame: none alone meets cpu 0.5 and blame 0.2, the tree does.
BURN = {pid: 0.3 for pid in (220, 221, 222, 223)}
BLAME = {pid: 0.1 for pid in (220, 221, 222, 223)}


def test_the_tree_is_judged_together_and_the_children_that_run_are_acted_on(tmp_path):
    samples = [tick(1.0 + i * TICK, 5000.0, BURN, BLAME) for i in range(3)]
    acted = run(policies(tmp_path), samples)
    assert sorted(d.info.pid for d in acted) == [220, 221, 222, 223]  # not the idle vector, sh or gzip
    evidence = acted[0].evidence
    assert evidence["tree"]["root"] == {"pid": 200, "start_time": 20, "comm": "vector"}
    assert evidence["offender"]["cpu"] == 1.2 and evidence["offender"]["blame_share"] == 0.4
    assert evidence["tree"]["member_cpu"] == 0.3
    assert all(d.request.identity == d.info.identity for d in acted)


def test_without_descendants_the_children_escape(tmp_path):
    samples = [tick(1.0 + i * TICK, 5000.0, BURN, BLAME) for i in range(3)]
    assert run(policies(tmp_path, descendants=False), samples) == []


def test_a_quiet_tail_does_not_act_on_a_busy_tree(tmp_path):
    samples = [tick(1.0 + i * TICK, 100.0, BURN, BLAME) for i in range(3)]
    assert run(policies(tmp_path), samples) == []


def test_the_protected_service_under_a_tree_is_never_acted_on(tmp_path):
    child_service = ProcessInfo(pid=100, start_time=25, comm="api", ppid=200)
    PROCESSES_WITH = {**PROCESSES, 100: child_service}
    s = [tick(1.0 + i * TICK, 5000.0, {**BURN, 100: 0.9}, BLAME) for i in range(3)]
    s = [Sample(**{**x.__dict__, "processes": PROCESSES_WITH}) for x in s]
    acted = run(policies(tmp_path), s)
    assert 100 not in [d.info.pid for d in acted] and len(acted) == 4


def test_policy_explain_shows_the_tree(tmp_path):
    from helpers.policy_procs import add_process, make_proc_root
    from remediator.explain import explain
    from remediator.procfs import ProcFS
    from remediator.selectors import ProtectSelectors

    proc = make_proc_root(tmp_path)
    add_process(proc, 1, "systemd", ppid=0, exe="/usr/lib/systemd/systemd")
    add_process(proc, 100, "api", exe="/usr/bin/api", start=900)
    add_process(proc, 200, "vector", exe="/usr/bin/vector", start=1000)
    add_process(proc, 210, "sh", ppid=200, exe="/bin/sh", start=1001)
    add_process(proc, 220, "xz", ppid=210, exe="/usr/bin/xz", start=1002)
    add_process(proc, 230, "api", ppid=200, exe="/usr/bin/api", start=1003)  # protected, though under vector
    add_process(proc, 240, "gzip", ppid=200, exe="/usr/bin/gzip", start=10)  # older than pid 200: a reused parent pid
    report = explain(policies(tmp_path), ProtectSelectors.build(comms=["api"]), ProcFS(proc), frozenset({0, 1}), self_pid=999)
    text = report.to_text()
    assert "tree under pid 200 vector" in text
    assert "      sh (pid 210) [covered]" in text
    assert "        xz (pid 220) [covered]" in text
    assert "      api (pid 230) [excluded: protected service]" in text
    assert "gzip (pid 240)" not in text
    tree = next(e for e in report.to_json()["policies"] if e["name"] == "shippers")["trees"][0]
    assert tree["root"]["pid"] == 200
    assert [(m["pid"], m["status"]) for m in tree["members"]] == [(210, "covered"), (220, "covered"), (230, "excluded: protected service")]


def test_a_samples_governing_is_the_trees_and_is_asked_afresh_for_other_objects(tmp_path):
    named, unnamed = policies(tmp_path), policies(tmp_path, descendants=False)
    sample = tick(1.0, 100.0, {220: 0.3}, {220: 0.1})
    for info in PROCESSES.values():
        assert sample.governing(info, named) == governing(info, PROCESSES, named)
        assert sample.governing(info, named) is sample.governing(info, named)  # worked out once
    assert sample.governing(XZ[1], unnamed) is None  # another policy set: its own answer
    renamed = ProcessInfo(pid=230, start_time=40, comm="vector", ppid=1)  # same pid, another ProcessInfo
    assert sample.governing(GZIP, named).policy.name == "shippers"
    assert sample.governing(renamed, named) == governing(renamed, PROCESSES, named)
    assert sample.governing(renamed, named).root == renamed


def _governing_by_full_walk(info, processes, policy_set):
    """The rule as written before the short cut: every ancestor looked at."""
    from remediator.matching import MatchResult
    from remediator.trees import Governed

    selected = policy_set.select(info)
    policy, how, root = (selected[0], selected[1], info) if selected else (None, None, None)
    for ancestor in chain(info, processes):
        above = policy_set.select(ancestor)
        if above is None:
            continue
        if not above[0].match.descendants or (policy is not None and above[0].name != policy.name):
            break
        root = ancestor
        if selected is None:
            policy = above[0]
            how = MatchResult(above[1].fields, f"descendant of {root.comm} (pid {root.pid}): {above[1].detail}")
    return None if policy is None else Governed(policy, how, root)


def test_governing_skips_the_walk_only_where_no_ancestor_can_change_the_answer(tmp_path):
    """Random trees of processes named after the policies' comms, under policy sets with and
    without tree policies: the short cut (no walk for a process whose own policy is not a tree
    policy, nor for any process when no policy is one) gives what looking at every ancestor gives."""
    import random

    comms = ["a", "b", "c", "sh"]
    rng = random.Random(14)
    for round_ in range(40):
        text = ""
        for index, comm in enumerate(comms[:3]):
            descendants = rng.random() < 0.5 and round_ % 4 != 0  # every fourth set has no tree policy
            text += (f'[[policy]]\nname = "p{index}"\ndescription = "t"\n[policy.match]\ncomm = ["{comm}"]\n'
                     f'descendants = {str(descendants).lower()}\n[policy.trigger]\ntail = {{ above = "2ms" }}\n'
                     f'offender = {{ cpu = 0.5 }}\n[[policy.actions]]\nnice = 10\n\n')
        path = tmp_path / f"p{round_}.toml"
        path.write_text(text)
        policy_set = load_policies([path])
        processes = {}
        for pid in range(10, 60):
            parent = rng.choice([1] + [p for p in processes if rng.random() < 0.3] or [1])
            processes[pid] = ProcessInfo(pid=pid, start_time=pid, comm=rng.choice(comms), ppid=parent)
        for info in processes.values():
            assert governing(info, processes, policy_set) == _governing_by_full_walk(info, processes, policy_set), \
                (round_, info, [p.comm for p in chain(info, processes)])


def test_a_tree_stepped_off_the_tick_is_judged_again_only_on_windows_after_that_step(tmp_path):
    """A burst child moved off at once (tail.within) answered the harm the tick's recent windows
    hold: those windows must not then step its parent for the child's CPU (in bench/incident the
    shipper that forks each burst was moved, and every later child was born idle). Once the windows
    judged all began after the step and the tree is still over, its members that run get steps."""
    from remediator.engine import BurstEvidence, decide_burst

    path = tmp_path / "within.toml"
    path.write_text(POLICY.format(descendants="true").replace(
        "windows = 2, of = 3 }", 'windows = 2, of = 3, within = "50ms", waits = 2 }'))
    policy_set = load_policies([path])
    assert policy_set.by_name("shippers").trigger.burst_within_s == 0.05
    burning, blamed = {220: 0.9, 200: 0.05}, {220: 0.5}

    # The tick alone: the tree's running members, the shipper too, are stepped in one round.
    assert sorted(d.info.pid for d in run(policy_set, [tick(1.0 + i * TICK, 5000.0, burning, blamed) for i in range(2)])) == [200, 220]

    state = EngineState()
    for t in (1.0, 1.25):
        state, decisions = decide(state, tick(t, 5000.0, burning, blamed) if t == 1.0 else
                                  tick(t, 100.0, {}, {}), policy_set, SETTINGS)  # one window over: no tick step yet
        assert [d for d in decisions if d.kind == "act"] == []
    state, decisions = decide_burst(state, XZ[0], BurstEvidence(waits=2, first_s=1.27, last_s=1.29, last_wait_us=5000.0),
                                    policy_set, SETTINGS, [SERVICE.pid], [], 1.3, 1_700_000_001.3, ancestors=PROCESSES)
    (burst_act,) = decisions
    assert burst_act.info.pid == 220 and burst_act.tree_root == VECTOR.identity
    state = record_outcome(state, burst_act, "applied", policy_set)
    acted_at: dict[float, list[int]] = {}
    for t in (1.5, 1.75, 2.0, 2.25):
        state, decisions = decide(state, tick(t, 5000.0, burning, blamed), policy_set, SETTINGS)
        acted_at[t] = [d.info.pid for d in decisions if d.kind == "act"]
        for d in decisions:
            if d.kind == "act":
                state = record_outcome(state, d, "applied", policy_set)
    # Until the three windows judged began after 1.3 s, the shipper is not stepped on the child's CPU.
    assert acted_at == {1.5: [], 1.75: [], 2.0: [], 2.25: [200]}
