/* Shared definitions of the sched_monitor probes: settings, map value layouts, histogram buckets.
 *
 * Plain C with no kernel includes, so the same bucket function compiles with gcc in the unit tests
 * and is checked against the Python twin (remediator/histogram.py). Every setting can be overridden
 * with a -D cflag by the loader (remediator/probes.py); the defaults here are what it passes.
 *
 * The probes read only tracepoint arguments plus bpf_get_current_pid_tgid() and
 * bpf_get_smp_processor_id(): no kernel struct layout, so any header tree that lets clang parse
 * bcc's helpers will do.
 */
#ifndef SCHED_MONITOR_H
#define SCHED_MONITOR_H

#ifdef SCHED_MONITOR_STANDALONE /* gcc build of the bucket math for the unit tests */
#include <stdint.h>
typedef uint64_t u64;
typedef uint32_t u32;
#endif

/* Log-linear histogram of wait times in nanoseconds: each power of two is cut into
 * 2^HIST_SUB_BITS equal sub-buckets, so a bucket is at most 1/8 of its lower bound wide and a
 * percentile read at the bucket's midpoint is within +-6.25%. Values below 2^HIST_SUB_BITS ns get
 * a bucket each; values at or above 2^HIST_MAX_POW ns (~68.7 s) share the last bucket. */
#ifndef HIST_SUB_BITS
#define HIST_SUB_BITS 3
#endif
#ifndef HIST_MAX_POW
#define HIST_MAX_POW 36
#endif
#define HIST_SUB_COUNT (1u << HIST_SUB_BITS)
#define HIST_SLOTS ((HIST_MAX_POW - HIST_SUB_BITS + 1) * HIST_SUB_COUNT)

/* Map sizes. */
#ifndef MAX_PROTECTED_THREADS /* also the start-timestamp map: a protected thread's entry holds its wait start */
#define MAX_PROTECTED_THREADS 65536
#endif
/* A bitmap over thread ids filters the protected map: most scheduler events concern unprotected
 * threads, and a bit test costs a fraction of a hash lookup. Sized from kernel.pid_max by the
 * loader; a thread id beyond it falls back to the hash lookup. */
#ifndef PROTECTED_BITMAP_WORDS
#define PROTECTED_BITMAP_WORDS 65536 /* pid_max 4194304 */
#endif

/* (process, cpu) pairs with on-CPU time: an LRU map, so a host with more pairs than this loses the
 * least recently used ones (counted again from zero) instead of refusing new processes. The loader
 * sizes it from the host: possible CPUs x expected processes. */
#ifndef MAX_PROC_CPU_ENTRIES
#define MAX_PROC_CPU_ENTRIES 32768
#endif
/* The per-CPU state is a plain array indexed by CPU (not a per-CPU map): a wait that ends on another
 * CPU than the one it began on reads the run ring of the CPU it waited on. The loader passes the
 * host's possible CPUs. */
#ifndef MAX_CPUS
#define MAX_CPUS 1024
#endif

/* Per-process on-CPU time is also kept per sub-second window, so user space sees bursts: a ring
 * of WINDOW_SLOTS windows of 2^WINDOW_SHIFT ns each (a power of two: shifts, not divisions, on every
 * context switch), per (process, cpu). User space must read more often than every
 * (WINDOW_SLOTS - 1) windows. */
#ifndef WINDOW_SHIFT
#define WINDOW_SHIFT 27 /* 134 ms */
#endif
#define WINDOW_NS (1ull << WINDOW_SHIFT)
#ifndef WINDOW_SLOTS
#define WINDOW_SLOTS 16 /* power of two */
#endif

