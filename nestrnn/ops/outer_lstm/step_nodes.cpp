// Autograd nodes for the per-step work of the outer LSTM around a memory function written in
// Python (stepwise.py): the same work as its _Transition and _Output, which the CPU kernel's
// outer-step functions do, without a Python call per step in the forward and the backward.
//
// The kernel functions come in as addresses (the CPU kernel is a separate C library, built
// without torch headers; its interface, nlstm_kernel.h, gives their types); the buffers the
// steps of one call share, as tensors. Everything a node uses is owned by the Sequence it holds,
// so a node never outlives what it reads.
//
// Each step writes its h into the output (T, B, H), which the last step's node returns; the
// gradient of the output comes back through that node's backward and travels down the chain of
// links to every earlier step (stepwise.py explains the links).

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/utils/pybind.h>

#include "../common/nlstm_kernel.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// the kernel's outer steps, for either dtype (their types are the kernel's, in nlstm_kernel.h)
using TransitionFn = nlstm_outer_transition_fn;
using TransitionBackwardFn = nlstm_outer_transition_backward_fn;
using OutputFn = nlstm_outer_output_fn;
using OutputBackwardFn = nlstm_outer_output_backward_fn;
using FreeFn = nlstm_matrix_free_fn;

// What the steps of one call share (stepwise._Sequence has the Python side of it).
struct Sequence : torch::CustomClassHolder {
    // xh: each step's GEMM input, [x_t | h_{t-1}] (T, B, I + H) where x is given (the steps'
    // GEMMs then do the input projection, with fwd_matrix made of [W_ih | W_hh]), else h_{t-1};
    // bias: b_ih + b_hh (4H,), which the steps add, or none; db: each step's bias gradient
    // (T, 4H), or none; in_size: the input size where the backward computes the input gradient
    // (back_matrix is then made of [W_hh | W_ih]), else 0 (of W_hh). The matrices read w_fwd and
    // w_back, which the Sequence keeps.
    Sequence(at::Tensor gates, at::Tensor dz, at::Tensor xh, at::Tensor act_cells,
             at::Tensor output, at::Tensor flags, std::optional<at::Tensor> bias,
             std::optional<at::Tensor> db, std::optional<at::Tensor> x, int64_t in_size,
             at::Tensor w_fwd, at::Tensor w_back, uintptr_t fwd_matrix, uintptr_t back_matrix,
             uintptr_t free_matrix, std::tuple<int32_t, int32_t, int32_t> codes,
             std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t> kernels)
        : gates(std::move(gates)), dz(std::move(dz)), xh(std::move(xh)),
          act_cells(std::move(act_cells)), flags(std::move(flags)),
          bias(bias.value_or(at::Tensor())), db(db.value_or(at::Tensor())),
          x(x.value_or(at::Tensor())), w_fwd(std::move(w_fwd)), w_back(std::move(w_back)),
          out(std::move(output)), in_size(in_size),
          fwd_matrix(reinterpret_cast<void *>(fwd_matrix)),
          back_matrix(reinterpret_cast<void *>(back_matrix)),
          free_matrix(reinterpret_cast<FreeFn>(free_matrix)), gate(std::get<0>(codes)),
          candidate(std::get<1>(codes)), cell(std::get<2>(codes)),
          transition(reinterpret_cast<TransitionFn>(std::get<0>(kernels))),
          transition_backward(reinterpret_cast<TransitionBackwardFn>(std::get<1>(kernels))),
          output(reinterpret_cast<OutputFn>(std::get<2>(kernels))),
          output_backward(reinterpret_cast<OutputBackwardFn>(std::get<3>(kernels))) {
        steps = this->gates.size(0);
        batch = this->gates.size(1);
        hidden = this->gates.size(2) / 4;
        in_fwd = this->x.defined() ? this->x.size(2) : 0;
        const auto element = this->gates.element_size();
        stride = batch * 4 * hidden * element;
        state_stride = batch * hidden * element;
        input_stride = batch * in_size * element;
        x_stride = batch * in_fwd * element;
        xh_stride = batch * (in_fwd + hidden) * element;
        scratch = at::empty({batch, 2 * hidden + in_size}, this->gates.options());
        const auto same = [&](const at::Tensor &t) {
            return t.is_contiguous() && t.scalar_type() == this->gates.scalar_type();
        };
        TORCH_CHECK(same(this->gates) && same(this->dz) && same(this->xh) &&
                        same(this->act_cells) && same(this->out) && this->flags.is_contiguous(),
                    "step buffers must be contiguous, of one dtype");
        TORCH_CHECK(this->out.sizes() == state_sizes() && this->act_cells.sizes() == state_sizes(),
                    "output and act_cells must be (T, B, H)");
        TORCH_CHECK(this->xh.numel() == steps * batch * (in_fwd + hidden),
                    "xh must be (T, B, I + H)");
        TORCH_CHECK(!this->x.defined() || (same(this->x) && this->x.size(0) == steps &&
                                           this->x.size(1) == batch),
                    "x must be a contiguous (T, B, I) tensor of the gates' dtype");
        TORCH_CHECK(this->flags.scalar_type() == at::kByte && this->flags.numel() == 2 * steps,
                    "flags must be (2, steps) uint8");
        TORCH_CHECK(in_size >= 0, "in_size must be >= 0");
        TORCH_CHECK(!this->bias.defined() ||
                        (same(this->bias) && this->bias.numel() == 4 * hidden),
                    "bias must be a contiguous (4H,) tensor of the gates' dtype");
        TORCH_CHECK(!this->db.defined() ||
                        (same(this->db) && this->db.numel() == steps * 4 * hidden),
                    "db must be a contiguous (T, 4H) tensor of the gates' dtype");
        TORCH_CHECK(this->fwd_matrix && this->back_matrix && this->free_matrix &&
                        this->transition && this->transition_backward && this->output &&
                        this->output_backward,
                    "null kernel function or matrix");
    }
    ~Sequence() {
        free_matrix(fwd_matrix);
        free_matrix(back_matrix);
    }
    Sequence(const Sequence &) = delete;
    Sequence &operator=(const Sequence &) = delete;

