"""C++ CPU kernels (``*.cpp``, sharing ``om_vec.h``), JIT-built on first use by :mod:`.build`."""
