/* The per-VM part of the aggregator's report checks (server/ingest/validate.py), read straight from a
 * HostReport's wire bytes: the estimates' rules and sums, the host-level estimate and each VM's
 * smaps_read_cost_seconds.
 *
 * Why C: those checks read every field of every VM's estimate, and from Python each sub-message
 * access (an estimate, a breakdown share, a VM) creates and frees a wrapper object. For a 20-VM report
 * that was 50-110 us, more than the whole gRPC stack's cost per report when a backlog arrives 50 reports
 * per message (docs/benchmarks.md). Here it is a few microseconds.
 *
 * Bounds (validate.py's MAX_HUGE_2M, MAX_GUEST_RAM_BYTES) come in as arguments, so that there is one
 * definition: a VM's guest_ram_bytes is at most the guest-RAM bound; an estimate's 2 MiB counts
 * (capacity, observed, allowed, lost, each breakdown share) are at most the 2 MiB bound and its
 * capacity at most ceil(guest RAM / 2 MiB) of the VM(s) carrying its vm_id (of all VMs for the
 * host-level estimate), where that RAM is known. An IMPLAUSIBLE estimate without a loss figure is
 * exempt: it is the agent's report of readings that contradict each other, and counts in no sum.
 *
 * check() also does the report-level checks (identity, sequence, sample time, labels, kernel era, VM
 * counts) before the walk, so that a valid report costs check_report one call and no protobuf field
 * access from Python (about 8.6 -> 6.6 us per 20-VM report, measured in isolation).
 *
 * Contract: the result is exactly what validate.check_report's Python walk returns for a valid
 * report, or None. None means "decide in Python": every invalid report (so that the reason is worded
 * once, in Python), and any wire encoding this walker does not model (a field with an unexpected wire
 * type, a repeated singular message, a group, a sum past 64 bits). The protobuf runtime has already
 * parsed the same bytes, so None is rare in practice and never wrong. tests/test_validate.py checks
 * both against each other on generated reports and on re-encoded wire variants.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Field numbers from proto/eptwatch/v1/report.proto. */
enum {
    VM_SAMPLE_VM_ID = 1,
    VM_SAMPLE_GUEST_RAM_BYTES = 10,
    ESTIMATE_VM_ID = 1,
    HOST_REPORT_VMS = 9,
    HOST_REPORT_ESTIMATES = 10,
    HOST_REPORT_HOST_ESTIMATE = 12,
    VM_SAMPLE_SMAPS_READ_COST_SECONDS = 9,
    ESTIMATE_CAPACITY = 2,
    ESTIMATE_OBSERVED = 3,
    ESTIMATE_ALLOWED = 4,
    ESTIMATE_LOST = 5,
    ESTIMATE_LOST_RATIO = 6,
    ESTIMATE_CAUSE = 7,
    ESTIMATE_BREAKDOWN = 8,
    SHARE_CAUSE = 1,
    SHARE_LOST = 2,
    HOST_REPORT_HOST_ID = 1,
    HOST_REPORT_LABELS = 2,
    HOST_REPORT_AGENT_INSTANCE = 4,
    HOST_REPORT_SEQUENCE = 5,
    HOST_REPORT_SAMPLE_TIME = 6,
    HOST_REPORT_KERNEL = 7,
    MAP_ENTRY_KEY = 1,
    MAP_ENTRY_VALUE = 2,
    TIMESTAMP_SECONDS = 1,
    TIMESTAMP_NANOS = 2,
    KERNEL_ERA = 4,
};

enum { WT_VARINT = 0, WT_FIXED64 = 1, WT_LEN = 2, WT_FIXED32 = 5 };

#define MAX_CAUSE 64 /* causes are known through a 64-bit mask */

typedef struct {
    uint64_t known;     /* bit c: cause c is a known Cause value */
    uint64_t explained; /* bit c: cause c counts as explained */
    int32_t unexplained;
    int32_t implausible;
    uint64_t max_huge_2m;        /* any 2 MiB count */
    uint64_t max_guest_ram_bytes; /* a VM's guest_ram_bytes */
} Causes;

