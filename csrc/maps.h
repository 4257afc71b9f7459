// The weight maps: functions from pre-weights z to weights w over the last
// dimension, in one registry (maps.cpp; its Python half is
// simplex_param/maps.py). Each is a forward and its vector-Jacobian product,
// built from differentiable ATen ops, so that a map works on every device and
// its backward can itself be differentiated (double backward). (The softmax
// runs loops of its own on short CPU rows, and the ATen ops whenever a graph
// is recorded: maps.cpp.)
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <c10/util/string_view.h>

namespace simplex_param {

// What a map is called with besides the tensors: the temperature, and the
// map's parameter (alpha of entmax_bisect) for a map that has one.
struct MapArgs {
  double temperature = 1.0;
  double alpha = 1.5;
};

struct SimplexMap {
  const char* name;
  // w = map(z / temperature) over the last dimension, in z's dtype.
  at::Tensor (*forward)(const at::Tensor& z, const MapArgs& args);
  // The gradient of z, given w = forward(z, args) and the gradient of w.
  at::Tensor (*vjp)(const at::Tensor& w, const at::Tensor& grad_w, const MapArgs& args);
  // Whether vjp ignores grad_w[k] where w[k] is 0 (the Jacobian's row is 0
  // there), so that the contraction need not read that input for it.
  bool ignores_zero_weights;
  // Whether the map takes MapArgs::alpha (otherwise alpha must not be given).
  bool has_alpha;
};

// The map called `name`; raises the `unknown_map` error for any other name.
const SimplexMap& find_map(c10::string_view name);

// The MapArgs of a call: checks the temperature, and alpha against the map
// (the `alpha` errors); alpha defaults to 1.5.
MapArgs map_args(const SimplexMap& map, double temperature, c10::optional<double> alpha);

// w = map(z, args) as an autograd node whose backward is map.vjp (itself
// differentiable): the map's closed form to any order, never the derivative
// of the ops that compute the forward (a sort, a bisection).
at::Tensor map_with_graph(const SimplexMap& map, const at::Tensor& z, const MapArgs& args);

} // namespace simplex_param
