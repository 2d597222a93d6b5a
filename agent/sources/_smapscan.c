/* The candidate search of smaps.scan_large_vmas, compiled: the offsets of the `\nSize:` lines whose
 * kB value has at least `min_digits` digits. It finds exactly what smaps._big_size_pattern finds
 * (tests/test_smaps.py checks the two against each other on random and mutated input).
 *
 * Why C: that search is one pass over the whole smaps file (7.5 MB for 10,000 VMAs), and Python's
 * regex engine steps through it byte by byte, 16% of what the kernel spends producing the file on
 * the benchmark machine. memchr runs at memory speed; the pass here costs about a tenth of the
 * regex (docs/benchmarks.md). The module is optional: without a compiler the build skips it and the
 * agent uses the regex, and says so (smaps.SCANNER). FdScan, below, runs the whole read-and-scan loop
 * of an open smaps file (the sampler's path); big_size_lines and count_newlines serve the Python loop
 * (scan_large_vmas on bytes in memory).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

PyDoc_STRVAR(big_size_lines_doc,
"big_size_lines(data, min_digits, min_value=0, /) -> list[tuple[int, int, int]]\n\n"
"For each line `Size:[ \\t]*<digits> kB` preceded by a newline whose value has at least min_digits\n"
"digits: (offset of that newline, start of the digits, end of the digits); for each `Size:` line\n"
"preceded by a newline that is not `[ \\t]*<digits> kB\\n` (malformed): (offset of that newline,\n"
"end of `Size:`, the same). A well-formed line of at most 18 digits whose value is below min_value is\n"
"left out too. data is any contiguous bytes-like object; it is only read during the call.");

static PyObject *
big_size_lines(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Py_ssize_t min_digits;
    unsigned long long min_value = 0;
    if (!PyArg_ParseTuple(args, "y*n|K:big_size_lines", &view, &min_digits, &min_value))
        return NULL;
    if (min_digits < 1) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "min_digits must be at least 1");
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const char *base = (const char *)view.buf;
    const char *end = base + view.len;
    /* Search for the 'z' of "Size:" rather than for the whole "\nSize:": a block has about three 'z'
     * (Size, KernelPageSize, MMUPageSize), and memchr finds them at memory speed, where memmem on
     * the six-byte needle was three times slower on the benchmark machine. */
    const char *p = base + 3;
    while (p < end) {
        const char *z = memchr(p, 'z', (size_t)(end - p));
        if (z == NULL)
            break;
        p = z + 1;
        if (end - z < 3 || z[1] != 'e' || z[2] != ':' || z[-1] != 'i' || z[-2] != 'S' || z[-3] != '\n')
            continue;
        const char *q = z + 3;
        while (q < end && (*q == ' ' || *q == '\t'))
            q++;
        const char *digits = q;
        while (q < end && *q >= '0' && *q <= '9')
            q++;
        const int well_formed = q > digits && end - q >= 4 && memcmp(q, " kB\n", 4) == 0;
        if (well_formed && q - digits < min_digits)
            continue;
        if (well_formed && q - digits <= 18 && min_value > 0) {
            /* A size of enough digits but below the threshold (65,404 kB against 65,536): dropped here
             * rather than as a tuple for Python to int() and drop. 18 digits cannot overflow. */
            unsigned long long value = 0;
            for (const char *d = digits; d < q; d++)
                value = value * 10 + (unsigned long long)(*d - '0');
            if (value < min_value) {
                p = q + 3;
                continue;
            }
        }
        /* A malformed Size line (`Size: lots kB`) is reported too, with an empty digit range, so
         * that the caller parses its block strictly and fails: corrupt input is never skipped. */
        const char *d0 = well_formed ? digits : z + 3;
        const char *d1 = well_formed ? q : z + 3;
        PyObject *item = Py_BuildValue("(nnn)", (Py_ssize_t)(z - 3 - base), (Py_ssize_t)(d0 - base),
                                       (Py_ssize_t)(d1 - base));
        if (item == NULL || PyList_Append(out, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(out);
            PyBuffer_Release(&view);
            return NULL;
        }
        Py_DECREF(item);
        if (well_formed)
            p = q + 3; /* the regex, too, goes on from the newline after " kB" */
    }
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(block_fields_doc,
"block_fields(block, max_digits, /) -> tuple | None\n\n"
"The body of one smaps VMA block (the lines after its first), read only if every line has the kernel's\n"
"plain shape: `Key:[ \\t]*value` in ASCII, each of the eight kB fields smaps.parse_smaps keeps (Size,\n"
"KernelPageSize, Rss, AnonHugePages, ShmemPmdMapped, FilePmdMapped, Shared_Hugetlb, Private_Hugetlb)\n"
"at most once and exactly `<1 to max_digits digits> kB`, THPeligible at most once and exactly 0 or 1,\n"
"and the block ending with a newline. Then: (the eight values in bytes, None where absent, THPeligible\n"
"as True/False/None, the offset of the first newline). Anything else: None (the caller parses the\n"
"block in Python, which gives the result or the error).");

/* The kB fields of smaps._KB_FIELDS, in its order (tests/test_smaps.py checks the two agree). */
static const char *const kb_field_names[8] = {"Size", "KernelPageSize", "Rss", "AnonHugePages", "ShmemPmdMapped",
                                              "FilePmdMapped", "Shared_Hugetlb", "Private_Hugetlb"};

/* Why: the candidate (guest-RAM) blocks are parsed on every sample, and Python's strict parse of one
 * costs 20 to 35 us, over 100 us for the two of a file when the caches are cold (after another
 * process ran; docs/benchmarks.md). This reads only what the kernel prints; whatever else it meets
 * it declines, and smaps._parse_block_bytes parses the block as before, so the errors (message,
 * line) are the Python parser's alone. */
/* The body of a block: every line after the first (the header) at p[first+1:n), as block_fields
 * describes. 1 with values/have/eligible filled, 0 where it declines. */
static int
read_body(const unsigned char *p, Py_ssize_t n, Py_ssize_t first, Py_ssize_t max_digits, unsigned long long values[8], int have[8],
          int *eligible)
{
    for (int f = 0; f < 8; f++)
        have[f] = 0;
    *eligible = -1;
    if (p[n - 1] != '\n')
        return 0;
    for (Py_ssize_t i = first + 1; i < n;) {
        const unsigned char *eol = memchr(p + i, '\n', (size_t)(n - i)); /* found: the block ends with one */
        Py_ssize_t e = eol - p, k = i;
        for (Py_ssize_t j = i; j < e; j++)
            if (p[j] >= 0x80)
                return 0;
        /* _FIELD: [A-Za-z_][A-Za-z0-9_]*: */
        if (k >= e || !((p[k] >= 'A' && p[k] <= 'Z') || (p[k] >= 'a' && p[k] <= 'z') || p[k] == '_'))
            return 0;
        while (k < e && ((p[k] >= 'A' && p[k] <= 'Z') || (p[k] >= 'a' && p[k] <= 'z') || (p[k] >= '0' && p[k] <= '9') || p[k] == '_'))
            k++;
        if (k >= e || p[k] != ':')
            return 0;
        Py_ssize_t klen = k - i, v = k + 1;
        while (v < e && (p[v] == ' ' || p[v] == '\t'))
            v++;
        int field = -1;
        for (int f = 0; f < 8; f++)
            if ((size_t)klen == strlen(kb_field_names[f]) && memcmp(p + i, kb_field_names[f], (size_t)klen) == 0)
                field = f;
        if (field >= 0) {
            if (have[field])
                return 0;
            unsigned long long value = 0;
            Py_ssize_t d = v;
            while (d < e && p[d] >= '0' && p[d] <= '9' && d - v < max_digits)
                value = value * 10 + (unsigned long long)(p[d++] - '0');
            if (d == v || e - d != 3 || memcmp(p + d, " kB", 3) != 0)
                return 0;
            values[field] = value * 1024;
            have[field] = 1;
        } else if (klen == 11 && memcmp(p + i, "THPeligible", 11) == 0) {
            if (*eligible >= 0 || e - v != 1 || (p[v] != '0' && p[v] != '1'))
                return 0;
            *eligible = p[v] == '1';
        }
        i = e + 1;
    }
    return 1;
}

static PyObject *
kb_value(int have, unsigned long long value)
{
    return have ? PyLong_FromUnsignedLongLong(value) : Py_NewRef(Py_None);
}

/* The arguments (block, max_digits) of block_fields and plain_block, and the block's body read: 1 with
 * the view held (the caller releases it), 0 where the body declines (view released), -1 on an error. */
typedef struct {
    unsigned long long values[8];
    int have[8], eligible;
    Py_ssize_t first; /* the offset of the first newline: the header ends there */
} Body;

static int
take_block(PyObject *args, const char *format, Py_buffer *view, Body *b)
{
    Py_ssize_t max_digits;
    if (!PyArg_ParseTuple(args, format, view, &max_digits))
        return -1;
    if (max_digits < 1 || max_digits > 16) { /* 16 digits times 1024 fits in 64 bits */
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "max_digits must be 1 to 16");
        return -1;
    }
    const unsigned char *p = (const unsigned char *)view->buf;
    const unsigned char *first = view->len > 0 ? memchr(p, '\n', (size_t)view->len) : NULL;
    if (first == NULL || !read_body(p, view->len, first - p, max_digits, b->values, b->have, &b->eligible)) {
        PyBuffer_Release(view);
        return 0;
    }
    b->first = first - p;
    return 1;
}