#define TWO_MIB_SHIFT 21

/* A vm_id and the capacity bound of the VMs carrying it (ceil(guest RAM / 2 MiB)); unknown where
 * any of them has no guest RAM figure (0). */
typedef struct {
    const uint8_t *id;
    size_t len;
    uint64_t limit;
    int unknown;
} VmLimit;

typedef struct {
    VmLimit *items;
    size_t n, cap;
    uint64_t host_limit; /* sum of every VM's limit: the host-level estimate's bound */
    int host_unknown;    /* no VMs, or one without guest RAM: the host-level estimate has no such bound */
} Limits;

typedef struct {
    uint64_t n, estimated, cap, obs, lost, explained, unexplained;
} Sums;

/* 0 on success; -1 for anything this walker does not handle (the caller answers None). */
static int
read_varint(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    const uint8_t *p = *pp;
    uint64_t value = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (p >= end)
            return -1;
        uint8_t b = *p++;
        value |= (uint64_t)(b & 0x7F) << (shift < 64 ? shift : 63);
        if (b < 0x80) {
            *pp = p;
            *out = value;
            return 0;
        }
    }
    return -1;
}

static int
read_fixed64(const uint8_t **pp, const uint8_t *end, uint64_t *out)
{
    const uint8_t *p = *pp;
    if (end - p < 8)
        return -1;
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i]; /* little-endian on the wire, whatever the host */
    *out = v;
    *pp = p + 8;
    return 0;
}

static double
as_double(uint64_t bits)
{
    double d;
    memcpy(&d, &bits, sizeof d);
    return d;
}

static int
read_len(const uint8_t **pp, const uint8_t *end, const uint8_t **sub_end)
{
    uint64_t len;
    if (read_varint(pp, end, &len) < 0 || len > (uint64_t)(end - *pp))
        return -1;
    *sub_end = *pp + len;
    return 0;
}

static int
skip_field(const uint8_t **pp, const uint8_t *end, int wire_type)
{
    uint64_t ignored;
    const uint8_t *sub_end;
    switch (wire_type) {
    case WT_VARINT:
        return read_varint(pp, end, &ignored);
    case WT_FIXED64:
        return read_fixed64(pp, end, &ignored);
    case WT_LEN:
        if (read_len(pp, end, &sub_end) < 0)
            return -1;
        *pp = sub_end;
        return 0;
    case WT_FIXED32:
        if (end - *pp < 4)
            return -1;
        *pp += 4;
        return 0;
    default: /* groups and invalid wire types */
        return -1;
    }
}

static int
read_key(const uint8_t **pp, const uint8_t *end, uint32_t *field, int *wire_type)
{
    uint64_t key;
    if (read_varint(pp, end, &key) < 0 || key >> 3 == 0 || key >> 3 > 536870911u)
        return -1;
    *field = (uint32_t)(key >> 3);
    *wire_type = (int)(key & 7);
    return 0;
}

static int
is_known(const Causes *c, int32_t cause)
{
    return cause >= 0 && cause < MAX_CAUSE && (c->known >> cause) & 1;
}

static int
add(uint64_t *sum, uint64_t v)
{
    return __builtin_add_overflow(*sum, v, sum) ? -1 : 0;
}

