/* sched_monitor: what the scheduler does to the protected service, aggregated in the kernel.
 *
 *  - run-queue wait of protected threads (wakeup or preemption -> switch-in) into a log-linear
 *    histogram, with totals and the maximum;
 *  - on-CPU time per (process, cpu), cumulative and per sub-second window (bursts);
 *  - blame: while a protected thread waited, which processes ran on the CPU it was waiting for: the
 *    CPU it was woken onto or preempted on, even when the load balancer then pulls it elsewhere,
 *    split into its own processes (protected) and others;
 *  - the protected set, grown in the kernel on fork so a new thread counts from its first wakeup;
 *  - exec events and task events (a process renamed, a thread moved to another cgroup) to user
 *    space through a bounded ring buffer.
 *
 * Only sched tracepoints, and task:task_rename and cgroup:cgroup_attach_task where the kernel has
 * them; only their arguments plus bpf_get_current_pid_tgid() and
 * bpf_get_smp_processor_id(). All counters are cumulative: user space takes differences.
 * One handler per tracepoint (bcc rewrites map calls only in this file, and one program per
 * sched_switch costs less than several). The hot path only looks up and writes in place: the
 * protected map's value is the thread's wait start, so no insert or delete per wait; and a bitmap
 * in front of it answers "not protected" for most events without a hash lookup.
 */
#include "sched_monitor.h"

BPF_HASH(protected_threads, u32, struct protected_thread, MAX_PROTECTED_THREADS);
/* The filter in front of it, in two halves so that neither side overwrites the other's bits:
 * user space writes only user_protected_bits, the kernel (fork, exit) only fork_protected_bits,
 * with atomics. A stale bit costs one hash miss; the hash is the truth. */
BPF_ARRAY(user_protected_bits, u64, PROTECTED_BITMAP_WORDS);
BPF_ARRAY(fork_protected_bits, u64, PROTECTED_BITMAP_WORDS);
BPF_PERCPU_ARRAY(wait_stats, struct wait_stats, 1);
BPF_ARRAY(max_epoch, u64, 1);
/* By CPU: a migrated wait reads another CPU's ring. A plain array, read by user space for all
 * CPUs in one batch call: every context switch touches it, and a mapped one measured no better
 * (bench/probe_overhead.py, within this host's noise). */
BPF_ARRAY(cpu_state, struct cpu_state, MAX_CPUS);
BPF_TABLE("lru_hash", struct proc_cpu_key, struct proc_cpu, proc_cpu, MAX_PROC_CPU_ENTRIES);
/* The changed set (see sched_monitor.h): CPU c's queue for epoch parity p is the slots from
 * (c * 2 + p) * CHANGED_QUEUE_SLOTS. */
BPF_F_TABLE("array", u32, struct proc_cpu_key, changed_queue, MAX_CPUS * 2 * CHANGED_QUEUE_SLOTS, BPF_F_MMAPABLE);
/* Per process, the latest CPUs where its entry began to hold unreported time: when its main
 * thread exits, those entries are queued, so a short-lived process's time is read in full, not
 * only on the CPU of its last run. A few CPUs, so the exit handler's loop stays small whatever
 * the host (the verifier refused one over every possible CPU on 192). */
#define UNREPORTED_CPUS 8 /* power of two */
struct unreported_cpus {
    u32 cpu[UNREPORTED_CPUS];
    u32 head;
};
BPF_TABLE("lru_hash", u32, struct unreported_cpus, unreported_cpus, MAX_PROC_CPU_ENTRIES);
/* Exec and task events in one ring, told apart by size, so their order holds: an exec renames its
 * process just before its exec event, and user space drops that rename. */
BPF_RINGBUF_OUTPUT(process_events, PROCESS_RING_PAGES);
/* (kind << 32 | pid) -> max_epoch + 1 when its last event was sent: one event per pid, kind and epoch. */
BPF_TABLE("lru_hash", u64, u64, task_event_sent, TASK_EVENT_PIDS);