static PyObject *
block_fields(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Body body;
    int taken = take_block(args, "y*n:block_fields", &view, &body);
    if (taken <= 0)
        return taken < 0 ? NULL : Py_NewRef(Py_None);
    PyBuffer_Release(&view);
    unsigned long long *values = body.values;
    int *have = body.have, eligible = body.eligible;
    PyObject *out = PyTuple_New(10);
    if (out == NULL)
        return NULL;
    for (int f = 0; f < 8; f++) {
        PyObject *item = kb_value(have[f], values[f]);
        if (item == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, f, item);
    }
    PyTuple_SET_ITEM(out, 8, Py_NewRef(eligible < 0 ? Py_None : eligible ? Py_True : Py_False));
    PyObject *at = PyLong_FromSsize_t(body.first);
    if (at == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    PyTuple_SET_ITEM(out, 9, at);
    return out;
}

/* smaps._HEADER on a header line p[0:e) (no newline in it), for the lines it can read without Python:
 * numbers within the bounds the Python parse checks (16 hex digits, 19 decimal), a path of printable
 * ASCII. 1 with the parts filled, 0 where it declines (the Python parse then decides). */
typedef struct {
    unsigned long long start, end, offset, inode;
    Py_ssize_t perms, dev, dev_len, path, path_len;
    int deleted;
} Header;

static Py_ssize_t
hex_run(const unsigned char *p, Py_ssize_t i, Py_ssize_t e, unsigned long long *value)
{
    Py_ssize_t k = i;
    unsigned long long v = 0;
    for (; k < e && ((p[k] >= '0' && p[k] <= '9') || (p[k] >= 'a' && p[k] <= 'f')); k++)
        v = v << 4 | (unsigned long long)(p[k] <= '9' ? p[k] - '0' : p[k] - 'a' + 10);
    if (value != NULL)
        *value = v;
    return k - i;
}

static int
read_header(const unsigned char *p, Py_ssize_t e, Header *h)
{
    Py_ssize_t i = 0, len;
    if ((len = hex_run(p, i, e, &h->start)) < 1 || len > 16 || (i += len) >= e || p[i++] != '-')
        return 0;
    if ((len = hex_run(p, i, e, &h->end)) < 1 || len > 16 || (i += len) >= e || p[i++] != ' ')
        return 0;
    if (e - i < 5 || (p[i] != '-' && p[i] != 'r') || (p[i + 1] != '-' && p[i + 1] != 'w') || (p[i + 2] != '-' && p[i + 2] != 'x')
        || (p[i + 3] != '-' && p[i + 3] != 's' && p[i + 3] != 'p') || p[i + 4] != ' ')
        return 0;
    h->perms = i;
    i += 5;
    if ((len = hex_run(p, i, e, &h->offset)) < 1 || len > 16 || (i += len) >= e || p[i++] != ' ')
        return 0;
    h->dev = i;
    if ((len = hex_run(p, i, e, NULL)) < 1 || (i += len) >= e || p[i++] != ':' || (len = hex_run(p, i, e, NULL)) < 1 || (i += len) >= e
        || p[i] != ' ')
        return 0;
    h->dev_len = i - h->dev;
    if (h->dev_len > 64)
        return 0;
    i++;
    Py_ssize_t digits = i;
    unsigned long long inode = 0;
    for (; i < e && p[i] >= '0' && p[i] <= '9'; i++)
        inode = inode * 10 + (unsigned long long)(p[i] - '0');
    if (i == digits || i - digits > 19) /* 19 digits fit in 64 bits; more: the Python parse names the bound */
        return 0;
    h->inode = inode;
    if (i < e && p[i] != ' ')
        return 0; /* `(?: +([^\n]*))?$`: the inode ends the line or spaces follow it */
    while (i < e && p[i] == ' ')
        i++;
    Py_ssize_t path = i, end = e;
    for (Py_ssize_t k = path; k < e; k++)
        if (p[k] < 0x20 || p[k] >= 0x7f)
            return 0; /* str.rstrip() strips more than spaces: leave such paths to Python */
    while (end > path && p[end - 1] == ' ')
        end--;
    h->deleted = end - path >= 10 && memcmp(p + end - 10, " (deleted)", 10) == 0;
    if (h->deleted)
        end -= 10;
    h->path = path;
    h->path_len = end - path;
    return h->end >= h->start;
}

PyDoc_STRVAR(plain_block_doc,
"plain_block(block, max_digits, /) -> tuple | None\n\n"
"A whole VMA block of the kernel's plain shape: its header as smaps._HEADER reads it and its body as\n"
"block_fields does, with Size and Rss present. Then the values of smaps.Vma's fields in their order\n"
"(the eight kB fields in bytes or None, start, end, perms, offset, dev, inode, path without a trailing\n"
"' (deleted)', deleted, THPeligible). Anything else: None (the caller parses the block in Python,\n"
"which gives the result or the error).");

static PyObject *
plain_block(PyObject *module, PyObject *args)
{
    Py_buffer view;
    Body body;
    Header h;
    int taken = take_block(args, "y*n:plain_block", &view, &body);
    if (taken <= 0)
        return taken < 0 ? NULL : Py_NewRef(Py_None);
    const unsigned char *p = (const unsigned char *)view.buf;
    unsigned long long *values = body.values;
    int *have = body.have, eligible = body.eligible;
    if (!have[0] || !have[2] || !read_header(p, body.first, &h)) { /* Size and Rss are required */
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    PyObject *out = PyTuple_New(17);
    if (out != NULL) {
        PyObject *items[17];
        for (int f = 0; f < 8; f++)
            items[f] = kb_value(have[f], values[f]);
        items[8] = PyLong_FromUnsignedLongLong(h.start);
        items[9] = PyLong_FromUnsignedLongLong(h.end);
        items[10] = PyUnicode_FromStringAndSize((const char *)p + h.perms, 4);
        items[11] = PyLong_FromUnsignedLongLong(h.offset);
        items[12] = PyUnicode_FromStringAndSize((const char *)p + h.dev, h.dev_len);
        items[13] = PyLong_FromUnsignedLongLong(h.inode);
        items[14] = PyUnicode_FromStringAndSize((const char *)p + h.path, h.path_len);
        items[15] = Py_NewRef(h.deleted ? Py_True : Py_False);
        items[16] = Py_NewRef(eligible < 0 ? Py_None : eligible ? Py_True : Py_False);
        for (int k = 0; k < 17; k++) {
            if (items[k] == NULL) { /* no memory: drop what was made */
                for (int j = 0; j < 17; j++)
                    Py_XDECREF(items[j]);
                Py_CLEAR(out);
                break;
            }
        }
        for (int k = 0; out != NULL && k < 17; k++)
            PyTuple_SET_ITEM(out, k, items[k]);
    }
    PyBuffer_Release(&view);
    return out;
}

PyDoc_STRVAR(count_newlines_doc,
"count_newlines(data, /) -> int\n\n"
"The number of newline bytes in data (any contiguous bytes-like object): bytes.count(b'\\n'), fast.");

/* The streaming scan (smaps.LargeVmaScanner) counts the lines of every chunk so that an error can name
 * its line after the chunk is gone. bytes.count(b"\n") tests one byte per step (about 3 ms for 7.5 MB
 * here, 11% of `cat`); sixteen bytes per step, with per-byte counters that are summed before they can
 * wrap, is about a tenth of that. Vector extensions are GCC/Clang's; other compilers get the plain loop. */
static Py_ssize_t
count_nl(const unsigned char *p, Py_ssize_t n)
{
    Py_ssize_t count = 0, i = 0;
#if defined(__GNUC__)
    typedef unsigned char v16 __attribute__((vector_size(16)));
    const v16 nl = {'\n', '\n', '\n', '\n', '\n', '\n', '\n', '\n', '\n', '\n', '\n', '\n', '\n', '\n', '\n', '\n'};
    while (n - i >= 16) {
        v16 acc = {0};
        Py_ssize_t stop = i + 16 * 255; /* each lane adds at most 1 per step: 255 steps cannot wrap */
        if (stop > n - 15)
            stop = n - 15;
        for (; i < stop; i += 16) {
            v16 v;
            memcpy(&v, p + i, 16);
            acc -= (v16)(v == nl); /* a match is -1 in every bit: subtracting it adds one */
        }
        for (int k = 0; k < 16; k++)
            count += acc[k];
    }
#endif
    for (; i < n; i++)
        count += p[i] == '\n';
    return count;
}

static PyObject *
count_newlines(PyObject *module, PyObject *args)
{
    Py_buffer view;
    if (!PyArg_ParseTuple(args, "y*:count_newlines", &view))
        return NULL;
    Py_ssize_t count = count_nl((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(count);
}

/* --- the whole streaming read and scan of one smaps file, compiled (FdScan) -----------------------
 *
 * smaps.LargeVmaScanner.read_fd hands an open, already checked file descriptor (HostRoot opened it
 * beneath the root, checked it is a regular file and set the time and size bounds) to FdScan.run,
 * which read()s it 128 KiB at a time into one small reused buffer and scans each chunk in the same
 * loop, while the kernel's copy is still in the CPU's cache: one fused pass counts the newlines (for
 * the line number of any later error) and finds the `\nSize:` lines, then a few short searches find
 * the ends of candidate blocks, the end of the first block and the start of the last one. It is the
 * Python loop of LargeVmaScanner.filled, step for step (same regions, same order, same carried
 * state); only the strict parsing stays in Python: each candidate block and the first line are handed
 * to callbacks, and LargeVmaScanner.finish() does the rest from state(). tests/test_smaps.py checks
 * that results and errors (message and line) equal the Python loop's for any chunk size.
 *
 * Why: the Python loop spent about 15 us per chunk (two compiled passes, rfind/regex calls, Python),
 * about the whole of what the agent added over `cat` of a page-cache smaps (docs/benchmarks.md). */
#include <errno.h>
#include <stdint.h>
#include <unistd.h>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(SMAPSCAN_PORTABLE) /* PORTABLE: to check the plain build */
#include <immintrin.h>
#define SMAPSCAN_X86 1
#endif

/* One 64-byte step of the fused pass that saw a `\nSize:` 'z': where, and which bytes. */
typedef struct {
    Py_ssize_t at;
    uint64_t mask;
} Hits;

typedef struct {
    PyObject_HEAD
    unsigned char *mem;    /* the allocation (page-aligned) */
    Py_ssize_t cap;        /* its size */
    unsigned char *buf;    /* where the held bytes start: mem plus under 64 (see align_for_read) */
    Py_ssize_t chunk;      /* bytes asked of each read loop */
    /* The state of one file; names as in smaps.LargeVmaScanner (indices into buf unless "file offset"). */
    Py_ssize_t n;          /* bytes held */
    long long base;        /* file offset of buf[0] */
    Py_ssize_t scanned;    /* where the unscanned text starts (a line start) */
    long long lines;       /* newlines in the file before scanned */
    long long total;       /* bytes read */
    int last_byte;
    Py_ssize_t block;      /* start of the last VMA header line seen */
    long long first_nl;    /* file offset of the first newline, -1 before it is seen */
    PyObject *first_block; /* bytes of the first block, once its end is seen */
    long long *pending;    /* file offsets of candidate blocks whose end is not read yet */
    Py_ssize_t npending, cap_pending;
    long long pending_from;
    int vmflags;
    int stop;              /* a candidate block failed (the take callback said so) */
    int draining;          /* an error is known: only the newline count and the last byte still matter */
    Py_ssize_t *cands;     /* the current chunk's candidates: offset of the newline before `Size:` */
    Py_ssize_t ncands, cap_cands;
    Hits *hits;            /* the fused pass's notes, one per 64 bytes of a chunk at most (AVX2) */
    Py_ssize_t cap_hits;
    uint64_t *zmask;       /* AVX-512: one z mask per 64-byte step of the pass (pass_avx512) */
    uint64_t *nonempty;    /* ... and a bit per step, set where that mask is not empty; one allocation of 2 * cap_z */
    Py_ssize_t cap_z;
} FdScan;

/* --- the fused pass: newlines counted, `\nSize:` candidates found, in one read of the chunk --- */

/* What the `Size:` line whose 'z' is at p[z] says, with the rules of big_size_lines: 1 if it is a
 * candidate (large enough, or malformed), 0 if it is dropped. `end` bounds every read. */
static int
size_line_is_candidate(const unsigned char *p, Py_ssize_t z, Py_ssize_t end, Py_ssize_t min_digits,
                       unsigned long long min_value)
{
    Py_ssize_t q = z + 3, digits, nd;
#ifdef SMAPSCAN_X86
    if (end - q >= 32) {
        /* The kernel pads the value to a fixed column (`Size:` + 19 characters): the spaces and the
         * digits are found in one 32-byte look rather than a loop per byte. */
        __m128i a = _mm_loadu_si128((const __m128i *)(p + q)), b = _mm_loadu_si128((const __m128i *)(p + q + 16));
        uint32_t sp = (uint32_t)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(a, _mm_set1_epi8(' ')), _mm_cmpeq_epi8(a, _mm_set1_epi8('\t'))))
                      | (uint32_t)_mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(b, _mm_set1_epi8(' ')), _mm_cmpeq_epi8(b, _mm_set1_epi8('\t')))) << 16;
        /* '0'..'9' as signed bytes: ('0'-1) < x < ('9'+1), no byte above 0x7f passes (they are negative). */
        __m128i lo = _mm_set1_epi8('0' - 1), hi = _mm_set1_epi8('9' + 1);
        uint32_t dg = (uint32_t)_mm_movemask_epi8(_mm_and_si128(_mm_cmpgt_epi8(a, lo), _mm_cmplt_epi8(a, hi)))
                      | (uint32_t)_mm_movemask_epi8(_mm_and_si128(_mm_cmpgt_epi8(b, lo), _mm_cmplt_epi8(b, hi))) << 16;
        uint32_t nsp = ~sp;
        if (nsp != 0) {
            int s = __builtin_ctz(nsp);
            uint32_t ndg = ~(dg >> s);
            if (ndg != 0 && (s + __builtin_ctz(ndg)) < 32) {
                nd = __builtin_ctz(ndg);
                digits = q + s;
                q = digits + nd;
                goto have_digits;
            }
        }
    }
#endif
    while (q < end && (p[q] == ' ' || p[q] == '\t'))
        q++;
    digits = q;
    while (q < end && p[q] >= '0' && p[q] <= '9')
        q++;
    nd = q - digits;
#ifdef SMAPSCAN_X86
have_digits:
#endif
    {
        const int well_formed = nd > 0 && end - q >= 4 && memcmp(p + q, " kB\n", 4) == 0;
        if (!well_formed)
            return 1; /* malformed: its block is parsed strictly, and fails */
        if (nd < min_digits)
            return 0;
        if (nd <= 18 && min_value > 0) {
            unsigned long long value = 0;
            for (Py_ssize_t d = digits; d < q; d++)
                value = value * 10 + (unsigned long long)(p[d] - '0');
            if (value < min_value)
                return 0;
        }
        return 1;
    }
}

