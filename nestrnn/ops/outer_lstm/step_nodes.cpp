// Autograd nodes for the per-step work of the outer LSTM around a memory function written in
// Python (stepwise.py): the same work as its _Transition and _Output, which the CPU kernel's
// outer-step functions do, without a Python call per step in the forward and the backward.
//
// The kernel functions come in as addresses (the CPU kernel is a separate C library, built
// without torch headers); the buffers the steps of one call share, as tensors. Everything a node
// uses is owned by the Sequence it holds, so a node never outlives what it reads.

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using TransitionFn = int (*)(int64_t, int64_t, int32_t, int32_t, int32_t, const void *,
                             const void *, const void *, void *, void *, void *, void *, void *,
                             void *);
using TransitionBackwardFn = int (*)(int64_t, int64_t, int32_t, int32_t, int32_t, const void *,
                                     const void *, const void *, const void *, const void *,
                                     const void *, const void *, const void *, void *, void *,
                                     void *, void *);
using OutputFn = int (*)(int64_t, int64_t, int32_t, const void *, const void *, void *, void *);
using OutputBackwardFn = int (*)(int64_t, int64_t, int32_t, const void *, const void *, void *,
                                 void *, void *);
using FreeFn = void (*)(void *);

// What the steps of one call share (stepwise._Sequence has the Python side of it).
struct Sequence : torch::CustomClassHolder {
    Sequence(at::Tensor gates, at::Tensor dz, at::Tensor h_prev, at::Tensor act_cells,
             at::Tensor flags, at::Tensor w_hh, uintptr_t w_hh_t_matrix, uintptr_t w_hh_matrix,
             uintptr_t free_matrix, std::tuple<int32_t, int32_t, int32_t> codes,
             std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t> kernels)
        : gates(std::move(gates)), dz(std::move(dz)), h_prev(std::move(h_prev)),
          act_cells(std::move(act_cells)), flags(std::move(flags)), w_hh(std::move(w_hh)),
          w_hh_t_matrix(reinterpret_cast<void *>(w_hh_t_matrix)),
          w_hh_matrix(reinterpret_cast<void *>(w_hh_matrix)),
          free_matrix(reinterpret_cast<FreeFn>(free_matrix)), gate(std::get<0>(codes)),
          candidate(std::get<1>(codes)), cell(std::get<2>(codes)),
          transition(reinterpret_cast<TransitionFn>(std::get<0>(kernels))),
          transition_backward(reinterpret_cast<TransitionBackwardFn>(std::get<1>(kernels))),
          output(reinterpret_cast<OutputFn>(std::get<2>(kernels))),
          output_backward(reinterpret_cast<OutputBackwardFn>(std::get<3>(kernels))) {
        const auto steps = this->gates.size(0);
        batch = this->gates.size(1);
        hidden = this->h_prev.size(2);
        const auto element = this->gates.element_size();
        stride = batch * 4 * hidden * element;
        state_stride = batch * hidden * element;
        TORCH_CHECK(this->gates.is_contiguous() && this->dz.is_contiguous() &&
                        this->h_prev.is_contiguous() && this->act_cells.is_contiguous() &&
                        this->flags.is_contiguous(),
                    "step buffers must be contiguous");
        TORCH_CHECK(this->flags.scalar_type() == at::kByte && this->flags.numel() == 2 * steps,
                    "flags must be (2, steps) uint8");
        TORCH_CHECK(this->w_hh_t_matrix && this->w_hh_matrix && this->free_matrix &&
                        this->transition && this->transition_backward && this->output &&
                        this->output_backward,
                    "null kernel function or matrix");
    }
    ~Sequence() {
        free_matrix(w_hh_t_matrix);
        free_matrix(w_hh_matrix);
    }
    Sequence(const Sequence &) = delete;
    Sequence &operator=(const Sequence &) = delete;