/* ---- burst detection (issue 14; see sched_monitor.h) ---- */
BPF_HASH(burst_candidates, u32, struct burst_candidate, MAX_BURST_CANDIDATES);
/* The lowest threshold of any candidate (0: none): shorter waits skip the candidate lookup. */
BPF_ARRAY(burst_floor, u64, 1);
BPF_RINGBUF_OUTPUT(burst_events, BURST_RING_PAGES);

/* A protected wait of `wait_ns` ending at `now` is blamed on `tgid` (it ran during the wait). */
static __always_inline void burst_blamed(u32 tgid, u64 wait_ns, u64 now)
{
    u32 zero = 0;
    u64 *floor = burst_floor.lookup(&zero);
    if (!floor || !*floor || wait_ns <= *floor)
        return;
    struct burst_candidate *candidate = burst_candidates.lookup(&tgid);
    u64 first_ts = 0;
    if (!candidate || !burst_note(candidate, wait_ns, now, &first_ts))
        return;
    struct burst_event *event = burst_events.ringbuf_reserve(sizeof(struct burst_event));
    if (!event)
        return; /* user space is behind; the tick still sees the harm */
    event->ts = now;
    event->first_ts = first_ts;
    event->wait_ns = wait_ns;
    event->tgid = tgid;
    event->count = candidate->count;
    burst_events.ringbuf_submit(event, 0);
}
/* On fork: the child of a candidate is a candidate with the same settings from its first run;
 * user space judges it at its next look (keeps it, or deletes it: the tracepoint does not say
 * whether the child is a process or a thread, whose entry never matches a blamed tgid). */
static __always_inline void burst_inherit(u32 child)
{
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    struct burst_candidate *candidate = burst_candidates.lookup(&parent);
    if (!candidate)
        return;
    struct burst_candidate fresh = {};
    fresh.threshold_ns = candidate->threshold_ns;
    fresh.span_ns = candidate->span_ns;
    fresh.count = candidate->count;
    fresh.inherited = 1;
    burst_candidates.insert(&child, &fresh);
}

static __always_inline void burst_exit(u32 tid)
{
    burst_candidates.delete(&tid);
}
/* ---- end of burst detection ---- */

static __always_inline struct wait_stats *stats_here(void)
{
    u32 zero = 0;
    return wait_stats.lookup(&zero);
}

/* The bitmap alone: enough to tell a protected process's runs from others' when charging a wait
 * (a bit left by a thread id reused since costs a misfiled share of one wait, not a lookup per run). */
static __always_inline bool protected_bit(u32 tid)
{
    u32 word = tid >> 6;
    if (word >= PROTECTED_BITMAP_WORDS)
        return protected_threads.lookup(&tid) != NULL;
    u64 bit = 1ull << (tid & 63);
    u64 *by_user = user_protected_bits.lookup(&word);
    u64 *by_fork = fork_protected_bits.lookup(&word);
    return ((by_user ? *by_user : 0) | (by_fork ? *by_fork : 0)) & bit;
}

static __always_inline struct protected_thread *protected_lookup(u32 tid)
{
    u32 word = tid >> 6;
    if (word < PROTECTED_BITMAP_WORDS) {
        u64 bit = 1ull << (tid & 63);
        u64 *by_user = user_protected_bits.lookup(&word);
        u64 *by_fork = fork_protected_bits.lookup(&word);
        u64 bits = (by_user ? *by_user : 0) | (by_fork ? *by_fork : 0);
        if (!(bits & bit))
            return NULL;
    }
    return protected_threads.lookup(&tid);
}

static __always_inline void on_wakeup(u32 tid, u32 target_cpu)
{
    struct protected_thread *thread;
    struct wait_stats *stats;
    if (tid == 0)
        return;
    thread = protected_lookup(tid);
    if (!thread)
        return;
    /* Woken while still on its CPU (between queueing itself and sleeping): it never leaves the
     * CPU, so no wait begins. A start set here would linger until the next wakeup, and a migration
     * in that wakeup would charge the whole time it ran and slept to the old CPU's runs. */
    struct cpu_state *there = cpu_state.lookup(&target_cpu);
    if (there && there->current_tid == tid)
        return;
    thread->wait_start = bpf_ktime_get_ns();
    thread->queued_since = thread->wait_start;
    thread->wait_cpu = target_cpu;
    stats = stats_here();
    if (stats)
        stats->totals.wakeups++;
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    on_wakeup(args->pid, args->target_cpu);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    on_wakeup(args->pid, args->target_cpu);
    return 0;
}

