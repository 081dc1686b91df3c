/* A local user renaming processes in a loop (bench/rename_flood.py): N processes that each rename
 * themselves (prctl PR_SET_NAME, two names in turn) every INTERVAL_US microseconds until killed
 * (they die with their parent: PR_SET_PDEATHSIG). Prints "ready" once all run.
 *
 *     gcc -O2 -o rename_loop rename_loop.c
 *     ./rename_loop PROCESSES INTERVAL_US
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s PROCESSES INTERVAL_US\n", argv[0]);
        return 2;
    }
    int processes = atoi(argv[1]);
    long interval_us = atol(argv[2]);
    for (int i = 0; i < processes; i++) {
        if (fork() == 0) {
            prctl(PR_SET_PDEATHSIG, SIGKILL);
            struct timespec pause_for = {interval_us / 1000000, (interval_us % 1000000) * 1000};
            for (unsigned turn = 0;; turn++) {
                prctl(PR_SET_NAME, turn & 1 ? "renamer-a" : "renamer-b");
                if (interval_us > 0)
                    nanosleep(&pause_for, NULL);
            }
        }
    }
    printf("ready\n");
    fflush(stdout);
    pause();
    return 0;
}
