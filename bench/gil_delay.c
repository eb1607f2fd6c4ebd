// LD_PRELOAD shim for bench/stress_dist.py --gil-delay-ms: makes issue 15's exit race (a gloo worker thread
// that takes the GIL while the interpreter shuts down) happen on most runs instead of one in hundreds.
//
// A thread whose name contains "gloo" and asks for the GIL (PyEval_AcquireThread: pybind11's
// gil_scoped_acquire, reached when the thread frees a tensor's Python object; PyGILState_Ensure) waits first,
// until the interpreter is finalizing or GIL_DELAY_MAX_MS milliseconds have passed: the same as that thread
// being descheduled by a loaded machine at the worst moment. Other threads are untouched.
//
//     gcc -shared -fPIC -O1 -o gil_delay.so bench/gil_delay.c -ldl -lpthread
//     GIL_DELAY_MAX_MS=30 LD_PRELOAD=$PWD/gil_delay.so torchrun ...
// GIL_DELAY_BACKTRACE=1 also prints where each delayed request comes from.
#define _GNU_SOURCE
#include <dlfcn.h>
#include <execinfo.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

typedef int (*flag_fn)(void);
typedef int (*ensure_fn)(void);
typedef void (*acquire_fn)(void*);

static void delay_gloo_thread(const char* entry) {
  static flag_fn finalizing;
  if (!finalizing) finalizing = (flag_fn)dlsym(RTLD_DEFAULT, "_Py_IsFinalizing");
  char name[32] = {0};
  pthread_getname_np(pthread_self(), name, sizeof name);
  if (!strstr(name, "gloo") || !finalizing) return;
  const char* env = getenv("GIL_DELAY_MAX_MS");
  int max_ms = env ? atoi(env) : 30, waited = 0;
  if (getenv("GIL_DELAY_BACKTRACE")) {
    fprintf(stderr, "[gil_delay] thread %s asks for the GIL (%s) from:\n", name, entry);
    void* frames[16];
    backtrace_symbols_fd(frames, backtrace(frames, 16), 2);
  }
  while (!finalizing() && waited < max_ms) {
    usleep(1000);
    waited++;
  }
  fprintf(stderr, "[gil_delay] thread %s takes the GIL after %d ms (interpreter finalizing: %d)\n", name, waited,
          finalizing());
}

void PyEval_AcquireThread(void* tstate) {
  static acquire_fn real;
  if (!real) real = (acquire_fn)dlsym(RTLD_NEXT, "PyEval_AcquireThread");
  delay_gloo_thread("PyEval_AcquireThread");
  real(tstate);
}

int PyGILState_Ensure(void) {
  static ensure_fn real;
  if (!real) real = (ensure_fn)dlsym(RTLD_NEXT, "PyGILState_Ensure");
  delay_gloo_thread("PyGILState_Ensure");
  return real();
}