/* Recent run segments per CPU, walked back to find who ran while a protected thread waited.
 * Consecutive runs of one process with no idle time between them share one segment. So do the
 * short runs of two processes taking turns (a pipe ping-pong: hundreds of runs of a few us, which
 * would push the hog a waiter queued behind out of the ring): a run no longer than
 * SEGMENT_MERGE_NS joins its process's segment one slot back when only one run no longer than that
 * came in between, so that segment spans the other's. It keeps the time its process really ran
 * (ns) and where its latest run began: a wait is charged its overlap with that latest run exactly,
 * and with the spanned time before it pro rata. */
#ifndef SEGMENT_RING
#define SEGMENT_RING 16 /* power of two */
#endif
#ifndef SEGMENT_MERGE_NS
#define SEGMENT_MERGE_NS 50000
#endif

/* A start timestamp older than this is stale (a lost switch-in); the wait is dropped, not counted. */
#ifndef MAX_WAIT_NS
#define MAX_WAIT_NS 10000000000ull
#endif

/* sched_switch reports a runnable (preempted) prev as state index 0, optionally with the
 * TASK_REPORT_MAX "+" bit; the loader derives the mask from the tracepoint's print fmt. */
#ifndef TASK_STATE_MASK
#define TASK_STATE_MASK 0xff
#endif

#ifndef PROCESS_RING_PAGES /* exec and task events */
#define PROCESS_RING_PAGES 16
#endif
#define EXEC_FILENAME_LEN 128

struct protected_thread {
    u64 wait_start;           /* when it began waiting for a CPU; 0 = not waiting */
    u64 queued_since;         /* when it joined the run queue it waits on now (a migration moves it) */
    u32 wait_cpu;             /* the CPU of that run queue: the wakeup's target, where it was
                               * preempted, or where a migration moved it; charged to what ran there */
    u32 pad;
};

struct wait_totals {          /* cumulative */
    u64 waits;                /* completed run-queue waits of protected threads */
    u64 wait_ns;
    u64 wakeups;              /* waits that began with a wakeup */
    u64 preemptions;          /* waits that began with a preemption */
    u64 blamed_ns;            /* wait time behind processes that are not protected ("others") */
    u64 unattributed_ns;      /* wait time on an idle CPU or older than the segment ring */
    u64 protected_map_full;   /* new threads not protected on fork: the protected map was full */
    u64 stale_starts;         /* starts dropped as older than MAX_WAIT_NS */
    u64 proc_map_full;        /* run segments not accounted: the per-process map was full */
    u64 blame_map_full;       /* blame not kept: the run's proc_cpu entry was gone (the map full) */
    u64 exec_events_dropped;  /* the exec ring buffer was full */
    u64 protected_forks;      /* threads and children added to the protected set in-kernel */
    u64 own_ns;               /* wait time behind threads of protected processes (its own) */
    u64 overflow_ns;          /* the part of unattributed_ns older than the segment ring held */
    u64 migrated_waits;       /* migrations of waiting protected threads (each part charged to its CPU) */
    u64 task_events_dropped;  /* the task event ring buffer was full */
    u64 protected_exits;      /* protected threads that exited (and left the protected set in-kernel) */
};

/* The maximum wait per epoch: user space bumps the epoch, then reads the previous epoch's slot,
 * which the kernel no longer writes. No read-then-clear race. */
struct wait_max {
    u64 epoch;
    u64 max_ns;
};

struct wait_stats {           /* per CPU: one lookup per wait for everything it updates */
    struct wait_totals totals;
    struct wait_max max[2];
    u64 hist[HIST_SLOTS];
};

struct run_segment {          /* going back in the ring, ends never increase (starts may) */
    u64 start;
    u64 end;
    u64 ns;                   /* time its process ran within [start, end): less once merged */
    u64 last_start;           /* its latest run, [last_start, end), is all its own */
    u32 tgid;
    u32 pad;
};

