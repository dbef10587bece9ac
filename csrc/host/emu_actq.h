// Part of the host emulator (emulate.cpp): `emulate actq` and `actq_magic`.
#pragma once
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../qvdit_math.h"
#include "emu_io.h"

namespace qv::emu {

// ------------------------------------------------------------------ activation quantization, row by row
inline void run_actq(int bits, int m, int k, int num_gates, const std::string& dir, bool magic) {
  const auto x = read_file<float>(dir + "/x.bin", (size_t)m * k);
  const auto alpha = read_file<float>(dir + "/alpha.bin", k);
  const auto gate = read_file<float>(dir + "/gate.bin", num_gates);
  const auto fid = read_file<int32_t>(dir + "/fid.bin", m);
  std::vector<int8_t> xq((size_t)m * k);
  std::vector<float> scale(m), u(m);
  std::vector<int32_t> rowsum(m);
  for (int r = 0; r < m; ++r) {
    const float* row = &x[(size_t)r * k];
    float rmax = 0.0f, rmin = 0.0f, amax = 0.0f;
    bool bad = false;
    for (int c = 0; c < k; ++c) {  // the kernel's pass 1 (max/min are exact in any order)
      bad |= !std::isfinite(row[c]);
      rmax = std::fmax(rmax, row[c]);
      rmin = std::fmin(rmin, row[c]);
      amax = std::fmax(amax, std::fabs(row[c]));
    }
    const RowQ q = bits == 8 ? row_qparams(8, 0.0f, 0.0f, amax) : row_qparams(bits, rmax, rmin, 0.0f);
    const RowQMagic qm = row_qmagic(q);
    int32_t sum = 0;
    double dot = 0.0;
    for (int c = 0; c < k; ++c) {
      int code = 0;  // the one-CTA-per-row kernel's act_code, or (magic) the register kernel's act_code_magic
      if (!bad && magic) {
        const float y = act_code_magic(row[c], qm);
        uint32_t yb, mb;
        const float mg = kActMagic;
        std::memcpy(&yb, &y, 4);
        std::memcpy(&mb, &mg, 4);
        code = (int)(yb - mb);
        expect((float)code == y - kActMagic, "act_code_magic: bits(y) - bits(magic) is not y - magic");
      } else if (!bad) {
        code = act_code(row[c], q);
      }
      xq[(size_t)r * k + c] = (int8_t)code;
      sum += code;
      dot += (double)code * (double)alpha[c];
    }
    scale[r] = bad ? NAN : q.scale;
    rowsum[r] = sum;
    const int f = fid[r];
    const double gv = (f >= 0 && f < num_gates) ? (double)gate[f] : NAN;
    u[r] = (float)(dot * (double)scale[r] * gv);
  }
  write_file(dir + "/xq.bin", xq);
  write_file(dir + "/scale.bin", scale);
  write_file(dir + "/u.bin", u);
  write_file(dir + "/rowsum.bin", rowsum);
}


}  // namespace qv::emu
