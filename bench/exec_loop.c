/* bench/exec_churn.py's exec loop: fork and exec `sleep LIFETIME` RATE times a second, without
 * waiting for each child (they live side by side, as a build's or a shell script's do). */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: exec_loop RATE LIFETIME_S\n");
        return 2;
    }
    long rate = atol(argv[1]);
    if (rate < 1)
        rate = 1;
    struct timespec gap = {rate > 1 ? 0 : 1, rate > 1 ? 1000000000L / rate : 0};
    for (;;) {
        pid_t pid = fork();
        if (pid == 0) {
            execl("/bin/sleep", "sleep", argv[2], (char *)0);
            _exit(127);
        }
        while (waitpid(-1, 0, WNOHANG) > 0) {
        }
        nanosleep(&gap, 0);
    }
}
