"""QSTP — the pqcnet tunnel core: TLS 1.3 with ML-KEM key exchange and ML-DSA mutual
auth (via the OpenSSL bundled in `cryptography`), plus a sans-IO frame layer."""
