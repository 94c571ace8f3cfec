/* mkcpio: writes a newc (SVR4, no CRC) cpio archive from a list on stdin, without root (device
 * nodes are described, not copied). Lines:
 *   dir  PATH MODE
 *   nod  PATH MODE c|b MAJOR MINOR
 *   file PATH SOURCE MODE
 * Owner is always 0:0, mtime 0, so the archive is reproducible. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

static unsigned long ino = 300000, offset;

static void pad4(void)
{
	while (offset % 4) { putchar(0); offset++; }
}

static void header(const char *name, unsigned mode, unsigned long size, unsigned maj, unsigned min)
{
	unsigned long namesize = strlen(name) + 1;
	offset += printf("070701%08lX%08X%08X%08X%08X%08X%08lX%08X%08X%08X%08X%08lX%08X",
			 ino++, mode, 0, 0, 1, 0, size, 0, 0, maj, min, namesize, 0);
	fwrite(name, 1, namesize, stdout);
	offset += namesize;
	pad4();
}

int main(void)
{
	char line[4096], kind[8], path[1024], src[2048], type;
	unsigned mode, maj, min;
	while (fgets(line, sizeof line, stdin)) {
		if (line[0] == '#' || line[0] == '\n') continue;
		const char *name;
		if (sscanf(line, "%7s %1023s", kind, path) != 2) { fprintf(stderr, "mkcpio: bad line: %s", line); return 1; }
		name = path[0] == '/' ? path + 1 : path;
		if (!strcmp(kind, "dir") && sscanf(line, "%*s %*s %o", &mode) == 1) {
			header(name, S_IFDIR | mode, 0, 0, 0);
		} else if (!strcmp(kind, "nod") && sscanf(line, "%*s %*s %o %c %u %u", &mode, &type, &maj, &min) == 4) {
			header(name, (type == 'b' ? S_IFBLK : S_IFCHR) | mode, 0, maj, min);
		} else if (!strcmp(kind, "file") && sscanf(line, "%*s %*s %2047s %o", src, &mode) == 2) {
			FILE *f = fopen(src, "rb");
			if (!f) { perror(src); return 1; }
			fseek(f, 0, SEEK_END);
			long size = ftell(f);
			rewind(f);
			header(name, S_IFREG | mode, (unsigned long)size, 0, 0);
			char buf[65536];
			size_t n;
			while ((n = fread(buf, 1, sizeof buf, f)) > 0) { fwrite(buf, 1, n, stdout); offset += n; }
			fclose(f);
			pad4();
		} else {
			fprintf(stderr, "mkcpio: bad line: %s", line);
			return 1;
		}
	}
	header("TRAILER!!!", 0, 0, 0, 0);
	while (offset % 512) { putchar(0); offset++; }
	return fflush(stdout) ? 1 : 0;
}
