"""The thin runtime: backends implementing the `Denoiser` contract, and the decode loops on top."""