/* One LossShare: adds to the estimate's explained/unexplained/total. */
static int
walk_share(const uint8_t *p, const uint8_t *end, const Causes *c, uint64_t *explained, uint64_t *unexplained,
           uint64_t *total, uint64_t *max_share)
{
    int32_t cause = 0;
    uint64_t lost = 0, v;
    while (p < end) {
        uint32_t field;
        int wt;
        if (read_key(&p, end, &field, &wt) < 0)
            return -1;
        if (field == SHARE_CAUSE || field == SHARE_LOST) {
            if (wt != WT_VARINT || read_varint(&p, end, &v) < 0)
                return -1;
            if (field == SHARE_CAUSE)
                cause = (int32_t)(uint32_t)v; /* enums are int32 on the wire's low 32 bits */
            else
                lost = v;
        } else if (skip_field(&p, end, wt) < 0) {
            return -1;
        }
    }
    if (lost > *max_share)
        *max_share = lost;
    if (cause >= 0 && cause < MAX_CAUSE && (c->explained >> cause) & 1) {
        if (add(explained, lost) < 0)
            return -1;
    } else if (cause == c->unexplained) {
        if (add(unexplained, lost) < 0)
            return -1;
    } else if (!is_known(c, cause)) {
        return -1;
    }
    return add(total, lost);
}

/* One VmEstimate, with validate._walk's rules; counts its cause into `counts` when given. */
static int
cmp_id(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
    int r = memcmp(a, b, alen < blen ? alen : blen);
    return r != 0 ? r : (alen > blen) - (alen < blen);
}

static int
cmp_limit(const void *a, const void *b)
{
    const VmLimit *x = a, *y = b;
    return cmp_id(x->id, x->len, y->id, y->len);
}

/* The bound for an estimate's vm_id: 0 and *bounded = 1 where known. */
static void
find_limit(const Limits *l, const uint8_t *id, size_t len, uint64_t *limit, int *bounded)
{
    size_t lo = 0, hi = l->n;
    *bounded = 0;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int r = cmp_id(l->items[mid].id, l->items[mid].len, id, len);
        if (r == 0) {
            *bounded = !l->items[mid].unknown;
            *limit = l->items[mid].limit;
            return;
        }
        if (r < 0)
            lo = mid + 1;
        else
            hi = mid;
    }
}

/* One VmEstimate, with validate._walk's rules; counts its cause into `counts` when given. `limits`:
 * look its vm_id up there; NULL: the host-level estimate, bounded by every VM's RAM together. */
static int
walk_estimate(const uint8_t *p, const uint8_t *end, const Causes *c, Sums *s, uint64_t *counts, const Limits *limits,
              const Limits *host)
{
    int32_t cause = 0;
    uint64_t cap = 0, obs = 0, allowed = 0, lost = 0, bits = 0, v;
    int has_cap = 0, has_obs = 0, has_lost = 0, has_ratio = 0;
    uint64_t explained = 0, unexplained = 0, total = 0, max_share = 0;
    const uint8_t *id = (const uint8_t *)"";
    size_t id_len = 0;
    while (p < end) {
        uint32_t field;
        int wt;
        const uint8_t *sub_end;
        if (read_key(&p, end, &field, &wt) < 0)
            return -1;
        switch (field) {
        case ESTIMATE_VM_ID:
            if (wt != WT_LEN || read_len(&p, end, &sub_end) < 0)
                return -1;
            id = p, id_len = (size_t)(sub_end - p); /* a repeated string: the last one wins */
            p = sub_end;
            break;
        case ESTIMATE_CAPACITY:
        case ESTIMATE_OBSERVED:
        case ESTIMATE_ALLOWED:
        case ESTIMATE_LOST:
        case ESTIMATE_CAUSE:
            if (wt != WT_VARINT || read_varint(&p, end, &v) < 0)
                return -1;
            if (field == ESTIMATE_CAPACITY)
                cap = v, has_cap = 1;
            else if (field == ESTIMATE_OBSERVED)
                obs = v, has_obs = 1;
            else if (field == ESTIMATE_ALLOWED)
                allowed = v;
            else if (field == ESTIMATE_LOST)
                lost = v, has_lost = 1;
            else
                cause = (int32_t)(uint32_t)v;
            break;
        case ESTIMATE_LOST_RATIO:
            if (wt != WT_FIXED64 || read_fixed64(&p, end, &bits) < 0)
                return -1;
            has_ratio = 1;
            break;
        case ESTIMATE_BREAKDOWN:
            if (wt != WT_LEN || read_len(&p, end, &sub_end) < 0 ||
                walk_share(p, sub_end, c, &explained, &unexplained, &total, &max_share) < 0)
                return -1;
            p = sub_end;
            break;
        default:
            if (skip_field(&p, end, wt) < 0)
                return -1;
        }
    }
    if (!is_known(c, cause))
        return -1;
    s->n++;
    if (counts != NULL)
        counts[cause]++;
    if (has_ratio) {
        double ratio = as_double(bits);
        if (!(ratio >= 0.0 && ratio <= 1.0) || !has_lost) /* NaN fails the first test */
            return -1;
    }
    if (allowed > cap && (cap != 0 || has_cap))
        return -1;
    if (cause != c->implausible || has_lost) {
        uint64_t m = c->max_huge_2m, limit = 0;
        int bounded;
        if (cap > m || obs > m || allowed > m || lost > m || max_share > m)
            return -1;
        if (limits != NULL)
            find_limit(limits, id, id_len, &limit, &bounded);
        else
            bounded = !host->host_unknown, limit = host->host_limit;
        if (bounded && cap > limit)
            return -1;
    }
    if (!has_lost)
        return 0;
    if (!has_cap || !has_obs)
        return -1;
    if (lost != (cap > obs ? cap - obs : 0) || total != lost)
        return -1;
    s->estimated++;
    if (add(&s->cap, cap) < 0 || add(&s->obs, obs) < 0 || add(&s->lost, lost) < 0 ||
        add(&s->explained, explained) < 0 || add(&s->unexplained, unexplained) < 0)
        return -1;
    return 0;
}