struct cpu_state {            /* one per CPU, written only by that CPU except owed_ns */
    u64 since;                /* when the current task was switched in (0: not seen yet) */
    u64 busy_ns;              /* cumulative non-idle time */
    u32 current_tid;          /* the task on the CPU now (0 = idle) */
    u32 head;                 /* next slot of the segment ring to write */
    u64 owed_ns;              /* wait time that ended on another CPU during the run in progress here:
                               * charged to that run's process when it ends (added atomically) */
    u64 changed_epoch[2];     /* per epoch parity: epoch + 1 whose keys this CPU's queue holds */
    u32 changed_count[2];     /* keys this CPU queued in that epoch (over CHANGED_QUEUE_SLOTS: overflowed) */
    struct run_segment segments[SEGMENT_RING]; /* the latest runs on this CPU */
};

struct proc_cpu_key {
    u32 tgid;
    u32 cpu;
};

struct proc_cpu {
    u64 total_ns;
    u64 blame_ns;              /* protected wait charged to this process's runs on this CPU (added atomically) */
    u64 windows[WINDOW_SLOTS]; /* (window index << 32) | ns on this CPU in that window */
    char comm[16];             /* comm of the thread that created the entry */
    u64 marked_epoch;          /* max_epoch + 1 when last queued as changed (0: never) */
    u64 unreported_ns;         /* on-CPU and blamed ns since it was last queued */
};

/* The changed set: each CPU queues the (process, cpu) keys of proc_cpu entries that changed in an
 * epoch (the epoch user space bumps at every read), in its own part of an array user space maps
 * into memory: one part per CPU and epoch parity, so only that CPU writes it and reading it costs
 * no system call and no walk over hash buckets. User space reads the closed epoch's keys and looks
 * up only those entries: a read costs what ran, not every process on every CPU.
 *
 * An entry is queued once its unreported time (on-CPU plus blamed) reaches REPORT_FLOOR_NS, at
 * most once per epoch, and always when a thread of it exits (its last run). So a process that
 * barely runs is read every few seconds rather than every tick, its time late by less than the
 * floor per CPU, and a tick's read is bounded by the CPU time that passed, whatever the number of
 * processes. A part that overflows says so (its count passes the slots): user space then reads
 * the whole table. */
#ifndef REPORT_FLOOR_NS
#define REPORT_FLOOR_NS 1000000
#endif
#ifndef CHANGED_QUEUE_SLOTS
#define CHANGED_QUEUE_SLOTS 1024
#endif
/* sched_switch's prev_state bits of a thread switched out for the last time (EXIT_DEAD,
 * EXIT_ZOMBIE); the loader reads them from the tracepoint's print fmt. */
#ifndef EXIT_STATE_BITS
#define EXIT_STATE_BITS 0x30
#endif

struct exec_event {
    u64 ts;
    u32 pid;
    u32 old_pid;
    char filename[EXEC_FILENAME_LEN];
};

/* ---- task events: a process renamed or moved, judged again within a tick ------------------
 * A process that renames itself (prctl, /proc/self/comm) or is moved to another cgroup without an
 * exec is told to user space through the exec events' ring buffer, so the collector and the
 * burst watch judge them again within a tick. Each is sent once per pid per epoch (a process
 * renaming itself in a loop costs one event a tick; an exec lets the next rename through at once);
 * a full ring is counted (task_events_dropped) and user space judges every process instead.
 * The rename and move tracepoints are compiled in only where the kernel has them
 * (HAVE_TASK_RENAME, HAVE_CGROUP_ATTACH: the loader looks in tracefs). */
#ifndef TASK_EVENT_PIDS
#define TASK_EVENT_PIDS 16384 /* pids whose last rename or move event is remembered (LRU) */
#endif
#define TASK_RENAMED 1        /* pid: the process (its main thread renamed) */
#define TASK_MOVED 2          /* pid: the thread moved to another cgroup (the main thread: the process) */

struct task_event {
    u32 pid;
    u32 kind;
};

