// Argument checks of the ops. Their exception types and texts come from the
// table simplex_param/errors.def, which the Python fallback reads too.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

#include <string>

namespace simplex_param {

// `weights` (called `name` in messages): (K,) or (*P, K) against K inputs of
// one shape, dtype and device.
void check_args(const at::Tensor& weights, at::TensorList inputs, const char* name);

// mix's `weights`: (M, K) or (*P, M, K) against K inputs.
void check_mix_args(const at::Tensor& weights, at::TensorList inputs, const char* name);

// K >= 1 inputs of one kernel dtype, shape and device, called inputs[k] in
// messages, or groups[group][k] for a group of a grouped op (group >= 0).
void check_inputs(at::TensorList inputs, int64_t group);

// A grouped op's `weights` (G, K) against its G * K flat inputs, where
// inputs[g * K + k] is groups[g][k] (so named in messages).
void check_grouped_args(const at::Tensor& weights, at::TensorList inputs, const char* name);

void check_temperature(double temperature);

// The arguments of _weighted_sum_backward.
void check_backward_args(
    const at::Tensor& grad,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad);

// The arguments of _mix_backward: grad (*P, M, *rest).
void check_mix_backward_args(
    const at::Tensor& grad,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad);

// The arguments of _grouped_weighted_sum_backward.
void check_grouped_backward_args(
    at::TensorList grads,
    const at::Tensor& weights,
    at::TensorList inputs,
    bool weights_requires_grad,
    const c10::List<bool>& inputs_requires_grad);

// alpha of a call of map `map`: none for a map without the parameter, else
// none (the default) or a finite number >= 1.
void check_alpha(const char* map, bool has_alpha, c10::optional<double> alpha);

// Raises the table's `unknown_map` error.
[[noreturn]] void fail_unknown_map(c10::string_view map, const std::string& known);

} // namespace simplex_param
