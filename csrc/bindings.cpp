// Python bindings of fasttangent._C: argument checks, allocation and streams around
// the raw launchers of sign_mask.cu and sym_gram.cu.
//
// Every check says what is wrong and how to fix it; the Python-level entry points are
// fasttangent.cuda_ops.{gram_cuda, pack_signs_cuda, count_sign_matches_cuda}.
// ATen plus torch's pybind11 casters only: <torch/extension.h> would pull in all of
// libtorch's C++ API, which is slow to compile
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

// only c10/cuda headers: ATen/cuda/CUDAContext.h pulls in cuBLAS/cuSPARSE headers that a
// bare CUDA toolkit may lack
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <optional>

#include "launchers.h"

namespace fasttangent {
namespace {

constexpr int64_t kBitsPerWord = 32;

ElementType element_type(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kBFloat16: return ElementType::kBFloat16;
    case at::kHalf: return ElementType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name, " has dtype ", t.scalar_type(),
                       " but the CUDA kernel reads float32, bfloat16 or float16; convert it (", name,
                       ".float()) or use backend='torch'");
  }
  return ElementType::kFloat32;  // unreachable: TORCH_CHECK_TYPE(false) throws
}

void check_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, ": ", name, " is on ", t.device(),
                    " but the CUDA kernel needs a CUDA tensor; move it with ", name,
                    ".cuda() or use backend='torch'");
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
                    " is on ", ref.device(), "; move both to one device");
}

