"""The math of FNA, pure PyTorch with no Transformers in sight: the Nyström attention (`nystrom`), landmark selection
(`landmarks`), massive-token and attention-sink detection (`sinks`), block-diagonal masks of packed sequences
(`blocks`) and the FLOP cost model (`cost`)."""
