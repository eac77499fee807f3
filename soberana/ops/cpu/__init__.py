"""Native CPU kernels: the C sources of `../csrc/` built at first use and called through ctypes
(`kernels.py`), linears with their weights packed once (`linear.py`), and the decoder stack in
one native call (`decoder_stack.py`)."""