bool aligned(const void* ptr, size_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

int sm_count(c10::DeviceIndex device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  return count;
}

// Jacobian-like operand: 2-D, rows of p contiguous elements (a column slice J[:, a:b]
// of a contiguous J is fine: its row stride is the leading dimension).
void check_rows(const at::Tensor& j, const char* op, const char* name) {
  check_cuda(j, op, name);
  TORCH_CHECK_VALUE(j.dim() == 2, op, ": ", name, " must be 2-D (n, p) but has shape ", j.sizes(),
                    "; flatten the parameter axes with ", name, ".reshape(n, -1)");
  TORCH_CHECK_VALUE(j.size(1) <= 1 || j.stride(1) == 1, op, ": ", name, " has strides ", j.strides(),
                    " but the kernel needs contiguous rows (stride 1 along p); call ", name, ".contiguous()");
  TORCH_CHECK_VALUE(j.size(0) <= 1 || j.stride(0) >= j.size(1), op, ": ", name, " has strides ", j.strides(),
                    " with overlapping rows; call ", name, ".contiguous()");
}

int64_t leading_dim(const at::Tensor& t) { return t.size(0) <= 1 ? std::max<int64_t>(t.size(1), 1) : t.stride(0); }

// Aligned vector loads are possible when the base and every row start are aligned.
bool rows_vector_ok(const at::Tensor& t, size_t vector_bytes) {
  const int64_t elems_per_vector = static_cast<int64_t>(vector_bytes / t.element_size());
  return aligned(t.data_ptr(), vector_bytes) && leading_dim(t) % elems_per_vector == 0;
}

at::Tensor pack_signs(const at::Tensor& x) {
  const char* op = "fasttangent._C.pack_signs";
  check_cuda(x, op, "x");
  const ElementType type = element_type(x, op, "x");
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x is not contiguous (strides ", x.strides(),
                    "); call x.contiguous() first");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t numel = x.numel();
  at::Tensor words = at::empty({(numel + kBitsPerWord - 1) / kBitsPerWord}, x.options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_pack_signs(x.data_ptr(), type, numel, words.data_ptr<int32_t>(), aligned(x.data_ptr(), 16),
                                   sm_count(x.device().index()), c10::cuda::getCurrentCUDAStream()));
  return words;
}

at::Tensor count_sign_matches(const at::Tensor& x, const at::Tensor& packed) {
  const char* op = "fasttangent._C.count_sign_matches";
  check_cuda(x, op, "x");
  check_cuda(packed, op, "packed");
  check_same_device(packed, x, op, "packed", "x");
  const ElementType type = element_type(x, op, "x");
  TORCH_CHECK_VALUE(x.is_contiguous(), op, ": x is not contiguous (strides ", x.strides(),
                    "); call x.contiguous() first");
  TORCH_CHECK_TYPE(packed.scalar_type() == at::kInt, op, ": packed has dtype ", packed.scalar_type(),
                   " but must be int32 as pack_signs returns it; convert with packed.int()");
  TORCH_CHECK_VALUE(packed.is_contiguous(), op, ": packed is not contiguous; call packed.contiguous() first");
  const int64_t numel = x.numel();
  const int64_t words = (numel + kBitsPerWord - 1) / kBitsPerWord;
  TORCH_CHECK_VALUE(packed.numel() == words, op, ": packed has ", packed.numel(), " words but x has ", numel,
                    " elements (", words, " words); was it recorded on the same inputs and model?");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor matches = at::zeros({}, x.options().dtype(at::kLong));
  C10_CUDA_CHECK(launch_count_sign_matches(x.data_ptr(), type, numel, packed.data_ptr<int32_t>(),
                                           reinterpret_cast<unsigned long long*>(matches.data_ptr<int64_t>()),
                                           aligned(x.data_ptr(), 16), sm_count(x.device().index()), c10::cuda::getCurrentCUDAStream()));
  return matches;
}

at::Tensor gram(const at::Tensor& j1, const std::optional<at::Tensor>& j2_opt,
                const std::optional<at::Tensor>& out_opt) {
  const char* op = "fasttangent._C.gram";
  check_rows(j1, op, "J1");
  const ElementType type = element_type(j1, op, "J1");
  const bool symmetric = !j2_opt.has_value();
  const at::Tensor& j2 = symmetric ? j1 : *j2_opt;
  if (!symmetric) {
    check_rows(j2, op, "J2");
    check_same_device(j2, j1, op, "J2", "J1");
    TORCH_CHECK_TYPE(j2.scalar_type() == j1.scalar_type(), op, ": J1 has dtype ", j1.scalar_type(), " but J2 has ",
                     j2.scalar_type(), "; convert both to one dtype");
    TORCH_CHECK_VALUE(j2.size(1) == j1.size(1), op, ": J1 has ", j1.size(1), " columns but J2 has ", j2.size(1),
                      "; both must be Jacobians over the same parameters (n, p)");
  }
  const int64_t n1 = j1.size(0), n2 = j2.size(0), p = j1.size(1);
  at::Tensor out;
  const bool accumulate = out_opt.has_value();
  if (accumulate) {
    out = *out_opt;
    check_cuda(out, op, "out");
    check_same_device(out, j1, op, "out", "J1");
    TORCH_CHECK_TYPE(out.scalar_type() == at::kFloat, op, ": out has dtype ", out.scalar_type(),
                     " but the kernel accumulates in float32; pass a float32 out");
    TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == n1 && out.size(1) == n2, op, ": out has shape ", out.sizes(),
                      " but J1 J2ᵀ has shape [", n1, ", ", n2, "]; pass an out of that shape");
    TORCH_CHECK_VALUE((n2 <= 1 || out.stride(1) == 1) && (n1 <= 1 || out.stride(0) >= n2), op,
                      ": out has strides ", out.strides(), " but the kernel writes contiguous rows; pass out.contiguous() "
                      "and copy back, or a row-major view");
  } else {
    out = at::empty({n1, n2}, j1.options().dtype(at::kFloat));
  }
  const size_t load_bytes = type == ElementType::kFloat32 ? 16 : 8;  // four elements per load
  const c10::cuda::CUDAGuard guard(j1.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int sms = sm_count(j1.device().index());
  const int splits = gram_split_count(n1, n2, p, symmetric, sms);
  const bool j1_ok = rows_vector_ok(j1, load_bytes), j2_ok = rows_vector_ok(j2, load_bytes);
  if (splits == 1) {
    C10_CUDA_CHECK(launch_gram(j1.data_ptr(), leading_dim(j1), j1_ok, j2.data_ptr(), leading_dim(j2), j2_ok,
                               out.data_ptr<float>(), leading_dim(out), rows_vector_ok(out, 16), n1, n2, p, type,
                               symmetric, 1, 0, accumulate, stream));
    return out;
  }
  // few tiles and a long p: k ranges into a workspace, then one ordered sum into out
  at::Tensor partial = at::empty({splits, n1, n2}, j1.options().dtype(at::kFloat));
  C10_CUDA_CHECK(launch_gram(j1.data_ptr(), leading_dim(j1), j1_ok, j2.data_ptr(), leading_dim(j2), j2_ok,
                             partial.data_ptr<float>(), n2, n2 % 4 == 0, n1, n2, p, type, symmetric, splits, n1 * n2,
                             /*accumulate=*/false, stream));
  C10_CUDA_CHECK(launch_sum_splits(partial.data_ptr<float>(), splits, n1, n2, out.data_ptr<float>(), leading_dim(out),
                                   accumulate, sms, stream));
  return out;
}

}  // namespace
}  // namespace fasttangent

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fasttangent CUDA kernels: sign-mask packing/comparison and blocked (symmetric) Gram products";
  m.def("pack_signs", &fasttangent::pack_signs, py::arg("x"),
        "Bit-pack (x > 0) of a contiguous CUDA float32/bfloat16/float16 tensor into int32 words "
        "(bit b of word w = element 32w+b, zero padded). Returns (ceil(numel/32),) int32.");
  m.def("count_sign_matches", &fasttangent::count_sign_matches, py::arg("x"), py::arg("packed"),
        "Number of elements of x whose status (x > 0) equals the packed reference. Returns a 0-d int64.");
  m.def("gram", &fasttangent::gram, py::arg("J1"), py::arg("J2") = py::none(), py::arg("out") = py::none(),
        "K (+)= J1 J2ᵀ with float32 accumulation (J1 J1ᵀ, computed on upper-triangle tiles, when J2 is None). "
        "J1 (n1, p), J2 (n2, p), out (n1, n2) float32; returns out or a new (n1, n2) float32 tensor.");
}
