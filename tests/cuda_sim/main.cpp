// Runs the host-simulation checks of the CUDA kernels; prints a summary, exits 1 on a failure.
#include <cstdio>

#include "checks.h"

int main() {
  host_sim::run_sign_checks();
  host_sim::run_gram_checks();
  std::printf("%d checks, %d failures\n", host_sim::checks, host_sim::failures);
  return host_sim::failures != 0;
}
