"""Where images come from: local paths, HTTP(S) with its policy, checksums, signatures, mirrors and the cache."""
