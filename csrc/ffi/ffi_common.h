// Helpers shared by the CPU and CUDA FFI handlers: attribute decoding and the
// shape checks of the fused update's operands. No math here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "lopt_config.h"
#include "xla/ffi/api/ffi.h"

namespace lopt::ffi_glue {

namespace ffi = xla::ffi;

inline std::string ShapeStr(const std::vector<int64_t>& s) {
  std::string r = "(";
  for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + (s.size() == 1 ? ",)" : ")");
}

inline std::vector<int64_t> Dims(const ffi::AnyBuffer& b) {
  auto d = b.dimensions();
  return std::vector<int64_t>(d.begin(), d.end());
}

// One tensor's operands after the population axes have been split off.
struct TensorBuffers {
  std::vector<int64_t> shape;  // without population axes
  bool factored = false;
  int d1 = -1, d0 = -1;  // apply-only call: factored axes of the global shape
  // Inputs p g m rms (v_row v_col | v_full); results out m rms (v_row v_col | v_full).
  std::vector<ffi::AnyBuffer> ins;
  std::vector<ffi::Result<ffi::AnyBuffer>> outs;
};

// Appends the attributes every call takes (the configuration) to a binding whose
// context and operands are already declared; see lopt_ext/_ffi.py::_config_attrs.
template <typename Binding>
auto WithConfigAttrs(Binding binding) {
  return std::move(binding)
      .template Attr<int64_t>("hidden_size")
      .template Attr<int64_t>("hidden_layers")
      .template Attr<int64_t>("dm")
      .template Attr<int64_t>("dr")
      .template Attr<int64_t>("da")
      .template Attr<float>("exp_mult")
      .template Attr<float>("step_mult");
}

// Start of population member b of an operand shaped [population..., per-member].
template <typename T, typename Buffer>
T* MemberData(Buffer& buffer, int64_t b, int64_t batch) {
  T* base = buffer.template typed_data<float>();
  return base + b * (static_cast<int64_t>(buffer.element_count()) / batch);
}

// Decodes and checks every operand; on success `batch` is the population size
// and `tensors` the per-tensor buffers. Nothing is read or written here.
inline ffi::Error CollectOperands(const Config& cfg, const ffi::AnyBuffer& packed,
                                  ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                                  int64_t* batch, std::vector<TensorBuffers>* tensors) {
  if (const char* err = ValidateConfig(cfg)) return ffi::Error::InvalidArgument(err);
  const std::vector<int64_t> pdims = Dims(packed);
  if (packed.element_type() != ffi::DataType::F32 || pdims.empty())
    return ffi::Error::InvalidArgument("packed weights must be a float32 array of rank >= 1");
  const size_t nb = pdims.size() - 1;
  const std::vector<int64_t> bdims(pdims.begin(), pdims.begin() + nb);
  *batch = 1;
  for (int64_t d : bdims) *batch *= d;
  if (pdims.back() != PackedLayout(cfg).size)
    return ffi::Error::InvalidArgument("packed weights have " + std::to_string(pdims.back()) +
                                       " entries, the configuration needs " +
                                       std::to_string(PackedLayout(cfg).size));
  size_t ai = 0, ri = 0;
  while (ai < args.size()) {
    TensorBuffers t;
    auto p = args.get<ffi::AnyBuffer>(ai);
    if (!p.has_value()) return ffi::Error::InvalidArgument("cannot decode parameter operand");
    std::vector<int64_t> pd = Dims(*p);
    if (pd.size() < nb + 1 || !std::equal(bdims.begin(), bdims.end(), pd.begin()))
      return ffi::Error::InvalidArgument("tensor " + std::to_string(tensors->size()) +
                                         ": parameter shape " + ShapeStr(pd) +
                                         " lacks the population axes " + ShapeStr(bdims));
    t.shape.assign(pd.begin() + nb, pd.end());
    t.factored = t.shape.size() >= 2 && cfg.da > 0;
    // Expected shapes of p g m rms (v_row v_col | v_full | none when da == 0),
    // population axes excluded.
    std::vector<std::vector<int64_t>> want = {t.shape, t.shape};
    auto with = [](std::vector<int64_t> s, int64_t last) { s.push_back(last); return s; };
    want.push_back(with(t.shape, cfg.dm));
    want.push_back(with(t.shape, cfg.dr));
    if (cfg.da == 0) {
      // no Adafactor accumulators
    } else if (t.factored) {
      int d1 = 0, d0 = 0;
      FactoredDims(t.shape.data(), static_cast<int>(t.shape.size()), &d1, &d0);
      std::vector<int64_t> row = t.shape, col = t.shape;
      row.erase(row.begin() + d0);
      col.erase(col.begin() + d1);
      want.push_back(with(row, cfg.da));
      want.push_back(with(col, cfg.da));
    } else {
      want.push_back(with(t.shape, cfg.da));
    }
    static const char* kNames[] = {"params", "grads", "momentum", "rms", "accumulator",
                                   "accumulator"};
    // Results: the step/params (shape S) then the state, i.e. inputs 0, 2, 3, ...
    for (size_t k = 0; k < want.size(); ++k) {
      std::vector<int64_t> full = bdims;
      full.insert(full.end(), want[k].begin(), want[k].end());
      const std::string where = "tensor " + std::to_string(tensors->size()) + " " + kNames[k];
      auto in = args.get<ffi::AnyBuffer>(ai + k);
      if (!in.has_value()) return ffi::Error::InvalidArgument(where + ": operand missing");
      if (in->element_type() != ffi::DataType::F32)
        return ffi::Error::InvalidArgument(where + ": must be float32");
      if (Dims(*in) != full)
        return ffi::Error::InvalidArgument(where + ": shape " + ShapeStr(Dims(*in)) +
                                           ", expected " + ShapeStr(full));
      t.ins.push_back(*in);
      if (k == 1) continue;  // grads have no result of their own
      auto out = rets.get<ffi::AnyBuffer>(ri + (k == 0 ? 0 : k - 1));
      if (!out.has_value()) return ffi::Error::InvalidArgument(where + ": result missing");
      if ((*out)->element_type() != ffi::DataType::F32 || Dims(**out) != full)
        return ffi::Error::InvalidArgument(where + ": result must be float32 of shape " +
                                           ShapeStr(full));
      t.outs.push_back(*out);
    }
    ai += want.size();
    ri += want.size() - 1;
    tensors->push_back(std::move(t));
  }
  if (ri != rets.size())
    return ffi::Error::InvalidArgument("result count does not match the operands");
  return ffi::Error::Success();
}

// Operands of the apply-only call (external statistics, see lopt::ExternalStats):
// per tensor p g m rms then, for rank >= 2, v_row_new v_col_new row_factor
// col_factor scales, else v_full scales; results out m rms (v_full). `axes`
// holds (d1, d0) per tensor, the factored axes of the global shape, or (-1, -1).
inline ffi::Error CollectApplyOperands(const Config& cfg, const ffi::AnyBuffer& packed,
                                       ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                                       ffi::Span<const int64_t> axes, int64_t* batch,
                                       std::vector<TensorBuffers>* tensors,
                                       bool sums_only = false) {
  if (const char* err = ValidateConfig(cfg)) return ffi::Error::InvalidArgument(err);
  if (cfg.da == 0)
    return ffi::Error::InvalidArgument("external statistics need the Adafactor accumulators (da >= 1)");
  const std::vector<int64_t> pdims = Dims(packed);
  if (packed.element_type() != ffi::DataType::F32 || pdims.empty() ||
      pdims.back() != PackedLayout(cfg).size)
    return ffi::Error::InvalidArgument("packed weights do not match the configuration");
  const size_t nb = pdims.size() - 1;
  const std::vector<int64_t> bdims(pdims.begin(), pdims.begin() + nb);
  *batch = 1;
  for (int64_t d : bdims) *batch *= d;
  const int64_t nf = NumNormalizedFeatures(cfg.dm, cfg.dr, cfg.da);
  size_t ai = 0, ri = 0;
  while (ai < args.size()) {
    const size_t ti = tensors->size();
    const std::string where = "tensor " + std::to_string(ti);
    if (2 * ti + 1 >= axes.size()) return ffi::Error::InvalidArgument(where + ": no factored axes");
    TensorBuffers t;
    t.d1 = static_cast<int>(axes[2 * ti]);
    t.d0 = static_cast<int>(axes[2 * ti + 1]);
    auto p = args.get<ffi::AnyBuffer>(ai);
    if (!p.has_value()) return ffi::Error::InvalidArgument(where + ": cannot decode params");
    const std::vector<int64_t> pd = Dims(*p);
    if (pd.size() < nb + 1 || !std::equal(bdims.begin(), bdims.end(), pd.begin()))
      return ffi::Error::InvalidArgument(where + ": params lack the population axes");
    t.shape.assign(pd.begin() + nb, pd.end());
    const int rank = static_cast<int>(t.shape.size());
    const bool factored = rank >= 2;
    t.factored = factored;
    if (factored != (t.d0 >= 0) || (factored && (t.d0 >= rank || t.d1 < 0 || t.d1 >= rank || t.d0 == t.d1)))
      return ffi::Error::InvalidArgument(where + ": factored axes do not fit its rank");
    auto with = [](std::vector<int64_t> s, int64_t last) { s.push_back(last); return s; };
    std::vector<std::vector<int64_t>> want = {t.shape, t.shape, with(t.shape, cfg.dm),
                                              with(t.shape, cfg.dr)};
    if (factored) {
      std::vector<int64_t> row = t.shape, col = t.shape;
      row.erase(row.begin() + t.d0);
      col.erase(col.begin() + t.d1);
      want.push_back(with(row, cfg.da));
      want.push_back(with(col, cfg.da));
      want.push_back(with(row, cfg.da));
      want.push_back(with(col, cfg.da));
    } else {
      want.push_back(with(t.shape, cfg.da));
    }
    want.push_back({nf});
    // out m rms (v_full); sums_only (lopt_partial_sumsq): one [compact features] result
    const size_t n_out = sums_only ? 0 : (factored ? 3 : 4);
    for (size_t k = 0; k < want.size(); ++k) {
      std::vector<int64_t> full = bdims;
      full.insert(full.end(), want[k].begin(), want[k].end());
      auto in = args.get<ffi::AnyBuffer>(ai + k);
      if (!in.has_value() || in->element_type() != ffi::DataType::F32 || Dims(*in) != full)
        return ffi::Error::InvalidArgument(where + " operand " + std::to_string(k) +
                                           ": expected float32 " + ShapeStr(full));
      t.ins.push_back(*in);
      const size_t out_k = k == 0 ? 0 : k - 1;  // grads have no result
      if (k == 1 || out_k >= n_out) continue;
      auto out = rets.get<ffi::AnyBuffer>(ri + out_k);
      if (!out.has_value() || (*out)->element_type() != ffi::DataType::F32 || Dims(**out) != full)
        return ffi::Error::InvalidArgument(where + " result " + std::to_string(out_k) +
                                           ": expected float32 " + ShapeStr(full));
      t.outs.push_back(*out);
    }
    ai += want.size();
    ri += n_out;
    if (sums_only) {
      std::vector<int64_t> full = bdims;
      // compact per-element features (lopt::tiles::NumCompactFeatures)
      full.push_back(2 + 2 * cfg.dm + 2 * cfg.dr + 2 * cfg.da + (factored ? 0 : 2 * cfg.da));
      auto out = rets.get<ffi::AnyBuffer>(ri);
      if (!out.has_value() || (*out)->element_type() != ffi::DataType::F32 || Dims(**out) != full)
        return ffi::Error::InvalidArgument(where + " result: expected float32 " + ShapeStr(full));
      t.outs.push_back(*out);
      ri += 1;
    }
    tensors->push_back(std::move(t));
  }
  if (ri != rets.size() || 2 * tensors->size() != axes.size())
    return ffi::Error::InvalidArgument("operand, result and factored-axes counts disagree");
  return ffi::Error::Success();
}

// Operands of the MLPLOpt call: the packed weights [population..., MlpPackedLayout size],
// then per tensor p g m ([population..., S], [..., S], [..., S, 6]); results out and m.
inline ffi::Error CollectMlpOperands(const MlpConfig& cfg, const ffi::AnyBuffer& packed,
                                     ffi::RemainingArgs& args, ffi::RemainingRets& rets,
                                     int64_t* batch, std::vector<TensorBuffers>* tensors) {
  if (const char* err = ValidateMlpConfig(cfg)) return ffi::Error::InvalidArgument(err);
  const std::vector<int64_t> pdims = Dims(packed);
  if (packed.element_type() != ffi::DataType::F32 || pdims.empty() ||
      pdims.back() != MlpPackedLayout(cfg).size)
    return ffi::Error::InvalidArgument("packed weights must be float32 [..., " +
                                       std::to_string(MlpPackedLayout(cfg).size) + "]");
  const size_t nb = pdims.size() - 1;
  const std::vector<int64_t> bdims(pdims.begin(), pdims.begin() + nb);
  *batch = 1;
  for (int64_t d : bdims) *batch *= d;
  if (args.size() % 3 != 0 || rets.size() * 3 != args.size() * 2)
    return ffi::Error::InvalidArgument("expected (params, grads, momentum) per tensor and "
                                       "(out, momentum) results");
  for (size_t ai = 0, ri = 0; ai < args.size(); ai += 3, ri += 2) {
    const std::string where = "tensor " + std::to_string(tensors->size());
    TensorBuffers t;
    auto p = args.get<ffi::AnyBuffer>(ai);
    if (!p.has_value()) return ffi::Error::InvalidArgument(where + ": cannot decode params");
    const std::vector<int64_t> pd = Dims(*p);
    if (pd.size() < nb + 1 || !std::equal(bdims.begin(), bdims.end(), pd.begin()))
      return ffi::Error::InvalidArgument(where + ": parameter shape " + ShapeStr(pd) +
                                         " lacks the population axes " + ShapeStr(bdims));
    t.shape.assign(pd.begin() + nb, pd.end());
    std::vector<int64_t> m_shape = pd;
    m_shape.push_back(kMlpDecays);
    const std::vector<int64_t> want[3] = {pd, pd, m_shape};
    static const char* kNames[] = {"params", "grads", "momentum"};
    for (size_t k = 0; k < 3; ++k) {
      auto in = args.get<ffi::AnyBuffer>(ai + k);
      if (!in.has_value() || in->element_type() != ffi::DataType::F32 || Dims(*in) != want[k])
        return ffi::Error::InvalidArgument(where + " " + kNames[k] + ": expected float32 " +
                                           ShapeStr(want[k]));
      t.ins.push_back(*in);
    }
    for (size_t k = 0; k < 2; ++k) {
      auto out = rets.get<ffi::AnyBuffer>(ri + k);
      const std::vector<int64_t>& w = want[k == 0 ? 0 : 2];
      if (!out.has_value() || (*out)->element_type() != ffi::DataType::F32 || Dims(**out) != w)
        return ffi::Error::InvalidArgument(where + " result " + std::to_string(k) +
                                           ": expected float32 " + ShapeStr(w));
      t.outs.push_back(*out);
    }
    tensors->push_back(std::move(t));
  }
  return ffi::Error::Success();
}

}  // namespace lopt::ffi_glue
