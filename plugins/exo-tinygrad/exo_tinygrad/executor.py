"""A small C thread pool that runs a captured graph's CPU kernels: one call per step.

tinygrad 0.14 runs a CPU kernel's THREAD parts one after another, and calling ~330 kernels
from Python costs microseconds each. This pool runs a whole list of kernels in C: every
kernel split into parts (tinygrad's THREAD opt gives it a `core_id` argument) has its parts
shared out over the threads; a kernel without parts runs on the calling thread; all threads
meet at a spinning barrier after each kernel (the next one may read what it wrote). Between
steps the workers spin briefly, then sleep on a condition variable, so an idle engine does
not burn the cores.

The library is compiled once with the C compiler tinygrad uses (`$CC`, default clang) into
EXO_HOME and loaded with ctypes; when that fails (no compiler, an unknown platform) `Pool.get`
returns None and kernels run one by one from Python.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import ClassVar

import numpy as np

MAX_ARGS = 32

_HEADER = r"""
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <sched.h>

typedef struct {
  void *fn;
  int32_t nargs, parts, core_slot, pad;
  uint64_t *args;
} kern_t;

typedef struct {
  int n;
  pthread_t *threads;
  pthread_mutex_t mu;
  pthread_cond_t cv;
  _Atomic uint64_t gen;
  _Atomic int stop;
  _Atomic int count;
  _Atomic int sense;
  _Atomic int finished;
  const kern_t *kernels;
  int nk;
  long spin_ns;
  int main_sense;  /* the calling thread's barrier sense (one caller at a time) */
} pool_t;

static inline void relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

static long now_ns(void) {
  struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000L + ts.tv_nsec;
}
"""

_FOOTER = r"""
static void barrier(pool_t *p, int *sense) {
  *sense = !*sense;
  if (atomic_fetch_add_explicit(&p->count, 1, memory_order_acq_rel) == p->n - 1) {
    atomic_store_explicit(&p->count, 0, memory_order_relaxed);
    atomic_store_explicit(&p->sense, *sense, memory_order_release);
  } else {
    /* spin, then yield: on a busy host the other thread may be waiting for this core */
    for (int spins = 0; atomic_load_explicit(&p->sense, memory_order_acquire) != *sense; spins++) {
      if (spins < 4096) relax(); else sched_yield();
    }
  }
}

/* Threads meet only around split kernels: before one (what thread 0 wrote is visible) and
   after it (its parts are all done); runs of unsplit kernels go on thread 0 alone. */
static void run_part(pool_t *p, int t, int *sense) {
  int synced = 1;  /* every thread starts a run together */
  for (int i = 0; i < p->nk; i++) {
    const kern_t *k = &p->kernels[i];
    if (k->parts > 0 && p->n > 1) {
      if (!synced) barrier(p, sense);
      for (int part = t; part < k->parts; part += p->n) call(k, part);
      barrier(p, sense);
      synced = 1;
    } else {
      if (t == 0) { if (k->parts > 0) { for (int part = 0; part < k->parts; part++) call(k, part); } else call(k, -1); }
      synced = 0;
    }
  }
}

typedef struct { pool_t *p; int t; } arg_t;

static void *worker(void *vp) {
  arg_t a = *(arg_t *)vp; free(vp);
  pool_t *p = a.p;
  int sense = 0;
  uint64_t seen = 0;
  for (;;) {
    long start = now_ns();
    int spins = 0;
    while (atomic_load_explicit(&p->gen, memory_order_acquire) == seen && !atomic_load(&p->stop)) {
      relax();
      if (++spins % 256 == 0 && now_ns() - start > p->spin_ns) {
        pthread_mutex_lock(&p->mu);
        while (atomic_load(&p->gen) == seen && !atomic_load(&p->stop)) pthread_cond_wait(&p->cv, &p->mu);
        pthread_mutex_unlock(&p->mu);
      }
    }
    if (atomic_load(&p->stop)) return NULL;
    seen = atomic_load(&p->gen);
    run_part(p, a.t, &sense);
    atomic_fetch_add_explicit(&p->finished, 1, memory_order_release);
  }
}

void *pool_new(int n, long spin_ns) {
  pool_t *p = calloc(1, sizeof(pool_t));
  p->n = n < 1 ? 1 : n;
  p->spin_ns = spin_ns;
  pthread_mutex_init(&p->mu, NULL);
  pthread_cond_init(&p->cv, NULL);
  p->threads = calloc(p->n, sizeof(pthread_t));
  for (int t = 1; t < p->n; t++) {
    arg_t *a = malloc(sizeof(arg_t)); a->p = p; a->t = t;
    pthread_create(&p->threads[t], NULL, worker, a);
  }
  return p;
}

void pool_run(void *vp, const kern_t *kernels, int nk) {
  pool_t *p = vp;
  p->kernels = kernels; p->nk = nk;
  atomic_store(&p->finished, 0);
  pthread_mutex_lock(&p->mu);
  atomic_fetch_add_explicit(&p->gen, 1, memory_order_release);
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  run_part(p, 0, &p->main_sense);
  while (atomic_load_explicit(&p->finished, memory_order_acquire) < p->n - 1) relax();
}