/* The candidates list grows only with the GIL released: plain malloc/realloc. Returns -1 on no memory. */
static int
push_cand(FdScan *s, Py_ssize_t newline)
{
    if (s->ncands == s->cap_cands) {
        Py_ssize_t cap = s->cap_cands ? s->cap_cands * 2 : 64;
        Py_ssize_t *grown = realloc(s->cands, (size_t)cap * sizeof(Py_ssize_t));
        if (grown == NULL)
            return -1;
        s->cands = grown;
        s->cap_cands = cap;
    }
    s->cands[s->ncands++] = newline;
    return 0;
}

/* A 'z' at i: is it the z of "\nSize:" (the newline at i-3 at or after lo, ':' before end), and a
 * candidate? */
static inline int
z_hit(FdScan *s, const unsigned char *p, Py_ssize_t i, Py_ssize_t lo, Py_ssize_t end, Py_ssize_t min_digits,
      unsigned long long min_value)
{
    if (i - 3 < lo || end - i < 3 || p[i - 3] != '\n' || p[i - 2] != 'S' || p[i - 1] != 'i' || p[i + 1] != 'e' || p[i + 2] != ':')
        return 0;
    if (size_line_is_candidate(p, i, end, min_digits, min_value))
        return push_cand(s, i - 3);
    return 0;
}

