// The pipeserve command line; see client/cli.h.
#include <iostream>
#include <string>
#include <vector>

#include "client/cli.h"
#include "common/huge_pages.h"

int main(int argc, char** argv) {
  pipeserve::ReexecWithHugePages(argv);
  std::vector<std::string> args(argv + 1, argv + argc);
  return pipeserve::RunCli(args, std::cout, std::cerr);
}