    std::vector<int64_t> state_sizes() const { return {steps, batch, hidden}; }
    char *z(int64_t t) const { return static_cast<char *>(gates.data_ptr()) + t * stride; }
    char *dz_at(int64_t t) const { return static_cast<char *>(dz.data_ptr()) + t * stride; }
    char *act(int64_t t) const {
        return static_cast<char *>(act_cells.data_ptr()) + t * state_stride;
    }
    char *xh_at(int64_t t) const { return static_cast<char *>(xh.data_ptr()) + t * xh_stride; }
    // x_t where the steps do the input projection, else null
    const char *x_at(int64_t t) const {
        return in_fwd ? static_cast<const char *>(x.data_ptr()) + t * x_stride : nullptr;
    }
    // step t's h, in the output (until the last step's node has taken it)
    char *output_at(int64_t t) const {
        TORCH_CHECK(out.defined(), "the sequence's output was already returned");
        return static_cast<char *>(out.data_ptr()) + t * state_stride;
    }
    // the input gradient (T, B, I) the backward steps write, made by the first that needs it
    const at::Tensor &input_grad() const {
        if (!dx.defined())
            dx = at::empty({steps, batch, in_size}, gates.options());
        return dx;
    }
    // the input gradient, handed over (the prologue's backward returns it); the next backward
    // makes a new one
    at::Tensor take_input_grad() {
        input_grad();
        return std::exchange(dx, at::Tensor());
    }
    // step t's input gradient, or null where x needs none
    char *dx_at(int64_t t) const {
        return in_size ? static_cast<char *>(input_grad().data_ptr()) + t * input_stride
                       : nullptr;
    }
    // step t's bias gradient, or null where the bias needs none
    char *db_at(int64_t t) const {
        return db.defined() ? static_cast<char *>(db.data_ptr()) + t * stride / batch : nullptr;
    }
    const void *bias_ptr() const { return bias.defined() ? bias.data_ptr() : nullptr; }
    char *wide() const { return static_cast<char *>(scratch.data_ptr()) + state_stride; }
    // flags[0, t]: a backward wrote step t's gate gradients into dz; flags[1, t]: one wrote the
    // o gradient of step t's output
    uint8_t &reached(int64_t t) const { return flags.data_ptr<uint8_t>()[t]; }
    uint8_t &output_reached(int64_t t) const { return flags.data_ptr<uint8_t>()[steps + t]; }

