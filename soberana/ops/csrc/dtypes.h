/* Storage dtypes shared by the native CPU kernels (included by the kernels in this directory; the build
 * cache key in ops/cpu/kernels.py covers this header). Codes match ops/cpu/kernels.py DTYPES. */
#ifndef SOBERANA_DTYPES_H
#define SOBERANA_DTYPES_H

#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16); /* round to nearest even */
}

#ifdef __FLT16_MAX__
#define HAVE_F16 1
static inline float f16_to_f32(uint16_t h) {
    _Float16 x;
    memcpy(&x, &h, 2);
    return (float)x;
}
static inline uint16_t f32_to_f16(float f) {
    _Float16 x = (_Float16)f;
    uint16_t h;
    memcpy(&h, &x, 2);
    return h;
}
#else
#define HAVE_F16 0
static inline float f16_to_f32(uint16_t h) { (void)h; return 0.0f; }
static inline uint16_t f32_to_f16(float f) { (void)f; return 0; }
#endif

/* Element i of a row stored in `dtype`, as float32; and back. */
static inline float load1(const void *row, int64_t i, int dtype) {
    if (dtype == DT_F32) return ((const float *)row)[i];
    uint16_t h = ((const uint16_t *)row)[i];
    return dtype == DT_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

static inline void store1(void *row, int64_t i, float x, int dtype) {
    if (dtype == DT_F32)
        ((float *)row)[i] = x;
    else
        ((uint16_t *)row)[i] = dtype == DT_BF16 ? f32_to_bf16(x) : f32_to_f16(x);
}

#endif
