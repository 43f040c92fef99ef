// nestrnn::nested_lstm for processes without Python: TorchScript files, ExportedPrograms and
// AOTInductor packages that hold the op load and run with this library loaded
// (torch.ops.load_library(path) in Python, dlopen or link in C++). Built by library.py.
//
// The op computes the reference's function (naive.py, docs/design.md section 1) in ATen calls,
// step by step: one direction of one layer, inference only. Its schema is exactly that of the
// Python custom op (op.py), so files recorded with nestrnn run here unchanged.
//
// The schema and kernel are registered only where the op is not defined yet: in a process that
// imported nestrnn, nestrnn's own op (with autograd, fake tensors and the fast kernels) stays in
// place, and loading this library there changes nothing.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

constexpr const char* kSchema =
    "nested_lstm(Tensor x, Tensor[] weights, Tensor h0, Tensor c0, Tensor? batch_sizes, "
    "bool reverse, str activations, str backend, Tensor? zoneout=None, Tensor[]? norms=None) -> "
    "(Tensor, Tensor, Tensor)";
// A layer with nn.LSTM's projection (proj_size > 0) above depth 1 records this one.
constexpr const char* kProjectedSchema =
    "nested_lstm_projected(Tensor x, Tensor[] weights, Tensor weight_hr, Tensor h0, Tensor c0, "
    "Tensor? batch_sizes, bool reverse, str activations) -> (Tensor, Tensor, Tensor)";

// The activations of activations.py, by name.
Tensor activate(const std::string& name, const Tensor& x) {
  if (name == "sigmoid") return at::sigmoid(x);
  if (name == "tanh") return at::tanh(x);
  if (name == "identity") return x;
  if (name == "relu") return at::relu(x);
  if (name == "hardtanh") return at::hardtanh(x);
  if (name == "softsign") return x / (x.abs() + 1);
  TORCH_CHECK(false, "nestrnn::nested_lstm: unknown activation '", name, "'");
}

struct Level {
  std::string gate, candidate, cell;
};

// layout.encode_activations's string: "gate,candidate,cell" per level, levels joined by ';'.
std::vector<Level> decode_activations(const std::string& text) {
  std::vector<Level> levels;
  std::stringstream groups(text);
  std::string group;
  while (std::getline(groups, group, ';')) {
    std::stringstream names(group);
    Level level;
    bool whole = std::getline(names, level.gate, ',') &&
                 std::getline(names, level.candidate, ',') && std::getline(names, level.cell, ',');
    TORCH_CHECK(whole, "nestrnn::nested_lstm: bad activations '", text, "'");
    levels.push_back(level);
  }
  return levels;
}

std::optional<Tensor> bias(const Tensor& b, at::ScalarType dtype) {
  if (b.numel() == 0) return std::nullopt;  // the op's way of saying "no bias"
  return b.to(dtype);
}

// zoneout (reference.py's zoneout_mix): keep * previous + (1 - keep) * new
Tensor zoneout_mix(const Tensor& previous, const Tensor& next, const Tensor& keep) {
  return keep * previous + (1 - keep) * next;
}

// layer normalisation over the last dimension in ``blocks`` equal parts (levels.py's
// normalise_gates with 4, normalise_cell with 1), eps 1e-5 as levels.LAYER_NORM_EPS
Tensor layer_norm(const Tensor& z, int64_t blocks, const Tensor& weight, const Tensor& bias) {
  const Tensor parts = z.unflatten(-1, {blocks, -1});
  auto [var, mean] = at::var_mean(parts, {-1}, /*correction=*/0, /*keepdim=*/true);
  return ((parts - mean) * at::rsqrt(var + 1e-5)).flatten(-2) * weight + bias;
}

