"""Backend-independent decoding: the `Denoiser` contract, commit rules and the AR / block-diffusion / linear-spec loops."""