/* Scalar pass over p[from:to): newlines counted from `from`, z hits looked at from `zfrom`. */
static Py_ssize_t
pass_scalar(FdScan *s, const unsigned char *p, Py_ssize_t from, Py_ssize_t to, Py_ssize_t lo, Py_ssize_t end,
            Py_ssize_t min_digits, unsigned long long min_value, int *nomem)
{
    Py_ssize_t count = 0;
    for (Py_ssize_t i = from; i < to; i++) {
        count += p[i] == '\n';
        if (p[i] == 'z' && z_hit(s, p, i, lo, end, min_digits, min_value) < 0)
            *nomem = 1;
    }
    return count;
}

#ifdef SMAPSCAN_X86
/* 64 bytes per step: the newlines are counted from a mask, and each 'z' with a newline three bytes
 * before it (the 'z' of `\nSize:`; KernelPageSize and MMUPageSize have none there), about one per VMA
 * block, is noted without a branch: the step's offset and mask are stored every time and the store
 * index advances only when the mask is not empty. A branch taken about once per block, at no fixed
 * period, was mispredicted each time and cost more than the pass itself. The hits are then looked at
 * in order, after the pass (fused_pass). Reads p[i-3 .. i+64), so i >= 3. */

/* The newline bits of the three bytes before p[i], at bits 61-63 (as the previous step leaves them). */
static inline uint64_t
newlines_before(const unsigned char *p, Py_ssize_t i)
{
    return (uint64_t)(p[i - 3] == '\n') << 61 | (uint64_t)(p[i - 2] == '\n') << 62 | (uint64_t)(p[i - 1] == '\n') << 63;
}

/* AVX-512: one load and two compares per 64 bytes; the newline three bytes before each 'z' comes from
 * the newline mask shifted (with the last three bits of the step before), not from a second load.
 * Every step's z mask is stored, empty or not, at the next slot of a dense array (zmask[j] for the
 * bytes from i0 + 64 j); nonempty_avx512 then marks the non-empty ones. On the benchmark machine (AMD
 * EPYC, Zen 4 class) this pass costs 0.70 to 0.80 of the one it replaces, which stored each step's
 * note at an index that advanced only past a non-empty mask: that store's address waited on the
 * compares of its own step (docs/benchmarks.md, 2026-12-06 06:20). */
__attribute__((target("avx512bw,avx512f,popcnt")))
static Py_ssize_t
pass_avx512(const unsigned char *p, Py_ssize_t i, Py_ssize_t to, uint64_t *zmask, Py_ssize_t *nsteps, Py_ssize_t *stopped)
{
    const __m512i nl = _mm512_set1_epi8('\n'), zz = _mm512_set1_epi8('z');
    Py_ssize_t count = 0, j = 0;
    uint64_t prev = newlines_before(p, i);
    for (; to - i >= 64; i += 64) {
        __m512i v = _mm512_loadu_si512((const void *)(p + i));
        uint64_t n = (uint64_t)_mm512_cmpeq_epi8_mask(v, nl);
        uint64_t z = (uint64_t)_mm512_cmpeq_epi8_mask(v, zz);
        /* Keep the AND in general registers: GCC otherwise folds it into a masked compare whose mask
         * goes from a general register back to a mask register every step (measurably slower). */
        __asm__("" : "+r"(z));
        zmask[j++] = z & (n << 3 | prev >> 61);
        prev = n;
        count += __builtin_popcountll(n);
    }
    *nsteps = j;
    *stopped = i;
    return count;
}

