// cuda_bench in builds without --config=cuda: says so.
#include <cstdio>

int main() {
  std::printf("cuda_bench: this build has no CUDA support (build with --config=cuda)\n");
  return 2;
}
