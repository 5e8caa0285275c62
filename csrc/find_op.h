// The ops of the fusedops library by name, typed: "fusedops::<name>", or its Triton variant
// "fusedops::<name>_triton" (registered from Python).
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>

#include <mutex>
#include <optional>
#include <string>
#include <utility>

namespace fusedops {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const std::string& name, bool triton) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(("fusedops::" + name + (triton ? "_triton" : "")).c_str(), "")
      .typed<Signature>();
}

// An op and its Triton variant, each looked up once, on its first use (a call site keeps one as a static).
template <typename Signature>
class BackendOps {
 public:
  explicit BackendOps(std::string name) : name_(std::move(name)) {}

  const c10::TypedOperatorHandle<Signature>& get(bool triton) const {
    std::call_once(once_[triton], [&] { handle_[triton] = find_op<Signature>(name_, triton); });
    return *handle_[triton];
  }

 private:
  std::string name_;
  mutable std::once_flag once_[2];
  mutable std::optional<c10::TypedOperatorHandle<Signature>> handle_[2];
};

}  // namespace fusedops