/* A bitmap of the non-empty masks of zmask[0:nsteps] (bit j of the words at `nonempty`: zmask[j] != 0),
 * eight masks per vector test. About one mask in ten is non-empty, at no fixed period: a branch per
 * mask would be mispredicted about once per VMA block, and a list built by advancing an index past
 * each non-empty mask makes every store wait for that index. zmask has room for nsteps rounded up to
 * a multiple of 8, nonempty for nsteps / 64 + 1 words. */
__attribute__((target("avx512f")))
static void
nonempty_avx512(uint64_t *zmask, uint64_t *nonempty, Py_ssize_t nsteps)
{
    for (Py_ssize_t t = nsteps; t % 8 != 0; t++)
        zmask[t] = 0;
    unsigned char *bytes = (unsigned char *)nonempty; /* bit j of the bytes = bit j of the words: little-endian x86 */
    Py_ssize_t j = 0;
    for (; j < nsteps; j += 8) {
        __m512i m = _mm512_loadu_si512((const void *)(zmask + j));
        bytes[j / 8] = (unsigned char)_mm512_test_epi64_mask(m, m);
    }
    for (j /= 8; j % 8 != 0; j++)
        bytes[j] = 0; /* the rest of the last word */
}

/* The hits of pass_avx512, looked at with AVX-512 too. The kernel prints `Size:` then the value
 * right-aligned in a 19-character field, then ` kB\n`; a line of exactly that shape (the 29 bytes from
 * its newline compared at once against a template) whose value has fewer than min_digits digits is
 * dropped here in a few instructions without a branch that could be mispredicted; any other line
 * takes the general check (z_hit), which decides as big_size_lines does. */
__attribute__((target("avx512bw,avx512vl,avx512f,popcnt,bmi")))
static int
hits_avx512(FdScan *s, const unsigned char *p, const uint64_t *zmask, const uint64_t *nonempty, Py_ssize_t nsteps, Py_ssize_t i0,
            Py_ssize_t lo, Py_ssize_t end, Py_ssize_t min_digits, unsigned long long min_value)
{
    /* "\nSize:" (bytes 0-5), the field (6-24), " kB\n" (25-28); bytes 29-31 are not looked at. */
    static const char tmpl[32] = "\nSize:                    kB\n";
    const __m256i t = _mm256_loadu_si256((const __m256i *)tmpl);
    const __m256i sp = _mm256_set1_epi8(' '), zero = _mm256_set1_epi8('0'), nine = _mm256_set1_epi8(9);
    const uint32_t fixed = 0x3fu | (0xfu << 25), field = 0x7ffffu << 6;
    /* A value of exactly min_digits digits is compared with min_value here too, as digit strings: both
     * right-aligned in the field, the first byte where they differ decides. Without it about one line in
     * six of a QEMU's smaps (64 MiB heap arenas and their guards, 5 digits against 65536 kB) took the
     * general check, with a mispredicted branch each. */
    char mins[32];
    memset(mins, ' ', sizeof mins);
    int compare_value = min_value > 0 && min_digits <= 19;
    if (compare_value) {
        unsigned long long m = min_value;
        for (Py_ssize_t d = 0; d < min_digits; d++, m /= 10)
            mins[24 - d] = (char)('0' + m % 10);
        compare_value = m == 0 && mins[25 - min_digits] != '0'; /* min_value has exactly min_digits digits */
    }
    const __m256i minv = _mm256_loadu_si256((const __m256i *)mins);
    int nomem = 0;
    for (Py_ssize_t w = 0; w * 64 < nsteps; w++) {
        for (uint64_t bits = nonempty[w]; bits; bits &= bits - 1) {
            Py_ssize_t step = w * 64 + __builtin_ctzll(bits);
            for (uint64_t z = zmask[step]; z; z &= z - 1) {
                Py_ssize_t i = i0 + 64 * step + __builtin_ctzll(z), nl = i - 3;
                if (nl >= lo && end - nl >= 32) {
                    __m256i v = _mm256_loadu_si256((const __m256i *)(p + nl));
                    uint32_t eq = _mm256_cmpeq_epi8_mask(v, t), isp = _mm256_cmpeq_epi8_mask(v, sp) & field;
                    uint32_t dg = _mm256_cmple_epu8_mask(_mm256_sub_epi8(v, zero), nine) & field;
                    uint32_t lead = isp >> 6; /* spaces must lead the field: 1..1 from bit 0 */
                    int nd = __builtin_popcount(dg);
                    uint32_t lt = _mm256_cmplt_epu8_mask(v, minv) & field, differ = lt | (_mm256_cmpgt_epu8_mask(v, minv) & field);
                    int below = nd < min_digits || (compare_value && nd == min_digits && (lt & differ & (0u - differ)) != 0);
                    if ((eq & fixed) == fixed && (isp | dg) == field && (lead & (lead + 1)) == 0 && nd > 0 && below)
                        continue; /* a well-formed `Size:` line with a value below min_value */
                }
                if (z_hit(s, p, i, lo, end, min_digits, min_value) < 0)
                    nomem = 1;
            }
        }
    }
    return nomem;
}

__attribute__((target("avx2,popcnt")))
static Py_ssize_t
pass_avx2(const unsigned char *p, Py_ssize_t i, Py_ssize_t to, Hits *hits, Py_ssize_t *nhits, Py_ssize_t *stopped)
{
    const __m256i nl = _mm256_set1_epi8('\n'), zz = _mm256_set1_epi8('z');
    Py_ssize_t count = 0, k = 0;
    uint64_t prev = newlines_before(p, i);
    for (; to - i >= 64; i += 64) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(p + i)), b = _mm256_loadu_si256((const __m256i *)(p + i + 32));
        uint64_t n = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(a, nl))
                     | (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(b, nl)) << 32;
        uint64_t z = ((uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(a, zz))
                      | (uint64_t)(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(b, zz)) << 32) & (n << 3 | prev >> 61);
        prev = n;
        count += __builtin_popcountll(n);
        hits[k].at = i;
        hits[k].mask = z;
        k += z != 0;
    }
    *nhits = k;
    *stopped = i;
    return count;
}

static int cpu_level = -1; /* 2: AVX-512BW and VL, 1: AVX2, 0: neither (set at module init) */
#endif

/* Newlines in p[from:to), and the candidates whose newline is at or after lo (the newline before
 * `from`, or 0), within p[lo:to): what count_newlines and big_size_lines(p[lo:to]) return, in one
 * read of the bytes. Returns -1 when the candidate list could not grow. GIL not needed. */
