"""Build, once, the DeepSpeed JIT ops the test suite's CPU ranks load (shared-memory allreduce, CPU Adam,
pinned memory, and async_io for NVMe offload when libaio is installed), with the whole machine.

scripts/test.sh runs this before pytest. Otherwise the first test to need an op builds it inside a 2-rank
run, beside the other pytest-xdist worker's tests: on 2 fresh cores the first run needing async_io (a
trainer run with parameters on NVMe, 30 s once the op exists) hit its 600 s limit, where async_io builds in
250 s alone (cpu_adam 42-66 s, shm_comm 42-60 s, pin_memory 30 s by host: BENCHMARKS.md "Rank start-up").
Each build lands in TORCH_EXTENSIONS_DIR (scripts/setup_env.sh sets it per environment); a built op loads in
a second.
"""
import sys
import time

from deepspeed.accelerator import get_accelerator

OPS = ("ShareMemCommBuilder", "CPUAdamBuilder", "PinMemoryBuilder", "AsyncIOBuilder")


def main() -> int:
    accelerator = get_accelerator()
    for name in OPS:
        builder = accelerator.create_op_builder(name)
        if builder is None or not builder.is_compatible(verbose=False):
            print(f"build_ds_ops: {name} is not buildable on DeepSpeed's {accelerator.device_name()} accelerator "
                  "here; the tests that need it will say why", file=sys.stderr)
            continue
        start = time.perf_counter()
        builder.load(verbose=False)
        print(f"build_ds_ops: {builder.NAME} ready ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
