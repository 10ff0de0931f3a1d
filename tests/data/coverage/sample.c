#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int classify(int value)
{
	if (value < 0)
		return -1;
	if (value == 0)
		return 0;
	return 1;
}

static void unwind(const char *why)
{
	fprintf(stderr, "failed: %s\n", why);
}

int main(int argc, char **argv)
{
	int sum = 0;

	for (int i = 1; i < argc; i++) {
		if (strcmp(argv[i], "fail") == 0) {
			unwind(argv[i]);
			return 1;
		}
		sum += classify(atoi(argv[i]));
	}
	printf("%d\n", sum);
	return 0;
}
