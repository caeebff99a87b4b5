"""What a release is made of: references, the manifest, hashing, packing a model
directory, safetensors headers, the digest cache, provenance and Hub snapshots."""