/* One VmSample: smaps_read_cost_seconds is checked (finite and >= 0) and guest_ram_bytes (within the
 * bound); its vm_id and capacity bound go into `out`. */
static int
walk_vm(const uint8_t *p, const uint8_t *end, const Causes *c, VmLimit *out)
{
    uint64_t bits = 0, ram = 0;
    const uint8_t *sub_end;
    out->id = (const uint8_t *)"";
    out->len = 0;
    while (p < end) {
        uint32_t field;
        int wt;
        if (read_key(&p, end, &field, &wt) < 0)
            return -1;
        if (field == VM_SAMPLE_SMAPS_READ_COST_SECONDS) {
            if (wt != WT_FIXED64 || read_fixed64(&p, end, &bits) < 0)
                return -1;
        } else if (field == VM_SAMPLE_GUEST_RAM_BYTES) {
            if (wt != WT_VARINT || read_varint(&p, end, &ram) < 0)
                return -1;
        } else if (field == VM_SAMPLE_VM_ID) {
            if (wt != WT_LEN || read_len(&p, end, &sub_end) < 0)
                return -1;
            out->id = p, out->len = (size_t)(sub_end - p);
            p = sub_end;
        } else if (skip_field(&p, end, wt) < 0) {
            return -1;
        }
    }
    double cost = as_double(bits);
    if (!(cost >= 0.0 && cost <= 1.7976931348623157e308)) /* rejects NaN, inf, negatives */
        return -1;
    if (ram > c->max_guest_ram_bytes)
        return -1;
    out->unknown = ram == 0;
    out->limit = (ram + ((UINT64_C(1) << TWO_MIB_SHIFT) - 1)) >> TWO_MIB_SHIFT; /* ram <= 2^52: no overflow */
    return 0;
}

