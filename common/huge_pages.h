// Large buffers on transparent huge pages.
//
// Every tensor, weight and message buffer above glibc's mmap threshold is
// a fresh mapping, and on 4 KiB pages its first touch costs one page fault
// per page: GPT-2's logits for 8 x 128 tokens (206 MB) are 50,000 faults,
// and on the build VMs a fault costs about 36 us (bench/transformer.py:
// served latency 11 s before, 3.7-5 s after). glibc's malloc puts its
// mappings on transparent huge pages (2 MiB, one fault each) when
// GLIBC_TUNABLES holds glibc.malloc.hugetlb=1, a setting it reads only at
// process start.
//
//   int main(int argc, char** argv) {
//     pipeserve::ReexecWithHugePages(argv);   // first thing
//
// starts the binary again (same pid, same arguments) with that setting,
// once. It does nothing when GLIBC_TUNABLES is already set (the user's
// choice, or the second start), when PIPESERVE_HUGE_PAGES=0, or when the
// kernel's transparent huge pages are "never". Child processes (stage
// servers started by the coordinator) inherit the setting.
#ifndef PIPESERVE_COMMON_HUGE_PAGES_H_
#define PIPESERVE_COMMON_HUGE_PAGES_H_

namespace pipeserve {

void ReexecWithHugePages(char** argv);

// True when this process runs with glibc.malloc.hugetlb=1.
bool HugePagesRequested();

}  // namespace pipeserve

#endif  // PIPESERVE_COMMON_HUGE_PAGES_H_
