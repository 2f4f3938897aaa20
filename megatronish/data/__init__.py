"""The data pipeline: tokenizers, the Megatron-compatible indexed dataset (.bin/.idx),
preprocessing, GPT samples, blending, the pretraining sampler and the embedded default corpus.

Modules (import the one you need; this package imports nothing heavy by itself):
    tokenizers        build_tokenizer(...) and the tokenizers (Megatron's names)
    tokenizer_training  train a SentencePiece or byte-level BPE tokenizer (tools/train_tokenizer.py)
    indexed_dataset   IndexedDatasetBuilder, IndexedDataset (MMIDIDX, byte-compatible with Megatron-LM)
    preprocess        JSONL / Hugging Face datasets -> indexed dataset, across worker processes
    gpt_dataset       GPTDataset, build_gpt_datasets(...) (splits, sample indices, blending)
    blended_dataset   BlendedDataset (deterministic mixing in given proportions)
    samplers          PretrainingSampler, build_pretraining_data_loader(...)
    default_corpus    default_corpus_prefix(): an offline corpus from Python's own standard library
    cache             where caches live ($MEGATRONISH_CACHE), file locks, atomic publishing
"""
