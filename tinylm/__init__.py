"""The embedded tiny model's generated corpus, tokenizer builder, training objective and cache-free quality
checks. Not part of the installed package: only its trained weights ship (nemodiff_compile/assets/tiny/);
`scripts/train_tiny.py` retrains them from here."""
