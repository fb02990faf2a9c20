/* Hand-written reference kernels for one conjugate-gradient step on M = I - alpha W, W in
 * padded neighbour lists (the library's Graph: int32 ids [n, K], float32 weights [n, K],
 * padding weight 0), right-hand sides [n, B] row-major (node axis first, as the library's
 * CG holds them). Used by experiments/step_floor.py to measure what a CPU step costs when
 * written by hand: the floor under the library's compiled loop. Not part of the library.
 *
 *   ell_product:  y = x - alpha W x                      (the product alone)
 *   update_pass:  p = r + b p; x += a p; r -= a q        (the least vector work a CG step
 *                                                          does: 4 arrays read, 3 written)
 *   cg_fused:     `steps` steps of CG from x0 = 0 in the Chronopoulos-Gear form (one
 *                 product pass that also forms r.r and r.Mr, one update pass): two passes
 *                 over the state per step instead of the textbook's five.
 *
 * OpenMP over rows; the B columns are processed in chunks of CH so the accumulator stays in
 * registers. Build: cc -O3 -march=native -fopenmp -shared -fPIC step_floor.c
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define CH 64
#define ROWS 256

static inline void row_product(int K, int B, const int32_t *ii, const float *wi, float alpha,
                               const float *x, const float *xi, float *yi) {
  for (int c0 = 0; c0 < B; c0 += CH) {
    int len = B - c0 < CH ? B - c0 : CH;
    float acc[CH];
    for (int c = 0; c < CH; c++) acc[c] = 0.f;
    for (int j = 0; j < K; j++) {
      float wij = wi[j];
      if (wij == 0.f) continue;
      const float *xr = x + (int64_t)ii[j] * B + c0;
      if (len == CH) { for (int c = 0; c < CH; c++) acc[c] += wij * xr[c]; }
      else { for (int c = 0; c < len; c++) acc[c] += wij * xr[c]; }
    }
    for (int c = 0; c < len; c++) yi[c0 + c] = xi[c0 + c] - alpha * acc[c];
  }
}

void ell_product(int n, int K, int B, const int32_t *idx, const float *w, float alpha,
                 const float *x, float *y) {
#pragma omp parallel for schedule(static)
  for (int i = 0; i < n; i++)
    row_product(K, B, idx + (int64_t)i * K, w + (int64_t)i * K, alpha, x, x + (int64_t)i * B,
                y + (int64_t)i * B);
}

void update_pass(int n, int B, float *x, float *r, float *p, const float *q, const float *a,
                 const float *b) {
#pragma omp parallel for schedule(static)
  for (int i = 0; i < n; i++) {
    float *xi = x + (int64_t)i * B, *ri = r + (int64_t)i * B, *pi = p + (int64_t)i * B;
    const float *qi = q + (int64_t)i * B;
    for (int c = 0; c < B; c++) {
      float pv = ri[c] + b[c] * pi[c];
      pi[c] = pv;
      xi[c] += a[c] * pv;
      ri[c] -= a[c] * qi[c];
    }
  }
}

/* returns 0, or -1 when out of memory */
int cg_fused(int n, int K, int B, const int32_t *idx, const float *w, float alpha, const float *rhs,
             float *x, float *r, float *p, float *s, float *q, int steps) {
  int nt = omp_get_max_threads();
  double *part = malloc(sizeof(double) * (size_t)nt * 2 * B);
  double *g_old = malloc(sizeof(double) * (size_t)B);
  float *a = malloc(sizeof(float) * (size_t)B), *be = malloc(sizeof(float) * (size_t)B);
  float *a_old = malloc(sizeof(float) * (size_t)B);
  if (!part || !g_old || !a || !be || !a_old) {
    free(part); free(g_old); free(a); free(be); free(a_old);
    return -1;
  }
  size_t bytes = sizeof(float) * (size_t)n * B;
  memset(x, 0, bytes); memcpy(r, rhs, bytes); memset(p, 0, bytes); memset(s, 0, bytes);
  for (int step = 0; step < steps; step++) {
    memset(part, 0, sizeof(double) * (size_t)nt * 2 * B);
#pragma omp parallel
    {
      int t = omp_get_thread_num();
      double *gt = part + (size_t)t * 2 * B, *dt = gt + B;
      float *g32 = calloc(2 * (size_t)B, sizeof(float)), *d32 = g32 ? g32 + B : NULL;
#pragma omp for schedule(static)
      for (int i = 0; i < n; i++) {   /* float sums over blocks of ROWS rows, double across them */
        const float *ri = r + (int64_t)i * B;
        float *qi = q + (int64_t)i * B;
        row_product(K, B, idx + (int64_t)i * K, w + (int64_t)i * K, alpha, r, ri, qi);
        if (!g32) { for (int c = 0; c < B; c++) { gt[c] += ri[c] * ri[c]; dt[c] += ri[c] * qi[c]; } continue; }
        for (int c = 0; c < B; c++) { g32[c] += ri[c] * ri[c]; d32[c] += ri[c] * qi[c]; }
        if (i % ROWS == ROWS - 1)
          for (int c = 0; c < B; c++) { gt[c] += g32[c]; dt[c] += d32[c]; g32[c] = 0.f; d32[c] = 0.f; }
      }
      if (g32) for (int c = 0; c < B; c++) { gt[c] += g32[c]; dt[c] += d32[c]; }
      free(g32);
    }
    for (int c = 0; c < B; c++) {
      double g = 0, d = 0;
      for (int t = 0; t < nt; t++) { g += part[(size_t)t * 2 * B + c]; d += part[(size_t)t * 2 * B + B + c]; }
      if (g == 0) { be[c] = 0; a[c] = 0; }
      else if (step == 0) { be[c] = 0; a[c] = (float)(g / d); }
      else { be[c] = (float)(g / g_old[c]); a[c] = (float)(g / (d - be[c] * g / a_old[c])); }
      g_old[c] = g; a_old[c] = a[c];
    }
#pragma omp parallel for schedule(static)
    for (int i = 0; i < n; i++) {
      float *xi = x + (int64_t)i * B, *ri = r + (int64_t)i * B, *pi = p + (int64_t)i * B,
            *si = s + (int64_t)i * B;
      const float *qi = q + (int64_t)i * B;
      for (int c = 0; c < B; c++) {
        float pv = ri[c] + be[c] * pi[c], sv = qi[c] + be[c] * si[c];
        pi[c] = pv; si[c] = sv;
        xi[c] += a[c] * pv;
        ri[c] -= a[c] * sv;
      }
    }
  }
  free(part); free(g_old); free(a); free(be); free(a_old);
  return 0;
}
