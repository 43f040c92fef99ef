// A C++ program with no Python: loads nestrnn's library (argv[1]) with dlopen, then a TorchScript
// file (argv[2]), runs it on the input read from stdin ("T B I" and then T*B*I numbers), and
// prints every output tensor's numbers, one a line. Built and run by tests/test_no_python.py.
#include <dlfcn.h>
#include <torch/script.h>

#include <cstdio>
#include <iostream>
#include <vector>

static void print(const c10::IValue& value) {
  if (value.isTensor()) {
    auto t = value.toTensor().contiguous().to(torch::kDouble).flatten();
    for (int64_t n = 0; n < t.numel(); ++n) std::printf("%.9g\n", t[n].item<double>());
  } else if (value.isTuple()) {
    for (const auto& item : value.toTupleRef().elements()) print(item);
  } else if (value.isList()) {
    for (const auto& item : value.toListRef()) print(item);
  }
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::cerr << "usage: program LIBRARY MODEL < INPUT\n";
    return 2;
  }
  if (!dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL)) {
    std::cerr << dlerror() << "\n";
    return 1;
  }
  int64_t steps, batch, size;
  std::cin >> steps >> batch >> size;
  std::vector<float> values(steps * batch * size);
  for (auto& v : values) std::cin >> v;
  auto input = torch::from_blob(values.data(), {steps, batch, size}).clone();
  auto module = torch::jit::load(argv[2]);
  module.eval();
  torch::NoGradGuard no_grad;
  print(module.forward(std::vector<c10::IValue>{input}));
  return 0;
}
