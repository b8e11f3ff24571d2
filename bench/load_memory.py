"""Peak memory of loading a checkpoint: how much the process's peak RSS grows, over the bytes of the
weights in the requested dtype. Each load runs in a fresh child process so the numbers are clean.

    python bench/load_memory.py                       # the embedded default model, float32 and bfloat16
    python bench/load_memory.py --model DIR --dtypes bfloat16

The goal (issue: model.py) is at most ~1.5x: memory-mapped tensors when no conversion is needed,
streamed conversion otherwise, never a second full copy.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import torch, kernels, model  # imports first: their memory is not the checkpoint's
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
m = model.load_model(sys.argv[2], dtype=sys.argv[3])
with torch.no_grad():  # touch every weight, as a real first forward pass would
    total = sum(float(p.sum()) * 0 + p.numel() * p.element_size() for p in m.parameters())
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"weights": total, "growth": after - before}))
"""


def measure(model_dir, dtype):
    out = subprocess.run([sys.executable, "-c", CHILD, str(REPO), str(model_dir), dtype],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(REPO / "checkpoints" / "smollm2-135m-instruct"))
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    print(f"{'dtype':9} {'weights MB':>11} {'peak RSS growth MB':>19} {'ratio':>6}")
    for dtype in args.dtypes.split(","):
        r = measure(args.model, dtype)
        print(f"{dtype:9} {r['weights'] / 1e6:11.1f} {r['growth'] / 1e6:19.1f} {r['growth'] / r['weights']:6.2f}")


if __name__ == "__main__":
    main()
