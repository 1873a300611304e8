/*
---
title: The PyTorch binding
summary: Checks every tensor, then hands raw pointers to the launcher. One source, two builds.
---

# The PyTorch binding

The thin layer between Python and the [launcher](sophia_launcher.html). It takes lists
of tensors that all share one device and one dtype (the [Python side](../fused.html)
groups them), checks each one, and calls the launcher's C functions with their
addresses. It writes nothing itself, and it checks everything before the launcher
runs, so a refused call changes nothing.

The same file serves two builds, made by `torch.utils.cpp_extension.load`:

* the **CPU build** (this file and `launcher_cpu.cpp`), where the kernel runs through
  the [CPU emulation](cpu_emulation.html);
* the **CUDA build** (this file and `sophia_launcher.cu`), compiled by `nvcc`.

The build says which it is with `SOPHIA_BUILD_CUDA`. This file includes no CUDA
header, so it compiles against a CPU-only PyTorch as well; the CUDA stream arrives from
Python as an integer (`torch.cuda.current_stream().cuda_stream`, `0` on the CPU).
*/
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "sophia_launcher.h"

namespace {

// ## Which device this build runs on
#if defined(SOPHIA_BUILD_CUDA)
constexpr c10::DeviceType kBuildDevice = c10::DeviceType::CUDA;
constexpr const char* kBuildName = "cuda";
#else
constexpr c10::DeviceType kBuildDevice = c10::DeviceType::CPU;
constexpr const char* kBuildName = "cpu";
#endif

// ## Describing a tensor in an error message
//
// In Python's spelling (`torch.float32`, `torch.sparse_coo`), since the message is read
// by a Python user.
std::string dtype_name(const at::ScalarType t) {
    switch (t) {
        case at::kFloat:
            return "torch.float32";
        case at::kDouble:
            return "torch.float64";
        case at::kHalf:
            return "torch.float16";
        case at::kBFloat16:
            return "torch.bfloat16";
        case at::kComplexFloat:
            return "torch.complex64";
        case at::kComplexDouble:
            return "torch.complex128";
        case at::kBool:
            return "torch.bool";
        case at::kByte:
            return "torch.uint8";
        case at::kChar:
            return "torch.int8";
        case at::kShort:
            return "torch.int16";
        case at::kInt:
            return "torch.int32";
        case at::kLong:
            return "torch.int64";
        default:
            return std::string("torch.") + c10::toString(t);
    }
}

std::string layout_name(const at::Layout l) {
    switch (l) {
        case at::kStrided:
            return "torch.strided";
        case at::kSparse:
            return "torch.sparse_coo";
        case at::kSparseCsr:
            return "torch.sparse_csr";
        case at::kSparseCsc:
            return "torch.sparse_csc";
        case at::kSparseBsr:
            return "torch.sparse_bsr";
        case at::kSparseBsc:
            return "torch.sparse_bsc";
        default: {
            std::ostringstream out;
            out << l;
            return out.str();
        }
    }
}

std::string describe(const at::Tensor& t) {
    std::ostringstream out;
    out << "dtype " << dtype_name(t.scalar_type()) << ", device " << t.device() << ", layout "
        << layout_name(t.layout());
    if (t.layout() == at::kStrided) {
        out << ", shape " << t.sizes() << ", strides " << t.strides();
    }
    return out.str();
}

// ## The checks
//
// The launcher's dtype code for a storage dtype, or `-1`.
int dtype_code(const at::ScalarType t) {
    switch (t) {
        case at::kFloat:
            return 0;
        case at::kHalf:
            return 1;
        case at::kBFloat16:
            return 2;
        case at::kDouble:
            return 3;
        default:
            return -1;
    }
}

// One tensor of a list: on this build's device (and the first tensor's device), dense,
// of the call's dtype, contiguous, with the expected number of elements. `name` and
// `i` say which tensor, `describe` what it is.
void check_tensor(const char* fn, const char* name, const size_t i, const at::Tensor& t, const at::Tensor& first,
                  const char* first_name, const int64_t numel) {
    TORCH_CHECK(t.defined(), fn, ": ", name, "[", i, "] is an undefined tensor");
    TORCH_CHECK(t.device().type() == kBuildDevice, fn, ": ", name, "[", i, "] is on ", t.device(), " (",
                describe(t), "), but this is the ", kBuildName, " build of the fused kernel");
    TORCH_CHECK(t.device() == first.device(), fn, ": ", name, "[", i, "] is on ", t.device(),
                " but the call's tensors are on ", first.device(), " (", describe(t), ")");
    TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, "[", i, "] has layout ", layout_name(t.layout()), " (",
                describe(t), "); the fused kernel takes dense tensors");
    TORCH_CHECK(dtype_code(t.scalar_type()) >= 0, fn, ": ", name, "[", i, "] has unsupported dtype ",
                dtype_name(t.scalar_type()), " (", describe(t),
                "); the fused kernel takes torch.float32, torch.float16, torch.bfloat16 and torch.float64");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), fn, ": ", name, "[", i, "] has dtype ",
                dtype_name(t.scalar_type()), " but the call's tensors have dtype ", dtype_name(first.scalar_type()),
                " (", describe(t), ")");
    TORCH_CHECK(t.is_contiguous(), fn, ": ", name, "[", i, "] is not contiguous (", describe(t),
                "); the fused kernel needs contiguous tensors");
    TORCH_CHECK(!t.is_neg() && !t.is_conj(), fn, ": ", name, "[", i,
                "] is a lazy negated or conjugated view (", describe(t), "); resolve it first");
    TORCH_CHECK(t.numel() == numel, fn, ": ", name, "[", i, "] has ", t.numel(), " elements but ", first_name, "[",
                i, "] has ", numel, " (", describe(t), ")");
    TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), fn, ": ", name, "[", i,
                "] is an inference tensor, which cannot be updated in place outside torch.inference_mode() (",
                describe(t), ")");
}

