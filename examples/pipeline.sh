#!/usr/bin/env bash
# Many dump shards through kfac-cli in parallel, as a shell pipeline or a CI job would.
#   $ bash examples/pipeline.sh [FOLDER]
set -euo pipefail
dir=${1:-kfac-pipeline}
mkdir -p "$dir/shards" "$dir/out"
here=$(cd "$(dirname "$0")" && pwd)

# A model and four activation shards (in real life: written by your training job).
python - "$dir" "$here" <<'PY'
import sys, torch
from pathlib import Path
from safetensors.torch import save_file
sys.path.insert(0, sys.argv[2])
from record_activations import record_activations
d = Path(sys.argv[1]); torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 8 * 8, 4)).eval()
torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), d / "model.pt2")
for i in range(4):
    save_file(record_activations(model, torch.randn(5, 3, 8, 8)), d / "shards" / f"acts-{i}.safetensors")
PY

# Two at a time; each kfac-cli exits non-zero on any problem, and xargs passes that on.
ls "$dir"/shards/*.safetensors | xargs -P 2 -I{} sh -c \
  'kfac-cli patches "$0/model.pt2" "$1" -o "$0/out/$(basename "$1" .safetensors).patches.safetensors" --approx reduce --force -q --json > /dev/null' \
  "$dir" {}

n=$(ls "$dir"/out/*.patches.safetensors | wc -l)
test "$n" -eq 4
echo "wrote $n patch files to $dir/out; checks passed"