    char *z(int64_t t) const { return static_cast<char *>(gates.data_ptr()) + t * stride; }
    char *dz_at(int64_t t) const { return static_cast<char *>(dz.data_ptr()) + t * stride; }
    char *act(int64_t t) const {
        return static_cast<char *>(act_cells.data_ptr()) + t * state_stride;
    }
    char *h_prev_at(int64_t t) const {
        return static_cast<char *>(h_prev.data_ptr()) + t * state_stride;
    }
    // flags[0, t]: a backward wrote step t's gate gradients into dz; flags[1, t]: one wrote the
    // o gradient of step t's output
    uint8_t &reached(int64_t t) const { return flags.data_ptr<uint8_t>()[t]; }
    uint8_t &output_reached(int64_t t) const {
        return flags.data_ptr<uint8_t>()[gates.size(0) + t];
    }

    at::Tensor gates, dz, h_prev, act_cells, flags, w_hh;
    void *w_hh_t_matrix, *w_hh_matrix;
    FreeFn free_matrix;
    int32_t gate, candidate, cell;
    TransitionFn transition;
    TransitionBackwardFn transition_backward;
    OutputFn output;
    OutputBackwardFn output_backward;
    int64_t batch = 0, hidden = 0, stride = 0, state_stride = 0;
};

void check(int code, const char *what) {
    if (code != 0)
        throw std::runtime_error(std::string("the CPU kernel's ") + what +
                                 " rejected its arguments");
}

// A contiguous gradient; zeros for an output nothing used.
at::Tensor grad_or_zeros(const at::Tensor &grad, const at::Tensor &like) {
    return grad.defined() ? grad.contiguous() : at::zeros_like(like);
}

void check_cell(const Sequence &seq, const at::Tensor &cell) {
    TORCH_CHECK(cell.dim() == 2 && cell.size(0) == seq.batch && cell.size(1) == seq.hidden &&
                    cell.scalar_type() == seq.gates.scalar_type() && cell.device().is_cpu(),
                "the memory function's cell must be (", seq.batch, ", ", seq.hidden, ") ",
                seq.gates.scalar_type(), " on the CPU");
    TORCH_CHECK(!cell._fw_grad(/*level=*/0).defined(),
                "forward-mode AD is not supported on this path");
}

void check_step(const Sequence &seq, int64_t t) {
    TORCH_CHECK(t >= 0 && t < seq.gates.size(0), "step ", t, " out of range");
}

// The nodes' backward is not differentiable: refuse to build a graph through it.
void refuse_double_backward(const variable_list &grads) {
    if (!at::GradMode::is_enabled())
        return;
    for (const auto &grad : grads)
        TORCH_CHECK(!grad.defined() || !grad.requires_grad(),
                    "the outer LSTM's step nodes have no second derivative (a backward with "
                    "create_graph=True through a memory function on the generic path)");
}

const Sequence &sequence_of(AutogradContext *ctx) {
    return *static_cast<const Sequence *>(ctx->saved_data["seq"].toCapsule().get());
}

// An empty tensor that chains each step's node to the one before (the "link" of stepwise.py).
at::Tensor link_like(const at::Tensor &like) { return at::empty({0}, like.options()); }