static long long
fused_pass(FdScan *s, Py_ssize_t from, Py_ssize_t to, Py_ssize_t lo, Py_ssize_t min_digits, unsigned long long min_value)
{
    const unsigned char *p = s->buf;
    int nomem = 0;
    s->ncands = 0;
    /* big_size_lines over p[lo:to] looks at a 'z' from lo + 3 on; below that only newlines are counted. */
    Py_ssize_t zfrom = lo + 3 > from ? lo + 3 : from;
    if (zfrom > to)
        zfrom = to;
    long long count = 0;
    for (Py_ssize_t i = from; i < zfrom; i++)
        count += p[i] == '\n';
    Py_ssize_t i = zfrom;
#ifdef SMAPSCAN_X86
    if (cpu_level > 0 && to - i >= 64) {
        Py_ssize_t steps = (to - i) / 64 + 1, nhits = 0;
        if (cpu_level == 2) {
            if (steps + 8 > s->cap_z) {
                Py_ssize_t cap = steps + 8;
                uint64_t *grown = malloc((size_t)cap * 2 * sizeof(uint64_t));
                if (grown == NULL)
                    return -1;
                free(s->zmask);
                s->zmask = grown;
                s->nonempty = grown + cap;
                s->cap_z = cap;
            }
            Py_ssize_t i0 = i, nsteps = 0;
            count += pass_avx512(p, i, to, s->zmask, &nsteps, &i);
            nonempty_avx512(s->zmask, s->nonempty, nsteps);
            nomem |= hits_avx512(s, p, s->zmask, s->nonempty, nsteps, i0, lo, to, min_digits, min_value);
        } else {
            if (steps > s->cap_hits) {
                Hits *grown = realloc(s->hits, (size_t)steps * sizeof(Hits));
                if (grown == NULL)
                    return -1;
                s->hits = grown;
                s->cap_hits = steps;
            }
            count += pass_avx2(p, i, to, s->hits, &nhits, &i);
            for (Py_ssize_t k = 0; k < nhits; k++)
                for (uint64_t z = s->hits[k].mask; z; z &= z - 1)
                    if (z_hit(s, p, s->hits[k].at + __builtin_ctzll(z), lo, to, min_digits, min_value) < 0)
                        nomem = 1;
        }
    }
#endif
    count += pass_scalar(s, p, i, to, lo, to, min_digits, min_value, &nomem);
    return nomem ? -1 : count;
}

/* --- the short searches of LargeVmaScanner.filled, on buf --- */

static inline int
is_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
}

/* Does `\n[0-9a-f]+-[0-9a-f]+ ` (smaps._HEADER_B) match at buf[i], ending at or before end? */
static int
header_at(const unsigned char *p, Py_ssize_t i, Py_ssize_t end)
{
    Py_ssize_t j = i + 1, k;
    for (k = j; k < end && is_hex(p[k]); k++)
        ;
    if (k == j || k >= end || p[k] != '-')
        return 0;
    j = ++k;
    for (; k < end && is_hex(p[k]); k++)
        ;
    return k > j && k < end && p[k] == ' ';
}

/* _HEADER_B.search(buf, from, end): the index of the newline that starts the next header, or -1. */
static Py_ssize_t
next_header(const unsigned char *p, Py_ssize_t from, Py_ssize_t end)
{
    while (from < end) {
        const unsigned char *q = memchr(p + from, '\n', (size_t)(end - from));
        if (q == NULL)
            return -1;
        Py_ssize_t i = q - p;
        if (header_at(p, i, end))
            return i;
        from = i + 1;
    }
    return -1;
}

/* _LAST_HEADER.match(buf, lo, end): the newline that starts the last header in buf[lo:end], or -1. */
static Py_ssize_t
last_header(const unsigned char *p, Py_ssize_t lo, Py_ssize_t end)
{
    Py_ssize_t to = end;
    while (to > lo) {
        const unsigned char *q = memrchr(p + lo, '\n', (size_t)(to - lo));
        if (q == NULL)
            return -1;
        Py_ssize_t i = q - p;
        if (header_at(p, i, end))
            return i;
        to = i;
    }
    return -1;
}

static Py_ssize_t
count_range(const unsigned char *p, Py_ssize_t from, Py_ssize_t to)
{
    return to > from ? count_nl(p + from, to - from) : 0;
}

/* LargeVmaScanner._line_at: the number of the line that starts at buf[index]. */
static long long
line_at(FdScan *s, Py_ssize_t index)
{
    if (index <= s->scanned)
        return s->lines - count_range(s->buf, index, s->scanned) + 1;
    return s->lines + count_range(s->buf, s->scanned, index) + 1;
}

/* LargeVmaScanner._take: hand buf[start:end] to take(file offset, block, newlines before it); a false
 * answer means the block failed to parse: no more candidates are taken. -1 on a Python error. */
static int
take(FdScan *s, PyObject *take_cb, Py_ssize_t start, Py_ssize_t end)
{
    PyObject *block = PyBytes_FromStringAndSize((const char *)s->buf + start, end - start);
    if (block == NULL)
        return -1;
    PyObject *r = PyObject_CallFunction(take_cb, "LOL", s->base + (long long)start, block, line_at(s, start) - 1);
    Py_DECREF(block);
    if (r == NULL)
        return -1;
    int ok = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (ok < 0)
        return -1;
    if (!ok)
        s->stop = 1;
    return 0;
}

static int
push_pending(FdScan *s, long long offset)
{
    if (s->npending == s->cap_pending) {
        Py_ssize_t cap = s->cap_pending ? s->cap_pending * 2 : 16;
        long long *grown = PyMem_Realloc(s->pending, (size_t)cap * sizeof(long long));
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        s->pending = grown;
        s->cap_pending = cap;
    }
    s->pending[s->npending++] = offset;
    return 0;
}

/* LargeVmaScanner._resolve_pending. */
static int
resolve_pending(FdScan *s, PyObject *take_cb, Py_ssize_t cut)
{
    long long from = s->pending_from - s->base;
    Py_ssize_t m = next_header(s->buf, from > 0 ? (Py_ssize_t)from : 0, cut);
    if (m < 0) {
        s->pending_from = s->base + (cut - 1 > 0 ? cut - 1 : 0);
        return 0;
    }
    Py_ssize_t np = s->npending;
    s->npending = 0;
    for (Py_ssize_t k = 0; k < np; k++)
        if (!s->stop && take(s, take_cb, (Py_ssize_t)(s->pending[k] - s->base), m + 1) < 0)
            return -1;
    return 0;
}

