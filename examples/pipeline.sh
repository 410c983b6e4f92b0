#!/usr/bin/env bash
# Many dump shards through kfac-cli, as a shell pipeline or a CI job would: patches of each
# shard in parallel, factors of each shard merged into the factors of all, and a compressed
# dump streamed into factors without unpacking it to disk; each checked against one run.
#   $ bash examples/pipeline.sh [FOLDER]
set -euo pipefail
dir=${1:-kfac-pipeline}
mkdir -p "$dir/shards" "$dir/out"

# A model and four shards of activation and output-gradient dumps (in real life: written
# by your training job with kfac_cli.record).
python - "$dir" <<'PY'
import sys, torch
from pathlib import Path
from kfac_cli.record import record
d = Path(sys.argv[1]); torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 8 * 8, 4))
torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), d / "model.pt2")
batches = [(torch.randn(5, 3, 8, 8), torch.randint(0, 4, (5,))) for _ in range(4)]
record(model, batches, torch.nn.CrossEntropyLoss(), d / "shards", fisher_type="mc", force=True)
PY

# Patches of every shard, two at a time; each kfac-cli exits non-zero on any problem, and
# xargs passes that on.
ls "$dir"/shards/acts-*.safetensors | xargs -P 2 -I{} sh -c \
  'kfac-cli patches "$0/model.pt2" "$1" -o "$0/out/$(basename "$1" .safetensors).patches.safetensors" --approx reduce --force -q' \
  "$dir" {}
test "$(ls "$dir"/out/*.patches.safetensors | wc -l)" -eq 4

# Factors of each shard (in parallel, or on different machines), merged ...
for i in 0 1 2 3; do
  echo "$i"
done | xargs -P 2 -I{} kfac-cli factors "$dir/model.pt2" "$dir/shards/acts-0000{}.safetensors" \
  --grads "$dir/shards/grads-0000{}.safetensors" -o "$dir/out/part-{}.safetensors" --force -q
kfac-cli merge "$dir"/out/part-*.safetensors -o "$dir/out/merged.safetensors" --force -q
# ... equal one run over all the shards.
kfac-cli factors "$dir/model.pt2" "$dir"/shards/acts-*.safetensors \
  --grads "$dir"/shards/grads-*.safetensors -o "$dir/out/all.safetensors" --force -q

# A compressed dump, streamed: nothing unpacked to disk.
gzip -c "$dir/shards/acts-00000.safetensors" > "$dir/acts-00000.safetensors.gz"
gzip -dc "$dir/acts-00000.safetensors.gz" | kfac-cli factors "$dir/model.pt2" - \
  --grads "$dir/shards/grads-00000.safetensors" -o "$dir/out/streamed.safetensors" --force -q
cmp "$dir/out/streamed.safetensors" "$dir/out/part-0.safetensors"

python - "$dir/out" <<'PY'
import sys, torch
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
merged, whole = load_file(out / "merged.safetensors"), load_file(out / "all.safetensors")
assert merged.keys() == whole.keys()
for k in whole:
    torch.testing.assert_close(merged[k], whole[k], rtol=1e-5, atol=1e-7)
print(f"merged factors of 4 shards equal one run over all ({', '.join(sorted(whole))})")
PY
echo "wrote 4 patch files, 4 factor files, their merge and a streamed one to $dir/out; checks passed"