void check_list(const char* fn, const char* name, const std::vector<at::Tensor>& list, const char* first_name,
                const std::vector<at::Tensor>& first_list) {
    const at::Tensor& first = first_list[0];
    TORCH_CHECK(list.size() == first_list.size(), fn, ": ", name, " has ", list.size(), " tensors, expected ",
                first_list.size());
    for (size_t i = 0; i < list.size(); ++i) {
        check_tensor(fn, name, i, list[i], first, first_name, first_list[i].numel());
    }
}

// A one-element `float32` tensor on the call's device, given by address, or null.
const float* scalar_address(const char* fn, const char* name, const std::optional<at::Tensor>& t,
                            const at::Tensor& first) {
    if (!t.has_value() || !t->defined()) {
        return nullptr;
    }
    TORCH_CHECK(t->layout() == at::kStrided && t->numel() == 1 && t->scalar_type() == at::kFloat &&
                    t->device() == first.device(),
                fn, ": ", name, " must be a one-element torch.float32 tensor on ", first.device(), ", got ",
                describe(*t), " with ", t->numel(), " elements");
    return t->data_ptr<float>();
}

std::vector<void*> addresses(const std::vector<at::Tensor>& list) {
    std::vector<void*> out;
    out.reserve(list.size());
    for (const at::Tensor& t : list) {
        out.push_back(t.data_ptr());
    }
    return out;
}

void check_status(const char* fn, const int status) {
    TORCH_CHECK(status == 0, fn, ": ", sophia_last_error());
}