/* `ns` more of on-CPU or blamed time on a proc_cpu entry: queue it in this epoch's changed set
 * once its unreported time reaches the floor (or always: `force`), at most once per epoch. The
 * queue is this CPU's, whichever CPU the entry is for. Entries written from two CPUs at once may
 * lose a little unreported time or be queued twice: user space takes each key once, and the time
 * itself is in total_ns and blame_ns. */
static __always_inline void mark_changed(struct proc_cpu_key *key, struct proc_cpu *usage, u64 ns, bool force)
{
    u64 unreported = usage->unreported_ns + ns;
    if (unreported < REPORT_FLOOR_NS && !force) {
        if (!usage->unreported_ns && ns) { /* time left unread begins here: note the CPU */
            struct unreported_cpus *noted = unreported_cpus.lookup(&key->tgid);
            if (!noted) {
                struct unreported_cpus first = {.cpu = {key->cpu}, .head = 1};
                unreported_cpus.insert(&key->tgid, &first);
            } else {
                bool known = false;
                for (u32 i = 0; i < UNREPORTED_CPUS; i++)
                    known |= i < noted->head && noted->cpu[i] == key->cpu;
                if (!known) { /* two CPUs at once may lose one: its time is then read late */
                    u32 head = noted->head;
                    noted->cpu[head & (UNREPORTED_CPUS - 1)] = key->cpu;
                    noted->head = head + 1;
                }
            }
        }
        usage->unreported_ns = unreported;
        return;
    }
    u32 zero = 0;
    u64 *epoch = max_epoch.lookup(&zero);
    if (!epoch)
        return;
    u64 open = *epoch + 1;
    usage->unreported_ns = 0; /* queued now, or already this epoch: the read at its close takes it */
    if (usage->marked_epoch == open)
        return;
    usage->marked_epoch = open;
    u32 cpu = bpf_get_smp_processor_id();
    struct cpu_state *here = cpu_state.lookup(&cpu);
    if (!here)
        return;
    u32 parity = (u32)(*epoch & 1);
    if (here->changed_epoch[parity] != open) {
        here->changed_epoch[parity] = open;
        here->changed_count[parity] = 0;
    }
    u32 queued = here->changed_count[parity];
    if (queued < CHANGED_QUEUE_SLOTS) {
        u32 index = (cpu * 2 + parity) * CHANGED_QUEUE_SLOTS + queued;
        struct proc_cpu_key *slot = changed_queue.lookup(&index);
        if (slot)
            *slot = *key;
    }
    if (queued <= CHANGED_QUEUE_SLOTS) /* one past the slots says: overflowed, read everything */
        here->changed_count[parity] = queued + 1;
}

/* Add [start, end) of a process's run on this CPU to its totals and its windows. */
static __always_inline struct proc_cpu *account_run(u32 tgid, u32 cpu, u64 start, u64 end, char *comm,
                                                     bool exiting, struct wait_stats *stats)
{
    struct proc_cpu_key key = {.tgid = tgid, .cpu = cpu};
    struct proc_cpu *usage = proc_cpu.lookup(&key);
    if (!usage) {
        struct proc_cpu fresh = {};
        bpf_probe_read_kernel(&fresh.comm, sizeof(fresh.comm), comm);
        proc_cpu.insert(&key, &fresh);
        usage = proc_cpu.lookup(&key);
        if (!usage) {
            if (stats)
                stats->totals.proc_map_full++;
            return 0;
        }
    }
    usage->total_ns += end - start;
    mark_changed(&key, usage, end - start, exiting); /* a thread's last run is always read */

    u64 first = start >> WINDOW_SHIFT, last = end >> WINDOW_SHIFT;
    if (last - first >= WINDOW_SLOTS)
        first = last - WINDOW_SLOTS + 1; /* older windows are beyond the ring anyway */
    /* Every iteration runs, with no early exit: the loop then leaves the verifier one state
     * instead of one per exit iteration, which the 6.12 verifier (Debian 13) multiplied with the
     * states of the code after it until it gave up ("Program too large", E2BIG). */
    for (u32 i = 0; i < WINDOW_SLOTS; i++) {
        u64 window = first + i;
        if (window > last)
            continue;
        u64 lo = window << WINDOW_SHIFT, hi = lo + WINDOW_NS;
        if (lo < start)
            lo = start;
        if (hi > end)
            hi = end;
        u32 slot = (u32)window & (WINDOW_SLOTS - 1);
        u64 packed = usage->windows[slot];
        u64 ns = (packed >> 32) == (u32)window ? (packed & 0xffffffffull) : 0;
        ns += hi - lo;
        usage->windows[slot] = ((u64)(u32)window << 32) | (ns & 0xffffffffull);
    }
    return usage;
}

