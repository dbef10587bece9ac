// Part of the host emulator (emulate.cpp): `emulate ring`.
#pragma once
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../ws_layout.h"
#include "emu_io.h"

namespace qv::emu {

// ------------------------------------------------------------------ the ws ring's protocol, modelled
// The producer and the consumer warpgroups of one CTA of gemm_sm90_ws.cu as straight-line programs of the
// kernel's barrier operations (same order, same slot/parity/turn formulas from ws_layout.h), run against
// modelled mbarriers in a random interleaving, TMA landings as separate random events and each MMA group
// retiring at the kernel's wgmma.wait_group points. Checked: a consumer that passes the wait for fill `it`
// finds fill `it` landed in the slot, the slot still holds it when the MMAs reading it retire, and nothing
// deadlocks. (mbarrier per the PTX ISA: a phase completes when its pending arrivals and transaction bytes
// reach zero; try_wait.parity P succeeds when the current phase's parity differs from P.)
struct MBar {
  int count = 1, pending = 1, tx = 0, phase = 0;
  void init(int c) { count = pending = c; tx = 0; phase = 0; }
  void maybe_complete() {
    if (pending == 0 && tx == 0) { ++phase; pending = count; }
  }
  void arrive() { --pending; maybe_complete(); }
  bool passed(uint32_t parity) const { return (uint32_t)(phase & 1) != parity; }
};

enum OpKind { kWait, kArrive, kIssue, kRetire, kLoad, kSync };
struct Op {
  OpKind kind;
  int bar;   // barrier index (kWait, kArrive, kLoad's full barrier)
  uint32_t parity;
  int fill;  // kWait on full / kIssue / kRetire / kLoad: the fill id involved (-1 none)
  int slot;
};

inline int run_ring(int mode, int steps, int tiles, int stages, unsigned seed) {
  const bool pp = mode == kWsPingPong;
  const int S = stages, wgs = 2;
  // barrier indices: full[s] = s, empty[s] = S + s, turn[w] = 2S + w
  std::vector<MBar> bars(2 * S + 2);
  for (int s = 0; s < S; ++s) {
    bars[s].init(1);
    bars[S + s].init(pp ? 1 : 2);
  }
  bars[2 * S].init(1);
  bars[2 * S + 1].init(1);
  std::vector<std::vector<Op>> prog(1 + wgs);  // 0 = producer, 1 + wg = consumer warpgroup wg
  for (int it = 0; it < steps * tiles; ++it) {
    const int s = ws_slot(it, S);
    prog[0].push_back({kWait, S + s, ws_empty_parity(it, S), -1, s});
    prog[0].push_back({kLoad, s, 0, it, s});  // arrive.expect_tx + TMA issue; the landing comes later
  }
  for (int wg = 0; wg < wgs; ++wg) {
    auto& c = prog[1 + wg];
    const int MB = mode == kWsCoop128 || mode == kWsDefer128 ? 1 : 2, groups = steps * MB;
    for (int ntile = 0; ntile < tiles; ++ntile) {
      if (!ws_owns(pp, ntile, wg)) continue;
      const int it0 = ntile * steps;
      if (pp && ntile > 0) c.push_back({kWait, 2 * S + wg, ws_turn_parity(ntile), -1, -1});
      c.push_back({kWait, ws_slot(it0, S), ws_full_parity(it0, S), it0, ws_slot(it0, S)});
      for (int gi = 0; gi < groups; ++gi) {  // consumer_group(gi)
        const int t = gi / MB, h = gi % MB;
        c.push_back({kIssue, -1, 0, it0 + t, ws_slot(it0 + t, S)});
        if (gi > 0) c.push_back({kRetire, -1, 0, it0 + (gi - 1) / MB, ws_slot(it0 + (gi - 1) / MB, S)});
        if (h == 0 && t > 0) c.push_back({kArrive, S + ws_slot(it0 + t - 1, S), 0, -1, -1});
        const int t1 = (gi + 1) / MB, h1 = (gi + 1) % MB;
        if (t1 < steps && h1 == 0)
          c.push_back({kWait, ws_slot(it0 + t1, S), ws_full_parity(it0 + t1, S), it0 + t1, ws_slot(it0 + t1, S)});
      }
      if (pp) c.push_back({kArrive, 2 * S + (1 - wg), 0, -1, -1});  // the turn: before the last MMAs retire
      c.push_back({kRetire, -1, 0, it0 + steps - 1, ws_slot(it0 + steps - 1, S)});  // wgmma_wait<0>
      c.push_back({kArrive, S + ws_slot(it0 + steps - 1, S), 0, -1, -1});
      if (!pp) c.push_back({kSync, -1, 0, ntile, -1});  // bar.sync 1, 256 (both warpgroups)
    }
  }
  std::vector<size_t> pc(prog.size(), 0);
  std::vector<int> tag(S, -1);                         // the fill whose data the slot holds
  std::vector<std::pair<int, int>> landing;             // (fill, slot) issued, not landed
  std::vector<int> at_sync(wgs, -1);
  unsigned rng = seed * 2654435761u + 12345u;
  auto rnd = [&](unsigned n) { rng = rng * 1664525u + 1013904223u; return (rng >> 8) % n; };
  for (long steps_run = 0;; ++steps_run) {
    expect(steps_run < 10000000, "ring model: no end");
    // what can move: each program's next op, each landing
    std::vector<int> movable;
    for (size_t e = 0; e < prog.size(); ++e) {
      if (pc[e] >= prog[e].size()) continue;
      const Op& op = prog[e][pc[e]];
      if (op.kind == kWait && !bars[op.bar].passed(op.parity)) continue;
      if (op.kind == kSync) {
        const int other = e == 1 ? 1 : 0;
        if (at_sync[other] != op.fill && !(pc[1 + other] < prog[1 + other].size() &&
                                           prog[1 + other][pc[1 + other]].kind == kSync &&
                                           prog[1 + other][pc[1 + other]].fill == op.fill))
          continue;
      }
      movable.push_back((int)e);
    }
    for (size_t l = 0; l < landing.size(); ++l) movable.push_back(100 + (int)l);
    bool done = landing.empty();
    for (size_t e = 0; e < prog.size(); ++e) done = done && pc[e] >= prog[e].size();
    if (done) return 0;
    if (movable.empty()) {
      std::fprintf(stderr, "ring model: deadlock (mode %d, steps %d, tiles %d, stages %d, seed %u); pcs", mode, steps,
                   tiles, stages, seed);
      for (size_t e = 0; e < prog.size(); ++e) std::fprintf(stderr, " %zu/%zu", pc[e], prog[e].size());
      std::fprintf(stderr, "\n");
      return 1;
    }
    const int pick = movable[rnd((unsigned)movable.size())];
    if (pick >= 100) {  // a TMA landing: data into the slot, its bytes counted on the full barrier
      const auto [fill, slot] = landing[pick - 100];
      landing.erase(landing.begin() + (pick - 100));
      tag[slot] = fill;
      bars[slot].tx -= 1;
      bars[slot].maybe_complete();
      continue;
    }
    const Op op = prog[pick][pc[pick]++];
    switch (op.kind) {
      case kWait:
        if (op.fill >= 0 && tag[op.slot] != op.fill) {
          std::fprintf(stderr, "ring model: warpgroup %d passed the wait for fill %d but slot %d holds fill %d "
                       "(mode %d, steps %d, tiles %d, stages %d, seed %u)\n", pick - 1, op.fill, op.slot,
                       tag[op.slot], mode, steps, tiles, stages, seed);
          return 1;
        }
        break;
      case kArrive: bars[op.bar].arrive(); break;
      case kLoad:
        bars[op.bar].tx += 1;  // expect_tx, then the producer's arrive
        bars[op.bar].arrive();
        landing.push_back({op.fill, op.slot});
        break;
      case kIssue:
        expect(tag[op.slot] == op.fill, "ring model: MMAs issued on a slot that does not hold their fill");
        break;
      case kRetire:
        if (tag[op.slot] != op.fill) {
          std::fprintf(stderr, "ring model: slot %d was refilled while MMAs of fill %d read it (mode %d, steps %d, "
                       "tiles %d, stages %d, seed %u)\n", op.slot, op.fill, mode, steps, tiles, stages, seed);
          return 1;
        }
        break;
      case kSync:
        at_sync[pick - 1] = op.fill;
        break;
    }
  }
}


}  // namespace qv::emu