// The reference's time loop; ``weight_hr`` (P, H), when given, projects each step's h to P wide;
// ``zoneout`` (D + 1, T, B, H), when given, mixes each carried state with its previous value;
// ``norms`` (4 a level, empty for a level without), when given, layer-normalises a level's gate
// blocks and the cell its output reads.
std::tuple<Tensor, Tensor, Tensor> run(const Tensor& x_in, at::TensorList weights,
                                       const std::optional<Tensor>& weight_hr,
                                       const Tensor& h0_in, const Tensor& c0_in,
                                       const std::optional<Tensor>& batch_sizes, bool reverse,
                                       const std::string& activations,
                                       const std::optional<Tensor>& zoneout_in,
                                       const std::optional<at::TensorList>& norms_in) {
  const int64_t depth = c0_in.size(0);
  TORCH_CHECK(x_in.dim() == 3 && h0_in.dim() == 2 && c0_in.dim() == 3,
              "nestrnn::nested_lstm: expected x (T, B, I), h0 (B, H), c0 (D, B, H)");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == 4 * depth,
              "nestrnn::nested_lstm: expected 4 weights per level, got ", weights.size(),
              " for ", depth, " levels");
  const auto levels = decode_activations(activations);
  TORCH_CHECK(static_cast<int64_t>(levels.size()) == depth,
              "nestrnn::nested_lstm: activations for ", levels.size(), " levels, c0 has ", depth);
  const int64_t steps = x_in.size(0), batch = x_in.size(1), hidden = h0_in.size(1);
  if (steps == 0 || batch == 0) {  // nothing to compute: the state passes through
    return {x_in.new_zeros({steps, batch, hidden}), h0_in.clone(), c0_in.clone()};
  }
  // Half precision computes in float32, as the Python op does (layout.state_dtype).
  const auto in_dtype = x_in.scalar_type();
  const bool half = in_dtype == at::kHalf || in_dtype == at::kBFloat16;
  const auto dtype = half ? at::kFloat : in_dtype;
  const Tensor x = x_in.to(dtype);
  std::vector<Tensor> w_ih, w_hh;
  std::vector<std::optional<Tensor>> b_ih, b_hh;
  for (int64_t k = 0; k < depth; ++k) {
    w_ih.push_back(weights[4 * k].to(dtype));
    w_hh.push_back(weights[4 * k + 1].to(dtype));
    b_ih.push_back(bias(weights[4 * k + 2], dtype));
    b_hh.push_back(bias(weights[4 * k + 3], dtype));
  }
  TORCH_CHECK(!zoneout_in.has_value() ||
                  zoneout_in->sizes() == at::IntArrayRef({depth + 1, steps, batch, hidden}),
              "nestrnn::nested_lstm: expected zoneout (D + 1, T, B, H)");
  const std::optional<Tensor> zoneout =
      zoneout_in.has_value() ? std::optional<Tensor>(zoneout_in->to(dtype)) : std::nullopt;
  TORCH_CHECK(!norms_in.has_value() || static_cast<int64_t>(norms_in->size()) == 4 * depth,
              "nestrnn::nested_lstm: expected 4 norms per level");
  std::vector<std::optional<std::vector<Tensor>>> norms(depth);
  for (int64_t k = 0; norms_in.has_value() && k < depth; ++k) {
    if ((*norms_in)[4 * k].numel() == 0) continue;  // no normalisation at this level
    std::vector<Tensor> level;
    for (int64_t n = 0; n < 4; ++n) level.push_back((*norms_in)[4 * k + n].to(dtype));
    norms[k] = level;
  }
  const std::optional<Tensor> projection =
      weight_hr.has_value() ? std::optional<Tensor>(weight_hr->to(dtype)) : std::nullopt;
  Tensor h = h0_in.to(dtype);
  std::vector<Tensor> cells = c0_in.to(dtype).unbind(0);
  std::vector<Tensor> outputs(steps);
  const std::optional<Tensor> sizes =
      batch_sizes.has_value() ? std::optional<Tensor>(batch_sizes->to(at::kCPU, at::kLong))
                              : std::nullopt;
  for (int64_t n = 0; n < steps; ++n) {
    const int64_t t = reverse ? steps - 1 - n : n;
    // Descend: level 0 reads x_t and h; level k reads x~ = i*g and h~ = f*c of level k-1.
    Tensor level_input = x[t], level_hidden = h;
    std::vector<Tensor> gated_inputs, gated_cells, out_gates;
    for (int64_t k = 0; k < depth; ++k) {
      const auto& act = levels[k];
      Tensor gates = at::linear(level_input, w_ih[k], b_ih[k]) +
                     at::linear(level_hidden, w_hh[k], b_hh[k]);
      if (norms[k].has_value()) gates = layer_norm(gates, 4, (*norms[k])[0], (*norms[k])[1]);
      auto parts = gates.chunk(4, 1);
      Tensor i = activate(act.gate, parts[0]), f = activate(act.gate, parts[1]);
      Tensor g = activate(act.candidate, parts[2]), o = activate(act.gate, parts[3]);
      gated_inputs.push_back(i * g);
      gated_cells.push_back(f * cells[k]);
      out_gates.push_back(o);
      level_input = gated_inputs.back();
      level_hidden = gated_cells.back();
    }
    // The innermost level adds; ascend: c^{k-1} = o_k * act_k(c^k); h = o_0 * act_0(c^0).
    std::vector<Tensor> new_cells(depth);
    new_cells[depth - 1] = gated_cells.back() + gated_inputs.back();
    // With normalisation a level's output reads its normalised cell; the cell carried is not.
    auto shown = [&](int64_t k) {
      return norms[k].has_value() ? layer_norm(new_cells[k], 1, (*norms[k])[2], (*norms[k])[3])
                                  : new_cells[k];
    };
    for (int64_t k = depth - 1; k > 0; --k) {
      new_cells[k - 1] = out_gates[k] * activate(levels[k].cell, shown(k));
    }
    Tensor h_new = out_gates[0] * activate(levels[0].cell, shown(0));
    if (projection.has_value()) h_new = at::linear(h_new, *projection);
    if (zoneout.has_value()) {  // the ascent read the unzoned cells; what is carried is mixed
      const Tensor keep = zoneout->select(1, t);
      for (int64_t k = 0; k < depth; ++k) {
        new_cells[k] = zoneout_mix(cells[k], new_cells[k], keep[k]);
      }
      h_new = zoneout_mix(h, h_new, keep[depth]);
    }
    const int64_t active = sizes.has_value() ? (*sizes)[t].item<int64_t>() : batch;
    if (active == batch) {
      h = h_new;
      cells = new_cells;
      outputs[t] = h;
    } else {  // a packed batch: inactive rows keep their state and output zeros
      Tensor keep = (at::arange(batch, x.options().dtype(at::kLong)) < active).unsqueeze(1);
      h = at::where(keep, h_new, h);
      for (int64_t k = 0; k < depth; ++k) cells[k] = at::where(keep, new_cells[k], cells[k]);
      outputs[t] = at::where(keep, h_new, at::zeros_like(h_new));
    }
  }
  return {at::stack(outputs).to(in_dtype), h.to(in_dtype), at::stack(cells).to(in_dtype)};
}

