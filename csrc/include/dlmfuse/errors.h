// Host-side errors with the Python exception they become (csrc/bindings translates them):
// TypeError for dtype/device, ValueError for shapes/values, RuntimeError for backend failures.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace dlmfuse {

enum class ErrorKind { kType, kValue, kRuntime };

class Error : public std::runtime_error {
 public:
  Error(ErrorKind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  ErrorKind kind() const { return kind_; }

 private:
  ErrorKind kind_;
};

// Concatenates its arguments with operator<< (messages name the argument, expectation, value).
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream stream;
  (stream << ... << args);
  return stream.str();
}

template <typename... Args>
[[noreturn]] void throw_type_error(const Args&... args) {
  throw Error(ErrorKind::kType, concat(args...));
}

template <typename... Args>
[[noreturn]] void throw_value_error(const Args&... args) {
  throw Error(ErrorKind::kValue, concat(args...));
}

template <typename... Args>
[[noreturn]] void throw_runtime_error(const Args&... args) {
  throw Error(ErrorKind::kRuntime, concat(args...));
}

}  // namespace dlmfuse
