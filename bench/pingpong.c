/* Context-switch ping-pong: two processes on one CPU bounce a byte over two pipes.
 * Every round trip is two context switches. Prints "ready <parent> <child>", waits for a line on
 * stdin, runs N round trips, prints "<elapsed ns> <round trips> <context switches>". */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv) {
    long rounds = argc > 1 ? atol(argv[1]) : 200000;
    int cpu = argc > 2 ? atoi(argv[2]) : 0;
    int ping[2], pong[2];
    char byte = 0, line[16];
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) || pipe(ping) || pipe(pong)) { perror("setup"); return 1; }
    pid_t child = fork();
    if (child == 0) {
        for (long i = 0; i < rounds; i++) {
            if (read(ping[0], &byte, 1) != 1 || write(pong[1], &byte, 1) != 1) _exit(1);
        }
        _exit(0);
    }
    printf("ready %d %d\n", getpid(), child);
    fflush(stdout);
    if (!fgets(line, sizeof(line), stdin)) return 1;
    long long start = now_ns();
    for (long i = 0; i < rounds; i++) {
        if (write(ping[1], &byte, 1) != 1 || read(pong[0], &byte, 1) != 1) return 1;
    }
    long long elapsed = now_ns() - start;
    waitpid(child, NULL, 0);
    struct rusage self, children;
    getrusage(RUSAGE_SELF, &self);
    getrusage(RUSAGE_CHILDREN, &children);
    long switches = self.ru_nvcsw + self.ru_nivcsw + children.ru_nvcsw + children.ru_nivcsw;
    printf("%lld %ld %ld\n", elapsed, rounds, switches);
    return 0;
}
