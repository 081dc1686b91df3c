/* A synthetic busy host for bench/scale.py: N small processes that each wake R times a second
 * and work a few microseconds (context switches without much CPU), and one service with T threads
 * that do the same, shared among S processes (a pre-forking server's workers; 1 by default).
 * Prints "ready SERVICE_PID..." once everything runs; runs until killed (its children die with
 * it: PR_SET_PDEATHSIG).
 *
 *     gcc -O2 -pthread -o scale_host scale_host.c
 *     ./scale_host PROCESSES WAKEUPS_PER_S SERVICE_THREADS SERVICE_WAKEUPS_PER_S [SERVICE_PROCESSES]
 */
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

static void work_loop(long period_ns, unsigned seed)
{
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    next.tv_nsec += (long)(rand_r(&seed) % (unsigned)period_ns); /* spread the phases */
    for (;;) {
        next.tv_nsec += period_ns;
        while (next.tv_nsec >= 1000000000L) {
            next.tv_nsec -= 1000000000L;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
        volatile unsigned spin = 0;
        for (unsigned i = 0; i < 2000; i++) /* a few microseconds of work */
            spin += i;
    }
}

static long service_period_ns;

static void *service_thread(void *arg)
{
    work_loop(service_period_ns, (unsigned)(long)arg);
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: %s PROCESSES WAKEUPS_PER_S SERVICE_THREADS SERVICE_WAKEUPS_PER_S [SERVICE_PROCESSES]\n", argv[0]);
        return 2;
    }
    int processes = atoi(argv[1]), threads = atoi(argv[3]);
    int service_processes = argc == 6 ? atoi(argv[5]) : 1;
    if (service_processes < 1 || service_processes > 1024)
        service_processes = 1;
    long period_ns = 1000000000L / atol(argv[2]);
    service_period_ns = 1000000000L / atol(argv[4]);
    pid_t services[1024];
    for (int s = 0; s < service_processes; s++) {
        int own = threads / service_processes + (s < threads % service_processes);
        services[s] = fork();
        if (services[s] == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            prctl(PR_SET_NAME, "scale-service");
            pthread_t tid;
            for (int i = 1; i < own; i++)
                pthread_create(&tid, NULL, service_thread, (void *)(long)(s * 100000 + i));
            service_thread((void *)(long)(s * 100000));
        }
    }
    for (int i = 0; i < processes; i++) {
        if (fork() == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            prctl(PR_SET_NAME, "scale-worker");
            work_loop(period_ns, (unsigned)i);
        }
    }
    printf("ready");
    for (int s = 0; s < service_processes; s++)
        printf(" %d", services[s]);
    printf("\n");
    fflush(stdout);
    pause();
    return 0;
}
