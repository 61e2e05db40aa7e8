// The three passes of an NHWC convolution on oneDNN's own kernels, as XLA FFI handlers: forward,
// backward data (the input gradient) and backward weights (the weight gradient), what PyTorch
// runs on CPU. XLA's own oneDNN rewriter takes only forward convolutions, as inference
// (cpu_kernels' module doc); through these, resnet_jax.models.cpu_kernels gives oneDNN every
// convolution of a training step (`jax.ffi.ffi_call`).
//
// Built by setup.py as the module resnet_jax.models._onednn, against jaxlib's XLA FFI headers
// and onednn-devel-cpu-gomp's; cpu_kernels loads oneDNN's library (onednn-cpu-gomp) before
// importing it, and registers each of `handlers()` with jax.ffi.register_ffi_target as
// "resnet_jax_onednn_<pass>".
//
// Arrays: x (N, H, W, Ci), y or dy (N, Ho, Wo, Co), both NHWC, and w or dW (Kh, Kw, Ci, Co),
// HWIO; float32, dense, row-major. forward takes x and w and gives y; input_gradient takes dy
// and w and gives dx; weight_gradient takes x and dy and gives dW. Attributes: the strides and
// the four paddings, given so that Ho = (H + top + bottom - Kh) / sh + 1 exactly, none negative
// (cpu_kernels drops the rows no window reads first).

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// A 4-d float32 array (a comma in a template's arguments would split the handler macro's).
using Array4 = ffi::Buffer<ffi::F32, 4>;

// n, h, w, ci, co, kh, kw, ho, wo, stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right.
using Geometry = std::array<int64_t, 15>;

enum class Pass { kForward, kInputGradient, kWeightGradient };

// One convolution pass, its oneDNN primitive chosen for the shapes: x (src), dy (diff_dst) and
// the kernel w in the layouts the caller's arrays have (NHWC, HWIO), and the kernel's layout
// in the primitive's own choosing (a blocked one), reordered to and from HWIO around each run.
struct Kernel {
  dnnl::primitive primitive;
  dnnl::memory::desc x, y, weights, hwio;
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// oneDNN chooses its kernel per shape when the primitive is created (milliseconds): once per
// convolution of the step, cached for every later step.
const Kernel& KernelFor(Pass pass, const Geometry& g) {
  static std::mutex mutex;
  static std::map<std::pair<Pass, Geometry>, std::unique_ptr<Kernel>> kernels;
  std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<Kernel>& kernel = kernels[{pass, g}];
  if (kernel) return *kernel;
  using tag = dnnl::memory::format_tag;
  const auto f32 = dnnl::memory::data_type::f32;
  const auto [n, h, w, ci, co, kh, kw, ho, wo, sh, sw, top, bottom, left, right] = g;
  dnnl::memory::desc x({n, ci, h, w}, f32, tag::nhwc);
  dnnl::memory::desc y({n, co, ho, wo}, f32, tag::nhwc);
  dnnl::memory::desc any({co, ci, kh, kw}, f32, tag::any);
  dnnl::memory::desc hwio({co, ci, kh, kw}, f32, tag::hwio);
  dnnl::memory::dims strides{sh, sw}, low{top, left}, high{bottom, right};
  // The backward passes' kernels are chosen to match a forward one: their hint.
  dnnl::convolution_forward::primitive_desc forward(
      Engine(), dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct, x, any,
      y, strides, low, high);
  if (pass == Pass::kForward) {
    kernel.reset(new Kernel{dnnl::convolution_forward(forward), x, y, forward.weights_desc(),
                            hwio});
  } else if (pass == Pass::kInputGradient) {
    dnnl::convolution_backward_data::primitive_desc backward(
        Engine(), dnnl::algorithm::convolution_direct, x, any, y, strides, low, high, forward);
    kernel.reset(new Kernel{dnnl::convolution_backward_data(backward), x, y,
                            backward.weights_desc(), hwio});
  } else {
    dnnl::convolution_backward_weights::primitive_desc backward(
        Engine(), dnnl::algorithm::convolution_direct, x, any, y, strides, low, high, forward);
    kernel.reset(new Kernel{dnnl::convolution_backward_weights(backward), x, y,
                            backward.diff_weights_desc(), hwio});
  }
  return *kernel;
}

// Runs `pass` on x (NHWC), y (NHWC) and w (HWIO), of which it writes one: y for the forward
// pass, x for the input gradient (dx), w for the weight gradient (dW).
ffi::Error Run(Pass pass, const Geometry& geometry, float* x, float* y, float* w) {
  try {
    const Kernel& kernel = KernelFor(pass, geometry);
    dnnl::stream stream(Engine());
    dnnl::memory x_memory(kernel.x, Engine(), x), y_memory(kernel.y, Engine(), y);
    dnnl::memory hwio(kernel.hwio, Engine(), w);
    const bool reorder = kernel.weights != kernel.hwio;
    dnnl::memory weights = reorder ? dnnl::memory(kernel.weights, Engine()) : hwio;
    if (reorder && pass != Pass::kWeightGradient) {
      dnnl::reorder(hwio, weights).execute(stream, hwio, weights);
    }
    if (pass == Pass::kForward) {
      kernel.primitive.execute(stream, {{DNNL_ARG_SRC, x_memory}, {DNNL_ARG_WEIGHTS, weights},
                                        {DNNL_ARG_DST, y_memory}});
    } else if (pass == Pass::kInputGradient) {
      kernel.primitive.execute(stream, {{DNNL_ARG_DIFF_DST, y_memory},
                                        {DNNL_ARG_WEIGHTS, weights},
                                        {DNNL_ARG_DIFF_SRC, x_memory}});
    } else {
      kernel.primitive.execute(stream, {{DNNL_ARG_SRC, x_memory},
                                        {DNNL_ARG_DIFF_DST, y_memory},
                                        {DNNL_ARG_DIFF_WEIGHTS, weights}});
      if (reorder) dnnl::reorder(weights, hwio).execute(stream, weights, hwio);
    }
    stream.wait();
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("oneDNN: ") + error.what());
  }
  return ffi::Error::Success();
}

