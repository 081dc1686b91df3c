"""One tick, two callers: a replay of what a live daemon saw takes the same decisions, with the same
evidence, and exports the same metrics.

The daemon runs live, in this process, on a real hog (certain_harm: the whole
ladder comes on time), and every sample its tick takes is also written to a recording. `remediator replay`
then runs that recording through the same policies and config. What may differ is only what the
carrier said (applied live, would-apply in a replay) and the mode.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
import traceback

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers.daemon import write_config
from helpers.workloads import certain_harm
from remediator.cli import main
from remediator.daemon import Daemon
from remediator.metrics import Metrics
from remediator.sample import write_samples

pytestmark = pytest.mark.bpf

# What only a live run has: its own process, the time its ticks took, the restores at exit.
LIVE_ONLY = ("remediator_process_", "remediator_tick_duration_seconds", "remediator_executor_outcomes_total",
             "remediator_mode")
CARRIED = {"applied": "carried", "would-apply": "carried", "restored": "carried"}


class RecordingDaemon(Daemon):
    """The daemon, its collector teed into a recording: the samples its engine decided on."""

    def __init__(self, *args, recording, **kwargs):
        super().__init__(*args, **kwargs)
        self.recording = recording

    def tick(self, discovered=()):
        if not getattr(self.collector, "teed", False):
            take = self.collector.sample

            def sample_and_record():
                sample = take()
                write_samples(self.recording, [sample])
                return sample

            self.collector.sample = sample_and_record
            self.collector.teed = True
        return super().tick(discovered)


def run_recording_daemon(config, recording, metrics_path) -> None:
    with recording.open("w") as stream:
        daemon = RecordingDaemon(config, max_ticks=40, recording=stream)
        assert daemon.run() == 0
    [metrics] = [member for member in daemon.observers.members if isinstance(member, Metrics)]
    metrics_path.write_bytes(metrics.text())


def run_in_a_child(work, timeout: float = 120.0) -> None:
    """`work` in a forked child: the daemon must not be the workloads' parent (it never acts on its
    own children, and a replay cannot know which pid the recording daemon had)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0, "the daemon's run failed (its traceback is above)"
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the daemon's run took over {timeout} s")
        time.sleep(0.1)


def comparable_metrics(text: str) -> dict[tuple, float]:
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created") or sample.name.startswith(LIVE_ONLY):
                continue
            labels = {key: CARRIED.get(value, value) if key == "result" else value
                      for key, value in sample.labels.items() if key != "mode"}
            value = sample.value
            values[(sample.name, tuple(sorted(labels.items())))] = "nan" if math.isnan(value) else round(value, 9)
    return values


def decisions_of(records: list[dict]) -> list[tuple]:
    """Decisions (not the executor's own outcomes, at exit) with their evidence, less the audit's
    note that a replay's verification changed nothing."""
    return [(r["decision"], r["action_id"], (r["policy"] or {}).get("name"), (r.get("step") or {}).get("action"),
             r["process"]["comm"], r["process"]["pid"],
             json.dumps({k: v for k, v in r["evidence"].items() if k != "note"}, sort_keys=True))
            for r in records if "action_id" in r]


def test_a_replay_of_a_live_run_takes_the_same_decisions_and_exports_the_same_metrics(spawn, tmp_path, capsys):
    if os.sched_getaffinity(0) != frozenset({0, 1}):
        pytest.skip("the scene needs exactly CPUs 0 and 1")
    victim, hog = certain_harm(spawn)
    config = write_config(tmp_path, [victim.pid], metrics='listen = "127.0.0.1:0"\noffender_labels = 3')
    recording = tmp_path / "live.jsonl"
    live_metrics = tmp_path / "live.prom"
    run_in_a_child(lambda: run_recording_daemon(config, recording, live_metrics))
    live_audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]

    replay_metrics = tmp_path / "replay.prom"
    capsys.readouterr()
    assert main(["replay", str(recording), "--config", str(config), "--json", "--metrics", str(replay_metrics)]) == 0
    replayed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    live = decisions_of(live_audit)
    kinds = [entry[0] for entry in live]
    # The premise: the daemon acted (both steps, each applied), and judged a step after its settle time.
    assert kinds.count("act") == 2 and "verify" in kinds, kinds
    assert all(r["outcome"] == "applied" for r in live_audit if r["decision"] == "act")
    assert decisions_of(replayed) == live
    assert all(r["mode"] == "replay" and r["outcome"] == "would-apply" for r in replayed if r["decision"] == "act")

    live_text = live_metrics.read_text()
    live_values = comparable_metrics(live_text)
    replay_values = comparable_metrics(replay_metrics.read_text())
    assert live_values == replay_values
    # And they say what happened: both steps counted, the waits of every tick, the hog's blame.
    actions = {dict(labels)["step"]: value for (name, labels), value in live_values.items() if name == "remediator_actions_total"}
    assert actions == {"nice 10": 1.0, "affinity unprotected": 1.0}
    assert live_values[("remediator_ticks_total", ())] == 40
    blame = {dict(labels)["comm"]: value for (name, labels), value in live_values.items()
             if name == "remediator_offender_blame_seconds_total"}
    assert blame["fluent-bit"] > 0 and len(blame) <= 2 * 3 + 1  # offender_labels governed, as many others, "other"
    assert "remediator_process_resident_memory_bytes " in live_text
