"""BiSSL for language models (``--modality text``): GPT next-token pretext, text classification downstream.

Modules: :mod:`.corpora` (data read at run time from installed packages / your files),
:mod:`.tokenizer`, :mod:`.model` (Hugging Face causal LM split into backbone and untied LM head,
LoRA), :mod:`.config` (presets ``tiny``, ``cpu``, ``gpu``), :mod:`.pretext` (pretraining, bits per
character), :mod:`.stage` (the BiSSL stage on the image path's ``build_problem``), :mod:`.finetune`,
:mod:`.run` and :mod:`.cli`. See ``docs/bissl_text.md``.
"""