void pool_free(void *vp) {
  pool_t *p = vp;
  pthread_mutex_lock(&p->mu);
  atomic_store(&p->stop, 1);
  pthread_cond_broadcast(&p->cv);
  pthread_mutex_unlock(&p->mu);
  for (int t = 1; t < p->n; t++) pthread_join(p->threads[t], NULL);
  free(p->threads); free(p);
}
"""


def _source() -> str:
    """The C source: a `call` that passes a kernel's uint64 arguments by count."""
    lines = [
        "static void call(const kern_t *k, int part) {",
        f"  uint64_t a[{MAX_ARGS}];",
        "  memcpy(a, k->args, k->nargs * sizeof(uint64_t));",
        "  if (part >= 0) a[k->core_slot] = (uint64_t)part;",
        "  switch (k->nargs) {",
    ]
    for n in range(MAX_ARGS + 1):
        types = ", ".join(["uint64_t"] * n) or "void"
        args = ", ".join(f"a[{i}]" for i in range(n))
        lines.append(f"    case {n}: ((void (*)({types}))k->fn)({args}); break;")
    lines += ["  }", "}"]
    return _HEADER + "\n".join(lines) + "\n" + _FOOTER


class Kernels(ctypes.Structure):
    _fields_ = [
        ("fn", ctypes.c_void_p),
        ("nargs", ctypes.c_int32),
        ("parts", ctypes.c_int32),
        ("core_slot", ctypes.c_int32),
        ("pad", ctypes.c_int32),
        ("args", ctypes.c_void_p),
    ]


_lib: ctypes.CDLL | None = None
_lib_failed = False
_lock = threading.Lock()


def supported() -> bool:
    """Platforms where every kernel argument passed as a uint64 is what the kernel reads."""
    return platform.system() == "Linux" and platform.machine().lower() in ("x86_64", "amd64", "aarch64")


def library() -> ctypes.CDLL | None:
    """The compiled pool library (built on first use), or None when it cannot be built."""
    global _lib, _lib_failed
    with _lock:
        if _lib is not None or _lib_failed:
            return _lib
        if not supported() or os.environ.get("EXO_TINYGRAD_POOL", "1") == "0":
            _lib_failed = True
            return None
        try:
            _lib = _build()
        except (OSError, subprocess.SubprocessError):
            _lib_failed = True
        return _lib


def _build() -> ctypes.CDLL:
    from exo_core import exo_home

    source = _source()
    compiler = os.environ.get("CC", "clang")
    digest = hashlib.sha256((source + compiler + platform.machine()).encode()).hexdigest()[:16]
    directory = exo_home() / "cache" / "tinygrad"
    path = directory / f"pool-{digest}.so"
    if not path.is_file():
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            c_file, out = Path(tmp) / "pool.c", Path(tmp) / "pool.so"
            c_file.write_text(source)
            subprocess.run(
                [compiler, "-O2", "-shared", "-fPIC", "-pthread", "-o", str(out), str(c_file)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            fd, tmp_target = tempfile.mkstemp(dir=directory, suffix=".so.tmp")
            with os.fdopen(fd, "wb") as f:  # then renamed: concurrent builders never clash
                f.write(out.read_bytes())
            os.replace(tmp_target, path)
    lib = ctypes.CDLL(str(path))
    lib.pool_new.restype = ctypes.c_void_p
    lib.pool_new.argtypes = [ctypes.c_int, ctypes.c_long]
    lib.pool_run.restype = None
    lib.pool_run.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    lib.pool_free.restype = None
    lib.pool_free.argtypes = [ctypes.c_void_p]
    return lib


class Pool:
    """`threads` threads (the caller counts as one) running kernel lists."""

    _shared: ClassVar[dict[int, Pool]] = {}

    def __init__(self, lib: ctypes.CDLL, threads: int, spin_us: int = 300) -> None:
        self.lib = lib
        self.threads = threads
        self.handle = lib.pool_new(threads, spin_us * 1000)

    @classmethod
    def get(cls, threads: int) -> Pool | None:
        """The process's pool of `threads` threads (None when the library is unavailable)."""
        lib = library()
        if lib is None:
            return None
        with _lock:
            pool = cls._shared.get(threads)
            if pool is None:
                pool = cls._shared[threads] = cls(lib, threads)
            return pool

    def run(self, kernels: ctypes.Array, count: int) -> None:
        self.lib.pool_run(self.handle, ctypes.addressof(kernels), count)


class Program:
    """A kernel list ready for `Pool.run`: fixed arguments filled in once; the slots that
    change per call (input addresses, variable values) are written through `set`."""

    def __init__(self, calls: list[tuple[int, list[int], int, int]]) -> None:
        """calls: (function address, fixed argument values, parts (0: none), core_id slot)."""
        sizes = [len(args) for _, args, _, _ in calls]
        if any(n > MAX_ARGS for n in sizes):
            raise ValueError("a kernel has too many arguments for the pool")
        self.args = np.zeros(max(1, sum(sizes)), dtype=np.uint64)
        self.kernels = (Kernels * len(calls))()
        self.count = len(calls)
        base = self.args.ctypes.data
        offset = 0
        self.offsets: list[int] = []
        for k, (fn, args, parts, core_slot) in zip(self.kernels, calls, strict=True):
            self.args[offset : offset + len(args)] = args
            k.fn, k.nargs, k.parts, k.core_slot = fn, len(args), parts, core_slot
            k.args = base + offset * 8
            self.offsets.append(offset)
            offset += len(args)
