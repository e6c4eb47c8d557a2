/*
 * A case's hot path in C: the vCPU reset between cases and the KVM_RUN loop
 * of kvmtest.runner.drive(), recorded for replay (docs/record.md).
 *
 * Under QEMU's TCG the guest agent's Python runs ~20x slower than on the
 * host, and most of a case's time was Python around a handful of ioctls.
 * kvmtest_case() runs one case with no Python (unless a stray signal asks
 * for its handler): it writes the case's memory (compiled by the host),
 * runs L1, and appends to a trace every exit as KVM reported it plus the
 * guest memory drive() reads at that moment; kvmtest_kmsg_drain() adds the
 * kernel log's bad records.
 * The host replays drive() itself over the trace (kvmtest/record.py), so the
 * verdict logic exists once, in Python.
 *
 * Included by build_kvm.py into the cffi extension; every structure comes
 * from <linux/kvm.h>.
 */

/* Trace records: [u32 tag][u32 length][length bytes], little endian. */
#define KVMTEST_REC_IO 1           /* u8 dir, u8 size, u16 port, u32 count, data */
#define KVMTEST_REC_HLT 2
#define KVMTEST_REC_MMIO 3         /* u64 phys, u32 len, u8 is_write, 3 pad, data */
#define KVMTEST_REC_SHUTDOWN 4
#define KVMTEST_REC_FAIL_ENTRY 5   /* u64 reason, u32 cpu */
#define KVMTEST_REC_INTERNAL 6     /* u32 suberror, u32 ndata, u64 data[ndata] */
#define KVMTEST_REC_SYSTEM_EVENT 7 /* u32 type, u32 ndata, u64 data[ndata] */
#define KVMTEST_REC_IRQ_WINDOW 8
#define KVMTEST_REC_DEBUG 9        /* u32 exception, u32 pad, u64 pc, dr6, dr7 */
#define KVMTEST_REC_UNKNOWN 10     /* u32 exit reason */
#define KVMTEST_REC_INTERRUPTED 11
#define KVMTEST_REC_TIMED_OUT 12
#define KVMTEST_REC_RUN_ERROR 13   /* u32 errno: KVM_RUN failed */
#define KVMTEST_REC_SNAP 20        /* u64 gpa, bytes of guest memory */
#define KVMTEST_REC_NESTED 21      /* u32 ok, u32 flags, u64 hdr.svm.vmcb_pa */
/* 22-24, the kernel log: with kvmtest_kmsg_drain() below. */

struct kvmtest_record_args {
    int vcpu_fd;
    uint8_t *run;                  /* the vCPU's mmapped struct kvm_run */
    uint64_t run_size;
    uint8_t *mem;                  /* memslot 0: GPA 0 .. mem_size */
    uint64_t mem_size;
    const uint8_t *writes;         /* [u64 gpa][u32 len][data]...: prepare_memory's */
    uint64_t writes_len;
    uint32_t max_exits;            /* runner.MAX_EXITS: KVM_RUNs, interruptions included */
    int signo;                     /* the deadline's signal (kvm/deadline.py) */
    double when;                   /* and its end, CLOCK_MONOTONIC seconds */
    uint32_t ucall_port;
    uint64_t ucall_args_gpa;
    uint32_t ucall_args_len;
    uint32_t cmd_sync, cmd_ping, cmd_assert;
    uint64_t result_gpa;           /* read at each SYNC, with the nested state */
    uint32_t result_len;
    uint32_t cstring_limit;        /* ucall.read_cstring's */
    const uint64_t *final_snaps;   /* (gpa, len) pairs read after the loop */
    uint32_t n_final;
    int final_nested;              /* nested state read after the loop too */
    uint8_t *nested_buf;           /* scratch for KVM_GET_NESTED_STATE */
    uint32_t nested_size;
    uint8_t *out;
    uint64_t out_cap;
    uint32_t at_ucall;             /* out: the last exit was a ucall (reusable vCPU) */
    int run_errno;                 /* out: KVM_RUN failed with it (the VM is not reused) */
    /* The loop's state, kept across a pause at a stray signal. */
    uint32_t done;                 /* KVM_RUNs so far */
    uint64_t len;                  /* trace bytes so far */
    int overflow;
};