// ## The step
//
// `fused_step` runs the multi-tensor kernel; `simple_step` the plain one (for tests).
void step(const char* fn, const bool simple, const std::vector<at::Tensor>& params,
          const std::vector<at::Tensor>& grads, const std::vector<at::Tensor>& exp_avgs,
          const std::vector<at::Tensor>& hessians, const double lr, const std::optional<at::Tensor>& lr_tensor,
          const double beta1, const double rho_bs, const double weight_decay, const double eps, const bool maximize,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
          const int64_t stream) {
    if (params.empty()) {
        TORCH_CHECK(grads.empty() && exp_avgs.empty() && hessians.empty(), fn, ": params is empty but not the other lists");
        return;
    }
    const at::Tensor& first = params[0];
    check_list(fn, "params", params, "params", params);
    check_list(fn, "grads", grads, "params", params);
    check_list(fn, "exp_avgs", exp_avgs, "params", params);
    check_list(fn, "hessians", hessians, "params", params);
    const float* lr_ptr = scalar_address(fn, "lr", lr_tensor, first);
    const float* grad_scale_ptr = scalar_address(fn, "grad_scale", grad_scale, first);
    const float* found_inf_ptr = scalar_address(fn, "found_inf", found_inf, first);

    std::vector<void*> param_ptrs = addresses(params);
    std::vector<void*> grad_ptrs = addresses(grads);
    std::vector<void*> exp_avg_ptrs = addresses(exp_avgs);
    std::vector<void*> hessian_ptrs = addresses(hessians);
    std::vector<int64_t> numels;
    for (const at::Tensor& p : params) {
        numels.push_back(p.numel());
    }
    const auto launch = simple ? sophia_simple_step : sophia_fused_step;
    check_status(fn, launch(dtype_code(first.scalar_type()), static_cast<int>(params.size()), param_ptrs.data(),
                            grad_ptrs.data(), exp_avg_ptrs.data(), hessian_ptrs.data(), numels.data(), lr, lr_ptr,
                            beta1, rho_bs, weight_decay, eps, maximize ? 1 : 0, grad_scale_ptr, found_inf_ptr,
                            reinterpret_cast<void*>(stream)));
}

void fused_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& hessians, const double lr,
                const std::optional<at::Tensor>& lr_tensor, const double beta1, const double rho_bs,
                const double weight_decay, const double eps, const bool maximize,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                const int64_t stream) {
    step("sophia fused_step", false, params, grads, exp_avgs, hessians, lr, lr_tensor, beta1, rho_bs, weight_decay,
         eps, maximize, grad_scale, found_inf, stream);
}

void simple_step(const std::vector<at::Tensor>& params, const std::vector<at::Tensor>& grads,
                 const std::vector<at::Tensor>& exp_avgs, const std::vector<at::Tensor>& hessians, const double lr,
                 const std::optional<at::Tensor>& lr_tensor, const double beta1, const double rho_bs,
                 const double weight_decay, const double eps, const bool maximize,
                 const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                 const int64_t stream) {
    step("sophia simple_step", true, params, grads, exp_avgs, hessians, lr, lr_tensor, beta1, rho_bs, weight_decay,
         eps, maximize, grad_scale, found_inf, stream);
}

// ## The Hessian EMA
void ema(const char* fn, const bool simple, const std::vector<at::Tensor>& hessians,
         const std::vector<at::Tensor>& estimates, const double beta2, const bool square, const int64_t stream) {
    if (hessians.empty()) {
        TORCH_CHECK(estimates.empty(), fn, ": hessians is empty but estimates is not");
        return;
    }
    const at::Tensor& first = hessians[0];
    check_list(fn, "hessians", hessians, "hessians", hessians);
    check_list(fn, "estimates", estimates, "hessians", hessians);
    std::vector<void*> hessian_ptrs = addresses(hessians);
    std::vector<void*> estimate_ptrs = addresses(estimates);
    std::vector<int64_t> numels;
    for (const at::Tensor& h : hessians) {
        numels.push_back(h.numel());
    }
    const auto launch = simple ? sophia_simple_hessian_ema : sophia_fused_hessian_ema;
    check_status(fn, launch(dtype_code(first.scalar_type()), static_cast<int>(hessians.size()), hessian_ptrs.data(),
                            estimate_ptrs.data(), numels.data(), beta2, square ? 1 : 0,
                            reinterpret_cast<void*>(stream)));
}

void hessian_ema(const std::vector<at::Tensor>& hessians, const std::vector<at::Tensor>& estimates,
                 const double beta2, const bool square, const int64_t stream) {
    ema("sophia hessian_ema", false, hessians, estimates, beta2, square, stream);
}

