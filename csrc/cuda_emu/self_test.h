// The emulator's self-test cases (self_test.cpp), shared by the op that runs them and by the
// sanitizer build's driver.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <string>
#include <tuple>
#include <vector>

namespace convkit {

struct SelfTestCase {
  std::string name;
  // A fragment of the error the emulator must raise; empty for a correct twin, which must run
  // and check its own result.
  std::string expected_error;
  std::function<at::Tensor()> run;  // the case's output, for those that have one
};

const std::vector<SelfTestCase>& self_test_cases();

// The ops: one case by name; the table as (names, expected error fragments).
at::Tensor cuda_emulator_self_test(const std::string& name);
std::tuple<std::vector<std::string>, std::vector<std::string>> cuda_emulator_self_tests();

}  // namespace convkit
