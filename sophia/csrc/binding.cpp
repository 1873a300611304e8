/*
---
title: The PyTorch binding
summary: Keeps the launcher's memory accesses inside each tensor, then hands it raw pointers. One source, two builds.
---

The thin layer between Python and the [launcher](sophia_launcher.html). It takes lists
of tensors that share one device and one dtype (the [Python side](../fused.html) groups
and checks them) and calls the launcher's C functions with their addresses. The Python
side makes every check, with messages that say what a tensor is; this file repeats only
those without which the kernel would read or write outside a tensor, so that a direct
call fails with an error instead of a fault, before anything is written.

The same file serves the CPU build and the CUDA build (`SOPHIA_BUILD_CUDA`), and, with
`SOPHIA_TESTING`, the tests' build of either; see
[how the fused kernel is built](../../engineering/kernel.md). It includes no CUDA
header, so it compiles against a CPU-only PyTorch; the stream arrives from Python as an
integer.
*/
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "sophia_launcher.h"

namespace {

#if defined(SOPHIA_BUILD_CUDA)
constexpr c10::DeviceType kBuildDevice = c10::DeviceType::CUDA;
constexpr const char* kBuildName = "cuda";
#else
constexpr c10::DeviceType kBuildDevice = c10::DeviceType::CPU;
constexpr const char* kBuildName = "cpu";
#endif

using TensorLists = std::vector<std::vector<at::Tensor>>;

// A dtype, layout or device as Python prints it (`torch.float32`), since a Python user
// reads the message.
template <typename T>
std::string py_name(const T& value) {
    return py::str(py::cast(value));
}

std::string describe(const at::Tensor& t) {
    std::ostringstream out;
    out << "dtype " << py_name(t.scalar_type()) << ", device " << t.device() << ", layout " << py_name(t.layout());
    if (t.layout() == at::kStrided) {
        out << ", shape " << t.sizes() << ", strides " << t.strides();
    }
    return out.str();
}

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

// ## What the launcher needs
//
// Every tensor on this build's device and the call's, dense and contiguous (the kernel
// reads element $i$ at the address plus $i$), of the call's storage type, with as many
// elements as the first list's tensor at its index.
void check_tensor(const char* fn, const char* name, const size_t i, const at::Tensor& t, const at::Tensor& first,
                  const char* first_name, const int64_t numel) {
    TORCH_CHECK(t.device().type() == kBuildDevice, fn, ": ", name, "[", i, "] is on ", t.device(), " (",
                describe(t), "), but this is the ", kBuildName, " build of the fused kernel");
    TORCH_CHECK(t.device() == first.device(), fn, ": ", name, "[", i, "] is on ", t.device(),
                " but the call's tensors are on ", first.device(), " (", describe(t), ")");
    TORCH_CHECK(t.layout() == at::kStrided, fn, ": ", name, "[", i, "] has layout ", py_name(t.layout()), " (",
                describe(t), "); the fused kernel takes dense tensors");
    TORCH_CHECK(dtype_code(t.scalar_type()) >= 0, fn, ": ", name, "[", i, "] has unsupported dtype ",
                py_name(t.scalar_type()), " (", describe(t),
                "); the fused kernel takes torch.float32, torch.float16, torch.bfloat16 and torch.float64");
    TORCH_CHECK(t.scalar_type() == first.scalar_type(), fn, ": ", name, "[", i, "] has dtype ",
                py_name(t.scalar_type()), " but the call's tensors have dtype ", py_name(first.scalar_type()), " (",
                describe(t), ")");
    TORCH_CHECK(t.is_contiguous(), fn, ": ", name, "[", i, "] is not contiguous (", describe(t),
                "); the fused kernel needs contiguous tensors");
    TORCH_CHECK(t.numel() == numel, fn, ": ", name, "[", i, "] has ", t.numel(), " elements but ", first_name, "[",
                i, "] has ", numel, " (", describe(t), ")");
}

// The checked lists, and the launcher's struct pointing into them.
struct Lists {
    std::vector<void*> addresses[4];
    std::vector<int64_t> numels;
    int dtype = 0;