struct kvmtest_trace {
    uint8_t *out;
    uint64_t len, cap;
    int overflow;
};

static uint8_t *kvmtest_rec(struct kvmtest_trace *t, uint32_t tag, uint64_t len)
{
    uint8_t *p;

    if (t->overflow || len > UINT32_MAX || t->cap - t->len < 8 + len) {
        t->overflow = 1;
        return NULL;
    }
    p = t->out + t->len;
    memcpy(p, &tag, 4);
    memcpy(p + 4, &len, 4);    /* little endian: x86 */
    t->len += 8 + len;
    return p + 8;
}

/* Guest memory at [gpa, gpa+len), as drive()'s read() would return it; a
 * range outside memslot 0 is not recorded (the replay's read() then fails
 * as KvmMachine.read() does). */
static void kvmtest_snap(struct kvmtest_trace *t, const struct kvmtest_record_args *a,
                         uint64_t gpa, uint64_t len)
{
    uint8_t *p;

    if (gpa > a->mem_size || len > a->mem_size - gpa)
        return;
    p = kvmtest_rec(t, KVMTEST_REC_SNAP, 8 + len);
    if (p) {
        memcpy(p, &gpa, 8);
        memcpy(p + 8, a->mem + gpa, len);
    }
}

static void kvmtest_nested(struct kvmtest_trace *t, const struct kvmtest_record_args *a)
{
    struct kvm_nested_state *st = (struct kvm_nested_state *)a->nested_buf;
    uint32_t ok, flags = 0;
    uint64_t vmcb_pa = 0;
    uint8_t *p;

    memset(a->nested_buf, 0, a->nested_size);
    st->size = a->nested_size;
    ok = ioctl(a->vcpu_fd, KVM_GET_NESTED_STATE, st) >= 0;
    if (ok) {
        flags = st->flags;
        memcpy(&vmcb_pa, a->nested_buf + offsetof(struct kvm_nested_state, hdr), 8);
    }
    p = kvmtest_rec(t, KVMTEST_REC_NESTED, 16);
    if (p) {
        memcpy(p, &ok, 4);
        memcpy(p + 4, &flags, 4);
        memcpy(p + 8, &vmcb_pa, 8);
    }
}

static void kvmtest_cstring(struct kvmtest_trace *t, const struct kvmtest_record_args *a,
                            uint64_t gpa)
{
    uint64_t n;

    if (gpa == 0 || gpa >= a->mem_size)
        return;
    n = a->mem_size - gpa;
    kvmtest_snap(t, a, gpa, n < a->cstring_limit ? n : a->cstring_limit);
}

