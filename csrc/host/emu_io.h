// The host emulator's file I/O and checks (emulate.cpp and its parts).
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace qv::emu {

[[noreturn]] inline void fail(const std::string& msg) {
  std::fprintf(stderr, "emulate: %s\n", msg.c_str());
  std::exit(1);
}
inline void expect(bool ok, const std::string& msg) {
  if (!ok) fail(msg);
}

template <typename T>
inline std::vector<T> read_file(const std::string& path, size_t count) {
  std::vector<T> v(count);
  FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail("cannot open " + path);
  const size_t got = count ? std::fread(v.data(), sizeof(T), count, f) : 0;
  std::fclose(f);
  expect(got == count, "short read of " + path);
  return v;
}
template <typename T>
inline void write_file(const std::string& path, const std::vector<T>& v) {
  FILE* f = std::fopen(path.c_str(), "wb");
  if (!f) fail("cannot write " + path);
  std::fwrite(v.data(), sizeof(T), v.size(), f);
  std::fclose(f);
}

inline uint32_t load32(const std::vector<uint8_t>& sm, uint32_t addr) {
  expect(addr + 4 <= sm.size(), "shared read out of bounds");
  uint32_t v;
  std::memcpy(&v, &sm[addr], 4);
  return v;
}


}  // namespace qv::emu
