"""File formats: safetensors reading (files, sharded sets, streams) and streaming writing,
weights-only ``torch.save`` files, and atomic output. No maths, no command-line words."""
