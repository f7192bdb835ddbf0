// The few lines every C++ unit test shares: count failed expectations, report them, and turn
// the count into the process exit status (ctest reads it).
#pragma once

#include <cstdio>
#include <string>

namespace eeengine_test {

inline int failures = 0;

inline void expect(bool ok, const std::string& what) {
  if (!ok) {
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
    ++failures;
  }
}

inline int report(const char* suite) {
  if (failures == 0) std::printf("all %s C++ tests passed\n", suite);
  return failures == 0 ? 0 : 1;
}

}  // namespace eeengine_test
