"""Models of other libraries as EDM denoisers: text-to-image models saved by diffusers (`diffusers:` specs).

- `specs`: a `diffusers:PATH_OR_ID[#SUBFOLDER]` spec, the model's family read from its configuration files
  alone, and the checks that a main model and its guide can work together (before anything is built);
- `denoisers`: the adapters that make a DDPM-family (ε, v or sample prediction) or rectified-flow model a
  denoiser D(x; σ, c) called like this project's networks, `net(x, sigma, cond)`;
- `loading`: builds those adapters, the text encoders and the decoders with diffusers (the optional
  `diffusers` extra, imported only here and only when a `diffusers:` spec is given);
- `text_to_image`: prompts × seeds to images with the EDM sampler and any of this project's guidance.
"""