void simple_hessian_ema(const std::vector<at::Tensor>& hessians, const std::vector<at::Tensor>& estimates,
                        const double beta2, const bool square, const int64_t stream) {
    ema("sophia simple_hessian_ema", true, hessians, estimates, beta2, square, stream);
}

// ## For the tests
//
// `convert(src, dtype, stream)`: `src` (`float32`) rounded to `dtype` by the kernel's
// conversion, and that converted back to `float32`.
std::vector<at::Tensor> convert(const at::Tensor& src, const at::ScalarType dtype, const int64_t stream) {
    const char* fn = "sophia convert";
    TORCH_CHECK(src.device().type() == kBuildDevice && src.layout() == at::kStrided &&
                    src.scalar_type() == at::kFloat && src.is_contiguous(),
                fn, ": src must be a contiguous torch.float32 tensor on this build's device, got ", describe(src));
    TORCH_CHECK(dtype_code(dtype) >= 0, fn, ": unsupported dtype ", dtype_name(dtype));
    at::Tensor stored = at::empty_like(src, src.options().dtype(dtype));
    at::Tensor back = at::empty_like(src);
    check_status(fn, sophia_convert(dtype_code(dtype), src.data_ptr<float>(), stored.data_ptr(),
                                    back.data_ptr<float>(), src.numel(), reinterpret_cast<void*>(stream)));
    return {stored, back};
}

// The packing, as a dict, for depth 4 (the step) or 2 (the EMA).
py::dict packing(const int depth) {
    int64_t out[7];
    check_status("sophia packing", sophia_packing(depth, out));
    py::dict d;
    d["chunk_size"] = out[0];
    d["block_size"] = out[1];
    d["ilp"] = out[2];
    d["max_tensors"] = out[3];
    d["max_blocks"] = out[4];
    d["kernel_arg_bytes"] = out[5];
    d["gpu_block_size"] = out[6];
    return d;
}

void set_packing(const int64_t chunk_size, const int max_blocks, const int max_tensors, const int block_size) {
    check_status("sophia set_packing", sophia_set_packing(chunk_size, max_blocks, max_tensors, block_size));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "The fused Sophia step (see sophia/fused.py).";
    m.attr("device_type") = kBuildName;
    m.def("fused_step", &fused_step, "One Sophia step on lists of tensors of one device and dtype.",
          py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("hessians"), py::arg("lr"),
          py::arg("lr_tensor"), py::arg("beta1"), py::arg("rho_bs"), py::arg("weight_decay"), py::arg("eps"),
          py::arg("maximize"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("stream"));
    m.def("hessian_ema", &hessian_ema, "Fold estimates into the Hessian EMA, for lists of one device and dtype.",
          py::arg("hessians"), py::arg("estimates"), py::arg("beta2"), py::arg("square"), py::arg("stream"));
    m.def("simple_step", &simple_step, "fused_step with the plain one-thread-per-element kernel (tests).",
          py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("hessians"), py::arg("lr"),
          py::arg("lr_tensor"), py::arg("beta1"), py::arg("rho_bs"), py::arg("weight_decay"), py::arg("eps"),
          py::arg("maximize"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("stream"));
    m.def("simple_hessian_ema", &simple_hessian_ema, "hessian_ema with the plain kernel (tests).",
          py::arg("hessians"), py::arg("estimates"), py::arg("beta2"), py::arg("square"), py::arg("stream"));
    m.def("convert", &convert, "Round float32 to dtype and back with the kernel's conversions (tests).",
          py::arg("src"), py::arg("dtype"), py::arg("stream"));
    m.def("packing", &packing, "How tensors are packed into launches.", py::arg("depth"));
    m.def("set_packing", &set_packing, "Shrink the packing, 0 for the defaults (tests only).",
          py::arg("chunk_size"), py::arg("max_blocks"), py::arg("max_tensors"), py::arg("block_size"));
    m.def("launch_count", &sophia_launch_count, "Kernels launched by the last call on this thread.");
}
