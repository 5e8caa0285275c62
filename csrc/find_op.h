// An op of the fusedops library by name, typed: "fusedops::<name>", or its Triton variant
// "fusedops::<name>_triton" (registered from Python).
#pragma once
#include <ATen/core/dispatch/Dispatcher.h>

#include <string>

namespace fusedops {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const std::string& name, bool triton) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(("fusedops::" + name + (triton ? "_triton" : "")).c_str(), "")
      .typed<Signature>();
}

}  // namespace fusedops
