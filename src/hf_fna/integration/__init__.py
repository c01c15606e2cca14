"""FNA inside Transformers: the `fna` attention backend (`backend`), the per-model plans that give each attention
module its layer and settings (`plans`), facts about vision towers and their families (`towers`), and what ran where
(`explain`)."""