/* LargeVmaScanner.filled(got), for the bytes just read into buf[n:n+got]. 0, or -1 on a Python error. */
static int
filled(FdScan *s, Py_ssize_t got, Py_ssize_t min_digits, unsigned long long min_value, PyObject *header_cb,
       PyObject *take_cb)
{
    if (got <= 0)
        return 0;
    unsigned char *buf = s->buf;
    Py_ssize_t n = s->n = s->n + got;
    s->total += got;
    s->last_byte = buf[n - 1];
    const unsigned char *nlq = memrchr(buf + s->scanned, '\n', (size_t)(n - s->scanned));
    if (nlq == NULL)
        return 0; /* no complete new line yet */
    Py_ssize_t cut = nlq - buf + 1;
    Py_ssize_t lo = s->scanned > 0 ? s->scanned - 1 : 0; /* from the newline before the first new line */
    long long counted;
    if (s->draining) {
        counted = count_range(buf, s->scanned, cut);
    } else {
        Py_BEGIN_ALLOW_THREADS
        counted = fused_pass(s, s->scanned, cut, lo, min_digits, min_value);
        Py_END_ALLOW_THREADS
        if (counted < 0) {
            PyErr_NoMemory();
            return -1;
        }
    }
    if (s->first_nl < 0) {
        const unsigned char *f = memchr(buf, '\n', (size_t)cut);
        s->first_nl = f - buf; /* the base is 0 until a first newline is seen */
        PyObject *r = PyObject_CallFunction(header_cb, "y#", (const char *)buf, (Py_ssize_t)s->first_nl);
        if (r == NULL)
            return -1;
        int ok = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (ok < 0)
            return -1;
        if (!ok)
            s->draining = 1;
    }
    if (s->draining) {
        s->lines += counted;
        s->base += n;
        s->n = s->scanned = s->block = 0;
        return 0;
    }
    if (s->npending && resolve_pending(s, take_cb, cut) < 0)
        return -1;
    if (s->first_block == NULL) {
        long long from = s->first_nl - s->base;
        Py_ssize_t m = next_header(buf, from > lo ? (Py_ssize_t)from : lo, cut);
        if (m >= 0 && (s->first_block = PyBytes_FromStringAndSize((const char *)buf, m + 1)) == NULL)
            return -1;
    }
    for (Py_ssize_t k = 0; k < s->ncands && !s->stop; k++) {
        Py_ssize_t newline = s->cands[k];
        const unsigned char *h = newline > 0 ? memrchr(buf, '\n', (size_t)newline) : NULL;
        Py_ssize_t start = h ? h - buf + 1 : 0; /* the header: the line before `Size:` */
        if (s->npending) {
            if (push_pending(s, s->base + start) < 0)
                return -1;
            continue;
        }
        Py_ssize_t m = next_header(buf, newline + 1, cut);
        if (m < 0) { /* the block goes on past this chunk */
            if (push_pending(s, s->base + start) < 0)
                return -1;
            s->pending_from = s->base + cut - 1;
            continue;
        }
        if (take(s, take_cb, start, m + 1) < 0)
            return -1;
    }
    if (!s->vmflags) { /* a VmFlags line anywhere but at the file's very start */
        Py_ssize_t from = lo == 0 && s->base == 0 ? lo + 1 : lo;
        s->vmflags = cut > from && memmem(buf + from, (size_t)(cut - from), "\nVmFlags:", 9) != NULL;
    }
    Py_ssize_t m = last_header(buf, lo, cut);
    if (m >= 0)
        s->block = m + 1;
    if (s->stop)
        s->draining = 1;
    /* Keep the last block (with the newline before it) and the partial line; drop the rest. */
    Py_ssize_t keep = s->block > 0 ? s->block - 1 : 0;
    if (s->draining)
        keep = n;
    if (keep > 0) {
        memmove(buf, buf + keep, (size_t)(n - keep));
        s->base += keep;
        s->n = n - keep;
        s->block -= keep < s->block ? keep : s->block;
    }
    s->scanned = cut > keep ? cut - keep : 0;
    s->lines += counted;
    return 0;
}

/* read() until `want` bytes are in dst or the file ends, the GIL released; a signal's handler runs
 * between reads (as os.read does on EINTR). Returns the bytes read, or -1 with OSError set. */
