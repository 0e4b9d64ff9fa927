/* Latency of 128 KiB WRITE ATOMIC(16) against WRITE(16) and WRITE(16) with FUA through a real
 * iSCSI session (libiscsi). Built by bench/atomic-latency, which needs only libiscsi7 at run
 * time: the few libiscsi functions used are declared here, as libiscsi-dev is not installed.
 *   atomic-latency PORTAL TARGET_IQN LUN ROUNDS
 * Prints, per command, the median and 99th percentile in microseconds. Destructive: writes the
 * first 7 x 128 KiB of the LUN. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct iscsi_context;
struct scsi_task { int status; /* libiscsi's struct starts with the SCSI status */ };
struct iscsi_context *iscsi_create_context(const char *initiator_name);
int iscsi_set_targetname(struct iscsi_context *iscsi, const char *targetname);
int iscsi_set_session_type(struct iscsi_context *iscsi, int session_type);
int iscsi_full_connect_sync(struct iscsi_context *iscsi, const char *portal, int lun);
const char *iscsi_get_error(struct iscsi_context *iscsi);
struct scsi_task *iscsi_write16_sync(struct iscsi_context *iscsi, int lun, uint64_t lba,
    unsigned char *data, uint32_t datalen, int blocksize, int wrprotect, int dpo, int fua,
    int fua_nv, int group_number);
struct scsi_task *iscsi_writeatomic16_sync(struct iscsi_context *iscsi, int lun, uint64_t lba,
    unsigned char *data, uint32_t datalen, int blocksize, int wrprotect, int dpo, int fua,
    int group_number);
void scsi_free_scsi_task(struct scsi_task *task);
int iscsi_logout_sync(struct iscsi_context *iscsi);

#define SESSION_NORMAL 2
#define LENGTH (128 * 1024)
#define BLOCK 512

static int compare(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

static long now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000L + t.tv_nsec / 1000;
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s PORTAL TARGET_IQN LUN ROUNDS\n", argv[0]);
        return 2;
    }
    int lun = atoi(argv[3]), rounds = atoi(argv[4]);
    struct iscsi_context *iscsi = iscsi_create_context("iqn.2026-11.org.tandem:atomic-latency");
    iscsi_set_targetname(iscsi, argv[2]);
    iscsi_set_session_type(iscsi, SESSION_NORMAL);
    if (iscsi_full_connect_sync(iscsi, argv[1], lun) != 0) {
        fprintf(stderr, "login: %s\n", iscsi_get_error(iscsi));
        return 1;
    }
    static unsigned char data[LENGTH];
    memset(data, 0xa6, sizeof data);
    long *samples = calloc(rounds, sizeof *samples);
    const char *names[] = {"WRITE(16)", "WRITE(16) FUA", "WRITE ATOMIC(16)"};
    for (int kind = 0; kind < 3; kind++) {
        for (int round = 0; round < rounds; round++) {
            uint64_t lba = (uint64_t)(round % 7) * (LENGTH / BLOCK);
            long start = now_us();
            struct scsi_task *task = kind == 2
                ? iscsi_writeatomic16_sync(iscsi, lun, lba, data, LENGTH, BLOCK, 0, 0, 0, 0)
                : iscsi_write16_sync(iscsi, lun, lba, data, LENGTH, BLOCK, 0, 0, kind, 0, 0);
            samples[round] = now_us() - start;
            if (task == NULL || task->status != 0) {
                fprintf(stderr, "%s failed: %s\n", names[kind], iscsi_get_error(iscsi));
                return 1;
            }
            scsi_free_scsi_task(task);
        }
        qsort(samples, rounds, sizeof *samples, compare);
        printf("%s 128 KiB: median %ld us, p99 %ld us (%d commands)\n", names[kind],
               samples[rounds / 2], samples[rounds * 99 / 100], rounds);
    }
    iscsi_logout_sync(iscsi);
    return 0;
}
