#!/usr/bin/env bash
# Kronecker factors on two torchrun ranks (CPU, gloo), checked against one process.
# Each rank reads its share of the shards; rank 0 writes the file.
#   $ bash examples/distributed.sh [FOLDER]
# On a cluster, the same command runs on every node, e.g. two nodes of 8 GPUs:
#   torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
#       -m kfac_cli factors model.pt2 acts-*.safetensors --grads grads-*.safetensors \
#       -o factors.safetensors --device cuda
set -euo pipefail
dir=${1:-kfac-distributed}
mkdir -p "$dir/shards"

python - "$dir" <<'PY'
import sys, torch
from pathlib import Path
from kfac_cli.record import record
d = Path(sys.argv[1]); torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Flatten(), torch.nn.Linear(8 * 8 * 8, 4))
torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), d / "model.pt2")
batches = [(torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))) for _ in range(5)]
record(model, batches, torch.nn.CrossEntropyLoss(), d / "shards", fisher_type="empirical",
       force=True)
PY

python -m torch.distributed.run --nproc-per-node 2 -m kfac_cli factors "$dir/model.pt2" \
  "$dir"/shards/acts-*.safetensors --grads "$dir"/shards/grads-*.safetensors \
  -o "$dir/ranks.safetensors" --force -q
kfac-cli factors "$dir/model.pt2" "$dir"/shards/acts-*.safetensors \
  --grads "$dir"/shards/grads-*.safetensors -o "$dir/single.safetensors" --force -q

python - "$dir" <<'PY'
import sys, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import load_file
d = Path(sys.argv[1])
ranks, single = load_file(d / "ranks.safetensors"), load_file(d / "single.safetensors")
assert ranks.keys() == single.keys()
for k in single:  # equal up to the order of float32 summation
    torch.testing.assert_close(ranks[k], single[k], rtol=1e-6, atol=1e-6 * single[k].abs().max())
meta = [safe_open(d / f, "pt").metadata() for f in ("ranks.safetensors", "single.safetensors")]
assert meta[0] == meta[1]
print(f"2 ranks wrote the factors of one process ({len(single)} tensors); checks passed")
PY