    SophiaTensorLists c() const {
        SophiaTensorLists out = {dtype, static_cast<int>(numels.size()), {}, numels.data()};
        for (int d = 0; d < 4; ++d) {
            out.lists[d] = addresses[d].data();
        }
        return out;
    }
};

Lists check_lists(const char* fn, const TensorLists& lists, const std::vector<const char*>& names) {
    TORCH_CHECK(lists.size() == names.size(), fn, ": expected ", names.size(), " lists, got ", lists.size());
    const std::vector<at::Tensor>& first_list = lists[0];
    Lists out;
    for (size_t d = 0; d < lists.size(); ++d) {
        TORCH_CHECK(lists[d].size() == first_list.size(), fn, ": ", names[d], " has ", lists[d].size(),
                    " tensors, expected ", first_list.size());
        for (size_t i = 0; i < lists[d].size(); ++i) {
            check_tensor(fn, names[d], i, lists[d][i], first_list[0], names[0], first_list[i].numel());
            out.addresses[d].push_back(lists[d][i].data_ptr());
        }
    }
    for (const at::Tensor& t : first_list) {
        out.numels.push_back(t.numel());
    }
    out.dtype = first_list.empty() ? 0 : dtype_code(first_list[0].scalar_type());
    return out;
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

void check_status(const char* fn, const int status) { TORCH_CHECK(status == 0, fn, ": ", sophia_last_error()); }

// ## The two operations
//
// Each takes the launcher's entry point as a template argument, so that the tests'
// build binds the plain kernels' entry points with the same code.
using StepEntry = int (*)(const SophiaTensorLists*, const SophiaStepArgs*, void*);
using EmaEntry = int (*)(const SophiaTensorLists*, const SophiaEmaArgs*, void*);

template <StepEntry entry>
void step(const TensorLists& lists, const double lr, const std::optional<at::Tensor>& lr_tensor, const double beta1,
          const double rho_bs, const double weight_decay, const double eps, const bool maximize,
          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
          const int64_t stream) {
    const char* fn = "sophia step";
    const Lists checked = check_lists(fn, lists, {"params", "grads", "exp_avgs", "hessians"});
    if (lists[0].empty()) {
        return;
    }
    const at::Tensor& first = lists[0][0];
    const SophiaStepArgs args = {lr,
                                 scalar_address(fn, "lr", lr_tensor, first),
                                 beta1,
                                 rho_bs,
                                 weight_decay,
                                 eps,
                                 scalar_address(fn, "grad_scale", grad_scale, first),
                                 scalar_address(fn, "found_inf", found_inf, first),
                                 maximize ? 1 : 0};
    const SophiaTensorLists tensors = checked.c();
    check_status(fn, entry(&tensors, &args, reinterpret_cast<void*>(stream)));
}

template <EmaEntry entry>
void hessian_ema(const TensorLists& lists, const double beta2, const bool square, const int64_t stream) {
    const char* fn = "sophia hessian_ema";
    const Lists checked = check_lists(fn, lists, {"hessians", "estimates"});
    if (lists[0].empty()) {
        return;
    }
    const SophiaEmaArgs args = {beta2, square ? 1 : 0};
    const SophiaTensorLists tensors = checked.c();
    check_status(fn, entry(&tensors, &args, reinterpret_cast<void*>(stream)));
}

// `found` is set to one if an element of `grads` is a NaN or an infinity, and is not
// written otherwise; the tensors are only read.
void nonfinite_check(const std::vector<at::Tensor>& grads, const at::Tensor& found, const int64_t stream) {
    const char* fn = "sophia nonfinite_check";
    const Lists checked = check_lists(fn, {grads}, {"grads"});
    if (grads.empty()) {
        return;
    }
    const float* address = scalar_address(fn, "found", found, grads[0]);
    const SophiaCheckArgs args = {const_cast<float*>(address)};
    const SophiaTensorLists tensors = checked.c();
    check_status(fn, sophia_nonfinite_check(&tensors, &args, reinterpret_cast<void*>(stream)));
}

// ## For the tests' build
//
// `convert(src, dtype, stream)`: `src` (`float32`) rounded to `dtype` by the kernel's
// conversion, and that converted back to `float32`. `packing(depth)` as a dict.
#if defined(SOPHIA_TESTING)
std::vector<at::Tensor> convert(const at::Tensor& src, const at::ScalarType dtype, const int64_t stream) {
    const char* fn = "sophia convert";
    TORCH_CHECK(src.device().type() == kBuildDevice && src.layout() == at::kStrided &&
                    src.scalar_type() == at::kFloat && src.is_contiguous(),
                fn, ": src must be a contiguous torch.float32 tensor on this build's device, got ", describe(src));
    TORCH_CHECK(dtype_code(dtype) >= 0, fn, ": unsupported dtype ", py_name(dtype));
    at::Tensor stored = at::empty_like(src, src.options().dtype(dtype));
    at::Tensor back = at::empty_like(src);
    check_status(fn, sophia_convert(dtype_code(dtype), src.data_ptr<float>(), stored.data_ptr(),
                                    back.data_ptr<float>(), src.numel(), reinterpret_cast<void*>(stream)));
    return {stored, back};
}

py::dict packing(const int depth) {
    int64_t out[7];
    check_status("sophia packing", sophia_packing(depth, out));
    const char* keys[7] = {"chunk_size",  "block_size",       "ilp",           "max_tensors",
                           "max_blocks", "kernel_arg_bytes", "gpu_block_size"};
    py::dict d;
    for (int k = 0; k < 7; ++k) {
        d[keys[k]] = out[k];
    }
    return d;
}

void set_packing(const int64_t chunk_size, const int max_blocks, const int max_tensors, const int block_size) {
    check_status("sophia set_packing", sophia_set_packing(chunk_size, max_blocks, max_tensors, block_size));
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.doc() = "The fused Sophia step (see sophia/fused.py).";
    m.attr("device_type") = kBuildName;
    m.def("fused_step", &step<sophia_fused_step>,
          "One Sophia step on [params, grads, exp_avgs, hessians] of one device and dtype.", py::arg("lists"),
          py::arg("lr"), py::arg("lr_tensor"), py::arg("beta1"), py::arg("rho_bs"), py::arg("weight_decay"),
          py::arg("eps"), py::arg("maximize"), py::arg("grad_scale"), py::arg("found_inf"), py::arg("stream"));
    m.def("hessian_ema", &hessian_ema<sophia_fused_hessian_ema>,
          "Fold [hessians, estimates] of one device and dtype into the Hessian EMA.", py::arg("lists"),
          py::arg("beta2"), py::arg("square"), py::arg("stream"));
    m.def("nonfinite_check", &nonfinite_check,
          "Set found (one float32 on the grads' device) to 1 if an element of grads is NaN or infinite.",
          py::arg("grads"), py::arg("found"), py::arg("stream"));
#if defined(SOPHIA_TESTING)
    m.def("simple_step", &step<sophia_simple_step>, "fused_step with the plain kernel.");
    m.def("simple_hessian_ema", &hessian_ema<sophia_simple_hessian_ema>, "hessian_ema with the plain kernel.");
    m.def("convert", &convert, "Round float32 to dtype and back with the kernel's conversions.");
    m.def("packing", &packing, "How tensors are packed into launches, for 4 or 2 lists.");
    m.def("set_packing", &set_packing, "A smaller packing (chunk_size, max_blocks, max_tensors, block_size), 0s "
                                       "for the defaults.");
    m.def("launch_count", &sophia_launch_count, "Kernels launched by the last call on this thread.");
#endif
}
