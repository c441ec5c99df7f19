"""Backend-independent decoding: commit rules and the AR / block-diffusion / linear-spec loops."""
