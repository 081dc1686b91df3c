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
 * sched_switch costs less than several).
 */
#include "sched_monitor.h"

BPF_HASH(protected_tids, u32, u32, MAX_PROTECTED_THREADS);
BPF_HASH(wait_start, u32, u64, MAX_WAITING_THREADS);
BPF_PERCPU_ARRAY(wait_totals, struct wait_totals, 1);
BPF_PERCPU_ARRAY(wait_hist, struct wait_hist, 1);
BPF_PERCPU_ARRAY(wait_max, struct wait_max, 2);
BPF_ARRAY(max_epoch, u64, 1);
BPF_PERCPU_ARRAY(cpu_state, struct cpu_state, 1);
BPF_PERCPU_ARRAY(segment_ring, struct segment_ring, 1);
BPF_HASH(proc_cpu, struct proc_cpu_key, struct proc_cpu, MAX_PROC_CPU_ENTRIES);
BPF_HASH(blame, u32, u64, MAX_BLAMED_PROCESSES);
BPF_RINGBUF_OUTPUT(exec_events, EXEC_RING_PAGES);

static __always_inline struct wait_totals *totals_here(void)
{
    u32 zero = 0;
    return wait_totals.lookup(&zero);
}

static __always_inline void start_wait(u32 tid, u64 now)
{
    struct wait_totals *totals;
    /* Overwrites an older start: the newest wakeup is the one the next switch-in ends. */
    if (wait_start.update(&tid, &now) != 0) {
        totals = totals_here();
        if (totals)
            totals->start_map_full++;
    }
}

static __always_inline void on_wakeup(u32 tid)
{
    struct wait_totals *totals;
    if (tid == 0 || !protected_tids.lookup(&tid))
        return;
    start_wait(tid, bpf_ktime_get_ns());
    totals = totals_here();
    if (totals)
        totals->wakeups++;
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

/* Add [start, end) of a process's run on this CPU to its totals and its windows. */
static __always_inline void account_run(u32 tgid, u32 cpu, u64 start, u64 end, char *comm,
                                        struct wait_totals *totals)
{
    struct proc_cpu_key key = {.tgid = tgid, .cpu = cpu};
    struct proc_cpu *usage = proc_cpu.lookup(&key);
    if (!usage) {
        struct proc_cpu fresh = {};
        bpf_probe_read_kernel(&fresh.comm, sizeof(fresh.comm), comm);
        proc_cpu.insert(&key, &fresh);
        usage = proc_cpu.lookup(&key);
        if (!usage) {
            if (totals)
                totals->proc_map_full++;
            return;
        }
    }
    usage->total_ns += end - start;

    u64 first = start / WINDOW_NS, last = end / WINDOW_NS;
    if (last - first >= WINDOW_SLOTS)
        first = last - WINDOW_SLOTS + 1; /* older windows are beyond the ring anyway */
    for (u32 i = 0; i < WINDOW_SLOTS; i++) {
        u64 window = first + i;
        if (window > last)
            break;
        u64 lo = window * WINDOW_NS, hi = lo + WINDOW_NS;
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
static __always_inline void attribute_wait(struct segment_ring *ring, u64 t0, u64 t1,
                                           struct wait_totals *totals)
{
    u64 blamed = 0;
    u32 head = ring->head;
    for (u32 i = 1; i <= SEGMENT_RING; i++) {
        struct run_segment *segment = &ring->segments[(head - i) & (SEGMENT_RING - 1)];
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
                totals->blame_map_full++;
            }
        }
        if (segment->start <= t0)
            break;
    }
    totals->blamed_ns += blamed;
    totals->unattributed_ns += (t1 - t0) - blamed;
}

static __always_inline void end_wait(u32 tid, u64 now, struct segment_ring *ring, u32 cpu)
{
    u64 *started = wait_start.lookup(&tid);
    if (!started)
        return;
    u64 t0 = *started;
    wait_start.delete(&tid);

    u32 zero = 0;
    struct wait_totals *totals = wait_totals.lookup(&zero);
    if (!totals)
        return;
    if (t0 > now || now - t0 > MAX_WAIT_NS) {
        totals->stale_starts++;
        return;
    }
    u64 delta = now - t0;
    totals->waits++;
    totals->wait_ns += delta;

    struct wait_hist *hist = wait_hist.lookup(&zero);
    if (hist) {
        u32 slot = hist_slot(delta);
        if (slot < HIST_SLOTS)
            hist->slots[slot]++;
    }

    u64 *epoch = max_epoch.lookup(&zero);
    if (epoch) {
        u32 index = (u32)(*epoch & 1);
        struct wait_max *max = wait_max.lookup(&index);
        if (max) {
            if (max->epoch != *epoch) {
                max->epoch = *epoch;
                max->max_ns = 0;
            }
            if (delta > max->max_ns)
                max->max_ns = delta;
        }
    }
    attribute_wait(ring, t0, now, totals);
}

TRACEPOINT_PROBE(sched, sched_switch)
{
    u64 now = bpf_ktime_get_ns();
    u32 cpu = bpf_get_smp_processor_id();
    u32 prev_tgid = bpf_get_current_pid_tgid() >> 32; /* current is still prev here */
    u32 prev_tid = args->prev_pid, next_tid = args->next_pid;
    u32 zero = 0;

    struct cpu_state *state = cpu_state.lookup(&zero);
    struct segment_ring *ring = segment_ring.lookup(&zero);
    if (!state || !ring)
        return 0;

    /* 1. The run that just ended. The idle task (tid 0) never counts. */
    if (state->since && prev_tid != 0 && now > state->since) {
        state->busy_ns += now - state->since;
        account_run(prev_tgid, cpu, state->since, now, args->prev_comm, totals_here());
        u32 slot = ring->head & (SEGMENT_RING - 1);
        ring->segments[slot].start = state->since;
        ring->segments[slot].end = now;
        ring->segments[slot].tgid = prev_tgid;
        ring->head++;
    }

    /* 2. A protected thread preempted while runnable starts waiting now. */
    if (prev_tid != 0 && (args->prev_state & TASK_STATE_MASK) == 0 && protected_tids.lookup(&prev_tid)) {
        start_wait(prev_tid, now);
        struct wait_totals *totals = totals_here();
        if (totals)
            totals->preemptions++;
    }

    /* 3. A protected thread switched in ends its wait. */
    if (next_tid != 0)
        end_wait(next_tid, now, ring, cpu);

    state->since = now;
    state->current_tid = next_tid;
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_fork)
{
    u32 parent = args->parent_pid, child = args->child_pid;
    u32 *protected = protected_tids.lookup(&parent);
    if (!protected)
        return 0;
    u32 value = *protected;
    protected_tids.update(&child, &value);
    struct wait_totals *totals = totals_here();
    if (totals)
        totals->protected_forks++;
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    u32 tid = args->pid;
    protected_tids.delete(&tid);
    wait_start.delete(&tid);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec)
{
    struct exec_event *event = exec_events.ringbuf_reserve(sizeof(struct exec_event));
    if (!event) {
        struct wait_totals *totals = totals_here();
        if (totals)
            totals->exec_events_dropped++;
        return 0;
    }
    event->ts = bpf_ktime_get_ns();
    event->pid = args->pid;
    event->old_pid = args->old_pid;
    TP_DATA_LOC_READ_STR(event->filename, filename, sizeof(event->filename));
    exec_events.ringbuf_submit(event, 0);
    return 0;
}