Geometry GeometryOf(ffi::Span<const int64_t> x, ffi::Span<const int64_t> y,
                    ffi::Span<const int64_t> w, int64_t stride_h, int64_t stride_w,
                    int64_t pad_top, int64_t pad_bottom, int64_t pad_left, int64_t pad_right) {
  return {x[0], x[1], x[2], x[3], y[3], w[0], w[1], y[1], y[2],
          stride_h, stride_w, pad_top, pad_bottom, pad_left, pad_right};
}

ffi::Error ForwardImpl(Array4 x, Array4 w, ffi::Result<Array4> y, int64_t stride_h,
                       int64_t stride_w, int64_t pad_top, int64_t pad_bottom, int64_t pad_left,
                       int64_t pad_right) {
  const Geometry g = GeometryOf(x.dimensions(), y->dimensions(), w.dimensions(), stride_h,
                                stride_w, pad_top, pad_bottom, pad_left, pad_right);
  return Run(Pass::kForward, g, const_cast<float*>(x.typed_data()), y->typed_data(),
             const_cast<float*>(w.typed_data()));
}

ffi::Error InputGradientImpl(Array4 dy, Array4 w, ffi::Result<Array4> dx, int64_t stride_h,
                             int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                             int64_t pad_left, int64_t pad_right) {
  const Geometry g = GeometryOf(dx->dimensions(), dy.dimensions(), w.dimensions(), stride_h,
                                stride_w, pad_top, pad_bottom, pad_left, pad_right);
  return Run(Pass::kInputGradient, g, dx->typed_data(), const_cast<float*>(dy.typed_data()),
             const_cast<float*>(w.typed_data()));
}

ffi::Error WeightGradientImpl(Array4 x, Array4 dy, ffi::Result<Array4> dw, int64_t stride_h,
                              int64_t stride_w, int64_t pad_top, int64_t pad_bottom,
                              int64_t pad_left, int64_t pad_right) {
  const Geometry g = GeometryOf(x.dimensions(), dy.dimensions(), dw->dimensions(), stride_h,
                                stride_w, pad_top, pad_bottom, pad_left, pad_right);
  return Run(Pass::kWeightGradient, g, const_cast<float*>(x.typed_data()),
             const_cast<float*>(dy.typed_data()), dw->typed_data());
}

// Each pass's signature: its two arrays in, the third out, and the convolution's geometry.
auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<Array4>()
      .Arg<Array4>()
      .Ret<Array4>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Forward, ForwardImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(InputGradient, InputGradientImpl, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(WeightGradient, WeightGradientImpl, Binding());

namespace {

// The handlers for jax.ffi.register_ffi_target, as capsules named as jax.ffi.pycapsule names
// them: {"forward": ..., "input_gradient": ..., "weight_gradient": ...}.
PyObject* Handlers(PyObject*, PyObject*) {
  PyObject* handlers = PyDict_New();
  for (auto [name, handler] : {std::pair<const char*, XLA_FFI_Handler*>{"forward", Forward},
                               {"input_gradient", InputGradient},
                               {"weight_gradient", WeightGradient}}) {
    PyObject* capsule = PyCapsule_New(reinterpret_cast<void*>(handler),
                                      "xla._CUSTOM_CALL_TARGET", nullptr);
    if (capsule == nullptr || PyDict_SetItemString(handlers, name, capsule) != 0) {
      Py_XDECREF(capsule);
      Py_DECREF(handlers);
      return nullptr;
    }
    Py_DECREF(capsule);
  }
  return handlers;
}

PyMethodDef methods[] = {
    {"handlers", Handlers, METH_NOARGS,
     "The XLA FFI handlers of oneDNN's NHWC convolution passes, as capsules by pass."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_onednn",
                      "oneDNN's convolutions for XLA on CPU.", -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__onednn() { return PyModule_Create(&module); }
