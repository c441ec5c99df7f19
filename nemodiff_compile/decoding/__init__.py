"""Backend-independent decoding: the `Denoiser` contract (`denoiser`) and its optional device block refiner
(`refine`), the commit rules (`remask`), `DecodePolicy` (`policy`: every decoding default, resolved once) and
the AR / block-diffusion / linear-spec loops (`loops`)."""