    at::Tensor gates, dz, xh, act_cells, flags, bias, db, x, w_fwd, w_back;
    at::Tensor out;        // the output (T, B, H), until the last step's node returns it
    mutable at::Tensor dx; // see input_grad
    at::Tensor scratch;    // (B, 2H + I): (B, H) for d h, then the kernel's "wide"
    int64_t in_size;
    void *fwd_matrix, *back_matrix;
    FreeFn free_matrix;
    int32_t gate, candidate, cell;
    TransitionFn transition;
    TransitionBackwardFn transition_backward;
    OutputFn output;
    OutputBackwardFn output_backward;
    int64_t steps = 0, batch = 0, hidden = 0, in_fwd = 0, stride = 0, state_stride = 0,
            input_stride = 0, x_stride = 0, xh_stride = 0;
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

// The tensor that chains each step's node to the one before (the "link" of stepwise.py): of the
// output's shape, so that its gradient can be the output's, but without memory (zero strides).
at::Tensor new_link(const Sequence &seq) {
    return at::empty_strided(seq.state_sizes(), {0, 0, 0}, seq.gates.options());
}

// Step t's h gradient from the output's gradient (undefined: the loss did not use the output),
// as a pointer for the kernel; zeros are made in `zeros` where needed.
const void *output_grad_at(const Sequence &seq, const at::Tensor &d_output, int64_t t,
                           at::Tensor &zeros) {
    if (d_output.defined()) {
        TORCH_CHECK(d_output.is_contiguous() && d_output.sizes() == seq.state_sizes(),
                    "the output's gradient must reach the steps contiguous and (T, B, H)");
        return static_cast<const char *>(d_output.data_ptr()) + t * seq.state_stride;
    }
    zeros = at::zeros({seq.batch, seq.hidden}, seq.gates.options());
    return zeros.data_ptr();
}

// The new cell of step t, every row active, and the link from the step before -> the next step's
// f * c_t and i * g, and the link to the next step; h_t goes into the output.
struct Transition : public torch::autograd::Function<Transition> {
    static variable_list forward(AutogradContext *ctx, const c10::intrusive_ptr<Sequence> &seq,
                                 at::Tensor cell, const at::Tensor &link, int64_t t,
                                 int64_t t_next) {
        const Sequence &s = *seq;
        check_cell(s, cell);
        check_step(s, t);
        check_step(s, t_next);
        cell = cell.contiguous();
        at::Tensor gc = at::empty_like(cell), gi = at::empty_like(cell);
        check(s.transition(s.batch, s.hidden, s.gate, s.candidate, s.cell, s.fwd_matrix,
                           s.bias_ptr(), s.in_fwd, s.z(t), cell.data_ptr(), s.act(t),
                           s.output_at(t), s.x_at(t_next), s.xh_at(t_next), s.z(t_next),
                           gc.data_ptr(), gi.data_ptr()),
              "outer_transition");
        ctx->saved_data["seq"] = c10::IValue::make_capsule(seq);
        ctx->saved_data["t"] = t;
        ctx->saved_data["t_next"] = t_next;
        ctx->save_for_backward({cell});
        ctx->set_materialize_grads(false); // an unused output gets no zeros (see backward)
        return {gc, gi, new_link(s)};
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        refuse_double_backward(grads);
        const Sequence &s = sequence_of(ctx);
        const int64_t t = ctx->saved_data["t"].toInt(), t_next = ctx->saved_data["t_next"].toInt();
        const at::Tensor cell = ctx->get_saved_variables()[0];
        const at::Tensor d_gc = grad_or_zeros(grads[0], cell),
                         d_gi = grad_or_zeros(grads[1], cell);
        const at::Tensor &d_output = grads[2]; // the output's, down the links
        at::Tensor zeros, d_cell = at::empty_like(cell);
        const void *d_h = output_grad_at(s, d_output, t, zeros);
        if (!s.output_reached(t_next)) { // the next step's h fed nothing the loss used
            const int64_t row = 4 * s.hidden * s.gates.element_size(),
                          part = s.hidden * s.gates.element_size();
            for (int64_t b = 0; b < s.batch; b++)
                std::memset(s.dz_at(t_next) + b * row + 3 * part, 0, part);
        }
        check(s.transition_backward(s.batch, s.hidden, s.gate, s.candidate, s.cell,
                                    s.back_matrix, s.z(t), s.act(t), s.z(t_next),
                                    cell.data_ptr(), d_h, d_gc.data_ptr(),
                                    d_gi.data_ptr(), s.dz_at(t), s.dz_at(t_next),
                                    d_cell.data_ptr(), s.scratch.data_ptr(), s.db_at(t_next),
                                    s.in_size, s.dx_at(t_next), s.wide()),
              "outer_transition_backward");
        s.reached(t_next) = 1;
        s.output_reached(t) = 1;
        return {at::Tensor(), d_cell, d_output, at::Tensor(), at::Tensor()};
    }
};

// The last step's new cell, every row active, and the link from the step before -> the output
// (T, B, H), its h last, and that h.
struct Output : public torch::autograd::Function<Output> {
    static variable_list forward(AutogradContext *ctx, const c10::intrusive_ptr<Sequence> &seq,
                                 at::Tensor cell, const at::Tensor &link, int64_t t) {
        const Sequence &s = *seq;
        check_cell(s, cell);
        check_step(s, t);
        cell = cell.contiguous();
        check(s.output(s.batch, s.hidden, s.cell, s.z(t), cell.data_ptr(), s.act(t),
                       s.output_at(t)),
              "outer_output");
        // the nodes hold the Sequence: were it to hold the output too, the output's grad_fn
        // would hold the output, a cycle never freed
        at::Tensor output = std::move(seq->out);
        at::Tensor h = output.select(0, t).clone();
        ctx->saved_data["seq"] = c10::IValue::make_capsule(seq);
        ctx->saved_data["t"] = t;
        ctx->set_materialize_grads(false);
        return {output, h};
    }