/* First pass: every VmSample, into `l` (sorted by vm_id, duplicates merged). */
static int
collect_vms(const uint8_t *p, const uint8_t *end, const Causes *c, Limits *l)
{
    l->host_limit = 0;
    l->host_unknown = 1;
    while (p < end) {
        uint32_t field;
        int wt;
        const uint8_t *sub_end;
        if (read_key(&p, end, &field, &wt) < 0)
            return -1;
        if (field != HOST_REPORT_VMS) {
            if (skip_field(&p, end, wt) < 0)
                return -1;
            continue;
        }
        if (wt != WT_LEN || read_len(&p, end, &sub_end) < 0)
            return -1;
        if (l->n == l->cap) {
            size_t cap = l->cap ? 2 * l->cap : 32;
            VmLimit *grown = PyMem_Realloc(l->items, cap * sizeof *grown);
            if (grown == NULL)
                return -1;
            l->items = grown, l->cap = cap;
        }
        VmLimit *vm = &l->items[l->n];
        if (walk_vm(p, sub_end, c, vm) < 0)
            return -1;
        if (l->n == 0)
            l->host_unknown = 0;
        l->host_unknown |= vm->unknown;
        l->host_limit += vm->limit; /* each <= 2^31, and the caller allows at most 4096 VMs */
        l->n++;
        p = sub_end;
    }
    if (l->n > 1) {
        qsort(l->items, l->n, sizeof *l->items, cmp_limit);
        size_t k = 0;
        for (size_t i = 1; i < l->n; i++) {
            VmLimit *last = &l->items[k];
            if (cmp_limit(last, &l->items[i]) == 0) {
                last->unknown |= l->items[i].unknown;
                if (l->items[i].limit > last->limit)
                    last->limit = l->items[i].limit;
            } else {
                l->items[++k] = l->items[i];
            }
        }
        l->n = k + 1;
    }
    return 0;
}

/* 0: valid, totals in *out; -1: let Python decide. */
static int
walk_report(const uint8_t *p, const uint8_t *end, const Causes *c, Sums *vms_sums, Sums *host, int *has_host,
            uint64_t *counts, Limits *limits)
{
    if (collect_vms(p, end, c, limits) < 0)
        return -1;
    while (p < end) {
        uint32_t field;
        int wt;
        const uint8_t *sub_end;
        if (read_key(&p, end, &field, &wt) < 0)
            return -1;
        if (field == HOST_REPORT_VMS || field == HOST_REPORT_ESTIMATES || field == HOST_REPORT_HOST_ESTIMATE) {
            if (wt != WT_LEN || read_len(&p, end, &sub_end) < 0)
                return -1;
            int rc;
            if (field == HOST_REPORT_VMS) {
                rc = 0; /* walked by collect_vms */
            } else if (field == HOST_REPORT_ESTIMATES) {
                rc = walk_estimate(p, sub_end, c, vms_sums, counts, limits, limits);
            } else {
                if (*has_host) /* a repeated singular message merges: not modelled here */
                    return -1;
                *has_host = 1;
                rc = walk_estimate(p, sub_end, c, host, NULL, NULL, limits);
            }
            if (rc < 0)
                return -1;
            p = sub_end;
        } else if (skip_field(&p, end, wt) < 0) {
            return -1;
        }
    }
    return 0;
}

/* The report-level checks of validate.check_report (identity, sequence, sample time, labels, kernel era,
 * how many VMs and estimates), read from the same bytes. 0: every one of them passes; -1: let Python
 * decide (any failure, so that the reason is worded once, in Python, and anything not modelled: a
 * singular field or message that appears more than once, an unexpected wire type). Lengths in
 * characters are counted as Python's len() counts them: code points, i.e. the bytes that do not
 * continue a UTF-8 sequence (the protobuf runtime has already refused invalid UTF-8 in these strings). */
typedef struct {
    double now, max_future_seconds, min_sample_time;
    uint64_t known_eras; /* bit e: PredicateEra e is known */
    uint64_t max_labels, max_label_chars, max_vms, max_instance_chars, max_sequence;
} Header;

static uint64_t
utf8_chars(const uint8_t *p, const uint8_t *end)
{
    uint64_t n = 0;
    for (; p < end; p++)
        n += (*p & 0xC0) != 0x80;
    return n;
}