/* Charge `ns` of a protected thread's wait to the process `tgid` that ran meanwhile on `cpu`, in
 * its proc_cpu entry there (`usage`, or looked up); split into its own processes (protected: the
 * main thread's id is the tgid) and others. */
static __always_inline u64 charge(u32 tgid, u32 cpu, struct proc_cpu *usage, u64 ns, struct wait_stats *stats)
{
    struct proc_cpu_key key = {.tgid = tgid, .cpu = cpu};
    if (!usage)
        usage = proc_cpu.lookup(&key);
    if (!usage) {
        stats->totals.blame_map_full++;
        return 0;
    }
    __sync_fetch_and_add(&usage->blame_ns, ns);
    mark_changed(&key, usage, ns, false);
    if (protected_bit(tgid))
        stats->totals.own_ns += ns;
    else
        stats->totals.blamed_ns += ns;
    return ns;
}

/* A protected thread waited during [t0, t1) on the run queue of the CPU whose state is `state`:
 * charge every process that ran there in that interval with the part of its run inside it. When
 * a run is still in progress there (`in_progress`: the wait ends on another CPU, or it is a
 * migration that moves the thread), its share is left in owed_ns, for that CPU to charge when the
 * run ends (only it knows the run's process). What the ring no longer holds is counted
 * (overflow_ns), never guessed. */
static __always_inline void attribute_wait(struct cpu_state *state, u32 state_cpu, u64 t0, u64 t1, u64 wait_ns,
                                           bool in_progress, struct wait_stats *stats)
{
    u64 attributed = 0, uncovered = t1; /* [t0, uncovered) is not yet accounted for */
    if (in_progress) {
        u64 since = state->since;
        if (since && since < t1) {
            u64 lo = since > t0 ? since : t0;
            if (state->current_tid) {
                __sync_fetch_and_add(&state->owed_ns, t1 - lo);
                attributed += t1 - lo;
            }
            uncovered = lo;
        }
    }
    u32 head = state->head;
    bool covered = uncovered <= t0;
    for (u32 i = 1; i <= SEGMENT_RING; i++) {
        struct run_segment *segment = &state->segments[(head - i) & (SEGMENT_RING - 1)];
        if (segment->end <= t0) { /* also an empty slot; older ones end no later */
            covered = true;
            break;
        }
        u64 lo = segment->start > t0 ? segment->start : t0;
        u64 hi = segment->end < t1 ? segment->end : t1;
        if (hi > lo && segment->tgid) {
            /* Its latest run exactly; a merged segment's spanned time before it pro rata. */
            u64 last_start = segment->last_start, ns = 0;
            if (last_start < segment->start || last_start > segment->end)
                last_start = segment->start; /* torn by a concurrent writer: treat as one run */
            if (hi > last_start)
                ns = hi - (lo > last_start ? lo : last_start);
            u64 span = last_start - segment->start, tail = segment->end - last_start;
            if (lo < last_start && segment->ns > tail) {
                u64 spanned_ns = segment->ns - tail, part = (hi < last_start ? hi : last_start) - lo;
                if (spanned_ns > span)
                    spanned_ns = span;
                if (span < (1ull << 32))
                    ns += spanned_ns * part / span;   /* both factors < 2^32 */
                else                                   /* spans over 4 s: 1/256 at worst */
                    ns += (spanned_ns >> 12) * (part >> 12) / (span >> 24);
            }
            attributed += charge(segment->tgid, state_cpu, 0, ns, stats);
            burst_blamed(segment->tgid, wait_ns, t1); /* the whole wait (so far), once per run */
        }
        /* No stop at a start before t0: a segment older than a merged one may end after t0. */
        if (segment->start < uncovered)
            uncovered = segment->start;
    }
    if (uncovered <= t0)
        covered = true;
    if (!covered && uncovered > t0)
        stats->totals.overflow_ns += uncovered - t0;
    if (attributed < t1 - t0)
        stats->totals.unattributed_ns += (t1 - t0) - attributed;
}

