"""Run one training script in this process and record what it cost: wall time and peak memory.

    python benchmarks/measure.py OUT.json grpo.py --max-steps 40 ...

Peak memory is the CUDA allocator's peak on a GPU, the process's peak resident set size on CPU. The script runs
through its own command line (tyro parses the arguments that follow its name), exactly as a user would run it.
"""

import json
import resource
import runpy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    if len(sys.argv) < 3 or not (Path(__file__).resolve().parents[1] / sys.argv[2]).is_file():
        print("error: usage: python benchmarks/measure.py OUT.json SCRIPT.py [its flags ...], SCRIPT.py one of the "
              "repository's scripts", file=sys.stderr)
        raise SystemExit(2)
    out, script, *script_args = sys.argv[1:]
    sys.argv = [script, *script_args]
    start = time.time()
    runpy.run_path(str(Path(__file__).resolve().parents[1] / script), run_name="__main__")
    result = {"script": script, "args": script_args, "wall_s": time.time() - start,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        result["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