static int
host_id_ok(const uint8_t *p, const uint8_t *end)
{
    /* validate._HOST_ID: [A-Za-z0-9][A-Za-z0-9._:-]{0,252} */
    if (p >= end || end - p > 253)
        return 0;
    for (const uint8_t *q = p; q < end; q++) {
        uint8_t ch = *q;
        int alnum = (ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9');
        if (!alnum && (q == p || (ch != '.' && ch != '_' && ch != ':' && ch != '-')))
            return 0;
    }
    return 1;
}

/* A Timestamp's seconds + nanos / 1e9, as Python computes it; -1 if not modelled. */
static int
read_timestamp(const uint8_t *p, const uint8_t *end, double *t)
{
    int64_t seconds = 0;
    int32_t nanos = 0;
    while (p < end) {
        uint32_t field;
        int wt;
        uint64_t v;
        if (read_key(&p, end, &field, &wt) < 0)
            return -1;
        if (field == TIMESTAMP_SECONDS || field == TIMESTAMP_NANOS) {
            if (wt != WT_VARINT || read_varint(&p, end, &v) < 0)
                return -1;
            if (field == TIMESTAMP_SECONDS)
                seconds = (int64_t)v;
            else
                nanos = (int32_t)(uint32_t)v; /* int32 on the wire's low 32 bits */
        } else if (skip_field(&p, end, wt) < 0) {
            return -1;
        }
    }
    *t = (double)seconds + (double)nanos / 1e9;
    return 0;
}

/* One labels map entry: key 1..max and value up to max characters; -1 otherwise. */
static int
label_ok(const uint8_t *p, const uint8_t *end, const Header *h)
{
    uint64_t key_chars = 0, value_chars = 0;
    while (p < end) {
        uint32_t field;
        int wt;
        const uint8_t *sub_end;
        if (read_key(&p, end, &field, &wt) < 0)
            return -1;
        if (field == MAP_ENTRY_KEY || field == MAP_ENTRY_VALUE) {
            if (wt != WT_LEN || read_len(&p, end, &sub_end) < 0)
                return -1;
            if (field == MAP_ENTRY_KEY)
                key_chars = utf8_chars(p, sub_end);
            else
                value_chars = utf8_chars(p, sub_end);
            p = sub_end;
        } else if (skip_field(&p, end, wt) < 0) {
            return -1;
        }
    }
    return key_chars >= 1 && key_chars <= h->max_label_chars && value_chars <= h->max_label_chars ? 0 : -1;
}

static int
kernel_era_ok(const uint8_t *p, const uint8_t *end, const Header *h)
{
    uint64_t era = 0;
    while (p < end) {
        uint32_t field;
        int wt;
        if (read_key(&p, end, &field, &wt) < 0)
            return -1;
        if (field == KERNEL_ERA) {
            if (wt != WT_VARINT || read_varint(&p, end, &era) < 0)
                return -1;
        } else if (skip_field(&p, end, wt) < 0) {
            return -1;
        }
    }
    int32_t e = (int32_t)(uint32_t)era;
    return e >= 0 && e < 64 && (h->known_eras >> e) & 1 ? 0 : -1;
}

static int
check_header(const uint8_t *p, const uint8_t *end, const Header *h)
{
    int seen_host = 0, seen_instance = 0, seen_sequence = 0, seen_time = 0, seen_kernel = 0;
    uint64_t sequence = 0, labels = 0, vms = 0, estimates = 0;
    double t = 0.0;
    while (p < end) {
        uint32_t field;
        int wt;
        const uint8_t *sub_end;
        if (read_key(&p, end, &field, &wt) < 0)
            return -1;
        switch (field) {
        case HOST_REPORT_SEQUENCE:
            if (seen_sequence++ || wt != WT_VARINT || read_varint(&p, end, &sequence) < 0)
                return -1;
            continue;
        case HOST_REPORT_HOST_ID:
        case HOST_REPORT_LABELS:
        case HOST_REPORT_AGENT_INSTANCE:
        case HOST_REPORT_SAMPLE_TIME:
        case HOST_REPORT_KERNEL:
            if (wt != WT_LEN || read_len(&p, end, &sub_end) < 0)
                return -1;
            break;
        case HOST_REPORT_VMS:
            vms++;
            if (skip_field(&p, end, wt) < 0)
                return -1;
            continue;
        case HOST_REPORT_ESTIMATES:
            estimates++;
            if (skip_field(&p, end, wt) < 0)
                return -1;
            continue;
        default:
            if (skip_field(&p, end, wt) < 0)
                return -1;
            continue;
        }
        int ok;
        switch (field) {
        case HOST_REPORT_HOST_ID:
            ok = !seen_host++ && host_id_ok(p, sub_end);
            break;
        case HOST_REPORT_AGENT_INSTANCE: {
            uint64_t n = utf8_chars(p, sub_end);
            ok = !seen_instance++ && n >= 1 && n <= h->max_instance_chars;
            break;
        }
        case HOST_REPORT_SAMPLE_TIME:
            ok = !seen_time++ && read_timestamp(p, sub_end, &t) == 0;
            break;
        case HOST_REPORT_KERNEL:
            ok = !seen_kernel++ && kernel_era_ok(p, sub_end, h) == 0;
            break;
        default: /* HOST_REPORT_LABELS: entries, counted as sent (a repeated key counts twice: stricter) */
            ok = ++labels <= h->max_labels && label_ok(p, sub_end, h) == 0;
            break;
        }
        if (!ok)
            return -1;
        p = sub_end;
    }
    if (!seen_host || !seen_instance || !seen_time || sequence < 1 || sequence > h->max_sequence)
        return -1;
    if (!seen_kernel && !(h->known_eras & 1)) /* no kernel: era 0 */
        return -1;
    if (t > h->now + h->max_future_seconds || t < h->min_sample_time)
        return -1;
    return vms <= h->max_vms && estimates <= h->max_vms ? 0 : -1;
}

PyDoc_STRVAR(walk_doc,
"walk(data, start, end, known_causes, explained_causes, unexplained_cause, implausible_cause, max_huge_2m,\n"
"     max_guest_ram_bytes, /)\n"
"    -> (vms, capacity_2m, observed_2m, lost_2m, lost_explained_2m, lost_unexplained_2m, causes) | None\n\n"
"The per-VM checks and totals of the HostReport encoded in data[start:end] (any bytes-like object),\n"
"as validate.check_report computes them; None where Python must decide (see the module comment).\n"
"known_causes and explained_causes are bit masks of Cause values (all below 64); the bounds are\n"
"validate.MAX_HUGE_2M and validate.MAX_GUEST_RAM_BYTES.");

static PyObject *walk_span(const uint8_t *p, const uint8_t *end, const Causes *causes);

static PyObject *
walk(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, stop;
    unsigned long long known, explained;
    unsigned long long max_huge_2m, max_guest_ram_bytes;
    int unexplained, implausible;
    if (!PyArg_ParseTuple(args, "y*nnKKiiKK:walk", &view, &start, &stop, &known, &explained, &unexplained,
                          &implausible, &max_huge_2m, &max_guest_ram_bytes))
        return NULL;
    if (start < 0 || stop < start || stop > view.len) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "span %zd..%zd outside a buffer of %zd bytes", start, stop, view.len);
        return NULL;
    }
    const Causes causes = {known, explained, unexplained, implausible, max_huge_2m, max_guest_ram_bytes};
    const uint8_t *base = (const uint8_t *)view.buf;
    PyObject *result = walk_span(base + start, base + stop, &causes);
    PyBuffer_Release(&view);
    return result;
}

