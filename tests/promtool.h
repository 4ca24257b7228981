// Checks Prometheus exposition text with `promtool check metrics` (from
// Debian's prometheus package, which tools/bootstrap.sh installs): the
// metrics tests of the coordinator and the stage servers run their output
// through it.
//
//   EXPECT_EQ(PromtoolProblems(metrics.Render(models)), "");
#ifndef PIPESERVE_TESTS_PROMTOOL_H_
#define PIPESERVE_TESTS_PROMTOOL_H_

#include <string>

namespace pipeserve {

// What promtool says is wrong with `text` (lint included), "" when
// nothing; says so when promtool is missing.
std::string PromtoolProblems(const std::string& text);

}  // namespace pipeserve

#endif  // PIPESERVE_TESTS_PROMTOOL_H_
