/*
 * iscsi-pr: a small libiscsi client for persistent reservations, used by the end-to-end
 * tests (tests/tests/node_reservations.rs). libiscsi-bin ships no PR tool, so this one
 * speaks through libiscsi's own PERSISTENT RESERVE IN/OUT calls; the test compiles it with
 * `cc ... -liscsi` (Debian package libiscsi-dev).
 *
 * usage: iscsi-pr -i INITIATOR-NAME [-s ISID-QUALIFIER] URL COMMAND [ARGS]
 *   register KEY [all-tg-pt]   REGISTER AND IGNORE EXISTING KEY with service key KEY
 *   reserve KEY TYPE           RESERVE (scope LU) with the registered KEY, type 1..8
 *   release KEY TYPE           RELEASE
 *   read-keys                  prints "generation=G keys=K1,K2,..." (hex keys)
 *   read-reservation           prints "generation=G key=K type=T" or "generation=G none"
 *   write LBA                  WRITE(16) of one block of 0x5a, prints "status=NAME"
 *   rtpg                       REPORT TARGET PORT GROUPS: "group=ID state=S pref=P ports=..."
 *   bench-register N KEY       N REGISTER AND IGNORE EXISTING KEY (alternating KEY, KEY+1) in
 *                              one session, then unregisters: "registers=N us_per_register=U"
 * The ISID is fixed (format EN, enterprise 0x1234, qualifier from -s), so separate runs with
 * the same name and qualifier are the same initiator port, as a real initiator's sessions.
 * Unit attentions (power on, ALUA change, reservations preempted) are retried a few times.
 * PR OUT results print "status=NAME"; the exit code is 0 when the command ran at all.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <iscsi/iscsi.h>
#include <iscsi/scsi-lowlevel.h>

static const char *status_name(int status) {
    switch (status) {
    case SCSI_STATUS_GOOD: return "GOOD";
    case SCSI_STATUS_CHECK_CONDITION: return "CHECK_CONDITION";
    case SCSI_STATUS_RESERVATION_CONFLICT: return "RESERVATION_CONFLICT";
    case SCSI_STATUS_BUSY: return "BUSY";
    default: return "OTHER";
    }
}

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static uint64_t be64(const unsigned char *p) {
    return ((uint64_t)be32(p) << 32) | be32(p + 4);
}

/* A fresh task per attempt; unit attentions are retried. */
#define RETRY(expr)                                                                        \
    ({                                                                                     \
        struct scsi_task *t_ = NULL;                                                       \
        for (int a_ = 0; a_ < 8; a_++) {                                                   \
            t_ = (expr);                                                                   \
            if (t_ == NULL || t_->status != SCSI_STATUS_CHECK_CONDITION ||                 \
                t_->sense.key != SCSI_SENSE_UNIT_ATTENTION)                                \
                break;                                                                     \
            scsi_free_scsi_task(t_);                                                       \
            t_ = NULL;                                                                     \
        }                                                                                  \
        t_;                                                                                \
    })

static void print_status(struct scsi_task *task) {
    if (task->status == SCSI_STATUS_CHECK_CONDITION)
        printf("status=%s sense=%x/%04x\n", status_name(task->status), task->sense.key,
               task->sense.ascq);
    else
        printf("status=%s\n", status_name(task->status));
}