/* walk()'s answer for the report in [p, end): its totals tuple, None, or NULL with an exception set. */
static PyObject *
walk_span(const uint8_t *p, const uint8_t *end, const Causes *causes_)
{
    const Causes causes = *causes_;
    Limits limits = {NULL, 0, 0, 0, 1};
    Sums vms_sums = {0}, host = {0};
    uint64_t counts[MAX_CAUSE] = {0};
    int has_host = 0;
    int rc = walk_report(p, end, &causes, &vms_sums, &host, &has_host, counts, &limits);
    PyMem_Free(limits.items);
    if (rc < 0)
        Py_RETURN_NONE;
    /* Several VMs sharing only a host-wide counter: the host-level estimate carries the loss. */
    const Sums *loss = has_host && host.estimated ? &host : &vms_sums;
    int distinct = 0;
    for (int i = 0; i < MAX_CAUSE; i++)
        distinct += counts[i] != 0;
    PyObject *cause_counts = PyTuple_New(distinct);
    if (cause_counts == NULL)
        return NULL;
    for (int i = 0, k = 0; i < MAX_CAUSE; i++) {
        if (counts[i] == 0)
            continue;
        PyObject *pair = Py_BuildValue("(iK)", i, (unsigned long long)counts[i]);
        if (pair == NULL) {
            Py_DECREF(cause_counts);
            return NULL;
        }
        PyTuple_SET_ITEM(cause_counts, k++, pair);
    }
    return Py_BuildValue("(KKKKKKN)", (unsigned long long)vms_sums.n, (unsigned long long)loss->cap,
                         (unsigned long long)loss->obs, (unsigned long long)loss->lost,
                         (unsigned long long)loss->explained, (unsigned long long)loss->unexplained, cause_counts);
}

