/*
 * tdxh-kmsg: print every record of the kernel log buffer from /dev/kmsg, then exit.
 *
 * /dev/kmsg gives each record with its sequence number, level and timestamp
 * ("<prio>,<seq>,<usec>,<flags>[,...];<text>", continuation lines start with a space), which
 * dmesg(1) drops. Reading it blocks at the end of the buffer: opened non-blocking, the end is
 * EAGAIN. EPIPE means records were overwritten while reading: say so and go on.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void)
{
	char record[8192 + 1];
	int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);

	if (fd < 0) {
		fprintf(stderr, "tdxh-kmsg: /dev/kmsg: %s\n", strerror(errno));
		return 1;
	}
	for (;;) {
		ssize_t n = read(fd, record, sizeof(record) - 1);

		if (n < 0 && errno == EAGAIN)
			return 0;
		if (n < 0 && errno == EPIPE) {
			fprintf(stderr, "tdxh-kmsg: records were overwritten while reading\n");
			continue;
		}
		if (n < 0) {
			fprintf(stderr, "tdxh-kmsg: read: %s\n", strerror(errno));
			return 1;
		}
		if (fwrite(record, 1, (size_t)n, stdout) != (size_t)n)
			return 1;
	}
}
