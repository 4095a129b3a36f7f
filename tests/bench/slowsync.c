/* A slower disk for `tests/bench/slowdisk.py`: fsync and fdatasync sleep before they run.
 *
 * Loaded with LD_PRELOAD into the broker; SLOWSYNC_DELAY_US (microseconds, default 2000) is
 * added to every fsync and fdatasync, as if the disk took that much longer to flush. Only the
 * calling thread sleeps, as it would waiting for a slow disk.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <time.h>

static void slow_down(void)
{
    const char *text = getenv("SLOWSYNC_DELAY_US");
    long us = text ? atol(text) : 2000;
    struct timespec left = {us / 1000000, (us % 1000000) * 1000};
    int saved = errno;
    while (us > 0 && nanosleep(&left, &left) == -1 && errno == EINTR) {
    }
    errno = saved;
}

int fsync(int fd)
{
    static int (*real)(int);
    if (!real) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    }
    slow_down();
    return real(fd);
}

int fdatasync(int fd)
{
    static int (*real)(int);
    if (!real) {
        real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    }
    slow_down();
    return real(fd);
}
