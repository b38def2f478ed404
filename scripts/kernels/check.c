/* Cross-check of qmm.c's SIMD path against its portable definitions, for a cross-built target. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "../../meshllm/model/kernels/qmm.c"
static float frand(void) { return (rand() % 20001 - 10000) / 2500.0f; }
int main(void) {
    int bad = 0;
    int shapes[][3] = {{1, 13, 96}, {5, 7, 64}, {9, 33, 288}, {4, 70, 576}};
    for (int s = 0; s < 4; s++) {
        int64_t M = shapes[s][0], N = shapes[s][1], K = shapes[s][2], G = K / 32;
        float *x = malloc(4 * M * K), *y0 = malloc(4 * M * N), *y1 = malloc(4 * M * N), *sc = malloc(4 * (N + 3) * G);
        int64_t NQ = (N + 3) / 4 * 4; /* the layout holds whole quads of rows */
        uint8_t *c4 = malloc(NQ * K / 2); int8_t *c8 = malloc(NQ * K); uint16_t *h = malloc(2 * ((N + 3) * G + 8));
        uint16_t *mn = calloc(NQ * G + 8, 2); float *wf = malloc(4 * NQ * K); uint16_t *wh = malloc(2 * NQ * K);
        for (int64_t i = 0; i < M * K; i++) x[i] = frand();
        for (int64_t i = 0; i < NQ * K / 2; i++) c4[i] = rand();
        for (int64_t i = 0; i < NQ * K; i++) { c8[i] = rand() % 255 - 127; wf[i] = frand(); wh[i] = 0x3000 + rand() % 0x800; }
        for (int64_t i = 0; i < NQ * G; i++) { sc[i] = 0.01f * (1 + rand() % 7); h[i] = 0x2000 + rand() % 0x400; mn[i] = 0xa000 + rand() % 0x400; }
        mq_linear_q4(x, M, K, c4, h, mn, N, y0, 1, 0); mq_linear_q4(x, M, K, c4, h, mn, N, y1, 1, 1);
        if (memcmp(y0, y1, 4 * M * N)) { printf("q4 differs at shape %d\n", s); bad++; }
        mq_linear_q8(x, M, K, c8, sc, 0, N, y0, 1, 0); mq_linear_q8(x, M, K, c8, sc, 0, N, y1, 1, 1);
        if (memcmp(y0, y1, 4 * M * N)) { printf("q8 differs at shape %d\n", s); bad++; }
        mq_linear_q8(x, M, K, c8, sc, 1, N, y0, 1, 0); mq_linear_q8(x, M, K, c8, sc, 1, N, y1, 1, 1);
        if (memcmp(y0, y1, 4 * M * N)) { printf("q8 rows differs at shape %d\n", s); bad++; }
        mq_linear_f(x, M, K, wf, 0, N, y0, 1, 0); mq_linear_f(x, M, K, wf, 0, N, y1, 1, 1);
        if (memcmp(y0, y1, 4 * M * N)) { printf("f32 differs at shape %d\n", s); bad++; }
        mq_linear_f(x, M, K, wh, 1, N, y0, 1, 0); mq_linear_f(x, M, K, wh, 1, N, y1, 1, 1);
        if (memcmp(y0, y1, 4 * M * N)) { printf("f16 differs at shape %d\n", s); bad++; }
    }
    printf("%s: %s\n", mq_isa(), bad ? "MISMATCH" : "all equal");
    return bad != 0;
}