std::tuple<Tensor, Tensor, Tensor> nested_lstm(
    const Tensor& x, at::TensorList weights, const Tensor& h0, const Tensor& c0,
    const std::optional<Tensor>& batch_sizes, bool reverse, std::string activations,
    std::string /*backend: this library has one implementation*/,
    const std::optional<Tensor>& zoneout, const std::optional<at::TensorList> norms) {
  return run(x, weights, std::nullopt, h0, c0, batch_sizes, reverse, activations, zoneout, norms);
}

std::tuple<Tensor, Tensor, Tensor> nested_lstm_projected(
    const Tensor& x, at::TensorList weights, const Tensor& weight_hr, const Tensor& h0,
    const Tensor& c0, const std::optional<Tensor>& batch_sizes, bool reverse,
    std::string activations) {
  return run(x, weights, weight_hr, h0, c0, batch_sizes, reverse, activations, std::nullopt,
             std::nullopt);
}

// Registered on loading, unless the op exists already (see the top of this file); kept until the
// library is unloaded.
struct Registration {
  std::unique_ptr<torch::Library> def, impl;

  Registration() {
    if (c10::Dispatcher::singleton().findSchema({"nestrnn::nested_lstm", ""}).has_value()) {
      return;
    }
    def = std::make_unique<torch::Library>(torch::Library::FRAGMENT, "nestrnn", std::nullopt,
                                           __FILE__, __LINE__);
    def->def(kSchema);
    def->def(kProjectedSchema);
    // ATen calls only: the same kernel serves CPU, CUDA and meta tensors.
    impl = std::make_unique<torch::Library>(torch::Library::IMPL, "nestrnn",
                                            c10::DispatchKey::CompositeExplicitAutograd,
                                            __FILE__, __LINE__);
    impl->impl("nested_lstm", TORCH_FN(nested_lstm));
    impl->impl("nested_lstm_projected", TORCH_FN(nested_lstm_projected));
  }
};

const Registration registration;

}  // namespace

// For a program to ask whether this library registered the op (0: nestrnn's own op was there).
extern "C" int nestrnn_torch_library_registered() { return registration.def != nullptr; }