static __always_inline void end_wait(struct protected_thread *thread, u64 now, u32 cpu, struct cpu_state *here)
{
    u64 t0 = thread->wait_start;
    u64 queued_since = thread->queued_since;
    u32 wait_cpu = thread->wait_cpu;
    thread->wait_start = 0;
    struct wait_stats *stats = stats_here();
    if (!stats)
        return;
    if (t0 > now || now - t0 > MAX_WAIT_NS) {
        stats->totals.stale_starts++;
        return;
    }
    u64 delta = now - t0;
    stats->totals.waits++;
    stats->totals.wait_ns += delta;
    /* 64-bit, and clamped rather than tested: clang tests one 32-bit copy of the slot and indexes
     * with another, and the 6.1 verifier (Debian 12) does not carry the bound across them ("R1
     * unbounded memory access"). hist_slot() never returns more than HIST_SLOTS - 1 anyway. */
    u64 slot = hist_slot(delta);
    if (slot > HIST_SLOTS - 1)
        slot = HIST_SLOTS - 1;
    stats->hist[slot]++;

    u32 zero = 0;
    u64 *epoch = max_epoch.lookup(&zero);
    if (epoch) {
        struct wait_max *max = &stats->max[*epoch & 1];
        if (max->epoch != *epoch) {
            max->epoch = *epoch;
            max->max_ns = 0;
        }
        if (delta > max->max_ns)
            max->max_ns = delta;
    }
    /* The part before its last migration was charged when it moved. */
    if (queued_since < t0 || queued_since > now)
        queued_since = t0;
    struct cpu_state *waited_on = here;
    if (wait_cpu != cpu) { /* a migration this probe did not see */
        waited_on = cpu_state.lookup(&wait_cpu);
        if (!waited_on) {
            stats->totals.unattributed_ns += now - queued_since;
            return;
        }
    }
    attribute_wait(waited_on, wait_cpu, queued_since, now, delta, wait_cpu != cpu, stats);
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    u32 prev_tid = args->prev_pid, next_tid = args->next_pid;
    u32 cpu = bpf_get_smp_processor_id();
    struct cpu_state *state = cpu_state.lookup(&cpu);
    if (!state)
        return 0;

    /* 1. The run that just ended (current is still prev here). The idle task never counts. A run
     * that follows one of the same process with no idle time between extends its segment, so a
     * process switching among its own threads takes one slot of the ring, not one per switch. */
    if (state->since && prev_tid != 0 && now > state->since) {
        u32 prev_tgid = bpf_get_current_pid_tgid() >> 32;
        state->busy_ns += now - state->since;
        bool exiting = (args->prev_state & EXIT_STATE_BITS) != 0;
        struct proc_cpu *usage = account_run(prev_tgid, cpu, state->since, now, args->prev_comm, exiting, stats_here());
        struct run_segment *last = &state->segments[(state->head - 1) & (SEGMENT_RING - 1)];
        struct run_segment *before = &state->segments[(state->head - 2) & (SEGMENT_RING - 1)];
        if (state->head && last->tgid == prev_tgid && last->end == state->since) {
            last->end = now;
            last->ns += now - state->since;
        } else if (state->head >= 2 && before->tgid == prev_tgid && last->end == state->since &&
                   before->end >= last->start && now - state->since <= SEGMENT_MERGE_NS &&
                   last->end - before->end <= SEGMENT_MERGE_NS) {
            /* Taking short turns with the last one (whose latest run began where this process's
             * segment ended, and was short too): that segment spans it now, and trades places with
             * it, so ends stay in order going back. A long run between never gets spanned. */
            struct run_segment spanning = *before;
            spanning.end = now;
            spanning.ns += now - state->since;
            spanning.last_start = state->since;
            *before = *last;
            *last = spanning;
        } else {
            struct run_segment *segment = &state->segments[state->head & (SEGMENT_RING - 1)];
            segment->start = state->since;
            segment->end = now;
            segment->ns = now - state->since;
            segment->last_start = state->since;
            segment->tgid = prev_tgid;
            state->head++;
        }
        /* Waits that ended on other CPUs during this run. */
        u64 owed = state->owed_ns;
        if (owed) {
            struct wait_stats *stats = stats_here();
            __sync_fetch_and_add(&state->owed_ns, -owed);
            if (stats && !charge(prev_tgid, cpu, usage, owed, stats))
                stats->totals.unattributed_ns += owed;
        }
    } else if (state->owed_ns) { /* it was idle after all (a race with the remote reader) */
        u64 owed = state->owed_ns;
        struct wait_stats *stats = stats_here();
        __sync_fetch_and_add(&state->owed_ns, -owed);
        if (stats)
            stats->totals.unattributed_ns += owed;
    }

    /* 2. A protected thread preempted while runnable starts waiting now. */
    if (prev_tid != 0 && (args->prev_state & TASK_STATE_MASK) == 0) {
        struct protected_thread *prev = protected_lookup(prev_tid);
        if (prev) {
            prev->wait_start = now;
            prev->queued_since = now;
            prev->wait_cpu = cpu;
            struct wait_stats *stats = stats_here();
            if (stats)
                stats->totals.preemptions++;
        }
    }

    /* 3. A protected thread switched in ends its wait. */
    if (next_tid != 0) {
        struct protected_thread *next = protected_lookup(next_tid);
        if (next && next->wait_start)
            end_wait(next, now, cpu, state);
    }

    state->since = now;
    state->current_tid = next_tid;
    return 0;
}

