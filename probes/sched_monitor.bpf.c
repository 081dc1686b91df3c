/* sched_monitor: what the scheduler does to the protected service, aggregated in the kernel.
 *
 *  - run-queue wait of protected threads (wakeup or preemption -> switch-in) into a log-linear
 *    histogram, with totals and the maximum;
 *  - on-CPU time per (process, cpu), cumulative and per sub-second window (bursts);
 *  - blame: while a protected thread waited, which processes ran on the CPU it was waiting for;
 *  - the protected set, grown in the kernel on fork so a new thread counts from its first wakeup;
 *  - exec events to user space through a bounded ring buffer.
 *
 * Only sched tracepoints; only their arguments plus bpf_get_current_pid_tgid() and
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
BPF_PERCPU_ARRAY(cpu_state, struct cpu_state, 1);
BPF_HASH(proc_cpu, struct proc_cpu_key, struct proc_cpu, MAX_PROC_CPU_ENTRIES);
BPF_HASH(blame, u32, u64, MAX_BLAMED_PROCESSES);
BPF_HASH(proc_changed, struct proc_changed_key, u8, 2 * MAX_PROC_CPU_ENTRIES); /* both parities */
BPF_RINGBUF_OUTPUT(exec_events, EXEC_RING_PAGES);

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

static __always_inline void on_wakeup(u32 tid)
{
    struct protected_thread *thread;
    struct wait_stats *stats;
    if (tid == 0)
        return;
    thread = protected_lookup(tid);
    if (!thread)
        return;
    thread->wait_start = bpf_ktime_get_ns();
    stats = stats_here();
    if (stats)
        stats->totals.wakeups++;
}

TRACEPOINT_PROBE(sched, sched_wakeup)
{
    on_wakeup(args->pid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_wakeup_new)
{
    on_wakeup(args->pid);
    return 0;
}

/* Put a proc_cpu entry in this epoch's changed set, once per epoch. */
static __always_inline void mark_changed(struct proc_cpu_key *key, struct proc_cpu *usage)
{
    u32 zero = 0;
    u64 *epoch = max_epoch.lookup(&zero);
    if (!epoch || usage->marked_epoch == *epoch + 1)
        return;
    usage->marked_epoch = *epoch + 1;
    struct proc_changed_key changed = {.tgid = key->tgid, .cpu = key->cpu, .parity = (u32)(*epoch & 1)};
    u8 one = 1;
    proc_changed.update(&changed, &one);
}

/* Add [start, end) of a process's run on this CPU to its totals and its windows. */
static __always_inline void account_run(u32 tgid, u32 cpu, u64 start, u64 end, char *comm,
                                        struct wait_stats *stats)
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
            return;
        }
    }
    usage->total_ns += end - start;
    mark_changed(&key, usage);

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
}

/* A protected thread waited on this CPU during [t0, t1): charge every process that ran here in
 * that interval with the part of its run inside it. */
static __always_inline void attribute_wait(struct cpu_state *state, u64 t0, u64 t1, struct wait_stats *stats)
{
    u64 blamed = 0;
    u32 head = state->head;
    for (u32 i = 1; i <= SEGMENT_RING; i++) {
        struct run_segment *segment = &state->segments[(head - i) & (SEGMENT_RING - 1)];
        if (segment->end <= t0)
            break;
        u64 lo = segment->start > t0 ? segment->start : t0;
        u64 hi = segment->end < t1 ? segment->end : t1;
        if (hi > lo && segment->tgid) {
            u64 zero = 0, *charged = blame.lookup_or_try_init(&segment->tgid, &zero);
            if (charged) {
                __sync_fetch_and_add(charged, hi - lo);
                blamed += hi - lo;
            } else {
                stats->totals.blame_map_full++;
            }
            burst_blamed(segment->tgid, t1 - t0, t1);
        }
        if (segment->start <= t0)
            break;
    }
    stats->totals.blamed_ns += blamed;
    stats->totals.unattributed_ns += (t1 - t0) - blamed;
}

static __always_inline void end_wait(struct protected_thread *thread, u64 now, struct cpu_state *state)
{
    u64 t0 = thread->wait_start;
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
    attribute_wait(state, t0, now, stats);
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    u32 prev_tid = args->prev_pid, next_tid = args->next_pid;
    u32 zero = 0;
    struct cpu_state *state = cpu_state.lookup(&zero);
    if (!state)
        return 0;

    /* 1. The run that just ended (current is still prev here). The idle task never counts. */
    if (state->since && prev_tid != 0 && now > state->since) {
        u32 prev_tgid = bpf_get_current_pid_tgid() >> 32;
        state->busy_ns += now - state->since;
        account_run(prev_tgid, bpf_get_smp_processor_id(), state->since, now, args->prev_comm, stats_here());
        struct run_segment *segment = &state->segments[state->head & (SEGMENT_RING - 1)];
        segment->start = state->since;
        segment->end = now;
        segment->tgid = prev_tgid;
        state->head++;
    }

    /* 2. A protected thread preempted while runnable starts waiting now. */
    if (prev_tid != 0 && (args->prev_state & TASK_STATE_MASK) == 0) {
        struct protected_thread *prev = protected_lookup(prev_tid);
        if (prev) {
            prev->wait_start = now;
            struct wait_stats *stats = stats_here();
            if (stats)
                stats->totals.preemptions++;
        }
    }

    /* 3. A protected thread switched in ends its wait. */
    if (next_tid != 0) {
        struct protected_thread *next = protected_lookup(next_tid);
        if (next && next->wait_start)
            end_wait(next, now, state);
    }

    state->since = now;
    state->current_tid = next_tid;
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
    if (!protected_lookup(tid))
        return 0;
    protected_threads.delete(&tid);
    u32 word = tid >> 6;
    u64 *bits = fork_protected_bits.lookup(&word);
    if (bits)
        __sync_fetch_and_and(bits, ~(1ull << (tid & 63)));
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    struct exec_event *event = exec_events.ringbuf_reserve(sizeof(struct exec_event));
    if (!event) {
        struct wait_stats *stats = stats_here();
        if (stats)
            stats->totals.exec_events_dropped++;
        return 0;
    }
    event->ts = bpf_ktime_get_ns();
    event->pid = args->pid;
    event->old_pid = args->old_pid;
    TP_DATA_LOC_READ_STR(event->filename, filename, sizeof(event->filename));
    /* No wakeup: user space reads exec events each tick; only burst events wake it at once. */
    exec_events.ringbuf_submit(event, BPF_RB_NO_WAKEUP);
    return 0;
}
