"""Exporting a run: Hugging Face save and LoRA merge (:mod:`.hf`), GGUF (:mod:`.gguf`) with an Ollama
``Modelfile`` (:mod:`.ollama`), ``--verify`` (:mod:`.verify`) and the lineage file (:mod:`.lineage`)."""