static double kvmtest_now(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* EINTR or KVM_EXIT_INTR: the deadline's timer (TIMED_OUT) or a stray
 * signal (INTERRUPTED), decided by the clock as Deadline.interrupted() does. */
static int kvmtest_interrupted(const struct kvmtest_record_args *a)
{
    kvmtest_signal_consume(a->signo);
    return kvmtest_now() >= a->when ? KVMTEST_REC_TIMED_OUT : KVMTEST_REC_INTERRUPTED;
}

/* One exit as Vcpu.run() decodes it; returns its tag. */
static uint32_t kvmtest_exit(struct kvmtest_trace *t, const struct kvmtest_record_args *a,
                             int r, uint64_t *ucall_cmd, int *at_ucall)
{
    struct kvm_run *run = (struct kvm_run *)a->run;
    uint8_t *p;
    uint32_t tag, n;

    *at_ucall = 0;
    if (r < 0) {
        if (errno == EINTR) {
            tag = kvmtest_interrupted(a);
            kvmtest_rec(t, tag, 0);
            return tag;
        }
        n = errno;
        p = kvmtest_rec(t, KVMTEST_REC_RUN_ERROR, 4);
        if (p)
            memcpy(p, &n, 4);
        return KVMTEST_REC_RUN_ERROR;
    }
    switch (run->exit_reason) {
    case KVM_EXIT_IO: {
        uint64_t off = run->io.data_offset, len = (uint64_t)run->io.size * run->io.count;
        uint8_t head[8];

        /* Vcpu.run() slices the mapping: what lies past its end is not there. */
        if (off > a->run_size)
            len = 0;
        else if (len > a->run_size - off)
            len = a->run_size - off;
        head[0] = run->io.direction;
        head[1] = run->io.size;
        memcpy(head + 2, &run->io.port, 2);
        memcpy(head + 4, &run->io.count, 4);
        p = kvmtest_rec(t, KVMTEST_REC_IO, 8 + len);
        if (p) {
            memcpy(p, head, 8);
            memcpy(p + 8, a->run + off, len);
        }
        if (run->io.port == a->ucall_port) {
            /* IoExit.value: data[:size], little endian */
            uint64_t v = 0, k = run->io.size < len ? run->io.size : len;

            memcpy(&v, a->run + off, k > 8 ? 8 : k);
            *ucall_cmd = v;
            *at_ucall = 1;
        }
        return KVMTEST_REC_IO;
    }
    case KVM_EXIT_HLT:
        kvmtest_rec(t, KVMTEST_REC_HLT, 0);
        return KVMTEST_REC_HLT;
    case KVM_EXIT_MMIO:
        n = run->mmio.is_write ? (run->mmio.len < 8 ? run->mmio.len : 8) : 0;
        p = kvmtest_rec(t, KVMTEST_REC_MMIO, 16 + n);
        if (p) {
            memset(p, 0, 16);
            memcpy(p, &run->mmio.phys_addr, 8);
            memcpy(p + 8, &run->mmio.len, 4);
            p[12] = run->mmio.is_write;
            memcpy(p + 16, run->mmio.data, n);
        }
        return KVMTEST_REC_MMIO;
    case KVM_EXIT_SHUTDOWN:
        kvmtest_rec(t, KVMTEST_REC_SHUTDOWN, 0);
        return KVMTEST_REC_SHUTDOWN;
    case KVM_EXIT_FAIL_ENTRY:
        p = kvmtest_rec(t, KVMTEST_REC_FAIL_ENTRY, 12);
        if (p) {
            memcpy(p, &run->fail_entry.hardware_entry_failure_reason, 8);
            memcpy(p + 8, &run->fail_entry.cpu, 4);
        }
        return KVMTEST_REC_FAIL_ENTRY;
    case KVM_EXIT_INTERNAL_ERROR:
        n = run->internal.ndata < 16 ? run->internal.ndata : 16;
        p = kvmtest_rec(t, KVMTEST_REC_INTERNAL, 8 + 8 * n);
        if (p) {
            memcpy(p, &run->internal.suberror, 4);
            memcpy(p + 4, &n, 4);
            memcpy(p + 8, run->internal.data, 8 * n);
        }
        return KVMTEST_REC_INTERNAL;
    case KVM_EXIT_SYSTEM_EVENT:
        n = run->system_event.ndata < 16 ? run->system_event.ndata : 16;
        p = kvmtest_rec(t, KVMTEST_REC_SYSTEM_EVENT, 8 + 8 * n);
        if (p) {
            memcpy(p, &run->system_event.type, 4);
            memcpy(p + 4, &n, 4);
            memcpy(p + 8, run->system_event.data, 8 * n);
        }
        return KVMTEST_REC_SYSTEM_EVENT;
    case KVM_EXIT_IRQ_WINDOW_OPEN:
        kvmtest_rec(t, KVMTEST_REC_IRQ_WINDOW, 0);
        return KVMTEST_REC_IRQ_WINDOW;
    case KVM_EXIT_DEBUG:
        p = kvmtest_rec(t, KVMTEST_REC_DEBUG, 32);
        if (p) {
            memset(p, 0, 8);
            memcpy(p, &run->debug.arch.exception, 4);
            memcpy(p + 8, &run->debug.arch.pc, 8);
            memcpy(p + 16, &run->debug.arch.dr6, 8);
            memcpy(p + 24, &run->debug.arch.dr7, 8);
        }
        return KVMTEST_REC_DEBUG;
    case KVM_EXIT_INTR:
        tag = kvmtest_interrupted(a);
        kvmtest_rec(t, tag, 0);
        return tag;
    default:
        p = kvmtest_rec(t, KVMTEST_REC_UNKNOWN, 4);
        if (p)
            memcpy(p, &run->exit_reason, 4);
        return KVMTEST_REC_UNKNOWN;
    }
}

/* Write the case's memory and start its trace: 0, or -EINVAL (a write
 * outside memslot 0: nothing ran). */
static int kvmtest_record_begin(struct kvmtest_record_args *a)
{
    uint64_t pos = 0, gpa;
    uint32_t len;

    while (pos < a->writes_len) {
        if (a->writes_len - pos < 12)
            return -EINVAL;
        memcpy(&gpa, a->writes + pos, 8);
        memcpy(&len, a->writes + pos + 8, 4);
        pos += 12;
        if (len > a->writes_len - pos || gpa > a->mem_size || len > a->mem_size - gpa)
            return -EINVAL;
        memcpy(a->mem + gpa, a->writes + pos, len);
        pos += len;
    }
    a->done = 0;
    a->len = 0;
    a->overflow = 0;
    a->at_ucall = 0;
    a->run_errno = 0;
    return 0;
}

#define KVMTEST_PAUSED 1   /* kvmtest_record_loop(): a stray signal, resume later */

/* KVM_RUN until drive() would stop, recording (resumable: it returns
 * KVMTEST_PAUSED after a stray signal's INTERRUPTED record, so that Python
 * runs the signal's handler as drive()'s loop would, then goes on).
 * Returns 0 at the end (the trace's length is a->len), or -EINVAL. */
static int kvmtest_record_loop(struct kvmtest_record_args *a)
{
    struct kvmtest_trace t = {a->out, a->len, a->out_cap, a->overflow};
    uint64_t cmd = 0;
    uint32_t tag;
    int at_ucall = 0, r, err;

    while (a->done < a->max_exits) {
        /* A deadline that expired at an interruption ends the loop there. */
        r = ioctl(a->vcpu_fd, KVM_RUN, 0);
        err = r < 0 ? errno : 0;
        a->done++;
        tag = kvmtest_exit(&t, a, r, &cmd, &at_ucall);
        if (tag == KVMTEST_REC_INTERRUPTED) {
            /* a stray signal, not the guest: drive() goes on after it */
            a->len = t.len;
            a->overflow = t.overflow;
            return KVMTEST_PAUSED;
        }
        if (tag == KVMTEST_REC_RUN_ERROR)
            a->run_errno = err;
        if (!at_ucall)
            break;          /* any other exit ends the case */
        if (a->ucall_args_gpa > a->mem_size || a->ucall_args_len > a->mem_size - a->ucall_args_gpa)
            return -EINVAL;
        kvmtest_snap(&t, a, a->ucall_args_gpa, a->ucall_args_len);
        if (cmd == a->cmd_sync) {
            kvmtest_snap(&t, a, a->result_gpa, a->result_len);
            kvmtest_nested(&t, a);
            continue;
        }
        if (cmd == a->cmd_ping)
            continue;
        if (cmd == a->cmd_assert && a->ucall_args_len >= 24) {
            uint64_t msg, file;

            /* the args were just recorded: they lie inside memslot 0 */
            memcpy(&msg, a->mem + a->ucall_args_gpa + 8, 8);
            memcpy(&file, a->mem + a->ucall_args_gpa + 16, 8);
            kvmtest_cstring(&t, a, msg);
            kvmtest_cstring(&t, a, file);
        }
        break;              /* DONE, EXCEPTION, ASSERT or unknown: the end */
    }
    a->at_ucall = at_ucall;
    for (uint32_t i = 0; i < a->n_final; i++)
        kvmtest_snap(&t, a, a->final_snaps[2 * i], a->final_snaps[2 * i + 1]);
    if (a->final_nested)
        kvmtest_nested(&t, a);
    a->len = t.len;
    a->overflow = t.overflow;
    return 0;
}

struct kvmtest_reset_args {
    int vcpu_fd;
    uint8_t *nested_buf;           /* NULL: KVM has no nested state */
    uint32_t nested_size;
    uint32_t gif_set;              /* KVM_STATE_NESTED_GIF_SET */
    uint8_t *gif_state;            /* KVM_SET_NESTED_STATE: SVM format, GIF_SET only */
    uint8_t *mem;
    const uint8_t *low;            /* [0, low_len) as L1 starts */
    uint64_t low_len;
    uint64_t code_gpa;
    uint64_t clear_len;            /* in/out: the last payload's code, wiped */
    const uint8_t *image;
    uint64_t image_len;
    void *sregs, *regs, *msrs, *events;
    uint32_t nmsrs;
};

/* KvmMachine.reset() after its deadline ended, in one call.  Returns 0, or
 * -errno with *step naming the ioctl that failed (0 GET_NESTED_STATE,
 * 1 SET_NESTED_STATE, 2 SET_SREGS, 3 SET_REGS, 4 SET_MSRS, 5 SET_VCPU_EVENTS). */
static int kvmtest_reset(struct kvmtest_reset_args *a, int *step)
{
    int r;

    if (a->nested_buf) {
        struct kvm_nested_state *st = (struct kvm_nested_state *)a->nested_buf;

        memset(a->nested_buf, 0, a->nested_size);
        st->size = a->nested_size;
        *step = 0;
        if (ioctl(a->vcpu_fd, KVM_GET_NESTED_STATE, st) < 0)
            return -errno;
        *step = 1;
        if (st->flags != a->gif_set && ioctl(a->vcpu_fd, KVM_SET_NESTED_STATE, a->gif_state) < 0)
            return -errno;
    }
    memcpy(a->mem, a->low, a->low_len);
    memset(a->mem + a->code_gpa, 0, a->clear_len);
    memcpy(a->mem + a->code_gpa, a->image, a->image_len);
    a->clear_len = a->image_len;   /* what the next reset wipes */
    *step = 2;
    if (ioctl(a->vcpu_fd, KVM_SET_SREGS, a->sregs) < 0)
        return -errno;
    *step = 3;
    if (ioctl(a->vcpu_fd, KVM_SET_REGS, a->regs) < 0)
        return -errno;
    *step = 4;
    r = ioctl(a->vcpu_fd, KVM_SET_MSRS, a->msrs);
    if (r < 0)
        return -errno;
    if ((uint32_t)r < a->nmsrs)
        return -EINVAL;
    *step = 5;
    if (ioctl(a->vcpu_fd, KVM_SET_VCPU_EVENTS, a->events) < 0)
        return -errno;
    return 0;
}

#define KVMTEST_REC_KMSG 22        /* a kernel-log record with a bad word: its bytes */
#define KVMTEST_REC_KMSG_READ 23   /* the kernel log was read around the case */
#define KVMTEST_REC_KMSG_DROPPED 24 /* u32: bad records past kmsg.KEEP_*, not kept */

struct kvmtest_case_args {
    struct kvmtest_reset_args *reset;  /* NULL: a fresh vCPU, nothing to reset */
    struct kvmtest_record_args *rec;
    void *timer;                   /* the vCPU thread's deadline timer (kvm/deadline.py) */
    double timeout;                /* seconds: the deadline's end, as Deadline's `when` */
    long long timeout_ns;          /* the timer's, as Timer.arm() computes it (>= 1) */
    uint64_t kvm_sigmask;          /* in/out: the vCPU's KVM_SET_SIGNAL_MASK */
    int failed_step;               /* out: the reset's ioctl that failed */
    int paused;                    /* out: stopped at a stray signal; resume or end */
    uint64_t old_mask;             /* the thread's signal mask before the case */
};

/* The deadline ended as Deadline ends it: timer disarmed, its signal
 * consumed, the thread's mask as before.  Returns N. */
static long long kvmtest_case_end(struct kvmtest_case_args *c, long long n)
{
    int signo = c->rec->signo;

    c->paused = 0;
    kvmtest_timer_arm(c->timer, 0);
    kvmtest_signal_consume(signo);
    if (!(c->old_mask & (1ULL << (signo - 1))))
        kvmtest_unblock_signal(signo);
    return n;
}

/* Go on after a pause (c->paused): the rest of kvmtest_case(). */
static long long kvmtest_case_resume(struct kvmtest_case_args *c)
{
    struct kvmtest_record_args *a = c->rec;
    int r = kvmtest_record_loop(a);

    if (r == KVMTEST_PAUSED) {
        c->paused = 1;      /* the deadline stays armed, its signal blocked */
        return 0;
    }
    return kvmtest_case_end(c, r < 0 ? r : a->overflow ? -ENOSPC : (long long)a->len);
}

/* One recorded case as runner.run_case() runs it through Python: the
 * vCPU reset (unless fresh), the deadline armed (Deadline), the case's
 * memory written, KVM_RUN until drive() would stop, the deadline ended.
 * Returns the trace's length, or -errno: a failed reset (failed_step >= 0,
 * nothing ran), -EINVAL (a write outside memslot 0: nothing ran) or -ENOSPC
 * (the trace did not fit: the case ran, its trace is lost).  With
 * c->paused set, a stray signal stopped KVM_RUN: the caller lets Python run
 * its handler, then calls kvmtest_case_resume() (or kvmtest_case_end()). */
static long long kvmtest_case(struct kvmtest_case_args *c)
{
    struct kvmtest_record_args *a = c->rec;
    uint64_t mask, bit = 1ULL << (a->signo - 1);
    int r;

    c->failed_step = -1;
    c->paused = 0;
    if (c->reset) {
        r = kvmtest_reset(c->reset, &c->failed_step);
        if (r < 0)
            return r;
        c->failed_step = -1;
    }
    r = kvmtest_block_signal(a->signo, &c->old_mask);
    if (r < 0)
        return r;
    mask = c->old_mask & ~bit;
    if (mask != c->kvm_sigmask) {
        char buf[sizeof(struct kvm_signal_mask) + 8];
        struct kvm_signal_mask *m = (struct kvm_signal_mask *)buf;

        m->len = 8;
        memcpy(m->sigset, &mask, 8);
        if (ioctl(a->vcpu_fd, KVM_SET_SIGNAL_MASK, m) < 0)
            return kvmtest_case_end(c, -errno);
        c->kvm_sigmask = mask;
    }
    a->when = kvmtest_now() + c->timeout;
    r = kvmtest_timer_arm(c->timer, c->timeout_ns);
    if (r < 0)
        return kvmtest_case_end(c, r);
    r = kvmtest_record_begin(a);
    if (r < 0)
        return kvmtest_case_end(c, r);
    return kvmtest_case_resume(c);
}

/* Does the message of /dev/kmsg record REC (after its first ';') hold a word? */
static int kvmtest_bad(const char *rec, size_t n, const char *words)
{
    const char *semi = memchr(rec, ';', n);
    const char *w;

    if (semi) {
        n -= semi + 1 - rec;
        rec = semi + 1;
    }
    for (w = words; *w; w += strlen(w) + 1)
        if (memmem(rec, n, w, strlen(w)))
            return 1;
    return 0;
}

struct kvmtest_kmsg_args {
    int fd;                        /* /dev/kmsg, positioned where the case began */
    const char *words;             /* kmsg.BAD_WORDS: each NUL-terminated, then "" */
    uint32_t keep_lines;           /* kmsg.KEEP_LINES */
    uint32_t keep_bytes;           /* kmsg.KEEP_BYTES */
    uint8_t *out;
    uint64_t out_cap;
};

/* The new kernel-log records that hold a bad word, as Kmsg.watch() keeps
 * them (kmsg.keep): KMSG_READ, the first ones within keep_lines and
 * keep_bytes, then how many more there were.  Returns the bytes written,
 * or -ENOSPC. */
static long long kvmtest_kmsg_drain(struct kvmtest_kmsg_args *k)
{
    struct kvmtest_trace t = {k->out, 0, k->out_cap, 0};
    char buf[8192];    /* kmsg.RECORD_MAX */
    uint32_t lines = 0, dropped = 0;
    uint64_t bytes = 0;
    uint8_t *p;

    kvmtest_rec(&t, KVMTEST_REC_KMSG_READ, 0);
    for (;;) {
        ssize_t r = read(k->fd, buf, sizeof(buf));

        if (r < 0 && (errno == EPIPE || errno == EINTR))
            continue;  /* records overwritten while we read (or a signal): go on */
        if (r <= 0)
            break;     /* EAGAIN: nothing more */
        if (!kvmtest_bad(buf, r, k->words))
            continue;
        if (dropped || lines == k->keep_lines || bytes + r > k->keep_bytes) {
            dropped++;
            continue;
        }
        p = kvmtest_rec(&t, KVMTEST_REC_KMSG, r);
        if (p)
            memcpy(p, buf, r);
        lines++;
        bytes += r;
    }
    if (dropped) {
        p = kvmtest_rec(&t, KVMTEST_REC_KMSG_DROPPED, 4);
        if (p)
            memcpy(p, &dropped, 4);
    }
    return t.overflow ? -ENOSPC : (long long)t.len;
}
