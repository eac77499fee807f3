/* Throughput of the multiply-add instructions a CPU GEMM can use, per core clock, on one core:
 * vfmadd231ps (float32, 16 lanes), vdpbf16ps (AVX512_BF16, 16 pairs), vfmadd231ph
 * (AVX512_FP16, 32 lanes), vpdpbusd (AVX512_VNNI, 16 x 4 int8), vpdpwssd (16 x 2 int16).
 * 12 (or 24) independent accumulators per loop; the clock is taken from a chain of dependent
 * vfmadd231ps (4 cycles each). Why bfloat16 is slower than float32 on the Intel Xeon host
 * (docs/embeddings.md).
 *
 *     gcc -O2 -march=native benchmarks/cpu_instruction_rates.c -o /tmp/rates && /tmp/rates
 */
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define N 200000000L
#define I(ins, r) ins " %%zmm30, %%zmm31, %%zmm" #r "\n"
#define BODY12(ins)                                                                        \
    __asm__ volatile(I(ins, 0) I(ins, 1) I(ins, 2) I(ins, 3) I(ins, 4) I(ins, 5) I(ins, 6) \
                         I(ins, 7) I(ins, 8) I(ins, 9) I(ins, 10) I(ins, 11)::              \
                             : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6",     \
                               "xmm7", "xmm8", "xmm9", "xmm10", "xmm11")
#define BODY24(ins)                                                                        \
    __asm__ volatile(I(ins, 0) I(ins, 1) I(ins, 2) I(ins, 3) I(ins, 4) I(ins, 5) I(ins, 6) \
                         I(ins, 7) I(ins, 8) I(ins, 9) I(ins, 10) I(ins, 11) I(ins, 12)     \
                             I(ins, 13) I(ins, 14) I(ins, 15) I(ins, 16) I(ins, 17)         \
                                 I(ins, 18) I(ins, 19) I(ins, 20) I(ins, 21) I(ins, 22)     \
                                     I(ins, 23)::                                           \
                                         : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5",  \
                                           "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",         \
                                           "xmm11", "xmm12", "xmm13", "xmm14", "xmm15",     \
                                           "xmm16", "xmm17", "xmm18", "xmm19", "xmm20",     \
                                           "xmm21", "xmm22", "xmm23")

#define RATE(name, body, per_iter)                                                   \
    do {                                                                             \
        double t0 = now();                                                           \
        for (long i = 0; i < N / 2; i++) body;                                       \
        printf("%-12s %-5s %.2f per cycle\n", name, #per_iter, (N / 2) * (double)per_iter / (now() - t0) / 1e9 / ghz); \
    } while (0)

int main(void) {
    __asm__ volatile("vpxord %%zmm30, %%zmm30, %%zmm30\n vpxord %%zmm31, %%zmm31, %%zmm31" ::: "xmm30", "xmm31");
    double t0 = now();
    for (long i = 0; i < N; i++) __asm__ volatile(I("vfmadd231ps", 0) I("vfmadd231ps", 0) ::: "xmm0");
    const double ghz = N * 2 * 4 / (now() - t0) / 1e9;
    printf("clock from a dependent vfmadd231ps chain (latency 4): %.2f GHz\n", ghz);
    RATE("vfmadd231ps", BODY12("vfmadd231ps"), 12);
    RATE("vdpbf16ps", BODY12("vdpbf16ps"), 12);
    RATE("vdpbf16ps", BODY24("vdpbf16ps"), 24);
    RATE("vfmadd231ph", BODY12("vfmadd231ph"), 12);
    RATE("vpdpbusd", BODY12("vpdpbusd"), 12);
    RATE("vpdpbusd", BODY24("vpdpbusd"), 24);
    RATE("vpdpwssd", BODY12("vpdpwssd"), 12);
    return 0;
}
