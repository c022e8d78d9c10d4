"""Applications built only on the public :mod:`hypergrad` API (toy problems, BiSSL, UMM)."""
