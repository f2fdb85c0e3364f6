// The native tests' check: counts a failure and prints it (the first 20 of them).
#pragma once

#include <cstdio>

static int failures = 0;

#define CHECK(cond, ...)                                            \
  do {                                                              \
    if (!(cond) && ++failures <= 20) {                              \
      std::printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);   \
      std::printf(__VA_ARGS__);                                     \
      std::printf("\n");                                            \
    }                                                               \
  } while (0)