/* ---- burst detection (issue 14): act within milliseconds of a burst, off the tick ----------
 * User space names candidates (processes a policy with `tail.within` governs) with that policy's
 * threshold, count and span. When a protected wait longer than a candidate's threshold ends and
 * the candidate ran during it, the wait's end time goes into the candidate's small ring; once
 * `count` such waits fall within `span_ns`, one event goes to user space through a ring buffer.
 * `count` is at least 2, so a lone spike never fires. After firing, a candidate stays quiet for
 * one span (a sustained burst wakes user space at most once per span). A candidate's child is a
 * candidate from its fork (a burst may come from a process user space has not seen yet). */
#ifndef MAX_BURST_CANDIDATES
#define MAX_BURST_CANDIDATES 4096
#endif
#ifndef BURST_RING_PAGES
#define BURST_RING_PAGES 8
#endif
#define BURST_RECENT 8 /* power of two: the largest count a policy may ask for */

struct burst_candidate {
    u64 threshold_ns;         /* user space: a wait counts when longer than this */
    u64 span_ns;              /* user space: `count` counted waits within this span fire */
    u32 count;                /* user space: 2..BURST_RECENT */
    u32 head;                 /* kernel: next slot of `recent` */
    u32 inherited;            /* kernel: added on fork as a candidate's child (user space judges it) */
    u32 pad;
    u64 last_wait_end;        /* kernel: the wait last counted (one wait counts once per candidate) */
    u64 fired_at;             /* kernel: the last event */
    u64 recent[BURST_RECENT]; /* kernel: end times of the latest counted waits */
};

struct burst_event {
    u64 ts;                   /* end of the wait that completed the count */
    u64 first_ts;             /* end of the oldest wait of the count */
    u64 wait_ns;              /* the wait that completed the count */
    u32 tgid;
    u32 count;
};

/* Note one blamed wait ending at `now`; 1 when the candidate's count is reached. Plain C, so the
 * unit tests run the same code with gcc on scenes of waits. */
static inline int burst_note(struct burst_candidate *c, u64 wait_ns, u64 now, u64 *first_ts)
{
    u32 need = c->count;
    if (wait_ns <= c->threshold_ns || c->last_wait_end == now)
        return 0;
    c->last_wait_end = now;
    if (need < 2)
        need = 2;
    if (need > BURST_RECENT)
        need = BURST_RECENT;
    c->recent[c->head & (BURST_RECENT - 1)] = now;
    c->head++;
    u64 oldest = c->recent[(c->head - need) & (BURST_RECENT - 1)];
    if (!oldest || now - oldest > c->span_ns)
        return 0;
    if (c->fired_at && now - c->fired_at < c->span_ns)
        return 0;
    c->fired_at = now;
    *first_ts = oldest;
    return 1;
}
/* ---- end of burst detection ---------------------------------------------------------------- */

/* floor(log2(v)) for v > 0, without loops (the verifier and gcc both like this). */
static inline u32 sm_log2(u64 v)
{
    u32 r = 0, shift;
    shift = (v > 0xFFFFFFFFull) << 5; v >>= shift; r |= shift;
    shift = (v > 0xFFFFull) << 4; v >>= shift; r |= shift;
    shift = (v > 0xFFull) << 3; v >>= shift; r |= shift;
    shift = (v > 0xFull) << 2; v >>= shift; r |= shift;
    shift = (v > 0x3ull) << 1; v >>= shift; r |= shift;
    r |= (u32)(v >> 1);
    return r;
}

static inline u32 hist_slot(u64 value)
{
    u32 exponent;
    if (value < HIST_SUB_COUNT)
        return (u32)value;
    exponent = sm_log2(value);
    if (exponent >= HIST_MAX_POW)
        return HIST_SLOTS - 1;
    return ((exponent - HIST_SUB_BITS + 1) << HIST_SUB_BITS) |
           (u32)((value >> (exponent - HIST_SUB_BITS)) & (HIST_SUB_COUNT - 1));
}

#endif /* SCHED_MONITOR_H */