static Py_ssize_t
read_full(int fd, unsigned char *dst, Py_ssize_t want)
{
    Py_ssize_t got = 0;
    for (;;) {
        ssize_t r = 0;
        int err = 0;
        Py_BEGIN_ALLOW_THREADS
        while (got < want) {
            r = read(fd, dst + got, (size_t)(want - got));
            if (r <= 0) {
                if (r < 0)
                    err = errno;
                break;
            }
            got += r;
        }
        Py_END_ALLOW_THREADS
        if (r < 0 && err == EINTR) {
            if (PyErr_CheckSignals() < 0)
                return -1;
            continue;
        }
        if (r < 0) {
            /* EAGAIN included: HostRoot opens non-blocking and reads only regular files, which never
             * answer it; were one to, it is an error, not the end of the file. */
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        return got;
    }
}

/* Room for `need` bytes from buf on. The allocation is page-aligned (posix_memalign) so that the
 * offset of buf within a page is known (align_for_read). */
static int
reserve(FdScan *s, Py_ssize_t need)
{
    Py_ssize_t pad = s->mem ? s->buf - s->mem : 0;
    if (s->mem != NULL && s->cap >= pad + need)
        return 0;
    void *grown = NULL; /* a block longer than a chunk (only a mangled file), or the first use */
    if (posix_memalign(&grown, 4096, (size_t)(pad + need)) != 0) {
        PyErr_NoMemory();
        return -1;
    }
    if (s->mem != NULL) {
        memcpy((unsigned char *)grown + pad, s->buf, (size_t)s->n);
        free(s->mem);
    }
    s->mem = grown;
    s->buf = s->mem + pad;
    s->cap = pad + need;
    return 0;
}

/* Place the held bytes so that the next read() lands on a 64-byte boundary of the (page-aligned)
 * allocation. The kernel copies a page-cache page to where read() asks; a destination a few bytes
 * past the source's offset within a page (the carried tail is any length) makes the CPU see its
 * loads as depending on its own earlier stores (4K aliasing): on the benchmark machine a read() into
 * buf + 1 to buf + 16 of a page cost 3 to 9 times one into buf + 0 or buf + 64 (docs/benchmarks.md).
 * Moving the tail (about a kilobyte) costs far less; a held region past 64 KiB (only a mangled file)
 * is left where it is. */
static void
align_for_read(FdScan *s)
{
    if (s->mem == NULL || s->n > 65536)
        return;
    Py_ssize_t pad = (64 - s->n % 64) % 64;
    if (s->buf != s->mem + pad) {
        memmove(s->mem + pad, s->buf, (size_t)s->n);
        s->buf = s->mem + pad;
    }
}

/* A scanner keeps a buffer grown by a huge block up to this much (smaps._KEEP_BYTES). */
#define FDSCAN_KEEP_BYTES (4 * 1024 * 1024)

static void
reset(FdScan *s)
{
    s->n = s->scanned = s->block = 0;
    s->base = s->lines = s->total = 0;
    s->last_byte = -1;
    s->first_nl = -1;
    Py_CLEAR(s->first_block);
    s->npending = 0;
    s->pending_from = 0;
    s->vmflags = s->stop = s->draining = 0;
    s->ncands = 0;
}

PyDoc_STRVAR(fdscan_run_doc,
"run(fd, limit, min_digits, min_value, deadline, clock, header, take, /) -> int\n\n"
"Read the open file fd to its end in chunks into this scanner's buffer, scanning each as\n"
"LargeVmaScanner.filled does. header(first_line) -> bool judges the first line; take(offset, block,\n"
"line_base) -> bool parses a candidate block (False: it failed, take no more). After each chunk:\n"
"more than limit bytes read -> 1; clock() > deadline -> 2. 0 at the end of the file. OSError for a\n"
"failed read(). state() then holds what finish() needs.");

static PyObject *
fdscan_run(FdScan *s, PyObject *args)
{
    int fd;
    long long limit;
    Py_ssize_t min_digits;
    unsigned long long min_value;
    double deadline;
    PyObject *clock, *header_cb, *take_cb;
    if (!PyArg_ParseTuple(args, "iLnKdOOO:run", &fd, &limit, &min_digits, &min_value, &deadline, &clock, &header_cb, &take_cb))
        return NULL;
    if (min_digits < 1) {
        PyErr_SetString(PyExc_ValueError, "min_digits must be at least 1");
        return NULL;
    }
    reset(s);
    if (s->cap > FDSCAN_KEEP_BYTES) {
        free(s->mem);
        s->mem = s->buf = NULL;
        s->cap = 0;
    }
    for (;;) {
        align_for_read(s);
        if (reserve(s, s->n + s->chunk + 64) < 0)
            return NULL;
        Py_ssize_t got = read_full(fd, s->buf + s->n, s->chunk);
        if (got < 0)
            return NULL;
        if (s->total + got > limit) /* as hostroot._stream: the bound is checked before the chunk is scanned */
            return PyLong_FromLong(1);
        if (filled(s, got, min_digits, min_value, header_cb, take_cb) < 0)
            return NULL;
        PyObject *now = PyObject_CallNoArgs(clock);
        if (now == NULL)
            return NULL;
        double t = PyFloat_AsDouble(now);
        Py_DECREF(now);
        if (t == -1.0 && PyErr_Occurred())
            return NULL;
        if (t > deadline)
            return PyLong_FromLong(2);
        if (got < s->chunk) /* a read loop stops short only at the end of the file */
            return PyLong_FromLong(0);
    }
}

PyDoc_STRVAR(fdscan_state_doc,
"state() -> (total, lines, last_byte, first_block, tail, base, block, scanned, pending, vmflags)\n\n"
"After run(): the LargeVmaScanner fields of the same names; tail is the carried buffer (buf[:n]).");

static PyObject *
fdscan_state(FdScan *s, PyObject *Py_UNUSED(ignored))
{
    PyObject *pending = PyList_New(s->npending);
    if (pending == NULL)
        return NULL;
    for (Py_ssize_t k = 0; k < s->npending; k++) {
        PyObject *v = PyLong_FromLongLong(s->pending[k]);
        if (v == NULL) {
            Py_DECREF(pending);
            return NULL;
        }
        PyList_SET_ITEM(pending, k, v);
    }
    return Py_BuildValue("(LLiOy#LnnNO)", s->total, s->lines, s->last_byte, s->first_block ? s->first_block : Py_None,
                         (const char *)s->buf, s->n, s->base, s->block, s->scanned, pending, s->vmflags ? Py_True : Py_False);
}

PyDoc_STRVAR(fdscan_drain_doc,
"drain(fd, count=False, /) -> int\n\n"
"Read fd to its end into this scanner's buffer, a chunk at a time, and scan nothing: the floor of\n"
"run() (bench/smaps_cost.py measures it against `cat`). Returns the bytes read. With count true,\n"
"each chunk's newlines are counted while it is in cache, by the fastest loop this CPU has, and the\n"
"count is returned: the least any scan that can name an error's line must do on top of the read.");

#ifdef SMAPSCAN_X86
__attribute__((target("avx512bw,avx512f,popcnt")))
static Py_ssize_t
count_nl_avx512(const unsigned char *p, Py_ssize_t n)
{
    const __m512i nl = _mm512_set1_epi8('\n');
    Py_ssize_t count = 0, i = 0;
    for (; n - i >= 64; i += 64)
        count += __builtin_popcountll((uint64_t)_mm512_cmpeq_epi8_mask(_mm512_loadu_si512((const void *)(p + i)), nl));
    return count + count_nl(p + i, n - i);
}
#endif

static PyObject *
fdscan_drain(FdScan *s, PyObject *args)
{
    int fd, count = 0;
    if (!PyArg_ParseTuple(args, "i|p:drain", &fd, &count))
        return NULL;
    reset(s); /* the floor of run(): its reads land where run() puts its first */
    align_for_read(s);
    if (reserve(s, s->chunk) < 0)
        return NULL;
    long long total = 0, newlines = 0;
    for (;;) {
        Py_ssize_t got = read_full(fd, s->buf, s->chunk);
        if (got < 0)
            return NULL;
        total += got;
        if (count) {
#ifdef SMAPSCAN_X86
            if (cpu_level == 2)
                newlines += count_nl_avx512(s->buf, got);
            else
#endif
                newlines += count_nl(s->buf, got);
        }
        if (got < s->chunk)
            return PyLong_FromLongLong(count ? newlines : total);
    }
}

static int
fdscan_init(FdScan *s, PyObject *args, PyObject *kwds)
{
    Py_ssize_t chunk;
    static char *kwlist[] = {"chunk_bytes", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "n:FdScan", kwlist, &chunk))
        return -1;
    if (chunk < 1) {
        PyErr_SetString(PyExc_ValueError, "chunk_bytes must be at least 1");
        return -1;
    }
    s->chunk = chunk;
    reset(s);
    return reserve(s, chunk + 4096);
}

static void
fdscan_dealloc(FdScan *s)
{
    Py_CLEAR(s->first_block);
    free(s->mem);
    PyMem_Free(s->pending);
    free(s->cands);
    free(s->hits);
    free(s->zmask);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static PyMethodDef fdscan_methods[] = {
    {"run", (PyCFunction)fdscan_run, METH_VARARGS, fdscan_run_doc},
    {"state", (PyCFunction)fdscan_state, METH_NOARGS, fdscan_state_doc},
    {"drain", (PyCFunction)fdscan_drain, METH_VARARGS, fdscan_drain_doc},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject FdScanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "eptwatch.agent.sources._smapscan.FdScan",
    .tp_doc = PyDoc_STR("FdScan(chunk_bytes): the read-and-scan loop of smaps.LargeVmaScanner over an open fd."),
    .tp_basicsize = sizeof(FdScan),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)fdscan_init,
    .tp_dealloc = (destructor)fdscan_dealloc,
    .tp_methods = fdscan_methods,
};

PyDoc_STRVAR(force_level_doc,
"_force_level(level, /) -> int\n\n"
"For tests: run FdScan's pass with AVX-512 (2), AVX2 (1) or plain C (0) from now on, if this CPU has\n"
"it (a level it lacks is lowered to one it has). Returns the level in force before.");

static PyObject *
force_level(PyObject *module, PyObject *args)
{
    int level;
    if (!PyArg_ParseTuple(args, "i:_force_level", &level))
        return NULL;
    int before = 0, best = 0;
#ifdef SMAPSCAN_X86
    before = cpu_level;
    best = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
    cpu_level = level < 0 ? 0 : level > best ? best : level;
#endif
    (void)best;
    return PyLong_FromLong(before);
}

static PyMethodDef smapscan_methods[] = {
    {"_force_level", force_level, METH_VARARGS, force_level_doc},
    {"big_size_lines", big_size_lines, METH_VARARGS, big_size_lines_doc},
    {"block_fields", block_fields, METH_VARARGS, block_fields_doc},
    {"plain_block", plain_block, METH_VARARGS, plain_block_doc},
    {"count_newlines", count_newlines, METH_VARARGS, count_newlines_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef smapscan_module = {
    PyModuleDef_HEAD_INIT, "_smapscan", "Compiled candidate search for eptwatch.agent.sources.smaps.", 0, smapscan_methods,
};

PyMODINIT_FUNC
PyInit__smapscan(void)
{
#ifdef SMAPSCAN_X86
    __builtin_cpu_init();
    cpu_level = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
#endif
    if (PyType_Ready(&FdScanType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&smapscan_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&FdScanType);
    if (PyModule_AddObject(m, "FdScan", (PyObject *)&FdScanType) < 0) {
        Py_DECREF(&FdScanType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