/* A waiting protected thread moved to another CPU's run queue (load balancing, an affinity change,
 * the stopper moving it off a CPU it may no longer use): charge the part of the wait spent on the
 * queue it leaves to what ran there, and go on from the new one. */
TRACEPOINT_PROBE(sched, sched_migrate_task)
{
    u32 tid = args->pid;
    struct protected_thread *thread = protected_lookup(tid);
    if (!thread || !thread->wait_start)
        return 0;
    u64 now = bpf_ktime_get_ns();
    u32 orig_cpu = args->orig_cpu;
    u64 t0 = thread->queued_since;
    thread->queued_since = now;
    thread->wait_cpu = args->dest_cpu;
    struct wait_stats *stats = stats_here();
    if (!stats)
        return 0;
    stats->totals.migrated_waits++;
    if (t0 < thread->wait_start || t0 >= now || now - thread->wait_start > MAX_WAIT_NS)
        return 0; /* stale: end_wait drops the whole wait */
    struct cpu_state *state = cpu_state.lookup(&orig_cpu);
    if (!state) {
        stats->totals.unattributed_ns += now - t0;
        return 0;
    }
    attribute_wait(state, orig_cpu, t0, now, now - t0, true, stats);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent = args->parent_pid, child = args->child_pid;
    burst_inherit(child);
    if (!protected_lookup(parent))
        return 0;
    struct protected_thread fresh = {};
    struct wait_stats *stats = stats_here();
    if (protected_threads.insert(&child, &fresh) == 0) {
        u32 word = child >> 6;
        u64 *bits = fork_protected_bits.lookup(&word);
        if (bits)
            __sync_fetch_and_or(bits, 1ull << (child & 63));
        if (stats)
            stats->totals.protected_forks++;
    } else if (stats) {
        stats->totals.protected_map_full++;
    }
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 tid = args->pid;
    burst_exit(tid);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if (tid == tgid) { /* the main thread: queue the entries with time left unread on other CPUs */
        struct unreported_cpus *noted = unreported_cpus.lookup(&tgid);
        if (noted) {
            struct unreported_cpus cpus = *noted;
            unreported_cpus.delete(&tgid);
            for (u32 i = 0; i < UNREPORTED_CPUS; i++) {
                if (i >= cpus.head)
                    break;
                struct proc_cpu_key key = {.tgid = tgid, .cpu = cpus.cpu[i]};
                struct proc_cpu *usage = proc_cpu.lookup(&key);
                if (usage && usage->unreported_ns)
                    mark_changed(&key, usage, 0, true);
            }
        }
    }
    if (!protected_lookup(tid))
        return 0;
    protected_threads.delete(&tid);
    struct wait_stats *stats = stats_here();
    if (stats)
        stats->totals.protected_exits++;
    u32 word = tid >> 6;
    u64 *bits = fork_protected_bits.lookup(&word);
    if (bits)
        __sync_fetch_and_and(bits, ~(1ull << (tid & 63)));
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    struct exec_event *event = process_events.ringbuf_reserve(sizeof(struct exec_event));
    if (!event) {
        struct wait_stats *stats = stats_here();
        if (stats)
            stats->totals.exec_events_dropped++;
        return 0;
    }
    u32 event_pid = args->pid;
    event->ts = bpf_ktime_get_ns();
    event->pid = event_pid;
    event->old_pid = args->old_pid;
    TP_DATA_LOC_READ_STR(event->filename, filename, sizeof(event->filename));
    /* No wakeup: user space reads exec events each tick; only burst events wake it at once. */
    process_events.ringbuf_submit(event, BPF_RB_NO_WAKEUP);
#ifdef HAVE_TASK_RENAME
    /* User space drops the rename this exec made (just before this event): the next one is sent
     * even within this epoch, or a process renaming itself at once after exec would go unseen. */
    u64 renamed = ((u64)TASK_RENAMED << 32) | event_pid;
    task_event_sent.delete(&renamed);
#endif
    return 0;
}