// The new cell of step t, every row active, and the link from the step before -> h_t, the next
// step's f * c_t and i * g, and the link to the next step.
struct Transition : public torch::autograd::Function<Transition> {
    static variable_list forward(AutogradContext *ctx, const c10::intrusive_ptr<Sequence> &seq,
                                 at::Tensor cell, const at::Tensor &link, int64_t t,
                                 int64_t t_next) {
        const Sequence &s = *seq;
        check_cell(s, cell);
        check_step(s, t);
        check_step(s, t_next);
        cell = cell.contiguous();
        at::Tensor h = at::empty_like(cell), gc = at::empty_like(cell), gi = at::empty_like(cell);
        check(s.transition(s.batch, s.hidden, s.gate, s.candidate, s.cell, s.w_hh_t_matrix,
                           s.z(t), cell.data_ptr(), s.act(t), h.data_ptr(), s.h_prev_at(t_next),
                           s.z(t_next), gc.data_ptr(), gi.data_ptr()),
              "outer_transition");
        ctx->saved_data["seq"] = c10::IValue::make_capsule(seq);
        ctx->saved_data["t"] = t;
        ctx->saved_data["t_next"] = t_next;
        ctx->save_for_backward({cell});
        ctx->set_materialize_grads(false); // an unused output gets no zeros (see backward)
        return {h, gc, gi, link_like(cell)};
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        refuse_double_backward(grads);
        const Sequence &s = sequence_of(ctx);
        const int64_t t = ctx->saved_data["t"].toInt(), t_next = ctx->saved_data["t_next"].toInt();
        const at::Tensor cell = ctx->get_saved_variables()[0];
        const at::Tensor d_h = grad_or_zeros(grads[0], cell),
                         d_gc = grad_or_zeros(grads[1], cell),
                         d_gi = grad_or_zeros(grads[2], cell);
        at::Tensor d_cell = at::empty_like(cell), scratch = at::empty_like(cell);
        if (!s.output_reached(t_next)) { // the next step's h fed nothing the loss used
            const int64_t row = 4 * s.hidden * s.gates.element_size(),
                          part = s.hidden * s.gates.element_size();
            for (int64_t b = 0; b < s.batch; b++)
                std::memset(s.dz_at(t_next) + b * row + 3 * part, 0, part);
        }
        check(s.transition_backward(s.batch, s.hidden, s.gate, s.candidate, s.cell,
                                    s.w_hh_matrix, s.z(t), s.act(t), s.z(t_next),
                                    cell.data_ptr(), d_h.data_ptr(), d_gc.data_ptr(),
                                    d_gi.data_ptr(), s.dz_at(t), s.dz_at(t_next),
                                    d_cell.data_ptr(), scratch.data_ptr()),
              "outer_transition_backward");
        s.reached(t_next) = 1;
        s.output_reached(t) = 1;
        return {at::Tensor(), d_cell, link_like(cell), at::Tensor(), at::Tensor()};
    }
};

// The last step's new cell, every row active, and the link from the step before -> its h.
struct Output : public torch::autograd::Function<Output> {
    static at::Tensor forward(AutogradContext *ctx, const c10::intrusive_ptr<Sequence> &seq,
                              at::Tensor cell, const at::Tensor &link, int64_t t) {
        const Sequence &s = *seq;
        check_cell(s, cell);
        check_step(s, t);
        cell = cell.contiguous();
        at::Tensor h = at::empty_like(cell);
        check(s.output(s.batch, s.hidden, s.cell, s.z(t), cell.data_ptr(), s.act(t),
                       h.data_ptr()),
              "outer_output");
        ctx->saved_data["seq"] = c10::IValue::make_capsule(seq);
        ctx->saved_data["t"] = t;
        return h;
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        refuse_double_backward(grads);
        const Sequence &s = sequence_of(ctx);
        const int64_t t = ctx->saved_data["t"].toInt();
        at::Tensor d_h = grads[0].clone(at::MemoryFormat::Contiguous); // the kernel overwrites it
        at::Tensor d_cell = at::empty_like(d_h);
        check(s.output_backward(s.batch, s.hidden, s.cell, s.z(t), s.act(t), d_h.data_ptr(),
                                s.dz_at(t), d_cell.data_ptr()),
              "outer_output_backward");
        s.output_reached(t) = 1;
        return {at::Tensor(), d_cell, link_like(d_cell), at::Tensor()};
    }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>
transition(const c10::intrusive_ptr<Sequence> &seq, const at::Tensor &cell, const at::Tensor &link,
           int64_t t, int64_t t_next) {
    auto out = Transition::apply(seq, cell, link, t, t_next);
    return {out[0], out[1], out[2], out[3]};
}

at::Tensor output(const c10::intrusive_ptr<Sequence> &seq, const at::Tensor &cell,
                  const at::Tensor &link, int64_t t) {
    return Output::apply(seq, cell, link, t);
}

} // namespace

PYBIND11_MODULE(NESTRNN_MODULE_NAME, m) {
    m.doc() = "Autograd nodes of the outer LSTM's steps around a Python memory function.";
    m.attr("ABI_VERSION") = 1; // native_nodes.ABI_VERSION
    pybind11::class_<Sequence, c10::intrusive_ptr<Sequence>>(m, "Sequence")
        .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, uintptr_t, uintptr_t, uintptr_t,
                            std::tuple<int32_t, int32_t, int32_t>,
                            std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t>>());
    m.def("transition", &transition);
    m.def("output", &output);
}