PyDoc_STRVAR(check_doc,
"check(data, start, end, now, max_future_seconds, min_sample_time, known_eras, max_labels, max_label_chars,\n"
"      max_vms, max_instance_chars, max_sequence, known_causes, explained_causes, unexplained_cause,\n"
"      implausible_cause, max_huge_2m, max_guest_ram_bytes, /) -> the same as walk() | None\n\n"
"The report-level checks of validate.check_report (see check_header) and then walk(), in one call:\n"
"walk()'s totals where every check passes, None where Python must decide. The bounds are\n"
"validate's constants; known_eras is a bit mask of PredicateEra values (all below 64).");

static PyObject *
check(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t start, stop;
    Header h;
    unsigned long long known_eras, max_labels, max_label_chars, max_vms, max_instance_chars, max_sequence;
    unsigned long long known, explained, max_huge_2m, max_guest_ram_bytes;
    int unexplained, implausible;
    if (!PyArg_ParseTuple(args, "y*nndddKKKKKKKKiiKK:check", &view, &start, &stop, &h.now, &h.max_future_seconds,
                          &h.min_sample_time, &known_eras, &max_labels, &max_label_chars, &max_vms, &max_instance_chars,
                          &max_sequence, &known, &explained, &unexplained, &implausible, &max_huge_2m,
                          &max_guest_ram_bytes))
        return NULL;
    if (start < 0 || stop < start || stop > view.len) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError, "span %zd..%zd outside a buffer of %zd bytes", start, stop, view.len);
        return NULL;
    }
    h.known_eras = known_eras;
    h.max_labels = max_labels;
    h.max_label_chars = max_label_chars;
    h.max_vms = max_vms;
    h.max_instance_chars = max_instance_chars;
    h.max_sequence = max_sequence;
    const Causes causes = {known, explained, unexplained, implausible, max_huge_2m, max_guest_ram_bytes};
    const uint8_t *base = (const uint8_t *)view.buf;
    PyObject *result;
    if (check_header(base + start, base + stop, &h) < 0) {
        result = Py_None;
        Py_INCREF(result);
    } else {
        result = walk_span(base + start, base + stop, &causes);
    }
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef reportscan_methods[] = {
    {"walk", walk, METH_VARARGS, walk_doc},
    {"check", check, METH_VARARGS, check_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef reportscan_module = {
    PyModuleDef_HEAD_INIT, "_reportscan", "Compiled per-VM report checks for eptwatch.server.ingest.validate.", 0,
    reportscan_methods,
};

PyMODINIT_FUNC
PyInit__reportscan(void)
{
    return PyModule_Create(&reportscan_module);
}
