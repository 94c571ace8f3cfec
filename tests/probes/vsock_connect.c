/* An attacker's client run inside a container: tries to open an AF_VSOCK stream to CID:PORT
 * (the agent listens on port 1024) and prints one line saying how far it got. Built static by
 * tests/isolation_guest.rs so it runs in any container rootfs. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

/* From linux/vm_sockets.h, which musl-gcc's include path lacks. */
struct sockaddr_vm {
    sa_family_t svm_family;
    unsigned short svm_reserved1;
    unsigned int svm_port;
    unsigned int svm_cid;
    unsigned char svm_flags;
    unsigned char svm_zero[3];
};
#define SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD 6

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CID PORT\n", argv[0]);
        return 2;
    }
    unsigned cid = (unsigned)strtoul(argv[1], NULL, 0), port = (unsigned)strtoul(argv[2], NULL, 0);
    int s = socket(AF_VSOCK, SOCK_STREAM, 0);
    if (s < 0) {
        printf("cid %u port %u: socket: %s\n", cid, port, strerror(errno));
        return 1;
    }
    struct timeval tv = {5, 0};
    setsockopt(s, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT_OLD, &tv, sizeof tv);
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = cid;
    a.svm_port = port;
    if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) {
        printf("cid %u port %u: connect: %s\n", cid, port, strerror(errno));
        return 1;
    }
    printf("cid %u port %u: CONNECTED\n", cid, port);
    return 0;
}