    static variable_list backward(AutogradContext *ctx, variable_list grads) {
        refuse_double_backward(grads);
        const Sequence &s = sequence_of(ctx);
        const int64_t t = ctx->saved_data["t"].toInt();
        const at::Tensor d_output = grads[0].defined() ? grads[0].contiguous() : at::Tensor();
        // the last h's gradient, from the output and from h itself (the kernel overwrites it)
        at::Tensor d_h = d_output.defined()
                             ? d_output.select(0, t).clone()
                             : at::zeros({s.batch, s.hidden}, s.gates.options());
        if (grads[1].defined())
            d_h.add_(grads[1]);
        at::Tensor d_cell = at::empty_like(d_h);
        check(s.output_backward(s.batch, s.hidden, s.cell, s.z(t), s.act(t), d_h.data_ptr(),
                                s.dz_at(t), d_cell.data_ptr()),
              "outer_output_backward");
        s.output_reached(t) = 1;
        return {at::Tensor(), d_cell, d_output, at::Tensor()};
    }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor>
transition(const c10::intrusive_ptr<Sequence> &seq, const at::Tensor &cell, const at::Tensor &link,
           int64_t t, int64_t t_next) {
    auto out = Transition::apply(seq, cell, link, t, t_next);
    return {out[0], out[1], out[2]};
}

std::tuple<at::Tensor, at::Tensor> output(const c10::intrusive_ptr<Sequence> &seq,
                                          const at::Tensor &cell, const at::Tensor &link,
                                          int64_t t) {
    auto out = Output::apply(seq, cell, link, t);
    return {out[0], out[1]};
}

} // namespace

PYBIND11_MODULE(NESTRNN_MODULE_NAME, m) {
    m.doc() = "Autograd nodes of the outer LSTM's steps around a Python memory function.";
    m.attr("ABI_VERSION") = 2; // native_nodes.ABI_VERSION
    pybind11::class_<Sequence, c10::intrusive_ptr<Sequence>>(m, "Sequence")
        .def(pybind11::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>,
                            std::optional<at::Tensor>, int64_t, at::Tensor, at::Tensor,
                            uintptr_t, uintptr_t, uintptr_t, std::tuple<int32_t, int32_t, int32_t>,
                            std::tuple<uintptr_t, uintptr_t, uintptr_t, uintptr_t>>())
        .def("input_grad", &Sequence::input_grad)
        .def("take_input_grad", &Sequence::take_input_grad);
    m.def("transition", &transition);
    m.def("output", &output);
}
