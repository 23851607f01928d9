// The fast path of the public Python operators (hypercolumn_ops/ops.py): the common, valid call
// normalised and dispatched in C++, without Python's per-argument cost.
//
// A call gives its public arguments as they came. If every one of them has the common form
// below, the normalisation is the one of hypercolumn_ops/_validation.py (which stays the
// definition: docs/semantics.md, "Errors") and the operator runs through the dispatcher; otherwise
// the function returns None and the caller takes the Python path, which handles every other form
// and raises the errors. So this path never raises an argument error of its own, and never
// accepts what the Python path refuses (tests/test_fast_path.py runs both on the same calls).
//
// The common form: features a list or tuple of plain tensors (torch.Tensor or nn.Parameter; a
// subclass with __torch_function__ goes the Python way) of one floating dtype on the CPU or a
// CUDA device, no autocast region or __torch_function__ mode active for them; coordinates already
// in the coordinate dtype (float64 for float64 features, float32 otherwise); boxes as (R, 5)
// rows; image_size two ints or spatial_scale floats or ints; weights of the features' dtype;
// bias, labels, box_bias and locations in the forms the Python path takes; strings and numbers
// of their exact built-in types. Batch indices and labels are checked as the Python path checks
// them (set_value_checks): an invalid value, or a check that would synchronise with a GPU, goes
// the Python way.
//
// The caller decides the backend (native only) and tracing (never under torch.compile).
#include <torch/extension.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <optional>
#include <vector>

#include "fast_path.h"
#include "hypercolumn_math.h"
#include "index_check.h"
#include "op_handles.h"

