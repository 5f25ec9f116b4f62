/* The pod sandbox ("pause") process of the test node's containerd (tests/support/node.rs):
 * it holds the pod's namespaces, sleeps until told to stop, and reaps whatever is left to it.
 * Built with `cc -static` into a FROM scratch image, as no registry is reachable for the real one. */
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) { (void)sig; _exit(0); }

static void reap(int sig) {
    (void)sig;
    while (waitpid(-1, 0, WNOHANG) > 0) {
    }
}

int main(void) {
    struct sigaction stopping = {.sa_handler = stop};
    struct sigaction reaping = {.sa_handler = reap, .sa_flags = SA_NOCLDSTOP};
    sigaction(SIGINT, &stopping, 0);
    sigaction(SIGTERM, &stopping, 0);
    sigaction(SIGCHLD, &reaping, 0);
    for (;;)
        pause();
}