int main(int argc, char **argv) {
    const char *initiator = NULL;
    uint32_t qualifier = 1;
    int i = 1;
    for (; i + 1 < argc && argv[i][0] == '-'; i += 2) {
        if (strcmp(argv[i], "-i") == 0) initiator = argv[i + 1];
        else if (strcmp(argv[i], "-s") == 0) qualifier = (uint32_t)strtoul(argv[i + 1], NULL, 0);
        else break;
    }
    if (initiator == NULL || argc - i < 2) {
        fprintf(stderr, "usage: iscsi-pr -i INITIATOR [-s ISID-QUALIFIER] URL COMMAND [ARGS]\n");
        return 2;
    }
    const char *url_text = argv[i];
    const char *command = argv[i + 1];
    char **args = argv + i + 2;
    int nargs = argc - i - 2;

    struct iscsi_context *iscsi = iscsi_create_context(initiator);
    struct iscsi_url *url = iscsi_parse_full_url(iscsi, url_text);
    if (url == NULL) {
        fprintf(stderr, "bad URL %s: %s\n", url_text, iscsi_get_error(iscsi));
        return 2;
    }
    iscsi_set_isid_en(iscsi, 0x1234, qualifier);
    iscsi_set_session_type(iscsi, ISCSI_SESSION_NORMAL);
    iscsi_set_header_digest(iscsi, ISCSI_HEADER_DIGEST_NONE_CRC32C);
    iscsi_set_targetname(iscsi, url->target);
    if (iscsi_full_connect_sync(iscsi, url->portal, url->lun) != 0) {
        fprintf(stderr, "login to %s failed: %s\n", url->portal, iscsi_get_error(iscsi));
        return 1;
    }
    int lun = url->lun;
    struct scsi_task *task = NULL;

    if (strcmp(command, "register") == 0 && nargs >= 1) {
        struct scsi_persistent_reserve_out_basic params = {0};
        params.service_action_reservation_key = strtoull(args[0], NULL, 0);
        params.all_tg_pt = nargs >= 2 && strcmp(args[1], "all-tg-pt") == 0;
        task = RETRY(iscsi_persistent_reserve_out_sync(
            iscsi, lun, SCSI_PERSISTENT_RESERVE_REGISTER_AND_IGNORE_EXISTING_KEY,
            SCSI_PERSISTENT_RESERVE_SCOPE_LU, 0, &params));
        if (task) print_status(task);
    } else if ((strcmp(command, "reserve") == 0 || strcmp(command, "release") == 0) &&
               nargs >= 2) {
        struct scsi_persistent_reserve_out_basic params = {0};
        params.reservation_key = strtoull(args[0], NULL, 0);
        int type = atoi(args[1]);
        int sa = strcmp(command, "reserve") == 0 ? SCSI_PERSISTENT_RESERVE_RESERVE
                                                  : SCSI_PERSISTENT_RESERVE_RELEASE;
        task = RETRY(iscsi_persistent_reserve_out_sync(
            iscsi, lun, sa, SCSI_PERSISTENT_RESERVE_SCOPE_LU, type, &params));
        if (task) print_status(task);
    } else if (strcmp(command, "read-keys") == 0) {
        task = RETRY(iscsi_persistent_reserve_in_sync(
            iscsi, lun, SCSI_PERSISTENT_RESERVE_READ_KEYS, 8192));
        if (task && task->status == SCSI_STATUS_GOOD && task->datain.size >= 8) {
            unsigned char *d = task->datain.data;
            uint32_t length = be32(d + 4);
            printf("generation=%u keys=", be32(d));
            for (uint32_t at = 0; at + 8 <= length && 8 + at + 8 <= (uint32_t)task->datain.size;
                 at += 8)
                printf("%s0x%" PRIx64, at ? "," : "", be64(d + 8 + at));
            printf("\n");
        } else if (task) {
            print_status(task);
        }
    } else if (strcmp(command, "read-reservation") == 0) {
        task = RETRY(iscsi_persistent_reserve_in_sync(
            iscsi, lun, SCSI_PERSISTENT_RESERVE_READ_RESERVATION, 8192));
        if (task && task->status == SCSI_STATUS_GOOD && task->datain.size >= 8) {
            unsigned char *d = task->datain.data;
            if (be32(d + 4) >= 16 && task->datain.size >= 24)
                printf("generation=%u key=0x%" PRIx64 " type=%u\n", be32(d), be64(d + 8),
                       d[21] & 0xf);
            else
                printf("generation=%u none\n", be32(d));
        } else if (task) {
            print_status(task);
        }
    } else if (strcmp(command, "write") == 0 && nargs >= 1) {
        struct scsi_task *capacity = RETRY(iscsi_readcapacity16_sync(iscsi, lun));
        int block = 512;
        if (capacity && capacity->status == SCSI_STATUS_GOOD && capacity->datain.size >= 12)
            block = (int)be32(capacity->datain.data + 8);
        if (capacity) scsi_free_scsi_task(capacity);
        unsigned char *data = malloc((size_t)block);
        memset(data, 0x5a, (size_t)block);
        task = RETRY(iscsi_write16_sync(iscsi, lun, strtoull(args[0], NULL, 0), data,
                                        (uint32_t)block, block, 0, 0, 0, 0, 0));
        if (task) print_status(task);
        free(data);
    } else if (strcmp(command, "bench-register") == 0 && nargs >= 2) {
        int count = atoi(args[0]);
        uint64_t key = strtoull(args[1], NULL, 0);
        struct timespec start, end;
        clock_gettime(CLOCK_MONOTONIC, &start);
        for (int n = 0; n < count; n++) {
            struct scsi_persistent_reserve_out_basic params = {0};
            params.service_action_reservation_key = key + (uint64_t)(n & 1);
            struct scsi_task *t = RETRY(iscsi_persistent_reserve_out_sync(
                iscsi, lun, SCSI_PERSISTENT_RESERVE_REGISTER_AND_IGNORE_EXISTING_KEY,
                SCSI_PERSISTENT_RESERVE_SCOPE_LU, 0, &params));
            if (t == NULL || t->status != SCSI_STATUS_GOOD) {
                if (t) print_status(t);
                fprintf(stderr, "register %d failed\n", n);
                return 1;
            }
            scsi_free_scsi_task(t);
        }
        clock_gettime(CLOCK_MONOTONIC, &end);
        double us = (double)(end.tv_sec - start.tv_sec) * 1e6 +
                    (double)(end.tv_nsec - start.tv_nsec) / 1e3;
        struct scsi_persistent_reserve_out_basic params = {0};
        task = RETRY(iscsi_persistent_reserve_out_sync(
            iscsi, lun, SCSI_PERSISTENT_RESERVE_REGISTER_AND_IGNORE_EXISTING_KEY,
            SCSI_PERSISTENT_RESERVE_SCOPE_LU, 0, &params));
        printf("registers=%d us_per_register=%.0f\n", count, count > 0 ? us / count : 0.0);
    } else if (strcmp(command, "rtpg") == 0) {
        unsigned char cdb[12] = {0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0};
        struct scsi_task *raw = NULL;
        for (int a = 0; a < 8; a++) {
            raw = scsi_create_task(12, cdb, SCSI_XFER_READ, 4096);
            raw = iscsi_scsi_command_sync(iscsi, lun, raw, NULL);
            if (raw == NULL || raw->status != SCSI_STATUS_CHECK_CONDITION ||
                raw->sense.key != SCSI_SENSE_UNIT_ATTENTION)
                break;
            scsi_free_scsi_task(raw);
            raw = NULL;
        }
        task = raw;
        if (task && task->status == SCSI_STATUS_GOOD && task->datain.size >= 4) {
            unsigned char *d = task->datain.data;
            uint32_t end = 4 + be32(d);
            if (end > (uint32_t)task->datain.size) end = (uint32_t)task->datain.size;
            for (uint32_t at = 4; at + 8 <= end;) {
                unsigned char *g = d + at;
                int count = g[7];
                printf("group=%u state=%u pref=%u ports=", (g[2] << 8) | g[3], g[0] & 0xf,
                       g[0] >> 7);
                for (int p = 0; p < count && at + 8 + 4 * p + 4 <= end; p++)
                    printf("%s%u", p ? "," : "", (g[8 + 4 * p + 2] << 8) | g[8 + 4 * p + 3]);
                printf("\n");
                at += 8 + 4 * (uint32_t)count;
            }
        } else if (task) {
            print_status(task);
        }
    } else {
        fprintf(stderr, "unknown command %s\n", command);
        return 2;
    }
    if (task == NULL) {
        fprintf(stderr, "%s failed: %s\n", command, iscsi_get_error(iscsi));
        return 1;
    }
    scsi_free_scsi_task(task);
    iscsi_logout_sync(iscsi);
    iscsi_destroy_url(url);
    iscsi_destroy_context(iscsi);
    return 0;
}