namespace hypercolumn_ops {
namespace {

namespace py = pybind11;
using Rows = std::optional<at::Tensor>;

// float32's largest finite value and smallest positive (subnormal) one: a spatial_scale outside
// them becomes inf or 0 in a float32 kernel (_validation.py refuses it for non-float64 features).
constexpr double kFloat32Max = std::numeric_limits<float>::max();
constexpr double kFloat32Tiny = std::numeric_limits<float>::denorm_min();

// A tensor whose operator calls reach the dispatcher as they are: torch.Tensor or nn.Parameter
// (whose __torch_function__ is the disabled one), not a subclass.
bool plain_tensor(py::handle value) { return THPVariable_CheckExact(value.ptr()); }

// The dtypes of features (_validation._FLOATING).
bool feature_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16;
}

bool is_sequence(py::handle value) { return PyList_CheckExact(value.ptr()) || PyTuple_CheckExact(value.ptr()); }

// A Python int (not a bool) that fits int64 -> its value.
std::optional<int64_t> exact_int(py::handle value) {
  if (!PyLong_CheckExact(value.ptr())) {
    return std::nullopt;
  }
  int overflow = 0;
  const long long result = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
  if (overflow != 0 || (result == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return std::nullopt;
  }
  return static_cast<int64_t>(result);
}

// A Python float or int (not a bool) -> its value as a float.
std::optional<double> exact_real(py::handle value) {
  if (PyFloat_CheckExact(value.ptr())) {
    return PyFloat_AS_DOUBLE(value.ptr());
  }
  if (!PyLong_CheckExact(value.ptr())) {
    return std::nullopt;
  }
  const double result = PyLong_AsDouble(value.ptr());
  if (result == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return std::nullopt;
  }
  return result;
}

// The features, with what the other arguments are checked against.
struct Layers {
  std::vector<at::Tensor> maps;
  at::ScalarType dtype;
  at::Device device;
  int64_t batch;

  at::ScalarType coordinate_dtype() const { return dtype == at::kDouble ? at::kDouble : at::kFloat; }
  bool on_device(const at::Tensor& t) const { return t.device() == device; }
  const char* device_type() const { return device.is_cpu() ? "cpu" : "cuda"; }
};

bool autocast_active(const at::Device& device) {
  return !c10::impl::tls_is_dispatch_key_excluded(device.is_cpu() ? c10::DispatchKey::AutocastCPU
                                                                    : c10::DispatchKey::AutocastCUDA);
}

std::optional<Layers> layers_of(py::handle features) {
  if (!is_sequence(features) || at::impl::torch_function_mode_enabled()) {
    return std::nullopt;
  }
  const py::sequence items = py::reinterpret_borrow<py::sequence>(features);
  const size_t count = items.size();
  if (count == 0 || !plain_tensor(items[0])) {
    return std::nullopt;
  }
  const at::Tensor& first = THPVariable_Unpack(items[0].ptr());
  const at::ScalarType dtype = first.scalar_type();
  if (!feature_dtype(dtype) || first.dim() != 4) {
    return std::nullopt;
  }
  Layers layers{{}, dtype, first.device(), first.size(0)};
  if (!(layers.device.is_cpu() || layers.device.is_cuda()) || autocast_active(layers.device)) {
    return std::nullopt;
  }
#ifndef HYPERCOLUMN_OPS_WITH_CUDA
  if (!layers.device.is_cpu()) {
    return std::nullopt;
  }
#endif
  layers.maps.reserve(count);
  for (size_t l = 0; l < count; ++l) {
    const py::handle item = items[l];
    if (!plain_tensor(item)) {
      return std::nullopt;
    }
    const at::Tensor& map = THPVariable_Unpack(item.ptr());
    if (map.scalar_type() != dtype || map.dim() != 4 || !layers.on_device(map) || map.size(0) != layers.batch ||
        map.size(2) < 1 || map.size(3) < 1) {
      return std::nullopt;
    }
    layers.maps.push_back(map);
  }
  return layers;
}

// Where batch indices and labels are read: value_checks is set_value_checks' setting (None: on CPU
// tensors only). nullopt: a check the Python path makes with a synchronisation.
std::optional<bool> checking_values(py::handle value_checks, const Layers& layers) {
  if (value_checks.is_none()) {
    return layers.device.is_cpu();
  }
  if (value_checks.ptr() == Py_False) {
    return false;
  }
  return layers.device.is_cpu() ? std::optional<bool>(true) : std::nullopt;
}

// Coordinate rows (rows, columns) in the coordinate dtype on the features' device -> detached,
// contiguous; with `batch_column`, column 0's values checked where `check`.
Rows coordinates(py::handle value, int64_t columns, const Layers& layers, bool check, bool batch_column) {
  if (!plain_tensor(value)) {
    return std::nullopt;
  }
  const at::Tensor& rows = THPVariable_Unpack(value.ptr());
  if (rows.scalar_type() != layers.coordinate_dtype() || rows.dim() != 2 || rows.size(1) != columns ||
      !layers.on_device(rows)) {
    return std::nullopt;
  }
  if (batch_column && check && rows.size(0) > 0 && !cpu::index_column_valid_cpu(rows, layers.batch)) {
    return std::nullopt;
  }
  at::Tensor result = rows.requires_grad() ? rows.detach() : rows;
  return result.is_contiguous() ? result : result.contiguous();
}

// image_size (two positive ints) or spatial_scale (one positive number or one per layer; within
// float32's range unless the features are float64), exactly one of them.
struct ScaleArguments {
  std::vector<c10::SymInt> image_size;
  std::vector<double> spatial_scale;
};

std::optional<ScaleArguments> scales_of(py::handle image_size, py::handle spatial_scale, const Layers& layers) {
  ScaleArguments scales;
  if (!image_size.is_none()) {
    if (!spatial_scale.is_none() || !is_sequence(image_size)) {
      return std::nullopt;
    }
    const py::sequence size = py::reinterpret_borrow<py::sequence>(image_size);
    if (size.size() != 2) {
      return std::nullopt;
    }
    for (size_t i = 0; i < 2; ++i) {
      const std::optional<int64_t> value = exact_int(size[i]);
      if (!value || *value < 1) {
        return std::nullopt;
      }
      scales.image_size.emplace_back(*value);
    }
    return scales;
  }
  if (spatial_scale.is_none()) {
    return std::nullopt;
  }
  const size_t count = layers.maps.size();
  if (is_sequence(spatial_scale)) {
    const py::sequence values = py::reinterpret_borrow<py::sequence>(spatial_scale);
    if (values.size() != count) {
      return std::nullopt;
    }
    for (size_t l = 0; l < count; ++l) {
      const std::optional<double> value = exact_real(values[l]);
      if (!value) {
        return std::nullopt;
      }
      scales.spatial_scale.push_back(*value);
    }
  } else {
    const std::optional<double> value = exact_real(spatial_scale);
    if (!value) {
      return std::nullopt;
    }
    scales.spatial_scale.assign(count, *value);
  }
  for (const double s : scales.spatial_scale) {
    if (!(s > 0 && std::isfinite(s)) || (layers.dtype != at::kDouble && !(s >= kFloat32Tiny && s <= kFloat32Max))) {
      return std::nullopt;
    }
  }
  return scales;
}

std::optional<int64_t> padding_code(py::handle padding) {
  if (!PyUnicode_CheckExact(padding.ptr())) {
    return std::nullopt;
  }
  if (PyUnicode_CompareWithASCIIString(padding.ptr(), "border") == 0) {
    return kPaddingBorder;
  }
  if (PyUnicode_CompareWithASCIIString(padding.ptr(), "zeros") == 0) {
    return kPaddingZeros;
  }
  if (PyUnicode_CompareWithASCIIString(padding.ptr(), "zeros_per_tap") == 0) {
    return kPaddingZerosPerTap;
  }
  return std::nullopt;
}

std::optional<int64_t> activation_code(py::handle activation) {
  if (activation.is_none()) {
    return kActivationNone;
  }
  if (PyUnicode_CheckExact(activation.ptr()) && PyUnicode_CompareWithASCIIString(activation.ptr(), "sigmoid") == 0) {
    return kActivationSigmoid;
  }
  return std::nullopt;
}

// output_size: a positive int, or two in a tuple or list -> (oh, ow).
std::optional<std::pair<int64_t, int64_t>> grid_of(py::handle output_size) {
  if (const std::optional<int64_t> side = exact_int(output_size)) {
    return *side >= 1 ? std::optional<std::pair<int64_t, int64_t>>({*side, *side}) : std::nullopt;
  }
  if (!is_sequence(output_size)) {
    return std::nullopt;
  }
  const py::sequence size = py::reinterpret_borrow<py::sequence>(output_size);
  if (size.size() != 2) {
    return std::nullopt;
  }
  const std::optional<int64_t> height = exact_int(size[0]);
  const std::optional<int64_t> width = exact_int(size[1]);
  if (!height || !width || *height < 1 || *width < 1) {
    return std::nullopt;
  }
  return std::pair<int64_t, int64_t>{*height, *width};
}

// sampling_ratio (an int, at most kMaxSamples) and aligned (a bool).
std::optional<std::pair<int64_t, bool>> sampling_of(py::handle sampling_ratio, py::handle aligned) {
  const std::optional<int64_t> ratio = exact_int(sampling_ratio);
  if (!ratio || *ratio > kMaxSamples || !PyBool_Check(aligned.ptr())) {
    return std::nullopt;
  }
  return std::pair<int64_t, bool>{*ratio, aligned.ptr() == Py_True};
}

// One weight tensor per layer, (KK, M, C_l) or class-specific (NC, KK, M, C_l) -> as
// (NC, KK, M, C_l).
struct Classifier {
  std::vector<at::Tensor> weights;
  int64_t classes, cells, outputs;
  bool class_specific;
};

std::optional<Classifier> classifier_of(py::handle weights, const Layers& layers) {
  if (!is_sequence(weights)) {
    return std::nullopt;
  }
  const py::sequence items = py::reinterpret_borrow<py::sequence>(weights);
  const size_t count = layers.maps.size();
  if (items.size() != count || !plain_tensor(items[0])) {
    return std::nullopt;
  }
  const at::Tensor& first = THPVariable_Unpack(items[0].ptr());
  const int64_t rank = first.dim();
  if (rank != 3 && rank != 4) {
    return std::nullopt;
  }
  const at::IntArrayRef lead = first.sizes().slice(0, rank - 1);
  Classifier classifier{{}, rank == 4 ? lead[0] : 1, lead[rank - 3], lead[rank - 2], rank == 4};
  classifier.weights.reserve(count);
  for (size_t l = 0; l < count; ++l) {
    const py::handle item = items[l];
    if (!plain_tensor(item)) {
      return std::nullopt;
    }
    const at::Tensor& weight = THPVariable_Unpack(item.ptr());
    if (weight.scalar_type() != layers.dtype || !layers.on_device(weight) || weight.dim() != rank ||
        weight.size(rank - 1) != layers.maps[l].size(1) || weight.sizes().slice(0, rank - 1) != lead) {
      return std::nullopt;
    }
    classifier.weights.push_back(rank == 4 ? weight : weight.unsqueeze(0));
  }
  const int64_t grid = static_cast<int64_t>(std::llround(std::sqrt(static_cast<double>(classifier.cells))));
  if (classifier.cells < 1 || grid * grid != classifier.cells || classifier.outputs < 1 || classifier.classes < 1) {
    return std::nullopt;
  }
  return classifier;
}

// labels: exactly with class-specific weights, (count,) int64 in [0, NC).
std::optional<OptionalTensor> labels_of(py::handle labels, const Classifier& classifier, int64_t count,
                                        const Layers& layers, bool check) {
  if (!classifier.class_specific) {
    return labels.is_none() ? std::optional<OptionalTensor>(OptionalTensor()) : std::nullopt;
  }
  if (!plain_tensor(labels)) {
    return std::nullopt;
  }
  const at::Tensor& values = THPVariable_Unpack(labels.ptr());
  if (values.scalar_type() != at::kLong || values.dim() != 1 || values.size(0) != count || !layers.on_device(values) ||
      (check && count > 0 && !cpu::index_column_valid_cpu(values, classifier.classes))) {
    return std::nullopt;
  }
  return OptionalTensor(values.is_contiguous() ? values : values.contiguous());
}

// A bias-like term: a plain tensor of the features' dtype and device.
const at::Tensor* term_of(py::handle value, const Layers& layers) {
  if (!plain_tensor(value)) {
    return nullptr;
  }
  const at::Tensor& term = THPVariable_Unpack(value.ptr());
  return term.scalar_type() == layers.dtype && layers.on_device(term) ? &term : nullptr;
}

// bias ((KK, M); (NC, KK, M) with labels; (R, KK, M) for boxes without labels) plus box_bias
// ((count, KK, M)) -> bias rows (count, KK, M), or None.
std::optional<OptionalTensor> bias_of(py::handle bias, py::handle box_bias, const OptionalTensor& labels,
                                      const Classifier& classifier, int64_t count, bool per_box_form,
                                      const Layers& layers) {
  const int64_t cells = classifier.cells;
  const int64_t outputs = classifier.outputs;
  at::Tensor rows;
  if (!bias.is_none()) {
    const at::Tensor* term = term_of(bias, layers);
    if (term == nullptr) {
      return std::nullopt;
    }
    const at::IntArrayRef shape = term->sizes();
    if (shape.size() == 2 && shape[0] == cells && shape[1] == outputs) {
      rows = term->expand({count, cells, outputs});
    } else if (labels.has_value() && shape == at::IntArrayRef({classifier.classes, cells, outputs})) {
      rows = term->index({labels->clamp(0, classifier.classes - 1)});
    } else if (!labels.has_value() && per_box_form && shape == at::IntArrayRef({count, cells, outputs})) {
      rows = *term;
    } else {
      return std::nullopt;
    }
  }
  if (box_bias.is_none()) {
    return rows.defined() ? OptionalTensor(rows) : OptionalTensor();
  }
  const at::Tensor* term = term_of(box_bias, layers);
  if (term == nullptr || term->sizes() != at::IntArrayRef({count, cells, outputs})) {
    return std::nullopt;
  }
  return OptionalTensor(rows.defined() ? rows + *term : *term);
}

// The per-layer evaluation orders, planned by _validation._planned_orders (planning.py, the one
// cost model) and kept here per call shape, as that function keeps them (GIL held throughout).
std::vector<int64_t> orders_of(const Layers& layers, int64_t points, const Classifier& classifier, int64_t samples) {
  static std::map<std::vector<int64_t>, std::vector<int64_t>> cache;
  constexpr size_t kCacheSize = 4096;
  std::vector<int64_t> key{points, classifier.classes, classifier.cells, classifier.outputs, samples,
                           layers.device.is_cpu() ? 0 : 1};
  for (const at::Tensor& map : layers.maps) {
    key.insert(key.end(), map.sizes().begin(), map.sizes().end());
  }
  const auto found = cache.find(key);
  if (found != cache.end()) {
    return found->second;
  }
  // Held for the life of the process (released, never decremented: a static py::object would be
  // destroyed after the interpreter, without the GIL).
  static const py::handle planner =
      py::object(py::module_::import("hypercolumn_ops._validation").attr("_planned_orders")).release();
  py::tuple shapes(layers.maps.size());
  for (size_t l = 0; l < layers.maps.size(); ++l) {
    shapes[l] = py::tuple(py::cast(layers.maps[l].sizes().vec()));
  }
  std::vector<int64_t> orders = planner(shapes, points, classifier.classes, classifier.cells, classifier.outputs,
                                        layers.device_type(), samples)
                                    .cast<std::vector<int64_t>>();
  if (cache.size() >= kCacheSize) {
    cache.clear();
  }
  cache.emplace(std::move(key), orders);
  return orders;
}

// Runs `call` (a dispatcher call) without the GIL and returns its output to Python; None where it
// raised, so that the Python path runs the call again and raises as the public operator does.
template <typename Call>
py::object run(const Call& call) {
  at::Tensor out;
  try {
    const py::gil_scoped_release no_gil;
    out = call();
  } catch (const std::exception&) {
    return py::none();
  }
  return py::reinterpret_steal<py::object>(THPVariable_Wrap(std::move(out)));
}

// What every operator checks first: the features, where values are read, the coordinate rows.
struct Call {
  Layers layers;
  bool check;
  at::Tensor rows;
};

std::optional<Call> call_of(py::handle features, py::handle rows, int64_t columns, py::handle value_checks) {
  std::optional<Layers> layers = layers_of(features);
  if (!layers) {
    return std::nullopt;
  }
  const std::optional<bool> check = checking_values(value_checks, *layers);
  if (!check) {
    return std::nullopt;
  }
  const Rows checked = coordinates(rows, columns, *layers, *check, /*batch_column=*/true);
  if (!checked) {
    return std::nullopt;
  }
  return Call{std::move(*layers), *check, *checked};
}

// The fused operators' classifier, labels and bias rows for `call`'s rows.
struct Classification {
  Classifier classifier;
  OptionalTensor labels, bias;
  int64_t activation;
};

std::optional<Classification> classification_of(const Call& call, py::handle weights, py::handle labels,
                                                py::handle bias, py::handle box_bias, py::handle activation,
                                                bool per_box_form) {
  std::optional<Classifier> classifier = classifier_of(weights, call.layers);
  if (!classifier) {
    return std::nullopt;
  }
  const int64_t count = call.rows.size(0);
  const std::optional<OptionalTensor> label_rows = labels_of(labels, *classifier, count, call.layers, call.check);
  if (!label_rows) {
    return std::nullopt;
  }
  const std::optional<OptionalTensor> bias_rows =
      bias_of(bias, box_bias, *label_rows, *classifier, count, per_box_form, call.layers);
  const std::optional<int64_t> act = activation_code(activation);
  if (!bias_rows || !act) {
    return std::nullopt;
  }
  return Classification{std::move(*classifier), *label_rows, *bias_rows, *act};
}

py::object sparse(py::handle features, py::handle points, py::handle image_size, py::handle spatial_scale,
                  py::handle padding, py::handle value_checks) {
  const std::optional<Call> call = call_of(features, points, 3, value_checks);
  if (!call) {
    return py::none();
  }
  const std::optional<ScaleArguments> scales = scales_of(image_size, spatial_scale, call->layers);
  const std::optional<int64_t> pad = padding_code(padding);
  if (!scales || !pad) {
    return py::none();
  }
  return run([&] {
    return sparse_op().call(call->layers.maps, call->rows, scales->image_size, scales->spatial_scale, *pad);
  });
}

py::object box(py::handle features, py::handle boxes, py::handle output_size, py::handle image_size,
               py::handle spatial_scale, py::handle padding, py::handle sampling_ratio, py::handle aligned,
               py::handle value_checks) {
  const std::optional<Call> call = call_of(features, boxes, 5, value_checks);
  if (!call) {
    return py::none();
  }
  const auto grid = grid_of(output_size);
  const std::optional<ScaleArguments> scales = scales_of(image_size, spatial_scale, call->layers);
  const std::optional<int64_t> pad = padding_code(padding);
  const auto sampling = sampling_of(sampling_ratio, aligned);
  if (!grid || !scales || !pad || !sampling) {
    return py::none();
  }
  return run([&] {
    return box_op().call(call->layers.maps, call->rows, grid->first, grid->second, scales->image_size,
                         scales->spatial_scale, *pad, sampling->first, sampling->second);
  });
}

py::object fused(py::handle features, py::handle boxes, py::handle weights, py::handle bias, py::handle output_size,
                 py::handle image_size, py::handle spatial_scale, py::handle labels, py::handle activation,
                 py::handle padding, py::handle sampling_ratio, py::handle aligned, py::handle box_bias,
                 py::handle value_checks) {
  const std::optional<Call> call = call_of(features, boxes, 5, value_checks);
  if (!call) {
    return py::none();
  }
  const std::optional<Classification> classes =
      classification_of(*call, weights, labels, bias, box_bias, activation, /*per_box_form=*/true);
  const auto grid = grid_of(output_size);
  const std::optional<ScaleArguments> scales = scales_of(image_size, spatial_scale, call->layers);
  const std::optional<int64_t> pad = padding_code(padding);
  const auto sampling = sampling_of(sampling_ratio, aligned);
  if (!classes || !grid || !scales || !pad || !sampling) {
    return py::none();
  }
  const int64_t samples = sampling->first > 0 ? sampling->first * sampling->first : 4;
  const std::vector<int64_t> orders =
      orders_of(call->layers, call->rows.size(0) * grid->first * grid->second, classes->classifier, samples);
  return run([&] {
    return fused_op().call(call->layers.maps, call->rows, classes->classifier.weights, classes->bias,
                           classes->labels, grid->first, grid->second, scales->image_size, scales->spatial_scale,
                           *pad, classes->activation, orders, sampling->first, sampling->second);
  });
}

py::object fused_points(py::handle features, py::handle points, py::handle weights, py::handle bias,
                        py::handle locations, py::handle image_size, py::handle spatial_scale, py::handle labels,
                        py::handle activation, py::handle padding, py::handle box_bias, py::handle value_checks) {
  const std::optional<Call> call = call_of(features, points, 3, value_checks);
  if (!call) {
    return py::none();
  }
  const std::optional<Classification> classes =
      classification_of(*call, weights, labels, bias, box_bias, activation, /*per_box_form=*/false);
  if (!classes) {
    return py::none();
  }
  OptionalTensor places;
  if (locations.is_none()) {
    if (classes->classifier.cells > 1) {
      return py::none();
    }
  } else {
    const Rows given = coordinates(locations, 2, call->layers, false, /*batch_column=*/false);
    if (!given || given->size(0) != call->rows.size(0)) {
      return py::none();
    }
    places = *given;
  }
  const std::optional<ScaleArguments> scales = scales_of(image_size, spatial_scale, call->layers);
  const std::optional<int64_t> pad = padding_code(padding);
  if (!scales || !pad) {
    return py::none();
  }
  const std::vector<int64_t> orders = orders_of(call->layers, call->rows.size(0), classes->classifier, 1);
  return run([&] {
    return fused_points_op().call(call->layers.maps, call->rows, places, classes->classifier.weights, classes->bias,
                                  classes->labels, scales->image_size, scales->spatial_scale, *pad,
                                  classes->activation, orders);
  });
}

}  // namespace

void register_fast_path(pybind11::module_& m) {
  m.def("fast_sparse_hypercolumn", &sparse);
  m.def("fast_box_hypercolumn", &box);
  m.def("fast_fused_hypercolumn", &fused);
  m.def("fast_fused_hypercolumn_points", &fused_points);
}

}  // namespace hypercolumn_ops
