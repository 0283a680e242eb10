// The ops are forward-only (inference kernels). Their Autograd kernels run the op below
// autograd and, when an input requires grad, give the outputs a grad_fn that raises a clear
// error at backward -- instead of outputs that silently do not require grad.
#pragma once

#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>

#include <memory>
#include <string>
#include <type_traits>
#include <utility>

namespace diffkernels {

// Autograd nodes are held by std::shared_ptr up to torch 2.11 and by c10::intrusive_ptr later.
using NodePtr = std::decay_t<decltype(std::declval<const at::TensorBase&>().grad_fn())>;

template <class Ptr>
struct MakeNode;
template <class T>
struct MakeNode<std::shared_ptr<T>> {
  template <class N, class... A>
  static std::shared_ptr<T> make(A&&... a) { return std::make_shared<N>(std::forward<A>(a)...); }
};
template <class T>
struct MakeNode<c10::intrusive_ptr<T>> {
  template <class N, class... A>
  static c10::intrusive_ptr<T> make(A&&... a) { return c10::make_intrusive<N>(std::forward<A>(a)...); }
};

template <typename... Inputs>
void raise_at_backward(const std::string& message, at::TensorList outputs,
                       const Inputs&... inputs) {
  if (!torch::autograd::compute_requires_grad(inputs...)) return;
  NodePtr node = MakeNode<NodePtr>::template make<torch::autograd::Error>(message);
  node->set_next_edges(torch::autograd::collect_next_edges(inputs...));
  for (at::Tensor out : outputs)  // a handle: set_history takes a non-const ref in older torch
    torch::autograd::set_history(out, node);
}

}  // namespace diffkernels
