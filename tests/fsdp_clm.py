"""examples/llm/run_clm.py under FSDP2 on CPU; run by tests/test_clm_example.py alone:

    accelerate launch --use_fsdp --fsdp_version 2 ... tests/fsdp_clm.py RUN_CLM_ARGS...

accelerate turns FSDP on only for accelerator devices; this lets it through on CPU (as
tests/fsdp_trainer.py does) and runs the example unchanged.
"""

import json
import os
import sys

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples", "llm"))

from fsdp_trainer import allow_fsdp_on_cpu  # noqa: E402

if __name__ == "__main__":
    allow_fsdp_on_cpu()
    import run_clm

    results = run_clm.main(sys.argv[1:])
    rank = int(os.environ.get("RANK", 0))
    out = sys.argv[sys.argv.index("--output_dir") + 1]
    with open(os.path.join(out, f"result-rank{rank}.json"), "w") as f:
        json.dump(results, f)
