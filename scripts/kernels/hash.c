/* Every op of qmm.c on fixed pseudo-random data, hashed: builds for different instruction sets
 * and CPUs print the same hash when they give the same bits (scripts/kernels/cross_check.sh). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../../meshllm/model/kernels/qmm.c"
static float frand(void) { return (rand() % 20001 - 10000) / 2500.0f; }
static uint64_t h = 1469598103934665603ULL;
static void mix(const void *p, size_t n) { const uint8_t *b = p; for (size_t i = 0; i < n; i++) { h ^= b[i]; h *= 1099511628211ULL; } }
int main(void) {
    int64_t M = 6, N = 70, K = 576, G = K / 32;
    float *x = malloc(4 * M * K), *y = malloc(4 * M * N), *sc = malloc(4 * (N + 3) * G);
    int64_t NQ = (N + 3) / 4 * 4; /* the layout holds whole quads of rows */
    uint8_t *c4 = malloc(NQ * K / 2); int8_t *c8 = malloc(NQ * K); uint16_t *hs = malloc(2 * ((N + 3) * G + 8));
    uint16_t *mn = calloc(NQ * G + 8, 2); float *wf = malloc(4 * NQ * K);
    for (int64_t i = 0; i < M * K; i++) x[i] = frand();
    for (int64_t i = 0; i < NQ * K / 2; i++) c4[i] = rand();
    for (int64_t i = 0; i < NQ * K; i++) { c8[i] = rand() % 255 - 127; wf[i] = frand(); }
    for (int64_t i = 0; i < NQ * G; i++) { sc[i] = 0.01f * (1 + rand() % 7); hs[i] = 0x2000 + rand() % 0x400; mn[i] = 0xa000 + rand() % 0x400; }
    mq_linear_q4(x, M, K, c4, hs, mn, N, y, 1, 0); mix(y, 4 * M * N);
    mq_linear_q8(x, M, K, c8, sc, 0, N, y, 1, 0); mix(y, 4 * M * N);
    mq_linear_f(x, M, K, wf, 0, N, y, 1, 0); mix(y, 4 * M * N);
    float *r = malloc(4 * M * K); mq_rmsnorm(x, M, K, wf, 1e-5f, r, 1); mix(r, 4 * M * K);
    mq_silu_mul(x, M, K / 2, r, 1); mix(r, 4 * M * K / 2);
    int64_t nq = 4, nkv = 2, D = 64, T = 6, start = 40, cap = 64;
    float *qkv = malloc(4 * T * (nq + 2 * nkv) * D), *cs = malloc(4 * T * D), *sn = malloc(4 * T * D);
    float *kc = malloc(4 * nkv * cap * D), *vc = malloc(4 * nkv * cap * D), *qt = malloc(4 * T * nq * D), *o = malloc(4 * T * nq * D);
    for (int64_t i = 0; i < T * (nq + 2 * nkv) * D; i++) qkv[i] = frand();
    for (int64_t i = 0; i < T * D; i++) { cs[i] = frand() / 4; sn[i] = frand() / 4; }
    for (int64_t i = 0; i < nkv * cap * D; i++) { kc[i] = frand(); vc[i] = frand(); }
    float *scratch = malloc(4 * (start + T + 8 + D));
    mq_attention(qkv, T, nq, nkv, D, cs, sn, kc, vc, cap, start, 0, 0.125f, qt, scratch, start + T + 8 + D, o, 1);
    mix(o, 4 * T * nq * D);
    printf("%s %016llx\n", mq_isa(), (unsigned long long)h);
}