/* ---- task events (see sched_monitor.h) ---- */
#if defined(HAVE_TASK_RENAME) || defined(HAVE_CGROUP_ATTACH)
static __always_inline void send_task_event(u32 pid, u32 kind)
{
    u32 zero = 0;
    u64 *epoch = max_epoch.lookup(&zero);
    u64 open = (epoch ? *epoch : 0) + 1;
    u64 key = ((u64)kind << 32) | pid;
    u64 *sent = task_event_sent.lookup(&key);
    if (sent && *sent == open)
        return; /* already sent this epoch: user space reads the process after the epoch closes */
    task_event_sent.update(&key, &open);
    struct task_event *event = process_events.ringbuf_reserve(sizeof(struct task_event));
    if (!event) {
        struct wait_stats *stats = stats_here();
        if (stats)
            stats->totals.task_events_dropped++;
        return;
    }
    event->pid = pid;
    event->kind = kind;
    process_events.ringbuf_submit(event, BPF_RB_NO_WAKEUP); /* read at the tick */
}
#endif

#ifdef HAVE_TASK_RENAME
/* Renamed: by prctl(PR_SET_NAME) or a write to /proc/PID/task/TID/comm, always by a thread of the
 * same process (so current's tgid is the renamed thread's), and at every exec. Only the main
 * thread's name is the process's (what selectors and policies match); threads naming themselves
 * (thread pools do, by the hundred) are left out here. */
TRACEPOINT_PROBE(task, task_rename)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    if ((u32)args->pid == tgid)
        send_task_event(tgid, TASK_RENAMED);
    return 0;
}
#endif

#ifdef HAVE_CGROUP_ATTACH
/* Moved to another cgroup: pid is the main thread when a whole process moved (cgroup.procs), else
 * the one thread moved (cgroup.threads, v1's tasks). The mover is current, not the moved. */
TRACEPOINT_PROBE(cgroup, cgroup_attach_task)
{
    send_task_event((u32)args->pid, TASK_MOVED);
    return 0;
}
#endif
