/* The timing harness of tools/simd_microbench.c and tools/apply_microbench.c:
 * a monotonic clock and TIME(label, nelem, reps, stmt), which prints the best
 * of seven trials of `reps` executions of stmt, in ns per element. */
#ifndef CNORM_MICROBENCH_TIMING_H
#define CNORM_MICROBENCH_TIMING_H
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* the empty asm with a memory clobber keeps the compiler from merging or
 * dropping repeated executions of stmt */
#define TIME(label, nelem, reps, stmt) do {                                       \
    double best_ = 1e30;                                                         \
    for (int trial_ = 0; trial_ < 7; trial_++) {                                 \
        double t_ = now();                                                       \
        for (int r_ = 0; r_ < (reps); r_++) {                                    \
            stmt;                                                                \
            __asm__ volatile("" ::: "memory");                                   \
        }                                                                        \
        t_ = (now() - t_) / (reps) / (nelem) * 1e9;                              \
        if (t_ < best_) best_ = t_;                                              \
    }                                                                            \
    printf("%-24s %7.3f ns/elem\n", label, best_);                               \
} while (0)

#endif
