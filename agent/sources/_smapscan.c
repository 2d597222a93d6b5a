/* The candidate search of smaps.scan_large_vmas, compiled: the offsets of the `\nSize:` lines whose
 * kB value has at least `min_digits` digits. It finds exactly what smaps._big_size_pattern finds
 * (tests/test_smaps.py checks the two against each other on random and mutated input).
 *
 * Why C: that search is one pass over the whole smaps file (7.5 MB for 10,000 VMAs), and Python's
 * regex engine steps through it byte by byte, 16% of what the kernel spends producing the file on
 * the benchmark machine. memchr runs at memory speed; the pass here costs about a tenth of the
 * regex (docs/benchmarks.md). The module is optional: without a compiler the build skips it and the
 * agent uses the regex, and says so (smaps.SCANNER).
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

static PyMethodDef smapscan_methods[] = {
    {"big_size_lines", big_size_lines, METH_VARARGS, big_size_lines_doc},
    {"count_newlines", count_newlines, METH_VARARGS, count_newlines_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef smapscan_module = {
    PyModuleDef_HEAD_INIT, "_smapscan", "Compiled candidate search for eptwatch.agent.sources.smaps.", 0, smapscan_methods,
};

PyMODINIT_FUNC
PyInit__smapscan(void)
{
    return PyModule_Create(&smapscan_module);
}
