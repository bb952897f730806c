"""Post-quantum primitives: ML-KEM / ML-DSA through ``cryptography``, hybrid sealing,
and the optional liboqs cross-check. Knows nothing about certificates or tunnels."""
