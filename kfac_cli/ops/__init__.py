"""The maths, as pure functions on tensors: convolution hyper-parameters, (averaged)
patches, the canonical parameter layout and Kronecker factors. No files, no flags."""
