"""The commands as library functions (one module each) over a shared skeleton: open the
inputs, check and plan everything, then stream chunks through the device and out."""
